"""Maps a PACS shows beside their series: DICOM Parametric Maps and Segmentations (highdicom).

For a DICOM series input, a map on the series' grid is written as one multi-frame **Parametric
Map** (float32 pixels, a real-world value mapping of slope 1 in no units, a window over its
range) that references the source series: the same Study, Patient and Frame of Reference, each
frame derived from its source slice (its SOP Instance UID, position and orientation). The
pixel sets are written as one **Segmentation**, a segment per target. Both are made by
``highdicom`` (the ``[medical]`` extra), which checks them against the IOD as it builds them.

Arrays are segcam's (i, j, k) of the series (:mod:`segcam.io.medical`): slice k is the source
file ``files[k]`` and its frame is ``volume[:, :, k].T`` (rows j, columns i).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcam.errors import InputFileError, MissingExtraError
from segcam.io.medical import MedicalVolume
from segcam.io.writing import atomic_path

__all__ = ["PixelSet", "dicom_refusal", "write_parametric_map", "write_segmentation"]

MANUFACTURER = "segcam"
SERIES_NUMBER = 9100  # maps and sets sort after the scanner's own series


def _highdicom() -> Any:
    try:
        return importlib.import_module("highdicom")
    except ImportError as error:
        raise MissingExtraError(
            f"DICOM maps need highdicom: pip install 'segcam[medical]' ({error})"
        ) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segcam")
    except PackageNotFoundError:  # a source tree on the path
        return "0"


def _lo(text: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash or control characters.

    A longer text keeps its start and its end (the target and class come last): the middle
    (the layer's inner part) gives way to ``...``.
    """
    text = "".join(c if c.isprintable() else " " for c in text.replace("\\", "/")).strip()
    return text if len(text) <= 64 else text[:30].rstrip() + "..." + text[-31:].lstrip()


def dicom_refusal(like: MedicalVolume) -> str | None:
    """Why maps on ``like`` cannot be DICOM objects referencing it (None: they can)."""
    if like.format != "dicom" or not like.files:
        return "the input is not a DICOM series"
    if like.array.ndim != 4:
        return "a single DICOM slice is a 2D image"
    try:
        pydicom = importlib.import_module("pydicom")
    except ImportError:
        return "pydicom is not installed"
    first = pydicom.dcmread(like.files[0], stop_before_pixels=True)
    if "FrameOfReferenceUID" not in first:
        return "the series has no Frame of Reference UID (a PACS could not place a map on it)"
    return None


def _sources(like: MedicalVolume) -> list[Any]:
    reason = dicom_refusal(like)
    if reason is not None:
        raise InputFileError(f"DICOM maps: {reason}; write NIfTI (--map-format nifti)")
    pydicom = importlib.import_module("pydicom")
    return [pydicom.dcmread(name, stop_before_pixels=True) for name in like.files]


def _frames(volume: np.ndarray, like: MedicalVolume) -> np.ndarray:
    """(i, j, k) -> (frames k, rows j, columns i), checked against the series' grid."""
    expected = tuple(like.array.shape[1:])
    if tuple(volume.shape) != expected:
        raise InputFileError(
            f"DICOM maps: a volume of {tuple(volume.shape)} is not on the series' grid {expected}"
        )
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def _write(path: Path, dataset: Any) -> Path:
    dataset.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: class names in any script
    with atomic_path(path) as temporary:
        dataset.save_as(str(temporary), enforce_file_format=True)
    return path


def write_parametric_map(
    path: Path, volume: np.ndarray, like: MedicalVolume, *, description: str
) -> Path:
    """Write a (i, j, k) float map as a DICOM Parametric Map referencing ``like``'s series.

    ``description`` (the method, layer, class and target) is the Series Description and the
    value mapping's explanation.

    Raises:
        InputFileError: the input is no DICOM series with a Frame of Reference, or the map is
            not on its grid.
        MissingExtraError: highdicom is not installed.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources = _sources(like)
    values = _frames(np.asarray(volume, dtype=np.float32), like)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    low = min(low, 0.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="segcam",
        lut_explanation=_lo(description),
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1,
        intercept=0,
    )
    window = hd.VOILUTTransformation(  # LINEAR_EXACT: a window narrower than 1 is allowed
        window_center=(low + high) / 2,
        window_width=max(high - low, 1e-6),
        voi_lut_function="LINEAR_EXACT",
    )
    parametric_map = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=values,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="segcam",
        software_versions=_version(),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
        content_label="SEGCAM_MAP",
        content_description=_lo(description),
        series_description=_lo(description),
    )
    return _write(path, parametric_map)


@dataclass(frozen=True)
class PixelSet:
    """One target's pixel set for a Segmentation: its label, its (i, j, k) mask, its origin."""

    label: str
    mask: np.ndarray
    predicted: bool  # the model's own prediction (automatic), else the user's (manual)


def write_segmentation(
    path: Path,
    sets: Sequence[PixelSet],
    like: MedicalVolume,
    *,
    description: str = "segcam pixel sets",
) -> Path | None:
    """Write the targets' pixel sets as one DICOM Segmentation (a segment per non-empty set).

    Returns None when every set is empty (a Segmentation needs a segment).
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    kept = [s for s in sets if bool(np.asarray(s.mask).any())]
    if not kept:
        return None
    sources = _sources(like)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="segcam", family=codes.cid7162.ArtificialIntelligence, version=_version()
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(item.label),
            segmented_property_category=codes.cid7150.SpatialAndRelationalConcept,
            segmented_property_type=codes.DCM.ImageRegion,
            algorithm_type=(
                hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
                if item.predicted
                else hd.seg.SegmentAlgorithmTypeValues.MANUAL
            ),
            algorithm_identification=algorithm if item.predicted else None,
        )
        for number, item in enumerate(kept, 1)
    ]
    pixels = np.stack([_frames(np.asarray(s.mask, dtype=bool), like) for s in kept], axis=-1)
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER + 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="segcam",
        software_versions=_version(),
        device_serial_number="0",
        content_label="SEGCAM_SETS",
        content_description=_lo(description),
        series_description=_lo(description),
    )
    return _write(path, segmentation)
