"""The evidence benchmark, its trained network, the bootstrap, and `segcam evaluate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import segcam
from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR, load_demo_model
from segcam.apps.evaluation import bootstrap_interval, evidence_accuracy
from segcam.testing.evidence import evidence_scene

LOG = Path(__file__).resolve().parents[2] / "scripts" / "train_evidence_unet.log.json"


def test_scenes_are_seeded_and_consistent():
    first, again = evidence_scene(11), evidence_scene(11)
    assert np.array_equal(first.image, again.image)
    for scene in (evidence_scene(seed) for seed in range(30)):
        assert not (scene.disk & scene.marker).any() and not (scene.square & scene.marker).any()
        assert not (scene.disk & scene.square).any()
        assert (scene.labels[scene.disk] == scene.disk_class).all()
        assert (scene.labels[scene.marker] == 0).all()
        # the marker's sign carries the disk's class; the disk itself does not
        marker_mean = scene.image[0][scene.marker].mean()
        assert (marker_mean > 0.5) == (scene.disk_class == 1)


def test_shipped_network_uses_the_cue():
    logged = json.loads(LOG.read_text(encoding="utf-8"))["held_out"]
    measured = evidence_accuracy(load_demo_model("evidence-2d"), count=100)
    assert measured["pixel_accuracy"] >= 0.95 and logged["pixel_accuracy"] >= 0.95
    # A network blind to the marker could only guess the disk's class (about 0.5).
    assert measured["cue_disk_class_accuracy"] >= 0.95
    assert measured["textured_square_class_accuracy"] >= 0.95


def test_bootstrap_interval():
    mean, low, high = bootstrap_interval(np.full(50, 0.3))
    assert mean == low == high == pytest.approx(0.3)
    values = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    mean, low, high = bootstrap_interval(np.append(values, np.nan))
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)  # about 2 x 1.96 sigma / sqrt(n)
    assert all(np.isnan(v) for v in bootstrap_interval(np.array([np.nan])))


def test_evaluate_writes_tables_and_plots(tmp_path):
    out = tmp_path / "reports"
    assert main(["evaluate", "--data", "evidence", "--count", "4", "--out", str(out)]) == 0
    with (out / "evidence.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    methods = len(segcam.list_methods())
    # 2 targets x (3 metrics + the chance level) x 3 layers x every registered method
    assert len(rows) == 2 * 4 * 3 * methods
    for row in rows:  # n < 4 where a map had no positive mass (energy undefined)
        low, mean, high = (float(row[key]) for key in ("low", "mean", "high"))
        assert 1 <= int(row["n"]) <= 4 and low - 1e-12 <= mean <= high + 1e-12, row
    assert (out / "evidence.png").read_bytes()[:4] == b"\x89PNG"
    records = json.loads((out / "evidence_records.json").read_text(encoding="utf-8"))
    assert len(records) == 4 * 2 * 3 * methods


def test_evaluate_a_folder_against_labels(tmp_path):
    import torch

    import segcam
    from segcam.apps.demo.models import load_demo_model
    from segcam.metrics import energy_inside
    from segcam.testing.synthetic import shapes_scene

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for seed in (1_000_008, 1_000_009):
        image, label = shapes_scene(seed)
        np.save(images / f"s{seed}.npy", image[0])
        np.save(labels / f"s{seed}.npy", label)
    weights = WEIGHTS_DIR / "synthetic_unet2d.pt"
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--data",
            str(images),
            "--labels",
            str(labels),
            "--model",
            "segcam.apps.demo.models:build_demo_model",
            "--weights",
            str(weights),
            "--layer",
            "model.1.submodule.2",
            "--classes",
            "bg,disk,square",
            "--methods",
            "seg-hires-grad-cam",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    records = json.loads((out / "images_records.json").read_text(encoding="utf-8"))
    assert {r["target"] for r in records} == {"disk", "square"}
    record = next(r for r in records if r["sample"] == "s1000008.npy" and r["target"] == "disk")
    image, label = shapes_scene(1_000_008)
    maps = segcam.explain(
        load_demo_model(), torch.from_numpy(image)[None], segcam.Predicted(1), "model.1.submodule.2"
    ).maps[:, 0]
    expected = float(energy_inside(maps, torch.from_numpy(label == 1)[None]))
    assert record["energy in ground truth"] == pytest.approx(expected, rel=1e-5)
    assert (out / "images.md").is_file() and (out / "images.png").is_file()
    assert main(["evaluate", "--data", str(images), "--out", str(out)]) == 2  # no labels/model
