"""segcam.outputs: the logits out of a model's output; probabilities warned about."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import segcam
from segcam import errors
from segcam.testing import tiny_segnet

torch.manual_seed(0)
UNET = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
X = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
LAYER = "model.1.submodule"


def explain(*args, **kwargs):
    """The issue's E(...): segcam.explain(UNet2D, rand(2,1,64,64), AllPixels(1), layer, ...)."""
    return segcam.explain(UNET, *args, **kwargs)


def test_probabilities_are_warned_about():
    softmax = nn.Sequential(UNET, nn.Softmax(dim=1)).eval()
    with pytest.warns(errors.SegCamWarning, match="looks like probabilities"):
        segcam.explain(softmax, X, segcam.AllPixels(1), "0." + LAYER)
    sigmoid = nn.Sequential(tiny_segnet(2), nn.Sigmoid()).eval()
    with pytest.warns(errors.SegCamWarning, match="ends in Sigmoid"):
        segcam.explain(sigmoid, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "0.body.3")
