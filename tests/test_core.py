"""Several methods requested together share the forward and backward passes, everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segcam
from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR, load_demo_model
from segcam.testing import tiny_segnet
from segcam.testing.synthetic import shapes_scene

LAYERS = ["model.1.submodule.2", "model.1.submodule.1.submodule.2"]
GRADIENT_METHODS = ["seg-hires-grad-cam", "seg-grad-cam", "seg-xres-cam"]


class Counter:
    """Counts torch.autograd.grad calls and model forwards (as seen from segcam)."""

    def __init__(self, monkeypatch, model=None):
        self.grads = 0
        self.forwards = 0
        real = torch.autograd.grad

        def counting_grad(*args, **kwargs):
            self.grads += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        if model is not None:
            model.register_forward_pre_hook(lambda *_: self._forward())

    def _forward(self):
        self.forwards += 1


def test_explain_methods_one_forward_one_backward_per_target(monkeypatch):
    model = tiny_segnet(2)
    counter = Counter(monkeypatch, model)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = [segcam.AllPixels(0), segcam.AllPixels(1), segcam.Box(2, [(0, 8), (0, 8)])]
    together = segcam.explain_methods(model, x, targets, ["body.1", "body.3"], GRADIENT_METHODS)
    assert (counter.forwards, counter.grads) == (1, 3)  # not 3 methods x 3 targets
    for method in GRADIENT_METHODS:  # the same maps as one call per method
        alone = segcam.explain(model, x, targets, ["body.1", "body.3"], method)
        for layer in ("body.1", "body.3"):
            torch.testing.assert_close(together[method].layer_maps[layer], alone.layer_maps[layer])


def test_empty_targets_take_no_backward_and_get_zero_maps(monkeypatch):
    model = tiny_segnet(2)
    counter = Counter(monkeypatch)
    empty = segcam.Mask(1, torch.zeros(16, 16, dtype=torch.bool))
    with pytest.warns(segcam.errors.SegCamWarning, match="empty pixel set"):
        maps = segcam.explain_methods(
            model,
            torch.rand(1, 1, 16, 16),
            [empty, segcam.AllPixels(2)],
            "body.3",
            GRADIENT_METHODS,
        )
    assert counter.grads == 1
    for expl in maps.values():
        assert bool((expl.maps[:, 0] == 0).all()) and bool(expl.maps[:, 1].abs().sum() > 0)


def test_gradient_free_and_gradient_methods_together(monkeypatch):
    model = tiny_segnet(2)
    counter = Counter(monkeypatch)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    both = segcam.explain_methods(
        model, x, segcam.AllPixels(1), "body.3", ["seg-eigen-cam", "seg-hires-grad-cam"]
    )
    assert counter.grads == 1  # the gradient-free method takes none
    eigen = segcam.explain(model, x, segcam.AllPixels(1), "body.3", "seg-eigen-cam")
    torch.testing.assert_close(both["seg-eigen-cam"].maps, eigen.maps)


def test_sliding_window_methods_share_each_windows_passes(monkeypatch):
    model = tiny_segnet(3, downsample=False)
    x = torch.rand(1, 1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    target = segcam.Box(1, [(0, 4), (0, 12), (0, 12)])
    separate = {
        method: segcam.explain_sliding_window(model, x, target, "body.3", (4, 8, 8), method=method)
        for method in GRADIENT_METHODS
    }
    counter = Counter(monkeypatch, model)
    together = segcam.explain_sliding_window_methods(
        model, x, target, "body.3", (4, 8, 8), GRADIENT_METHODS
    )
    windows = together["seg-grad-cam"].info["sliding_window"]["windows"]
    assert windows == 4
    assert (counter.forwards, counter.grads) == (windows, windows)  # sw_batch_size 1
    for method in GRADIENT_METHODS:
        torch.testing.assert_close(together[method].maps, separate[method].maps)
        assert together[method].info == separate[method].info


def test_cli_two_methods_two_layers_one_backward_per_target(tmp_path, monkeypatch):
    image, _ = shapes_scene(1_000_003)
    path = tmp_path / "scene.npy"
    np.save(path, image)
    counter = Counter(monkeypatch)
    status = main(
        [
            "explain",
            str(path),
            "--model",
            "segcam.apps.demo.models:build_demo_model",
            "--weights",
            str(WEIGHTS_DIR / "synthetic_unet2d.pt"),
            "--target",
            "all:1",
            "--target",
            "all:2",
            *[part for layer in LAYERS for part in ("--layer", layer)],
            "--method",
            "seg-hires-grad-cam",
            "--method",
            "seg-grad-cam",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert status == 0
    assert counter.grads == 2  # one per target: not 2 targets x 2 methods
    x = torch.from_numpy(image)[None]  # the scene is (1, H, W)
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        saved = segcam.load(tmp_path / "out" / "scene" / f"{method}.npz")
        expected = segcam.explain(
            load_demo_model(), x, [segcam.AllPixels(1), segcam.AllPixels(2)], LAYERS, method
        )
        for layer in LAYERS:
            torch.testing.assert_close(saved.layer_maps[layer], expected.layer_maps[layer])
