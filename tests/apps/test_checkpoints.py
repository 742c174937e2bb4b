"""Checkpoints as they are found, and the eval-mode rule (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import segcam
from segcam.apps.cli import main
from segcam.apps.demo.models import load_demo_model
from segcam.apps.specs import SpecError, load_model
from segcam.testing.synthetic import shapes_scene

FACTORY = "segcam.apps.demo.models:build_demo_model"
LAYER = "model.1.submodule.2"


@pytest.fixture(scope="module")
def state():
    return load_demo_model().state_dict()


def _loads_like_the_demo(path, key=None):
    model = load_model(FACTORY, path, weights_key=key)
    x = torch.from_numpy(shapes_scene(1_000_050)[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_demo_model()(x))


@pytest.mark.parametrize("key", ["state_dict", "model", "network_weights", "net"])
def test_a_state_dict_nested_under_a_common_key(tmp_path, state, key):
    path = tmp_path / "checkpoint.pth"
    torch.save({key: state, "epoch": 12, "optimizer_name": "adam"}, path)
    _loads_like_the_demo(path)


def test_a_state_dict_under_a_named_nested_key(tmp_path, state):
    path = tmp_path / "checkpoint.pth"
    torch.save({"ema": {"weights": state}, "epoch": 3}, path)
    with pytest.raises(SpecError, match=r"no state dict found: it holds keys 'ema', 'epoch'"):
        _loads_like_the_demo(path)
    _loads_like_the_demo(path, key="ema.weights")
    with pytest.raises(SpecError, match=r"--weights-key 'ema.other' is not in"):
        _loads_like_the_demo(path, key="ema.other")


@pytest.mark.parametrize("prefixes", [["module."], ["_orig_mod."], ["module.", "_orig_mod."]])
def test_data_parallel_and_compile_prefixes_are_stripped(tmp_path, state, prefixes):
    prefix = "".join(prefixes)
    path = tmp_path / "checkpoint.pth"
    torch.save({prefix + key: value for key, value in state.items()}, path)
    _loads_like_the_demo(path)


def test_missing_num_batches_tracked_buffers_are_accepted(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "bn.pth"
    torch.save(state, path)
    from segcam.apps.specs import load_weights

    fresh = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    note = load_weights(fresh, path)
    assert "1 num_batches_tracked buffers absent" in note
    torch.testing.assert_close(fresh[0].weight, model[0].weight)


def test_a_checkpoint_that_does_not_fit_is_summarised(tmp_path, state):
    broken = dict(state)
    removed = sorted(broken)[:5]
    for key in removed:
        del broken[key]
    broken["extra.weight"] = torch.zeros(3)
    path = tmp_path / "checkpoint.pth"
    torch.save(broken, path)
    with pytest.raises(SpecError) as error:
        load_model(FACTORY, path)
    message = str(error.value)
    assert "5 missing (" + ", ".join(removed[:3]) + ", ... (2 more))" in message
    assert "1 unexpected (extra.weight)" in message


def test_shapes_that_do_not_fit_are_summarised(tmp_path, state):
    broken = dict(state)
    name = "model.0.conv.unit0.conv.weight"
    broken[name] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "checkpoint.pth"
    torch.save(broken, path)
    with pytest.raises(SpecError, match=rf"1 of other shapes \({name} \(3, 3, 3, 3\) vs"):
        load_model(FACTORY, path)


def test_pickled_objects_still_need_trust(tmp_path, state):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": state, "config": object()}, path)  # a pickled object inside
    with pytest.raises(SpecError, match="not a tensors-only checkpoint"):
        load_model(FACTORY, path)


class InstanceStatisticsNet(nn.Module):
    """Instance norms with running statistics that are meant to run on each input's own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def instance_statistics_factory():
    """As its authors run it: eval mode, but the norms in training mode on purpose."""
    torch.manual_seed(0)
    model = InstanceStatisticsNet().eval()
    with torch.no_grad():  # running statistics far from any input's own
        model.norm.running_mean.fill_(5.0)
        model.norm.running_var.fill_(0.01)
    model.norm.train()
    return model


def training_factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
    return model  # training mode: segcam puts it in eval mode


def test_a_factory_in_eval_mode_keeps_its_submodule_modes(tmp_path):
    image = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", image)
    factory = f"{__name__}:instance_statistics_factory"
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "x.npy"), "--model", factory, "--target", "all:1"]
    assert main([*args, "--layer", "norm", "--no-relu", "--out", str(out)]) == 0
    saved = segcam.load(out / "x" / "seg-hires-grad-cam.npz")
    reference = instance_statistics_factory()
    with torch.no_grad():
        expected = reference(torch.from_numpy(image)[None, None])
    torch.testing.assert_close(saved.logits, expected)  # the model's own statistics
    assert load_model(factory).norm.training  # left as the factory set it


def test_a_factory_in_training_mode_is_put_in_eval_mode():
    model = load_model(f"{__name__}:training_factory")
    assert not model.training and not model[1].training
