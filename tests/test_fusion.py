"""segcam.fusion: the fusion rules on hand-made maps and on layers of different resolutions."""

from __future__ import annotations

import pytest
import torch

import segcam
from segcam.testing import HeadNet


def test_fusion_rules_on_hand_maps():
    from segcam.explanation import Explanation

    low = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])  # (1, 1, 2, 2), max 2
    high = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])  # max 4
    zero = torch.zeros_like(low)
    expl = Explanation(
        layer_maps={"a": low, "b": high, "c": zero},
        logits=torch.zeros(1, 2, 2, 2),
        pixel_sets=torch.ones(1, 1, 2, 2, dtype=torch.bool),
        targets=(segcam.AllPixels(1),),
        method="seg-hires-grad-cam",
        relu=False,
        upsampled=True,
        normalize=None,
        layer_shapes={},
    )
    unit_low = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    unit_high = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(
        expl.fused("layercam")[0, 0],
        torch.maximum(torch.tanh(2 * unit_low), torch.tanh(2 * unit_high)),
    )
    torch.testing.assert_close(
        segcam.fuse_layers(expl, "layercam", gamma=1.0)[0, 0],
        torch.maximum(torch.tanh(unit_low), torch.tanh(unit_high)),
    )
    torch.testing.assert_close(expl.fused("max")[0, 0], torch.maximum(unit_low, unit_high))
    torch.testing.assert_close(expl.fused("mean")[0, 0], (unit_low + unit_high) / 3)
    with pytest.raises(ValueError, match="rule must be one of"):
        expl.fused("sum")


def test_fusion_of_layers_at_different_resolutions():
    net = HeadNet(2, features=3, seed=1, downsample=True).eval()
    x = torch.randn(2, 1, 8, 8)
    expl = segcam.explain(net, x, segcam.Predicted(1), ["body.1", "body"], upsample=False)
    assert expl.layer_maps["body.1"].shape[-2:] == (4, 4)
    fused = expl.fused("max")
    assert fused.shape == (2, 1, 8, 8)
    up = segcam.explain(net, x, segcam.Predicted(1), ["body.1", "body"], normalize="max")
    torch.testing.assert_close(fused, torch.maximum(*up.layer_maps.values()))
