"""Hook a model's layers for one forward pass and take gradients to them; leave the model as it was.

Only the hooked activations enter the backward pass: gradients are taken with
``torch.autograd.grad(outputs, activations, grad_outputs)``, so no parameter gradient is computed
or stored and ``.grad`` is never touched. The forward runs under ``torch.no_grad()`` until the
first hooked layer has run; its hook switches gradient recording on for the rest of the forward.
Nothing upstream of the hooked layers is recorded, since no gradient is ever needed there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam.errors import LayerError, LayerNotFoundError, LayerNotOnPathError
from segcam.tokens import TokenLayer

__all__ = ["LayerInfo", "LayerRecorder", "describe_layers", "layer_list", "resolve_layers"]

LayerSpec = str | nn.Module | TokenLayer


def layer_list(layer: LayerSpec | Sequence[LayerSpec]) -> list[LayerSpec]:
    """One layer spec or a sequence of them, as a list."""
    return [layer] if isinstance(layer, str | nn.Module | TokenLayer) else list(layer)


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


def describe_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Every module's output shape in one forward of ``example``, and whether the output uses it.

    The example input requires grad, so every tensor computed from it has a history; a module's
    output is on the path when the model's output's history contains it. Hooks are removed on exit.
    """
    outputs: dict[str, list[Any]] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs.setdefault(name, []).append(output)

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(name)))
        with torch.inference_mode(False), torch.enable_grad():
            result = model(example.detach().clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    final = result if isinstance(result, torch.Tensor) else None
    if final is None and isinstance(result, dict | tuple | list):
        values = list(result.values()) if isinstance(result, dict) else list(result)
        final = next((v for v in values if isinstance(v, torch.Tensor)), None)
    reachable = _reachable_nodes(final) if final is not None else {}
    table = []
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
            )
        )
    return table
