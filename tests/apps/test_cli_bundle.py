"""``segcam explain --bundle``: images through a MONAI bundle's pipeline, maps on the CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

import nibabel as nib

import segcam
from segcam.apps.cli import main
from segcam.monai import load_bundle
from segcam.testing.bundles import NETWORK as NETWORK_3D
from segcam.testing.bundles import write_bundle, write_oblique_ct

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
LAYER = "model.1.submodule"


def run(*args):
    """The exit status (argparse's usage errors exit; segcam's errors return 2)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture
def setup(tmp_path):
    bundle = write_bundle(tmp_path / "spleen_ct_segmentation", seed=4)
    images = tmp_path / "images"
    images.mkdir()
    write_oblique_ct(images / "case_a.nii.gz", seed=1)
    write_oblique_ct(images / "case_b.nii.gz", (36, 40, 18), seed=2)
    return bundle, images


def test_maps_lie_on_the_ct_and_equal_the_library_s(setup, tmp_path, capsys):
    bundle, images = setup
    out = tmp_path / "out"
    code = run(
        "explain", "--bundle", bundle, images, "--target", "predicted:spleen",
        "--target", "box:0:4,4,2,20,20,10", "--layer", LAYER, "--method", "seg-hires-grad-cam",
        "--method", "seg-grad-cam", "-o", out, "--save-seg", "--quiet",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""  # MONAI's notes about itself stay out of the output
    ct = nib.load(images / "case_a.nii.gz")
    folder = out / "case_a"
    name = f"seg-hires-grad-cam__{LAYER}__t0-predicted-spleen.nii.gz"
    written = nib.load(folder / name)
    assert written.shape == ct.shape == (40, 36, 20)
    np.testing.assert_allclose(written.affine, ct.affine, atol=1e-5)
    expected = segcam.monai.explain_methods(
        load_bundle(bundle), images / "case_a.nii.gz",
        [segcam.Predicted(1), segcam.Box(0, [(4, 20), (4, 20), (2, 10)])], LAYER,
        ["seg-hires-grad-cam", "seg-grad-cam"],
    )  # fmt: skip
    for t in (0, 1):
        assert float(expected["seg-hires-grad-cam"].maps[0, t].max()) > 0
    np.testing.assert_allclose(
        np.asarray(written.dataobj), expected["seg-hires-grad-cam"].maps[0, 0].numpy(), atol=1e-6
    )
    saved = segcam.load(folder / "seg-grad-cam.npz")
    torch.testing.assert_close(saved.maps, expected["seg-grad-cam"].maps)
    segmentation = nib.load(folder / "case_a_seg.nii.gz")
    labels = np.asarray(segmentation.dataobj)
    assert np.array_equal(labels == 1, expected["seg-hires-grad-cam"].pixel_sets[0, 0].numpy())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["classes"] == ["background", "spleen"]  # from the bundle's metadata.json
    assert set(manifest["bundle"]["sha256"]) == {
        "configs/inference.json", "configs/metadata.json", "models/model.pt",
    }  # fmt: skip
    assert manifest["input"]["inverse"] == ["Orientation", "SpatialResample"]
    assert (out / "case_b" / "manifest.json").is_file()
    # a rerun finds both done; a changed checkpoint is another model
    again = ["explain", "--bundle", bundle, images, "--target", "predicted:spleen", "--target",
             "box:0:4,4,2,20,20,10", "--layer", LAYER, "--method", "seg-hires-grad-cam",
             "--method", "seg-grad-cam", "-o", out, "--save-seg"]  # fmt: skip
    assert run(*again) == 0
    assert capsys.readouterr().err.count("already done, skipped") == 2
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: v * 1.5 for k, v in state.items()}, bundle / "models" / "model.pt")
    assert run(*again) == 2
    err = capsys.readouterr().err
    assert "made with other settings (bundle.sha256.models/model.pt: '" in err
    assert err.count("\n") == 1


def test_options_the_bundle_gives_are_refused_in_one_line(setup, tmp_path, capsys):
    bundle, images = setup
    base = ["explain", "--bundle", bundle, images / "case_a.nii.gz", "--target", "predicted:1",
            "--layer", LAYER, "-o", tmp_path / "o"]  # fmt: skip
    cases = [
        (["--sliding-window", "32"], "--sliding-window do not apply"),
        (["--model", "monai:UNet"], "--model do not apply"),
        (["--window", "-57,164"], "--window do not apply"),
        (["--no-upsample"], "--no-upsample do not apply"),
        (["--per-fold"], "nnU-Net's options"),
        (["--method", "seg-score-cam"], "gradient-free"),
        (["--logits-from", "probabilities"], "--logits-from do not apply"),
        (["--model-kwargs", '{"a": 1}'], "--model-kwargs do not apply"),
        (["--trust-pickle"], "--trust-pickle do not apply"),
        (["--weights-key", "ema"], "--weights-key do not apply"),
    ]
    for extra, message in cases:
        assert run(*base, *extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert run(*base[:2], tmp_path / "nowhere", *base[3:]) == 2
    assert "no such bundle folder" in capsys.readouterr().err
    bad_target = [*base[:4], "--target", "probability:1", *base[6:]]
    assert run(*bad_target) == 2
    err = capsys.readouterr().err
    assert "probability threshold is not defined" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.npz"))


def test_a_batch_goes_on_past_an_image_the_bundle_cannot_read(setup, tmp_path, capsys):
    bundle, images = setup
    (images / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    code = run("explain", "--bundle", bundle, images, "--target", "predicted:spleen",
               "--layer", LAYER, "-o", out, "--quiet")  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 3 inputs failed" in err and "broken.nii.gz" in err
    assert "Traceback" not in err
    assert (out / "case_a" / "manifest.json").is_file()
    assert (out / "case_b" / "manifest.json").is_file()
    assert not (out / "broken").exists() or not any((out / "broken").iterdir())


def test_the_viewer_on_a_bundle(setup, tmp_path, capsys):
    """``segcam view --bundle``'s session: the bundle's segmentation, exact maps on request."""
    import base64

    from starlette.testclient import TestClient

    from segcam.apps.viewer.app import create_app
    from segcam.apps.viewer.bundle_session import bundle_session

    bundle, images = setup
    image = images / "case_a.nii.gz"
    loaded = load_bundle(bundle)
    prediction = segcam.monai.predict(loaded, segcam.monai.read_case(loaded, image))
    truth = tmp_path / "truth.nii.gz"
    labels = prediction.labels.numpy().astype(np.uint8)
    source = nib.load(image)
    nib.save(nib.Nifti1Image(labels, source.affine), truth)
    session = bundle_session(bundle, image, ground_truth=truth)
    assert session.spatial == source.shape
    assert np.array_equal(session.prediction, labels)
    np.testing.assert_array_equal(session.ground_truth, labels)
    np.testing.assert_allclose(session.affine, source.affine, atol=1e-5)
    assert session.intensity_unit == "HU"  # the bundle windows a CT (-57..164)
    with TestClient(create_app(session)) as client:
        info = client.get("/api/info").json()
        assert info["classes"] == ["background", "spleen"]
        assert info["shape"] == list(source.shape)
        assert LAYER in [entry["name"] for entry in info["layers"]]
        assert all(m["name"] != "seg-score-cam" for m in info["methods"])
        box = {"kind": "box", "start": [4, 3, 2], "stop": [20, 22, 12]}
        payload = {"class": 1, "target": box, "layer": LAYER, "axis": 2, "index": 6,
                   "methods": ["seg-hires-grad-cam"]}  # fmt: skip
        response = client.post("/api/explain", json=payload)
        assert response.status_code == 200, response.text
        answer = response.json()
        shown = np.frombuffer(base64.b64decode(answer["maps"][0]["data"]), "<f4")
        expected = segcam.monai.explain(
            loaded, image, segcam.Box(1, [(4, 20), (3, 22), (2, 12)]), LAYER
        ).maps[0, 0]
        assert float(expected.max()) > 0
        cut = session.plane(2).cut(expected.numpy(), 6)
        np.testing.assert_allclose(shown.reshape(answer["shape"]), cut, rtol=1e-5, atol=1e-6)
        predicted = {**payload, "target": {"kind": "predicted"}}
        answer = client.post("/api/explain", json=predicted).json()
        assert answer["pixels"] == int((labels == 1).sum()) > 0
        exported = client.post("/api/export", json={**payload, "method": "seg-hires-grad-cam",
                                                    "format": "nifti"})  # fmt: skip
        assert exported.status_code == 200
        written = tmp_path / "map.nii.gz"
        written.write_bytes(exported.content)
        np.testing.assert_allclose(nib.load(written).affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(nib.load(written).get_fdata(), expected.numpy(), atol=1e-6)
    # the command line refuses what the bundle gives, in one line, before serving
    assert run("view", "--bundle", bundle, image, "--window", "0,1", "--no-browser") == 2
    err = capsys.readouterr().err
    assert "--window do not apply" in err and err.count("\n") == 1
    assert run("view", "--bundle", bundle, "--no-browser") == 2
    assert "needs an image" in capsys.readouterr().err


def test_a_map_format_the_input_cannot_take_is_refused_before_any_work(setup, tmp_path, capsys):
    bundle, images = setup
    out = tmp_path / "out"
    code = run("explain", "--bundle", bundle, images / "case_a.nii.gz", "--target",
               "predicted:1", "--layer", LAYER, "-o", out, "--map-format", "nrrd")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--map-format nrrd needs a DICOM, NRRD or MetaImage input" in err
    assert err.count("\n") == 1
    assert not list(out.rglob("*.npz"))  # nothing half-written


def test_a_2d_bundle_writes_png_maps_and_a_multi_label_one_its_channels(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((30, 44)) * 255).astype(np.uint8)
    pixels[5:15, 10:30] = 250
    Image.fromarray(pixels).save(tmp_path / "img.png")
    network = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
               "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}  # fmt: skip
    steps = [{"_target_": "LoadImaged", "keys": "image"},
             {"_target_": "EnsureChannelFirstd", "keys": "image"},
             {"_target_": "ScaleIntensityd", "keys": "image"},
             {"_target_": "Resized", "keys": "image", "spatial_size": [32, 48]}]  # fmt: skip
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [16, 16], "sw_batch_size": 2}
    flat = write_bundle(tmp_path / "flat", network=network, preprocessing=steps,
                        inferer=inferer, save=False)  # fmt: skip
    out = tmp_path / "out"
    code = run("explain", "--bundle", flat, tmp_path / "img.png", "--target", "predicted:1",
               "--layer", LAYER, "-o", out, "--save-seg", "--quiet")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in (out / "img").iterdir())
    assert f"seg-hires-grad-cam__{LAYER}__t0-predicted-spleen.png" in written
    assert "img_seg.png" in written
    # written in the file's own (rows, columns), over the image (MONAI's reader gives (x, y))
    assert np.asarray(Image.open(out / "img" / "img_seg.png")).shape == pixels.shape
    overlay = np.asarray(
        Image.open(out / "img" / f"seg-hires-grad-cam__{LAYER}__t0-predicted-spleen.png")
    )
    assert overlay.shape[:2] == pixels.shape
    # a multi-label bundle: --save-seg writes its channels, as its SaveImaged would
    multi = write_bundle(tmp_path / "multi", network={**NETWORK_3D, "out_channels": 3},
                         classes=("tc", "wt", "et"), activation="sigmoid", seed=5)  # fmt: skip
    write_oblique_ct(tmp_path / "ct.nii.gz")
    code = run("explain", "--bundle", multi, tmp_path / "ct.nii.gz", "--target", "predicted:wt",
               "--layer", LAYER, "-o", tmp_path / "m", "--save-seg", "--quiet")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    channels = nib.load(tmp_path / "m" / "ct" / "ct_seg.nii.gz")
    assert channels.shape == (40, 36, 20, 3)
    saved = segcam.load(tmp_path / "m" / "ct" / "seg-hires-grad-cam.npz")
    assert np.array_equal(
        np.asarray(channels.dataobj)[..., 1] > 0.5, saved.pixel_sets[0, 0].numpy()
    )


def test_the_viewer_refuses_a_truth_file_of_another_grid(setup, tmp_path):
    from segcam.apps.viewer.bundle_session import bundle_session
    from segcam.errors import InputFileError

    bundle, images = setup
    source = nib.load(images / "case_a.nii.gz")
    shifted = source.affine.copy()
    shifted[0, 3] += 7.0  # the same shape, 7 mm away
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), shifted), tmp_path / "t.nii.gz")
    with pytest.raises(InputFileError, match="its affine differs from the image's"):
        bundle_session(bundle, images / "case_a.nii.gz", ground_truth=tmp_path / "t.nii.gz")
