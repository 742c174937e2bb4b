"""MONAI bundle folders in the Model Zoo's layout, with seeded weights (for tests and users).

:func:`write_bundle` writes ``configs/inference.json`` as the spleen CT bundle lays its
inference out (load, channel first, RAS orientation, resampling to a spacing, an intensity
window, a sliding-window inferer, then softmax, ``Invertd`` back to the original image, argmax
and ``SaveImaged``), ``configs/metadata.json`` and ``models/model.pt``, the seeded weights of a
small MONAI UNet. ``monai.bundle.run(config_file=...)`` runs it as it runs a Model Zoo bundle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from segcam.errors import OptionError

__all__ = ["NETWORK", "PREPROCESSING", "write_bundle", "write_oblique_ct"]

NETWORK: dict[str, Any] = {
    "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
}  # fmt: skip

PREPROCESSING: list[dict[str, Any]] = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
     "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "EnsureTyped", "keys": "image"},
]  # fmt: skip


def _postprocessing(invert: bool, save: bool, activation: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", activation: True}]
    if invert:
        steps.append({
            "_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
            "orig_keys": "image", "meta_key_postfix": "meta_dict", "nearest_interp": False,
            "to_tensor": True,
        })  # fmt: skip
    if activation == "sigmoid":  # a channel per class, each its own 0/1 set
        steps.append({"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5})
    else:
        steps.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    if save:
        steps.append({
            "_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
            "separate_folder": False, "output_postfix": "seg", "resample": False,
        })  # fmt: skip
    return steps


def write_bundle(
    folder: str | Path,
    *,
    network: Mapping[str, Any] = NETWORK,
    preprocessing: Sequence[Mapping[str, Any]] = PREPROCESSING,
    inferer: Mapping[str, Any] | None = None,
    invert: bool = True,
    save: bool = True,
    state: Mapping[str, Any] | None = None,
    seed: int = 0,
    classes: Sequence[str] = ("background", "spleen"),
    activation: str = "softmax",
) -> Path:
    """Write a bundle folder: configs (inference, metadata) and the network's seeded weights.

    Args:
        folder: the bundle folder (created).
        network: ``network_def`` (a MONAI UNet by default; its weights are seeded with ``seed``).
        preprocessing: the preprocessing transforms (the spleen bundle's by default).
        inferer: the inferer (default: sliding windows of 32x32x16, 4 per batch, overlap 0.5).
        invert: end the postprocessing with ``Invertd`` back to the original image.
        save: write the segmentation with ``SaveImaged`` into ``@output_dir``.
        state: the checkpoint to save instead of the seeded weights.
        seed: the seed of the network's weights.
        classes: the output channels' names (``metadata.json``).
        activation: ``softmax`` then argmax (one label map), or ``sigmoid`` then a 0.5
            threshold per channel (a single-logit or multi-label bundle).
    """
    folder = Path(folder)
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "imports": ["$import glob", "$import torch"],
        "bundle_root": str(folder),
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/images'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": dict(network),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [dict(t) for t in preprocessing]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": dict(inferer) if inferer is not None else {
            "_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 4,
            "overlap": 0.5},
        "postprocessing": {"_target_": "Compose",
                           "transforms": _postprocessing(invert, save, activation)},
        "handlers": [{"_target_": "CheckpointLoader",
                      "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }  # fmt: skip
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    metadata = {
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image",
                                 "num_channels": int(network.get("in_channels", 1))}},
            "outputs": {"pred": {"type": "image", "num_channels": len(classes),
                                 "channel_def": {str(i): n for i, n in enumerate(classes)}}},
        },
    }  # fmt: skip
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    if state is None:
        from monai.networks.nets.unet import UNet

        if network.get("_target_") != "UNet":
            raise OptionError("give state= for a network other than MONAI's UNet")
        torch.manual_seed(seed)
        state = UNet(**{k: v for k, v in network.items() if k != "_target_"}).state_dict()
    torch.save(dict(state), folder / "models" / "model.pt")
    return folder


def write_oblique_ct(
    path: str | Path,
    shape: Sequence[int] = (40, 36, 20),
    seed: int = 0,
    *,
    spacing: Sequence[float] = (0.8, 0.9, 2.5),
    angle: float = 0.3,
) -> Path:
    """A CT-like NIfTI: ``spacing`` mm, rotated by ``angle`` about z, flipped in x.

    A bright blob in noise: with the defaults (anisotropic, oblique) a bundle's Orientationd and
    Spacingd really resample it.
    """
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = 40 + 120 * np.exp(-((i - 0.2) ** 2 + (j + 0.1) ** 2 + 0.5 * k**2) / 0.15)
    data = (body + rng.normal(0, 25, shape)).astype(np.float32)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], spacing[1], spacing[2]])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(data, affine), str(path))  # type: ignore[no-untyped-call]
    return Path(path)
