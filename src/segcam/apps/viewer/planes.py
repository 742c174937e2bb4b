"""How a volume's slices are shown: radiological orientation from the affine.

A 3D input is stored in voxel order; its NIfTI affine maps voxel indices to RAS+ world
coordinates, where +x points to the patient's Right, +y Anterior and +z Superior (DICOM's
LPS+ is the same frame with x and y negated). The viewer shows

- **axial** (across S): anterior at the top, the patient's right on the image's left
  (radiological convention), rows go A→P, columns go R→L;
- **coronal** (across A): superior at the top, right on the left; rows S→I, columns R→L;
- **sagittal** (across R): superior at the top, anterior on the left; rows S→I, columns A→P.

Each voxel axis is matched to the world axis it runs closest to (largest cosine, greedily); an
oblique volume is shown along those nearest axes without resampling (as most viewers do) and
says so. Without an affine the slices are raw voxel planes (rows and columns the two remaining
axes in order) and carry no patient labels: nothing is known about the patient's orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Plane", "planes"]

WORLD = "RAS"
OPPOSITE = {"R": "L", "A": "P", "S": "I"}
# view name: (world axis cut across, world axis of rows, world axis of columns)
VIEWS = {"sagittal": (0, 2, 1), "coronal": (1, 2, 0), "axial": (2, 1, 0)}
OBLIQUE_COSINE = 0.999


@dataclass(frozen=True)
class Plane:
    """The slices across one voxel axis, as the page shows them.

    Attributes:
        name: ``axial``, ``coronal``, ``sagittal`` (with an affine) or ``axis k``.
        axis: the voxel axis the slice index runs along.
        rows, cols: the voxel axes of the shown rows and columns.
        flip_rows, flip_cols: whether a shown row (column) index runs against its voxel axis.
        labels: the patient directions at the image's top, bottom, left and right ({} without
            an affine).
        spacing: millimetres between shown rows and between shown columns.
    """

    name: str
    axis: int
    rows: int
    cols: int
    flip_rows: bool = False
    flip_cols: bool = False
    labels: dict[str, str] | None = None
    spacing: tuple[float, float] = (1.0, 1.0)

    def cut(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` of ``volume`` (*S) in display order (rows, columns)."""
        plane = np.take(volume, index, axis=self.axis)
        if [a for a in range(3) if a != self.axis] != [self.rows, self.cols]:
            plane = plane.T
        if self.flip_rows:
            plane = plane[::-1]
        if self.flip_cols:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def place(self, plane: np.ndarray, volume: np.ndarray, index: int) -> None:
        """Write a displayed plane back into slice ``index`` of ``volume`` (the inverse of cut)."""
        if self.flip_rows:
            plane = plane[::-1]
        if self.flip_cols:
            plane = plane[:, ::-1]
        if [a for a in range(3) if a != self.axis] != [self.rows, self.cols]:
            plane = plane.T
        where: list[Any] = [slice(None)] * 3
        where[self.axis] = index
        volume[tuple(where)] = plane

    def describe(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """What the page needs to map a shown pixel to a voxel and to draw the plane."""
        return {
            "name": self.name,
            "axis": self.axis,
            "size": int(shape[self.axis]),
            "rows": {"axis": self.rows, "flip": self.flip_rows, "size": int(shape[self.rows])},
            "cols": {"axis": self.cols, "flip": self.flip_cols, "size": int(shape[self.cols])},
            "labels": dict(self.labels or {}),
            "spacing": [float(s) for s in self.spacing],
        }


def _world_axes(linear: np.ndarray) -> list[tuple[int, float]]:
    """For each voxel axis: (the world axis it runs closest to, the signed cosine)."""
    cosines = linear / np.maximum(np.linalg.norm(linear, axis=0, keepdims=True), 1e-12)
    free = np.abs(cosines).copy()
    matched: list[tuple[int, float]] = [(0, 0.0)] * 3
    for _ in range(3):  # greedy: the strongest pairing first
        world, voxel = np.unravel_index(int(np.argmax(free)), free.shape)
        matched[int(voxel)] = (int(world), float(cosines[world, voxel]))
        free[world, :] = -1.0
        free[:, voxel] = -1.0
    return matched


def planes(affine: np.ndarray | None) -> tuple[list[Plane], bool]:
    """One :class:`Plane` per voxel axis, and whether the volume is oblique.

    ``affine`` is the 4x4 voxel-to-RAS+ matrix (NIfTI), or ``None`` for raw voxel planes.
    """
    if affine is None:
        rest = [[a for a in range(3) if a != axis] for axis in range(3)]
        return [Plane(f"axis {k}", k, rest[k][0], rest[k][1]) for k in range(3)], False
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    matched = _world_axes(linear)
    oblique = any(abs(cosine) < OBLIQUE_COSINE for _, cosine in matched)
    voxel_of = {world: voxel for voxel, (world, _) in enumerate(matched)}
    result: list[Plane | None] = [None, None, None]
    for name, (across, row_world, col_world) in VIEWS.items():
        rows, cols = voxel_of[row_world], voxel_of[col_world]
        # a shown index grows toward the world axis' negative end (A at the top, R on the left)
        flip_rows, flip_cols = matched[rows][1] > 0, matched[cols][1] > 0
        top, left = WORLD[row_world], WORLD[col_world]
        result[voxel_of[across]] = Plane(
            name,
            voxel_of[across],
            rows,
            cols,
            flip_rows,
            flip_cols,
            {"top": top, "bottom": OPPOSITE[top], "left": left, "right": OPPOSITE[left]},
            (float(spacing[rows]), float(spacing[cols])),
        )
    return [plane for plane in result if plane is not None], oblique
