"""The demo CT is fetched on first use into the user's cache, verified, atomically; --offline."""

from __future__ import annotations

import hashlib

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


def test_fetch_downloads_verifies_and_says_so(tmp_path, monkeypatch, cached_wheel):
    monkeypatch.setattr(data, "WHEEL_URL", cached_wheel.as_uri())
    lines = []
    wheel = data.fetch(tmp_path / "cache", progress=lines.append)
    assert wheel == tmp_path / "cache" / data.WHEEL_NAME
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == data.WHEEL_SHA256
    assert len(lines) == 1 and "4.5 MB" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.WHEEL_NAME]
    # a second call finds it and says nothing
    assert data.fetch(tmp_path / "cache", progress=lines.append) == wheel and len(lines) == 1
    case = data.load_case(tmp_path / "cache", offline=True)
    assert case.image.shape == (128, 128, 128) and set(case.labels.ravel().tolist()) == {0, 1, 2}


def test_a_corrupt_download_leaves_nothing(tmp_path, monkeypatch):
    fake = tmp_path / "fake.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setattr(data, "WHEEL_URL", fake.as_uri())
    with pytest.raises(data.DemoDataMissingError, match="SHA-256"):
        data.fetch(tmp_path / "cache", progress=None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unreachable_host_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "WHEEL_URL", (tmp_path / "missing.whl").as_uri())
    with pytest.raises(data.DemoDataMissingError, match="by hand"):
        data.fetch(tmp_path / "cache", progress=None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_refuses_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGCAM_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(data.DemoDataMissingError, match="--offline"):
        data.fetch(offline=True)
    assert main(["demo", "--offline", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("segcam: error:") == 1 and "downloading is off (--offline)" in err
    assert not (tmp_path / "empty").exists()
