"""A segmentation benchmark whose evidence is known by construction (seeded, 2D, 48x48).

Each scene holds, on a noisy background (class 0):

- one **cue disk**: a plain bright disk whose class is decided *only by a marker elsewhere*: a
  small square that is bright (disk = class 1) or dark (disk = class 2). The disk looks the same
  in both classes, so a network that labels it right must use the marker. The marker itself is
  background.
- one **textured square**: its class is decided *only by its own texture*: horizontal stripes
  (class 1) or vertical stripes (class 2).

For a target on the cue disk, the true evidence is the marker; for a target on the square, the
square itself. :func:`evidence_scene` returns the masks of all three objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcam.errors import SegCamError

__all__ = ["SIZE", "EvidenceScene", "evidence_batch", "evidence_scene"]

SIZE = 48


@dataclass(frozen=True)
class EvidenceScene:
    """One scene: image (1, 48, 48), labels (48, 48), and the object and evidence masks."""

    image: np.ndarray
    labels: np.ndarray
    disk: np.ndarray
    marker: np.ndarray
    square: np.ndarray
    disk_class: int
    square_class: int


def _free(occupied: np.ndarray, mask: np.ndarray, margin: int = 2) -> bool:
    grown = mask.copy()
    for _ in range(margin):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    return not bool((grown & occupied).any())


def evidence_scene(seed: int) -> EvidenceScene:
    """The scene of ``seed`` (NumPy PCG64: the same on every machine)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    for _attempt in range(1000):
        occupied = np.zeros((SIZE, SIZE), dtype=bool)
        radius = rng.uniform(5, 7)
        cr, cc = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
        disk = (rows - cr) ** 2 + (cols - cc) ** 2 <= radius**2
        occupied |= disk
        side = 5
        mr, mc = rng.integers(1, SIZE - side - 1, size=2)
        marker = np.zeros_like(disk)
        marker[mr : mr + side, mc : mc + side] = True
        if not _free(occupied, marker, 3):
            continue
        occupied |= marker
        half = int(rng.integers(6, 9))
        sr, sc = rng.integers(half + 1, SIZE - half - 1, size=2)
        square = np.zeros_like(disk)
        square[sr - half : sr + half, sc - half : sc + half] = True
        if not _free(occupied, square, 2):
            continue
        break
    else:  # pragma: no cover - 1000 attempts always suffice at this density
        raise SegCamError(f"no layout for seed {seed}")
    disk_class = int(rng.integers(1, 3))
    square_class = int(rng.integers(1, 3))
    image = rng.normal(scale=0.2, size=(SIZE, SIZE)).astype(np.float32)
    image[disk] += 1.0
    image[marker] += 1.5 if disk_class == 1 else -1.5
    stripes = (rows // 2) % 2 if square_class == 1 else (cols // 2) % 2
    image[square] += (0.2 + 1.0 * stripes)[square]
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    labels[disk] = disk_class
    labels[square] = square_class
    return EvidenceScene(image[None], labels, disk, marker, square, disk_class, square_class)


def evidence_batch(seeds: range | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 48, 48) and labels (N, 48, 48) of the given seeds."""
    scenes = [evidence_scene(seed) for seed in seeds]
    return np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes])
