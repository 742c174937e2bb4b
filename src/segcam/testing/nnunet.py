"""A tiny nnU-Net v2 trained-model folder, made without training (needs the ``[nnunet]`` extra).

:func:`make_model_folder` writes what ``nnUNetv2_predict`` reads: ``plans.json`` (one 3D or 2D
configuration of a small PlainConvUNet), ``dataset.json`` and ``fold_X/checkpoint_final.pth`` with
seeded random weights, laid out like a real checkpoint (``network_weights``, ``trainer_name``,
``init_args``, ``inference_allowed_mirroring_axes``, and a NumPy scalar as real checkpoints carry).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["make_model_folder", "tiny_plans"]

CLASS_NAMES = ("background", "liver", "tumour")


def tiny_plans(
    configuration: str = "3d_fullres",
    patch_size: Sequence[int] = (16, 16, 16),
    *,
    spacing: Sequence[float] | None = None,
    transpose_forward: Sequence[int] = (0, 1, 2),
    normalization: Sequence[str] = ("CTNormalization",),
    previous_stage: str | None = None,
) -> dict[str, Any]:
    """Plans of one small configuration: 3 stages of a PlainConvUNet (4, 8, 16 features).

    Args:
        configuration: the configuration's name.
        patch_size: the patch size (2 or 3 entries).
        spacing: the configuration's target spacing (transposed axes; default 1 per axis).
        transpose_forward: the axis order nnU-Net works in.
        normalization: one normalisation scheme per input channel.
        previous_stage: a cascade's previous configuration.
    """
    dims = len(patch_size)
    backward = [int(i) for i in np.argsort(transpose_forward)]
    channel_properties = {
        "max": 1000.0,
        "mean": 50.0,
        "median": 45.0,
        "min": -1000.0,
        "percentile_00_5": -900.0,
        "percentile_99_5": 900.0,
        "std": 200.0,
    }
    conv = "torch.nn.modules.conv.Conv3d" if dims == 3 else "torch.nn.modules.conv.Conv2d"
    norm = (
        "torch.nn.modules.instancenorm.InstanceNorm3d"
        if dims == 3
        else "torch.nn.modules.instancenorm.InstanceNorm2d"
    )
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [24] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [int(i) for i in transpose_forward],
        "transpose_backward": backward,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(i): dict(channel_properties) for i in range(len(normalization))
        },
        "configurations": {
            configuration: {
                "data_identifier": f"nnUNetPlans_{configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": [24] * dims,
                "spacing": [float(v) for v in spacing] if spacing else [1.0] * dims,
                "normalization_schemes": list(normalization),
                "use_mask_for_norm": [False] * len(normalization),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
                "resampling_fn_probabilities_kwargs": resampling,
                "batch_dice": True,
                **({"previous_stage": previous_stage} if previous_stage else {}),
                "architecture": {
                    "network_class_name": (
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                    ),
                    "arch_kwargs": {
                        "n_stages": 3,
                        "features_per_stage": [4, 8, 16],
                        "conv_op": conv,
                        "kernel_sizes": [[3] * dims] * 3,
                        "strides": [[1] * dims, [2] * dims, [2] * dims],
                        "n_conv_per_stage": [2, 2, 2],
                        "n_conv_per_stage_decoder": [2, 2],
                        "conv_bias": True,
                        "norm_op": norm,
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
            }
        },
    }


def make_model_folder(
    folder: str | Path,
    *,
    folds: Sequence[int] = (0,),
    configuration: str = "3d_fullres",
    patch_size: Sequence[int] = (16, 16, 16),
    mirroring_axes: Sequence[int] | None = (0, 1, 2),
    extra: dict[str, Any] | None = None,
    prefix: str = "",
    regions: bool = False,
    channels: Sequence[str] = ("CT",),
    spacing: Sequence[float] | None = None,
    transpose_forward: Sequence[int] = (0, 1, 2),
    previous_stage: str | None = None,
    head_bias: Sequence[float] | None = None,
) -> Path:
    """Write a tiny trained-model folder; each fold gets its own seeded random weights.

    Args:
        folder: where to write it.
        folds: the fold numbers (``fold_0``, ...).
        configuration: the configuration's name (``3d_fullres`` or ``2d``).
        patch_size: the patch size (its length chooses 2D or 3D).
        mirroring_axes: the checkpoint's ``inference_allowed_mirroring_axes`` (``None``: absent).
        extra: more entries for every checkpoint (e.g. a pickled object, to test refusal).
        prefix: a prefix for the weights' names (``_orig_mod.`` as torch.compile leaves it).
        regions: a region-based model (regions ``liver`` = labels 1 and 2, ``tumour`` = 2).
        channels: the input channels' names; ``CT`` channels get CT normalisation, others
            z-score.
        spacing: the configuration's target spacing (transposed axes).
        transpose_forward: the axis order nnU-Net works in.
        previous_stage: make it a cascade stage after this configuration.
        head_bias: the segmentation head's bias per output channel (random weights give one
            class most of the time; a bias balances them).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    schemes = ["CTNormalization" if c == "CT" else "ZScoreNormalization" for c in channels]
    plans = tiny_plans(
        configuration,
        patch_size,
        spacing=spacing,
        transpose_forward=transpose_forward,
        normalization=schemes,
        previous_stage=previous_stage,
    )
    (root / "plans.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
    labels: dict[str, Any] = {name: index for index, name in enumerate(CLASS_NAMES)}
    if regions:
        labels = {"background": 0, "liver": [1, 2], "tumour": 2}
    dataset: dict[str, Any] = {
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    if regions:
        dataset["regions_class_order"] = [1, 2]
    heads = 2 if regions else len(CLASS_NAMES)
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    architecture = plans["configurations"][configuration]["architecture"]
    for fold in folds:
        torch.manual_seed(1000 + fold)
        network = get_network_from_plans(
            architecture["network_class_name"],
            architecture["arch_kwargs"],
            architecture["_kw_requires_import"],
            len(channels),
            heads,
            deep_supervision=False,
        )
        if head_bias is not None:
            with torch.no_grad():
                network.decoder.seg_layers[-1].bias.copy_(torch.tensor(head_bias))
        checkpoint: dict[str, Any] = {
            "network_weights": {prefix + k: v for k, v in network.state_dict().items()},
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": configuration, "fold": fold, "plans": "nnUNetPlans"},
            "current_epoch": 1000,
            "_best_ema": np.float64(0.9),  # real checkpoints carry NumPy scalars
        }
        if mirroring_axes is not None:
            checkpoint["inference_allowed_mirroring_axes"] = tuple(mirroring_axes)
        checkpoint.update(extra or {})
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, root / f"fold_{fold}" / "checkpoint_final.pth")
    return root
