"""Closed forms, equivalences, loops and peers of the further CAMs (issue 6)."""

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
    from segcam.apps.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "seg-layer-cam" in out and "seg-xgrad-cam" in out and "BMVC 2020" in out


# ------------------------------------------------------------------ Grad-CAM++


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grad_cam_plus_plus_closed_form(spatial_dims, seed):
    # At the head's input G_k = w_ck * 1[M]: a = w^2 / (2 w^2 + w^3 S_k) on M (S_k = sum_p A_k),
    # so w_k = |M| * ReLU(w_ck) * w_ck^2 / (2 w_ck^2 + w_ck^3 S_k).
    net, x, mask, _ = _setup(seed, spatial_dims)
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


# ------------------------------------------------------------------ Seg-XRes-CAM


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_xres_cam_limits(spatial_dims):
    net, x, mask, _ = _setup(3, spatial_dims)
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


def test_method_options_are_checked():
    net, x, mask, _ = _setup(0, 2)
    with pytest.raises(ValueError, match=r"no option 'pool_sise'.*pool_size, pool"):
        segcam.explain(
            net, x, segcam.Mask(1, mask), "body", "seg-xres-cam", method_options={"pool_sise": 2}
        )
    with pytest.raises(ValueError, match="pool must be 'max' or 'mean'"):
        segcam.explain(
            net, x, segcam.Mask(1, mask), "body", "seg-xres-cam", method_options={"pool": "median"}
        )
    with pytest.raises(ValueError, match="pool_size must be"):
        segcam.explain(
            net,
            x,
            segcam.Mask(1, mask),
            "body",
            "seg-xres-cam",
            method_options={"pool_size": (2, 2, 2)},
        )
    with pytest.raises(ValueError, match=r"has no option 'batch_size'.*none"):
        segcam.explain(
            net,
            x,
            segcam.Mask(1, mask),
            "body",
            "seg-hires-grad-cam",
            method_options={"batch_size": 2},
        )


# ------------------------------------------------------------------ Seg-Eigen-CAM


def test_eigen_cam_agrees_with_pytorch_grad_cam_up_to_sign():
    from conftest import import_pytorch_grad_cam

    import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    net, x, mask, features = _setup(6, 2)
    expl = segcam.explain(net, x, segcam.Mask(1, mask), "body", "seg-eigen-cam", **RAW)
    theirs = torch.from_numpy(get_2d_projection(features.numpy()))
    for n in range(x.shape[0]):
        ours = expl.maps[n, 0]
        sign = 1.0 if float((ours * theirs[n]).sum()) >= 0 else -1.0
        torch.testing.assert_close(ours, sign * theirs[n], rtol=1e-4, atol=1e-5)


def test_eigen_cam_sign_follows_the_target():
    net, x, _, _ = _setup(7, 2)
    first = torch.zeros((2, *x.shape[2:]), dtype=torch.bool)
    first[:, :3] = True
    targets = [
        segcam.Mask(0, first),
        segcam.Mask(0, ~first),
        segcam.AllPixels(2),
        segcam.Mask(1, torch.zeros_like(first)),
    ]
    with pytest.warns(segcam.errors.SegCamWarning, match="empty pixel set"):
        expl = segcam.explain(net, x, targets, "body", "seg-eigen-cam", **RAW)
    maps = expl.maps
    for n in range(2):
        # the pixel set lies on the high side of its map (the map is centred: mean 0)
        assert maps[n, 0][first[n]].mean() > 0 and maps[n, 1][~first[n]].mean() > 0
        torch.testing.assert_close(maps[n, 0], -maps[n, 1])  # complementary sets: flipped
        assert maps[n, 2].max() >= -maps[n, 2].min()  # M = all: the peak is positive
        assert torch.equal(maps[n, 3], torch.zeros_like(maps[n, 3]))  # empty: zero map
        torch.testing.assert_close(maps[n, 2].abs(), maps[n, 0].abs())  # one projection


# ------------------------------------------------------------------ Seg-Score-CAM


def test_score_cam_agrees_with_pytorch_grad_cam():
    # A full-resolution layer, so both skip the up-sampling (theirs uses align_corners=True).
    from conftest import import_pytorch_grad_cam

    import_pytorch_grad_cam()
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net, x, mask, _ = _setup(8, 2)
    net, x = net.double(), x.double()
    x = x[:1]
    cam = ScoreCAM(model=net, target_layers=[net.body])
    cam.batch_size = 4
    small = mask[0] & (torch.arange(x.shape[-1]) < 3)  # a small M keeps the softmax soft
    theirs = cam(input_tensor=x, targets=[SemanticSegmentationTarget(1, small.double().numpy())])
    ours = segcam.explain(
        net, x, segcam.Mask(1, small), "body", "seg-score-cam", normalize="minmax"
    )
    torch.testing.assert_close(
        ours.maps[0, 0], torch.from_numpy(theirs[0]).double(), rtol=1e-4, atol=1e-4
    )
    raw = segcam.explain(net, x, segcam.Mask(1, small), "body", "seg-score-cam", **RAW)
    weights = torch.softmax(raw.maps.new_tensor(_masked_scores(net, x, small)), dim=0)
    with torch.no_grad():
        features = net.body(x)[0]
    assert 0.05 < float(weights.max()) < 0.99  # soft: every channel counts
    torch.testing.assert_close(raw.maps[0, 0], torch.einsum("k,k...->...", weights, features))


def _masked_scores(net, x, mask):
    with torch.no_grad():
        features = net.body(x)[0]
        scores = []
        for channel in features:
            span = channel.max() - channel.min()
            unit = (channel - channel.min()) / span if span > 0 else torch.zeros_like(channel)
            scores.append(float(net(x * unit)[0, 1][mask].sum()))
    return scores


def test_score_cam_batching_and_channel_cap():
    net, x, mask, _ = _setup(9, 3)
    net, x = net.double(), x.double()
    with torch.no_grad():
        features = net.body(x)
    targets = [segcam.Mask(1, mask), segcam.Predicted(2)]
    one = segcam.explain(
        net, x, targets, "body", "seg-score-cam", **RAW, method_options={"batch_size": 1}
    )
    many = segcam.explain(
        net, x, targets, "body", "seg-score-cam", **RAW, method_options={"batch_size": 64}
    )
    torch.testing.assert_close(one.maps, many.maps)
    capped = segcam.explain(
        net,
        x,
        segcam.Mask(1, mask),
        "body",
        "seg-score-cam",
        **RAW,
        method_options={"max_channels": 2},
    )
    for n in range(x.shape[0]):
        spread = features[n].flatten(1).amax(1) - features[n].flatten(1).amin(1)
        keep = torch.argsort(spread, descending=True, stable=True)[:2]
        sub = features[n, keep]
        scores = []
        with torch.no_grad():
            for channel in sub:
                unit = (channel - channel.min()) / (channel.max() - channel.min())
                scores.append(float(net(x[n : n + 1] * unit)[0, 1][mask[n]].sum()))
        weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
        torch.testing.assert_close(capped.maps[n, 0], torch.einsum("k,k...->...", weights, sub))
    with pytest.raises(ValueError, match="max_channels must be"):
        segcam.explain(net, x, targets, "body", "seg-score-cam", method_options={"max_channels": 0})


def test_gradient_free_methods_take_no_backward_pass(monkeypatch):
    net, x, mask, _ = _setup(0, 2)
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    for method in ("seg-eigen-cam", "seg-score-cam"):
        segcam.explain(net, x, segcam.Mask(1, mask), "body", method)
    assert calls == []
    segcam.explain(net, x, segcam.Mask(1, mask), "body", "seg-grad-cam++")
    assert calls == [1]


def test_methods_in_the_registry_have_kinds_and_options():
    from segcam.methods import REGISTRY

    kinds = {name: method.kind for name, method in REGISTRY.items()}
    assert kinds["seg-eigen-cam"] == "activation" and kinds["seg-score-cam"] == "model"
    assert {n for n, k in kinds.items() if k == "gradient"} >= {
        "seg-hires-grad-cam",
        "seg-grad-cam",
        "seg-layer-cam",
        "seg-xgrad-cam",
        "seg-grad-cam++",
        "seg-xres-cam",
    }
    assert REGISTRY["seg-xres-cam"].options == {"pool_size": 2, "pool": "max"}
    assert REGISTRY["seg-score-cam"].options == {"batch_size": 32, "max_channels": None}


# ------------------------------------------------------------------ fusion


def test_fusion_rules_on_hand_maps():
    from segcam.explanation import Explanation

    low = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])  # (1, 1, 2, 2), max 2
    high = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])  # max 4
    zero = torch.zeros_like(low)
    expl = Explanation(
        layer_maps={"a": low, "b": high, "c": zero},
        logits=torch.zeros(1, 2, 2, 2),
        pixel_sets=torch.ones(1, 1, 2, 2, dtype=torch.bool),
        targets=(segcam.AllPixels(1),),
        method="seg-hires-grad-cam",
        relu=False,
        upsampled=True,
        normalize=None,
        layer_shapes={},
    )
    unit_low = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    unit_high = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(
        expl.fused("layercam")[0, 0],
        torch.maximum(torch.tanh(2 * unit_low), torch.tanh(2 * unit_high)),
    )
    torch.testing.assert_close(
        segcam.fuse_layers(expl, "layercam", gamma=1.0)[0, 0],
        torch.maximum(torch.tanh(unit_low), torch.tanh(unit_high)),
    )
    torch.testing.assert_close(expl.fused("max")[0, 0], torch.maximum(unit_low, unit_high))
    torch.testing.assert_close(expl.fused("mean")[0, 0], (unit_low + unit_high) / 3)
    with pytest.raises(ValueError, match="rule must be one of"):
        expl.fused("sum")


def test_fusion_of_layers_at_different_resolutions():
    net = HeadNet(2, features=3, seed=1, downsample=True).eval()
    x = torch.randn(2, 1, 8, 8)
    expl = segcam.explain(net, x, segcam.Predicted(1), ["body.1", "body"], upsample=False)
    assert expl.layer_maps["body.1"].shape[-2:] == (4, 4)
    fused = expl.fused("max")
    assert fused.shape == (2, 1, 8, 8)
    up = segcam.explain(net, x, segcam.Predicted(1), ["body.1", "body"], normalize="max")
    torch.testing.assert_close(fused, torch.maximum(*up.layer_maps.values()))


def test_grad_cam_plus_plus_weights_agree_with_pytorch_grad_cam():
    # Their denominator has + 1e-6; with gradients of order 1 that is far below rounding.
    from conftest import import_pytorch_grad_cam

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
