"""The demo CT is fetched on first use into the user's cache, verified, atomically; --offline."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from segcam.apps.cli import main
from segcam.apps.demo import data


@pytest.fixture
def cached_wheel():
    """The wheel as the suite's data folder holds it (make data fetched it)."""
    return data.fetch(progress=None)


def test_data_dir_prefers_segcam_data_dir_then_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAM_DATA_DIR", str(tmp_path / "mine"))
    assert data.data_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEGCAM_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_dir() == tmp_path / "xdg" / "segcam" / "data"


def _fake_pip(tmp_path, body):
    """A stand-in for ``python -m pip download``: a script that logs its arguments and runs
    ``body`` (Python, with ``dest`` the --dest folder)."""
    script = tmp_path / "fake_pip.py"
    script.write_text(
        "import json, sys, shutil, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'args.json')!r}).write_text(json.dumps(sys.argv[1:]))\n"
        "dest = pathlib.Path(sys.argv[sys.argv.index('--dest') + 1])\n" + body
    )
    return [sys.executable, str(script)]


def test_fetch_has_pip_download_verifies_and_says_so(tmp_path, monkeypatch, cached_wheel):
    body = f"shutil.copy({str(cached_wheel)!r}, dest / {data.WHEEL_NAME!r})\n"
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _fake_pip(tmp_path, body))
    lines = []
    wheel = data.fetch(tmp_path / "cache", progress=lines.append)
    assert wheel == tmp_path / "cache" / data.WHEEL_NAME
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == data.WHEEL_SHA256
    assert len(lines) == 1 and "4.5 MB" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.WHEEL_NAME]
    # pip was asked for exactly the pinned package, without its dependencies, as a wheel
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[-1] == data.PACKAGE and "--no-deps" in args and "--only-binary=:all:" in args
    # a second call finds it and says nothing
    assert data.fetch(tmp_path / "cache", progress=lines.append) == wheel and len(lines) == 1
    case = data.load_case(tmp_path / "cache", offline=True)
    assert case.image.shape == (128, 128, 128) and set(case.labels.ravel().tolist()) == {0, 1, 2}


def test_the_real_command_is_pip_of_this_interpreter_with_its_own_configuration():
    # no host name anywhere: pip's index, mirrors and proxies decide where it comes from
    assert data.PIP_DOWNLOAD[:4] == [sys.executable, "-m", "pip", "download"]
    source = Path(data.__file__).read_text()
    assert "http" not in source and "urlopen" not in source


def test_a_corrupt_download_leaves_nothing(tmp_path, monkeypatch):
    body = f"(dest / {data.WHEEL_NAME!r}).write_bytes(b'not the wheel')\n"
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _fake_pip(tmp_path, body))
    with pytest.raises(data.DemoDataMissingError, match="SHA-256"):
        data.fetch(tmp_path / "cache", progress=None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_failing_pip_is_one_clear_error(tmp_path, monkeypatch):
    body = "print('ERROR: No matching distribution found', file=sys.stderr); sys.exit(1)\n"
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _fake_pip(tmp_path, body))
    with pytest.raises(data.DemoDataMissingError, match="No matching distribution") as error:
        data.fetch(tmp_path / "cache", progress=None)
    assert "pip download --no-deps" in str(error.value)  # how to do it by hand
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(data, "PIP_DOWNLOAD", [str(tmp_path / "no-such-python")])
    with pytest.raises(data.DemoDataMissingError, match="could not be run"):
        data.fetch(tmp_path / "cache", progress=None)


def test_offline_refuses_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGCAM_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(data.DemoDataMissingError, match="--offline"):
        data.fetch(offline=True)
    assert main(["demo", "--offline", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("segcam: error:") == 1 and "downloading is off (--offline)" in err
    assert not (tmp_path / "empty").exists()
