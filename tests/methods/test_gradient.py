"""segcam.methods.gradient: closed forms at a layer feeding a 1x1 head, limits, loops and
peers of the gradient CAMs."""

from __future__ import annotations

import pytest
import torch

import segcam
from head_nets import RAW, head_setup
from segcam import errors
from segcam.testing import HeadNet
from small_nets import LAYER, X, explain


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_cam_closed_form(spatial_dims, seed):
    net, x, mask, features = head_setup(seed, spatial_dims)
    weights = net.head.weight.detach().flatten(1)  # (classes, features)
    expl = segcam.explain(net, x, segcam.Mask(1, mask), "body", "seg-layer-cam", **RAW)
    positive = weights[1].clamp_min(0).view(1, -1, *[1] * spatial_dims)
    expected = (positive * features).sum(1) * mask
    torch.testing.assert_close(expl.maps[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert (weights[1] < 0).any()  # so the ReLU on the gradient matters in this case
    hires = segcam.explain(net, x, segcam.Mask(1, mask), "body", **RAW)
    assert not torch.allclose(expl.maps, hires.maps)


def test_layer_cam_equals_hires_for_non_negative_gradients():
    net, x, mask, _ = head_setup(0, 2)
    with torch.no_grad():
        net.head.weight.abs_()
    target = segcam.Mask(2, mask)
    layer = segcam.explain(net, x, target, "body", "seg-layer-cam", **RAW)
    hires = segcam.explain(net, x, target, "body", **RAW)
    torch.testing.assert_close(layer.maps, hires.maps)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_xgrad_cam_closed_form_and_the_cam_case(spatial_dims, seed):
    net, x, mask, features = head_setup(seed, spatial_dims)
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


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grad_cam_plus_plus_closed_form(spatial_dims, seed):
    # At the head's input G_k = w_ck * 1[M]: a = w^2 / (2 w^2 + w^3 S_k) on M (S_k = sum_p A_k),
    # so w_k = |M| * ReLU(w_ck) * w_ck^2 / (2 w_ck^2 + w_ck^3 S_k).
    net, x, mask, _ = head_setup(seed, spatial_dims)
    net, x = net.double(), x.double()
    with torch.no_grad():
        features = net.body(x)
    w = net.head.weight.detach().flatten(1)[2]
    expl = segcam.explain(net, x, segcam.Mask(2, mask), "body", "seg-grad-cam++", **RAW)
    for n in range(x.shape[0]):
        sums = features[n].flatten(1).sum(1)
        weights = mask[n].sum() * w.clamp_min(0) * w**2 / (2 * w**2 + w**3 * sums)
        expected = torch.einsum("c,c...->...", weights, features[n])
        torch.testing.assert_close(expl.maps[n, 0], expected, rtol=1e-10, atol=1e-12)


def test_grad_cam_plus_plus_is_grad_cam_shaped_when_gradients_are_one_positive_constant():
    # G = g > 0 everywhere (M = all, single class channel with positive weights): a = 1 / (2 +
    # g S_k), so each channel weight is P g / (2 + g S_k), not Grad-CAM's mean g: a different
    # but closed-form reweighting of the same channels.
    net = HeadNet(2, in_channels=1, features=3, num_classes=1, seed=4).double().eval()
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1))
    x = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    expl = segcam.explain(net, x, segcam.AllPixels(1), "body", "seg-grad-cam++", **RAW)
    with torch.no_grad():
        features = net.body(x)[0]
    g = net.head.weight.detach().flatten()
    weights = 30 * g / (2 + g * features.flatten(1).sum(1))
    torch.testing.assert_close(expl.maps[0, 0], torch.einsum("c,c...->...", weights, features))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_xres_cam_limits(spatial_dims):
    net, x, mask, _ = head_setup(3, spatial_dims)
    targets = [segcam.Mask(1, mask), segcam.Box(0, [(0, 2)] * spatial_dims)]
    hires = segcam.explain(net, x, targets, "body.1", **RAW)
    one = segcam.explain(
        net, x, targets, "body.1", "seg-xres-cam", **RAW, method_options={"pool_size": 1}
    )
    torch.testing.assert_close(one.maps, hires.maps)
    grid = tuple(x.shape[2:])
    whole = segcam.explain(
        net,
        x,
        targets,
        "body.1",
        "seg-xres-cam",
        **RAW,
        method_options={"pool_size": grid, "pool": "mean"},
    )
    grad = segcam.explain(net, x, targets, "body.1", "seg-grad-cam", **RAW)
    torch.testing.assert_close(whole.maps, grad.maps, rtol=1e-5, atol=1e-6)
    assert whole.method_options == {"pool_size": grid, "pool": "mean"}


def _block_reduce(values, sizes, reduce):
    """Each position takes its block's max or mean (blocks from the origin; edge blocks partial)."""
    import itertools

    result = torch.empty_like(values)
    starts = [range(0, extent, size) for extent, size in zip(values.shape, sizes, strict=True)]
    for corner in itertools.product(*starts):
        block = tuple(slice(c, c + s) for c, s in zip(corner, sizes, strict=True))
        result[block] = values[block].max() if reduce == "max" else values[block].mean()
    return result


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize(("spatial", "pool_size"), [((7, 5), 2), ((6, 9), (3, 4)), ((3, 5, 4), 2)])
def test_xres_cam_blocks_against_loops(pool, spatial, pool_size):
    generator = torch.Generator().manual_seed(5)
    activation = torch.randn((2, 3, *spatial), generator=generator, dtype=torch.float64)
    gradient = torch.randn((2, 3, *spatial), generator=generator, dtype=torch.float64)
    from segcam.methods.gradient import seg_xres_cam

    ours = seg_xres_cam(activation, gradient, pool_size=pool_size, pool=pool)
    sizes = (pool_size,) * len(spatial) if isinstance(pool_size, int) else pool_size
    expected = torch.zeros((2, *spatial), dtype=torch.float64)
    for n in range(2):
        for k in range(3):
            expected[n] += _block_reduce(gradient[n, k], sizes, pool) * activation[n, k]
    torch.testing.assert_close(ours, expected)


def test_grad_cam_plus_plus_weights_agree_with_pytorch_grad_cam():
    # Their denominator has + 1e-6; with gradients of order 1 that is far below rounding.
    from harness import import_pytorch_grad_cam

    import_pytorch_grad_cam()
    from pytorch_grad_cam import GradCAMPlusPlus

    from segcam.methods.gradient import seg_grad_cam_plus_plus

    generator = torch.Generator().manual_seed(11)
    activation = torch.rand((2, 5, 6, 7), generator=generator, dtype=torch.float64)
    gradient = torch.randn((2, 5, 6, 7), generator=generator, dtype=torch.float64)
    weights = GradCAMPlusPlus.get_cam_weights(
        None, None, None, None, activation.numpy(), gradient.numpy()
    )
    expected = torch.einsum("nc,nc...->n...", torch.from_numpy(weights), activation)
    torch.testing.assert_close(
        seg_grad_cam_plus_plus(activation, gradient), expected, rtol=1e-5, atol=1e-8
    )


def test_pool_size_true_is_refused():
    with pytest.raises(errors.OptionError, match="pool_size must be a positive int"):
        explain(X, segcam.AllPixels(1), LAYER, "seg-xres-cam", method_options={"pool_size": True})
