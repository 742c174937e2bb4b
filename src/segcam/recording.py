"""Recording: hook a model's layers for one forward pass and take gradients to them.

This module is the single gradient path of segcam: :func:`record_forward` runs the model once
with the layers hooked and returns a :class:`RecordedForward`, whose
:meth:`~RecordedForward.layer_gradients` takes one ``torch.autograd.grad`` per score (given as the
score's gradient with respect to the logits) and yields the gradients at every hooked layer in
channels-first layout (N, C, *grid). ``explain``, ``Explainer``, sliding windows and the
applications all go through it.

Only the hooked activations enter the backward pass: gradients are taken with
``torch.autograd.grad(outputs, activations, grad_outputs)``, so no parameter gradient is computed
or stored and ``.grad`` is never touched. The forward runs under ``torch.no_grad()`` until the
first hooked layer has run; its hook switches gradient recording on for the rest of the forward.
Nothing upstream of the hooked layers is recorded, since no gradient is ever needed there. The
model is left as it was: hooks are removed on exit, exceptions included; training flags and
``requires_grad`` are never changed.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from segcam.errors import (
    ForwardReleasedError,
    InputError,
    LayerError,
    LayerNotFoundError,
    LayerNotOnPathError,
    ModelError,
    NonFiniteError,
    OutputError,
    SegCamError,
    SegCamWarning,
    user_stacklevel,
)
from segcam.tokens import Layout, TokenLayer, infer_layout, to_channels_first

__all__ = [
    "FromProbabilities",
    "LayerInfo",
    "LayerRecorder",
    "LayerSpec",
    "OutputSpec",
    "RecordedForward",
    "all_finite",
    "check_inputs",
    "check_model_inputs",
    "describe_layers",
    "layer_list",
    "logits_from_probabilities",
    "record_forward",
    "resolve_layers",
    "run_model",
    "select_logits",
    "warn_if_probabilities",
]

LayerSpec = str | nn.Module | TokenLayer


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


def layer_list(layer: LayerSpec | Sequence[LayerSpec]) -> list[LayerSpec]:
    """One layer spec or a sequence of them, as a list."""
    if isinstance(layer, str | nn.Module | TokenLayer):
        return [layer]
    if not isinstance(layer, Sequence):
        raise LayerNotFoundError(
            f"layer must be a module name (str), a module, a TokenLayer, or a list of them; got "
            f"{type(layer).__name__}"
        )
    return list(layer)


def _resolve_one(model: nn.Module, spec: LayerSpec, names: dict[str, nn.Module]) -> str:
    if isinstance(spec, TokenLayer):
        spec = spec.layer
    if isinstance(spec, nn.Module):
        for name, module in names.items():
            if module is spec:
                return name
        raise LayerNotFoundError(
            f"the module {type(spec).__name__} passed as layer is not part of the model "
            f"{type(model).__name__}; pass one of its submodules or a name from "
            f"model.named_modules()"
        )
    if not isinstance(spec, str):
        raise LayerNotFoundError(
            f"layer must be a module name (str), a module, or a list of them; got "
            f"{type(spec).__name__}"
        )
    if spec in names:
        return spec
    close = difflib.get_close_matches(spec, [n for n in names if n], n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise LayerNotFoundError(
        f"layer {spec!r} does not exist in {type(model).__name__}{hint} "
        f"(list them with [n for n, _ in model.named_modules()])"
    )


def resolve_layers(
    model: nn.Module, layer: LayerSpec | Sequence[LayerSpec]
) -> list[tuple[str, nn.Module]]:
    """Turn a name, module, or list of them into (name, module) pairs, in the given order."""
    specs = layer_list(layer)
    if not specs:
        raise LayerNotFoundError("layer is empty: name at least one layer to explain")
    names = dict(model.named_modules(remove_duplicate=False))
    resolved: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for spec in specs:
        name = _resolve_one(model, spec, names)
        module = names[name]
        if id(module) in seen:
            raise LayerError(f"layer {name!r} is listed twice (or under two names)")
        seen.add(id(module))
        resolved.append((name, module))
    return resolved


@dataclass
class _Slot:
    name: str
    activation: torch.Tensor | None = None
    calls: int = 0


@dataclass
class LayerRecorder:
    """Records the outputs of the given layers during one forward pass.

    Use :meth:`record` as a context manager around the forward call; hooks are removed on exit,
    exceptions included.
    """

    layers: list[tuple[str, nn.Module]]
    slots: list[_Slot] = field(default_factory=list)

    def _hook(self, slot: _Slot) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            slot.calls += 1
            if slot.calls > 1:
                raise LayerError(
                    f"layer {slot.name!r} ({type(module).__name__}) runs more than once in one "
                    f"forward pass (a shared module): its activation is ambiguous; hook a module "
                    f"that runs once"
                )
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {slot.name!r} ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not a tensor; choose a submodule whose output is a "
                    f"tensor"
                )
            if not output.is_floating_point():
                raise LayerError(f"layer {slot.name!r} returns a {output.dtype} tensor")
            # Gradient recording starts here; everything upstream ran under no_grad.
            torch.set_grad_enabled(True)
            activation = output if output.requires_grad else output.detach().requires_grad_(True)
            slot.activation = activation
            # A clone shields the recorded activation from in-place ops downstream
            # (e.g. ReLU(inplace=True)) and is an identity for the gradient.
            return activation.clone()

        return hook

    @contextmanager
    def record(self) -> Iterator[list[_Slot]]:
        """Hook every layer; yield the slots that will hold their activations."""
        self.slots = [_Slot(name) for name, _ in self.layers]
        handles = []
        try:
            for slot, (_, module) in zip(self.slots, self.layers, strict=True):
                handles.append(module.register_forward_hook(self._hook(slot)))
            with torch.inference_mode(False), torch.no_grad():
                yield self.slots
        finally:
            for handle in handles:
                handle.remove()

    def activations(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The recorded activations, checked to have run and to lie on the path to ``logits``."""
        result = []
        for slot in self.slots:
            if slot.activation is None:
                raise LayerNotOnPathError(
                    f"layer {slot.name!r} never ran during the forward pass; choose a layer the "
                    f"model calls"
                )
            result.append(slot.activation)
        reachable = _reachable_nodes(logits)
        for slot, activation in zip(self.slots, result, strict=True):
            if not _depends_on(activation, reachable):
                raise LayerNotOnPathError(
                    f"the model's output does not depend on layer {slot.name!r}: its gradient "
                    f"would be undefined; choose a layer on the path to the output"
                )
        return result


def _reachable_nodes(output: torch.Tensor) -> dict[int, Any]:
    """The autograd nodes reachable backwards from ``output`` (its history), by id."""
    seen: dict[int, Any] = {}
    stack = [] if output.grad_fn is None else [output.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return seen


def _depends_on(activation: torch.Tensor, reachable: dict[int, Any]) -> bool:
    if activation.grad_fn is not None:
        return id(activation.grad_fn) in reachable
    # A leaf enters the graph through its gradient-accumulation node, which holds it as .variable.
    return any(getattr(node, "variable", None) is activation for node in reachable.values())


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model as seen in one forward pass."""

    name: str
    type_name: str
    shape: tuple[int, ...] | None  # None when the output is not a tensor
    calls: int
    on_path: bool
    order: int = -1  # when the module first returned in the forward pass (-1: never ran)
    same_as: str = ""  # the outermost module returning the very same tensor (a wrapper's child)


def _wrapper(outermost: dict[int, str], tensor: torch.Tensor | None, name: str) -> str:
    """The outermost module that returned ``tensor`` itself, if another than ``name``."""
    wrapper = outermost.get(id(tensor), name) if tensor is not None else name
    return "" if wrapper == name else wrapper


def describe_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Every module's output shape in one forward of ``example``, and whether the output uses it.

    The example input requires grad, so every tensor computed from it has a history; a module's
    output is on the path when the model's output's history contains it. Hooks are removed on exit.
    """
    outputs: dict[str, list[Any]] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs.setdefault(name, []).append(output)  # insertion order: execution order

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(name)))
        with torch.inference_mode(False), torch.enable_grad():
            result = run_model(model, example.detach().clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    final = result if isinstance(result, torch.Tensor) else None
    if final is None and isinstance(result, dict | tuple | list):
        values = list(result.values()) if isinstance(result, dict) else list(result)
        final = next((v for v in values if isinstance(v, torch.Tensor)), None)
    reachable = _reachable_nodes(final) if final is not None else {}
    table = []
    order = {name: position for position, name in enumerate(outputs)}
    outermost: dict[int, str] = {}  # tensor id -> the last module (outermost) that returned it
    for name, seen in outputs.items():
        if len(seen) == 1 and isinstance(seen[0], torch.Tensor):
            outermost[id(seen[0])] = name
    for name, module in model.named_modules():
        seen = outputs.get(name, [])
        first = seen[0] if seen else None
        tensor = first if isinstance(first, torch.Tensor) else None
        on_path = tensor is not None and _depends_on(tensor, reachable)
        table.append(
            LayerInfo(
                name=name,
                type_name=type(module).__name__,
                shape=tuple(tensor.shape) if tensor is not None else None,
                calls=len(seen),
                on_path=on_path,
                order=order.get(name, -1),
                same_as=_wrapper(outermost, tensor, name) if len(seen) == 1 else "",
            )
        )
    return table


# ---------------------------------------------------------------- inputs and outputs


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


def run_model(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str] = ()) -> Any:
    """``model(inputs)``, with an error from the model wrapped in :class:`ModelError`.

    The message names the input, the hooked ``layers`` (if any) and what the model's first
    layer takes; segcam's own errors (raised by its hooks) pass through unchanged.
    """
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


# ---------------------------------------------------------------- the recorded forward pass


@dataclass
class _Graph:
    """The one mutable part of a recorded forward: the tensors that hold its graph alive."""

    logits: torch.Tensor | None
    activations: tuple[torch.Tensor, ...]
    layouts: tuple[Layout, ...]


@dataclass(frozen=True, eq=False)
class RecordedForward:
    """One forward pass with its graph from the hooked layers to the logits kept alive.

    Made by :func:`record_forward`. Everything but the graph is immutable and stays readable
    after :meth:`release`: the detached ``logits`` (N, K, *S) and the detached ``activations``
    in channels-first layout (N, C, *grid), one per layer. Use it as a context manager; leaving
    the ``with`` block releases the graph (exceptions included)::

        with record_forward(model, x, ["enc", "dec"]) as recorded:
            for gradients in recorded.layer_gradients(score_gradients):
                ...  # gradients[i]: d score / d layer i, (N, C, *grid)

    Attributes:
        layer_names: the hooked layers, in the order given.
        input_size: the input's spatial size S_in.
        logits: the detached logits.
        activations: the detached layer activations, channels-first.
        layer_shapes: layer name -> (N, C, *grid).
        model, inputs, output: what was run (gradient-free methods run the model again).
    """

    layer_names: tuple[str, ...]
    input_size: tuple[int, ...]
    logits: torch.Tensor
    activations: tuple[torch.Tensor, ...]
    layer_shapes: Mapping[str, tuple[int, ...]]
    model: nn.Module = field(repr=False)
    inputs: torch.Tensor = field(repr=False)
    output: OutputSpec = field(default=None, repr=False)
    _graph: _Graph = field(default_factory=lambda: _Graph(None, (), ()), repr=False)

    @property
    def released(self) -> bool:
        """Whether the graph was released (no more gradients can be taken)."""
        return self._graph.logits is None

    def layer_gradients(
        self, score_gradients: Iterable[torch.Tensor], *, keep_graph: bool = False
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """For each score, its gradient at every hooked layer, channels-first (N, C, *grid).

        Each item of ``score_gradients`` is d score / d logits (the logits' shape); each takes
        one ``torch.autograd.grad`` from the logits to the hooked activations only. The graph is
        freed after the last one unless ``keep_graph``. Items are read one ahead (to know which
        is the last), so at most two are alive at a time.
        """
        graph = self._graph
        if graph.logits is None:
            raise ForwardReleasedError("this forward pass was released; run a new forward first")
        iterator = iter(score_gradients)
        upcoming = next(iterator, None)
        while upcoming is not None:
            current, upcoming = upcoming, next(iterator, None)
            last = upcoming is None
            if graph.logits is None:
                raise ForwardReleasedError("the forward pass was released while iterating")
            gradients = torch.autograd.grad(
                graph.logits,
                graph.activations,
                grad_outputs=current,
                retain_graph=keep_graph or not last,
            )
            yield tuple(
                to_channels_first(gradient, layout)
                for gradient, layout in zip(gradients, graph.layouts, strict=True)
            )
        if not keep_graph:
            self.release()

    def scores(self, weights: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``score(n, batch) -> (B, T)``: sample n's T target scores for modified inputs.

        ``weights`` (N, T, K, *S) are the targets' score gradients with respect to the logits,
        so that y^c_M = <weights[n, t], logits>. One forward without gradients per call.
        """
        model, output = self.model, self.output

        def score(n: int, batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(False), torch.no_grad():
                logits = select_logits(run_model(model, batch), output, batch.ndim)
            return torch.einsum("bk...,tk...->bt", logits, weights[n].to(logits.dtype))

        return score

    def release(self) -> None:
        """Drop the graph (the tensors that hold it), which frees it; idempotent."""
        self._graph.logits = None
        self._graph.activations = ()

    def __enter__(self) -> RecordedForward:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def record_forward(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: LayerSpec | Sequence[LayerSpec],
    output: OutputSpec = None,
) -> RecordedForward:
    """Run the model once with the layers hooked; keep the graph from them to the logits.

    Checks the input and the logits, warns about training-mode BatchNorm/Dropout, and raises
    when a layer did not run or the output does not depend on it. Hooks are removed on exit.
    """
    check_inputs(inputs)
    layers = resolve_layers(model, layer)
    training = _training_dependent(model)
    if training:
        warnings.warn(
            f"modules that behave differently in training are in training mode ({training}): "
            f"BatchNorm mixes the samples of a batch, Dropout makes the maps random; call "
            f"model.eval() first",
            SegCamWarning,
            stacklevel=user_stacklevel(),
        )
    check_model_inputs(model, inputs)
    recorder = LayerRecorder(layers)
    with recorder.record():
        raw_output = run_model(model, inputs, [name for name, _ in layers])
    logits = select_logits(raw_output, output, inputs.ndim)
    del raw_output
    warn_if_probabilities(logits)
    if logits.shape[0] != inputs.shape[0]:
        raise OutputError(
            f"the logits' batch size {logits.shape[0]} differs from the input's {inputs.shape[0]}"
        )
    detached = logits.detach()
    if not all_finite(detached):
        raise NonFiniteError("the model's logits hold NaN or Inf values for this input")
    activations = recorder.activations(logits)
    input_size = tuple(int(s) for s in inputs.shape[2:])
    specs = [spec if isinstance(spec, TokenLayer) else None for spec in layer_list(layer)]
    layouts = tuple(
        infer_layout(name, tuple(activation.shape), input_size, spec, module)
        for (name, module), activation, spec in zip(layers, activations, specs, strict=True)
    )
    return RecordedForward(
        layer_names=tuple(name for name, _ in layers),
        input_size=input_size,
        logits=detached,
        activations=tuple(
            to_channels_first(activation.detach(), layout)
            for activation, layout in zip(activations, layouts, strict=True)
        ),
        layer_shapes={
            name: (int(a.shape[0]), _channels(a, layout), *layout.grid)
            for (name, _), a, layout in zip(layers, activations, layouts, strict=True)
        },
        model=model,
        inputs=inputs,
        output=output,
        _graph=_Graph(logits, tuple(activations), layouts),
    )


def _channels(activation: torch.Tensor, layout: Layout) -> int:
    return int(activation.shape[1] if layout.kind == "channels_first" else activation.shape[-1])


_TRAINING_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _training_dependent(model: nn.Module) -> str:
    """Names (at most three) of modules in training mode whose output depends on it."""
    names = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if module.training and isinstance(module, _TRAINING_DEPENDENT)
    ]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
