"""`segcam demo` writes a self-contained report and aligned NIfTI files."""

from __future__ import annotations

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
    assert len(images) == 4 + 2  # four held-out slices, then liver and tumour in 3D
    assert all(len(image) > 10_000 for image in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("held-out Dice") == 2


def test_nifti_files_are_aligned(demo_out, capsys):
    nibabel = pytest.importorskip("nibabel")
    names = ["ct", "labels", "prediction"] + [
        f"heatmap_{c}_{m}"
        for c in ("liver", "tumour")
        for m in ("seg-grad-cam", "seg-hires-grad-cam")
    ]
    images = {name: nibabel.load(demo_out / f"{name}.nii.gz") for name in names}
    for image in images.values():
        assert image.shape == (128, 128, 128)
        np.testing.assert_array_equal(image.affine, images["ct"].affine)
    labels = np.asarray(images["labels"].dataobj)
    prediction = np.asarray(images["prediction"].dataobj)
    assert set(np.unique(labels)) == {0, 1, 2} and (prediction == 1).sum() > 100_000
    hires = np.asarray(images["heatmap_liver_seg-hires-grad-cam"].dataobj)
    assert hires.max() == pytest.approx(1.0) and hires.min() >= 0
    # the liver map lies mostly on the predicted liver: positive evidence inside the target
    assert hires[prediction == 1].sum() > hires[prediction != 1].sum()
