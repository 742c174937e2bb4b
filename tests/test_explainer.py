"""The re-targeting Explainer: same maps as explain, graph kept, then freed for good."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import segcam
from references import assert_close_scaled, reference_maps
from segcam import errors
from segcam.explainer import GraphTooLargeError
from segcam.testing import tiny_segnet
from small_nets import LAYER, UNET, Counting, X

LAYERS = ["model.1.submodule", "model.2"]


def _model():
    torch.manual_seed(3)
    return UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def _target_sets(batch):
    generator = torch.Generator().manual_seed(0)
    return [
        [segcam.Predicted(1)],
        [segcam.Box(2, [(2, 20), (4, 30)]), segcam.AllPixels(0)],
        [
            segcam.Mask(1, torch.rand(batch, 32, 32, generator=generator) > 0.5),
            segcam.Pixel(2, (5, 7)),
        ],
    ]


@pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
def test_retargets_equal_explain_and_the_reference():
    # float64: Grad-CAM++, XGrad-CAM and Score-CAM magnify float32 rounding (test_reference.py)
    model = _model().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with segcam.Explainer(model, LAYERS, relu=False, upsample=False) as explainer:
        logits = explainer.forward(x)
        assert not logits.requires_grad and explainer.graph_bytes > 0
        for targets in _target_sets(2) * 2:  # and again: the graph survives every request
            for method in segcam.list_methods():
                ours = explainer.explain(targets, method)
                expected = segcam.explain(
                    model, x, targets, LAYERS, method, relu=False, upsample=False
                )
                reference = reference_maps(model, x, targets, LAYERS)
                for layer in LAYERS:
                    torch.testing.assert_close(ours.layer_maps[layer], expected.layer_maps[layer])
                    assert_close_scaled(ours.layer_maps[layer], reference[method, layer])


def test_postprocessing_defaults_and_overrides():
    model = tiny_segnet(2)
    x = torch.randn(1, 1, 8, 8)
    explainer = segcam.Explainer(model, "body.1", normalize="max")
    explainer.forward(x)
    default = explainer.explain(segcam.AllPixels(1))
    assert default.maps.shape == (1, 1, 8, 8) and float(default.maps.max()) == 1.0
    raw = explainer.explain(segcam.AllPixels(1), relu=False, upsample=False, normalize=None)
    torch.testing.assert_close(
        raw.maps,
        segcam.explain(model, x, segcam.AllPixels(1), "body.1", relu=False, upsample=False).maps,
    )
    explainer.close()


class Probe(nn.Module):
    """Multiplies by a parameter: autograd saves the intermediate, which nothing else holds."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.watched = []

    def forward(self, x):
        intermediate = x + 1.0
        self.watched.append(weakref.ref(intermediate))
        return intermediate * self.scale


def _probed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Probe(), nn.Conv2d(4, 3, 1)).eval()


def _alive(model):
    gc.collect()
    return [reference() is not None for reference in model[1].watched]


def test_close_frees_the_graph():
    model = _probed()
    explainer = segcam.Explainer(model, "0")
    explainer.forward(torch.randn(2, 1, 8, 8))
    explainer.explain(segcam.AllPixels(1))
    explainer.explain(segcam.AllPixels(2))
    assert _alive(model) == [True]  # kept for the next request
    explainer.close()
    assert _alive(model) == [False]
    with pytest.raises(RuntimeError, match="call forward"):
        explainer.explain(segcam.AllPixels(1))
    segcam.explain(model, torch.randn(2, 1, 8, 8), segcam.AllPixels(1), "0")
    assert _alive(model) == [False, False]  # explain frees its graph on return


def test_a_new_forward_frees_the_old_graph_and_the_context_manager_closes():
    model = _probed()
    with segcam.Explainer(model, "0") as explainer:
        explainer.forward(torch.randn(1, 1, 8, 8))
        explainer.forward(torch.randn(1, 1, 8, 8))
        assert _alive(model) == [False, True]
    assert _alive(model) == [False, False]
    for module in model.modules():
        assert not module._forward_hooks  # nothing left on the model


def test_graph_budget():
    model = tiny_segnet(2)
    explainer = segcam.Explainer(model, "body.0", max_graph_bytes=1000)
    with pytest.raises(GraphTooLargeError, match="over max_graph_bytes"):
        explainer.forward(torch.randn(4, 1, 32, 32))
    with pytest.raises(RuntimeError, match="call forward"):
        explainer.explain(segcam.AllPixels(1))
    roomy = segcam.Explainer(model, "body.0", max_graph_bytes=10**8)
    roomy.forward(torch.randn(4, 1, 32, 32))
    assert 1000 < roomy.graph_bytes < 10**8
    roomy.close()
    assert roomy.graph_bytes == 0


def test_explain_methods_shares_one_backward_per_target(monkeypatch):
    model = _model().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    targets = [segcam.Predicted(1), segcam.Box(2, [(2, 20), (4, 30)])]
    methods = ["seg-grad-cam", "seg-hires-grad-cam", "seg-grad-cam++", "seg-eigen-cam"]
    with segcam.Explainer(model, LAYERS, relu=False, upsample=False) as explainer:
        explainer.forward(x)
        calls = []
        original = torch.autograd.grad
        monkeypatch.setattr(
            torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k)
        )
        together = explainer.explain_methods(targets, methods)
        assert len(calls) == len(targets)  # not one per method and target
        monkeypatch.setattr(torch.autograd, "grad", original)
        for method in methods:
            alone = explainer.explain(targets, method)
            assert together[method].method == method
            for layer in LAYERS:
                torch.testing.assert_close(
                    together[method].layer_maps[layer], alone.layer_maps[layer]
                )


def test_max_graph_bytes_is_checked_at_construction():
    model = Counting(UNET)
    with pytest.raises(errors.OptionError, match="max_graph_bytes must be None or a number"):
        segcam.Explainer(model, "model." + LAYER, max_graph_bytes="1GB")
    assert model.calls == 0


def test_explainer_keeps_a_snapshot_of_its_input():
    x = X.clone()
    explainer = segcam.Explainer(UNET, LAYER, method="seg-score-cam")
    explainer.forward(x)
    options = {"max_channels": 4}
    before = explainer.explain(segcam.AllPixels(1), method_options=options).maps
    x.mul_(0)  # the caller changes x in place after the forward
    after = explainer.explain(segcam.AllPixels(1), method_options=options).maps
    explainer.close()
    torch.testing.assert_close(after, before)
