"""segcam.apps.batch.outputs: names kept inside --out, outputs verified by digest, one writer per
folder, stale temporaries removed, umask modes, manifests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
from cli_runs import EXPLAIN, run

from segcam.apps.batch import LOCK_FILE, RUN_FILE, output_folder
from segcam.errors import SegCamError
from segcam.testing.synthetic import shapes_scene


def test_odd_input_names_stay_inside_out(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = shapes_scene(1_000_030)
    np.save(inputs / "...npy", image[0])  # name "..": would be the parent folder
    out = tmp_path / "nest" / "out"
    assert run("explain", inputs / "...npy", *EXPLAIN, "--out", out) == 0
    assert (out / "_..").is_dir() and (out / "_.." / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "nest").iterdir()) == ["out"]


def test_a_deleted_or_altered_output_is_redone(scene, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    npz = out / "scene" / "seg-hires-grad-cam.npz"
    npz.unlink()
    capsys.readouterr()
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    assert "files in" in capsys.readouterr().err and npz.is_file()
    png = next((out / "scene").glob("*.png"))
    png.write_bytes(b"altered")
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    assert "files in" in capsys.readouterr().err and png.read_bytes().startswith(b"\x89PNG")


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(scene, tmp_path, capsys):
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def first_run():  # holds the folder as a running batch would
        with output_folder(out, {"settings": 1}, overwrite=False):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=first_run)
    thread.start()
    held.wait(30)
    try:
        code = subprocess.run(
            [sys.executable, "-m", "segcam.apps.cli", "explain", str(scene), *EXPLAIN, "--out",
             str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        release.set()
        thread.join()
    assert code.returncode == 2 and "being written by another segcam run" in code.stderr
    assert "Traceback" not in code.stderr


def test_stale_temporary_files_are_removed_by_the_next_run(scene, tmp_path):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    stale = [out / "scene" / ".seg-hires-grad-cam.npz.k1ll3d.part", out / ".x.part"]
    for path in stale:
        path.write_bytes(b"left by a killed save")
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0  # skipped, but cleaned
    assert not any(path.exists() for path in stale)


def test_outputs_get_the_umask_mode(scene, tmp_path):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    from segcam.io.writing import file_mode

    expected = file_mode()
    for path in (out / "scene").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert expected == 0o666 & ~_current_umask()


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_manifest_lists_every_file_with_its_digest(scene, tmp_path):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    manifest = json.loads((out / "scene" / "manifest.json").read_text(encoding="utf-8"))
    from segcam.apps.specs import file_sha256

    assert sorted(manifest["files"]) == sorted(manifest["outputs"])
    for name, digest in manifest["files"].items():
        assert file_sha256(out / "scene" / name) == digest


def test_output_folder_errors_are_segcam_errors():
    from segcam.apps.batch import OutputFolderError

    assert issubclass(OutputFolderError, SegCamError)
    assert LOCK_FILE.startswith(".")


def test_a_manifest_is_committed_only_while_its_run_holds_the_folder(tmp_path):
    from segcam.apps.batch.outputs import RunClaim, RunEndedError, write_manifest

    out = tmp_path / "out"
    out.mkdir()
    with output_folder(out, {"s": 1}, overwrite=False) as first:
        pass
    with output_folder(out, {"s": 1}, overwrite=False) as second:  # another run holds it now
        folder = out / "x"
        folder.mkdir()
        late = folder / "late.txt"
        late.write_text("a worker of the first run")
        with pytest.raises(RunEndedError, match="held by another run"):
            write_manifest([late], {"sha256": "0"}, {"s": 1}, folder, 0.0, first)
        assert not late.exists() and not folder.exists()  # its files went, and its folder
        orphan = RunClaim(out, second.run_id, parent=os.getpid() + 10_000_000)
        assert not orphan.alive()
        with pytest.raises(RunEndedError, match="has ended"):
            write_manifest([], {"sha256": "0"}, {"s": 1}, out / "y", 0.0, orphan)
        mine = out / "z"
        mine.mkdir()
        (mine / "map.txt").write_text("this run's")
        write_manifest([mine / "map.txt"], {"sha256": "0"}, {"s": 1}, mine, 0.0, second)
        assert (mine / "manifest.json").is_file()
    recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    assert recorded["settings"] == {"s": 1} and recorded["run"]["id"] == second.run_id


def test_a_run_file_of_an_older_segcam_is_read_as_its_settings(tmp_path, scene, capsys):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    settings = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    (out / RUN_FILE).write_text(json.dumps(settings), encoding="utf-8")  # the old layout
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    assert "already done, skipped" in capsys.readouterr().err


def test_without_a_manifest_the_old_maps_go_before_new_ones_are_written(scene, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    old = sorted(p.name for p in (out / "scene").iterdir() if p.name != "manifest.json")
    (out / "scene" / "manifest.json").write_text("garbage")  # damaged, or deleted
    (out / "scene" / "notes.txt").write_text("the user's own file")
    from cli_runs import LAYER, MODEL

    assert run("explain", scene, *MODEL, "--target", "all:2", "--layer", LAYER, "--overwrite",
               "--out", out) == 0  # fmt: skip
    left = sorted(p.name for p in (out / "scene").iterdir())
    assert not [name for name in old if name.endswith(".png") and name in left]  # t0-all-1 gone
    saved = json.loads((out / "scene" / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(n for n in left if n not in ("manifest.json", "notes.txt")) == sorted(
        saved["outputs"]
    )
    assert "notes.txt" in left  # not segcam's: kept


@pytest.mark.parametrize(
    "manifest",
    ['{"input": 5}', '{"outputs": "abc"}', "[1, 2]", '{"segcam": "0", "input": 5, "files": {}}'],
)
def test_a_malformed_manifest_is_redone_not_an_error(scene, tmp_path, capsys, manifest):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    (out / "scene" / "manifest.json").write_text(manifest)
    capsys.readouterr()
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0  # no --overwrite needed
    err = capsys.readouterr().err
    assert "files in" in err and "Traceback" not in err and "unexpected" not in err


def test_a_manifest_that_is_no_segcam_manifest_does_not_protect_old_maps(scene, tmp_path):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    (out / "scene" / "manifest.json").write_text('{"outputs": []}')  # parseable, but not ours
    stale = out / "scene" / "seg-grad-cam.npz"
    stale.write_bytes(b"a map of earlier settings")
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    assert not stale.exists()
