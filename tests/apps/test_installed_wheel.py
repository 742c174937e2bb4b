"""An installed segcam works outside the repository: the built wheel, a clean virtual
environment, ``segcam demo`` from an empty folder, the demo CT fetched on first use."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk (see the Makefile)

pytestmark = pytest.mark.slow


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_runs_the_demo_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*build, "-w", str(dist), str(ROOT)])
    [wheel] = dist.glob("segcam-*.whl")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    pip = [str(environment / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, TORCH])  # first, so nothing pulls a CUDA build
    _run([*pip, "-c", str(ROOT / "constraints.txt"), f"segcam[demo] @ {wheel.as_uri()}"])

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        "PATH": f"{environment / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "SSL_", "OPENBLAS"))},
    }
    segcam = str(environment / "bin" / "segcam")
    first = _run([segcam, "demo", "--out", "out"], cwd=empty, env=env)
    assert "downloading the demo CT" in first.stderr and "4.5 MB" in first.stderr
    assert str(tmp_path / "cache" / "segcam" / "data") in first.stderr
    report = (empty / "out" / "report.html").read_text(encoding="utf-8")
    assert "Seg-HiRes-Grad CAM" in report and report.count("data:image/png;base64,") >= 2
    assert (empty / "out" / "ct.nii.gz").is_file()
    # the package, not the repository, served the weights and the viewer page
    where = _run(
        [str(environment / "bin" / "python"), "-c", "import segcam; print(segcam.__file__)"],
        cwd=empty,
        env=env,
    ).stdout
    assert str(environment) in where

    # offline, from the cache: no download
    again = _run([segcam, "demo", "--offline", "--out", "again"], cwd=empty, env=env)
    assert "downloading" not in again.stderr and (empty / "again" / "report.html").is_file()
    # offline with an empty cache: one clear line, exit 2
    refused = subprocess.run(
        [segcam, "demo", "--offline", "--out", "none"],
        cwd=empty,
        env={**env, "XDG_CACHE_HOME": str(tmp_path / "other")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and refused.stderr.count("segcam: error:") == 1
    assert "Traceback" not in refused.stderr
