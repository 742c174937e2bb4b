"""segcam.Weighted: the weighted sum of a class's logits, through every driver, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segcam
from head_nets import RAW, head_setup
from segcam.errors import TargetError


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_closed_form_at_a_layer_feeding_a_1x1_head(spatial_dims):
    """HiRes at the head's input: sum_k w_ck A_k w(v) = (y^c - b_c) w, as for a mask."""
    net, x, _, _ = head_setup(3, spatial_dims)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(x.shape[:1] + x.shape[2:], generator=generator, dtype=torch.float64)
    expl = segcam.explain(net.double(), x.double(), segcam.Weighted(2, weights), "body", **RAW)
    with torch.no_grad():
        logits = net(x.double())
    bias = net.head.bias.detach().double()[2]
    torch.testing.assert_close(expl.maps[:, 0], (logits[:, 2] - bias) * weights)
    assert torch.equal(expl.pixel_sets[:, 0], weights != 0)


def test_0_1_weights_are_the_mask_and_the_maps_are_linear_in_the_weights():
    net, x, mask, _ = head_setup(0, 2)
    net, x = net.double(), x.double()
    methods = ["seg-hires-grad-cam", "seg-grad-cam"]
    as_mask = segcam.explain_methods(net, x, segcam.Mask(1, mask), "body", methods, **RAW)
    as_weights = segcam.explain_methods(
        net, x, segcam.Weighted(1, mask.double()), "body", methods, **RAW
    )
    for method in methods:
        torch.testing.assert_close(as_weights[method].maps, as_mask[method].maps)
    generator = torch.Generator().manual_seed(2)
    a, b = (torch.rand(mask.shape, generator=generator, dtype=torch.float64) for _ in range(2))
    hires = [
        segcam.explain(net, x, segcam.Weighted(1, w), "body", **RAW).maps for w in (a, b, 2 * a - b)
    ]
    torch.testing.assert_close(hires[2], 2 * hires[0] - hires[1])  # HiRes is linear in w


def test_sliding_windows_weigh_the_logits_as_the_whole_input_does():
    net, x, _, _ = head_setup(4, 2)
    net, x = net.double(), x.double()[:1]
    weights = torch.from_numpy(np.random.default_rng(0).normal(size=x.shape[2:]))
    target = segcam.Weighted(0, weights)
    whole = segcam.explain(net, x, target, "body", relu=False)
    # one window covering the input is the whole input's explanation
    windowed = segcam.explain_sliding_window(
        net, x, target, "body", tuple(x.shape[2:]), relu=False, mode="constant"
    )
    torch.testing.assert_close(windowed.maps, whole.maps)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.full((6, 7), np.nan), "NaN or Inf"),
        (np.ones((6, 7), dtype=complex), "real numbers"),
        (np.ones((5, 7)), "weights of shape"),
    ],
)
def test_bad_weights_are_one_clear_error(weights, message):
    net, x, _, _ = head_setup(0, 2)
    with pytest.raises(TargetError, match=message):
        segcam.explain(net, x, segcam.Weighted(1, weights), "body")


def test_the_kept_forward_of_an_explainer_weighs_as_explain_does():
    net, x, _, _ = head_setup(5, 3)
    net, x = net.double(), x.double()
    weights = torch.linspace(-1, 1, int(np.prod(x.shape[2:])), dtype=torch.float64)
    target = segcam.Weighted(2, weights.reshape(x.shape[2:]))
    explainer = segcam.Explainer(net, "body", relu=False)
    explainer.forward(x)
    kept = explainer.explain([target, segcam.Mask(2, torch.ones(x.shape[2:]))])
    torch.testing.assert_close(
        kept.maps[:, :1], segcam.explain(net, x, target, "body", relu=False).maps
    )
    explainer.close()
