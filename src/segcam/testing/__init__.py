"""Tiny fixed-weight segmentation networks whose maps are known in closed form or by hand.

They are importable by users to check their own pipelines:

- :class:`HandNet`: 1x1 convolutions with small integer weights; every map can be worked out on
  paper (see the tests for the worked numbers).
- :class:`HeadNet`: convolutions feeding a 1x1 convolution head ``head``. For the layer ``body``
  (the head's input), Seg-HiRes-Grad CAM is exactly (y^c - b_c) * 1[M] and Seg-Grad CAM
  (|M| / P) * (y^c - b_c).
- :func:`tiny_segnet`: 2D and 3D versions with matching weights, so that a 3D input of depth 1
  gives the same logits (and maps) as the 2D net on the same slice.
"""

from __future__ import annotations

import torch
from torch import nn

from segcam.errors import OptionError

__all__ = ["HandNet", "HeadNet", "tiny_segnet"]


def _conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    if spatial_dims == 2:
        return nn.Conv2d
    if spatial_dims == 3:
        return nn.Conv3d
    raise OptionError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class HandNet(nn.Module):
    """x (N, 1, *S) -> conv (1x1, weights [1, -1]) -> act (ReLU) -> head (1x1).

    ``conv`` gives Z = (x, -x), ``act`` gives A = (relu(x), relu(-x)). With ``num_classes=2`` the
    head computes y^0 = A_0 + 2 A_1 + 0.5 and y^1 = 3 A_0 - A_1 - 0.5; with ``num_classes=1`` it
    computes the single logit y = 3 A_0 - A_1 - 0.5 (class 1; class 0 is -y).
    """

    def __init__(self, spatial_dims: int = 2, num_classes: int = 2) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        ones = (1,) * spatial_dims
        self.conv = conv(1, 2, 1)
        self.act = nn.ReLU()
        self.head = conv(2, num_classes, 1)
        weights = {2: ([[1.0, 2.0], [3.0, -1.0]], [0.5, -0.5]), 1: ([[3.0, -1.0]], [-0.5])}
        if num_classes not in weights:
            raise OptionError(f"HandNet has 1 or 2 classes, got {num_classes}")
        head_weight, head_bias = weights[num_classes]
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, *ones))
            self.head.weight.copy_(torch.tensor(head_weight).reshape(num_classes, 2, *ones))
            for bias, values in ((self.conv.bias, [0.0, 0.0]), (self.head.bias, head_bias)):
                assert bias is not None
                bias.copy_(torch.tensor(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.act(self.conv(x)))  # type: ignore[no-any-return]


class HeadNet(nn.Module):
    """body = [conv 3x3, ReLU, conv 3x3, ReLU] -> head = 1x1 conv; optional stride-2 first conv.

    With ``downsample=True`` the first convolution has stride 2 in-plane and the logits are
    up-sampled back (nearest) by ``upsample``, so maps of inner layers are coarser than the
    input. Weights come from a seeded generator: the same seed gives the same network.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        features: int = 4,
        num_classes: int = 3,
        *,
        seed: int = 0,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        # 3D keeps the depth: a depth-1 volume must see exactly the 2D network.
        stride = (1 if spatial_dims == 3 else 2, 2, 2)[-spatial_dims:] if downsample else 1
        self.body = nn.Sequential(
            conv(in_channels, features, 3, padding=1, stride=stride),  # type: ignore[arg-type]
            nn.ReLU(),
            conv(features, features, 3, padding=1),
            nn.ReLU(),
        )
        self.head = conv(features, num_classes, 1)
        self.upsample: nn.Module = (
            nn.Upsample(scale_factor=2 if spatial_dims == 2 else (1, 2, 2), mode="nearest")
            if downsample
            else nn.Identity()
        )
        self._fill(spatial_dims, seed)

    def _fill(self, spatial_dims: int, seed: int) -> None:
        # 2D weights first; in 3D they become the middle depth slice of each 3x3x3 kernel, so a
        # depth-1 input (zero padded) sees exactly the 2D network.
        generator = torch.Generator().manual_seed(seed)
        outer_generator = torch.Generator().manual_seed(seed + 1_000_003)
        with torch.no_grad():
            for module in [*self.body, self.head]:
                if not isinstance(module, nn.Conv2d | nn.Conv3d):
                    continue
                out_channels, in_channels = module.weight.shape[:2]
                size = module.weight.shape[-1]
                plane = torch.randn(out_channels, in_channels, size, size, generator=generator)
                plane /= (in_channels * size * size) ** 0.5
                bias = 0.1 * torch.randn(out_channels, generator=generator)
                if spatial_dims == 3:
                    outer = torch.randn(module.weight.shape, generator=outer_generator)
                    outer /= (in_channels * size**3) ** 0.5
                    outer[:, :, module.weight.shape[2] // 2] = plane
                    module.weight.copy_(outer)
                else:
                    module.weight.copy_(plane)
                assert module.bias is not None
                module.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.upsample(self.head(self.body(x)))  # type: ignore[no-any-return]


def tiny_segnet(spatial_dims: int, *, seed: int = 0, downsample: bool = True) -> HeadNet:
    """A :class:`HeadNet` in eval mode (1 input channel, 4 features, 3 classes)."""
    return HeadNet(spatial_dims, seed=seed, downsample=downsample).eval()
