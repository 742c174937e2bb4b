"""``segcam explain --nnunet`` and ``segcam layers --nnunet``: cases in, maps in geometry out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segcam

pytest.importorskip("nnunetv2")

import nibabel
import SimpleITK as sitk  # noqa: N813
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from segcam import nnunet
from segcam.apps.cli import main
from segcam.testing.nnunet import make_model_folder

pytestmark = pytest.mark.filterwarnings("ignore:perform_everything_on_device")

LAYER = "decoder.stages.1"


def run(*args):
    """The exit status (argparse's usage errors exit; segcam's errors return 2)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_info:
        return exit_info.code


def _write_case(folder, name, seed, channels=1, shape=(14, 20, 18)):
    rng = np.random.default_rng(seed)
    for c in range(channels):
        image = sitk.GetImageFromArray((rng.standard_normal(shape) * 300).astype(np.float32))
        image.SetSpacing((0.9, 1.1, 1.3))
        image.SetOrigin((10.0, -4.0, 2.5))
        image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
        sitk.WriteImage(image, str(folder / f"{name}_{c:04d}.nii.gz"))


@pytest.fixture
def setup(tmp_path):
    model = make_model_folder(tmp_path / "model", folds=(0, 1), head_bias=(0.0, 0.0, -1.0))
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_case(raw, "liver_1", 1)
    _write_case(raw, "liver_2", 2, shape=(12, 17, 21))
    return model, raw


def _same_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing())
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin())
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_maps_and_segmentation_in_the_case_geometry(setup, tmp_path, capsys):
    model_folder, raw = setup
    out, reference = tmp_path / "out", tmp_path / "nnunet"
    code = run(
        "explain", "--nnunet", model_folder, "-f", "0", "1", "--save-seg",
        "--target", "predicted:liver", "--target", "box:tumour:1,2,3,9,12,7",
        "--layer", LAYER, "--out", out, raw,
    )  # fmt: skip
    assert code == 0
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(0, 1))
    predictor.predict_from_files(str(raw), str(reference), num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)  # fmt: skip
    model = nnunet.load(model_folder, folds="all")
    for case in ("liver_1", "liver_2"):
        folder = out / case
        written = sitk.ReadImage(str(reference / f"{case}.nii.gz"))
        ours = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
        _same_geometry(ours, written)
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(written))
        expected = nnunet.explain(
            model,
            [raw / f"{case}_0000.nii.gz"],
            [segcam.Predicted(1), segcam.Box(2, [(3, 7), (2, 12), (1, 9)])],  # (k, j, i)
            LAYER,
        )
        for t, name in enumerate(("t0-predicted-liver", "t1-box-tumour")):
            image = sitk.ReadImage(str(folder / f"seg-hires-grad-cam__{LAYER}__{name}.nii.gz"))
            _same_geometry(image, written)
            values = sitk.GetArrayFromImage(image)
            assert values.dtype == np.float32
            np.testing.assert_allclose(values, expected.maps[0, t].numpy(), rtol=1e-6, atol=1e-7)
        saved = segcam.load(folder / "seg-hires-grad-cam.npz")
        assert torch.equal(saved.pixel_sets, expected.pixel_sets)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["nnunet"]["folds"] == ["0", "1"]
        assert len(manifest["nnunet"]["checkpoint_sha256"]) == 2
        assert manifest["input"]["axes"] == "nnU-Net reader's array order (k, j, i)"
    # a rerun skips both cases; a changed channel file is done again
    capsys.readouterr()
    again = ["explain", "--nnunet", model_folder, "-f", "0", "1", "--save-seg",
             "--target", "predicted:liver", "--target", "box:tumour:1,2,3,9,12,7",
             "--layer", LAYER, "--out", out, raw]  # fmt: skip
    assert run(*again) == 0
    assert capsys.readouterr().err.count("already done, skipped") == 2
    _write_case(raw, "liver_2", 7, shape=(12, 17, 21))
    assert run(*again) == 0
    lines = capsys.readouterr().err
    assert lines.count("already done, skipped") == 1 and "liver_2_0000.nii.gz: 4 files" in lines


def test_one_bad_case_does_not_stop_the_others(setup, tmp_path, capsys):
    model_folder, raw = setup
    (raw / "broken_0000.nii.gz").write_bytes(b"not an image")
    code = run("explain", "--nnunet", model_folder, "--target", "all:1", "--layer", LAYER,
               "--out", tmp_path / "out", raw)  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "1 of 3 inputs failed" in captured.err and "cannot read the case" in captured.err
    assert (tmp_path / "out/liver_1/manifest.json").is_file()
    assert not (tmp_path / "out/broken/manifest.json").exists()
    assert "Traceback" not in captured.err


def test_usage_errors_are_one_line(setup, tmp_path, capsys):
    model_folder, raw = setup
    common = ["--layer", LAYER, "--out", tmp_path / "out", raw]
    cases = [
        (["--target", "predicted:spleen"], "'spleen'"),
        (["--target", "all:1", "--model", "monai:UNet"], "--nnunet: --model do not apply"),
        (["--target", "all:1", "-f", "3"], "no checkpoint_final.pth for fold(s) [3]"),
        (["--target", "all:1", "--step-size", "0"], "the step size is a fraction in (0, 1]"),
        (["--target", "all:1", "--layer", "decoder.stages.9"], "'decoder.stages.9' does not"),
    ]
    for extra, message in cases:
        assert run("explain", "--nnunet", model_folder, *extra, *common) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err
        assert not (tmp_path / "out" / "liver_1").exists()


def test_a_case_missing_a_channel(tmp_path, capsys):
    model_folder = make_model_folder(tmp_path / "model", channels=("CT", "T2"))
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_case(raw, "c", 1, channels=1)
    code = run("explain", "--nnunet", model_folder, "--target", "all:1", "--layer", LAYER,
               "--out", tmp_path / "out", raw)  # fmt: skip
    assert code == 2
    assert "case c: missing channel file(s) c_0001.nii.gz" in capsys.readouterr().err


def test_layers_lists_blocks_with_readable_names(setup, capsys):
    model_folder, _ = setup
    assert run("layers", "--nnunet", model_folder) == 0
    out = capsys.readouterr().out
    assert "classes: background, liver, tumour" in out
    assert "decoder.stages.1" in out and "decoder stage 1" in out
    assert "(1, 4, 16, 16, 16)" in out
    assert "convs.0.conv" not in out  # inner modules only with --all


def test_the_viewer_on_an_nnunet_case(setup, tmp_path):
    """``segcam view --nnunet``'s session: nnU-Net's segmentation, exact maps on request."""
    import base64

    from starlette.testclient import TestClient

    from segcam.apps.viewer.app import create_app
    from segcam.apps.viewer.nnunet_session import nnunet_session

    model_folder, raw = setup
    files = [str(raw / "liver_1_0000.nii.gz")]
    session = nnunet_session(str(model_folder), files)
    model = nnunet.load(model_folder, folds="all")
    expected_seg = nnunet.predict(model, files).segmentation  # SimpleITK's (k, j, i) order
    # the page works in the file's own (i, j, k) order, as nibabel reads it
    source = nibabel.load(files[0])
    assert session.spatial == source.shape == expected_seg.shape[::-1]
    assert np.array_equal(session.prediction, expected_seg.transpose(2, 1, 0))
    np.testing.assert_allclose(session.affine, source.affine, atol=1e-4)
    with TestClient(create_app(session)) as client:
        info = client.get("/api/info").json()
        assert info["classes"] == ["background", "liver", "tumour"]
        assert info["shape"] == list(source.shape)
        assert info["default_layer"] == "decoder.stages.1"
        labels = {entry["name"]: entry["label"] for entry in info["layers"]}
        assert labels["decoder.stages.1"] == "decoder stage 1"
        assert labels["encoder.stages.0"] == "encoder stage 0"
        assert all(m["name"] != "seg-score-cam" for m in info["methods"])
        box = {"kind": "box", "start": [4, 3, 2], "stop": [10, 12, 8]}  # (i, j, k)
        payload = {"class": 2, "target": box, "layer": LAYER, "axis": 2, "index": 5,
                   "methods": ["seg-hires-grad-cam"]}  # fmt: skip
        response = client.post("/api/explain", json=payload).json()
        shape = response["shape"]
        shown = np.frombuffer(base64.b64decode(response["maps"][0]["data"]), "<f4")
        expected = nnunet.explain(
            model, files, segcam.Box(2, [(2, 8), (3, 12), (4, 10)]), LAYER
        ).maps[0, 0]
        in_file_order = expected.numpy().transpose(2, 1, 0)
        cut = session.plane(2).cut(in_file_order, 5)  # radiological order (the case's affine)
        np.testing.assert_allclose(shown.reshape(shape), cut, rtol=1e-5, atol=1e-6)
        assert session.info()["planes"][2]["labels"]
        # a NIfTI export lies voxel for voxel on the source array, with its affine
        exported = client.post("/api/export", json={**payload, "method": "seg-hires-grad-cam",
                                                    "format": "nifti"})  # fmt: skip
        assert exported.status_code == 200
        written = tmp_path / "map.nii.gz"
        written.write_bytes(exported.content)
        image = nibabel.load(written)
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
        np.testing.assert_allclose(image.get_fdata(), in_file_order, rtol=1e-5, atol=1e-6)
        # the case's own label file (as nnU-Net writes it) is taken as an upload
        labels_file = tmp_path / "liver_1.nii.gz"
        writer = model.plans_manager.image_reader_writer_class()
        writer.write_seg(
            expected_seg.astype(np.uint8),
            str(labels_file),
            nnunet.read_case(model, files).properties,
        )
        uploaded = client.post(
            "/api/upload?client=a", content=labels_file.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["pixels"] == int((expected_seg != 0).sum())
        predicted = {"class": 1, "target": {"kind": "predicted"}, "layer": LAYER, "axis": 2,
                     "index": 5, "methods": ["seg-hires-grad-cam"]}  # fmt: skip
        response = client.post("/api/explain", json=predicted).json()
        assert response["pixels"] == int((expected_seg == 1).sum())
        with_upload = client.post("/api/explain", json={**predicted, "client": "a",
                                  "target": {"kind": "uploaded"}}).json()  # fmt: skip
        assert with_upload["pixels"] == int((expected_seg == 1).sum())  # its liver label
        same = np.frombuffer(base64.b64decode(with_upload["maps"][0]["data"]), "<f4")
        first = np.frombuffer(base64.b64decode(response["maps"][0]["data"]), "<f4")
        np.testing.assert_allclose(same, first, rtol=1e-6, atol=1e-7)


def test_worker_processes_explain_cases_as_one_process_does(setup, tmp_path):
    model_folder, raw = setup
    common = ["explain", "--nnunet", model_folder, "--target", "box:liver:0,0,0,9,9,9",
              "--layer", LAYER, raw]  # fmt: skip
    assert run(*common, "--out", tmp_path / "one") == 0
    assert run(*common, "--out", tmp_path / "two", "--num-workers", "2") == 0
    for case in ("liver_1", "liver_2"):
        name = f"seg-hires-grad-cam__{LAYER}__t0-box-liver.nii.gz"
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / case / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / case / name)))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_out_that_is_the_cases_folder_is_refused(setup, capsys):
    # it found no case, exited 0 and wrote its run file and lock among the cases (issue 22)
    model_folder, raw = setup
    code = run("explain", "--nnunet", model_folder, "--target", "all:1", "--layer", LAYER,
               "--out", raw, raw)  # fmt: skip
    assert code == 2
    assert "lies in the output folder" in capsys.readouterr().err
    assert sorted(p.name for p in raw.iterdir()) == ["liver_1_0000.nii.gz", "liver_2_0000.nii.gz"]


def test_the_nnunet_viewer_shows_the_case_s_own_label_file_as_its_truth(setup, tmp_path):
    # --ground-truth was silently ignored with --nnunet (issue 23)
    from segcam.apps.viewer.nnunet_session import nnunet_session
    from segcam.errors import InputFileError

    model_folder, raw = setup
    files = [str(raw / "liver_1_0000.nii.gz")]
    model = nnunet.load(model_folder, folds="all")
    case = nnunet.read_case(model, files)
    labels = nnunet.predict(model, files).segmentation.astype(np.uint8)
    labels[0, 0, 0] = 2  # not just the prediction: the file's own values
    writer = model.plans_manager.image_reader_writer_class()
    truth_file = tmp_path / "liver_1.nii.gz"
    writer.write_seg(labels, str(truth_file), case.properties)
    session = nnunet_session(str(model_folder), files, ground_truth=str(truth_file))
    assert session.ground_truth is not None
    # shown in the file's own order, as the page shows the case
    np.testing.assert_array_equal(session.ground_truth, labels.transpose(2, 1, 0))
    other = tmp_path / "other.nii.gz"
    writer.write_seg(labels[:-1], str(other), case.properties)
    with pytest.raises(InputFileError, match="but the case's is"):
        nnunet_session(str(model_folder), files, ground_truth=str(other))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nnunet_spellings_find_the_model_under_nnunet_results(setup, tmp_path, monkeypatch, capsys):
    """``-d 3 -c 3d_fullres -f 0 1 -i IN -o OUT -step_size 0.5 --disable_tta -device cpu``."""
    import shutil

    model_folder, raw = setup
    results = tmp_path / "results"
    trained = results / "Dataset003_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(model_folder, trained)
    monkeypatch.setenv("nnUNet_results", str(results))
    import importlib

    for name in ("nnunetv2.paths", "nnunetv2.utilities.dataset_name_id_conversion",
                 "nnunetv2.utilities.file_path_utilities"):  # fmt: skip
        module = importlib.import_module(name)
        if isinstance(getattr(module, "nnUNet_results", 0), str | None):  # before 2.8: read at
            # import once (a new process reads the variable); 2.8 reads it on use
            monkeypatch.setattr(module, "nnUNet_results", str(results))
    target = ["--target", "box:liver:0,0,0,9,9,9", "--layer", LAYER]
    nnunet_style = ["explain", "-d", "3", "-c", "3d_fullres", "-f", "0", "1", "-i", raw,
                    "-o", tmp_path / "a", "-step_size", "0.5", "--disable_tta",
                    "-device", "cpu"]  # fmt: skip
    assert run(*nnunet_style, *target) == 0
    segcam_style = ["explain", "--nnunet", model_folder, "--folds", "0", "1", "--step-size",
                    "0.5", "--disable-tta", "--device", "cpu", "--out", tmp_path / "b",
                    raw]  # fmt: skip
    assert run(*segcam_style, *target) == 0
    name = f"seg-hires-grad-cam__{LAYER}__t0-box-liver.nii.gz"
    for case in ("liver_1", "liver_2"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / case / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / case / name)))
        np.testing.assert_array_equal(a, b)
        manifest = json.loads((tmp_path / "a" / case / "manifest.json").read_text())
        assert manifest["nnunet"]["folder"] == str(trained) and not manifest["nnunet"]["mirroring"]
    # layers finds it the same way
    capsys.readouterr()
    assert run("layers", "-d", "Dataset003_Liver", "-c", "3d_fullres") == 0
    assert "decoder.stages.1" in capsys.readouterr().out
    # one clear line for each way to get it wrong
    wrong = [
        (["-d", "3"], "needs -c CONFIGURATION"),
        (["-c", "3d_fullres"], "give -d too"),
        (["-d", "3", "-c", "3d_fullres", "--nnunet", model_folder], "give one of them"),
        (["-d", "7", "-c", "3d_fullres"], "-d 7:"),
        (["-d", "3", "-c", "2d"], "no trained model at"),
    ]
    for flags, message in wrong:
        capsys.readouterr()
        assert run("explain", *flags, *target, "-o", tmp_path / "c", raw) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    monkeypatch.delenv("nnUNet_results")
    assert run("explain", "-d", "3", "-c", "3d_fullres", *target, "-o", tmp_path / "c", raw) == 2
    assert "nnUNet_results, which is not set" in capsys.readouterr().err
    assert run("explain", *target, "-o", tmp_path / "c") == 2
    assert "give the inputs" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_per_fold_writes_each_fold_s_maps_and_their_agreement(setup, tmp_path):
    model_folder, raw = setup
    out = tmp_path / "out"
    code = run(
        "explain", "--nnunet", model_folder, "-f", "0", "1", "--per-fold", "--no-relu",
        "--target", "box:liver:0,0,0,9,9,9", "--layer", LAYER, "--out", out,
        raw / "liver_1_0000.nii.gz",
    )  # fmt: skip
    assert code == 0
    folder = out / "liver_1"
    stem = f"seg-hires-grad-cam__{LAYER}__t0-box-liver"
    ensemble = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}.nii.gz")))
    folds = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}__fold_{f}.nii.gz")))
        for f in (0, 1)
    ]
    # without ReLU the folds' mean is the ensemble's map (each fold's share of the average)
    np.testing.assert_allclose((folds[0] + folds[1]) / 2, ensemble, rtol=1e-5, atol=1e-6)
    assert not np.allclose(folds[0], folds[1])  # two different networks
    manifest = json.loads((folder / "manifest.json").read_text())
    agreement = manifest["input"]["fold_agreement"]["seg-hires-grad-cam"][LAYER][0]
    assert -1 <= agreement["inside"] <= 1 and -1 <= agreement["around"] <= 1
    assert manifest["nnunet"]["per_fold"] is True
    assert f"{stem}__fold_1.nii.gz" in manifest["outputs"]
    assert "seg-hires-grad-cam__fold_0.npz" in manifest["outputs"]
