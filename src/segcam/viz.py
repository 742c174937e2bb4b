"""Overlays and colour maps on NumPy arrays (no plotting library needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["INFERNO", "colorize", "grey", "overlay"]

# Anchors of matplotlib's "inferno" colour map (public domain, van der Walt & Smith), at 0, 1/8..1.
INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray, anchors: np.ndarray = INFERNO) -> np.ndarray:
    """Map values in [0, 1] (clipped) to RGB uint8 by linear interpolation between anchors."""
    clipped = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    low = np.floor(clipped).astype(int).clip(0, len(anchors) - 2)
    fraction = (clipped - low)[..., None]
    rgb: np.ndarray = anchors[low] * (1 - fraction) + anchors[low + 1] * fraction
    return rgb.round().astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
    """Min-max scale an image to [0, 1] (a constant image becomes 0)."""
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image, dtype=np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.8) -> np.ndarray:
    """A grey image with a heat map blended on top: (H, W) + (H, W) -> (H, W, 3) uint8.

    The heat map is divided by its largest absolute value; negative values count as 0. Where the
    map is 0 the image shows through unchanged.
    """
    scale = float(np.abs(heat).max())
    normalised = np.clip(heat / scale, 0, 1) if scale > 0 else np.zeros_like(heat)
    base = (grey(image) * 255.0)[..., None].repeat(3, axis=-1)
    weight = alpha * normalised[..., None]
    blended = base * (1 - weight) + colorize(normalised).astype(np.float32) * weight
    return blended.round().clip(0, 255).astype(np.uint8)
