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

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam.checks import (
    all_finite,
    check_inputs,
    check_model_inputs,
    run_model,
    training_dependent,
)
from segcam.errors import (
    ForwardReleasedError,
    LayerError,
    LayerNotOnPathError,
    NonFiniteError,
    OutputError,
    SegCamWarning,
    user_stacklevel,
)
from segcam.layers import LayerSpec, depends_on, layer_list, reachable_nodes, resolve_layers
from segcam.memory_format import MemoryFormat, convolution_layout
from segcam.outputs import OutputSpec, select_logits, warn_if_probabilities
from segcam.tokens import Layout, TokenLayer, infer_layout, to_channels_first

__all__ = ["LayerRecorder", "RecordedForward", "record_forward"]


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

    def reset(self) -> None:
        """Forget what a failed forward recorded (before it runs again); gradients off."""
        for slot in self.slots:
            slot.activation, slot.calls = None, 0
        torch.set_grad_enabled(False)

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
        reachable = reachable_nodes(logits)
        for slot, activation in zip(self.slots, result, strict=True):
            if not depends_on(activation, reachable):
                raise LayerNotOnPathError(
                    f"the model's output does not depend on layer {slot.name!r}: its gradient "
                    f"would be undefined; choose a layer on the path to the output"
                )
        return result


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
            with torch.inference_mode(False), torch.no_grad(), convolution_layout(model, batch):
                logits = select_logits(run_model(model, batch), output, batch.ndim)
            return torch.einsum("bk...,tk...->bt", logits, weights[n].to(logits.dtype))

        return score

    def release(self) -> None:
        """Drop the graph (the tensors that hold it), which frees it; idempotent."""
        self._graph.logits = None
        self._graph.activations = ()

    def __enter__(self) -> RecordedForward:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def record_forward(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: LayerSpec | Sequence[LayerSpec],
    output: OutputSpec = None,
    layout: MemoryFormat | None = None,
) -> RecordedForward:
    """Run the model once with the layers hooked; keep the graph from them to the logits.

    Checks the input and the logits, warns about training-mode BatchNorm/Dropout, and raises
    when a layer did not run or the output does not depend on it. Hooks are removed on exit.
    ``layout``: the convolutions' memory format (:mod:`segcam.memory_format`); ``None``, that
    of the enclosing driver's run, else ``"auto"``.
    """
    check_inputs(inputs)
    layers = resolve_layers(model, layer)
    training = training_dependent(model)
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
    with convolution_layout(model, inputs, layout), recorder.record():
        raw_output = run_model(
            model, inputs, [name for name, _ in layers], before_retry=recorder.reset
        )
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
