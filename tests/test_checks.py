"""segcam.checks: inputs the model cannot take are refused before the forward pass; a model's
own error and an overflow are one clear error."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam import errors
from segcam.testing import tiny_segnet
from small_nets import LAYER, UNET, Counting, X, explain


def test_wrong_rank_for_the_model_is_refused_before_the_forward():
    model = Counting(UNET)
    with pytest.raises(errors.InputError, match=r"does not fit the model.*Conv2d.*1 channel"):
        segcam.explain(model, torch.rand(1, 1, 8, 64, 64), segcam.AllPixels(1), "model." + LAYER)
    assert model.calls == 0


def test_wrong_channels_for_the_model_is_refused_before_the_forward():
    with pytest.raises(errors.InputError, match=r"\(2, 3, 64, 64\) does not fit.*1 channel"):
        explain(torch.rand(2, 3, 64, 64), segcam.AllPixels(1), LAYER)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_wrong_dtype_for_the_model(dtype):
    with pytest.raises(errors.InputError, match=f"input is {dtype}.*parameters are torch.float32"):
        explain(X.to(dtype), segcam.AllPixels(1), LAYER)


def test_input_on_another_device():
    with pytest.raises(errors.InputError, match="meta tensors, which hold no data"):
        explain(X.to("meta"), segcam.AllPixels(1), LAYER)
    model = Counting(tiny_segnet(2).to(torch.float64))
    with pytest.raises(errors.InputError, match=r"torch\.float32 but the model's parameters"):
        segcam.explain(model, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "model.body.3")
    assert model.calls == 0


def test_torchscript_model_is_refused():
    scripted = torch.jit.script(tiny_segnet(2))
    with pytest.raises(errors.LayerError, match="TorchScript"):
        segcam.explain(scripted, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")


def test_an_error_inside_the_model_is_a_model_error():
    # a 60x60 input to a net whose skip connections need multiples of 4
    with pytest.raises(errors.ModelError, match=r"the model failed on the input \(1, 1, 60, 62\)"):
        explain(torch.rand(1, 1, 60, 62), segcam.AllPixels(1), LAYER)
    try:
        explain(torch.rand(1, 1, 60, 62), segcam.AllPixels(1), LAYER)
    except errors.ModelError as error:
        assert isinstance(error.__cause__, RuntimeError)  # the original error, chained


def test_overflowing_input_raises_instead_of_nan_maps():
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        explain(X * 1e38, segcam.AllPixels(1), LAYER)
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        segcam.explain_sliding_window(UNET, X * 1e38, segcam.AllPixels(1), LAYER, 32)
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        # a target read from the prediction: the blended logits come first
        target = segcam.Probability(1, threshold=0.0)
        segcam.explain_sliding_window(UNET, X * 1e38, target, LAYER, 32)


class _NormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.instance = torch.nn.InstanceNorm2d(4, track_running_stats=True)
        self.cumulative = torch.nn.BatchNorm2d(4, momentum=None)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cumulative(self.instance(self.bn(self.conv(x)))))


@pytest.mark.parametrize("method", segcam.list_methods())
def test_a_model_in_training_mode_keeps_its_running_statistics(method):
    torch.manual_seed(0)
    model = _NormNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.randn(2, 1, 12, 12)
    with pytest.warns(segcam.errors.SegCamWarning, match="training mode"):
        segcam.explain(model, x, segcam.Predicted(1), "bn", method=method)
    after = model.state_dict()
    for key, value in before.items():  # running mean, variance and batch count included
        assert torch.equal(after[key], value), key
        assert model.state_dict(keep_vars=True)[key] is tensors[key]  # the same tensors
    assert model.training and model.bn.training  # its modes too
