"""Issue 13's command-line and data-safety rows: one clear line (exit 2), a batch that goes on
(exit 1), no traceback, and output folders that stay consistent."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segcam.apps.batch import LOCK_FILE, output_folder
from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR
from segcam.errors import SegCamError
from segcam.testing.synthetic import shapes_scene

WEIGHTS = WEIGHTS_DIR / "synthetic_unet2d.pt"
MODEL = ["--model", "segcam.apps.demo.models:build_demo_model", "--weights", str(WEIGHTS)]
LAYER = "model.1.submodule.2"
EXPLAIN = [*MODEL, "--target", "all:1", "--layer", LAYER]


def run(*args):
    return main([str(a) for a in args])


def one_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("segcam: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def scene(tmp_path):
    image, _ = shapes_scene(1_000_011)
    path = tmp_path / "scene.npy"
    np.save(path, image[0])
    return path


# ------------------------------------------------------------------ bad inputs for the model


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rgb.png", lambda p: Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)),
        ("four.npy", lambda p: np.save(p, np.zeros((4, 64, 64), np.float32))),
        ("volume.npy", lambda p: np.save(p, np.zeros((1, 16, 64, 64), np.float32))),
    ],
)
def test_inputs_that_do_not_fit_the_model(tmp_path, capsys, name, make):
    make(tmp_path / name)
    assert run("explain", tmp_path / name, *EXPLAIN, "--out", tmp_path / "out") == 2
    one_line(capsys, "does not fit the model", "1 channel(s) on a 2D grid")


def test_two_channel_nifti_to_a_one_channel_net(tmp_path, capsys):
    nibabel = pytest.importorskip("nibabel")
    volume = np.zeros((16, 16, 8, 2), np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "two.nii.gz")
    kwargs = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], '
    kwargs += '"strides": [2]}'
    code = run(
        "explain", tmp_path / "two.nii.gz", "--model", "monai:UNet", "--model-kwargs", kwargs,
        "--target", "all:1", "--layer", "model.0", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    one_line(capsys, "does not fit the model")


def test_a_2d_input_to_a_3d_net(scene, tmp_path, capsys):
    kwargs = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], '
    kwargs += '"strides": [2]}'
    code = run(
        "explain", scene, "--model", "monai:UNet", "--model-kwargs", kwargs,
        "--target", "all:1", "--layer", "model.0", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    one_line(capsys, "(1, 1, 64, 64) does not fit the model", "on a 3D grid")


def test_an_input_the_net_cannot_take_is_a_model_error(tmp_path, capsys):
    np.save(tmp_path / "odd.npy", np.zeros((60, 60), np.float32))  # the UNet needs multiples of 8
    assert run("explain", tmp_path / "odd.npy", *EXPLAIN, "--out", tmp_path / "out") == 2
    one_line(capsys, "the model failed on the input (1, 1, 60, 60)")


def test_a_sliding_window_the_net_cannot_take(scene, tmp_path, capsys):
    code = run("explain", scene, *EXPLAIN, "--sliding-window", "12", "--out", tmp_path / "out")
    assert code == 2
    one_line(capsys, "the model failed on the input (1, 1, 12, 12)")


def test_layers_with_an_input_shape_the_net_cannot_take(capsys):
    assert run("layers", *MODEL, "--input-shape", "1,1,60,60") == 2
    one_line(capsys, "the model failed on the input (1, 1, 60, 60)")


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--device", "gpu0"], "is not a device"),
        (["--method", "seg-xres-cam", "--method-option", "seg-xres-cam:pool_size=0"], "pool_size"),
        (
            ["--method", "seg-xres-cam", "--method-option", "seg-xres-cam:pool_size=abc"],
            "pool_size",
        ),
        (["--method", "seg-score-cam", "--method-option", "seg-score-cam:batch_size=0"], "batch_"),
        (["--preprocess", "json:loads"], "--preprocess loads failed"),
        (["--preprocess", "numpy:sum"], "returned float32"),
    ],
)
def test_bad_options_are_one_line(scene, tmp_path, capsys, option, fragment):
    if option[:2] == ["--device", "cuda"] and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run("explain", scene, *EXPLAIN, *option, "--out", tmp_path / "out") == 2
    one_line(capsys, fragment)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_worker_count_must_be_positive(scene, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        run("explain", scene, *EXPLAIN, "--num-workers", value, "--out", tmp_path / "out")
    assert exit_.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_a_damaged_safetensors_file(scene, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    model = ["--model", "segcam.apps.demo.models:build_demo_model"]
    args = [*model, "--weights", tmp_path / "bad.safetensors", "--target", "all:1"]
    assert run("explain", scene, *args, "--layer", LAYER, "--out", tmp_path / "out") == 2
    one_line(capsys, "not a readable .safetensors file")


REFUSED_KWARGS = [
    '{"spatial_dims": 2}',  # missing arguments: TypeError
    '{"spatial_dims": 5, "in_channels": 1, "out_channels": 2, "channels": [4, 8], '
    '"strides": [2]}',  # MONAI refuses 5 dimensions with its own error type
]


@pytest.mark.parametrize("kwargs", REFUSED_KWARGS)
def test_a_factory_refusing_its_arguments(capsys, kwargs):
    assert run("layers", "--model", "monai:UNet", "--model-kwargs", kwargs) == 2
    one_line(capsys, "--model monai:UNet with --model-kwargs")


# ------------------------------------------------------------------ a batch goes on


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


# ------------------------------------------------------------------ output folders


def test_another_target_into_the_same_folder_is_refused(scene, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("explain", scene, *EXPLAIN, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run("explain", scene, *MODEL, "--target", "all:2", "--layer", LAYER, "--out", out) == 2
    one_line(capsys, "holds results made with other settings (targets: ['all:1'] -> ['all:2'])")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


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


def test_out_inside_the_input_folder_is_not_read_as_input(tmp_path, capsys):
    inputs = tmp_path / "images"
    inputs.mkdir()
    image, _ = shapes_scene(1_000_040)
    Image.fromarray((image[0] * 255).astype(np.uint8)).save(inputs / "scan.png")
    out = inputs / "maps"
    for _ in range(2):
        assert run("explain", inputs, *EXPLAIN, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["scan"]


# ------------------------------------------------------------------ property: any argv


INPUT_CHOICES = ["good.npy", "rgb.png", "odd.npy", "missing.npy", "folder", "empty"]
OPTION_CHOICES = [
    [],
    ["--method", "seg-grad-cam"],
    ["--method", "seg-eigen-cam", "--sliding-window", "8"],
    ["--method", "seg-xres-cam", "--method-option", "seg-xres-cam:pool_size=0"],
    ["--method-option", "bad"],
    ["--normalize", "max"],
    ["--normalize", "bogus"],
    ["--no-relu", "--no-upsample"],
    ["--window", "-1,1"],
    ["--window", "1,-1"],
    ["--classes", "bg,a,b"],
    ["--target", "box:1:0,0,99,99"],
    ["--target", "pixel:1:2.5,3"],
    ["--target", "mask:1:missing.npy"],
    ["--layer", "nope"],
    ["--layer", "head"],
    ["--sliding-window", "8,0.5"],
    ["--sliding-window", "8,1.5"],
    ["--device", "gpu"],
    ["--num-workers", "0"],
    ["--preprocess", "json:loads"],
    ["--output", "3"],
    ["--overwrite"],
]


def _fuzz_files(root: Path) -> None:
    (root / "folder").mkdir()
    (root / "empty").mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "good.npy", rng.random((16, 16), dtype=np.float32))
    np.save(root / "folder" / "a.npy", rng.random((16, 16), dtype=np.float32))
    np.save(root / "odd.npy", rng.random((3, 5, 5, 5), dtype=np.float32))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "rgb.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "folder" / "b.png")


@settings(max_examples=40, deadline=None)
@given(
    inputs=st.lists(st.sampled_from(INPUT_CHOICES), min_size=1, max_size=3, unique=True),
    options=st.lists(st.sampled_from(OPTION_CHOICES), max_size=3),
    debug=st.just(False),
)
def test_any_argument_vector_gives_a_clean_exit(inputs, options, debug):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _fuzz_files(root)
        before = {p for p in root.rglob("*")}
        argv = ["explain", *(str(root / name) for name in inputs)]
        argv += ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 2}']
        argv += ["--target", "all:1", "--layer", "body.3", "--out", str(root / "out")]
        argv += [part for option in options for part in option]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
        text = stderr.getvalue()
        assert code in (0, 1, 2), (argv, text)
        assert "Traceback" not in text, (argv, text)
        after = {p for p in root.rglob("*")}
        outside = [p for p in after - before if not p.is_relative_to(root / "out")]
        assert outside == [], (argv, outside)


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
