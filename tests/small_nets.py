"""The small network and input the tests of bad and edge input share (a MONAI UNet, 2D)."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

import segcam

torch.manual_seed(0)
UNET = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
X = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
LAYER = "model.1.submodule"


def explain(*args, **kwargs):
    """The issue's E(...): segcam.explain(UNet2D, rand(2,1,64,64), AllPixels(1), layer, ...)."""
    return segcam.explain(UNET, *args, **kwargs)


class Counting(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)
