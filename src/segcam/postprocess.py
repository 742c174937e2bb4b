"""Post-processing of raw maps: pure functions on (N, T, *S) tensors, 2D and 3D alike.

The raw maps are signed and at the layer's resolution; each step here is optional and separate.
``explain`` applies them in the order relu -> upsample -> normalise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from segcam.errors import InputError, OptionError

__all__ = [
    "NORMALIZATIONS",
    "PostProcessing",
    "check_postprocess",
    "normalize",
    "postprocess",
    "relu",
    "upsample",
]

Normalization = Literal["max", "minmax"]
NORMALIZATIONS: tuple[str, ...] = ("max", "minmax")


def relu(maps: torch.Tensor) -> torch.Tensor:
    """Keep the positive evidence: max(L, 0)."""
    return maps.clamp_min(0)


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (N, T, *S) maps to ``size`` (bilinear in 2D, trilinear in 3D; half-pixel centres).

    ``align_corners=False`` matches OpenCV's and scipy-style half-pixel resampling.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
    if maps.ndim - 2 not in modes or len(size) != maps.ndim - 2:
        raise InputError(f"cannot resize maps of shape {tuple(maps.shape)} to {size}")
    return F.interpolate(maps, size=size, mode=modes[maps.ndim - 2], align_corners=False)


def normalize(maps: torch.Tensor, mode: Normalization) -> torch.Tensor:
    """Normalise each map (over its spatial axes) on its own.

    ``"max"`` divides by the largest absolute value (signed maps land in [-1, 1], non-negative
    ones in [0, 1]); ``"minmax"`` maps [min, max] to [0, 1]. A map whose divisor is 0 (all zero,
    or constant for minmax) becomes all zero, never NaN.
    """
    flat = maps.flatten(2)
    if mode == "max":
        shifted = flat
        scale = flat.abs().amax(dim=2, keepdim=True)
    elif mode == "minmax":
        low = flat.amin(dim=2, keepdim=True)
        shifted = flat - low
        scale = flat.amax(dim=2, keepdim=True) - low
    else:
        raise OptionError(f"normalize must be None, 'max' or 'minmax'; got {mode!r}")
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    result = torch.where(scale > 0, shifted / safe, torch.zeros_like(shifted))
    return result.reshape(maps.shape)


def postprocess(
    maps: torch.Tensor,
    *,
    relu_maps: bool,
    size: Sequence[int] | None,
    normalization: Normalization | None,
) -> torch.Tensor:
    """The steps ``explain`` applies, in its order: relu, then upsample to ``size``, then normalise.

    ``size=None`` skips the up-sampling, ``normalization=None`` the normalisation.
    """
    if relu_maps:
        maps = relu(maps)
    if size is not None:
        maps = upsample(maps, size)
    if normalization is not None:
        maps = normalize(maps, normalization)
    return maps


def check_postprocess(normalize: Any) -> None:
    """Raise :class:`~segcam.errors.OptionError` for an unknown ``normalize``."""
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise OptionError(f"normalize must be None, 'max' or 'minmax'; got {normalize!r}")


@dataclass(frozen=True)
class PostProcessing:
    """The post-processing of raw maps, checked once: ``explain``'s three keywords as one value.

    ``relu``, ``upsample`` and ``normalize`` as :func:`segcam.explain` takes them.

    Raises:
        OptionError: an unknown ``normalize`` (checked when made, before any forward pass).
    """

    relu: bool = True
    upsample: bool = True
    normalize: Normalization | None = None

    def __post_init__(self) -> None:
        check_postprocess(self.normalize)
        for name in ("relu", "upsample"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):  # relu="no" would be true
                raise OptionError(f"{name} must be True or False; got {value!r}")

    def apply(self, maps: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
        """:func:`postprocess` of (N, T, *S) maps; up-sampled to ``size`` when ``upsample``.

        ``size=None`` leaves the grid as it is (maps a driver already placed on their grid).
        """
        return postprocess(
            maps,
            relu_maps=self.relu,
            size=size if self.upsample else None,
            normalization=self.normalize,
        )
