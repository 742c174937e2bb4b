"""segcam.nnunet.load: nnU-Net v2 model folders, networks as nnU-Net builds them (issue 15)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import segcam
from segcam.errors import SegCamError

pytest.importorskip("nnunetv2")

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from segcam.nnunet import NnUNetError, load
from segcam.testing.nnunet import make_model_folder


class Opaque:
    """An object a checkpoint may pickle; weights-only loading must refuse it."""


def _predictor(folder, folds):
    predictor = nnUNetPredictor(
        device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return predictor


@pytest.mark.filterwarnings("ignore::UserWarning")  # nnU-Net's own note on CPU devices
def test_networks_are_nnunets_own(tmp_path):
    folder = make_model_folder(tmp_path / "model", folds=(0, 1))
    model = load(folder, folds="all")
    assert model.folds == (0, 1) and model.configuration == "3d_fullres"
    assert model.class_names == ("background", "liver", "tumour")
    assert model.mirroring_axes == (0, 1, 2) and model.trainer_name == "nnUNetTrainer"
    predictor = _predictor(folder, (0, 1))
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for index, network in enumerate(model.networks):
        assert not network.training and network.decoder.deep_supervision is False
        predictor.network.load_state_dict(predictor.list_of_parameters[index])
        with torch.no_grad():
            torch.testing.assert_close(network(x), predictor.network.eval()(x))
    assert model.networks[0] is not model.networks[1]  # one module per fold
    first, second = (dict(n.named_parameters()) for n in model.networks)
    assert not torch.equal(first["encoder.stages.0.0.convs.0.conv.weight"],
                           second["encoder.stages.0.0.convs.0.conv.weight"])  # fmt: skip


def test_a_loaded_network_is_explained_exactly(tmp_path):
    model = load(make_model_folder(tmp_path / "model"))
    network = model.networks[0]
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    box = segcam.Box(2, [(2, 9), (0, 16), (4, 12)])
    expl = segcam.explain(network, x, box, "decoder.stages.1", relu=False, upsample=False)
    # the last decoder stage feeds the 1x1x1 segmentation head: HiRes map = (y^c - b_c) 1[M]
    bias = network.decoder.seg_layers[-1].bias.detach()[2]
    expected = (expl.logits[0, 2] - bias) * expl.pixel_sets[0, 0]
    torch.testing.assert_close(expl.maps[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_a_2d_configuration(tmp_path):
    folder = make_model_folder(tmp_path / "model2d", configuration="2d", patch_size=(32, 32))
    model = load(folder)
    with torch.no_grad():
        assert model.networks[0](torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)


def test_a_checkpoint_with_pickled_objects_needs_trust(tmp_path):
    folder = make_model_folder(tmp_path / "model", extra={"config": Opaque()})
    with pytest.raises(NnUNetError, match="trust_checkpoint=True only if you trust its source"):
        load(folder)
    assert load(folder, trust_checkpoint=True).networks  # the user's explicit choice


def test_a_compiled_training_prefix_is_stripped(tmp_path):
    folder = make_model_folder(tmp_path / "model", prefix="_orig_mod.")
    reference = load(make_model_folder(tmp_path / "plain"))
    model = load(folder)
    loaded, expected = model.networks[0].state_dict(), reference.networks[0].state_dict()
    assert list(loaded) == list(expected)
    for name, value in loaded.items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_missing_pieces_are_clear_errors(tmp_path):
    folder = make_model_folder(tmp_path / "model", folds=(0, 2))
    with pytest.raises(
        NnUNetError, match=r"no checkpoint_final.pth for fold\(s\) \[1\]; folds present: \[0, 2\]"
    ):
        load(folder, folds=(0, 1))
    (folder / "plans.json").unlink()
    with pytest.raises(NnUNetError, match=r"no plans\.json"):
        load(folder)
    assert issubclass(NnUNetError, SegCamError)


def _truncate_checkpoint(folder):
    path = folder / "fold_0" / "checkpoint_final.pth"
    path.write_bytes(path.read_bytes()[:1000])


def _drop_labels(folder):
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    del dataset["labels"]
    (folder / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")


def _unknown_network(folder):
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    for configuration in plans["configurations"].values():
        if "architecture" in configuration:
            configuration["architecture"]["network_class_name"] = "no.such.Net"
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_truncate_checkpoint, r"checkpoint_final\.pth: cannot read the checkpoint \(RuntimeError"),
        (_drop_labels, r"dataset\.json: no 'labels'"),
        (lambda f: (f / "plans.json").write_text("{not json"), r"plans\.json: cannot read it"),
        (_unknown_network, r"cannot build no\.such\.Net for 3d_fullres"),
    ],
)
def test_a_damaged_model_folder_is_one_clear_error(tmp_path, damage, pattern):
    # each was a raw RuntimeError, KeyError or JSONDecodeError (issue 22)
    folder = make_model_folder(tmp_path / "model")
    damage(folder)
    with pytest.raises(NnUNetError, match=pattern), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nnU-Net's own note on the class search
        load(folder)
