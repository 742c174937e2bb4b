"""segcam.apps.specs: the command line's targets; mask and region files read as arrays are."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import segcam
from segcam.apps.specs import parse_target, split_label
from segcam.errors import TargetError

LOGITS = torch.zeros(1, 4, 6, 5)


@settings(max_examples=40)
@given(
    labels=hnp.arrays(np.uint8, (6, 5), elements=st.integers(0, 3)),
    c=st.integers(0, 3),
    kind=st.sampled_from(["mask", "region"]),
)
def test_a_mask_file_and_the_same_array_give_one_pixel_set(tmp_path_factory, labels, c, kind):
    path = tmp_path_factory.mktemp("m") / "labels.npy"
    np.save(path, labels)
    from_file = parse_target(f"{kind}:{c}:{path}").pixel_set(LOGITS)
    target = segcam.Mask if kind == "mask" else segcam.Region
    from_array = target(c, labels).pixel_set(LOGITS)
    assert torch.equal(from_file, from_array)
    nonzero = np.unique(labels[labels != 0])
    expected = labels != 0 if nonzero.size <= 1 else labels == c  # a mask, or a label map
    if kind == "mask":
        np.testing.assert_array_equal(from_file[0].numpy(), expected)
    else:  # the largest component of that set
        assert not bool((from_file[0] & ~torch.from_numpy(expected)).any())


def test_file_equals_label_takes_the_voxels_of_that_value(tmp_path):
    labels = np.array([[0, 1, 1, 2, 2], [2, 2, 0, 1, 0]] * 3, np.uint8)
    np.save(tmp_path / "truth.npy", labels)
    logits = torch.zeros(1, 3, 6, 5)
    for c, label in ((1, 1), (2, 2), (1, 2)):
        target = parse_target(f"mask:{c}:{tmp_path / 'truth.npy'}={label}")
        np.testing.assert_array_equal(target.pixel_set(logits)[0].numpy(), labels == label)
    # the README's form: a ground truth names the tumour by its class: only the tumour
    tumour = parse_target(f"mask:tumour:{tmp_path / 'truth.npy'}", ["bg", "liver", "tumour"])
    assert int(tumour.pixel_set(logits).sum()) == int((labels == 2).sum())


def test_split_label_keeps_a_file_whose_name_holds_an_equals_sign(tmp_path):
    odd = tmp_path / "a=2"
    odd.write_bytes(b"")
    assert split_label(str(odd), "spec") == (str(odd), None)
    assert split_label(f"{tmp_path / 'b.npy'}=3", "spec") == (str(tmp_path / "b.npy"), 3)
    assert split_label("b.npy=x", "spec") == ("b.npy=x", None)


@pytest.mark.parametrize("spec", ["predicted:²", "all:٣"])
def test_unicode_digits_are_not_class_indices(spec):
    with pytest.raises(segcam.errors.TargetError, match="unknown class"):
        parse_target(spec)


@pytest.mark.parametrize("window", [(0.0, float("inf")), (float("nan"), 1.0)])
def test_apply_intensity_refuses_a_window_that_is_not_finite(window):
    from segcam.apps.specs import SpecError, apply_intensity

    with pytest.raises(SpecError, match="the bounds must be finite numbers"):
        apply_intensity(np.ones((1, 4, 4), np.float32), window=window)


@pytest.mark.parametrize("label", ["-1", "1.5", "abc", "nan"])
def test_a_label_that_is_no_label_value_says_so(tmp_path, label):
    np.save(tmp_path / "m.npy", np.eye(8, dtype=np.uint8) * 2)
    spec = f"mask:1:{tmp_path / 'm.npy'}={label}"
    with pytest.raises(TargetError, match=f"label '{re.escape(label)}' is not a label value"):
        parse_target(spec)


def test_labels_beyond_what_float32_holds_exactly_are_refused(tmp_path):
    labels = np.zeros((8, 8), np.int64)
    labels[:4] = 16_777_216
    labels[4:] = 16_777_217  # read as float32, both would be 16777216
    np.save(tmp_path / "m.npy", labels)
    with pytest.raises(TargetError, match="holds values of 16777216 or more"):
        parse_target(f"mask:1:{tmp_path / 'm.npy'}")
    with pytest.raises(TargetError, match="label 16777217 is beyond the labels"):
        parse_target(f"mask:1:{tmp_path / 'm.npy'}=16777217")
