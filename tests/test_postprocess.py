"""segcam.postprocess: its options are checked when made."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam import errors
from segcam.testing import tiny_segnet


@pytest.mark.parametrize("value", ["no", 0, None, "False"])
def test_relu_and_upsample_take_only_booleans(value):
    # relu="no" was true: the ReLU stayed on
    model = tiny_segnet(spatial_dims=2).eval()
    for name in ("relu", "upsample"):
        with pytest.raises(errors.OptionError, match=f"{name} must be True or False"):
            segcam.explain(model, torch.randn(1, 1, 16, 16), segcam.Predicted(1), "body.3",
                           **{name: value})  # fmt: skip
