"""The method registry: one plain dict, the single source of truth for every list of methods.

Three kinds of method, by what they need besides the layer's activation A (N, C, *S):

- ``"gradient"``: the gradient G = dy^c_M/dA of one target's score (same shape as A); the map
  function is a :class:`GradientMapFunction`, ``compute(A, G, **options) -> (N, *S)``, called once
  per target.
- ``"activation"``: nothing but A and the targets' pixel sets (gradient-free); a
  :class:`GradientFreeMapFunction`, ``compute(A, context, **options) -> (N, T, *S)`` for all T
  targets at once.
- ``"model"``: further forward passes of the model on modified inputs (gradient-free); the same
  signature, with ``context.score`` running them.

Every map is raw and signed, at the layer's resolution. Register one with::

    @register("my-cam", summary="...", reference="Author et al., Venue Year")
    def my_cam(activation: torch.Tensor, gradient: torch.Tensor, *, power: int = 1) -> torch.Tensor:
        ...

The options are the function's keyword parameters after the first two; their defaults are read
from the signature (declared once). Users pass them as ``explain(..., method_options={...})``;
unknown names, and values a method's ``validate`` refuses, raise :class:`~segcam.errors.OptionError`
before any forward pass. Rules that depend on the kind (gradient-free methods cannot explain
sliding windows) live here, once.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeAlias, overload

import torch

from segcam.errors import (
    MethodNotFoundError,
    MethodNotSupportedError,
    MethodRegistrationError,
    OptionError,
)

__all__ = [
    "REGISTRY",
    "GradientFreeMapFunction",
    "GradientMapFunction",
    "Method",
    "MethodContext",
    "MethodKind",
    "MethodOptions",
    "OptionValidator",
    "check_positive_int",
    "get_method",
    "list_methods",
    "register",
    "resolve_methods",
    "resolve_options",
]

MethodKind = Literal["gradient", "activation", "model"]
KINDS: tuple[MethodKind, ...] = ("gradient", "activation", "model")
P = ParamSpec("P")


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


class GradientMapFunction(Protocol):
    """A gradient method's map: ``(A, G, **options) -> (N, *S)`` for one target."""

    def __call__(
        self, activation: torch.Tensor, gradient: torch.Tensor, /, **options: Any
    ) -> torch.Tensor:
        """The raw map of one target from the activation A and its score's gradient G."""
        ...


class GradientFreeMapFunction(Protocol):
    """A gradient-free method's maps: ``(A, context, **options) -> (N, T, *S)``, all targets."""

    def __call__(
        self, activation: torch.Tensor, context: MethodContext, /, **options: Any
    ) -> torch.Tensor:
        """The raw maps of all targets from the activation A and the context."""
        ...


OptionValidator: TypeAlias = Callable[[Mapping[str, Any]], None]
"""Called with a method's resolved options; raises :class:`~segcam.errors.OptionError`."""


@dataclass(frozen=True)
class Method:
    """A registered method: its name, kind, map function, options and where it comes from.

    ``options`` are the defaults read from the map function's signature; ``validate`` (if any)
    checks option values before any forward pass.
    """

    name: str
    compute: Callable[..., torch.Tensor]
    summary: str
    reference: str
    kind: MethodKind = "gradient"
    options: Mapping[str, Any] = field(default_factory=dict)
    validate: OptionValidator | None = None

    @property
    def needs_gradient(self) -> bool:
        """Whether the method takes the gradient of the target score (one backward per target)."""
        return self.kind == "gradient"

    @property
    def supports_sliding_window(self) -> bool:
        """Whether the method can explain a blended sliding-window prediction.

        Only gradient methods can: a gradient-free method's channel weights have no meaning
        across windows (each window has its own activation).
        """
        return self.needs_gradient

    def require_sliding_window(self) -> None:
        """Raise :class:`~segcam.errors.MethodNotSupportedError` unless sliding windows work."""
        if not self.supports_sliding_window:
            raise MethodNotSupportedError(
                f"sliding windows take gradient methods only: {self.name!r} is gradient-free, "
                f"its maps are not defined across windows (gradient methods: "
                f"{', '.join(m.name for m in REGISTRY.values() if m.supports_sliding_window)})"
            )

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults updated by ``given``, checked: unknown names and bad values are refused."""
        if given is not None and not isinstance(given, Mapping):
            raise OptionError(
                f"options of {self.name!r} must be a mapping of name to value; got "
                f"{type(given).__name__}"
            )
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options), key=str)
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise OptionError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options: {accepted}"
            )
        resolved = {**self.options, **given}
        if self.validate is not None:
            self.validate(resolved)
        return resolved


REGISTRY: dict[str, Method] = {}

_Gradient: TypeAlias = Callable[Concatenate[torch.Tensor, torch.Tensor, P], torch.Tensor]
_GradientFree: TypeAlias = Callable[Concatenate[torch.Tensor, MethodContext, P], torch.Tensor]


def _signature_options(name: str, function: Callable[..., Any]) -> dict[str, Any]:
    """The keyword options of a map function (parameters after the first two) and defaults."""
    parameters = list(inspect.signature(function).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][
        :2
    ]
    if len(positional) < 2:
        raise MethodRegistrationError(
            f"method {name!r}: the map function takes (activation, gradient or context, "
            f"**options); {function.__name__} has {len(positional)} positional parameters"
        )
    options = {}
    for parameter in parameters:
        if parameter in positional:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise MethodRegistrationError(
                f"method {name!r}: declare each option as a keyword parameter with a default, "
                f"not *{parameter.name} / **{parameter.name}"
            )
        if parameter.default is parameter.empty:
            raise MethodRegistrationError(
                f"method {name!r}: option {parameter.name!r} needs a default value"
            )
        options[parameter.name] = parameter.default
    return options


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


@overload
def register(
    name: str,
    *,
    summary: str,
    reference: str,
    kind: Literal["gradient"] = ...,
    validate: OptionValidator | None = ...,
) -> Callable[[_Gradient[P]], _Gradient[P]]: ...


@overload
def register(
    name: str,
    *,
    summary: str,
    reference: str,
    kind: Literal["activation", "model"],
    validate: OptionValidator | None = ...,
) -> Callable[[_GradientFree[P]], _GradientFree[P]]: ...


def register(
    name: str,
    *,
    summary: str,
    reference: str,
    kind: MethodKind = "gradient",
    validate: OptionValidator | None = None,
) -> Callable[[Any], Any]:
    """Register a map function under ``name``; names are unique.

    Args:
        name: the method's name, as users pass it.
        summary: one line for ``segcam methods``.
        reference: the paper.
        kind: ``"gradient"`` (a :class:`GradientMapFunction`), ``"activation"`` or ``"model"``
            (a :class:`GradientFreeMapFunction`); see the module's docstring.
        validate: checks option values (raising :class:`~segcam.errors.OptionError`) before any
            forward pass.

    Raises:
        MethodRegistrationError: a taken name, a name that is no file name or command-line
            word, an unknown kind, or an option without a default.
    """
    if kind not in KINDS:
        raise MethodRegistrationError(
            f"kind must be 'gradient', 'activation' or 'model'; got {kind!r}"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MethodRegistrationError(
            f"method name {name!r}: use letters, digits and . _ + - (starting with a letter or "
            f"digit, at most 64), e.g. 'my-cam': names become file names and command-line words"
        )

    def decorator(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in REGISTRY:
            raise MethodRegistrationError(f"method {name!r} is already registered")
        options = _signature_options(name, function)
        REGISTRY[name] = Method(name, function, summary, reference, kind, options, validate)
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
    """The method's defaults updated by ``options``, checked (:meth:`Method.resolve_options`)."""
    return method.resolve_options(options)


def check_positive_int(
    method: str, options: Mapping[str, Any], key: str, *, allow_none: bool = False
) -> None:
    """Raise :class:`~segcam.errors.OptionError` unless ``options[key]`` is an int >= 1.

    A helper for validators; ``allow_none`` also accepts ``None``.
    """
    value = options[key]
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = " or None" if allow_none else ""
        raise OptionError(f"{method}: {key} must be a positive int{also}; got {value!r}")


def list_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(REGISTRY)


MethodOptions = Mapping[str, Mapping[str, Any] | None]
"""Options per method name: ``{"seg-xres-cam": {"pool_size": 4}}``."""


def resolve_methods(
    methods: str | Sequence[str], method_options: MethodOptions | None = None
) -> list[tuple[Method, dict[str, Any]]]:
    """The methods (each once, in order) with their checked options, before any forward pass.

    Raises:
        MethodNotFoundError: an unknown method.
        OptionError: options for a method not requested, unknown names or bad values.
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise OptionError("methods is empty: name at least one method (segcam.list_methods())")
    chosen = [get_method(name) for name in dict.fromkeys(names)]
    given = dict(method_options or {})
    stray = sorted(set(given) - {method.name for method in chosen}, key=str)
    if stray:
        raise OptionError(
            f"options given for {', '.join(map(repr, stray))}, which is not among the methods "
            f"({', '.join(method.name for method in chosen)})"
        )
    return [(method, method.resolve_options(given.get(method.name))) for method in chosen]
