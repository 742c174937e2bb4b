"""Medical volumes for the tests: an oblique image, a DICOM series written slice by slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

ANGLE = 0.3
OBLIQUE = (
    np.cos(ANGLE),
    -np.sin(ANGLE),
    0.0,
    np.sin(ANGLE) * 0.8,
    np.cos(ANGLE) * 0.8,
    -0.6,
    np.sin(ANGLE) * 0.6,
    np.cos(ANGLE) * 0.6,
    0.8,
)  # fmt: skip  (orthonormal: a rotation about z, then a tilt about x)


def oblique_image(volume_kji: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(volume_kji)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    image.SetDirection(OBLIQUE)
    return image


def write_series(
    folder: Path, volume_kji: np.ndarray, uid: str, *, tilt_slice: int = -1, frame_of_reference=True
) -> None:
    """A CT series written slice by slice with its geometry (SimpleITK's documented recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = oblique_image(volume_kji.astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0037": "1\\0\\0\\0\\1\\0" if k == tilt_slice else orientation,
            "0020|0032": "\\".join(str(v) for v in position),
            "0020|0013": str(k),
            "0008|0018": f"{uid}.{k + 1}",
            "0018|0050": str(image.GetSpacing()[2]),
        }
        if frame_of_reference:  # as every CT series has one
            tags["0020|0052"] = f"{uid}.0"
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(plane)


VOLUME = np.random.default_rng(0).integers(-1000, 1500, size=(6, 10, 12))  # (k, j, i), in HU
