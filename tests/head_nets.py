"""A fixed-weight head network with its input, a mask and the head's input A (for closed forms)."""

from __future__ import annotations

import torch

from segcam.testing import HeadNet

RAW = {"relu": False, "upsample": False, "normalize": None}


def head_setup(seed, spatial_dims):
    """(net, x, mask, A) of a HeadNet with 5 features and 3 classes, seeded."""
    net = HeadNet(spatial_dims, in_channels=2, features=5, num_classes=3, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    spatial = (6, 7) if spatial_dims == 2 else (3, 5, 4)
    x = torch.randn((2, 2, *spatial), generator=generator)
    mask = torch.rand((2, *spatial), generator=generator) > 0.5
    with torch.no_grad():
        features = net.body(x)  # A, the head's input (post-ReLU)
    return net, x, mask, features
