"""Write your own method: a gradient CAM with an option, registered once, used everywhere.

Run it: python docs/examples/custom_method.py
"""

from collections.abc import Mapping
from typing import Any

import torch

import segcam
from segcam.errors import OptionError
from segcam.methods import register
from segcam.testing import HeadNet


# 1. The validator: called with the resolved options before any forward pass.
def check_power(options: Mapping[str, Any]) -> None:
    if options["power"] not in (1, 2, 3):
        raise OptionError(f"seg-power-cam: power must be 1, 2 or 3; got {options['power']!r}")


# 2. The map function: the activation A and the gradient G = dy/dA, both (N, C, *S), and the
#    options as keyword parameters with defaults (declared once: the registry reads them here).
@register(
    "seg-power-cam",
    summary="signed gradient powers times activations, L = sum_k sign(G) |G|^p * A",
    reference="an example from the segcam documentation",
    validate=check_power,
)
def seg_power_cam(
    activation: torch.Tensor, gradient: torch.Tensor, *, power: int = 1
) -> torch.Tensor:
    """L = sum_k sign(G_k) |G_k|^p A_k: a raw, signed map of shape (N, *S)."""
    weighted = gradient.sign() * gradient.abs() ** power
    return (weighted * activation).sum(dim=1)


# 3. Use it like any built-in method: explain, explain_methods, Explainer, sliding windows, CLI.
model = HeadNet(2, seed=0).eval()  # a fixed-weight net; its head is a 1x1 convolution
x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
maps = segcam.explain_methods(
    model,
    x,
    segcam.Box(1, [(4, 12), (4, 12)]),
    "body.3",
    ["seg-power-cam", "seg-hires-grad-cam"],
    relu=False,
    upsample=False,
    method_options={"seg-power-cam": {"power": 1}},
)
# With power 1 the method is Seg-HiRes-Grad CAM: both came from the same backward pass.
torch.testing.assert_close(maps["seg-power-cam"].maps, maps["seg-hires-grad-cam"].maps)
assert maps["seg-power-cam"].maps.abs().sum() > 0

# The options are checked before the model runs.
try:
    segcam.explain(
        model, x, segcam.AllPixels(1), "body.3", "seg-power-cam", method_options={"power": 4}
    )
except OptionError as error:
    print("refused before the forward pass:", error)
else:
    raise AssertionError("power=4 should have been refused")

print(
    "registered:", segcam.list_methods()[-1], dict(segcam.methods.REGISTRY["seg-power-cam"].options)
)
