"""The demo's CT data: a real abdominal CT volume with liver (1) and tumour (2) labels.

The volume (128x128x128, Hounsfield units, LiTS-derived, case 117) and its labels ship inside the
PyPI package ``liver-ct-segmentation-package==1.6.0`` (MIT licence) as ``data/img_117.mrc`` and
``data/lab_117.mrc``. segcam never installs that package (it pins torch 1.7.1): ``make data`` (or
:func:`fetch`) downloads its wheel with ``pip download --no-deps`` into a cache folder, and the
two files are read straight out of the wheel.

Axes: the arrays are indexed as stored (MRC section, row, column). Read as anatomy, axis 0 runs
left-right, axis 1 front-back and axis 2 along the body: **axial slices are ``volume[:, :, k]``**
(the heart and lungs appear at high k, the kidneys at low k). NIfTI files are written in this
voxel order. The source gives no voxel spacing, so 1 mm isotropic is assumed wherever a spacing
is written.

Split, by axial slices, with the same split for the 2D and the 3D network: slices 56..79 (a slab
through the middle of the liver) are held out; 8 slices on each side (48..55, 80..87) are used by
neither, so nearly identical neighbours never fall on both sides; 0..47 and 88..127 train. Only
one patient is available, so held-out Dice measures generalisation to unseen slices of the same
patient, not to new patients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcam.io.mrc import read_mrc

__all__ = [
    "AXIAL_AXIS",
    "CLASS_NAMES",
    "HELD_OUT_SLICES",
    "TRAIN_SLICES",
    "WINDOW",
    "LiverCase",
    "axial_slices",
    "data_dir",
    "fetch",
    "load_case",
    "window",
]

PACKAGE = "liver-ct-segmentation-package==1.6.0"
WHEEL_GLOB = "liver_ct_segmentation_package-1.6.0-*.whl"
MEMBERS = (
    "liver_ct_segmentation_package/data/img_117.mrc",
    "liver_ct_segmentation_package/data/lab_117.mrc",
)
CLASS_NAMES = ("background", "liver", "tumour")
WINDOW = (-200.0, 300.0)  # HU: an abdominal soft-tissue window, mapped to [0, 1]
AXIAL_AXIS = 2
HELD_OUT_SLICES = range(56, 80)
GAP_SLICES = (*range(48, 56), *range(80, 88))
TRAIN_SLICES = (*range(0, 48), *range(88, 128))
TRAIN_BLOCKS = (range(0, 48), range(88, 128))  # contiguous training slabs, for 3D patches


class DemoDataMissingError(FileNotFoundError):
    """The wheel that carries the demo CT is not in the cache folder."""


def data_dir() -> Path:
    """The cache folder: $SEGCAM_DATA_DIR, else ./.cache/segcam-data (the repository's)."""
    return Path(os.environ.get("SEGCAM_DATA_DIR", Path.cwd() / ".cache" / "segcam-data"))


def fetch(directory: Path | None = None) -> Path:
    """Download the wheel (no dependencies, nothing installed) into ``directory``; return it."""
    directory = directory or data_dir()
    found = sorted(directory.glob(WHEEL_GLOB))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    print(f"downloading {PACKAGE} (the demo CT, 4.5 MB) into {directory}", file=sys.stderr)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(directory),
            PACKAGE,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DemoDataMissingError(
            f"pip download {PACKAGE} failed: {result.stderr.strip().splitlines()[-1:]}"
        )
    found = sorted(directory.glob(WHEEL_GLOB))
    if not found:
        raise DemoDataMissingError(f"pip download left no {WHEEL_GLOB} in {directory}")
    return found[0]


@dataclass(frozen=True)
class LiverCase:
    """The CT volume in HU (float32) and its labels (int64 in {0, 1, 2}), axial axis last."""

    image: np.ndarray
    labels: np.ndarray
    source: Path

    @property
    def affine(self) -> np.ndarray:
        """Voxel indices to millimetres, 1 mm isotropic (the source gives no spacing)."""
        return np.eye(4)


def load_case(directory: Path | None = None) -> LiverCase:
    """Read the volume and labels out of the cached wheel."""
    directory = directory or data_dir()
    found = sorted(directory.glob(WHEEL_GLOB))
    if not found:
        raise DemoDataMissingError(
            f"the demo CT is not in {directory}: run `make data` (or `segcam demo --fetch`), or "
            f"point SEGCAM_DATA_DIR at a folder holding {WHEEL_GLOB}"
        )
    with zipfile.ZipFile(found[0]) as wheel:
        image = read_mrc(wheel.read(MEMBERS[0]), MEMBERS[0]).astype(np.float32)
        labels = read_mrc(wheel.read(MEMBERS[1]), MEMBERS[1]).astype(np.int64)
    return LiverCase(image=image, labels=labels, source=found[0])


def window(hounsfield: np.ndarray, low: float = WINDOW[0], high: float = WINDOW[1]) -> np.ndarray:
    """Clip to [low, high] HU and scale to [0, 1] (float32)."""
    scaled: np.ndarray = ((np.clip(hounsfield, low, high) - low) / (high - low)).astype(np.float32)
    return scaled


def axial_slices(volume: np.ndarray, indices: Sequence[int] | range) -> np.ndarray:
    """Axial slices ``volume[:, :, k]`` for k in ``indices``, stacked on a new first axis."""
    return np.ascontiguousarray(np.moveaxis(volume[:, :, list(indices)], AXIAL_AXIS, 0))
