r"""nnU-Net's sliding windows for one case: the plan, the Gaussian, the mirror sets, the inputs.

As nnU-Net's ``predict_sliding_window_return_logits`` lays them out: the preprocessed case is
padded to at least one patch, windows start at nnU-Net's steps
(``compute_steps_for_sliding_window``; a 2D configuration slides slice by slice), every
window's logits are weighted with nnU-Net's Gaussian $g$ (``compute_gaussian``, sigma =
patch / 8) and the sum is divided by $\sum_w g$. Mirroring averages the no-flip forward with
one forward per non-empty subset of the checkpoint's allowed mirror axes, () first, in
nnU-Net's order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam.errors import OptionError
from segcam.nnunet.case import NnUNetCase
from segcam.nnunet.model import NnUNetModel

__all__ = [
    "MIRROR_BATCH_VOXELS",
    "Window",
    "WindowPlan",
    "flip",
    "mirror_batch_size",
    "mirror_sets",
    "network_dtype_device",
    "pad_case",
    "plan_case",
    "plan_windows",
    "window_input",
]

Window = tuple[Any, ...]
"""nnU-Net's slicer of one window without the channel axis: slices, or (slice index, slices)."""


@dataclass(frozen=True)
class WindowPlan:
    """nnU-Net's sliding-window layout for one case (``predict_sliding_window_return_logits``)."""

    padded: tuple[int, ...]  # the padded spatial shape
    unpad: tuple[slice, ...]  # padded -> preprocessed grid
    patch: tuple[int, ...]
    windows: list[Window]
    mirrors: list[tuple[int, ...]]  # spatial axes flipped per forward, () first
    gaussian: torch.Tensor = field(repr=False)  # float16, the patch's shape
    counts_half: torch.Tensor = field(repr=False)  # sum of g over windows, float16 as nnU-Net
    counts: torch.Tensor = field(repr=False)  # the same, exact (float64)

    def crop(self, tensor: torch.Tensor, window: Window) -> torch.Tensor:
        """``tensor[(slice(None), *window)]``: (C, *patch) of a (C, *padded) tensor."""
        return tensor[(slice(None), *window)]


def mirror_sets(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """(), then every non-empty subset of ``axes`` by size, in nnU-Net's order."""
    if not axes:
        return [()]
    return [(), *(c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1))]


def plan_windows(
    spatial: tuple[int, ...],
    patch: tuple[int, ...],
    step_size: float,
    mirror_axes: Sequence[int] | None,
    device: torch.device,
) -> WindowPlan:
    """The windows, Gaussian and blending counts of a preprocessed grid ``spatial``."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    probe = torch.zeros((1, *spatial), dtype=torch.float32)
    padded_probe, revert = pad_nd_image(probe, patch, "constant", {"value": 0}, True, None)
    padded = tuple(int(s) for s in padded_probe.shape[1:])
    windows: list[Window] = []
    if len(patch) < len(padded):  # a 2D configuration: slice by slice
        steps = compute_steps_for_sliding_window(padded[1:], patch, step_size)
        for d in range(padded[0]):
            for starts in itertools.product(*steps):
                windows.append((d, *(slice(s, s + p) for s, p in zip(starts, patch, strict=True))))
    else:
        steps = compute_steps_for_sliding_window(padded, patch, step_size)
        for starts in itertools.product(*steps):
            windows.append(tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True)))
    # nnU-Net caches its Gaussian, made inside inference mode: a clone is a normal tensor
    with torch.inference_mode(False):
        gaussian = compute_gaussian(
            tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10, device=device
        ).clone()
        counts_half = torch.zeros(padded, dtype=torch.half, device=device)
        counts = torch.zeros(padded, dtype=torch.float64, device=device)
        for window in windows:
            counts_half[window] += gaussian
            counts[window] += gaussian.double()
    return WindowPlan(
        padded=padded,
        unpad=tuple(revert[1:]),
        patch=tuple(patch),
        windows=windows,
        mirrors=mirror_sets(mirror_axes),
        gaussian=gaussian,
        counts_half=counts_half,
        counts=counts,
    )


def plan_case(
    model: NnUNetModel, case: NnUNetCase, step_size: float, mirroring: bool
) -> WindowPlan:
    """:func:`plan_windows` for a read case with the model's patch and mirror axes.

    Raises:
        OptionError: ``step_size`` is not a number in (0, 1].
    """
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, int | float)
        or not 0 < step_size <= 1
    ):
        raise OptionError(f"step_size must be a number in (0, 1]; got {step_size!r}")
    _, device = network_dtype_device(model.networks[0])
    return plan_windows(
        tuple(int(s) for s in case.data.shape[1:]),
        tuple(int(p) for p in model.configuration_manager.patch_size),
        float(step_size),
        model.mirroring_axes if mirroring else None,
        device,
    )


MIRROR_BATCH_VOXELS = 2**20
"""Mirrorings of a window share one forward while batch x patch voxels stays within this."""


def mirror_batch_size(plan: WindowPlan) -> int:
    """How many mirrorings of a window go through the network together (at least 1).

    As many as torch has threads (and mirrorings), while the batch's patch voxels stay within
    :data:`MIRROR_BATCH_VOXELS`: small patches run faster in small batches, and nnU-Net's usual
    128^3 patches stay at 1, so one forward's graph bounds the memory.
    """
    voxels = math.prod(plan.patch)
    fits = MIRROR_BATCH_VOXELS // max(voxels, 1)
    return max(1, min(len(plan.mirrors), torch.get_num_threads(), fits))


def flip(tensor: torch.Tensor, axes: tuple[int, ...], offset: int) -> torch.Tensor:
    """``tensor`` flipped along the spatial ``axes`` (tensor axis = spatial axis + ``offset``)."""
    return torch.flip(tensor, [a + offset for a in axes]) if axes else tensor


def network_dtype_device(network: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a network's parameters (where its inputs must be)."""
    parameter = next(network.parameters())
    return parameter.dtype, parameter.device


def pad_case(
    case: NnUNetCase, plan: WindowPlan, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The case's preprocessed data (C, *padded), padded as nnU-Net pads it for its windows."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    data = case.data.to(device=device, dtype=dtype)
    padded, _ = pad_nd_image(data, plan.patch, "constant", {"value": 0}, True, None)
    result: torch.Tensor = padded
    return result


def window_input(
    padded: torch.Tensor, plan: WindowPlan, window: Window, axes: tuple[int, ...]
) -> torch.Tensor:
    """The network's input (1, C, *patch) for one window under one mirroring."""
    x = torch.clone(plan.crop(padded, window)[None], memory_format=torch.contiguous_format)
    return flip(x, axes, 2)
