"""segcam.io.writing: the one writer every format goes through (folder, temporary name, rename)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813  (the [medical] extra, dev)
import torch

import segcam
from segcam.apps.batch import outputs as batch_outputs
from segcam.apps.cli import main
from segcam.errors import OutputFileError
from segcam.io.writing import atomic_path, atomic_write, file_mode
from segcam.testing import tiny_segnet


def test_atomic_write_creates_the_folder_and_gives_the_umask_mode(tmp_path):
    destination = tmp_path / "new" / "deeper" / "a.json"
    with atomic_write(destination, "w") as stream:
        stream.write("{}")
    assert destination.read_text(encoding="utf-8") == "{}"
    assert destination.stat().st_mode & 0o777 == file_mode()
    assert sorted(p.name for p in destination.parent.iterdir()) == ["a.json"]


def test_atomic_path_keeps_the_format_suffix_and_a_unique_name(tmp_path):
    seen = []
    for _ in range(2):
        with atomic_path(tmp_path / "map.nii.gz") as temporary:
            assert temporary.parent == tmp_path and temporary.is_file()
            assert temporary.name.startswith(".map.nii.gz.")
            assert temporary.name.endswith(".part.nii.gz")
            temporary.write_bytes(b"x")
            seen.append(temporary.name)
    assert seen[0] != seen[1]
    assert (tmp_path / "map.nii.gz").read_bytes() == b"x"


def test_a_name_near_the_file_system_limit_still_has_room_for_its_temporary(tmp_path):
    destination = tmp_path / ("z" * 240 + ".npz")  # 244 bytes: a temporary of the whole is not
    with atomic_write(destination) as stream:
        stream.write(b"data")
    assert destination.read_bytes() == b"data"
    assert os.listdir(tmp_path) == [destination.name]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    destination = tmp_path / "out.bin"
    destination.write_bytes(b"old")
    failing = pytest.raises(OutputFileError, match=r"cannot write .*out\.bin: disk on fire")
    with failing, atomic_path(destination) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk on fire")  # ITK's error type
    assert destination.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    # not an I/O error: passes unchanged, and the temporary file is gone all the same
    with pytest.raises(KeyError), atomic_write(destination) as stream:
        stream.write(b"half")
        raise KeyError("mine")
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_folder_that_cannot_be_made_is_one_output_error(tmp_path):
    (tmp_path / "file").write_text("in the way", encoding="utf-8")
    refused = pytest.raises(OutputFileError, match=r"cannot create the output folder .*file")
    with refused, atomic_write(tmp_path / "file" / "a.npz") as stream:
        stream.write(b"never")


def test_explanation_save_makes_its_folder(tmp_path):
    model = tiny_segnet(spatial_dims=2).eval()
    expl = segcam.explain(model, torch.zeros(1, 1, 8, 8), segcam.AllPixels(1), "body.3")
    path = expl.save(tmp_path / "not" / "there" / "maps.npz")
    assert segcam.load(path).maps.shape == expl.maps.shape


def test_every_format_lands_while_another_writer_thread_is_slow(tmp_path, monkeypatch):
    # The batch writes an input's .npz and its maps on several threads. Each writer must make
    # the input's folder itself: with the .npz writer delayed, the MetaImage map is written
    # first into a folder nobody has made yet (a fresh clone's make test once failed so).
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 12, 10), np.float32))
    image.SetSpacing((0.8, 0.9, 2.5))
    source = tmp_path / "scan.mha"
    sitk.WriteImage(image, str(source))
    others_done = threading.Event()
    pool_class = batch_outputs.ThreadPoolExecutor

    class NpzLastPool(pool_class):  # the .npz writer waits until a map has been written
        def submit(self, function, *arguments, **keywords):
            if any(str(a).endswith(".npz") for a in arguments):

                def delayed(*a, **k):
                    others_done.wait(timeout=5)
                    return function(*a, **k)

                return super().submit(delayed, *arguments, **keywords)

            def signalling(*a, **k):
                try:
                    return function(*a, **k)
                finally:
                    others_done.set()

            return super().submit(signalling, *arguments, **keywords)

    monkeypatch.setattr(batch_outputs, "ThreadPoolExecutor", NpzLastPool)
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(source),
            "--model",
            "segcam.testing:tiny_segnet",
            "--model-kwargs",
            '{"spatial_dims": 3}',
            "--target",
            "all:1",
            "--layer",
            "body.3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    names = sorted(p.name for p in (out / "scan").iterdir())
    assert "seg-hires-grad-cam.npz" in names and "manifest.json" in names
    (mha,) = [name for name in names if name.endswith(".mha")]
    written = sitk.ReadImage(str(out / "scan" / mha))
    assert written.GetSize() == image.GetSize() and written.GetSpacing() == image.GetSpacing()
    assert not [name for name in names if ".part" in name]
