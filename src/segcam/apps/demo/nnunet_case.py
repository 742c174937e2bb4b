"""The demo's held-out slab as an nnU-Net case: its image and label files, as nnU-Net reads them.

``scripts/train_nnunet.py`` wrote the training slabs of the demo CT the same way: axial slices
along the file's last axis (the array's first in SimpleITK's order), 1 mm spacing assumed, the
identity direction. The report, ``segcam view --demo nnunet`` and the viewer benchmark use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcam.apps.demo import data as liver
from segcam.io.writing import make_dir
from segcam.nnunet.files import write_map

__all__ = ["GEOMETRY", "write_heldout_case"]

GEOMETRY = {
    "sitk_stuff": {
        "spacing": (1.0, 1.0, 1.0),
        "origin": (0.0, 0.0, 0.0),
        "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    }
}


def write_heldout_case(
    case: liver.LiverCase, folder: Path, *, labels: bool = False
) -> tuple[Path, Path | None]:
    """Write ``heldout_0000.nii.gz`` (and, with ``labels``, ``heldout_truth.nii.gz``) to ``folder``.

    Returns the image file and the label file (None without ``labels``).
    """
    make_dir(folder)
    start, stop = liver.HELD_OUT_SLICES.start, liver.HELD_OUT_SLICES.stop
    # as scripts/train_nnunet.py writes cases: the axial axis is the image's z (array axis 0)
    slab = np.ascontiguousarray(case.image[:, :, start:stop].astype(np.float32).transpose(2, 1, 0))
    image = write_map(folder / "heldout_0000.nii.gz", slab, "SimpleITKIO", GEOMETRY)
    if not labels:
        return image, None
    truth = case.labels[:, :, start:stop].transpose(2, 1, 0).astype(np.float32)
    return image, write_map(folder / "heldout_truth.nii.gz", truth, "SimpleITKIO", GEOMETRY)
