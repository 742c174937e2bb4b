"""Outputs: the logits out of what a model returns, and models that return probabilities.

segcam explains raw logits (N, K, *S). :func:`select_logits` picks them out of a tensor, a dict,
a tuple or a deep supervision stack; :class:`FromProbabilities` turns a model's probabilities
back into logits; :func:`warn_if_probabilities` warns when the chosen output looks like
probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from segcam.errors import OutputError, SegCamWarning, user_stacklevel

__all__ = [
    "FromProbabilities",
    "OutputSpec",
    "logits_from_probabilities",
    "select_logits",
    "warn_if_probabilities",
]


@dataclass(frozen=True)
class FromProbabilities:
    r"""An output spec for models whose output is probabilities: explain logits made from them.

    ``output`` selects the probabilities as for :func:`select_logits`; they become

    - one channel (sigmoid): the exact logit $\log\frac{p}{1-p}$;
    - K channels (softmax): the log-probabilities $\log p_c = y_c - \log\sum_k e^{y_k}$,
      the logits up to a shift per pixel.

    What it changes: for a sigmoid model the maps are those of its logits (up to float
    rounding where p is within ~1e-7 of 0 or 1). For a softmax model the score is
    $\sum_{p \in M} \log p_c$, whose gradient has a term from every class through the
    log-sum-exp: it explains the class *against* the others, and does not vanish where the
    softmax saturates, as the probabilities' gradient does. Probabilities are clamped to
    [1e-12, 1 - 1e-7] first, so a saturated 0 or 1 gives a finite value.
    """

    output: str | int | Callable[[Any], torch.Tensor] | None = None


OutputSpec = str | int | Callable[[Any], torch.Tensor] | FromProbabilities | None


_SMALLEST_PROBABILITY = 1e-12


def logits_from_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits from probabilities (N, K, *S): see :class:`FromProbabilities`."""
    if probabilities.shape[1] == 1:
        clamped = probabilities.clamp(_SMALLEST_PROBABILITY, 1 - 1e-7)
        return torch.log(clamped) - torch.log1p(-clamped)
    return torch.log(probabilities.clamp_min(_SMALLEST_PROBABILITY))


def _describe_output(raw: Any) -> str:
    if isinstance(raw, torch.Tensor):
        return f"tensor of shape {tuple(raw.shape)}"
    if isinstance(raw, Mapping):
        return f"dict with keys {list(raw)}"
    if isinstance(raw, tuple | list):
        return f"{type(raw).__name__} of {len(raw)} items"
    return type(raw).__name__


def select_logits(raw: Any, output: OutputSpec, input_ndim: int) -> torch.Tensor:
    """Pick the logits (N, K, *S) out of a model's raw output.

    ``output`` may be a key (dict outputs), an index (tuple/list outputs, or the head of a deep
    supervision stack of shape (N, H, K, *S)), or a callable applied to the raw output. ``None``
    accepts a tensor of the input's rank, a dict with an ``"out"`` key (torchvision style) or a
    single tensor value, and a one-item tuple or list; anything else is ambiguous.
    :class:`FromProbabilities` wraps any of these for models that output probabilities.
    """
    if isinstance(output, FromProbabilities):
        probabilities = select_logits(raw, output.output, input_ndim)
        return logits_from_probabilities(probabilities)
    if callable(output):
        selected = output(raw)
    elif isinstance(output, str):
        if not isinstance(raw, Mapping):
            raise OutputError(
                f"output={output!r} is a key, but the model returned {_describe_output(raw)}"
            )
        if output not in raw:
            raise OutputError(f"output key {output!r} not in the model's output keys {list(raw)}")
        selected = raw[output]
    elif isinstance(output, int) and not isinstance(output, bool):
        if isinstance(raw, torch.Tensor) and raw.ndim == input_ndim + 1:
            if not -raw.shape[1] <= output < raw.shape[1]:
                raise OutputError(f"output={output} is outside the {raw.shape[1]} stacked heads")
            selected = raw[:, output]
        elif isinstance(raw, tuple | list):
            if not -len(raw) <= output < len(raw):
                raise OutputError(f"output={output} is outside the model's {len(raw)} outputs")
            selected = raw[output]
        else:
            raise OutputError(
                f"output={output} is an index, but the model returned {_describe_output(raw)}"
            )
    elif output is None:
        selected = _default_logits(raw, input_ndim)
    else:
        raise OutputError(f"output must be None, a key, an index or a callable; got {output!r}")
    if not isinstance(selected, torch.Tensor):
        raise OutputError(f"the selected output is {_describe_output(selected)}, not a tensor")
    if selected.ndim != input_ndim:
        raise OutputError(
            f"the logits must have shape (N, K, *S) with the input's rank {input_ndim}; got "
            f"{tuple(selected.shape)} (for a deep supervision stack pass output=0)"
        )
    if not selected.is_floating_point():
        raise OutputError(f"the logits must be floating point; got {selected.dtype}")
    return selected


def _default_logits(raw: Any, input_ndim: int) -> Any:
    if isinstance(raw, torch.Tensor):
        if raw.ndim == input_ndim + 1:
            raise OutputError(
                f"the model returned a {raw.ndim}-D tensor {tuple(raw.shape)}, one rank more than "
                f"the input: a deep supervision stack? pass output=0 for the first head"
            )
        return raw
    if isinstance(raw, Mapping):
        tensors = [key for key, value in raw.items() if isinstance(value, torch.Tensor)]
        if "out" in raw:
            return raw["out"]
        if len(tensors) == 1:
            return raw[tensors[0]]
        raise OutputError(
            f"the model returned a dict with keys {list(raw)}; pass output=KEY to choose the logits"
        )
    if isinstance(raw, tuple | list):
        if len(raw) == 1:
            return raw[0]
        raise OutputError(
            f"the model returned a {type(raw).__name__} of {len(raw)} items; pass output=INDEX "
            f"(or a callable) to choose the logits"
        )
    raise OutputError(
        f"the model returned {type(raw).__name__}, not a tensor; pass output= (a key, an index, "
        f"or a callable returning the logits)"
    )


_PROBABILITY_NODES = ("SoftmaxBackward", "SigmoidBackward")  # log-softmax is fine: logits


def warn_if_probabilities(logits: torch.Tensor) -> None:
    """Warn once when the selected output looks like probabilities rather than raw logits.

    Probabilities: the output's last operation is a softmax or sigmoid, or every value lies in
    [0, 1] and the channels sum to 1 everywhere. (Log-probabilities are logits up to a shift per
    pixel and pass.)
    """
    node = type(logits.grad_fn).__name__ if logits.grad_fn is not None else ""
    detached = logits.detach()
    summed = detached.shape[1] > 1 and bool(
        (detached.min() >= 0)
        & (detached.max() <= 1)
        & torch.allclose(detached.sum(1), torch.ones((), dtype=detached.dtype), atol=1e-3)
    )
    ends = node.startswith(_PROBABILITY_NODES)
    if ends or summed:
        what = f"ends in {node.removesuffix('0').removesuffix('Backward')}" if ends else "sums to 1"
        warnings.warn(
            f"the model's output {what}: it looks like probabilities, not raw logits. The "
            f"methods are defined on logits, and saturated probabilities have vanishing "
            f"gradients; remove the final activation, or pass output= a callable that returns "
            f"the pre-activation logits",
            SegCamWarning,
            stacklevel=user_stacklevel(),
        )
