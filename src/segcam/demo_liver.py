"""The CT demo's networks: architectures, loading the shipped weights, held-out evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcam import liver

__all__ = ["LIVER_LAYERS", "build_liver_model", "held_out_dice", "load_liver_model"]

DATA = Path(__file__).resolve().parent / "data"
# Three depths of a four-level MONAI UNet: the bottleneck, a middle decoder block, the last one.
LIVER_LAYERS = {
    "bottleneck": "model.1.submodule.1.submodule.1.submodule",
    "middle decoder": "model.1.submodule.1.submodule.2",
    "last decoder": "model.1.submodule.2",
}


def build_liver_model(which: str) -> nn.Module:
    """MONAI UNet, 1 input channel (windowed CT), 3 classes (background, liver, tumour)."""
    from monai.networks.nets import UNet  # type: ignore[attr-defined]

    channels = (16, 32, 64, 128) if which == "2d" else (8, 16, 32, 64)
    model: nn.Module = UNet(
        spatial_dims=2 if which == "2d" else 3,
        in_channels=1,
        out_channels=3,
        channels=channels,
        strides=(2, 2, 2),
        num_res_units=1,
    )
    return model


def load_liver_model(which: str) -> nn.Module:
    """The trained 2D or 3D demo network, in eval mode."""
    model = build_liver_model(which)
    state = torch.load(DATA / f"liver_unet{which}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _dice(prediction: np.ndarray, labels: np.ndarray, c: int) -> float:
    p, g = prediction == c, labels == c
    return float(2 * (p & g).sum() / max(int(p.sum() + g.sum()), 1))


def predict(model: nn.Module, which: str, image_hu: np.ndarray) -> np.ndarray:
    """Class labels for the whole volume (same shape as ``image_hu``), 2D slice by slice or 3D."""
    windowed = liver.window(image_hu)
    with torch.no_grad():
        if which == "3d":
            whole: np.ndarray = model(torch.from_numpy(windowed)[None, None]).argmax(1)[0].numpy()
            return whole
        slices = torch.from_numpy(liver.axial_slices(windowed, range(windowed.shape[2])))
        labels = torch.cat(
            [model(slices[i : i + 16, None]).argmax(1) for i in range(0, len(slices), 16)]
        )
    volume: np.ndarray = np.moveaxis(labels.numpy(), 0, liver.AXIAL_AXIS)
    return volume


def held_out_dice(model: nn.Module, which: str, case: liver.LiverCase) -> dict[str, float]:
    """Dice of liver and tumour over the held-out axial slices (56..79) taken as one volume.

    The 3D network sees the whole volume as input (context, never labels, from outside the slab).
    """
    held = list(liver.HELD_OUT_SLICES)
    prediction = predict(model, which, case.image)[:, :, held]
    labels = case.labels[:, :, held]
    return {"liver": _dice(prediction, labels, 1), "tumour": _dice(prediction, labels, 2)}
