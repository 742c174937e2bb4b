"""The method registry: one plain dict, the single source of truth for every list of methods.

Three kinds of method, by what they need besides the layer's activation A (N, C, *S):

- ``"gradient"``: the gradient G = dy^c_M/dA of one target's score (same shape as A); the map
  function is ``compute(A, G, **options) -> (N, *S)``, called once per target.
- ``"activation"``: nothing but A and the targets' pixel sets (gradient-free);
  ``compute(A, context, **options) -> (N, T, *S)`` for all T targets at once.
- ``"model"``: further forward passes of the model on modified inputs (gradient-free);
  ``compute(A, context, **options) -> (N, T, *S)``, with ``context.score`` running them.

Every map is raw and signed, at the layer's resolution. Register one with::

    @register("my-cam", summary="...", reference="Author et al., Venue Year")
    def my_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor: ...

Options are keyword arguments with defaults, declared at registration (``options={...}``) and
passed by the user as ``explain(..., method_options={...})``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from segcam.errors import MethodNotFoundError

__all__ = [
    "REGISTRY",
    "Method",
    "MethodContext",
    "get_method",
    "list_methods",
    "register",
    "resolve_options",
]

MethodKind = Literal["gradient", "activation", "model"]
MapFunction = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MethodContext:
    """What a gradient-free method may use besides the activation, for all T targets at once.

    Attributes:
        pixel_sets: the targets' pixel sets M, bool (N, T, *S_in) on the input grid.
        nonempty: (N, T) bool, whether each pixel set holds a pixel (an empty one gets a zero map).
        inputs: the model's input x (N, C_in, *S_in).
        score: ``score(n, batch) -> (B, T)``: the target scores y^c_M of sample ``n``'s T targets
            (its pixel sets fixed) for a batch of modified inputs (B, C_in, *S_in), one forward
            pass without gradients. ``None`` where the model is not at hand.
    """

    pixel_sets: torch.Tensor
    nonempty: torch.Tensor
    inputs: torch.Tensor
    score: Callable[[int, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Method:
    """A registered method: its name, kind, map function, options and where it comes from."""

    name: str
    compute: MapFunction
    summary: str
    reference: str
    kind: MethodKind = "gradient"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_gradient(self) -> bool:
        """Whether the method takes the gradient of the target score (one backward per target)."""
        return self.kind == "gradient"


REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    *,
    summary: str,
    reference: str,
    kind: MethodKind = "gradient",
    options: Mapping[str, Any] | None = None,
) -> Callable[[MapFunction], MapFunction]:
    """Register ``function`` under ``name``; names are unique.

    Args:
        name: the method's name, as users pass it.
        summary: one line for ``segcam methods``.
        reference: the paper.
        kind: ``"gradient"``, ``"activation"`` or ``"model"`` (see the module's docstring).
        options: the keyword options the function accepts, with their defaults.
    """
    if kind not in ("gradient", "activation", "model"):
        raise ValueError(f"kind must be 'gradient', 'activation' or 'model'; got {kind!r}")

    def decorator(function: MapFunction) -> MapFunction:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        REGISTRY[name] = Method(name, function, summary, reference, kind, dict(options or {}))
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


def resolve_options(method: Method, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's defaults updated by ``options``; an unknown option is a ``ValueError``."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        accepted = ", ".join(method.options) or "none"
        raise ValueError(
            f"method {method.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {accepted}"
        )
    return {**method.options, **given}


def list_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(REGISTRY)


# Importing the method modules fills the registry.
from segcam.methods import gradient as gradient  # noqa: E402
from segcam.methods import gradient_free as gradient_free  # noqa: E402
