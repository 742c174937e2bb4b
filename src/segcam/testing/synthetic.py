"""Seeded synthetic 2D scenes for demos and tests: disks (class 1) and squares (class 2).

Each scene is a smooth random background with a few bright disks and squares of random size
and brightness, plus noise. Class 0 is background. Shapes do not overlap. The same seed gives the
same scene on every machine (NumPy's PCG64).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "shapes_batch", "shapes_scene"]

CLASS_NAMES = ("background", "disk", "square")


def shapes_scene(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (1, size, size) float32 and labels (size, size) int64 in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    gradient = rng.normal(size=3).astype(np.float32)
    background = 0.3 * (gradient[0] * rows / size + gradient[1] * cols / size) + 0.2 * gradient[2]
    image = background.copy()
    labels = np.zeros((size, size), dtype=np.int64)
    shapes = rng.integers(2, 6)
    for _ in range(int(shapes)):
        for _attempt in range(20):
            kind = int(rng.integers(1, 3))
            radius = float(rng.uniform(size * 0.06, size * 0.14))
            centre_r, centre_c = rng.uniform(radius + 1, size - radius - 1, size=2)
            if kind == 1:
                inside = (rows - centre_r) ** 2 + (cols - centre_c) ** 2 <= radius**2
            else:
                inside = (np.abs(rows - centre_r) <= radius * 0.85) & (
                    np.abs(cols - centre_c) <= radius * 0.85
                )
            halo = _dilate(inside, 2)
            if not (labels[halo] != 0).any():
                labels[inside] = kind
                image[inside] += float(rng.uniform(0.8, 1.6))
                break
    image += rng.normal(scale=0.15, size=image.shape).astype(np.float32)
    return image[None].astype(np.float32), labels


def shapes_batch(seeds: range | list[int], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Stack scenes: images (N, 1, size, size) and labels (N, size, size)."""
    scenes = [shapes_scene(seed, size) for seed in seeds]
    return np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        shifted = grown.copy()
        shifted[1:] |= grown[:-1]
        shifted[:-1] |= grown[1:]
        shifted[:, 1:] |= grown[:, :-1]
        shifted[:, :-1] |= grown[:, 1:]
        grown = shifted
    return grown
