"""Reading an uploaded mask (.npy, PNG, NIfTI ``.nii`` / ``.nii.gz``) without trusting it.

Every format's header is read first and its shape checked against the input before anything is
allocated or decoded: a ``.npy`` header declaring petabytes, a PNG of a few kB that decodes to
160 megapixels, or a ``.nii.gz`` that inflates without end are refused with the reason. A NIfTI
mask must lie on the volume's own voxel grid (the same affine, to 1e-3 mm) when the volume has
one.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np

__all__ = ["read_mask"]

NIFTI_HEADER_BYTES = {348: 1, 540: 2}  # sizeof_hdr -> NIfTI version


def read_mask(
    data: bytes,
    spatial: tuple[int, ...],
    affine: np.ndarray | None,
    error: Callable[[str], Exception],
) -> np.ndarray:
    """The uploaded mask (or label map) of shape ``spatial``; ``error(message)`` to refuse.

    Its values are kept: a request's class reads them as :class:`segcam.Mask` does (a mask's
    nonzero pixels, or a label map's pixels of that class).
    """
    if data.startswith(b"\x93NUMPY"):
        array = _npy(data, spatial, error)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        array = _png(data, spatial, error)
    elif data.startswith(b"\x1f\x8b") or _nifti_version(data) is not None:
        array = _nifti(data, spatial, affine, error)
    else:
        raise error(
            "the upload must be a .npy array, a PNG image or a NIfTI volume (.nii, .nii.gz)"
        )
    if tuple(array.shape) != spatial:
        raise error(f"the uploaded mask has shape {tuple(array.shape)}; the image has {spatial}")
    if array.dtype.kind not in "biuf":  # complex values too: they are no mask or labels
        raise error(f"the uploaded mask has dtype {array.dtype}, not real numbers")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise error("the uploaded mask holds NaN or infinite values")
    if not array.any():
        raise error("the uploaded mask is empty (no pixel is set): nothing to explain")
    return np.asarray(array) if array.dtype == np.bool_ else np.asarray(array, dtype=np.float32)


def _check_shape(
    shape: tuple[int, ...], spatial: tuple[int, ...], error: Callable[[str], Exception]
) -> None:
    if tuple(shape) != spatial:
        raise error(f"the uploaded mask has shape {tuple(shape)}; the image has {spatial}")


def _npy(data: bytes, spatial: tuple[int, ...], error: Callable[[str], Exception]) -> np.ndarray:
    stream = io.BytesIO(data)
    try:  # the header first: shape and dtype are checked before any allocation
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read_header(stream)
    except (ValueError, OSError, SyntaxError) as problem:
        raise error(f"cannot read the .npy upload: {problem}") from None
    _check_shape(tuple(shape), spatial, error)
    try:
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError) as problem:
        raise error(f"cannot read the .npy upload: {problem}") from None


def _png(data: bytes, spatial: tuple[int, ...], error: Callable[[str], Exception]) -> np.ndarray:
    try:
        from PIL import Image

        with warnings.catch_warnings():  # its size is checked right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
    except Exception as problem:  # Pillow raises many types for damaged files
        raise error(f"cannot read the PNG upload: {problem}") from None
    _check_shape((height, width), spatial, error)  # before decoding (no pixel bombs)
    try:
        return np.asarray(image.convert("L"))
    except Exception as problem:  # Pillow raises many types for damaged files
        raise error(f"cannot read the PNG upload: {problem}") from None


MAX_EXTENSION_BYTES = 2**20  # NIfTI header extensions of a mask: a few kB in practice


def _nifti_version(head: bytes) -> int | None:
    if len(head) < 4:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4])
        if size in NIFTI_HEADER_BYTES:
            return NIFTI_HEADER_BYTES[size]
    return None


def _inflate(data: bytes, limit: int, error: Callable[[str], Exception]) -> bytes:
    """At most ``limit`` bytes of a gzip stream (a bomb stops there)."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, limit)
    except zlib.error as problem:
        raise error(f"cannot read the .nii.gz upload: {problem}") from None


def _nifti(
    data: bytes,
    spatial: tuple[int, ...],
    affine: np.ndarray | None,
    error: Callable[[str], Exception],
) -> np.ndarray:
    import nibabel as nib

    gzipped = data.startswith(b"\x1f\x8b")
    head = _inflate(data, 544, error) if gzipped else data[:544]
    version = _nifti_version(head)
    if version is None:
        raise error("the upload is not a NIfTI volume (no NIfTI header)")
    header_type = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    image_type = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header_bytes = 348 if version == 1 else 540
    if len(head) < header_bytes:
        raise error(
            f"the NIfTI upload is cut short: {len(head)} of its {header_bytes} header bytes"
        )
    try:
        header = header_type.from_fileobj(io.BytesIO(head))  # type: ignore[no-untyped-call]
        shape = tuple(int(s) for s in header.get_data_shape())
        offset = int(header.get_data_offset())
        itemsize = int(header.get_data_dtype().itemsize)
    except Exception as problem:  # nibabel raises many types for damaged headers
        raise error(f"cannot read the NIfTI upload's header: {problem}") from None
    while len(shape) > len(spatial) and shape[-1] == 1:
        shape = shape[:-1]
    _check_shape(shape, spatial, error)  # before the voxels are inflated
    if offset > header_bytes + MAX_EXTENSION_BYTES:
        # the voxels are what the shape needs; an offset of gigabytes would inflate gigabytes
        raise error(
            f"the NIfTI upload's voxels start at byte {offset} (vox_offset), beyond its header "
            f"and any plausible extension ({header_bytes + MAX_EXTENSION_BYTES} bytes)"
        )
    needed = offset + int(np.prod(shape)) * itemsize
    raw = _inflate(data, needed + 1, error) if gzipped else data
    if len(raw) < needed:
        raise error(f"the NIfTI upload is cut short: {len(raw)} of {needed} bytes")
    try:
        image = image_type.from_bytes(raw[:needed])
        array = np.asanyarray(image.dataobj).reshape(spatial)
    except Exception as problem:  # nibabel raises many types for damaged files
        raise error(f"cannot read the NIfTI upload: {problem}") from None
    if affine is not None and not np.allclose(image.affine, affine, atol=1e-3):
        raise error(
            "the NIfTI mask lies on another grid than the volume (its affine differs): "
            "resample it onto the volume first"
        )
    return np.asarray(array)
