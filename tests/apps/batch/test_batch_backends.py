"""segcam.apps.batch.backends: processes and Ray give the same files as one process; a dead worker
fails only its input (tried once more); a dead parent leaves nothing written after it died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dying_worker import MARK

import segcam
from segcam.apps.batch import RUN_FILE, BatchJob, explain_files
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
    names = [n for n in _files(first) if not n.endswith(("manifest.json", RUN_FILE))]
    assert names == [n for n in _files(second) if not n.endswith(("manifest.json", RUN_FILE))]
    settings = [json.loads((f / RUN_FILE).read_text(encoding="utf-8")) for f in (first, second)]
    assert settings[0]["settings"] == settings[1]["settings"]  # the same; the run ids differ
    assert settings[0]["run"]["id"] != settings[1]["run"]["id"]
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
    assert remote.failed[0][1].startswith("cannot read (")  # the path is the report's
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


# --- real processes: a worker killed mid-input, the run's parent killed mid-run (issue 22) ---

TESTS_APPS = str(Path(__file__).resolve().parents[1])  # dying_worker.py, a --preprocess
DEMO = ["--model", MODEL, "--weights", str(WEIGHTS), "--layer", LAYER]


def _marked_inputs(folder, count, marked):
    folder.mkdir()
    for seed in range(count):
        image, _ = shapes_scene(2_100_000 + seed)
        array = image[0].copy()
        if seed in marked:
            array.flat[0] = MARK  # dying_worker's functions kill the worker on this input
        np.save(folder / f"v{seed}.npy", array)
    return folder


def _segcam(*arguments, env=None, **options):
    command = [sys.executable, "-m", "segcam.apps.cli", *map(str, arguments)]
    environment = {**os.environ, "PYTHONPATH": TESTS_APPS, "PYTHONUNBUFFERED": "1", **(env or {})}
    return command, environment


def _run(*arguments, env=None):
    command, environment = _segcam(*arguments, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize("backend", [["--num-workers", "2"], ["--backend", "ray"]])
def test_a_worker_killed_mid_input_fails_only_that_input(tmp_path, backend):
    inputs = _marked_inputs(tmp_path / "in", 6, marked={2})
    out = tmp_path / "out"
    done = _run("explain", inputs, *DEMO, "--target", "all:1", "--preprocess",
                "dying_worker:die_on_mark", *backend, "--out", out)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "terminated abruptly" not in done.stderr
    assert "1 of 6 inputs failed" in done.stderr
    assert "v2.npy: FAILED: worker died" in done.stderr and "twice: not tried again" in done.stderr
    if backend[0] == "--num-workers":
        assert "worker died (signal 9, SIGKILL)" in done.stderr
    assert sorted(p.parent.name for p in out.glob("*/manifest.json")) == [
        "v0", "v1", "v3", "v4", "v5"
    ]  # fmt: skip
    assert not (out / "v2").exists()  # no empty folder for the input that failed


@pytest.mark.parametrize("backend", [["--num-workers", "2"], ["--backend", "ray"]])
def test_an_input_whose_worker_died_once_is_tried_again(tmp_path, backend):
    inputs = _marked_inputs(tmp_path / "in", 4, marked={1})
    out = tmp_path / "out"
    died = tmp_path / "died"
    done = _run("explain", inputs, *DEMO, "--target", "all:1", "--preprocess",
                "dying_worker:die_once_on_mark", *backend, "--out", out,
                env={"SEGCAM_TEST_DIED": str(died)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert died.is_file()  # the worker did die on it once
    retried = [line for line in done.stderr.splitlines() if "v1.npy" in line]
    assert (
        retried and "files in" in retried[0] and "tried again: the first worker died" in retried[0]
    )
    assert len(list(out.glob("*/manifest.json"))) == 4


def test_a_bad_model_with_workers_is_one_line(tmp_path):
    inputs = _marked_inputs(tmp_path / "in", 3, marked=set())
    done = _run("explain", inputs, "--model", "segcam.apps.demo.models:no_such_factory",
                "--layer", LAYER, "--target", "all:1", "--num-workers", "2",
                "--out", tmp_path / "out")  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "no_such_factory" in done.stderr
    assert not (tmp_path / "out").exists()  # a failed run leaves no folder behind


def _listing(out):
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file()
    }


def _children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_parent_leaves_nothing_written_after_it_and_one_setting(tmp_path):
    inputs = _marked_inputs(tmp_path / "in", 8, marked=set())
    out = tmp_path / "out"
    command, environment = _segcam("explain", inputs, *DEMO, "--target", "all:1",
                                   "--preprocess", "dying_worker:slow", "--num-workers", "2",
                                   "--out", out, env={"SEGCAM_TEST_SLOW": "1.5"})  # fmt: skip
    parent = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    assert parent.stderr is not None
    line = parent.stderr.readline()
    while "files in" not in line and line:
        line = parent.stderr.readline()
    assert "files in" in line, line  # one input is done, the others are in flight
    workers = _children(parent.pid)
    assert len(workers) >= 2  # the spawned workers (and multiprocessing's tracker)
    parent.kill()
    parent.wait(timeout=30)
    time.sleep(0.5)  # the kernel's parent-death signal reaches the workers
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), pid
    before = _listing(out)
    for _ in range(10):  # nothing is written after the parent died, checked over 5 s
        time.sleep(0.5)
        assert _listing(out) == before
    for manifest in out.glob("*/manifest.json"):  # every recorded input is whole
        saved = json.loads(manifest.read_text(encoding="utf-8"))
        assert all((manifest.parent / name).is_file() for name in saved["files"])
    again = _run("explain", inputs, *DEMO, "--target", "box:1:0,0,20,20", "--overwrite",
                 "--out", out)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    manifests = list(out.glob("*/manifest.json"))
    assert len(manifests) == 8
    for manifest in manifests:  # one folder, one setting
        saved = json.loads(manifest.read_text(encoding="utf-8"))
        assert all(saved[key] == value for key, value in recorded.items()), manifest
    assert not list(out.rglob("*.part*"))


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except OSError:
        return "gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_run_and_its_workers_with_one_line(tmp_path):
    inputs = _marked_inputs(tmp_path / "in", 6, marked=set())
    command, environment = _segcam("explain", inputs, *DEMO, "--target", "all:1",
                                   "--preprocess", "dying_worker:slow", "--num-workers", "2",
                                   "--out", tmp_path / "out",
                                   env={"SEGCAM_TEST_SLOW": "2"})  # fmt: skip
    parent = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    assert parent.stderr is not None
    line = parent.stderr.readline()
    while "files in" not in line and line:
        line = parent.stderr.readline()
    workers = _children(parent.pid)
    os.killpg(parent.pid, signal.SIGINT)  # Ctrl+C: the terminal signals the whole group
    rest = parent.stderr.read()
    assert parent.wait(timeout=30) == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.strip().splitlines()[-1] == "segcam: interrupted", rest
    time.sleep(0.5)
    assert all(not Path(f"/proc/{pid}").exists() or _state(pid) == "Z" for pid in workers)


def test_one_input_with_workers_runs_in_a_worker_too(tmp_path):
    inputs = _marked_inputs(tmp_path / "in", 1, marked={0})
    out = tmp_path / "out"
    done = _run("explain", inputs / "v0.npy", *DEMO, "--target", "all:1", "--preprocess",
                "dying_worker:die_on_mark", "--num-workers", "2", "--out", out)  # fmt: skip
    # it ran in the run's own process before: the kill took the run with it (exit -9, no line)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "worker died (signal 9, SIGKILL), twice" in done.stderr
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_the_workers_start_is_one_line_too(tmp_path):
    # the workers were importing torch when the group's SIGINT came: a traceback from each
    inputs = _marked_inputs(tmp_path / "in", 4, marked=set())
    command, environment = _segcam("explain", inputs, *DEMO, "--target", "all:1",
                                   "--num-workers", "2", "--out", tmp_path / "out")  # fmt: skip
    parent = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not _children(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.8)  # the workers are starting: importing segcam and torch
    os.killpg(parent.pid, signal.SIGINT)
    assert parent.stderr is not None
    rest = parent.stderr.read()
    assert parent.wait(timeout=60) == 130, rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest


def test_one_process_writes_an_input_while_the_next_computes(dataset, tmp_path, monkeypatch):
    from segcam.apps.batch import backends, inputs

    files = sorted(dataset.iterdir())[:4]
    (dataset / "scan01.npy").write_bytes(b"not an array")  # the second input fails to read
    prepare = inputs.FileExplainer.prepare
    events, next_computes, overlapped = [], threading.Event(), []

    def traced_prepare(self, path, out, progress=None, run=None):
        events.append(("compute", path.name))
        if path.name == "scan01.npy":
            next_computes.set()
        finish = prepare(self, path, out, progress, run)

        def traced_finish():
            events.append(("write", path.name, threading.current_thread().name))
            if path.name == "scan00.npy":  # held until the next input computes: a pipeline
                overlapped.append(next_computes.wait(timeout=60))
            if path.name == "scan02.npy":  # the third input's write fails (a full disk)
                raise OSError(28, "No space left on device")
            return finish()

        return traced_finish

    monkeypatch.setattr(inputs.FileExplainer, "prepare", traced_prepare)
    out = tmp_path / "out"
    outcomes = list(backends.run_here(JOB, list(enumerate(files, 1)), out, None))
    assert overlapped == [True]
    # in the inputs' order, each failure its own input's, the others done
    assert [(o.position, o.ok) for o in outcomes] == [(1, True), (2, False), (3, False), (4, True)]
    assert outcomes[2].message == "OSError: [Errno 28] No space left on device"
    writes = [e for e in events if e[0] == "write"]
    assert [w[1] for w in writes] == ["scan00.npy", "scan02.npy", "scan03.npy"]
    assert all(w[2].startswith("segcam-writer") for w in writes)
    assert (out / "scan00" / "manifest.json").is_file()
    assert (out / "scan03" / "manifest.json").is_file()
    assert not (out / "scan02" / "manifest.json").exists()  # its write failed: not done
    # the same files as the input explained alone (no pipeline)
    monkeypatch.setattr(inputs.FileExplainer, "prepare", prepare)
    alone = tmp_path / "alone"
    assert explain_files([files[0]], JOB, alone).done
    names = sorted(p.name for p in (alone / "scan00").iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in (out / "scan00").iterdir() if p.name != "manifest.json")
    for name in names:
        if not name.endswith(".npz"):
            assert (out / "scan00" / name).read_bytes() == (alone / "scan00" / name).read_bytes()


def test_ctrl_c_in_the_next_compute_reports_the_write_in_flight(dataset, tmp_path, monkeypatch):
    from segcam.apps.batch import backends, inputs

    files = sorted(dataset.iterdir())[:3]
    prepare = inputs.FileExplainer.prepare

    def interrupted(self, path, out, progress=None, run=None):
        if path.name == "scan01.npy":
            raise KeyboardInterrupt
        return prepare(self, path, out, progress, run)

    monkeypatch.setattr(inputs.FileExplainer, "prepare", interrupted)
    out, outcomes = tmp_path / "out", []
    with pytest.raises(KeyboardInterrupt):
        for outcome in backends.run_here(JOB, list(enumerate(files, 1)), out, None):
            outcomes.append(outcome)
    assert [(o.position, o.ok) for o in outcomes] == [(1, True)]  # written, and reported
    assert (out / "scan00" / "manifest.json").is_file()
    assert not (out / "scan02").exists()  # never started
