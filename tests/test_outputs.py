"""segcam.outputs: the logits out of a model's output; probabilities warned about."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segcam
from segcam import errors
from segcam.testing import tiny_segnet
from small_nets import LAYER, UNET, X


def test_probabilities_are_warned_about():
    softmax = nn.Sequential(UNET, nn.Softmax(dim=1)).eval()
    with pytest.warns(errors.SegCamWarning, match="looks like probabilities"):
        segcam.explain(softmax, X, segcam.AllPixels(1), "0." + LAYER)
    sigmoid = nn.Sequential(tiny_segnet(2), nn.Sigmoid()).eval()
    with pytest.warns(errors.SegCamWarning, match="ends in Sigmoid"):
        segcam.explain(sigmoid, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "0.body.3")
