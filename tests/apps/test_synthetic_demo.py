"""The demo runs end to end, and its committed network really segments held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import segcam
from segcam.apps.demo.models import DEMO_LAYERS, load_demo_model
from segcam.apps.demo.synthetic import HELD_OUT_SEED, main
from segcam.testing.synthetic import shapes_batch, shapes_scene

LOG = Path(__file__).resolve().parents[2] / "scripts" / "train_synthetic_unet.log.json"


def test_committed_weights_segment_held_out_scenes():
    model = load_demo_model()
    images, labels = shapes_batch(range(HELD_OUT_SEED, HELD_OUT_SEED + 40))
    with torch.no_grad():
        prediction = model(torch.from_numpy(images)).argmax(1).numpy()
    for c in (1, 2):
        p, g = prediction == c, labels == c
        assert 2 * (p & g).sum() / (p.sum() + g.sum()) >= 0.97
    logged = json.loads(LOG.read_text(encoding="utf-8"))["held_out_dice"]
    assert min(logged.values()) >= 0.97


def test_scene_generator_is_seeded():
    first, second = shapes_scene(3), shapes_scene(3)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert set(np.unique(first[1])) <= {0, 1, 2}


def test_demo_writes_figure_and_maps(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "demo.png") in printed
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = segcam.load(tmp_path / "seg-hires-grad-cam.npz")
    assert loaded.layers == tuple(DEMO_LAYERS.values())
    for maps in loaded.layer_maps.values():
        assert maps.shape == (1, 3, 64, 64)
        assert float(maps.max()) == 1.0 and float(maps.min()) >= 0.0
