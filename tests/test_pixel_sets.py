"""segcam.pixel_sets: masks and label maps read as the pixel sets users mean (issue 22)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segcam
from segcam import errors
from segcam.pixel_sets import mask_values_as_set
from segcam.testing import tiny_segnet

LABELS = np.array([[0, 1, 1, 2], [2, 2, 0, 3], [0, 0, 1, 2]])  # background, liver, tumour, other


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_label_map_gives_the_pixels_of_the_class(as_tensor):
    values = torch.from_numpy(LABELS) if as_tensor else LABELS
    for label in (1, 2, 3):
        got = np.asarray(mask_values_as_set(values, label, "m"))
        np.testing.assert_array_equal(got, label == LABELS)
    region = np.asarray(mask_values_as_set(values, [1, 2], "m"))  # a region of two labels
    np.testing.assert_array_equal(region, np.isin(LABELS, [1, 2]))
    as_float = np.asarray(mask_values_as_set(LABELS.astype(np.float32), 2, "m"))  # NIfTI reads
    np.testing.assert_array_equal(as_float, LABELS == 2)


@pytest.mark.parametrize(
    "mask", [LABELS == 2, (LABELS == 2).astype(np.uint8), (LABELS == 2).astype(np.uint8) * 255]
)
def test_a_mask_gives_its_pixels_whatever_value_marks_them(mask):
    # bool, 0/1 and 0/255 (as image editors save masks) alike, for any class
    for label in (0, 1, 2, 7):
        np.testing.assert_array_equal(np.asarray(mask_values_as_set(mask, label, "m")), LABELS == 2)


def test_values_that_are_not_labels_are_left_to_the_mask_check():
    soft = np.tile([[0.0, 0.4], [1.0, 0.9]], (4, 4))
    np.testing.assert_array_equal(mask_values_as_set(soft, 1, "m"), soft)  # left as it is
    model, x = tiny_segnet(2).eval(), torch.rand(1, 1, 8, 8)
    with pytest.raises(errors.TargetError, match="mask values must be bool or 0/1"):
        segcam.explain(model, x, segcam.Mask(1, soft), "body.3")
    with pytest.raises(errors.TargetError, match="mask values must be bool or 0/1"):
        segcam.explain(model, x, segcam.Mask(1, np.tile([[-1, 2], [0, 1]], (4, 4))), "body.3")


def test_mask_of_a_label_map_explains_the_class_pixels():
    model, x = tiny_segnet(2).eval(), torch.rand(1, 1, 8, 8)
    labels = np.tile(LABELS, (3, 2))[:8, :8]
    from_labels = segcam.explain(model, x, segcam.Mask(2, labels), "body.3")
    from_mask = segcam.explain(model, x, segcam.Mask(2, labels == 2), "body.3")
    assert torch.equal(from_labels.pixel_sets, from_mask.pixel_sets)
    torch.testing.assert_close(from_labels.maps, from_mask.maps, rtol=0, atol=0)


def test_a_class_out_of_range_names_the_single_channel_rule_only_for_one_channel():
    from segcam.pixel_sets import check_class_index

    with pytest.raises(errors.ClassIndexError) as two_channels:
        check_class_index(2, torch.zeros(1, 2, 4, 4))
    assert "single-channel" not in str(two_channels.value)
    with pytest.raises(errors.ClassIndexError, match=r"single-channel output: 1 = the logit"):
        check_class_index(2, torch.zeros(1, 1, 4, 4))


def test_a_class_index_may_be_a_0_d_integer_tensor_as_pixel_and_box_coordinates_are():
    model = tiny_segnet(spatial_dims=2).eval()
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    given = segcam.explain(model, x, segcam.Predicted(torch.tensor(1)), "body.3")
    plain = segcam.explain(model, x, segcam.Predicted(1), "body.3")
    torch.testing.assert_close(given.maps, plain.maps, rtol=0, atol=0)
    with pytest.raises(errors.ClassIndexError, match="must be an int"):
        segcam.explain(model, x, segcam.Predicted(torch.tensor(1.0)), "body.3")
