"""Inputs (PNG/JPEG/TIFF, NIfTI, NumPy) and NIfTI maps (written by :mod:`segcam.io.writing`).

Images are read with Pillow (``[images]`` extra), NIfTI with nibabel (``[nifti]`` extra); both are
imported only when such a file is met, with a message naming the extra when missing. NIfTI data are
used in their stored voxel order (i, j, k) without reorientation, and maps are written back with
the input's affine and header, so they overlay the input in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcam.errors import InputFileError, user_stacklevel
from segcam.io.writing import atomic_write

if TYPE_CHECKING:
    from segcam.io.medical import MedicalVolume

__all__ = [
    "IMAGE_SUFFIXES",
    "InputFile",
    "InputFileError",
    "display_hints",
    "input_kind",
    "read_input",
    "write_nifti",
]

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
        reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise InputFileError(f"{source}: cannot read ({type(error).__name__}: {reason})") from error
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
        pages = int(getattr(image, "n_frames", 1))
        if pages > 1:  # a multi-page TIFF: say what is left out
            warnings.warn(
                f"{path} holds {pages} pages; explaining the first (save the others as files of "
                f"their own, or the stack as a volume: .npy, NIfTI)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        image.load()
        if image.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
            array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        else:
            array = np.asarray(image, dtype=np.float32)[None]
    return np.ascontiguousarray(array)


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
    image.header.set_xyzt_units("mm", "sec")  # the affine's units, said (viewers read them)
    if description:
        display_hints(image, volume, description)
    data: bytes = image.to_bytes()
    return data


def display_hints(image: Any, volume: np.ndarray, description: str) -> None:
    """A map's NIfTI display hints, as viewers read them (3D Slicer, ITK-SNAP, Mango, FSLeyes).

    ``cal_min``/``cal_max`` the map's finite range (0 to its maximum for a non-negative map),
    intent ``estimate`` named ``segcam map``, and ``descrip`` (at most 79 characters, cut
    between words). A header copied from the input loses the input's own hints (a CT's window
    would otherwise be the map's).
    """
    values = np.asarray(volume, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    header = image.header
    header["cal_min"], header["cal_max"] = min(low, 0.0), high
    header.set_intent("estimate", (), name="segcam map")
    if len(description) > 79:
        description = description[:76].rsplit(" ", 1)[0] + "..."
    header["descrip"] = description.encode("ascii", "replace")


def write_nifti(
    path: Path,
    volume: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
    *,
    description: str | None = None,
) -> Path:
    """Write a (I, J, K) volume as NIfTI with the given affine (and header geometry), atomically.

    ``description``: the volume is a map, written with :func:`display_hints`.
    """
    nibabel = _require("nibabel", "nifti")
    image = nibabel.Nifti1Image(np.asarray(volume, dtype=np.float32), affine, header=header)
    if header is not None:
        image.set_data_dtype(np.float32)
        image.header.set_qform(*header.get_qform(coded=True))
        image.header.set_sform(*header.get_sform(coded=True))
    else:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    if description is not None:
        display_hints(image, volume, description)
    with atomic_write(path) as stream:
        stream.write(image.to_bytes() if not path.name.endswith(".gz") else _gzip(image.to_bytes()))
    return path


def _gzip(data: bytes) -> bytes:
    import gzip

    # Level 1: float maps shrink to within 3% of level 6's size, about twice as fast.
    return gzip.compress(data, compresslevel=1, mtime=0)
