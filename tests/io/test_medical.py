"""DICOM (real files from pydicom's test data, and series written with known geometry), NRRD and
MetaImage read with their geometry; maps written back overlay them voxel for voxel (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom  # the [medical] extra (dev)
import pytest
import SimpleITK as sitk  # noqa: N813

from medical_volumes import OBLIQUE, VOLUME, oblique_image, write_series
from segcam.errors import InputFileError
from segcam.io.files import read_input
from segcam.io.medical import read_medical, write_like


def test_a_real_ct_slice_in_hounsfield_units():
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    data = read_input(path)
    assert data.kind == "medical" and data.array.shape == (1, *dataset.pixel_array.shape)
    np.testing.assert_array_equal(data.array[0], expected.astype(np.float32))
    assert float(dataset.RescaleIntercept) != 0  # the rescale really was applied
    spacing = [float(v) for v in dataset.PixelSpacing]
    assert data.medical.geometry.spacing[:2] == pytest.approx(spacing[::-1])


def test_a_series_with_oblique_geometry(tmp_path):
    write_series(tmp_path / "series", VOLUME, "1.2.826.0.1.3680043.2.1125.100")
    volume = read_medical(tmp_path / "series")
    assert volume.format == "dicom" and volume.array.shape == (1, 12, 10, 6)
    np.testing.assert_array_equal(volume.array[0], np.swapaxes(VOLUME, 0, 2).astype(np.float32))
    assert volume.geometry.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert volume.geometry.origin == pytest.approx((-10.0, 5.0, 30.0))
    assert volume.geometry.direction == pytest.approx(OBLIQUE, abs=1e-5)


def test_a_folder_with_two_series(tmp_path):
    write_series(tmp_path / "both", VOLUME, "1.2.826.0.1.3680043.2.1125.201")
    write_series(tmp_path / "both", VOLUME[:3], "1.2.826.0.1.3680043.2.1125.202")
    with pytest.warns(UserWarning, match=r"holds 2 DICOM series; explaining the largest"):
        largest = read_medical(tmp_path / "both")
    assert largest.array.shape[-1] == 6
    chosen = read_medical(tmp_path / "both", series_uid="1.2.826.0.1.3680043.2.1125.202")
    assert chosen.array.shape[-1] == 3
    with pytest.raises(InputFileError, match=r"no series 1\.2\.3; the series here: .*\(6 files\)"):
        read_medical(tmp_path / "both", series_uid="1.2.3")


def test_a_mixed_series_is_refused(tmp_path):
    write_series(tmp_path / "mixed", VOLUME, "1.2.826.0.1.3680043.2.1125.300", tilt_slice=2)
    with pytest.raises(InputFileError, match="mixes slices of different orientation"):
        read_medical(tmp_path / "mixed")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_maps_overlay_an_oblique_volume_voxel_for_voxel(tmp_path, suffix):
    source = tmp_path / f"volume{'.nrrd' if suffix == '.nii.gz' else suffix}"
    sitk.WriteImage(oblique_image(VOLUME.astype(np.float32)), str(source))
    volume = read_medical(source)
    heat = np.random.default_rng(1).random(volume.array.shape[1:]).astype(np.float32)  # (i, j, k)
    written = write_like(tmp_path / f"map{suffix}", heat, volume)
    back = sitk.ReadImage(str(written))
    reference = volume.reference
    assert back.GetSize() == reference.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=1e-5)
    for index in [(0, 0, 0), (11, 9, 5), (3, 7, 2)]:  # the same voxel, at the same place
        assert back.GetPixel(index) == pytest.approx(float(heat[index]))
        np.testing.assert_allclose(
            back.TransformIndexToPhysicalPoint(index),
            reference.TransformIndexToPhysicalPoint(index),
            atol=1e-4,
        )
    assert not [p for p in os.listdir(tmp_path) if ".part" in p]


def test_a_damaged_file_is_one_clear_error(tmp_path):
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\n")
    with pytest.raises(InputFileError, match=r"broken\.nrrd: cannot read"):
        read_input(tmp_path / "broken.nrrd")


def test_a_series_written_from_the_demo_ct(tmp_path):
    from segcam.apps.demo import data

    case = data.load_case()
    crop = case.image[32:96, 40:104, 50:66]  # (i, j, k) in HU: 64 x 64 x 16
    write_series(tmp_path / "ct", np.swapaxes(crop, 0, 2), "1.2.826.0.1.3680043.2.1125.600")
    volume = read_medical(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array[0], crop.astype(np.int16).astype(np.float32))
    assert volume.geometry.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert volume.geometry.direction == pytest.approx(OBLIQUE, abs=1e-5)
    assert volume.array.min() < -500 and volume.array.max() > 100  # air and tissue, in HU


def test_what_itk_prints_to_stderr_becomes_part_of_the_one_error(tmp_path):
    header = tmp_path / "a.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"
        "ElementDataFile = missing.raw\n"
    )
    script = (
        "import sys\nfrom segcam.io.medical import read_medical\nfrom segcam.errors import "
        "InputFileError\ntry:\n    read_medical(sys.argv[1])\nexcept InputFileError as e:\n"
        "    print(e, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(header)], capture_output=True, text=True, timeout=120
    )
    assert done.stderr.count("\n") == 1, done.stderr  # ITK's own line no longer beside it
    assert "a.mhd: cannot read (MetaImage: Read: Cannot open data file;" in done.stderr
    assert "0x" not in done.stderr  # no object address


def test_the_capture_leaves_python_stderr_and_the_descriptor_as_they_were(tmp_path, capfd):
    from segcam.io.medical import _c_stderr

    with _c_stderr() as said:
        os.write(2, b"printed by C code\n")
        print("printed by Python", file=sys.stderr)
    assert said.lines == ["printed by C code"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "printed by Python\nafter\n"


def test_the_ras_affine_of_itk_geometry_is_the_nifti_affine_of_the_same_image(tmp_path):
    from segcam.io.medical import ras_affine

    image = oblique_image(VOLUME.astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))  # ITK writes the NIfTI affine itself
    nrrd, nifti = read_input(tmp_path / "v.nrrd"), read_input(tmp_path / "v.nii.gz")
    assert nrrd.medical is not None and nifti.nifti_affine is not None
    np.testing.assert_allclose(ras_affine(nrrd.medical), nifti.nifti_affine, atol=1e-4)
