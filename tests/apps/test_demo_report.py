"""`segcam demo` writes a self-contained report and aligned NIfTI files."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from segcam.apps.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_report_is_self_contained(demo_out):
    page = (demo_out / "report.html").read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    # four held-out slices, liver and tumour in 3D, four held-out slices of the nnU-Net model
    assert len(images) == 4 + 2 + 4
    assert all(len(image) > 10_000 for image in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("held-out Dice") == 3
    assert "nnU-Net v2 model (the held-out slab as a case)" in page
    # sharp figures (they were 80 dpi: column titles 6 px tall), tables outside paragraphs
    from PIL import Image

    for image in images:
        figure = Image.open(io.BytesIO(base64.b64decode(image)))
        assert figure.info["dpi"][0] == pytest.approx(150, abs=1) and figure.width > 2000
    paragraphs = re.findall(r"<p>(.*?)</p>", page, flags=re.S)
    assert paragraphs and not any("<table" in text for text in paragraphs)
    assert "window seams of Seg-Grad CAM" in page


def test_nnunet_maps_share_the_case_geometry(demo_out):
    sitk = pytest.importorskip("SimpleITK")
    folder = demo_out / "nnunet"
    case = sitk.ReadImage(str(folder / "heldout_0000.nii.gz"))
    segmentation = sitk.ReadImage(str(folder / "heldout.nii.gz"))
    assert case.GetSize() == segmentation.GetSize() == (128, 128, 24)
    predicted = sitk.GetArrayFromImage(segmentation)
    for t, name in enumerate(("liver", "tumour")):
        for method in ("seg-grad-cam", "seg-hires-grad-cam"):
            stem = f"{method}__decoder.stages.2__t{t}-predicted-{name}"
            image = sitk.ReadImage(str(folder / f"{stem}.nii.gz"))
            assert image.GetSize() == case.GetSize()
            assert image.GetSpacing() == case.GetSpacing()
            assert image.GetOrigin() == case.GetOrigin()
            heat = sitk.GetArrayFromImage(image)
            assert heat.max() == pytest.approx(1.0) and heat.min() >= 0
    liver = sitk.GetArrayFromImage(
        sitk.ReadImage(
            str(folder / "seg-hires-grad-cam__decoder.stages.2__t0-predicted-liver.nii.gz")
        )
    )
    assert liver[predicted == 1].sum() > liver[predicted != 1].sum()


def test_nifti_files_are_aligned(demo_out, capsys):
    nibabel = pytest.importorskip("nibabel")
    names = ["ct", "labels", "prediction"] + [
        f"{m}__model.1.submodule.2__t{t}-predicted-{c}"
        for t, c in enumerate(("liver", "tumour"))
        for m in ("seg-grad-cam", "seg-hires-grad-cam")
    ]
    images = {name: nibabel.load(demo_out / f"{name}.nii.gz") for name in names}
    for image in images.values():
        assert image.shape == (128, 128, 128)
        np.testing.assert_array_equal(image.affine, images["ct"].affine)
    labels = np.asarray(images["labels"].dataobj)
    prediction = np.asarray(images["prediction"].dataobj)
    assert set(np.unique(labels)) == {0, 1, 2} and (prediction == 1).sum() > 100_000
    hires = np.asarray(
        images["seg-hires-grad-cam__model.1.submodule.2__t0-predicted-liver"].dataobj
    )
    assert hires.max() == pytest.approx(1.0) and hires.min() >= 0
    # the liver map lies mostly on the predicted liver: positive evidence inside the target
    assert hires[prediction == 1].sum() > hires[prediction != 1].sum()


def test_the_demo_says_why_its_nnunet_section_is_left_out(monkeypatch):
    import importlib.util

    from segcam.apps.demo import report

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nnunetv2" else real(name, *a)
    )
    reason = report.nnunet_missing()
    assert reason is not None and "segcam[nnunet]" in reason and not report.nnunet_available()
