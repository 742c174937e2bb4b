"""segcam.layers: layer specs resolved to modules, with one clear error for anything else."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

import segcam
from segcam import errors

torch.manual_seed(0)
UNET = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
X = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def explain(*args, **kwargs):
    """The issue's E(...): segcam.explain(UNet2D, rand(2,1,64,64), AllPixels(1), layer, ...)."""
    return segcam.explain(UNET, *args, **kwargs)


def test_layer_given_as_a_number():
    with pytest.raises(errors.LayerNotFoundError, match="layer must be a module name"):
        explain(X, segcam.AllPixels(1), 3)
