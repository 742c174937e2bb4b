"""Pixel sets of every target kind, and the largest connected component against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

import segcam
from segcam import errors
from segcam.pixel_sets import largest_component
from segcam.testing import HandNet, tiny_segnet
from small_nets import LAYER, X, explain

LOGITS = torch.tensor(
    [
        [[[2.0, 0.0], [0.0, 1.0]], [[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [5.0, 0.5]]],
        [[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]],
    ]
)  # (N=2, K=3, 2, 2)


def test_predicted():
    expected = torch.tensor([[[False, True], [False, False]], [[True, False], [True, True]]])
    assert torch.equal(segcam.Predicted(1).pixel_set(LOGITS), expected)


def test_probability_softmax_and_sigmoid():
    probabilities = torch.softmax(LOGITS, dim=1)[:, 2]
    assert torch.equal(segcam.Probability(2, 0.6).pixel_set(LOGITS), probabilities > 0.6)
    single = torch.tensor([[[[-1.0, 0.2], [3.0, 0.0]]]])
    assert torch.equal(
        segcam.Probability(1, 0.5).pixel_set(single), torch.tensor([[[False, True], [True, False]]])
    )
    # class 0 of a one-channel output: p = 1 - sigmoid(y)
    assert torch.equal(
        segcam.Probability(0, 0.5).pixel_set(single),
        torch.tensor([[[True, False], [False, False]]]),
    )


def test_pixel_box_all():
    assert segcam.Pixel(0, (1, 0)).pixel_set(LOGITS).nonzero().tolist() == [[0, 1, 0], [1, 1, 0]]
    per_sample = segcam.Pixel(0, [(0, 1), (1, 1)]).pixel_set(LOGITS)
    assert per_sample.nonzero().tolist() == [[0, 0, 1], [1, 1, 1]]
    box = segcam.Box(0, [slice(0, 1), (0, 2)]).pixel_set(LOGITS)
    assert box.nonzero().tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]
    assert segcam.AllPixels(2).pixel_set(LOGITS).all()


def test_mask_layouts():
    mask = np.array([[1, 0], [0, 1]])
    broadcast = segcam.Mask(0, mask)
    from segcam.pixel_sets import as_pixel_set

    as_set = as_pixel_set(broadcast.pixel_set(LOGITS), LOGITS, "m")
    assert as_set.shape == (2, 2, 2) and torch.equal(as_set[0], as_set[1])
    per_sample = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    per_sample[1, 0, 1, 0] = True
    got = as_pixel_set(segcam.Mask(0, per_sample).pixel_set(LOGITS), LOGITS, "m")
    assert got.nonzero().tolist() == [[1, 1, 0]]


def _scipy_largest(mask):
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(1, 7, 9), (3, 12, 12), (2, 5, 6, 7)]),
    density=st.floats(0.2, 0.8),
)
def test_largest_component_matches_scipy(seed, shape, density):
    mask = np.random.default_rng(seed).random(shape) < density
    ours = largest_component(torch.from_numpy(mask)).numpy()
    for n in range(shape[0]):
        expected = _scipy_largest(mask[n])
        # Equal sizes can tie: then both must be components of the same, largest size.
        assert ours[n].sum() == expected.sum()
        labels, _ = ndimage.label(mask[n])
        chosen = np.unique(labels[ours[n]])
        assert len(chosen) == (1 if expected.any() else 0)
        if expected.any():
            assert np.array_equal(ours[n], labels == chosen[0])


def test_largest_component_serpentine():
    # One long winding path plus a small island: spreading alone needs ~path-length steps.
    mask = np.zeros((1, 15, 15), dtype=bool)
    mask[0, ::2, :-1] = True
    mask[0, 1::4, -2] = True
    mask[0, 3::4, 0] = True
    mask[0, 0, -1] = True  # island in the corner, not touching row 0's path (ends at -2)
    mask[0, 1, -1] = False
    mask[0, 0, -2] = False
    ours = largest_component(torch.from_numpy(mask))[0].numpy()
    expected = _scipy_largest(mask[0])
    assert expected.sum() > 100
    assert np.array_equal(ours, expected)


def test_region_default_is_largest_predicted_component():
    logits = torch.full((1, 2, 5, 5), 0.0)
    logits[0, 1, 0, 0] = 1.0  # a one-pixel island
    logits[0, 1, 2:5, 2:5] = 1.0  # a 3x3 block
    region = segcam.Region(1).pixel_set(logits)
    assert int(region.sum()) == 9 and bool(region[0, 3, 3])
    given_mask = torch.zeros(5, 5, dtype=torch.bool)
    given_mask[0, :2] = True
    assert int(segcam.Region(0, given_mask).pixel_set(logits).sum()) == 2


class RowTarget:
    """A user target that does not inherit from segcam.Target: the protocol is enough."""

    class_index = 1

    def __init__(self, row):
        self.row = row

    def pixel_set(self, logits):
        result = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.bool)
        result[:, self.row] = True
        return result


def test_user_defined_target():
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 0.0]]]])
    expl = segcam.explain(HandNet(), x, RowTarget(0), "act", relu=False, upsample=False)
    torch.testing.assert_close(expl.maps[0, 0], torch.tensor([[3.0, 6.0], [0.0, 0.0]]))


@pytest.mark.parametrize("classes", [2, 3, 8, 9, 20])
def test_predicted_equals_argmax_with_ties(classes):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randint(-2, 3, (2, classes, 5, 6, 7), generator=generator).float()  # many ties
    for c in range(classes):
        expected = logits.argmax(dim=1) == c
        assert torch.equal(segcam.Predicted(c).pixel_set(logits), expected)


def test_mask_on_another_device_is_moved_or_refused():
    mask = torch.zeros(64, 64, dtype=torch.bool, device="meta")
    with pytest.raises(errors.TargetError, match="cannot move the mask from meta"):
        explain(X, segcam.Mask(1, mask), LAYER)


@pytest.mark.parametrize("targets", [None, 3, "predicted"])
def test_targets_that_are_not_targets(targets):
    with pytest.raises(errors.TargetError, match="targets must be a target or a sequence"):
        explain(X, targets, LAYER)


def test_pixel_index_as_a_tensor():
    by_tensor = explain(X, segcam.Pixel(1, torch.tensor([5, 6])), LAYER)
    by_tuple = explain(X, segcam.Pixel(1, (5, 6)), LAYER)
    torch.testing.assert_close(by_tensor.maps, by_tuple.maps)
    per_sample = explain(X, segcam.Pixel(1, torch.tensor([[5, 6], [7, 8]])), LAYER)
    assert per_sample.pixel_sets[0, 0, 5, 6] and per_sample.pixel_sets[1, 0, 7, 8]


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (segcam.Pixel(1, (2.7, 3.9)), "coordinates must be integers; got 2.7"),
        (segcam.Box(1, [(0.5, 10), (0, 10)]), "coordinates must be integers; got 0.5"),
        (segcam.Box(1, [slice(0, 1000), (0, 10)]), r"\(0, 1000\) on axis 0 lie outside 0..64"),
        (segcam.Box(1, [(0, 100), (0, 10)]), r"\(0, 100\) on axis 0 lie outside 0..64"),
        (segcam.Box(1, [(10, 5), (0, 10)]), "start > stop"),
        (segcam.Box(1, [slice(-10, None), (0, 10)]), "lie outside"),
    ],
)
def test_coordinates_are_integers_and_boxes_follow_one_rule(target, pattern):
    with pytest.raises(errors.TargetError, match=pattern):
        explain(X, target, LAYER)


def test_box_with_open_slice_ends():
    open_ended = explain(X, segcam.Box(1, [slice(None, 10), slice(50, None)]), LAYER)
    explicit = explain(X, segcam.Box(1, [(0, 10), (50, 64)]), LAYER)
    torch.testing.assert_close(open_ended.maps, explicit.maps)


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (segcam.Probability(1, "0.5"), r"threshold must be a number in \[0, 1\); got '0.5'"),
        (segcam.Mask(1, "mask.npy"), r"the mask is a file name \('mask.npy'\), not an array"),
        (segcam.Mask(1, np.full((16, 16), "a")), "not a numeric or bool array"),
    ],
)
def test_wrong_kinds_of_values_are_one_target_error(target, pattern):
    # these raised TypeError from deep inside before (issue 22)
    model, x = tiny_segnet(2).eval(), torch.rand(1, 1, 16, 16)
    with pytest.raises(errors.TargetError, match=pattern):
        segcam.explain(model, x, target, "body.3")


def test_a_pixel_given_as_zero_dimensional_tensors_is_one_pixel():
    model, x = tiny_segnet(2).eval(), torch.rand(2, 1, 16, 16)
    zero_d = segcam.Pixel(1, [torch.tensor(5), torch.tensor(6)])
    as_tensors = segcam.explain(model, x, zero_d, "body.3")
    plain = segcam.explain(model, x, segcam.Pixel(1, (5, 6)), "body.3")
    assert torch.equal(as_tensors.pixel_sets, plain.pixel_sets)
    assert int(as_tensors.pixel_sets.sum()) == 2
    rows = segcam.Pixel(1, [torch.tensor([5, 6]), (1, 2)])  # one index per sample
    per_sample = segcam.explain(model, x, rows, "body.3").pixel_sets
    assert bool(per_sample[0, 0, 5, 6]) and bool(per_sample[1, 0, 1, 2])
    assert int(per_sample.sum()) == 2


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ([(np.int64(0), np.int64(8)), (0, 8)], [[0, 8], [0, 8]]),
        ([slice(torch.tensor(0), torch.tensor(8)), (torch.tensor(0), 8)], [[0, 8], [0, 8]]),
        ([slice(None, np.int32(8)), slice(0, None)], [[None, 8], [0, None]]),
    ],
)
def test_a_box_with_numpy_or_tensor_bounds_saves_and_reads_back(tmp_path, bounds, expected):
    model = tiny_segnet(spatial_dims=2).eval()
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    given = segcam.explain(model, x, segcam.Box(1, bounds), "body.3")
    plain = segcam.explain(model, x, segcam.Box(1, [(0, 8), (0, 8)]), "body.3")
    torch.testing.assert_close(given.maps, plain.maps, rtol=0, atol=0)
    given.save(tmp_path / "box.npz")  # was "Object of type int64/Tensor is not JSON serializable"
    assert segcam.load(tmp_path / "box.npz").targets[0].description["slices"] == expected
