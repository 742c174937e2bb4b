"""The command line end to end: maps equal segcam.explain, files, resume, errors, kills."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segcam
from segcam.apps.batch import RUN_FILE
from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR, build_demo_model, load_demo_model
from segcam.testing.synthetic import shapes_scene

WEIGHTS = WEIGHTS_DIR / "synthetic_unet2d.pt"
MODEL = ["--model", "segcam.apps.demo.models:build_demo_model", "--weights", str(WEIGHTS)]
LAYER = "model.1.submodule.2"


@pytest.fixture
def scenes(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for seed in range(1_000_008, 1_000_011):
        image, labels = shapes_scene(seed)
        np.save(folder / f"scene{seed}.npy", image[0] * 100.0)  # raw intensities, windowed below
        np.save(folder / f"disks{seed}.npy", labels == 1)
    return folder


def run(*args):
    return main([str(a) for a in args])


def test_written_maps_equal_explain(scenes, tmp_path, capsys):
    out = tmp_path / "out"
    image = scenes / "scene1000008.npy"
    code = run(
        "explain",
        image,
        *MODEL,
        "--window",
        "-50,250",
        "--classes",
        "bg,disk,square",
        "--target",
        "predicted:disk",
        "--target",
        f"mask:2:{scenes / 'disks1000008.npy'}",
        "--target",
        "box:square:10,10,40,50",
        "--target",
        "pixel:1:20,21",
        "--layer",
        LAYER,
        "--layer",
        "model.0",
        "--method",
        "seg-grad-cam",
        "--method",
        "seg-hires-grad-cam",
        "--normalize",
        "max",
        "--out",
        out,
    )
    assert code == 0
    raw = np.load(image)
    x = torch.from_numpy(((np.clip(raw, -50, 250) + 50) / 300).astype(np.float32))[None, None]
    mask = np.load(scenes / "disks1000008.npy")
    targets = [
        segcam.Predicted(1),
        segcam.Mask(2, mask),
        segcam.Box(2, [(10, 40), (10, 50)]),
        segcam.Pixel(1, (20, 21)),
    ]
    folder = out / "scene1000008"
    for method in ("seg-grad-cam", "seg-hires-grad-cam"):
        expected = segcam.explain(
            load_demo_model(), x, targets, [LAYER, "model.0"], method, normalize="max"
        )
        written = segcam.load(folder / f"{method}.npz")
        for layer in (LAYER, "model.0"):
            torch.testing.assert_close(written.layer_maps[layer], expected.layer_maps[layer])
    pngs = sorted(p.name for p in folder.glob("*.png"))
    # the class name where one is known (--classes): mask:2 is the square
    assert len(pngs) == 2 * 2 * 4 and "seg-hires-grad-cam__model.0__t1-mask-square.png" in pngs
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["methods"] == ["seg-grad-cam", "seg-hires-grad-cam"]
    assert manifest["weights_sha256"] == segcam.apps.specs.file_sha256(WEIGHTS)
    assert manifest["input"]["path"] == str(image) and manifest["torch"] == torch.__version__
    assert sorted(manifest["outputs"]) == sorted(
        p.name for p in folder.iterdir() if p.name != "manifest.json"
    )


def _stamps(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != RUN_FILE}


def test_folder_resume_and_overwrite(scenes, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["explain", scenes, *MODEL, "--target", "predicted:1", "--layer", LAYER, "--out", out]
    assert run(*args) == 0
    first = capsys.readouterr().err
    assert first.count("files in") == 6  # 3 scenes + 3 masks, all .npy inputs
    stamps = _stamps(out)
    assert run(*args) == 0
    second = capsys.readouterr().err
    assert second.count("already done, skipped") == 6
    assert _stamps(out) == stamps  # the results untouched (the run file records each run's id)
    # Other settings into the same folder are refused (issue 13: they would overwrite or mix
    # with these results); nothing is touched.
    assert run(*args, "--method", "seg-grad-cam") == 2
    assert "holds results of 6 inputs made with other settings (methods:" in capsys.readouterr().err
    assert _stamps(out) == stamps
    # In another folder they are new work; with --overwrite they replace these results whole.
    assert run(*args[:-1], tmp_path / "other", "--method", "seg-grad-cam") == 0
    assert capsys.readouterr().err.count("files in") == 6
    assert run(*args, "--method", "seg-grad-cam", "--overwrite") == 0
    assert capsys.readouterr().err.count("files in") == 6
    names = {p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert "seg-grad-cam.npz" in names and "seg-hires-grad-cam.npz" not in names


def test_nifti_geometry_kept(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    affine = np.array([[0.8, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    source = tmp_path / "volume.nii.gz"
    ct = nibabel.Nifti1Image(volume, affine)
    ct.header["cal_min"], ct.header["cal_max"] = -1024, 3071  # the CT's own display window
    ct.header["descrip"] = b"a CT"
    nibabel.save(ct, source)
    out = tmp_path / "out"
    code = run(
        "explain",
        source,
        "--model",
        "monai:UNet",
        "--model-kwargs",
        '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, '
        '"channels": [4, 8], "strides": [2]}',
        "--target",
        "all:1",
        "--layer",
        "model.0",
        "--out",
        out,
    )
    assert code == 0
    heat = nibabel.load(out / "volume" / "seg-hires-grad-cam__model.0__t0-all-1.nii.gz")
    assert heat.shape == volume.shape
    np.testing.assert_allclose(heat.affine, affine)
    assert heat.header.get_zooms() == (0.8, 0.8, 2.5)
    # the map's own display hints, not the CT's window (issue 24)
    values = np.asarray(heat.dataobj)
    assert float(heat.header["cal_min"]) == 0.0 and values.min() >= 0
    assert float(heat.header["cal_max"]) == pytest.approx(float(values.max()))
    assert heat.header.get_intent()[0] == "estimate" and heat.header.get_intent()[2] == "segcam map"
    assert heat.header["descrip"].tobytes().rstrip(b"\0").decode() == (
        "segcam seg-hires-grad-cam__model.0__t0-all-1"
    )


def test_corrupt_inputs_give_one_line(tmp_path, capsys):
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    truncated = tmp_path / "cut.nii.gz"
    full = gzip.compress(b"\x5c\x01\x00\x00" + b"\x00" * 400)
    truncated.write_bytes(full[: len(full) // 2])
    for path in (bad_png, truncated):
        code = run(
            "explain",
            path,
            *MODEL,
            "--target",
            "predicted:1",
            "--layer",
            LAYER,
            "--out",
            tmp_path / "out",
        )
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith(f"segcam: error: {path}: cannot read") and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.npz"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "predicted:7"], "class index 7 is out of range"),
        (["--target", "circle:1"], "unknown kind 'circle'"),
        (["--target", "box:1:1,2,3"], "a box is I0,J0,I1,J1"),
        (["--target", "predicted:tumour"], "unknown class 'tumour'"),
        (["--target", "predicted:1", "--layer", "model.9"], "layer 'model.9' does not exist"),
    ],
)
def test_bad_specs_give_one_line(scenes, tmp_path, capsys, extra, message):
    layer = [] if "--layer" in extra else ["--layer", LAYER]
    code = run(
        "explain", scenes / "scene1000008.npy", *MODEL, *extra, *layer, "--out", tmp_path / "out"
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_debug_shows_the_traceback(scenes, tmp_path, capsys):
    assert (
        run(
            "--debug",
            "explain",
            scenes / "scene1000008.npy",
            *MODEL,
            "--target",
            "predicted:7",
            "--layer",
            LAYER,
            "--out",
            tmp_path / "out",
        )
        == 2  # the error's status, with the traceback
    )
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "segcam.errors.ClassIndexError" in err


def test_torchscript_and_pickle_are_refused(tmp_path, capsys):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(build_demo_model().eval()), scripted)
    assert (
        run("layers", "--model", "segcam.apps.demo.models:build_demo_model", "--weights", scripted)
        == 2
    )
    assert "TorchScript" in capsys.readouterr().err
    pickled = tmp_path / "whole.pt"
    torch.save(load_demo_model(), pickled)
    assert (
        run("layers", "--model", "segcam.apps.demo.models:build_demo_model", "--weights", pickled)
        == 2
    )
    assert "--trust-pickle" in capsys.readouterr().err
    assert run("layers", "--weights", pickled, "--trust-pickle", "--input-shape", "1,1,64,64") == 0
    assert "model.1.submodule.2" in capsys.readouterr().out


def test_layers_marks_the_path(capsys):
    assert run("layers", *MODEL, "--input-shape", "1,1,64,64", "--all") == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith(f"{LAYER} "))
    assert "(1, 16, 32, 32)" in row and row.rstrip().endswith("yes")


def test_methods_lists_the_registry(capsys):
    assert run("methods") == 0
    out = capsys.readouterr().out
    for name in segcam.list_methods():
        assert name in out


def test_killed_run_leaves_no_partial_files_and_completes(scenes, tmp_path):
    # Many inputs, so that the kill right after the first one lands well before the end
    # on any machine (with 6 inputs and a sleep, a fast runner finished them all first).
    many = tmp_path / "many"
    many.mkdir()
    image = np.load(scenes / "scene1000008.npy")
    count = 12
    for index in range(count):
        np.save(many / f"scene{index:03d}.npy", np.roll(image, index, axis=-1))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "segcam.apps.cli",
        "explain",
        str(many),
        *MODEL,
        "--target",
        "predicted:1",
        "--target",
        "all:2",
        "--layer",
        LAYER,
        "--layer",
        "model.0",
        "--method",
        "seg-grad-cam",
        "--method",
        "seg-hires-grad-cam",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    line = process.stderr.readline()  # the first input is done: kill in the middle of the rest
    assert "files in" in line, line
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path in out.rglob("*"):
        if path.suffix == ".npz":
            segcam.load(path)  # every file under its final name is complete
    done_before = {p.parent.name for p in out.rglob("manifest.json")}
    assert 1 <= len(done_before) < count
    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert rerun.stderr.count("already done, skipped") == len(done_before)
    assert rerun.stderr.count("files in") == count - len(done_before)
    assert not list(out.rglob("*.part"))
    assert len(list(out.rglob("manifest.json"))) == count


def test_safetensors_weights_give_the_same_maps(scenes, tmp_path):
    from safetensors.torch import save_file

    converted = tmp_path / "weights.safetensors"
    save_file(load_demo_model().state_dict(), str(converted))
    common = [
        "explain",
        scenes / "scene1000008.npy",
        "--model",
        "segcam.apps.demo.models:build_demo_model",
        "--target",
        "predicted:1",
        "--layer",
        LAYER,
    ]
    assert run(*common, "--weights", WEIGHTS, "--out", tmp_path / "a") == 0
    assert run(*common, "--weights", converted, "--out", tmp_path / "b") == 0
    first = segcam.load(tmp_path / "a" / "scene1000008" / "seg-hires-grad-cam.npz")
    second = segcam.load(tmp_path / "b" / "scene1000008" / "seg-hires-grad-cam.npz")
    torch.testing.assert_close(first.maps, second.maps, rtol=0, atol=0)


@pytest.mark.filterwarnings("default::segcam.errors.SegCamWarning")
def test_empty_mask_warns_in_one_line(scenes, tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((64, 64), dtype=bool))
    code = run(
        "explain",
        scenes / "scene1000008.npy",
        *MODEL,
        "--target",
        f"mask:1:{empty}",
        "--layer",
        LAYER,
        "--out",
        tmp_path / "out",
    )
    err = capsys.readouterr().err
    assert code == 0
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [warning[0]] and warning[0].startswith("segcam: warning: empty pixel set")
    maps = segcam.load(tmp_path / "out" / "scene1000008" / "seg-hires-grad-cam.npz").maps
    assert torch.equal(maps, torch.zeros_like(maps))


def test_method_options_reach_the_maps(scenes, tmp_path, capsys):
    image = scenes / "scene1000008.npy"
    common = ["explain", image, *MODEL, "--target", "predicted:1", "--layer", LAYER]
    out = tmp_path / "out"
    code = run(
        *common,
        "--method",
        "seg-xres-cam",
        "--method-option",
        "seg-xres-cam:pool_size=4",
        "--method-option",
        "seg-xres-cam:pool=mean",
        "--no-upsample",
        "--no-relu",
        "--out",
        out,
    )
    assert code == 0
    saved = segcam.load(out / "scene1000008" / "seg-xres-cam.npz")
    assert dict(saved.method_options) == {"pool_size": 4, "pool": "mean"}
    x = torch.from_numpy(np.load(image))[None, None].float()
    expected = segcam.explain(
        load_demo_model(),
        x,
        segcam.Predicted(1),
        LAYER,
        "seg-xres-cam",
        relu=False,
        upsample=False,
        method_options={"pool_size": 4, "pool": "mean"},
    )
    torch.testing.assert_close(saved.maps, expected.maps)
    manifest = json.loads((out / "scene1000008" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["method_options"] == {"seg-xres-cam": {"pool_size": 4, "pool": "mean"}}
    capsys.readouterr()
    bad = run(*common, "--method-option", "seg-xres-cam:pool_size=4", "--out", tmp_path / "b")
    assert bad == 2 and "not among --method" in capsys.readouterr().err
    bad = run(
        *common,
        "--method",
        "seg-score-cam",
        "--method-option",
        "seg-score-cam:channels=4",
        "--out",
        tmp_path / "c",
    )
    assert bad == 2
    assert "has no option 'channels'; its options: batch_size, max_channels" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert run("methods") == 0
    assert "options: pool_size=2, pool='max'" in capsys.readouterr().out


def test_sliding_window_option(scenes, tmp_path, capsys):
    image = scenes / "scene1000009.npy"
    out = tmp_path / "out"
    common = ["explain", image, *MODEL, "--target", "predicted:1", "--layer", LAYER]
    assert run(*common, "--sliding-window", "32x48,0.5", "--no-relu", "--out", out) == 0
    saved = segcam.load(out / "scene1000009" / "seg-hires-grad-cam.npz")
    x = torch.from_numpy(np.load(image))[None, None].float()
    expected = segcam.explain_sliding_window(
        load_demo_model(), x, segcam.Predicted(1), LAYER, (32, 48), overlap=0.5, relu=False
    )
    torch.testing.assert_close(saved.maps, expected.maps)
    assert saved.info["sliding_window"]["windows"] == expected.info["sliding_window"]["windows"]
    manifest = json.loads((out / "scene1000009" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["options"]["sliding_window"] == {
        "roi_size": [32, 48], "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125,
    }  # fmt: skip
    # MONAI's constant blending (SlidingWindowInferer's default) and another sigma
    for flags, options in (
        (["--sw-mode", "constant"], {"mode": "constant"}),
        (["--sw-sigma", "0.25"], {"mode": "gaussian", "sigma_scale": 0.25}),
    ):
        folder = tmp_path / flags[0].strip("-")
        args = [*common, "--sliding-window", "32x48,0.5", "--no-relu", *flags, "--out", folder]
        assert run(*args) == 0
        blended = segcam.load(folder / "scene1000009" / "seg-hires-grad-cam.npz")
        reference = segcam.explain_sliding_window(
            load_demo_model(), x, segcam.Predicted(1), LAYER, (32, 48), overlap=0.5,
            relu=False, **options,
        )  # fmt: skip
        torch.testing.assert_close(blended.maps, reference.maps)
        assert not torch.allclose(blended.maps, expected.maps)  # not the default blending
    capsys.readouterr()
    for flags, message in (
        (["--sw-mode", "constant"], "give it too"),
        (["--sliding-window", "32", "--sw-mode", "constant", "--sw-sigma", "0.2"], "has none"),
    ):
        assert run(*common, *flags, "--out", tmp_path / "d") == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(*common, "--sliding-window", "32x,0.5", "--out", tmp_path / "b")
    assert "expected ROI[,OVERLAP]" in capsys.readouterr().err
    code = run(
        *common, "--sliding-window", "32", "--method", "seg-eigen-cam", "--out", tmp_path / "c"
    )
    assert code == 2 and "gradient methods only" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
    image, _ = shapes_scene(1_000_004)
    np.save(tmp_path / "scene.npy", image[0])
    if where == "file":
        out = tmp_path / "a-file"
        out.write_text("")
    else:
        out = Path("/proc/segcam-cannot-write-here")
    common = ["explain", str(tmp_path / "scene.npy"), *MODEL, "--target", "all:1"]
    assert main([*common, "--layer", LAYER, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segcam: error: cannot create the output folder") and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags", [["--per-fold"], ["--save-seg"], ["-f", "0"], ["-step_size", "0.5"], ["--disable_tta"]]
)
def test_nnunet_options_without_an_nnunet_model_are_refused(scenes, tmp_path, capsys, flags):
    # they were silently ignored for a plain model
    image = scenes / "scene1000009.npy"
    code = run("explain", image, *MODEL, "--target", "predicted:1", "--layer", LAYER,
               "--out", tmp_path / "out", *flags)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "nnU-Net's options, for an nnU-Net model" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_memory_format_reaches_the_maps_and_the_record(tmp_path, capsys, monkeypatch):
    # a volume: the default lays its few-channel 3D convolutions out channels-last; contiguous
    # is the plain layout; both give the same maps to float32 rounding and say which they used
    from monai.networks.nets import UNet

    from segcam import memory_format as layouts

    # 16 channels at 40²: past PyTorch's threshold for its reference kernel (batch 1)
    volume = np.random.default_rng(1).normal(size=(16, 40, 40, 40)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    torch.manual_seed(0)  # one set of weights for every run
    torch.save(UNet(3, 16, 2, channels=(4, 8), strides=(2,)).state_dict(), tmp_path / "unet.pt")
    common = [
        tmp_path / "volume.npy", "--model", "monai:UNet", "--model-kwargs",
        '{"spatial_dims": 3, "in_channels": 16, "out_channels": 2, "channels": [4, 8], '
        '"strides": [2]}', "--weights", tmp_path / "unet.pt", "--target", "all:1",
        "--layer", "model.1", "--no-relu",
    ]  # fmt: skip
    converted = []
    convert = layouts._to_channels_last

    def counted(module, args):
        result = convert(module, args)
        converted.append(result is not None)
        return result

    monkeypatch.setattr(layouts, "_to_channels_last", counted)
    maps = {}
    for memory_format in ("auto", "contiguous", "channels-last"):
        out = tmp_path / memory_format
        converted.clear()
        assert run("explain", *common, "--out", out, "--memory-format", memory_format) == 0
        assert any(converted) == (memory_format != "contiguous"), memory_format
        manifest = json.loads((out / "volume" / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["options"]["memory_format"] == memory_format
        maps[memory_format] = segcam.load(out / "volume" / "seg-hires-grad-cam.npz").maps
    scale = float(maps["contiguous"].abs().max())
    for memory_format in ("auto", "channels-last"):
        torch.testing.assert_close(
            maps[memory_format], maps["contiguous"], rtol=0, atol=1e-5 * scale
        )
    capsys.readouterr()
    for command in ("explain", "view"):
        with pytest.raises(SystemExit) as exit_info:
            run(command, *(common if command == "explain" else []), "--out", tmp_path / "x",
                "--memory-format", "channels_last")  # fmt: skip
        assert exit_info.value.code == 2
        assert "--memory-format: invalid choice: 'channels_last'" in capsys.readouterr().err
