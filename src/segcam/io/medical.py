"""Medical volumes with their geometry: DICOM series, NRRD, MetaImage; maps written alike.

Read and written with SimpleITK (the ``[medical]`` extra, imported only when such a file is met).
One array convention for every volume format, the same as segcam's NIfTI reading: a volume is
indexed (i, j, k) in the file's own voxel order (ITK's index order; SimpleITK's NumPy arrays are
(k, j, i) and are transposed), so a map written back with the input's spacing, origin and
direction overlays it voxel for voxel in physical space, in 3D Slicer or ITK-SNAP. A single DICOM
slice is a 2D image (rows, columns), as a PNG is.

DICOM: a file, or a folder holding a series. A folder with several series takes the one named
by ``series_uid``, else the one with the most slices (a warning names the others); slices of one
series that disagree in orientation, size or spacing are refused. CT intensities come out in
Hounsfield units (the rescale slope and intercept applied by the reader).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcam.errors import InputFileError, MissingExtraError, SegCamWarning, user_stacklevel
from segcam.io.writing import atomic_path

__all__ = [
    "MAP_FORMATS",
    "MEDICAL_SUFFIXES",
    "Geometry",
    "MedicalVolume",
    "dicom_series",
    "is_dicom_folder",
    "ras_affine",
    "read_medical",
    "write_like",
]

MEDICAL_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
MAP_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom": ".dcm"}
_FORMAT_OF = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha", ".dcm": "dicom"}


def _sitk() -> Any:
    try:
        import SimpleITK
    except ImportError as error:
        raise MissingExtraError(
            "reading DICOM, NRRD and MetaImage files needs SimpleITK: pip install 'segcam[medical]'"
        ) from error
    module: Any = SimpleITK
    # ITK prints its warnings straight to stderr; segcam reports what matters as one error line
    module.ProcessObject_SetGlobalWarningDisplay(False)
    return module


@dataclass
class _Said:
    """What a C library printed to the process's stderr while it ran."""

    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "; ".join(self.lines)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _c_stderr() -> Iterator[_Said]:
    """Capture what C code prints straight to file descriptor 2 (ITK's MetaIO, GDCM) meanwhile.

    ITK's readers print lines such as "MetaImage: Read: Cannot open data file" beside the
    exception they raise; captured, they become part of segcam's one error line (or a warning)
    instead of a second, unexplained line on the terminal. Descriptor 2 is process-wide, so
    captures are serialised, and Python's own ``sys.stderr`` is pointed at the real descriptor
    meanwhile: segcam's warnings and other threads' lines still reach the terminal.
    """
    said = _Said()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 to capture: nothing to hide
        yield said
        return
    python_stderr = sys.stderr
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        if _writes_to_fd_2(python_stderr):  # Python's own lines (warnings) still reach the terminal
            sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
        try:
            yield said
        finally:
            if sys.stderr is not python_stderr:
                sys.stderr.close()
                sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            said.lines[:] = [line.strip() for line in text.splitlines() if line.strip()]


def _writes_to_fd_2(stream: Any) -> bool:
    try:
        return bool(stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):  # replaced (a test's capture): left alone
        return False


def _itk_reason(error: BaseException, said: _Said) -> str:
    """ITK's exception as one short reason, with what its reader printed first."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = next((line for line in lines if "Exception" not in line), str(error).strip())
    reason = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", reason)
    if said.lines:
        reason = f"{said.text()}; {reason}"
    return reason[:300]


@dataclass(frozen=True)
class Geometry:
    """Where the voxels lie: spacing (mm), origin (mm) and direction cosines, ITK's LPS frame."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def describe(self) -> dict[str, list[float]]:
        """For manifests: plain lists."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


@dataclass(frozen=True)
class MedicalVolume:
    """An image read with its geometry.

    Attributes:
        array: (C, *S) float32, S in (i, j, k) order (3D) or (rows, columns) (a 2D slice).
        geometry: spacing, origin and direction of the (i, j, k) grid.
        format: ``"dicom"``, ``"nrrd"`` or ``"mha"``.
        reference: the SimpleITK image whose geometry maps are written with.
        files: a DICOM series' files, in slice order (k): what DICOM maps reference.
    """

    array: np.ndarray
    geometry: Geometry
    format: str
    reference: Any
    files: tuple[str, ...] = ()


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files (``*.dcm``) directly."""
    return path.is_dir() and any(p.is_file() and p.suffix.lower() == ".dcm" for p in path.iterdir())


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """The DICOM series in ``folder``: series instance UID -> its files, sorted by position."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    return {
        uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        for uid in reader.GetGDCMSeriesIDs(str(folder))
    }


def _choose_series(folder: Path, series_uid: str | None) -> list[str]:
    series = dicom_series(folder)
    if not series:
        raise InputFileError(f"{folder}: no DICOM series found")
    if series_uid is not None:
        if series_uid not in series:
            listed = ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
            raise InputFileError(f"{folder}: no series {series_uid}; the series here: {listed}")
        return series[series_uid]
    uid, files = max(series.items(), key=lambda item: (len(item[1]), item[0]))
    if len(series) > 1:
        others = ", ".join(u for u in series if u != uid)
        warnings.warn(
            f"{folder} holds {len(series)} DICOM series; explaining the largest, {uid} "
            f"({len(files)} slices); the others: {others} (choose with --series UID)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return files


def _check_consistent(files: list[str], folder: Path) -> None:
    """Refuse a series whose slices disagree in orientation or size (a mixed series)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    seen: dict[tuple[Any, ...], str] = {}
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        key = (
            tuple(round(v, 4) for v in reader.GetDirection()),
            tuple(reader.GetSize()[:2]),
            tuple(round(v, 4) for v in reader.GetSpacing()[:2]),
        )
        seen.setdefault(key, name)
    if len(seen) > 1:
        examples = "; ".join(
            f"{Path(name).name}: direction {k[0]}, size {k[1]}, spacing {k[2]}"
            for k, name in list(seen.items())[:2]
        )
        raise InputFileError(
            f"{folder}: the series mixes slices of different orientation, size or spacing "
            f"({examples}); split it, or choose one series with --series UID"
        )


def read_medical(path: str | os.PathLike[str], *, series_uid: str | None = None) -> MedicalVolume:
    """Read a DICOM file or series folder, an NRRD or a MetaImage file, with its geometry."""
    sitk = _sitk()
    source = Path(path)
    files: list[str] = []
    try:
        with _c_stderr() as said:
            if source.is_dir():
                files = _choose_series(source, series_uid)
                _check_consistent(files, source)
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                image = reader.Execute()
                kind = "dicom"
            else:
                image = sitk.ReadImage(str(source))
                kind = _FORMAT_OF.get(source.suffix.lower(), "mha")
    except (InputFileError, MissingExtraError):
        raise
    except Exception as error:  # ITK raises RuntimeError with long messages for bad files
        raise InputFileError(f"{source}: cannot read ({_itk_reason(error, said)})") from error
    if said.lines:  # read, but the reader printed something: said once, as segcam's warning
        warnings.warn(
            f"{source}: the reader said: {said.text()[:300]}",
            SegCamWarning,
            stacklevel=user_stacklevel(),
        )
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (k, j, i[, C])
    array = array[None] if components == 1 else np.moveaxis(array, -1, 0)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        array = array[:, 0]  # a single slice: a 2D image (rows, columns)
    elif image.GetDimension() == 3:
        array = np.ascontiguousarray(np.swapaxes(array, 1, 3))  # (C, k, j, i) -> (C, i, j, k)
    geometry = Geometry(
        tuple(float(v) for v in image.GetSpacing()),
        tuple(float(v) for v in image.GetOrigin()),
        tuple(float(v) for v in image.GetDirection()),
    )
    series = tuple(str(f) for f in files) if kind == "dicom" else ()
    return MedicalVolume(np.ascontiguousarray(array), geometry, kind, image, series)


def ras_affine(volume: MedicalVolume) -> np.ndarray | None:
    """The voxel-to-world matrix of a 3D volume's (i, j, k) grid in RAS, as a NIfTI affine says.

    ITK's geometry is LPS: world = origin + direction @ (spacing * index); RAS flips x and y.
    None for a 2D image.
    """
    geometry = volume.geometry
    if len(geometry.spacing) != 3 or volume.array.ndim != 4:
        return None
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(geometry.spacing, dtype=np.float64)
    lps[:3, 3] = geometry.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_like(path: Path, volume: np.ndarray, like: MedicalVolume) -> Path:
    """Write a (i, j, k) map (or a (rows, columns) one) with ``like``'s geometry, atomically.

    The format follows ``path``'s suffix (``.nii.gz``, ``.nrrd``, ``.mha``); written through
    :func:`segcam.io.writing.atomic_path` (folder created, temporary name, fsync, rename).
    """
    sitk = _sitk()
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 3:
        data = np.swapaxes(data, 0, 2)  # (i, j, k) -> (k, j, i)
    elif data.ndim == 2 and like.reference.GetDimension() == 3:
        data = data[None]
    image = sitk.GetImageFromArray(np.ascontiguousarray(data))
    image.CopyInformation(like.reference)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return path
