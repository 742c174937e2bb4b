"""The demo networks in one place: architectures, layer names, shipped weights, held-out checks.

Every demo network is a four-level MONAI UNet with one input channel and three classes, so the
three layers the demos explain have the same names in all of them:

- ``liver-2d``, ``liver-3d``: the CT liver-tumour networks (``scripts/train_liver.py``);
- ``synthetic-2d``: disks (1) and squares (2) on synthetic scenes
  (``scripts/train_synthetic_unet.py``);
- ``evidence-2d``: the evaluation's known-evidence scenes (``scripts/train_evidence_unet.py``).

The weights ship in ``segcam/apps/demo/weights``; the training scripts write to the path given on
their command line. Needs the ``[monai]`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcam.apps.demo import data as ct_data

__all__ = [
    "DEMO_LAYERS",
    "DEMO_MODELS",
    "NNUNET_MODEL",
    "WEIGHTS_DIR",
    "DemoModel",
    "build_demo_model",
    "build_liver_model",
    "held_out_dice",
    "load_demo_model",
    "load_liver_model",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# an nnU-Net v2 trained-model folder (fold "all"), trained by scripts/train_nnunet.py
NNUNET_MODEL = Path(__file__).resolve().parent / "nnunet_model"

# Three depths of a four-level MONAI UNet: the bottleneck, a middle decoder block, the last one.
DEMO_LAYERS = {
    "bottleneck": "model.1.submodule.1.submodule.1.submodule",
    "middle decoder": "model.1.submodule.1.submodule.2",
    "last decoder": "model.1.submodule.2",
}


@dataclass(frozen=True)
class DemoModel:
    """One demo network: its MONAI UNet configuration and its shipped weights file."""

    name: str
    spatial_dims: int
    channels: tuple[int, ...]
    weights: str
    description: str

    def build(self) -> nn.Module:
        """The untrained architecture (1 input channel, 3 classes, strides 2, one residual unit)."""
        try:
            from monai.networks.nets import UNet  # type: ignore[attr-defined]
        except ImportError as error:
            from segcam.errors import MissingExtraError

            raise MissingExtraError(
                f"the demo network {self.name!r} needs MONAI: pip install 'segcam[monai]'"
            ) from error
        model: nn.Module = UNet(
            spatial_dims=self.spatial_dims,
            in_channels=1,
            out_channels=3,
            channels=self.channels,
            strides=(2, 2, 2),
            num_res_units=1,
        )
        return model

    @property
    def weights_path(self) -> Path:
        """Where the shipped weights lie."""
        return WEIGHTS_DIR / self.weights

    def load(self) -> nn.Module:
        """The trained network, in eval mode, on the CPU."""
        model = self.build()
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()


DEMO_MODELS = {
    model.name: model
    for model in (
        DemoModel("liver-2d", 2, (16, 32, 64, 128), "liver_unet2d.pt", "CT liver/tumour, axial"),
        DemoModel("liver-3d", 3, (8, 16, 32, 64), "liver_unet3d.pt", "CT liver/tumour, volume"),
        DemoModel("synthetic-2d", 2, (16, 32, 64, 128), "synthetic_unet2d.pt", "disks, squares"),
        DemoModel("evidence-2d", 2, (16, 32, 64, 128), "evidence_unet2d.pt", "known evidence"),
    )
}


def _demo_model(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        from segcam.errors import SegCamError

        raise SegCamError(
            f"no demo network {name!r}; the demo networks: {', '.join(DEMO_MODELS)}"
        ) from None


def build_demo_model(name: str = "synthetic-2d") -> nn.Module:
    """The architecture of a demo network (a factory for ``segcam explain --model``)."""
    return _demo_model(name).build()


def load_demo_model(name: str = "synthetic-2d") -> nn.Module:
    """A trained demo network, in eval mode."""
    return _demo_model(name).load()


def build_liver_model(which: str) -> nn.Module:
    """The CT network's architecture, ``which`` = ``"2d"`` or ``"3d"``."""
    return build_demo_model(f"liver-{which}")


def load_liver_model(which: str) -> nn.Module:
    """The trained 2D or 3D CT network, in eval mode."""
    return load_demo_model(f"liver-{which}")


def _dice(prediction: np.ndarray, labels: np.ndarray, c: int) -> float:
    p, g = prediction == c, labels == c
    return float(2 * (p & g).sum() / max(int(p.sum() + g.sum()), 1))


def predict(model: nn.Module, which: str, image_hu: np.ndarray) -> np.ndarray:
    """Class labels for the whole volume (same shape as ``image_hu``), 2D slice by slice or 3D."""
    windowed = ct_data.window(image_hu)
    with torch.no_grad():
        if which == "3d":
            whole: np.ndarray = model(torch.from_numpy(windowed)[None, None]).argmax(1)[0].numpy()
            return whole
        slices = torch.from_numpy(ct_data.axial_slices(windowed, range(windowed.shape[2])))
        labels = torch.cat(
            [model(slices[i : i + 16, None]).argmax(1) for i in range(0, len(slices), 16)]
        )
    volume: np.ndarray = np.moveaxis(labels.numpy(), 0, ct_data.AXIAL_AXIS)
    return volume


def held_out_dice(model: nn.Module, which: str, case: ct_data.LiverCase) -> dict[str, float]:
    """Dice of liver and tumour over the held-out axial slices (56..79) taken as one volume.

    The 3D network sees the whole volume as input (context, never labels, from outside the slab).
    """
    held = list(ct_data.HELD_OUT_SLICES)
    prediction = predict(model, which, case.image)[:, :, held]
    labels = case.labels[:, :, held]
    return {"liver": _dice(prediction, labels, 1), "tumour": _dice(prediction, labels, 2)}
