"""Closed forms and equivalences of the further gradient CAMs (issue 6, first part)."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam.testing import HeadNet

RAW = {"relu": False, "upsample": False, "normalize": None}


def _setup(seed, spatial_dims):
    net = HeadNet(spatial_dims, in_channels=2, features=5, num_classes=3, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    spatial = (6, 7) if spatial_dims == 2 else (3, 5, 4)
    x = torch.randn((2, 2, *spatial), generator=generator)
    mask = torch.rand((2, *spatial), generator=generator) > 0.5
    with torch.no_grad():
        features = net.body(x)  # A, the head's input (post-ReLU)
    return net, x, mask, features


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_cam_closed_form(spatial_dims, seed):
    net, x, mask, features = _setup(seed, spatial_dims)
    weights = net.head.weight.detach().flatten(1)  # (classes, features)
    expl = segcam.explain(net, x, segcam.Mask(1, mask), "body", "seg-layer-cam", **RAW)
    positive = weights[1].clamp_min(0).view(1, -1, *[1] * spatial_dims)
    expected = (positive * features).sum(1) * mask
    torch.testing.assert_close(expl.maps[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert (weights[1] < 0).any()  # so the ReLU on the gradient matters in this case
    hires = segcam.explain(net, x, segcam.Mask(1, mask), "body", **RAW)
    assert not torch.allclose(expl.maps, hires.maps)


def test_layer_cam_equals_hires_for_non_negative_gradients():
    net, x, mask, _ = _setup(0, 2)
    with torch.no_grad():
        net.head.weight.abs_()
    target = segcam.Mask(2, mask)
    layer = segcam.explain(net, x, target, "body", "seg-layer-cam", **RAW)
    hires = segcam.explain(net, x, target, "body", **RAW)
    torch.testing.assert_close(layer.maps, hires.maps)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_xgrad_cam_closed_form_and_the_cam_case(spatial_dims, seed):
    net, x, mask, features = _setup(seed, spatial_dims)
    weights = net.head.weight.detach().flatten(1)
    axes = tuple(range(2, features.ndim))
    inside = (features * mask.unsqueeze(1)).sum(axes)  # sum over M of A_k, (N, C)
    total = features.sum(axes)
    alpha = torch.where(total != 0, weights[0] * inside / torch.where(total != 0, total, 1), 0)
    expected = (alpha.view(*alpha.shape, *[1] * spatial_dims) * features).sum(1)
    expl = segcam.explain(net, x, segcam.Mask(0, mask), "body", "seg-xgrad-cam", **RAW)
    torch.testing.assert_close(expl.maps[:, 0], expected, rtol=1e-5, atol=1e-6)
    # M = all pixels: the CAM case, where XGrad-CAM and Grad-CAM coincide (Fu et al.)
    every = segcam.AllPixels(0)
    xgrad = segcam.explain(net, x, every, "body", "seg-xgrad-cam", **RAW)
    grad = segcam.explain(net, x, every, "body", "seg-grad-cam", **RAW)
    torch.testing.assert_close(xgrad.maps, grad.maps, rtol=1e-5, atol=1e-6)


def test_xgrad_cam_zero_channel_gets_zero_weight():
    activation = torch.zeros(1, 2, 3, 3)
    activation[0, 1] = 1.0
    gradient = torch.ones(1, 2, 3, 3)
    from segcam.methods.gradient import seg_xgrad_cam

    result = seg_xgrad_cam(activation, gradient)
    torch.testing.assert_close(result, torch.ones(1, 3, 3))  # channel 0 contributes nothing
    assert torch.isfinite(result).all()


def test_cli_and_registry_list_the_new_methods(capsys):
    from segcam.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "seg-layer-cam" in out and "seg-xgrad-cam" in out and "BMVC 2020" in out
