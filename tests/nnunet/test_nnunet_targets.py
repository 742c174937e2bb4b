"""segcam.nnunet.targets: label files read with the plans' reader, as users mean them (issue 22)."""

from __future__ import annotations

import numpy as np
import pytest

import segcam

pytest.importorskip("nnunetv2")
import SimpleITK as sitk  # noqa: N813

from segcam import nnunet
from segcam.nnunet.targets import resolve_targets
from segcam.testing.nnunet import make_model_folder


def test_a_label_file_gives_the_class_s_voxels_and_file_equals_label_that_value(tmp_path):
    model = nnunet.load(make_model_folder(tmp_path / "m"))  # classes background, liver, tumour
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:4, 1:5, 1:6] = 1  # liver
    labels[2:3, 2:4, 2:4] = 2  # a tumour inside it
    path = tmp_path / "truth.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    tumour, liver, by_value = resolve_targets(
        model,
        [segcam.Mask("tumour", str(path)), segcam.Mask("liver", str(path)),
         segcam.Mask("liver", f"{path}=2")],
    )  # fmt: skip
    np.testing.assert_array_equal(tumour.mask, labels == 2)  # not every labelled voxel
    np.testing.assert_array_equal(liver.mask, labels == 1)
    np.testing.assert_array_equal(by_value.mask, labels == 2)
    with pytest.raises(segcam.errors.TargetError, match="no such label file"):
        resolve_targets(model, [segcam.Mask("liver", f"{tmp_path / 'absent.nii.gz'}=1")])
