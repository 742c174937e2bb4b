"""segcam.apps.batch.run: a batch goes on past bad inputs on every backend; one folder, one set of
settings; --out inside an input folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_runs import EXPLAIN, LAYER, MODEL, one_line, run
from PIL import Image

from segcam.apps.batch import RUN_FILE
from segcam.testing.synthetic import shapes_scene


@pytest.fixture
def folder_with_a_bad_input(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for seed in range(3):
        image, _ = shapes_scene(1_000_020 + seed)
        np.save(folder / f"good{seed}.npy", image[0])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "rgb.png")  # 3 channels
    np.save(folder / "odd.npy", np.zeros((60, 60), np.float32))  # the model itself fails
    return folder


@pytest.mark.parametrize(
    "backend", [["--num-workers", "1"], ["--num-workers", "2"], ["--backend", "ray"]]
)
def test_a_batch_goes_on_past_bad_inputs(folder_with_a_bad_input, tmp_path, capsys, backend):
    out = tmp_path / "out"
    code = run("explain", folder_with_a_bad_input, *EXPLAIN, *backend, "--out", out)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "2 of 5 inputs failed" in err
    assert "rgb.png: the input (1, 3, 64, 64) does not fit the model" in err
    assert "odd.npy: the model failed on the input (1, 1, 60, 60)" in err
    done = sorted(p.parent.name for p in out.rglob("manifest.json"))
    assert done == ["good0", "good1", "good2"]


def test_another_target_into_the_same_folder_is_refused(scene, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run("explain", scene, *MODEL, "--target", "all:2", "--layer", LAYER, "--out", out) == 2
    one_line(
        capsys,
        "holds results of 1 input made with other settings (targets: ['all:1'] -> ['all:2'])",
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_out_inside_the_input_folder_is_not_read_as_input(tmp_path, capsys):
    inputs = tmp_path / "images"
    inputs.mkdir()
    image, _ = shapes_scene(1_000_040)
    Image.fromarray((image[0] * 255).astype(np.uint8)).save(inputs / "scan.png")
    out = inputs / "maps"
    for _ in range(2):
        assert run("explain", inputs, *EXPLAIN, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["scan"]


def _two_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(2):
        image, _ = shapes_scene(1_000_060 + seed)
        np.save(folder / f"v{seed}.npy", image[0])
    return folder / "v0.npy", folder / "v1.npy"


def _settings_of(out):
    recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    manifests = {
        m.parent.name: json.loads(m.read_text(encoding="utf-8"))
        for m in out.glob("*/manifest.json")
    }
    return recorded, manifests


def test_overwrite_on_a_subset_removes_the_old_setting_for_every_input(tmp_path, capsys):
    v0, v1 = _two_inputs(tmp_path)
    out = tmp_path / "out"
    a = [*MODEL, "--target", "all:1", "--layer", LAYER]
    b = [*MODEL, "--target", "all:2", "--layer", LAYER]
    assert run("explain", v0, v1, *a, "--out", out) == 0
    capsys.readouterr()
    assert run("explain", v0, *b, "--overwrite", "--out", out) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the results of 2 inputs made with other settings" in err
    recorded, manifests = _settings_of(out)
    assert recorded["targets"] == ["all:2"] and sorted(manifests) == ["v0"]
    assert not (out / "v1").exists()  # v1's results of A are gone, folder and all
    for saved in manifests.values():
        assert all(saved[key] == value for key, value in recorded.items())
    assert run("explain", v1, *b, "--out", out) == 0  # the folder's settings: never refused
    assert sorted(_settings_of(out)[1]) == ["v0", "v1"]


def test_a_failed_first_run_does_not_claim_the_folder(tmp_path, capsys):
    v0, _ = _two_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()  # the user's folder: kept, whatever happens
    bad = np.zeros((60, 60), np.float32)  # the model fails on it
    np.save(tmp_path / "odd.npy", bad)
    assert run("explain", tmp_path / "odd.npy", *EXPLAIN, "--out", out) == 2
    assert out.is_dir() and not (out / "odd").exists()  # no empty folder for the failed input
    capsys.readouterr()
    assert run("explain", v0, *MODEL, "--target", "all:2", "--layer", LAYER, "--out", out) == 0
    assert _settings_of(out)[0]["targets"] == ["all:2"]


def test_a_run_that_made_its_folder_and_failed_removes_it(tmp_path, capsys):
    np.save(tmp_path / "odd.npy", np.zeros((60, 60), np.float32))
    out = tmp_path / "new" / "out"
    assert run("explain", tmp_path / "odd.npy", *EXPLAIN, "--out", out) == 2
    assert not (tmp_path / "new").exists()


def test_a_missing_weights_file_is_one_line(scene, tmp_path, capsys):
    code = run("explain", scene, "--model", "segcam.apps.demo.models:build_demo_model",
               "--weights", tmp_path / "nonexistent.pt", "--target", "all:1", "--layer", LAYER,
               "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_line(capsys, "nonexistent.pt: no such file")


def test_a_misspelt_layer_is_the_batch_s_one_error_not_one_per_input(tmp_path, capsys):
    v0, _ = _two_inputs(tmp_path)
    code = run("explain", v0.parent, *MODEL, "--target", "all:1", "--layer", "model.9",
               "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_line(capsys, "model.9", "segcam layers")  # the command line's hint
    assert not (tmp_path / "out").exists()


def test_a_window_that_is_empty_is_a_usage_error(tmp_path, capsys):
    v0, _ = _two_inputs(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run("explain", v0.parent, *EXPLAIN, "--window", "0,0", "--out", tmp_path / "out")
    assert stopped.value.code == 2
    assert "'0,0': HIGH must exceed LOW" in capsys.readouterr().err


def test_a_newline_in_an_input_name_stays_on_its_report_line(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    image, _ = shapes_scene(1_000_070)
    np.save(folder / "two\nlines.npy", image[0])
    np.save(folder / "odd.npy", np.zeros((60, 60), np.float32))  # fails: its line is printed too
    assert run("explain", folder, *EXPLAIN, "--out", tmp_path / "out") == 1
    lines = capsys.readouterr().err.splitlines()
    assert any("two\\nlines.npy: 2 files in" in line for line in lines), lines
    assert not any(line.startswith("lines.npy") for line in lines)


def test_the_output_folder_as_the_input_is_said_so(tmp_path, capsys):
    v0, _ = _two_inputs(tmp_path)
    assert run("explain", v0.parent, *EXPLAIN, "--out", v0.parent) == 2
    one_line(capsys, "is the output folder (--out) as well as an input")


def test_the_same_weights_by_another_path_are_the_folder_s_settings(tmp_path, capsys, monkeypatch):
    v0, v1 = _two_inputs(tmp_path)
    out = tmp_path / "out"
    from cli_runs import WEIGHTS

    model = ["--model", "segcam.apps.demo.models:build_demo_model", "--target", "all:1",
             "--layer", LAYER]  # fmt: skip
    assert run("explain", v0, *model, "--weights", WEIGHTS, "--out", out) == 0
    monkeypatch.chdir(WEIGHTS.parent)
    assert run("explain", v1, *model, "--weights", WEIGHTS.name, "--out", out) == 0
    assert len(list(out.glob("*/manifest.json"))) == 2
