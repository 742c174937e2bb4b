"""The demo's CT data: a real abdominal CT volume with liver (1) and tumour (2) labels.

The volume (128x128x128, Hounsfield units, LiTS-derived, case 117) and its labels ship inside the
PyPI package ``liver-ct-segmentation-package==1.6.0`` (MIT licence) as ``data/img_117.mrc`` and
``data/lab_117.mrc``. segcam never installs that package (it pins torch 1.7.1): on first use
:func:`fetch` has pip download its wheel (``python -m pip download --no-deps``, 4.5 MB, checked
against the pinned SHA-256) into the data folder, and the two files are read straight out of the
wheel. pip's own configuration (index, mirrors, proxies, certificates) applies, so the download
works wherever ``pip install`` does; no host name lives in segcam.

The data folder is ``$SEGCAM_DATA_DIR`` when set, else the user's cache folder
(``~/.cache/segcam/data`` on Linux, or ``$XDG_CACHE_HOME/segcam/data``; the platform's cache
folder elsewhere). ``offline=True`` (``segcam demo --offline``) refuses to download.

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

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcam.errors import SegCamError
from segcam.io.mrc import read_mrc

__all__ = [
    "AXIAL_AXIS",
    "CLASS_NAMES",
    "HELD_OUT_SLICES",
    "TRAIN_SLICES",
    "WINDOW",
    "DemoDataMissingError",
    "LiverCase",
    "axial_slices",
    "data_dir",
    "fetch",
    "load_case",
    "window",
]

PACKAGE = "liver-ct-segmentation-package==1.6.0"
WHEEL_NAME = "liver_ct_segmentation_package-1.6.0-py2.py3-none-any.whl"
# pip downloads the wheel with its own configuration; tests replace the command
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
WHEEL_SHA256 = "67ffa526d8500ce5e3d9f2c96c1690543d811d352d93d531301d35791b9d6bba"
WHEEL_BYTES = 4_514_900
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


class DemoDataMissingError(SegCamError, FileNotFoundError):
    """The demo CT is not in the data folder and could not (or may not) be downloaded."""


def _user_cache_dir() -> Path:
    try:
        import platformdirs
    except ImportError:  # the XDG rule, which platformdirs also follows on Linux
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "segcam"
    return Path(platformdirs.user_cache_dir("segcam", appauthor=False))


def data_dir() -> Path:
    """The data folder: ``$SEGCAM_DATA_DIR``, else ``<user cache folder>/segcam/data``."""
    configured = os.environ.get("SEGCAM_DATA_DIR")
    return Path(configured) if configured else _user_cache_dir() / "data"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch(
    directory: Path | None = None,
    *,
    offline: bool = False,
    progress: Callable[[str], None] | None = _say,
) -> Path:
    """The cached wheel that carries the demo CT; downloaded first when it is not there.

    pip downloads it (``python -m pip download --no-deps``, with pip's own index, proxy and
    certificate settings) into a temporary folder beside the data folder; it is checked against
    its pinned SHA-256 and renamed into place: an interrupted download leaves nothing that looks
    finished. Nothing is installed.

    Args:
        directory: the data folder (default :func:`data_dir`).
        offline: refuse to download; raise :class:`DemoDataMissingError` when missing.
        progress: called with one line before downloading (``None``: silent).

    Returns:
        The wheel's path.
    """
    directory = directory or data_dir()
    wheel = directory / WHEEL_NAME
    if wheel.is_file():
        return wheel
    if offline:
        raise DemoDataMissingError(
            f"the demo CT is not in {directory} and downloading is off (--offline): run once "
            f"without --offline, or put {WHEEL_NAME} there (SEGCAM_DATA_DIR chooses the folder)"
        )
    if progress is not None:
        progress(
            f"downloading the demo CT ({PACKAGE} wheel, {WHEEL_BYTES / 1e6:.1f} MB) with pip "
            f"into {directory}"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoDataMissingError(f"cannot create the data folder {directory}: {error}") from None
    by_hand = (
        f"or download it yourself (python -m pip download --no-deps {PACKAGE}) into {directory} "
        f"(SEGCAM_DATA_DIR chooses the folder)"
    )
    with tempfile.TemporaryDirectory(prefix=".segcam-download-", dir=directory) as scratch:
        command = [*PIP_DOWNLOAD, "--no-deps", "--only-binary=:all:", "--dest", scratch, PACKAGE]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DemoDataMissingError(
                f"pip could not be run to download the demo CT ({error}); {by_hand}"
            ) from None
        if done.returncode != 0:
            said = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            reason = said[-1].strip() if said else f"exit status {done.returncode}"
            raise DemoDataMissingError(f"pip could not download the demo CT ({reason}); {by_hand}")
        downloaded = Path(scratch) / WHEEL_NAME
        if not downloaded.is_file():
            raise DemoDataMissingError(f"pip downloaded no {WHEEL_NAME}; {by_hand}")
        digest = hashlib.sha256()
        with downloaded.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != WHEEL_SHA256:
            raise DemoDataMissingError(
                f"the downloaded {WHEEL_NAME} has SHA-256 {digest.hexdigest()}, not the pinned "
                f"{WHEEL_SHA256}; nothing was kept"
            )
        partial = directory / f".{WHEEL_NAME}.{os.getpid()}.part"
        try:  # the same file system: a rename, so the wheel appears whole or not at all
            shutil.move(downloaded, partial)
            os.replace(partial, wheel)
        finally:
            partial.unlink(missing_ok=True)
    return wheel


@dataclass(frozen=True)
class LiverCase:
    """The CT volume in HU (float32) and its labels (int64 in {0, 1, 2}), axial axis last."""

    image: np.ndarray
    labels: np.ndarray
    source: Path

    @property
    def affine(self) -> np.ndarray:
        """Voxel indices to RAS+ millimetres: 1 mm isotropic, voxel axes toward L, P and S.

        The source gives neither spacing nor orientation. The orientation is read off the
        anatomy: the liver lies at low indices of axis 0 (the patient's right), the spine at
        high indices of axis 1 (posterior), the liver's dome at high indices of axis 2
        (superior): DICOM's LPS voxel order, so a radiological viewer shows the liver on the
        image's left.
        """
        return np.diag([-1.0, -1.0, 1.0, 1.0])


def load_case(directory: Path | None = None, *, offline: bool = False) -> LiverCase:
    """Read the volume and labels out of the cached wheel, downloading it on first use."""
    wheel_path = fetch(directory, offline=offline)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            image = read_mrc(wheel.read(MEMBERS[0]), MEMBERS[0]).astype(np.float32)
            labels = read_mrc(wheel.read(MEMBERS[1]), MEMBERS[1]).astype(np.int64)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DemoDataMissingError(
            f"{wheel_path} is not the demo CT's wheel ({error}); delete it and run again"
        ) from None
    return LiverCase(image=image, labels=labels, source=wheel_path)


def window(hounsfield: np.ndarray, low: float = WINDOW[0], high: float = WINDOW[1]) -> np.ndarray:
    """Clip to [low, high] HU and scale to [0, 1] (float32)."""
    scaled: np.ndarray = ((np.clip(hounsfield, low, high) - low) / (high - low)).astype(np.float32)
    return scaled


def axial_slices(volume: np.ndarray, indices: Sequence[int] | range) -> np.ndarray:
    """Axial slices ``volume[:, :, k]`` for k in ``indices``, stacked on a new first axis."""
    return np.ascontiguousarray(np.moveaxis(volume[:, :, list(indices)], AXIAL_AXIS, 0))
