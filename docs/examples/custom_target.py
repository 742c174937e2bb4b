"""Write your own target: a ring of pixels around a centre, for a class.

Run it: python docs/examples/custom_target.py
"""

from dataclasses import dataclass

import torch

import segcam
from segcam.testing import HeadNet


@dataclass(frozen=True)
class Ring(segcam.Target):
    """The pixels whose distance to ``centre`` lies in [inner, outer), for class ``class_index``."""

    class_index: int
    centre: tuple[float, float]
    inner: float
    outer: float

    # The pixel set reads only the logits' shape and device, not their values: sliding windows
    # then need no first prediction pass.
    uses_logits = False

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: detached (N, K, H, W); return (H, W) for every sample, or (N, H, W); bool or 0/1
        rows = torch.arange(logits.shape[2], device=logits.device, dtype=torch.float32)
        cols = torch.arange(logits.shape[3], device=logits.device, dtype=torch.float32)
        distance = torch.hypot(rows[:, None] - self.centre[0], cols[None, :] - self.centre[1])
        return (distance >= self.inner) & (distance < self.outer)


model = HeadNet(2, seed=1).eval()
x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
ring = Ring(class_index=2, centre=(16, 16), inner=4, outer=8)
expl = segcam.explain(model, x, ring, "body.3", relu=False, upsample=False)

# The closed form at the layer feeding a 1x1 head: HiRes map = (y^c - b_c) * 1[M].
mask = ring.pixel_set(expl.logits)
expected = (expl.logits[:, 2] - model.head.bias[2].detach()) * mask
torch.testing.assert_close(expl.maps[:, 0], expected)
print(f"ring of {int(mask.sum())} pixels; map equals (y - b) on the ring")

# Sliding windows explain the blended prediction exactly; windows that miss the ring take no
# backward pass, and no first prediction pass runs (uses_logits is False).
small = Ring(class_index=2, centre=(8, 8), inner=2, outer=5)
windowed = segcam.explain_sliding_window(model, x, small, "body.3", roi_size=16, overlap=0.5)
info = windowed.info["sliding_window"]
assert (info["windows"], info["windows_backward"]) == (9, 4)
print(f"sliding windows: {info['windows_backward']} of {info['windows']} took a backward pass")
