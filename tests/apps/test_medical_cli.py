"""The command line on DICOM series, NRRD, MetaImage and oblique NIfTI: maps in the input's own
format and geometry, aligned in physical space (issue 14)."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813  (the [medical] extra, dev)
import torch

import segcam
from medical_volumes import VOLUME, oblique_image, write_series
from segcam.apps.cli import main

MODEL = ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 3}']
ARGS = [*MODEL, "--target", "all:1", "--layer", "body.3", "--minmax"]


def run(*args):
    return main([str(a) for a in args])


def assert_same_grid(map_path, reference):
    written = sitk.ReadImage(str(map_path))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-5)
    return written


def test_a_dicom_series_among_other_inputs(tmp_path):
    inputs = tmp_path / "inputs"
    write_series(inputs / "patient1" / "ct", VOLUME, "1.2.826.0.1.3680043.2.1125.400")
    sitk.WriteImage(oblique_image(VOLUME.astype(np.float32)), str(inputs / "scan.nrrd"))
    out = tmp_path / "out"
    assert run("explain", inputs, *ARGS, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ct", "scan"]
    series = sitk.ReadImage(
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "patient1" / "ct"))
    )
    # DICOM in, DICOM out by default: a Parametric Map on the series' own slices
    import pydicom

    dicom_map = pydicom.dcmread(next((out / "ct").glob("seg-hires-grad-cam__*.dcm")))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "patient1" / "ct"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    saved = segcam.load(out / "ct" / "seg-hires-grad-cam.npz").maps[0, 0].numpy()
    assert dicom_map.NumberOfFrames == series.GetDepth() == saved.shape[2]
    for f, frame in enumerate(dicom_map.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        k = uids.index(source.ReferencedSOPInstanceUID)
        np.testing.assert_array_equal(dicom_map.pixel_array[f], saved[:, :, k].T)
    assert dicom_map.SeriesDescription.startswith("segcam seg-hires-grad-cam body.3 t0")
    assert (out / "ct" / "pixel_sets.dcm").is_file()  # the pixel set as a Segmentation
    nrrd_map = next((out / "scan").glob("*.nrrd"))  # NRRD in, NRRD out
    assert_same_grid(nrrd_map, sitk.ReadImage(str(inputs / "scan.nrrd")))
    manifest = (out / "ct" / "manifest.json").read_text(encoding="utf-8")
    assert '"sha256"' in manifest


@pytest.mark.parametrize("chosen", ["nrrd", "mha", "nifti"])
def test_map_format_for_a_dicom_series(tmp_path, chosen):
    write_series(tmp_path / "ct", VOLUME, "1.2.826.0.1.3680043.2.1125.500")
    out = tmp_path / "out"
    assert run("explain", tmp_path / "ct", *ARGS, "--map-format", chosen, "--out", out) == 0
    suffix = {"nrrd": ".nrrd", "mha": ".mha", "nifti": ".nii.gz"}[chosen]
    [map_path] = [p for p in (out / "ct").iterdir() if p.name.endswith(suffix)]
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    assert_same_grid(map_path, series)


def test_an_oblique_nifti_map_overlays_its_input(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.7, 2.4])
    affine[:3, 3] = (-20.0, 12.0, 40.0)
    volume = np.random.default_rng(2).normal(size=(12, 10, 6)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "oblique.nii.gz")
    out = tmp_path / "out"
    assert run("explain", tmp_path / "oblique.nii.gz", *ARGS, "--out", out) == 0
    [map_path] = list((out / "oblique").glob("*.nii.gz"))
    assert_same_grid(map_path, sitk.ReadImage(str(tmp_path / "oblique.nii.gz")))
    np.testing.assert_allclose(nibabel.load(map_path).affine, affine, atol=1e-5)


def test_map_format_needs_a_geometry_format(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((12, 10, 6), np.float32))
    assert (
        run("explain", tmp_path / "v.npy", *ARGS, "--map-format", "nrrd", "--out", tmp_path / "o")
        == 2
    )
    assert "--map-format nrrd needs a DICOM, NRRD or MetaImage input" in capsys.readouterr().err


def test_the_maps_are_the_library_maps(tmp_path):
    source = tmp_path / "scan.mha"
    sitk.WriteImage(oblique_image(VOLUME.astype(np.float32)), str(source))
    out = tmp_path / "out"
    assert run("explain", source, *ARGS, "--out", out) == 0
    saved = segcam.load(out / "scan" / "seg-hires-grad-cam.npz")
    array = np.swapaxes(VOLUME.astype(np.float32), 0, 2)
    x = torch.from_numpy((array - array.min()) / (array.max() - array.min()))[None, None]
    expected = segcam.explain(segcam.testing.tiny_segnet(3), x, segcam.AllPixels(1), "body.3")
    torch.testing.assert_close(saved.maps, expected.maps)


def test_a_folder_of_broken_dicom_files_is_one_line(tmp_path, capfd):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.dcm").write_bytes(b"not dicom")
    assert run("explain", tmp_path / "bad", *ARGS, "--out", tmp_path / "out") == 2
    err = capfd.readouterr().err  # ITK writes straight to the process's stderr
    assert err == f"segcam: error: {tmp_path / 'bad'}: no DICOM series found\n"


def test_a_mask_file_whose_voxels_lie_elsewhere_is_refused(tmp_path, capsys):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    volume = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[:4] = 1
    nibabel.save(nibabel.Nifti1Image(mask, affine), tmp_path / "same.nii.gz")
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 22.5  # the same place, stored the other way round
    nibabel.save(nibabel.Nifti1Image(mask[::-1].copy(), flipped), tmp_path / "flipped.nii.gz")
    nibabel.save(nibabel.Nifti1Image(mask, np.diag([1, 1, 1, 1.0])), tmp_path / "spacing.nii.gz")
    common = ["explain", tmp_path / "vol.nii.gz", *MODEL, "--layer", "body.3"]
    assert run(*common, "--target", f"mask:1:{tmp_path / 'same.nii.gz'}", "--out",
               tmp_path / "ok") == 0  # fmt: skip
    for name in ("flipped", "spacing"):
        capsys.readouterr()
        code = run(*common, "--target", f"mask:1:{tmp_path / name}.nii.gz", "--out",
                   tmp_path / name)  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "the mask file's affine differs from the input's" in err, err
        assert "resample it onto the input's grid" in err


def test_the_viewer_takes_a_dicom_folder_and_orients_nrrd_as_nifti(tmp_path, capsys):
    # `segcam view series_folder/` was "no such file"; an oblique NRRD was shown unoriented
    from segcam.apps.cli.view import _affine_of
    from segcam.io.files import read_input

    series = tmp_path / "ct"
    write_series(series, VOLUME, "1.2.826.0.1.3680043.2.1125.401")
    assert run("view", series, *MODEL, "--ground-truth", tmp_path / "nope.nii.gz") == 2
    assert "nope.nii.gz: no such file" in capsys.readouterr().err  # past the input's check
    image = oblique_image(VOLUME.astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    oriented = _affine_of(read_input(tmp_path / "v.nrrd"))
    assert oriented is not None
    np.testing.assert_allclose(oriented, _affine_of(read_input(tmp_path / "v.nii.gz")), atol=1e-4)
    np.testing.assert_allclose(_affine_of(read_input(series)), oriented, atol=1e-3)


def test_dicom_maps_where_a_series_can_take_them_and_one_line_where_not(tmp_path, capsys):
    import json

    nifti = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(VOLUME.astype(np.float32), np.eye(4)), nifti)
    assert run("explain", nifti, *ARGS, "--map-format", "dicom", "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "--map-format dicom needs a DICOM series input" in err and err.count("\n") == 1
    # a series without a Frame of Reference: auto falls back to NIfTI, and says so
    write_series(tmp_path / "bare", VOLUME, "1.2.826.0.1.3680043.2.1125.510",
                 frame_of_reference=False)  # fmt: skip
    assert run("explain", tmp_path / "bare", *ARGS, "--out", tmp_path / "b") == 0
    assert next((tmp_path / "b" / "bare").glob("*.nii.gz"))
    manifest = json.loads((tmp_path / "b" / "bare" / "manifest.json").read_text())
    assert manifest["input"]["map_format"] == "nifti"
    capsys.readouterr()
    code = run("explain", tmp_path / "bare", *ARGS, "--map-format", "dicom", "--out",
               tmp_path / "c")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no Frame of Reference UID" in err and err.count("\n") == 1
    assert not list((tmp_path / "c").rglob("*.dcm"))
