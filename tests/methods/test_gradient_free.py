"""segcam.methods.gradient_free: Eigen-CAM and Score-CAM against peers, their batching, and
no backward pass."""

from __future__ import annotations

import pytest
import torch

import segcam
from head_nets import RAW, head_setup


def test_eigen_cam_agrees_with_pytorch_grad_cam_up_to_sign():
    from harness import import_pytorch_grad_cam

    import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    net, x, mask, features = head_setup(6, 2)
    expl = segcam.explain(net, x, segcam.Mask(1, mask), "body", "seg-eigen-cam", **RAW)
    theirs = torch.from_numpy(get_2d_projection(features.numpy()))
    for n in range(x.shape[0]):
        ours = expl.maps[n, 0]
        sign = 1.0 if float((ours * theirs[n]).sum()) >= 0 else -1.0
        torch.testing.assert_close(ours, sign * theirs[n], rtol=1e-4, atol=1e-5)


def test_eigen_cam_sign_follows_the_target():
    net, x, _, _ = head_setup(7, 2)
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


def test_score_cam_agrees_with_pytorch_grad_cam():
    # A full-resolution layer, so both skip the up-sampling (theirs uses align_corners=True).
    from harness import import_pytorch_grad_cam

    import_pytorch_grad_cam()
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net, x, mask, _ = head_setup(8, 2)
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
    net, x, mask, _ = head_setup(9, 3)
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
    net, x, mask, _ = head_setup(0, 2)
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
