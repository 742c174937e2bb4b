"""segcam explain: every input or option the command cannot use is one line and exit 2, before any
work; any argument vector exits cleanly."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_runs import EXPLAIN, LAYER, MODEL, one_line, run
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segcam.apps.cli import main


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


TINY = ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 2}']


def test_a_class_written_with_a_unicode_digit_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16), np.float32))
    code = run("explain", tmp_path / "a.npy", *TINY, "--layer", "body.3", "--target",
               "predicted:²", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_line(capsys, "unknown class '²'")


def test_a_model_error_in_the_sliding_window_prediction_pass_is_one_line(tmp_path, capsys):
    # the pass without gradients (a target that reads the prediction) wraps the model's error
    # as every recorded forward does (it was an "unexpected error" with a traceback hint)
    np.save(tmp_path / "w.npy", np.random.default_rng(0).random((24, 24), np.float32))
    model = ["--model", "picky_net:picky", "--layer", "body"]
    window = ["--target", "predicted:1", "--sliding-window", "12"]
    code = run("explain", tmp_path / "w.npy", *model, *window, "--out", tmp_path / "out")
    assert code == 2
    one_line(capsys, "the model failed on the input (1, 1, 12, 12)", "needs 16 pixels")


def test_debug_is_taken_after_the_command_too(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16), np.float32))
    arguments = ["explain", tmp_path / "a.npy", *TINY, "--layer", "body.3", "--target", "all:9"]
    assert run(*arguments, "--out", tmp_path / "out", "--debug") == 2  # exit 2 with or without
    err = capsys.readouterr().err
    assert "Traceback" in err and "ClassIndexError: class index 9 is out of range" in err


@pytest.mark.parametrize("window", ["0,inf", "-inf,3", "nan,1"])
def test_a_window_that_is_not_finite_is_refused(tmp_path, capsys, window):
    # 0,inf made every input zeros and exited 0 (issue 22)
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        run("explain", tmp_path / "a.npy", *TINY, "--layer", "body.3", "--target", "all:1",
            "--window", window, "--out", tmp_path / "out")  # fmt: skip
    assert exit_info.value.code == 2
    assert "expected finite LOW,HIGH" in capsys.readouterr().err


def test_a_misspelt_layer_points_to_segcam_layers(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16), np.float32))
    code = run("explain", tmp_path / "a.npy", *TINY, "--layer", "body.33", "--target", "all:1",
               "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    err = one_line(capsys, "'body.33' does not exist", "list them with segcam layers")
    assert "named_modules" not in err


def test_a_truncated_nifti_is_one_line(tmp_path, capsys):
    import nibabel

    path = tmp_path / "cut.nii"
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:-700])
    code = run("explain", path, "--model", "segcam.testing:tiny_segnet", "--model-kwargs",
               '{"spatial_dims": 3}', "--layer", "body.3", "--target", "all:1",
               "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_line(capsys, "cut.nii: cannot read")  # one line: no newline inside the reason
