"""The committed nnU-Net model of the demo: nnU-Net's own folder, its logged held-out Dice, and the
demo's explanations of it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import segcam

pytest.importorskip("nnunetv2")

import SimpleITK as sitk  # noqa: N813
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from harness import fake_torchvision_ops
from segcam import nnunet
from segcam.apps.demo import data as liver
from segcam.apps.demo.models import NNUNET_MODEL

LOG = Path(__file__).resolve().parents[2] / "scripts" / "train_nnunet.log.json"

pytestmark = pytest.mark.filterwarnings("ignore:perform_everything_on_device")


def _held_out_case(tmp_path):
    case = liver.load_case()
    slab = case.image[:, :, 56:80].astype(np.float32).transpose(2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(slab))
    image.SetSpacing((1.0, 1.0, 1.0))
    raw = tmp_path / "raw"
    raw.mkdir()
    sitk.WriteImage(image, str(raw / "heldout_0000.nii.gz"))
    return raw, case.labels[:, :, 56:80].transpose(2, 1, 0)


def test_the_committed_model_is_small_and_its_logged_dice_holds(tmp_path):
    files = sorted(p.relative_to(NNUNET_MODEL).as_posix() for p in NNUNET_MODEL.rglob("*.*"))
    assert files == ["dataset.json", "dataset_fingerprint.json", "fold_all/checkpoint_final.pth",
                     "plans.json"]  # fmt: skip
    assert sum(p.stat().st_size for p in NNUNET_MODEL.rglob("*.*")) <= 5 * 2**20
    log = json.loads(LOG.read_text(encoding="utf-8"))
    raw, truth = _held_out_case(tmp_path)
    fake_torchvision_ops()  # nnU-Net's trainer lookup imports timm's variants too
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(NNUNET_MODEL), use_folds=("all",))
    predictor.predict_from_files(str(raw), str(tmp_path / "out"), num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)  # fmt: skip
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/heldout.nii.gz")))
    for name, label in (("liver", 1), ("tumour", 2)):
        a, b = written == label, truth == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice == pytest.approx(log["held_out_dice"][name], abs=1e-6)
    assert log["held_out_dice"]["liver"] > 0.8
    # segcam's Predicted set is exactly that segmentation
    model = nnunet.load(NNUNET_MODEL, folds="all")
    explanation = nnunet.explain(
        model, [raw / "heldout_0000.nii.gz"], segcam.Predicted("liver"), "decoder.stages.2"
    )
    assert torch.equal(explanation.pixel_sets[0, 0], torch.from_numpy(written == 1))
    assert explanation.maps[0, 0][torch.from_numpy(written == 1)].abs().sum() > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_nnunet_demo_in_the_viewer_keeps_its_window_forwards():
    """``segcam view --demo nnunet``: the held-out slab, its labels, maps from kept forwards."""
    from segcam.apps.viewer.serve import demo_session

    session = demo_session("nnunet")
    try:
        case = liver.load_case()
        assert session.spatial == (128, 128, 24)  # the file's own (i, j, k) order
        np.testing.assert_array_equal(session.ground_truth, case.labels[:, :, 56:80])
        assert session.info()["planes"][2]["name"] == "axial" and "nnU-Net" in session.title
        request = {"class": 2, "layer": "decoder.stages.2", "axis": 2, "index": 12,
                   "methods": ["seg-hires-grad-cam"], "client": "a"}  # fmt: skip
        first = session.explain({**request, "target": {"kind": "predicted"}})
        assert first["pixels"] == int((session.prediction == 2).sum()) > 0
        kept = session._case.kept_bytes
        assert kept > 0
        tumour = np.argwhere(session.prediction[:, :, 12] == 2)
        i, j = tumour[len(tumour) // 2]  # a predicted tumour voxel
        start = [int(i) - 4, int(j) - 4, 10]
        box = {"kind": "box", "start": start, "stop": [start[0] + 8, start[1] + 8, 14]}
        answer = session.explain({**request, "target": box})
        assert session._case.kept_bytes >= kept  # windows met: forwards kept, none freed
        shown = np.frombuffer(base64.b64decode(answer["maps"][0]["data"]), "<f4")
        shown = shown.reshape(answer["shape"])
        inside = np.zeros(session.spatial, dtype=bool)
        inside[start[0] : start[0] + 8, start[1] : start[1] + 8, 10:14] = True
        inside = session.plane(2).cut(inside, 12)
        # the last decoder block feeds a 1x1 head: the map lies on the set only, positive on tumour
        assert float(np.abs(shown[~inside]).max()) == 0.0 and float(shown[inside].max()) > 0
    finally:
        session.close()
