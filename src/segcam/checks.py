"""Checks: inputs against the model before any forward pass, finite values, the model's errors.

Every driver checks its input with :func:`check_inputs` and :func:`check_model_inputs` before
the model runs, runs the model through :func:`run_model` (a model's own error becomes one
:class:`~segcam.errors.ModelError` naming the input and what the model takes), and checks what
it computed with :func:`all_finite`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from segcam.errors import InputError, LayerError, ModelError, NonFiniteError, SegCamError
from segcam.memory_format import forward_in_layout

__all__ = [
    "all_finite",
    "check_finite_maps",
    "check_inputs",
    "check_model_inputs",
    "run_model",
    "training_dependent",
]


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf."""
    # A NaN or Inf makes the sum non-finite, so one reduction without a mask allocation settles
    # the common case; only an overflowing sum of finite values needs the element-wise check.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_inputs(inputs: Any) -> None:
    """Raise :class:`InputError` unless ``inputs`` is a finite float (N, C, *S) tensor, S 2D/3D."""
    if not isinstance(inputs, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim not in (4, 5):
        raise InputError(
            f"inputs must have shape (N, C, H, W) or (N, C, D, H, W); got {inputs.ndim}-D "
            f"{tuple(inputs.shape)} (add a batch axis with x[None] or a channel axis with "
            f"x[:, None])"
        )
    if not inputs.is_floating_point():
        raise InputError(f"inputs must be floating point; got {inputs.dtype}")
    if min(inputs.shape) == 0:
        raise InputError(f"inputs {tuple(inputs.shape)} have an empty axis")
    if inputs.device.type == "meta":
        raise InputError("inputs are meta tensors, which hold no data; pass real values")
    if not all_finite(inputs):
        raise NonFiniteError("inputs hold NaN or Inf values; clean or mask them before explaining")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The model's first convolution or linear layer, in registration order (None: none)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            return module
    return None


def _expectation(model: nn.Module) -> str:
    """What the first layer expects, as a hint for a failed forward (empty when unknown)."""
    first = _first_layer(model)
    if isinstance(first, nn.modules.conv._ConvNd):
        dims = len(first.kernel_size)
        return (
            f"; its first convolution ({type(first).__name__}) takes {first.in_channels} "
            f"channel(s) on a {dims}D grid, i.e. inputs (N, {first.in_channels}, "
            f"{', '.join('S' + str(i) for i in range(1, dims + 1))})"
        )
    return ""


def check_model_inputs(model: nn.Module, inputs: torch.Tensor) -> None:
    """Refuse, before any forward pass, inputs the model cannot take.

    Checked: a TorchScript model (its modules cannot be hooked); the input's device and floating
    dtype against the model's parameters; rank and channels against the first convolution when
    it is the model's first layer with parameters (the stem, in the networks people train).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise LayerError(
            "the model is a TorchScript module: its submodules cannot be hooked for CAMs; "
            "explain the Python model (load its state_dict into the original class)"
        )
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return
    if parameter.device != inputs.device:
        raise InputError(
            f"the input is on {inputs.device} but the model's parameters are on "
            f"{parameter.device}; move one of them (x.to(device) or model.to(device))"
        )
    if parameter.dtype != inputs.dtype:
        raise InputError(
            f"the input is {inputs.dtype} but the model's parameters are {parameter.dtype}; "
            f"convert the input (x.to({parameter.dtype})) or the model"
        )
    first = _first_layer(model)
    owner = next((m for m in model.modules() if any(True for _ in m.parameters(False))), None)
    if isinstance(first, nn.modules.conv._ConvNd) and first is owner:
        dims = len(first.kernel_size)
        if inputs.ndim != dims + 2 or inputs.shape[1] != first.in_channels:
            raise InputError(
                f"the input {tuple(inputs.shape)} does not fit the model{_expectation(model)}"
            )


def run_model(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str] = (),
    *,
    before_retry: Callable[[], None] | None = None,
) -> Any:
    """``model(inputs)``, with an error from the model wrapped in :class:`ModelError`.

    The message names the input, the hooked ``layers`` (if any) and what the model's first
    layer takes; segcam's own errors (raised by its hooks) pass through unchanged. The forward
    runs in the active memory layout (:func:`segcam.memory_format.forward_in_layout`: a model
    that fails on channels-last tensors runs again in the plain layout, after
    ``before_retry``).
    """
    return forward_in_layout(
        model, lambda: _run_model(model, inputs, layers), before_retry=before_retry
    )


def _run_model(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str]) -> Any:
    kept = _scratch_statistics(model)
    try:
        return model(inputs)
    except SegCamError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        hooked = f" with layer(s) {', '.join(map(repr, layers))} hooked" if layers else ""
        raise ModelError(
            f"the model failed on the input {tuple(inputs.shape)} ({inputs.dtype}, "
            f"{inputs.device}){hooked}: {type(error).__name__}: {first_line}"
            f"{_expectation(model)}"
        ) from error
    finally:
        for module, name, original in kept:
            module._buffers[name] = original  # the user's own tensor, never written to


def _scratch_statistics(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Give the forward copies of the running statistics training mode would update.

    A BatchNorm (or an instance norm tracking its statistics) in training mode updates its
    running mean, variance and batch count on every forward. The forward gets copies to update
    (and its graph keeps them for the backward pass); the module's own tensors are put back
    untouched afterwards, so an explanation leaves the user's model exactly as it was. The
    forward itself still normalises with the batch's statistics, as training mode means.
    """
    kept: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        if module.training and isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                original = module._buffers.get(name)
                if isinstance(original, torch.Tensor):
                    kept.append((module, name, original))
                    module._buffers[name] = original.clone()
    return kept


_TRAINING_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def training_dependent(model: nn.Module) -> str:
    """Names (at most three) of modules in training mode whose output depends on it."""
    names = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if module.training and isinstance(module, _TRAINING_DEPENDENT)
    ]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_finite_maps(
    maps: torch.Tensor,
    method: str,
    layer: str,
    targets: Sequence[object],
    inputs: torch.Tensor,
) -> None:
    """Raise :class:`~segcam.errors.NonFiniteError` naming the layer and target of NaN/Inf maps.

    ``maps`` are (N, T, *S); ``inputs`` give the scale named in the message.
    """
    if all_finite(maps):
        return
    bad = (~torch.isfinite(maps)).flatten(2).any(dim=2)  # (N, T)
    samples, which = bad.nonzero()[0].tolist()
    scale = float(inputs.detach().abs().max())
    raise NonFiniteError(
        f"{method} maps of layer {layer!r} hold NaN or Inf for target {which} "
        f"{targets[which]!r} (sample {samples}): the activations or their gradients overflow "
        f"{maps.dtype} (the input's largest magnitude is {scale:.3g}); scale the input as the "
        f"model was trained (e.g. --window, --zscore) or explain in float64"
    )
