"""nnU-Net's prediction of a case: the fold/window/mirror loop, the blend, the export.

One loop (:func:`run_folds`) visits every fold's network and every window; the prediction
(:func:`predict`) and the explanation (:mod:`segcam.nnunet.explain`) both go through it, the
first with plain forwards, the second with recorded ones. The blend is nnU-Net's: per fold,
the mirrorings' mean times the Gaussian, accumulated in float16 and divided by the summed
Gaussian; the folds' mean; then the export of
``convert_predicted_logits_to_segmentation_with_correct_shape`` (resampling to the crop box,
the segmentation put back into the original array, axes transposed back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from segcam.checks import run_model
from segcam.memory_format import MemoryFormat, convolution_layout
from segcam.nnunet.case import CaseLike, NnUNetCase, read_case
from segcam.nnunet.model import NnUNetModel
from segcam.nnunet.windows import (
    Window,
    WindowPlan,
    flip,
    network_dtype_device,
    pad_case,
    plan_case,
    window_input,
)

__all__ = [
    "FoldBlend",
    "NnUNetPrediction",
    "WindowStep",
    "export",
    "predict",
    "predict_logits",
    "predict_window",
    "run_folds",
]


class FoldBlend:
    """One fold's float16 accumulation of Gaussian-weighted logits, as nnU-Net does it."""

    def __init__(self, plan: WindowPlan, heads: int) -> None:
        self.plan = plan
        self.logits = torch.zeros(
            (heads, *plan.padded), dtype=torch.half, device=plan.gaussian.device
        )

    def add(self, window: Window, mirrored: list[torch.Tensor]) -> None:
        """Add one window: ``mirrored`` are the (1, K, *patch) logits per mirroring, in order."""
        prediction = mirrored[0].clone()
        for axes, logits in zip(self.plan.mirrors[1:], mirrored[1:], strict=True):
            prediction += flip(logits, axes, 2)
        if len(mirrored) > 1:
            prediction /= len(mirrored)
        prediction = prediction[0]
        prediction *= self.plan.gaussian
        self.logits[(slice(None), *window)] += prediction

    def finish(self) -> torch.Tensor:
        """The fold's blended logits on the preprocessed grid (K, *S_pre), float16."""
        torch.div(self.logits, self.plan.counts_half, out=self.logits)
        return self.logits[(slice(None), *self.plan.unpad)]


WindowStep = Callable[[nn.Module, torch.Tensor, Window], list[torch.Tensor] | None]
"""``step(network, padded input, window) -> logits per mirroring (1, K, *patch), or None``."""


def predict_window(
    network: nn.Module, padded: torch.Tensor, plan: WindowPlan, window: Window
) -> list[torch.Tensor]:
    """nnU-Net's forwards of one window, one per mirroring, without gradients."""
    with torch.no_grad():
        return [
            run_model(network, window_input(padded, plan, window, axes)) for axes in plan.mirrors
        ]


def run_folds(
    model: NnUNetModel,
    case: NnUNetCase,
    plan: WindowPlan,
    step: WindowStep,
    *,
    blend: bool = True,
    end_fold: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    layout: MemoryFormat = "auto",
) -> torch.Tensor | None:
    """Every fold's network over every window: ``step`` runs a window's forwards.

    Each fold's forwards run in the memory layout ``layout`` gives its network
    (:mod:`segcam.memory_format`; ``"contiguous"``: nnU-Net's own forwards, bit for bit).

    With ``blend``, the logits ``step`` returns are blended as nnU-Net blends them and the
    fold-averaged logits (K, *S_pre), float16, are returned (``step`` must return them for every
    window); else nothing is blended and ``None`` is returned. ``end_fold`` is called after each
    fold's last window, ``progress`` with (windows done, windows of all folds).
    """
    heads = model.label_manager.num_segmentation_heads
    total: torch.Tensor | None = None
    steps, done = len(model.networks) * len(plan.windows), 0
    for network in model.networks:
        dtype, device = network_dtype_device(network)
        padded = pad_case(case, plan, dtype, device)
        fold = FoldBlend(plan, heads) if blend else None
        with convolution_layout(network, padded, layout):
            for window in plan.windows:
                outputs = step(network, padded, window)
                if fold is not None:
                    assert outputs is not None, "a blended run needs every window's logits"
                    fold.add(window, outputs)
                done += 1
                if progress is not None:
                    progress(done, steps)
        if end_fold is not None:
            end_fold()
        if fold is not None:
            blended = fold.finish().cpu()
            total = blended if total is None else total.add_(blended)  # the folds' sum
    if total is not None and len(model.networks) > 1:
        total /= len(model.networks)  # ... and their mean
    return total


def predict_logits(
    model: NnUNetModel, case: NnUNetCase, plan: WindowPlan, layout: MemoryFormat = "auto"
) -> torch.Tensor:
    """nnU-Net's fold-averaged blended logits (K, *S_pre), float16, without gradients.

    With ``layout="contiguous"``, nnU-Net's own numbers bit for bit; else to float32 rounding.
    """
    logits = run_folds(
        model,
        case,
        plan,
        lambda network, padded, window: predict_window(network, padded, plan, window),
        layout=layout,
    )
    assert logits is not None
    return logits


@dataclass(frozen=True, eq=False)
class NnUNetPrediction:
    """nnU-Net's prediction of a case, exported as ``nnUNetv2_predict`` exports it.

    Attributes:
        logits: the fold-averaged blended logits on the preprocessed grid (K, *S_pre), float16.
        resampled: the logits resampled to the crop box (K, *cropped), float16, as the export.
        segmentation: the exported segmentation on the original array's grid.
        case: the case.
    """

    logits: torch.Tensor = field(repr=False)
    resampled: np.ndarray = field(repr=False)
    segmentation: np.ndarray = field(repr=False)
    case: NnUNetCase = field(repr=False)

    def original_logits(self) -> torch.Tensor:
        """The exported logits on the original grid (K, *original), float32, 0 outside the crop."""
        return self.case.geometry.insert(torch.from_numpy(np.asarray(self.resampled, np.float32)))

    def predicted(self, model: NnUNetModel, index: int) -> torch.Tensor:
        """The voxels nnU-Net's export gives class (region) ``index``, original grid, bool."""
        if model.label_manager.has_regions:
            probabilities = model.label_manager.apply_inference_nonlin(
                torch.from_numpy(np.ascontiguousarray(self.resampled[index : index + 1]))
            )
            return self.case.geometry.insert(probabilities > 0.5, fill=False)[0]
        return torch.from_numpy(self.segmentation == index)


def export(model: NnUNetModel, case: NnUNetCase, logits: torch.Tensor) -> NnUNetPrediction:
    """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``, step by step."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    plans, configuration, labels = (
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
    )
    properties = case.properties
    spacing = [properties["spacing"][i] for i in plans.transpose_forward]
    current = (
        configuration.spacing
        if len(configuration.spacing)
        == len(properties["shape_after_cropping_and_before_resampling"])
        else [spacing[0], *configuration.spacing]
    )
    resampled = configuration.resampling_fn_probabilities(
        logits, properties["shape_after_cropping_and_before_resampling"], current, spacing
    )
    resampled = np.asarray(resampled.numpy() if isinstance(resampled, torch.Tensor) else resampled)
    segmentation = labels.convert_logits_to_segmentation(resampled)
    full = np.zeros(
        properties["shape_before_cropping"],
        dtype=np.uint8 if len(labels.foreground_labels) < 255 else np.uint16,
    )
    full = insert_crop_into_image(full, segmentation, properties["bbox_used_for_cropping"])
    if isinstance(full, torch.Tensor):
        full = full.cpu().numpy()
    full = full.transpose(plans.transpose_backward)
    return NnUNetPrediction(logits=logits, resampled=resampled, segmentation=full, case=case)


def predict(
    model: NnUNetModel, case: CaseLike, *, step_size: float = 0.5, mirroring: bool = True
) -> NnUNetPrediction:
    """nnU-Net's own prediction of a case (logits and exported segmentation), without gradients.

    Equals ``nnUNetPredictor`` with the same folds, step size and mirroring on the same device
    (CPU: bit for bit; CUDA runs nnU-Net under autocast, segcam in the network's dtype).
    """
    read = read_case(model, case)
    plan = plan_case(model, read, step_size, mirroring)
    return export(model, read, predict_logits(model, read, plan))
