"""Models that return probabilities: the warning, and --logits-from probabilities (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import segcam
from segcam.apps.cli import main
from segcam.errors import SegCamWarning
from segcam.testing import HeadNet

X = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
TARGET = segcam.Box(1, [(2, 10), (3, 12)])
RAW = {"relu": False, "upsample": False}


def heads(seed=0, classes=3):
    return HeadNet(2, num_classes=classes, seed=seed).eval()


def softmax_factory():
    return nn.Sequential(heads(), nn.Softmax(dim=1)).eval()


def test_the_warning_fires_for_probabilities_and_not_for_logits():
    with pytest.warns(SegCamWarning, match="ends in Softmax"):
        segcam.explain(softmax_factory(), X, TARGET, "0.body.3")
    with pytest.warns(SegCamWarning, match="sums to 1"):  # a softmax written by hand
        model = nn.Sequential(heads(), nn.Identity()).eval()
        segcam.explain(
            model, X, TARGET, "0.body.3", output=lambda y: y.exp() / y.exp().sum(1, True)
        )
    segcam.explain(heads(), X, TARGET, "body.3")  # logits: silent (warnings are errors here)


def test_sigmoid_probabilities_give_the_logits_maps():
    logits_model = heads(seed=1, classes=1)
    sigmoid_model = nn.Sequential(logits_model, nn.Sigmoid()).eval()
    expected = segcam.explain(logits_model, X, TARGET, "body.3", **RAW)
    from_probabilities = segcam.explain(
        sigmoid_model, X, TARGET, "0.body.3", output=segcam.FromProbabilities(), **RAW
    )
    torch.testing.assert_close(from_probabilities.maps, expected.maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_probabilities.logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_softmax_probabilities_give_log_softmax_maps():
    log_softmax = nn.Sequential(heads(), nn.LogSoftmax(dim=1)).eval()
    expected = segcam.explain(log_softmax, X, TARGET, "0.body.3", **RAW)
    got = segcam.explain(
        softmax_factory(), X, TARGET, "0.body.3", output=segcam.FromProbabilities(), **RAW
    )
    torch.testing.assert_close(got.maps, expected.maps, rtol=1e-4, atol=1e-5)
    plain = segcam.explain(heads(), X, TARGET, "body.3", **RAW)
    # log p_c = y_c - logsumexp(y): a different score, so (documented) different maps
    assert not torch.allclose(got.maps, plain.maps, atol=1e-3)


@pytest.mark.filterwarnings("default::segcam.errors.SegCamWarning")  # the CLI prints them
def test_the_cli_option(tmp_path, capsys):
    np.save(tmp_path / "x.npy", X[0, 0].numpy())
    args = ["explain", str(tmp_path / "x.npy"), "--model", f"{__name__}:softmax_factory"]
    args += ["--target", "box:1:2,3,10,12", "--layer", "0.body.3", "--no-relu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "segcam: warning: the model's output ends in Softmax" in capsys.readouterr().err
    assert main([*args, "--logits-from", "probabilities", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err
    saved = segcam.load(tmp_path / "b" / "x" / "seg-hires-grad-cam.npz")
    with torch.no_grad():
        expected = torch.log_softmax(heads()(X[:1]), dim=1)
    torch.testing.assert_close(saved.logits, expected, rtol=1e-4, atol=1e-5)
