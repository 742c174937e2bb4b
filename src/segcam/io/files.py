"""Inputs (PNG/JPEG/TIFF, NIfTI, NumPy) and outputs, written atomically.

Images are read with Pillow (``[images]`` extra), NIfTI with nibabel (``[nifti]`` extra); both are
imported only when such a file is met, with a message naming the extra when missing. NIfTI data are
used in their stored voxel order (i, j, k) without reorientation, and maps are written back with
the input's affine and header, so they overlay the input in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from segcam.errors import InputFileError, OutputFileError, SegCamError

if TYPE_CHECKING:
    from segcam.io.medical import MedicalVolume

__all__ = [
    "IMAGE_SUFFIXES",
    "InputFile",
    "InputFileError",
    "atomic_write",
    "file_mode",
    "input_kind",
    "make_dir",
    "read_input",
    "write_nifti",
]

# The umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise InputFileError(
            f"reading this file needs {module}: pip install 'segcam[{extra}]'"
        ) from error


def input_kind(path: Path) -> str:
    """'image', 'nifti', 'npy' or 'medical' (DICOM, NRRD, MetaImage; a DICOM folder)."""
    from segcam.io.medical import MEDICAL_SUFFIXES, is_dicom_folder

    name = path.name.lower()
    if name.endswith(MEDICAL_SUFFIXES) or is_dicom_folder(path):
        return "medical"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(".npy"):
        return "npy"
    raise InputFileError(
        f"{path}: unsupported file type; use PNG/JPEG/TIFF, NIfTI (.nii, .nii.gz), NRRD, "
        f"MetaImage (.mha, .mhd), DICOM (a .dcm file or a series folder) or .npy"
    )


@dataclass(frozen=True)
class InputFile:
    """An input as channels-first float32 (C, *S), with what is needed to write results back."""

    path: Path
    kind: str
    array: np.ndarray
    nifti_affine: np.ndarray | None = None
    nifti_header: Any = field(default=None, repr=False)
    medical: MedicalVolume | None = field(default=None, repr=False)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.array.ndim - 1


def read_input(
    path: str | os.PathLike[str],
    *,
    channels_last_rgb: bool = True,
    series_uid: str | None = None,
) -> InputFile:
    """Read one input file (or a DICOM series folder).

    - PNG/JPEG/TIFF: grey images become (1, H, W), RGB(A) images (3, H, W) (alpha dropped);
      values as stored (0..255 for 8-bit), as float32.
    - NIfTI: a 3D volume becomes (1, I, J, K); a 4D one with a last axis of channels (C, I, J, K).
    - .npy: (H, W) or (D, H, W) gain a channel axis; (C, H, W) / (C, D, H, W) are kept. Loaded
      without pickle.
    - DICOM (a file, or a folder: one series, ``series_uid`` or the largest), NRRD, MetaImage:
      (C, I, J, K) with their geometry (:mod:`segcam.io.medical`; CT in Hounsfield units).
    """
    source = Path(path)
    if not source.is_file() and not source.is_dir():
        raise InputFileError(f"{source}: no such file")
    kind = input_kind(source)
    if kind == "medical":
        from segcam.io.medical import read_medical

        volume = read_medical(source, series_uid=series_uid)
        return InputFile(source, kind, volume.array, medical=volume)
    if source.is_dir():
        raise InputFileError(f"{source}: a folder, not a file")
    try:
        if kind == "image":
            return InputFile(source, kind, _read_image(source))
        if kind == "nifti":
            nibabel = _require("nibabel", "nifti")
            image = nibabel.load(str(source))
            data = np.asarray(image.get_fdata(dtype=np.float32))
            if data.ndim == 3:
                data = data[None]
            elif data.ndim == 4:
                data = np.moveaxis(data, -1, 0)
            else:
                raise InputFileError(f"{source}: a {data.ndim}-D NIfTI; expected 3-D or 4-D")
            return InputFile(source, kind, np.ascontiguousarray(data), image.affine, image.header)
        data = np.load(source, allow_pickle=False)
    except InputFileError:
        raise
    except Exception as error:  # the readers raise many types for corrupt files
        raise InputFileError(f"{source}: cannot read ({type(error).__name__}: {error})") from error
    if data.dtype.kind not in "biuf":
        raise InputFileError(f"{source}: array of dtype {data.dtype}; expected numbers")
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3 and data.shape[0] > 4:
        data = data[None]  # (D, H, W): a single-channel volume
    elif data.ndim not in (3, 4):
        raise InputFileError(f"{source}: array of shape {data.shape}; expected 2-D to 4-D")
    return InputFile(source, kind, np.ascontiguousarray(data, dtype=np.float32))


def _read_image(path: Path) -> np.ndarray:
    image_module = _require("PIL.Image", "images")
    with image_module.open(path) as image:
        image.load()
        if image.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
            array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        else:
            array = np.asarray(image, dtype=np.float32)[None]
    return np.ascontiguousarray(array)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` on success.

    A crash or kill leaves either the old file or the new one, never a half-written one; the
    temporary is removed on error (a kill can leave a hidden ``.name.*.part`` file, which the next
    run of the same output ignores and overwrites nothing with).
    """
    make_dir(path.parent)
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".part", dir=path.parent
        )
    except OSError as error:
        raise OutputFileError(f"cannot write {path}: {error.strerror or error}") from error
    try:
        encoding = None if "b" in mode else "utf-8"  # text files: UTF-8 whatever the locale
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), file_mode())  # mkstemp's 0600 -> what the umask allows
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, SegCamError):
            raise OutputFileError(f"cannot write {path}: {error.strerror or error}") from error
        raise


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0o644 under umask 022)."""
    return 0o666 & ~_UMASK


def make_dir(path: Path) -> Path:
    """Create a folder (and its parents) for outputs; :class:`OutputFileError` names the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFileError(
            f"cannot create the output folder {path}: {error.strerror or error}"
        ) from error
    return path


def nifti_bytes(
    volume: np.ndarray, affine: np.ndarray, header: Any = None, *, description: str = ""
) -> bytes:
    """A (I, J, K) volume as the bytes of an uncompressed NIfTI-1 file (float32).

    ``description`` goes into the header's ``descrip`` field (at most 79 characters).
    """
    nibabel = _require("nibabel", "nifti")
    image = nibabel.Nifti1Image(np.asarray(volume, dtype=np.float32), affine, header=header)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description:
        image.header["descrip"] = description[:79].encode("ascii", "replace")
    data: bytes = image.to_bytes()
    return data


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write a (I, J, K) volume as NIfTI with the given affine (and header geometry), atomically."""
    nibabel = _require("nibabel", "nifti")
    image = nibabel.Nifti1Image(np.asarray(volume, dtype=np.float32), affine, header=header)
    if header is not None:
        image.set_data_dtype(np.float32)
        image.header.set_qform(*header.get_qform(coded=True))
        image.header.set_sform(*header.get_sform(coded=True))
    else:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    with atomic_write(path) as stream:
        stream.write(image.to_bytes() if not path.name.endswith(".gz") else _gzip(image.to_bytes()))
    return path


def _gzip(data: bytes) -> bytes:
    import gzip

    # Level 1: float maps shrink to within 3% of level 6's size, about twice as fast.
    return gzip.compress(data, compresslevel=1, mtime=0)
