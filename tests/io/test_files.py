"""Input readers: images, NumPy, NIfTI; clear errors for what cannot be read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segcam.apps.specs import apply_intensity, load_callable
from segcam.io.files import InputFileError, read_input


def test_grey_and_rgb_images(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    read = read_input(tmp_path / "grey.png")
    assert read.array.shape == (1, 3, 4) and np.array_equal(read.array[0], grey)
    rgb = np.stack([grey, grey // 2, grey // 4], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100)
    assert read_input(tmp_path / "rgb.jpg").array.shape == (3, 3, 4)
    deep = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    read = read_input(tmp_path / "deep.tif")
    assert read.spatial_dims == 2 and np.array_equal(read.array[0], deep)


def test_numpy_layouts(tmp_path):
    cases = {
        (5, 6): (1, 5, 6),
        (3, 5, 6): (3, 5, 6),
        (8, 5, 6): (1, 8, 5, 6),
        (2, 8, 5, 6): (2, 8, 5, 6),
    }
    for shape, expected in cases.items():
        np.save(tmp_path / "a.npy", np.ones(shape, dtype=np.int16))
        read = read_input(tmp_path / "a.npy")
        assert read.array.shape == expected and read.array.dtype == np.float32
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputFileError, match="cannot read"):
        read_input(tmp_path / "objects.npy")  # never unpickled


def test_nifti_channels_last_become_first(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 2)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v.nii")
    read = read_input(tmp_path / "v.nii")
    assert read.array.shape == (2, 4, 5, 6)
    np.testing.assert_allclose(read.array[1], data[..., 1])
    np.testing.assert_allclose(read.nifti_affine, np.diag([2.0, 2.0, 3.0, 1.0]))


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        read_input(tmp_path / "absent.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputFileError, match="unsupported file type"):
        read_input(tmp_path / "notes.txt")
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)
    with pytest.raises(InputFileError, match=r"fake\.jpg: cannot read"):
        read_input(tmp_path / "fake.jpg")


def test_intensity_options():
    hounsfield = np.array([[[-1000.0, -200.0, 50.0, 300.0, 2000.0]]])
    np.testing.assert_allclose(
        apply_intensity(hounsfield, window=(-200, 300))[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0]
    )
    scored = apply_intensity(hounsfield, zscore=True)
    assert abs(float(scored.mean())) < 1e-6 and abs(float(scored.std()) - 1) < 1e-5
    np.testing.assert_allclose(apply_intensity(hounsfield, minmax=True).max(), 1.0)
    negate = load_callable("numpy:negative", "--preprocess")
    np.testing.assert_allclose(apply_intensity(hounsfield, preprocess=negate), -hounsfield)


def test_a_multi_page_tiff_says_which_page_it_explains(tmp_path):
    from PIL import Image

    pages = [Image.fromarray(np.full((6, 7), v, np.uint8)) for v in (10, 20, 30)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match=r"stack.tif holds 3 pages; explaining the first"):
        data = read_input(path)
    assert data.array.shape == (1, 6, 7) and float(data.array.max()) == 10.0
