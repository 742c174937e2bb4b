"""Batches: local processes and a local Ray cluster give the same files; failures and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import segcam
from segcam.apps.batch import BatchJob, explain_files
from segcam.apps.demo.models import WEIGHTS_DIR
from segcam.testing.synthetic import shapes_scene

WEIGHTS = WEIGHTS_DIR / "synthetic_unet2d.pt"
MODEL = "segcam.apps.demo.models:build_demo_model"
LAYER = "model.1.submodule.2"
JOB = BatchJob(
    model=MODEL,
    weights=str(WEIGHTS),
    targets=("predicted:1", "box:2:4,4,40,50"),
    layers=(LAYER, "model.1.submodule"),
    methods=("seg-grad-cam", "seg-hires-grad-cam"),
    intensity={"window": (-50.0, 250.0), "zscore": False, "minmax": False},
    explain={"relu": True, "upsample": True, "normalize": None, "output": None},
)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for seed in range(12):
        image, _ = shapes_scene(2_000_000 + seed)
        np.save(folder / f"scan{seed:02d}.npy", image[0] * 100.0)
    return folder


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _assert_same_outputs(first, second):
    names = [n for n in _files(first) if not n.endswith("manifest.json")]
    assert names == [n for n in _files(second) if not n.endswith("manifest.json")]
    for name in names:
        if name.endswith(".npz"):
            a, b = segcam.load(first / name), segcam.load(second / name)
            for layer in a.layers:
                np.testing.assert_allclose(a.layer_maps[layer], b.layer_maps[layer], atol=1e-6)
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_local_processes_equal_one_process(dataset, tmp_path):
    one = explain_files([dataset], JOB, tmp_path / "one")
    two = explain_files([dataset], JOB, tmp_path / "two", num_workers=2)
    assert len(one.done) == len(two.done) == 12 and not one.failed and not two.failed
    _assert_same_outputs(tmp_path / "one", tmp_path / "two")
    again = explain_files([dataset], JOB, tmp_path / "two", num_workers=2)
    assert len(again.skipped) == 12 and not again.done


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is part of dev")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray
    ray.shutdown()


def test_ray_equals_local_and_reports_a_corrupt_input(dataset, tmp_path, ray_cluster):
    (dataset / "scan99.npy").write_bytes(b"\x93NUMPY not an array")
    local = explain_files([dataset], JOB, tmp_path / "local")
    lines = []
    remote = explain_files(
        [dataset], JOB, tmp_path / "ray", backend="ray", num_workers=2, progress=lines.append
    )
    for result in (local, remote):
        assert len(result.done) == 12
        assert [p.name for p, _ in result.failed] == ["scan99.npy"]
    assert "scan99" in remote.failed[0][1] or "npy" in remote.failed[0][1]
    assert sum("FAILED" in line for line in lines) == 1 and len(lines) == 13
    _assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").rglob("*.part"))


def test_killed_ray_worker_still_completes_every_input_once(dataset, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is part of dev")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "segcam.apps.cli",
        "explain",
        str(dataset),
        "--model",
        MODEL,
        "--weights",
        str(WEIGHTS),
        "--target",
        "predicted:1",
        "--layer",
        LAYER,
        "--backend",
        "ray",
        "--num-workers",
        "2",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"},
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    while "files in" not in first and first:
        first = process.stderr.readline()
    assert "files in" in first, first
    workers = subprocess.run(
        ["pgrep", "-f", "ray::Worker"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert workers, "no Ray worker process found"
    os.kill(int(workers[0]), signal.SIGKILL)  # one actor dies mid-run
    rest = process.stderr.read()
    process.wait(timeout=300)
    done_first = sum("files in" in line for line in [first, *rest.splitlines()])
    assert not list(out.rglob("*.part"))
    for path in out.rglob("*.npz"):
        segcam.load(path)  # every file under its final name is complete
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = rerun.stderr.count("already done, skipped")
    done_again = rerun.stderr.count("files in")
    assert skipped + done_again == 12
    assert skipped == len(list(out.glob("*/manifest.json"))) - done_again
    assert len(list(out.glob("*/manifest.json"))) == 12 and done_first >= 1
    assert not list(out.rglob("*.part"))
