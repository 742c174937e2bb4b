"""The method registry: one plain dict, the single source of truth for every list of methods.

A gradient method maps a layer's activation A (N, C, *S) and the gradient dy^c_M/dA of the target
score (same shape) to a raw, signed map (N, *S) at the layer's resolution. Register one with::

    @register("my-cam", summary="...", reference="Author et al., Venue Year")
    def my_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from segcam.errors import MethodNotFoundError

__all__ = ["REGISTRY", "Method", "get_method", "list_methods", "register"]

MapFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, the map function, and where it comes from."""

    name: str
    compute: MapFunction
    summary: str
    reference: str


REGISTRY: dict[str, Method] = {}


def register(name: str, *, summary: str, reference: str) -> Callable[[MapFunction], MapFunction]:
    """Register ``function`` under ``name``; names are unique."""

    def decorator(function: MapFunction) -> MapFunction:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        REGISTRY[name] = Method(name, function, summary, reference)
        return function

    return decorator


def get_method(name: str) -> Method:
    """The method registered under ``name``; :class:`MethodNotFoundError` lists the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodNotFoundError(
            f"unknown method {name!r}; registered methods: {', '.join(REGISTRY)}"
        ) from None


def list_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(REGISTRY)


# Importing the method modules fills the registry.
from segcam.methods import gradient as gradient  # noqa: E402
