"""The memory layout of every forward segcam runs: channels-last convolutions on the CPU.

On the CPU, PyTorch's plain-layout kernels are slowest, by far, on convolutions with few
channels at a high resolution (a network's last layers: 4 -> 4 channels at 96³, the input
gradient 92 ms plain, 13 ms channels-last), and the explanation's backward passes go through
exactly these gradients. :func:`convolution_layout` puts such convolutions on channels-last
inputs (N, *S, C in memory) for a block of code (forward pre-hooks, removed on exit,
exceptions included; the model's parameters, flags and hooks are left as they were). The
recorded graph keeps the channels-last tensors, so its backward passes run the fast kernels
too. The values are the same up to float32 summation order.

The choice (:data:`MemoryFormat`):

- ``"auto"`` (the default): for a float32 volume (N, C, D, H, W) on the CPU, the 3D
  (transposed) convolutions with at most :data:`FEW_CHANNELS` channels in or out get
  channels-last inputs; everything else keeps the plain layout (2D, float64, CUDA: see the
  benchmarks page). Wide convolutions gain less (1.5x) than the copies between layouts cost
  where a norm hands back a contiguous tensor. A model that fails on channels-last tensors
  (a ``.view`` that needs contiguous memory) is run again in the plain layout, and stays there.
- ``"channels-last"``: every convolution of the input's rank gets channels-last inputs, on
  any device; a model that fails on it raises :class:`~segcam.errors.ModelError`.
- ``"contiguous"``: the plain layout (bit-identical to the model's own plain forward).

A model whose code reads a tensor's memory by its strides (``torch.as_strided`` with
contiguous strides, a C++ or Triton kernel that assumes contiguous input without calling
``.contiguous()``, a custom autograd function whose backward ``.view``s its gradient) can give
wrong values or fail in its backward pass on channels-last tensors without its forward failing:
run such a model with ``"contiguous"``.

Group norms get their input contiguous: the channels-last CPU kernel is slower and rounds
coarser (a SegResNet's maps 2-15 times farther from float64). A convolution that PyTorch runs
in its reference CPU kernel (batch 1, a kernel of at most 3 per axis and ``N*C*D*H <= 20480``)
keeps its input as it is: that kernel makes its input contiguous anyway.

Drivers open :func:`convolution_layout` once for a run; the forwards inside it (the recorded
ones of :func:`segcam.recording.record_forward`, prediction passes, gradient-free methods) go
through :func:`forward_in_layout`, which is where a failing layout falls back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from segcam.errors import ModelError, OptionError

__all__ = [
    "FEW_CHANNELS",
    "MEMORY_FORMATS",
    "MemoryFormat",
    "check_memory_format",
    "chosen_layout",
    "convolution_layout",
    "forward_in_layout",
]

MemoryFormat = Literal["auto", "channels-last", "contiguous"]
"""How the convolutions' inputs are laid out in memory during segcam's forwards."""

MEMORY_FORMATS: tuple[str, ...] = get_args(MemoryFormat)
FEW_CHANNELS = 8  # "auto" lays out the convolutions with at most this many channels in or out

_T = TypeVar("_T")
_CONVOLUTIONS = {
    4: (nn.Conv2d, nn.ConvTranspose2d),
    5: (nn.Conv3d, nn.ConvTranspose3d),
}
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
# Models that failed on channels-last tensors under "auto": the plain layout from then on.
_NEEDS_CONTIGUOUS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def check_memory_format(value: object) -> MemoryFormat:
    """``value`` as a :data:`MemoryFormat`, or :class:`~segcam.errors.OptionError`."""
    if not isinstance(value, str) or value not in MEMORY_FORMATS:
        raise OptionError(
            f"memory_format must be one of {', '.join(map(repr, MEMORY_FORMATS))}; got {value!r}"
        )
    return cast(MemoryFormat, value)


def _convolutions(model: nn.Module, rank: int) -> list[nn.Module]:
    kinds = _CONVOLUTIONS.get(rank)
    return [m for m in model.modules() if isinstance(m, kinds)] if kinds else []


def _group_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


def chosen_layout(
    model: nn.Module, inputs: torch.Tensor, choice: MemoryFormat = "auto"
) -> Literal["channels-last", "contiguous"]:
    """The layout ``choice`` gives this model on these inputs (see the module's docstring)."""
    choice = check_memory_format(choice)
    convolutions = _convolutions(model, inputs.ndim)
    if choice == "contiguous" or not convolutions:
        return "contiguous"
    if choice == "channels-last":
        return "channels-last"
    fast = inputs.ndim == 5 and inputs.device.type == "cpu" and inputs.dtype == torch.float32
    if not fast or model in _NEEDS_CONTIGUOUS or not any(map(_few_channels, convolutions)):
        return "contiguous"
    return "channels-last"


def _reference_kernel(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether PyTorch runs this CPU convolution in its reference kernel, not oneDNN's."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    kernel = cast(tuple[int, ...], module.kernel_size)
    groups = cast(int, module.groups)
    large_kernel = kernel[-1] > 3 and kernel[-2] > 3
    size = int(x.shape[0]) * int(x.shape[1]) * int(x.shape[2]) * int(x.shape[3])
    return not (groups > 1 or large_kernel or x.shape[0] > 1 or size > 20480)


def _to_contiguous(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and not first.is_contiguous():
        return (first.contiguous(), *args[1:])
    return None


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.ndim not in _FORMATS:
        return None
    if not first.is_floating_point() or _reference_kernel(module, first):
        return None
    layout = _FORMATS[first.ndim]
    if first.is_contiguous(memory_format=layout):
        return None
    return (first.contiguous(memory_format=layout), *args[1:])


def _few_channels(module: nn.Module) -> bool:
    channels = (int(getattr(module, "in_channels", 0)), int(getattr(module, "out_channels", 0)))
    return min(channels) <= FEW_CHANNELS


@dataclass(eq=False)
class _Layout:
    """One block's layout for one model.

    Its hooks act only while it is on and the innermost block covering the module, in this
    thread (a context variable).
    """

    model: nn.Module
    asked: bool  # the user asked for channels-last (no silent fall back)
    on: bool = False
    covered: frozenset[int] = frozenset()  # ids of the model's convolutions and group norms
    handles: list[RemovableHandle] = field(default_factory=list)

    def off(self) -> None:
        self.on = False

    def remove(self) -> None:
        self.on = False
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def hook(self, convert: Callable[[nn.Module, tuple[Any, ...]], Any]) -> Any:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self.on or _innermost(module) is not self:
                return None
            result: tuple[Any, ...] | None = convert(module, args)
            return result

        return pre_hook


_ACTIVE: ContextVar[tuple[_Layout, ...]] = ContextVar("segcam_memory_format", default=())


def _active_for(model: nn.Module) -> _Layout | None:
    """The innermost block open for ``model`` in this thread."""
    return next((layout for layout in reversed(_ACTIVE.get()) if layout.model is model), None)


def _innermost(module: nn.Module) -> _Layout | None:
    """The innermost block in this thread whose model holds ``module``."""
    key = id(module)
    return next((layout for layout in reversed(_ACTIVE.get()) if key in layout.covered), None)


@contextmanager
def convolution_layout(
    model: nn.Module, inputs: torch.Tensor, choice: MemoryFormat | None = None
) -> Iterator[Literal["channels-last", "contiguous"]]:
    """Run the block's forwards of ``model`` in the layout ``choice`` gives; yield the layout.

    ``None``: the choice of an enclosing block for the same model (a driver's), else
    ``"auto"``. The innermost block decides, for the modules of its model and in its own thread
    only (a block for a submodule inside one for the whole model decides for the submodule).
    The hooks are removed on exit, exceptions included.
    """
    enclosing = _active_for(model)
    if choice is None and enclosing is not None:
        yield "channels-last" if enclosing.on else "contiguous"
        return
    layout = chosen_layout(model, inputs, choice or "auto")
    convolutions = _convolutions(model, inputs.ndim)
    norms = _group_norms(model)
    active = _Layout(
        model,
        asked=choice == "channels-last",
        covered=frozenset(id(m) for m in [*convolutions, *norms]),
    )
    if layout == "channels-last":
        chosen = [m for m in convolutions if active.asked or _few_channels(m)]
        active.handles = [
            m.register_forward_pre_hook(active.hook(_to_channels_last)) for m in chosen
        ]
        active.handles += [m.register_forward_pre_hook(active.hook(_to_contiguous)) for m in norms]
        active.on = True
    token = _ACTIVE.set((*_ACTIVE.get(), active))
    try:
        yield layout
    finally:
        _ACTIVE.reset(token)
        active.remove()


def forward_in_layout(
    model: nn.Module, call: Callable[[], _T], *, before_retry: Callable[[], None] | None = None
) -> _T:
    """``call()`` (a forward of ``model``) in the active layout; falls back to the plain one.

    Under ``"auto"``, a :class:`~segcam.errors.ModelError` on channels-last tensors turns the
    block's layout off, calls ``before_retry`` (if given: to reset what the failed forward left)
    and runs ``call`` again plainly; the model is remembered as needing the plain layout only
    when that run succeeds (a model that fails either way, on a bad input, raises its plain
    error, once). Asked for explicitly, the error is raised with the way out named.
    """
    layout = _active_for(model)
    if layout is None or not layout.on:
        return call()
    try:
        return call()
    except ModelError as error:
        if layout.asked:
            raise ModelError(
                f"{error} (with memory_format 'channels-last'; a model that needs contiguous "
                f"tensors runs with memory_format 'contiguous', --memory-format contiguous)"
            ) from error
    layout.off()  # outside the except block: the plain run's error comes without this one
    if before_retry is not None:
        before_retry()
    result = call()
    _NEEDS_CONTIGUOUS.add(model)
    return result
