"""Layers: resolving the user's layer specs to modules, and describing a model's layers.

A layer is named by its ``model.named_modules()`` name, given as the module itself, or wrapped
in a :class:`~segcam.tokens.TokenLayer` for token layouts. :func:`resolve_layers` turns any of
these into ``(name, module)`` pairs (with close matches for a misspelt name);
:func:`describe_layers` runs one forward pass and tells, for every module, its output shape and
whether the model's output depends on it (the on-path check the recorder also makes).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segcam.checks import run_model
from segcam.errors import LayerError, LayerNotFoundError
from segcam.tokens import TokenLayer

__all__ = [
    "LIST_LAYERS_HINT",
    "LayerInfo",
    "LayerSpec",
    "depends_on",
    "describe_layers",
    "layer_list",
    "reachable_nodes",
    "resolve_layers",
]

LIST_LAYERS_HINT = "(list them with [n for n, _ in model.named_modules()])"
"""How a misspelt layer's error says to list the layers (the command line says its own way)."""

LayerSpec = str | nn.Module | TokenLayer


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
        f"layer {spec!r} does not exist in {type(model).__name__}{hint} {LIST_LAYERS_HINT}"
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
        if name == "":
            raise LayerNotFoundError(
                f"layer '' is the whole model, whose output is the logits themselves; name one of "
                f"its layers {LIST_LAYERS_HINT}"
            )
        module = names[name]
        if id(module) in seen:
            raise LayerError(f"layer {name!r} is listed twice (or under two names)")
        seen.add(id(module))
        resolved.append((name, module))
    return resolved


def reachable_nodes(output: torch.Tensor) -> dict[int, Any]:
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


def depends_on(activation: torch.Tensor, reachable: dict[int, Any]) -> bool:
    """Whether ``activation`` is in the history ``reachable`` (from :func:`reachable_nodes`)."""
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
    reachable = reachable_nodes(final) if final is not None else {}
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
        on_path = tensor is not None and depends_on(tensor, reachable)
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
