"""Closed forms and hand-computed values on the fixed-weight nets of segcam.testing."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam.testing import HandNet, HeadNet

RAW = {"relu": False, "upsample": False, "normalize": None}

# x for the hand-worked examples: Z = (x, -x) at "conv", A = (relu(x), relu(-x)) at "act".
X2D = torch.tensor([[[[1.0, 2.0], [-1.0, 0.0]]]])
COLUMN0 = torch.tensor([[True, False], [True, False]])


def test_hand_computed_hires_at_activation():
    # y^1 = 3 A_0 - A_1 - 0.5, so with M = all pixels L = y^1 + 0.5 = 3 relu(x) - relu(-x).
    expl = segcam.explain(HandNet(), X2D, [segcam.AllPixels(1), segcam.AllPixels(0)], "act", **RAW)
    assert expl.maps.shape == (1, 2, 2, 2)
    torch.testing.assert_close(expl.maps[0, 0], torch.tensor([[3.0, 6.0], [-1.0, 0.0]]))
    # y^0 = A_0 + 2 A_1 + 0.5: L = relu(x) + 2 relu(-x)
    torch.testing.assert_close(expl.maps[0, 1], torch.tensor([[1.0, 2.0], [2.0, 0.0]]))


def test_hand_computed_hires_through_relu():
    # At "conv" the gradient carries relu'(Z) (0 at Z = 0), and relu'(z) z = relu(z):
    # L(p) = sum_k w_1k relu(Z_k(p)) 1[M], restricted to column 0.
    expl = segcam.explain(HandNet(), X2D, segcam.Mask(1, COLUMN0), "conv", **RAW)
    torch.testing.assert_close(expl.maps[0, 0], torch.tensor([[3.0, 0.0], [-1.0, 0.0]]))


def test_hand_computed_seg_grad():
    # alpha_0 = mean_p 3 * relu'(x) * 1[M] = 3 * 1/4 (only (0,0) has x > 0 inside M),
    # alpha_1 = mean_p (-1) * relu'(-x) * 1[M] = -1/4 (only (1,0) has x < 0 inside M);
    # L = 0.75 x - 0.25 (-x) = x.
    expl = segcam.explain(HandNet(), X2D, segcam.Mask(1, COLUMN0), "conv", "seg-grad-cam", **RAW)
    torch.testing.assert_close(expl.maps[0, 0], X2D[0, 0])


def test_hand_computed_single_channel_classes():
    # One logit y = 3 A_0 - A_1 - 0.5; class 1 is y, class 0 is -y.
    net = HandNet(num_classes=1)
    expl = segcam.explain(net, X2D, [segcam.AllPixels(1), segcam.AllPixels(0)], "act", **RAW)
    torch.testing.assert_close(expl.maps[0, 0], torch.tensor([[3.0, 6.0], [-1.0, 0.0]]))
    torch.testing.assert_close(expl.maps[0, 1], -torch.tensor([[3.0, 6.0], [-1.0, 0.0]]))
    # Predicted(1) = {y > 0} = {(0,0), (0,1)} (y = 2.5, 5.5, -1.5, -0.5)
    predicted = segcam.explain(net, X2D, segcam.Predicted(1), "act", **RAW)
    torch.testing.assert_close(predicted.maps[0, 0], torch.tensor([[3.0, 6.0], [0.0, 0.0]]))


def test_hand_computed_3d():
    # The same numbers on a 2-slice volume; the second slice is -x.
    x3d = torch.stack([X2D[0, 0], -X2D[0, 0]])[None, None]
    expl = segcam.explain(HandNet(3), x3d, segcam.AllPixels(1), "act", **RAW)
    expected = torch.tensor([[[3.0, 6.0], [-1.0, 0.0]], [[-1.0, -2.0], [3.0, 0.0]]])
    torch.testing.assert_close(expl.maps[0, 0], expected)
    grad = segcam.explain(HandNet(3), x3d, segcam.AllPixels(1), "act", "seg-grad-cam", **RAW)
    # M = all: the gradient w_1k is constant in space, so Seg-Grad equals HiRes.
    torch.testing.assert_close(grad.maps, expl.maps)


def _masks(spatial, batch, generator):
    masks = torch.rand((batch, *spatial), generator=generator) > 0.6
    masks[0] = False
    masks[0].view(-1)[3] = True  # a single pixel
    return masks


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_feeding_1x1_head(spatial_dims, seed):
    generator = torch.Generator().manual_seed(seed)
    net = HeadNet(spatial_dims, in_channels=2, features=5, num_classes=3, seed=seed).eval()
    spatial = (6, 7) if spatial_dims == 2 else (3, 5, 4)
    x = torch.randn((3, 2, *spatial), generator=generator)
    masks = _masks(spatial, 3, generator)
    targets = [segcam.Mask(c, masks) for c in range(3)] + [segcam.AllPixels(2)]
    hires = segcam.explain(net, x, targets, "body", **RAW)
    grad = segcam.explain(net, x, targets, "body", "seg-grad-cam", **RAW)
    with torch.no_grad():
        logits = net(x)
    bias = net.head.bias.detach()
    positions = masks[0].numel()
    for t, target in enumerate(targets):
        c = target.class_index
        region = target.pixel_set(logits).expand_as(masks).float()
        centred = logits[:, c] - bias[c]
        torch.testing.assert_close(hires.maps[:, t], centred * region, rtol=1e-5, atol=1e-6)
        share = region.flatten(1).sum(1) / positions
        expected = share.view(-1, *[1] * spatial_dims) * centred
        torch.testing.assert_close(grad.maps[:, t], expected, rtol=1e-5, atol=1e-6)
    # M = all pixels: the two methods coincide.
    torch.testing.assert_close(grad.maps[:, 3], hires.maps[:, 3], rtol=1e-5, atol=1e-6)


def test_several_layers_one_call_match_single_calls():
    net = HeadNet(2, seed=3, downsample=True).eval()
    x = torch.randn(2, 1, 8, 8)
    targets = [segcam.Predicted(0), segcam.Box(2, [(1, 5), (2, 8)])]
    layers = ["body.1", "body", "head"]
    both = segcam.explain(net, x, targets, layers, **RAW)
    assert both.layers == tuple(layers)
    for name in layers:
        single = segcam.explain(net, x, targets, name, **RAW)
        torch.testing.assert_close(both.layer_maps[name], single.maps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer_maps"):
        _ = both.maps
