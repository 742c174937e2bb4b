"""segcam.apps.batch.nnunet_cases: an nnU-Net model's settings hold all that makes the model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nnunetv2")

from segcam.apps.batch.nnunet_cases import spec_settings
from segcam.testing.nnunet import make_model_folder


def test_a_changed_plans_or_dataset_json_changes_the_settings(tmp_path):
    # a changed normalisation (plans.json) was "already done, skipped" (issue 22)
    folder = make_model_folder(tmp_path / "m")
    spec = {"folder": str(folder), "folds": "all"}
    before = spec_settings(spec)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] = 123.0
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    after_plans = spec_settings(spec)
    assert after_plans["plans_sha256"] != before["plans_sha256"]
    assert after_plans["checkpoint_sha256"] == before["checkpoint_sha256"]
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    dataset["labels"] = {"background": 0, "liver": 1, "lesion": 2}
    (folder / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    assert spec_settings(spec)["dataset_sha256"] != after_plans["dataset_sha256"]
