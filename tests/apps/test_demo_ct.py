"""The demo CT data, the MRC reader, and the shipped liver networks' held-out Dice."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import segcam
from segcam.apps.cli import main
from segcam.apps.demo import data as liver
from segcam.apps.demo.models import DEMO_LAYERS, WEIGHTS_DIR, held_out_dice, load_liver_model
from segcam.io.mrc import MrcError, read_mrc

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _mrc_bytes(array: np.ndarray, mode: int, order: str) -> bytes:
    nz, ny, nx = array.shape
    header = bytearray(1024)
    header[:16] = struct.pack(f"{order}4i", nx, ny, nz, mode)
    header[212] = 0x44 if order == "<" else 0x11
    return bytes(header) + array.astype(array.dtype.newbyteorder(order)).tobytes()


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize(("dtype", "mode"), [(np.float32, 2), (np.uint16, 6), (np.int16, 1)])
def test_mrc_round_trip(order, dtype, mode):
    array = (np.arange(2 * 3 * 4) * 7 % 11).astype(dtype).reshape(2, 3, 4)
    read = read_mrc(_mrc_bytes(array, mode, order))
    assert read.shape == (2, 3, 4) and np.array_equal(read, array)


def test_mrc_errors(tmp_path):
    array = np.zeros((2, 3, 4), dtype=np.float32)
    with pytest.raises(MrcError, match="truncated"):
        read_mrc(_mrc_bytes(array, 2, "<")[:-8])
    with pytest.raises(MrcError, match="shorter than the 1024-byte"):
        read_mrc(b"\x00" * 100)
    with pytest.raises(MrcError, match="unsupported MRC mode"):
        read_mrc(_mrc_bytes(array, 2, "<")[:12] + struct.pack("<i", 9) + b"\x00" * 2000)


def test_case_is_the_documented_volume():
    case = liver.load_case()
    assert case.image.shape == case.labels.shape == (128, 128, 128)
    assert case.image.dtype == np.float32 and -1100 < case.image.min() < case.image.max() < 3100
    assert set(np.unique(case.labels)) == {0, 1, 2}
    assert not set(liver.HELD_OUT_SLICES) & set(liver.TRAIN_SLICES)
    assert not set(liver.HELD_OUT_SLICES) & set(liver.GAP_SLICES)


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_shipped_networks_reach_their_logged_dice(which):
    logged = json.loads((SCRIPTS / f"train_liver_{which}.log.json").read_text(encoding="utf-8"))
    dice = held_out_dice(load_liver_model(which), which, liver.load_case())
    for name in ("liver", "tumour"):
        assert dice[name] == pytest.approx(logged["held_out_dice"][name], abs=0.01)
    assert logged["held_out_slices"] == [56, 79]


def test_cli_on_ct_slices_equals_explain(tmp_path):
    case = liver.load_case()
    slices = liver.axial_slices(case.image, [60, 72])  # held-out, in HU
    for z, image in zip((60, 72), slices, strict=True):
        np.save(tmp_path / f"slice{z}.npy", image)
    weights = WEIGHTS_DIR / "liver_unet2d.pt"
    layers = list(DEMO_LAYERS.values())
    code = main(
        [
            "explain",
            str(tmp_path / "slice60.npy"),
            str(tmp_path / "slice72.npy"),
            "--model",
            "segcam.apps.demo.models:build_liver_model",
            "--model-kwargs",
            '{"which": "2d"}',
            "--weights",
            str(weights),
            "--window",
            "-200,300",
            "--classes",
            "background,liver,tumour",
            "--target",
            "predicted:liver",
            "--target",
            "predicted:tumour",
            *[arg for layer in layers for arg in ("--layer", layer)],
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    model = load_liver_model("2d")
    for z, image in zip((60, 72), slices, strict=True):
        x = torch.from_numpy(liver.window(image))[None, None]
        expected = segcam.explain(model, x, [segcam.Predicted(1), segcam.Predicted(2)], layers)
        written = segcam.load(tmp_path / "out" / f"slice{z}" / "seg-hires-grad-cam.npz")
        for layer in layers:
            torch.testing.assert_close(written.layer_maps[layer], expected.layer_maps[layer])
            assert written.layer_maps[layer].amax() > 0


def test_the_2d_demo_is_shown_as_the_3d_demo_s_axial_slice():
    # the 2D demo was shown transposed, the patient's right at the top, without labels (issue 23)
    from segcam.apps.viewer.serve import demo_session

    flat, volume = demo_session("2d"), demo_session("3d")
    axial = volume.plane(2)
    assert axial.name == "axial"
    info = flat.info()
    assert (
        info["flat"]["labels"]
        == axial.labels
        == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    )
    shown_2d = flat.slice({})
    shown_3d = volume.slice({"axis": 2, "index": 68})
    assert shown_2d["shape"] == shown_3d["shape"]
    for key in ("image", "intensity", "prediction", "ground_truth"):
        if key != "prediction":  # the 2D and 3D networks predict differently
            assert shown_2d[key] == shown_3d[key], key
    # a map and a painted pixel go back to the image's own array order
    painted = np.zeros(shown_2d["shape"], dtype=np.uint8)
    painted[10, 20] = 1  # shown row 10, column 20
    mask = flat.grid.painted_mask({"data": base64.b64encode(painted.tobytes()).decode()})
    voxel = np.zeros(volume.spatial, dtype=bool)
    axial.place(painted.astype(bool), voxel, 68)
    np.testing.assert_array_equal(mask, voxel[:, :, 68])
