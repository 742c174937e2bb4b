"""segcam.layers: layer specs resolved to modules, with one clear error for anything else."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam import errors
from segcam.testing import tiny_segnet
from small_nets import X, explain


def test_layer_given_as_a_number():
    with pytest.raises(errors.LayerNotFoundError, match="layer must be a module name"):
        explain(X, segcam.AllPixels(1), 3)


def test_the_whole_model_is_not_a_layer():
    model = tiny_segnet(spatial_dims=2).eval()
    for layer in ("", model):
        with pytest.raises(errors.LayerNotFoundError, match="is the whole model"):
            segcam.explain(model, torch.randn(1, 1, 16, 16), segcam.Predicted(1), layer)
