"""Sliding-window explanations against explain() and a brute-force autograd reference."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

import segcam
from segcam.errors import InputError
from segcam.methods import REGISTRY
from segcam.sliding import window_slices
from segcam.testing import HeadNet

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
RAW = {"relu": False, "upsample": False}
GRADIENT_METHODS = [name for name, m in REGISTRY.items() if m.needs_gradient]


def _unet(dims, seed=0):
    torch.manual_seed(seed)
    return UNet(dims, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval().double()


def _reference(model, x, target_class, mask, layer, roi, overlap, mode, placement):
    """Differentiate MONAI's own blended output; place each window's HiRes map and add them."""
    spatial = tuple(x.shape[2:])
    store = []

    def hook(_module, _inputs, output):
        output.retain_grad()
        store.append(output)

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        blended = sliding_window_inference(x, roi, 1, model, overlap=overlap, mode=mode)
    finally:
        handle.remove()
    (blended[:, target_class] * mask).sum().backward()
    windows = window_slices(spatial, roi, overlap)
    batch = x.shape[0]
    grid = tuple(store[0].shape[2:])
    factors = [r // g for r, g in zip(roi, grid, strict=True)]
    size = (
        spatial
        if placement == "input"
        else tuple(s // f for s, f in zip(spatial, factors, strict=True))
    )
    result = torch.zeros((batch, *size), dtype=x.dtype)
    for index, activation in enumerate(store):  # MONAI: sample-major, then windows in order
        n, window = divmod(index, len(windows))[0], windows[index % len(windows)]
        gradient = activation.grad if activation.grad is not None else torch.zeros_like(activation)
        window_map = (gradient * activation.detach()).sum(1)
        if placement == "input":
            window_map = torch.nn.functional.interpolate(
                window_map[:, None], size=roi, mode="trilinear" if len(roi) == 3 else "bilinear"
            )[:, 0]
            where = window
        else:
            where = tuple(
                slice(w.start // f, w.stop // f) for w, f in zip(window, factors, strict=True)
            )
        result[(n, *where)] += window_map[0]
    return result, blended.detach()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_one_window_equals_explain(dims, method):
    model = _unet(dims)
    size = (16, 16) if dims == 2 else (16, 16, 16)
    x = torch.randn((2, 1, *size), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = [segcam.Predicted(1), segcam.Box(2, [(2, 9)] * dims)]
    whole = segcam.explain(model, x, targets, "model.1.submodule", method, **RAW)
    windowed = segcam.explain_sliding_window(
        model, x, targets, "model.1.submodule", size, method=method, **RAW
    )
    torch.testing.assert_close(windowed.maps, whole.maps)
    torch.testing.assert_close(windowed.logits, whole.logits)
    assert windowed.info["sliding_window"]["windows"] == 1


@pytest.mark.parametrize(
    ("dims", "size", "roi", "layer", "placement"),
    [
        (3, (24, 20, 28), (16, 16, 16), "model.1.submodule", "layer"),
        (3, (22, 19, 26), (16, 12, 16), "model.1.submodule.1", "input"),  # starts off the stride
        (2, (40, 36), (16, 16), "model.1.submodule", "layer"),
        (2, (37, 30), (16, 20), "model.1.submodule", "input"),
    ],
)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("static", [True, False])
def test_equals_brute_force_through_monai(dims, size, roi, layer, placement, mode, static):
    model = _unet(dims, seed=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((2, 1, *size), generator=generator, dtype=torch.float64)
    overlap = 0.25 if mode == "gaussian" else 0.5
    if static:
        mask = torch.rand((2, *size), generator=generator) > 0.6
        target = segcam.Mask(1, mask)
    else:
        with torch.no_grad():
            prediction = sliding_window_inference(x, roi, 1, model, overlap=overlap, mode=mode)
        mask = prediction.argmax(1) == 1
        target = segcam.Predicted(1)
    expected, blended = _reference(model, x.clone(), 1, mask, layer, roi, overlap, mode, placement)
    ours = segcam.explain_sliding_window(
        model, x, target, layer, roi, overlap=overlap, mode=mode, sw_batch_size=3, **RAW
    )
    info = ours.info["sliding_window"]
    assert info["placement"] == {layer: placement}
    torch.testing.assert_close(ours.logits, blended, rtol=1e-10, atol=1e-10)
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((ours.maps[:, 0] - expected).abs().max()) <= 1e-5 * scale
    assert torch.equal(ours.pixel_sets[:, 0], mask)


def test_windows_outside_the_pixel_set_are_skipped(monkeypatch):
    model = _unet(3)
    x = torch.randn((1, 1, 40, 24, 24), generator=torch.Generator().manual_seed(4)).double()
    windows = window_slices((40, 24, 24), (16, 16, 16), 0.25)
    assert len(windows) == 3 * 2 * 2
    corner = torch.zeros((40, 24, 24), dtype=torch.bool)
    corner[:3, :3, :3] = True  # only the first window holds it
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    small = segcam.explain_sliding_window(model, x, segcam.Mask(1, corner), "model.1.submodule", 16)
    info = small.info["sliding_window"]
    assert (info["windows_backward"], info["windows_skipped"], len(calls)) == (1, 11, 1)
    calls.clear()
    full = segcam.explain_sliding_window(model, x, segcam.AllPixels(1), "model.1.submodule", 16)
    assert full.info["sliding_window"]["windows_skipped"] == 0 and len(calls) == 12
    # the blended prediction is whole either way
    with torch.no_grad():
        blended = sliding_window_inference(x, (16, 16, 16), 1, model, overlap=0.25, mode="gaussian")
    torch.testing.assert_close(small.logits, blended)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_head_closed_form_over_the_whole_volume(mode):
    # The layer feeding a 1x1 head: HiRes = (Y^c - b_c) 1[M] on the blended logits Y.
    net = HeadNet(3, features=5, seed=6).double().eval()
    x = torch.randn(
        (1, 1, 12, 20, 18), generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    mask = torch.zeros((12, 20, 18), dtype=torch.bool)
    mask[2:10, 5:17, 3:15] = True
    expl = segcam.explain_sliding_window(
        net, x, segcam.Mask(2, mask), "body", (8, 8, 8), mode=mode, overlap=0.5, **RAW
    )
    bias = float(net.head.bias[2].detach())
    torch.testing.assert_close(expl.maps[0, 0], (expl.logits[0, 2] - bias) * mask)


def test_batching_windows_changes_nothing_and_errors():
    model = _unet(2)
    x = torch.randn((1, 1, 40, 40), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    one = segcam.explain_sliding_window(model, x, segcam.Predicted(1), "model.1.submodule", 16)
    many = segcam.explain_sliding_window(
        model, x, segcam.Predicted(1), "model.1.submodule", 16, sw_batch_size=5
    )
    torch.testing.assert_close(one.maps, many.maps)
    with pytest.raises(ValueError, match="gradient-free"):
        segcam.explain_sliding_window(
            model, x, segcam.Predicted(1), "model.1.submodule", 16, method="seg-score-cam"
        )
    with pytest.raises(InputError, match=r"roi_size \(48, 48\) is larger than the input"):
        segcam.explain_sliding_window(model, x, segcam.Predicted(1), "model.1.submodule", 48)
    with pytest.raises(InputError, match="roi_size must be"):
        segcam.explain_sliding_window(model, x, segcam.Predicted(1), "model.1.submodule", (16,))


def test_a_predicted_set_reuses_the_prediction_s_kept_forwards():
    """Predicted reads the blended logits: its windows' forwards are kept from the prediction
    pass (within keep_bytes), so each window runs once; without a budget, twice; same maps."""
    model = _unet(3, seed=8)
    x = torch.randn((1, 1, 40, 24, 24), generator=torch.Generator().manual_seed(8)).double()
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        runs = {}
        for budget in (2**31, 0, "one"):
            calls.clear()
            keep = budget
            if budget == "one":  # room for the first group's forward only
                from segcam.kept import KeepBudget, KeptWindows

                probe = KeptWindows(KeepBudget())
                probe.record(0, model, x[..., :16, :16, :16], "model.1.submodule")
                keep = probe.last_size
                probe.close()
                calls.clear()
            runs[budget] = segcam.explain_sliding_window_methods(
                model, x, [segcam.Predicted(1), segcam.Predicted(2)], "model.1.submodule", 16,
                ["seg-hires-grad-cam", "seg-grad-cam"], sw_batch_size=1, keep_bytes=keep, **RAW,
            )  # fmt: skip
            runs[budget, "forwards"] = len(calls)
    finally:
        handle.remove()
    assert runs[2**31, "forwards"] == 12  # 12 windows, each run once
    assert runs[0, "forwards"] == 24  # a prediction pass, then a recorded forward per window
    assert runs["one", "forwards"] == 23  # the first window kept, the others run twice
    for budget in (0, "one"):
        for method in ("seg-hires-grad-cam", "seg-grad-cam"):
            torch.testing.assert_close(runs[budget][method].maps, runs[2**31][method].maps)
            torch.testing.assert_close(runs[budget][method].logits, runs[2**31][method].logits)
    with torch.no_grad():
        blended = sliding_window_inference(x, (16, 16, 16), 1, model, overlap=0.25, mode="gaussian")
    assert torch.equal(runs[2**31]["seg-hires-grad-cam"].logits, blended)  # the same numbers


def test_kept_forwards_equal_a_second_forward_for_batches_groups_and_layers():
    model = _unet(3, seed=9)
    x = torch.randn((2, 1, 24, 20, 28), generator=torch.Generator().manual_seed(9)).double()
    layers = ["model.1.submodule", "model.1.submodule.1"]
    targets = [segcam.Predicted(1), segcam.Region(2)]
    methods = ["seg-hires-grad-cam", "seg-grad-cam"]
    runs = {}
    for keep in (0, 2**31):
        runs[keep] = segcam.explain_sliding_window_methods(
            model, x, targets, layers, 16, methods, sw_batch_size=3, overlap=0.5,
            keep_bytes=keep, **RAW,
        )  # fmt: skip

    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        for layer in layers:
            kept, fresh = runs[2**31][method].layer_maps[layer], runs[0][method].layer_maps[layer]
            assert float(fresh.abs().max()) > 0
            torch.testing.assert_close(kept, fresh, rtol=1e-12, atol=1e-12)
        assert torch.equal(runs[2**31][method].pixel_sets, runs[0][method].pixel_sets)
