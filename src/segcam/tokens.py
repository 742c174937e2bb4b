"""Layers whose output is not channels-first: transformer tokens and channels-last grids.

CAM methods work on activations (N, C, *S). A transformer layer of a hybrid segmenter returns
tokens instead:

- ``(N, L, C)`` sequences (MONAI UNETR's ``vit.blocks.i``): L = q + prod(grid) with q leading
  extra tokens (a class token: q = 1) and the patch tokens in row-major order of the patch grid
  (the order of ``Conv(patch).flatten(2).transpose(1, 2)``), grid = input size / patch size.
- ``(N, *grid, C)`` channels-last grids (MONAI SwinUNETR's ``SwinTransformerBlock``).

Both the activation and its gradient are viewed as ``(N, C, *grid)`` before the method runs; the
extra tokens are dropped (they have no place on the grid). With a plain layer name the layout is
inferred: a 3D output of a 2D/3D input is a token sequence, the patch size the one isotropic
integer p with L - q = prod(S / p) for q in {0, 1}; an output with the input's rank is
channels-first, unless its trailing spatial axes do not follow the input's proportions while the
channels-last reading does. :class:`TokenLayer` states the layout where inference cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from segcam.errors import LayerError

__all__ = ["Layout", "TokenLayer", "infer_layout", "to_channels_first"]


@dataclass(frozen=True)
class TokenLayer:
    """A layer whose output is tokens, with how to lay them on the spatial grid.

    Args:
        layer: a name from ``model.named_modules()`` or a module of the model.
        grid: the token grid (e.g. (14, 14) or (6, 6, 6)); ``None`` infers it from the input.
        prefix_tokens: extra tokens before the patch tokens (class/register tokens); ``None``
            infers 0 or 1.
        layout: ``"tokens"`` for (N, L, C), ``"channels_last"`` for (N, *grid, C),
            ``"channels_first"`` for (N, C, *grid), or ``"auto"``.
    """

    layer: str | nn.Module
    grid: tuple[int, ...] | None = None
    prefix_tokens: int | None = None
    layout: Literal["auto", "tokens", "channels_last", "channels_first"] = "auto"

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "tokens", "channels_last", "channels_first"):
            raise LayerError(
                f"TokenLayer layout must be 'auto', 'tokens', 'channels_last' or "
                f"'channels_first'; got {self.layout!r}"
            )


@dataclass(frozen=True)
class Layout:
    """How a recorded output maps to (N, C, *grid)."""

    kind: Literal["channels_first", "tokens", "channels_last"]
    grid: tuple[int, ...]
    prefix_tokens: int = 0


def _proportional(grid: tuple[int, ...], input_size: tuple[int, ...]) -> bool:
    """Whether ``grid`` is the input grid scaled by one factor (within rounding of odd sizes)."""
    if len(grid) != len(input_size) or any(g < 1 for g in grid):
        return False
    ratios = [s / g for s, g in zip(input_size, grid, strict=True)]
    return max(ratios) / min(ratios) < 1.25


def _token_grid(
    name: str, length: int, input_size: tuple[int, ...], prefix: int | None
) -> tuple[tuple[int, ...], int]:
    fits = []
    for q in (0, 1) if prefix is None else (prefix,):
        count = length - q
        if count < 1:
            continue
        patch = round((math.prod(input_size) / count) ** (1 / len(input_size)))
        if patch >= 1 and all(s % patch == 0 for s in input_size):
            grid = tuple(s // patch for s in input_size)
            if math.prod(grid) == count:
                fits.append((grid, q))
    if len(fits) != 1:
        found = "no" if not fits else "more than one"
        raise LayerError(
            f"layer {name!r} returns {length} tokens and {found} patch grid of the input "
            f"{input_size} fits them; pass segcam.TokenLayer({name!r}, grid=..., "
            f"prefix_tokens=...) to say how they lie"
        )
    return fits[0]


_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.Upsample,
    nn.PixelShuffle,
)
_LAST_AXIS = (nn.Linear, nn.LayerNorm)


def _producer(module: nn.Module) -> Literal["channels_first", "last_axis", "unknown"]:
    """What the module's output layout is known to be from its type (a Sequential: its last)."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first"
    kinds = list(module.modules())
    if any(isinstance(m, _LAST_AXIS) for m in kinds) and not any(
        isinstance(m, nn.modules.conv._ConvNd) for m in kinds
    ):
        return "last_axis"  # a transformer block: Linear / LayerNorm over the last axis
    return "unknown"


def _whole_downsampling(grid: tuple[int, ...], input_size: tuple[int, ...]) -> bool:
    """Whether ``grid`` is the input grid divided by a whole number per axis."""
    return len(grid) == len(input_size) and all(
        0 < g <= s and s % g == 0 for g, s in zip(grid, input_size, strict=True)
    )


def infer_layout(
    name: str,
    shape: tuple[int, ...],
    input_size: tuple[int, ...],
    spec: TokenLayer | None,
    module: nn.Module | None = None,
) -> Layout:
    """The layout of a layer output of ``shape`` for an input of spatial size ``input_size``.

    A (N, A, B[, C]) output is channels-first when the module that made it is a convolution,
    pooling, channel normalisation or up-sampling (or a Sequential ending in one). Otherwise it
    is read as channels-last (N, *S, C) when only that reading puts a grid proportional to the
    input's; for a module that is not a Linear/LayerNorm (transformer) block, that guess is
    refused when the channels-first reading is a whole-number down-sampling of the input too:
    say it with ``TokenLayer(name, layout=...)``.
    """
    dims = len(input_size)
    rank = len(shape)
    layout = spec.layout if spec is not None else "auto"
    if layout == "auto":
        layout = _guess_layout(name, shape, input_size, spec, module)
    if layout == "channels_first":
        if rank != dims + 2:
            raise LayerError(
                f"layer {name!r} returns shape {shape}, not a channels-first {dims}D grid "
                f"(N, C, *S)"
            )
        return Layout("channels_first", tuple(shape[2:]))
    if layout == "tokens":
        if rank != 3:
            raise LayerError(f"layer {name!r} returns shape {shape}, not tokens (N, L, C)")
        return _token_layout(name, shape, input_size, spec)
    if rank != dims + 2:
        raise LayerError(
            f"layer {name!r} returns shape {shape}, not a channels-last {dims}D grid (N, *S, C)"
        )
    return Layout("channels_last", tuple(shape[1:-1]))


def to_channels_first(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View an activation (or its gradient) as (N, C, *grid)."""
    if layout.kind == "channels_first":
        return tensor
    if layout.kind == "channels_last":
        return tensor.movedim(-1, 1)
    patches = tensor[:, layout.prefix_tokens :, :]
    return patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], *layout.grid)


def _guess_layout(
    name: str,
    shape: tuple[int, ...],
    input_size: tuple[int, ...],
    spec: TokenLayer | None,
    module: nn.Module | None,
) -> Literal["tokens", "channels_last", "channels_first"]:
    """``infer_layout``'s reading of an ``auto`` layout (see there)."""
    dims, rank = len(input_size), len(shape)
    if rank == 3 and dims in (2, 3):
        return "tokens"
    if rank == dims + 2:
        first, last = tuple(shape[2:]), tuple(shape[1:-1])
        producer = _producer(module) if module is not None else "unknown"
        if spec is not None and spec.grid is not None:
            if last == tuple(spec.grid):
                return "channels_last"
        elif producer != "channels_first" and (
            not _proportional(first, input_size) and _proportional(last, input_size)
        ):
            if producer != "last_axis" and _whole_downsampling(first, input_size):
                raise LayerError(
                    f"layer {name!r} returns shape {shape}: channels-first (N, C={shape[1]}, "
                    f"grid {first}) and channels-last (grid {last}, C={shape[-1]}) both fit "
                    f"the input {input_size}; say which with "
                    f"segcam.TokenLayer({name!r}, layout='channels_first') or "
                    f"layout='channels_last'"
                )
            return "channels_last"
        return "channels_first"
    raise LayerError(
        f"layer {name!r} returns a tensor of shape {shape}, which cannot be laid on "
        f"the {dims}D grid of the input: expected (N, C, *S), tokens (N, L, C), "
        f"or channels-last (N, *S, C) (see segcam.TokenLayer)"
    )


def _token_layout(
    name: str, shape: tuple[int, ...], input_size: tuple[int, ...], spec: TokenLayer | None
) -> Layout:
    """The grid and prefix of a token layer (N, L, C): given, or inferred from L."""
    if spec is not None and spec.grid is not None:
        grid = tuple(int(g) for g in spec.grid)
        prefix = shape[1] - math.prod(grid) if spec.prefix_tokens is None else spec.prefix_tokens
        if prefix < 0 or prefix + math.prod(grid) != shape[1]:
            raise LayerError(
                f"layer {name!r} returns {shape[1]} tokens; the grid {grid} with "
                f"{prefix} extra tokens does not account for them"
            )
        return Layout("tokens", grid, prefix)
    prefix_given = None if spec is None else spec.prefix_tokens
    grid, prefix = _token_grid(name, shape[1], input_size, prefix_given)
    return Layout("tokens", grid, prefix)
