r"""Exact whole-case explanations of nnU-Net v2 predictions, in the original image's geometry.

nnU-Net predicts a case window by window: for fold $f$, window $w$ and mirroring $a \in A$
(no flip, and every non-empty subset of the allowed mirror axes) the network's logits
$y_{f,w,a} = \mathrm{flip}_a N_f(\mathrm{flip}_a \tilde X_w)$ are averaged over $A$, blended with
a Gaussian $g$, averaged over the folds and exported (resampled to the cropped original shape,
put into the crop box, axes transposed back):

$$
\ell = E\Big(\frac1F \sum_f \frac{\sum_w g\, \frac{1}{|A|}\sum_a y_{f,w,a}}{\sum_w g}\Big).
$$

The target score is the masked sum of the **exported** logits, $T = \sum_v M(v)\,\ell^c(v)$.
Everything after the network is linear, so with $W = E^\top M$ (one adjoint resampling,
:mod:`segcam.nnunet.geometry`) the gradient output of forward $(f, w, a)$ in channel $c$ is

$$
\Omega_{f,w,a} = \frac{1}{F\,|A|}\, \mathrm{flip}_a\Big(\frac{\tilde W_w\, g}{\sum_{w'} g}\Big),
$$

and one partial backward from that forward's logits to the layer gives exactly
$\partial T / \partial A_{f,w,a}$. A window whose $\tilde W_w$ is zero is skipped.

Maps (one convention): each forward's map (the method applied to its activation and
gradient) is up-sampled to its window (half-pixel linear), flipped back, summed on the padded
preprocessed grid, unpadded and brought to the original grid as nnU-Net brings its logits
(the same resampling, zeros outside the crop box, axes transposed back). ReLU and
normalisation follow on the original grid.

The blended logits are computed as nnU-Net computes them (float16 accumulation, its Gaussian,
windows, mirror order and fold average), and ``Predicted`` sets are nnU-Net's own export of
them: the voxels ``nnUNetv2_predict`` labels with the class (for region models, where the
region's sigmoid exceeds 0.5).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from segcam.core import (
    MethodOptions,
    check_finite_maps,
    check_postprocess,
    method_maps,
    resolve_methods,
)
from segcam.errors import ClassIndexError, OptionError, TargetError
from segcam.explanation import Explanation
from segcam.methods import Method
from segcam.nnunet.case import CaseLike, NnUNetCase, read_case
from segcam.nnunet.model import NnUNetModel
from segcam.postprocess import Normalization, postprocess
from segcam.recording import LayerSpec, record_forward
from segcam.targets import (
    Predicted,
    Region,
    Target,
    TargetLike,
    as_pixel_set,
    as_target_list,
    uses_logits,
    warn_empty_pixel_sets,
)

__all__ = ["NnUNetPrediction", "explain", "explain_and_predict", "explain_methods", "predict"]

Window = tuple[Any, ...]  # nnU-Net's slicer without the channel axis: slices, or (d, slices)


# ---------------------------------------------------------------- windows, Gaussian, mirrors


@dataclass(frozen=True)
class _Plan:
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


def _mirror_sets(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    if not axes:
        return [()]
    return [(), *(c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1))]


def _plan(
    spatial: tuple[int, ...],
    patch: tuple[int, ...],
    step_size: float,
    mirror_axes: Sequence[int] | None,
    device: torch.device,
) -> _Plan:
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
    return _Plan(
        padded=padded,
        unpad=tuple(revert[1:]),
        patch=tuple(patch),
        windows=windows,
        mirrors=_mirror_sets(mirror_axes),
        gaussian=gaussian,
        counts_half=counts_half,
        counts=counts,
    )


MIRROR_BATCH_VOXELS = 2**20
"""Mirrorings of a window share one forward while batch x patch voxels stays within this."""


def _mirror_batch(plan: _Plan) -> int:
    """How many mirrorings of a window go through the network together (at least 1).

    As many as torch has threads (and mirrorings), while the batch's patch voxels stay within
    :data:`MIRROR_BATCH_VOXELS`: on two CPU cores, 8 flipped (24, 64, 64) patches of the demo's
    nnU-Net run forward and backward to its last decoder stage in 0.95 s one by one, 0.30 s in
    batches of 2, 0.47 s in one batch of 8 (with memory for 8). nnU-Net's usual 128^3 patches
    stay at 1, so one forward's graph bounds the memory as before.
    """
    voxels = math.prod(plan.patch)
    fits = MIRROR_BATCH_VOXELS // max(voxels, 1)
    return max(1, min(len(plan.mirrors), torch.get_num_threads(), fits))


def _flip(tensor: torch.Tensor, axes: tuple[int, ...], offset: int) -> torch.Tensor:
    return torch.flip(tensor, [a + offset for a in axes]) if axes else tensor


# ---------------------------------------------------------------- nnU-Net's prediction


class _FoldBlend:
    """One fold's float16 accumulation of Gaussian-weighted logits, as nnU-Net does it."""

    def __init__(self, plan: _Plan, heads: int) -> None:
        self.plan = plan
        self.logits = torch.zeros(
            (heads, *plan.padded), dtype=torch.half, device=plan.gaussian.device
        )

    def add(self, window: Window, mirrored: list[torch.Tensor]) -> None:
        """Add one window: ``mirrored`` are the (1, K, *patch) logits per mirroring, in order."""
        prediction = mirrored[0].clone()
        for axes, logits in zip(self.plan.mirrors[1:], mirrored[1:], strict=True):
            prediction += _flip(logits, axes, 2)
        if len(mirrored) > 1:
            prediction /= len(mirrored)
        prediction = prediction[0]
        prediction *= self.plan.gaussian
        self.logits[(slice(None), *window)] += prediction

    def finish(self) -> torch.Tensor:
        """The fold's blended logits on the preprocessed grid (K, *S_pre), float16."""
        torch.div(self.logits, self.plan.counts_half, out=self.logits)
        return self.logits[(slice(None), *self.plan.unpad)]


def _average_folds(total: torch.Tensor | None, fold: torch.Tensor) -> torch.Tensor:
    fold = fold.cpu()
    if total is None:
        return fold
    total += fold
    return total


def _windows_of(
    case: NnUNetCase, plan: _Plan, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    data = case.data.to(device=device, dtype=dtype)
    padded, _ = pad_nd_image(data, plan.patch, "constant", {"value": 0}, True, None)
    result: torch.Tensor = padded
    return result


def _forward_input(
    padded: torch.Tensor, plan: _Plan, window: Window, axes: tuple[int, ...]
) -> torch.Tensor:
    x = torch.clone(plan.crop(padded, window)[None], memory_format=torch.contiguous_format)
    return _flip(x, axes, 2)


def _predict_logits(model: NnUNetModel, case: NnUNetCase, plan: _Plan) -> torch.Tensor:
    """nnU-Net's fold-averaged blended logits (K, *S_pre), float16, without gradients."""
    total: torch.Tensor | None = None
    for network in model.networks:
        dtype, device = _network_dtype_device(network)
        padded = _windows_of(case, plan, dtype, device)
        blend = _FoldBlend(plan, model.label_manager.num_segmentation_heads)
        with torch.no_grad():
            for window in plan.windows:
                outputs = [
                    network(_forward_input(padded, plan, window, axes)) for axes in plan.mirrors
                ]
                blend.add(window, outputs)
        total = _average_folds(total, blend.finish())
    assert total is not None
    if len(model.networks) > 1:
        total /= len(model.networks)
    return total


def _network_dtype_device(network: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(network.parameters())
    return parameter.dtype, parameter.device


# ---------------------------------------------------------------- export and predicted sets


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


def _export(model: NnUNetModel, case: NnUNetCase, logits: torch.Tensor) -> NnUNetPrediction:
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
    plan = _plan_for(model, read, step_size, mirroring)
    return _export(model, read, _predict_logits(model, read, plan))


def _plan_for(model: NnUNetModel, case: NnUNetCase, step_size: float, mirroring: bool) -> _Plan:
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, int | float)
        or not 0 < step_size <= 1
    ):
        raise OptionError(f"step_size must be a number in (0, 1]; got {step_size!r}")
    _, device = _network_dtype_device(model.networks[0])
    return _plan(
        tuple(int(s) for s in case.data.shape[1:]),
        tuple(int(p) for p in model.configuration_manager.patch_size),
        float(step_size),
        model.mirroring_axes if mirroring else None,
        device,
    )


# ---------------------------------------------------------------- targets


@dataclass(frozen=True, eq=False)
class _GivenSet(Target):
    """A pixel set fixed beforehand (nnU-Net's predicted set), described as the user's target."""

    uses_logits = False

    class_index: int
    mask: torch.Tensor = field(repr=False)
    description: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        return as_pixel_set(self.mask, logits, self.label)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def __repr__(self) -> str:
        return self.label


def _class_index(model: NnUNetModel, value: Any, target: TargetLike) -> int:
    names = model.class_names
    if isinstance(value, str):
        if value not in names:
            raise ClassIndexError(
                f"{type(target).__name__}: class {value!r} is not in dataset.json; classes: "
                f"{', '.join(names)}"
            )
        return names.index(value)
    heads = model.label_manager.num_segmentation_heads
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < heads:
        raise ClassIndexError(
            f"{type(target).__name__}: class {value!r} is out of range: the model has {heads} "
            f"output channel(s) ({', '.join(names)})"
        )
    return int(value)


def _with_class(target: TargetLike, index: int) -> TargetLike:
    if target.class_index == index:
        return target
    if not dataclasses.is_dataclass(target) or isinstance(target, type):
        raise TargetError(f"{target!r}: give the class as an index for this target type")
    return dataclasses.replace(target, class_index=index)


def _resolve_file_mask(model: NnUNetModel, target: TargetLike) -> TargetLike:
    mask = getattr(target, "mask", None)
    if not isinstance(mask, str | Path):
        return target
    path = Path(mask)
    if not path.is_file():
        raise TargetError(f"{type(target).__name__}: no such label file {path}")
    reader = model.plans_manager.image_reader_writer_class()
    try:
        labels, _ = reader.read_seg(str(path))
    except Exception as error:  # readers raise many types
        raise TargetError(f"{type(target).__name__}: cannot read {path}: {error}") from error
    return dataclasses.replace(target, mask=np.asarray(labels[0]) != 0)  # type: ignore[type-var]


def _prepare_targets(
    model: NnUNetModel, targets: TargetLike | Sequence[TargetLike]
) -> list[TargetLike]:
    result = []
    for target in as_target_list(targets):
        target = _with_class(target, _class_index(model, target.class_index, target))
        result.append(_resolve_file_mask(model, target))
    return result


def _nnunet_sets(
    model: NnUNetModel, targets: list[TargetLike], prediction: NnUNetPrediction | None
) -> list[TargetLike]:
    """``Predicted(c)`` and ``Region(c)`` without a mask, on nnU-Net's exported segmentation."""
    result = []
    for target in targets:
        if isinstance(target, Predicted | Region) and getattr(target, "mask", None) is None:
            assert prediction is not None
            predicted = prediction.predicted(model, target.class_index)
            if isinstance(target, Region):
                target = Region(target.class_index, predicted)
            else:
                description = {**target.describe(), "source": "nnU-Net export"}
                target = _GivenSet(target.class_index, predicted, description, repr(target))
        result.append(target)
    return result


# ---------------------------------------------------------------- the explanation


@dataclass
class _Accumulators:
    """Per layer and method, the maps (T, *padded) of the current fold and of all folds."""

    fold: list[dict[str, torch.Tensor]]
    total: list[dict[str, torch.Tensor]] | None = None
    per_fold: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)


def _zeros_like_layers(
    count: int, names: Sequence[str], shape: tuple[int, ...], like: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    return [{name: like.new_zeros(shape) for name in names} for _ in range(count)]


def explain_and_predict(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Explanation], NnUNetPrediction]:
    """:func:`explain_methods` and nnU-Net's prediction of the case (for its segmentation)."""
    chosen = resolve_methods(methods, method_options)
    free = [m.name for m, _ in chosen if not m.needs_gradient]
    if free:
        raise OptionError(
            f"{', '.join(free)}: gradient-free methods are not available for nnU-Net models; "
            f"use a gradient method (seg-hires-grad-cam, seg-grad-cam, ...)"
        )
    check_postprocess(normalize)
    read = read_case(model, case)
    plan = _plan_for(model, read, step_size, mirroring)
    target_list = _prepare_targets(model, targets)
    static = not any(uses_logits(t) for t in target_list)
    prediction = None if static else _export(model, read, _predict_logits(model, read, plan))
    target_list = _nnunet_sets(model, target_list, prediction)
    run = _Run(model, read, plan, target_list, chosen, layer, per_fold, progress)
    if not static:  # the prediction pass ran every forward once without gradients
        run.forwards = len(model.networks) * len(plan.windows) * len(plan.mirrors)
    blended = run.explain(static)
    if static:
        prediction = _export(model, read, blended)
    assert prediction is not None
    return run.finish(prediction, relu, upsample, normalize, mirroring, step_size), prediction


def explain_methods(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Explanation]:
    """Several gradient methods from the same forward and backward passes (see :func:`explain`)."""
    return explain_and_predict(
        model,
        case,
        targets,
        layer,
        methods,
        step_size=step_size,
        mirroring=mirroring,
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        method_options=method_options,
        per_fold=per_fold,
        progress=progress,
    )[0]


def explain(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    method: str = "seg-hires-grad-cam",
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: Mapping[str, Any] | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Explanation:
    r"""Explain nnU-Net's prediction of one case exactly, on the original image's grid.

    The score is the masked sum of nnU-Net's *exported* logits (after sliding windows,
    mirroring, Gaussian blending, fold averaging, resampling, uncropping and transposing):
    $y^c_M = \sum_{v \in M} \ell^c(v)$, with M on the original grid. See the module's
    docstring for the exact gradient and the map convention.

    Args:
        model: from :func:`segcam.nnunet.load`.
        case: the case's channel files, ``(array (C, *S), properties)`` as
            ``nnUNetPredictor.predict_single_npy_array`` takes them, or a read case.
        targets: targets in original voxel coordinates (the array order of nnU-Net's reader):
            ``Predicted("liver")`` = the voxels nnU-Net's export labels liver, ``Mask(c, array or
            label file)``, ``Box``, ``Pixel``, ``AllPixels``, ``Region``; classes by index or by
            their name in ``dataset.json`` (regions of region models by their name).
        layer: the layer(s) to explain (module names, e.g. ``decoder.stages.1``).
        method: a gradient method (default Seg-HiRes-Grad CAM).
        step_size: nnU-Net's tile step size (fraction of the patch).
        mirroring: mirroring test-time augmentation over the checkpoint's allowed axes.
        relu: keep the positive part (after the maps reach the original grid).
        normalize: ``"max"`` or ``"minmax"`` per map, last.
        upsample: True: maps on the original grid. False: maps on the preprocessed (network
            input) grid, before the export; ``info["nnunet"]["geometry"]`` says how it maps back.
        method_options: the method's options.
        per_fold: also give each fold's own maps (:attr:`Explanation.members`, ``fold_<f>``)
            and the folds' agreement (``info["nnunet"]["fold_agreement"]``).
        progress: called with (done, total) forwards.

    Raises:
        NnUNetError: the case cannot be read or used with the model.
        ClassIndexError: a class index or name the model does not have.
        OptionError: a bad option or a gradient-free method.
    """
    return explain_methods(
        model,
        case,
        targets,
        layer,
        [method],
        step_size=step_size,
        mirroring=mirroring,
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        method_options={method: method_options} if method_options else None,
        per_fold=per_fold,
        progress=progress,
    )[method]


class _Run:
    """The explanation pass over folds, windows and mirrors (one graph alive at a time)."""

    def __init__(
        self,
        model: NnUNetModel,
        case: NnUNetCase,
        plan: _Plan,
        targets: list[TargetLike],
        methods: list[tuple[Method, dict[str, Any]]],
        layer: LayerSpec | Sequence[LayerSpec],
        per_fold: bool,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.model, self.case, self.plan = model, case, plan
        self.targets, self.methods, self.layer = targets, methods, layer
        self.per_fold, self.progress = per_fold, progress
        dtype, device = _network_dtype_device(model.networks[0])
        self.dtype, self.device = dtype, device
        heads = model.label_manager.num_segmentation_heads
        original = case.geometry.original
        stand_in = torch.zeros((), device=device).expand(1, heads, *original)
        self.pixel_sets = [
            as_pixel_set(t.pixel_set(stand_in), stand_in, repr(t))[0] for t in targets
        ]
        # W = E^T M per target, zero-padded like the input (the exact weights of the export)
        weights = case.geometry.from_original(
            torch.stack(self.pixel_sets).to(device=device, dtype=torch.float64)
        )
        storage = torch.float64 if dtype == torch.float64 else torch.float32
        self.weights = weights.new_zeros((len(targets), *plan.padded), dtype=storage)
        self.weights[(slice(None), *plan.unpad)] = weights
        self.mirror_batch = _mirror_batch(plan)
        self.forwards = 0
        self.backward_passes = 0
        self.windows_skipped = 0
        self.layer_names: tuple[str, ...] = ()
        self.layer_shapes: dict[str, tuple[int, ...]] = {}
        self.sums: list[dict[str, torch.Tensor]] = []  # per layer: method -> (T, *padded)
        self.fold_sums: list[list[dict[str, torch.Tensor]]] = []

    def _active(self, window: Window) -> list[int]:
        return [t for t in range(len(self.targets)) if bool(self.weights[(t, *window)].any())]

    def _omega(self, t: int, window: Window) -> torch.Tensor:
        """(W~ g / sum g) on the window, exact in float64, then the network's dtype."""
        plan = self.plan
        share = self.weights[(t, *window)] * plan.gaussian.double() / plan.counts[window]
        return share / (len(self.model.networks) * len(plan.mirrors))

    def explain(self, static: bool) -> torch.Tensor:
        """Run every fold; return the blended logits (float16) when ``static`` (else None-like)."""
        plan, model = self.plan, self.model
        heads = model.label_manager.num_segmentation_heads
        total: torch.Tensor | None = None
        steps, done = len(model.networks) * len(plan.windows), 0
        for network in model.networks:
            dtype, device = _network_dtype_device(network)
            padded = _windows_of(self.case, plan, dtype, device)
            blend = _FoldBlend(plan, heads) if static else None
            fold: list[dict[str, torch.Tensor]] = []
            for window in plan.windows:
                active = self._active(window)
                if not active:
                    self.windows_skipped += 1
                if active or static:
                    batch = 1 if static else self.mirror_batch
                    outputs = self._window(network, padded, window, active, fold, batch)
                    if blend is not None:
                        blend.add(window, outputs)
                done += 1
                if self.progress is not None:
                    self.progress(done, steps)
            self._finish_fold(fold)
            if blend is not None:
                total = _average_folds(total, blend.finish())
        if static:
            assert total is not None
            if len(model.networks) > 1:
                total /= len(model.networks)
            return total
        return torch.empty(0)

    def _window(
        self,
        network: nn.Module,
        padded: torch.Tensor,
        window: Window,
        active: list[int],
        fold: list[dict[str, torch.Tensor]],
        batch: int,
    ) -> list[torch.Tensor]:
        """Forward one window under every mirroring; backward for the active targets.

        ``batch`` mirrorings share one forward (a batch of flipped inputs): faster, but its
        logits differ from nnU-Net's batch-1 forwards by float rounding, so the static path
        (whose logits are nnU-Net's) uses 1. Returns the logits per mirroring, in order.
        """
        plan = self.plan
        outputs: list[torch.Tensor] = []
        shares = {t: self._omega(t, window) for t in active}
        mirrors = plan.mirrors
        for first in range(0, len(mirrors), batch):
            group = mirrors[first : first + batch]
            x = torch.cat([_forward_input(padded, plan, window, axes) for axes in group])
            self.forwards += len(group)
            if not active:
                with torch.no_grad():
                    logits = network(x)
                outputs.extend(logits[k : k + 1] for k in range(len(group)))
                continue
            with record_forward(network, x, self.layer) as recorded:
                outputs.extend(recorded.logits[k : k + 1] for k in range(len(group)))
                if not self.layer_names:
                    self.layer_names = recorded.layer_names
                    self.layer_shapes = {
                        k: (1, *tuple(v)[1:]) for k, v in recorded.layer_shapes.items()
                    }
                if not fold:
                    like = recorded.logits
                    fold.extend(
                        {
                            m.name: like.new_zeros((len(self.targets), *plan.padded))
                            for m, _ in self.methods
                        }
                        for _ in self.layer_names
                    )
                gradients = []
                for t in active:
                    grad = torch.zeros_like(recorded.logits)
                    for k, axes in enumerate(group):
                        share = _flip(shares[t], axes, 0).to(grad.dtype)
                        grad[k, self.targets[t].class_index] = share
                    gradients.append(grad)
                self.backward_passes += len(gradients) * len(group)
                for t, maps in zip(
                    active, method_maps(recorded, iter(gradients), self.methods), strict=True
                ):
                    for name, per_layer in maps.items():
                        for index, layer_map in enumerate(per_layer):
                            up = layer_map[:, None]
                            if tuple(layer_map.shape[1:]) != plan.patch:
                                up = F.interpolate(
                                    up,
                                    size=plan.patch,
                                    mode="bilinear" if len(plan.patch) == 2 else "trilinear",
                                    align_corners=False,
                                )
                            total = fold[index][name][(t, *window)]
                            for k, axes in enumerate(group):
                                total += _flip(up[k, 0], axes, 0)
        return outputs

    def _finish_fold(self, fold: list[dict[str, torch.Tensor]]) -> None:
        if not fold:
            return
        if self.per_fold:
            self.fold_sums.append([{k: v.clone() for k, v in d.items()} for d in fold])
        if not self.sums:
            self.sums = fold
        else:
            for total, part in zip(self.sums, fold, strict=True):
                for name in total:
                    total[name] += part[name]

    def finish(
        self,
        prediction: NnUNetPrediction,
        relu: bool,
        upsample: bool,
        normalize: Normalization | None,
        mirroring: bool,
        step_size: float,
    ) -> dict[str, Explanation]:
        from importlib.metadata import version

        plan, geometry = self.plan, self.case.geometry
        logits = prediction.original_logits()[None]
        stacked = torch.stack(self.pixel_sets)[None].to(logits.device)
        nonempty = stacked.flatten(2).any(dim=2)
        warn_empty_pixel_sets(nonempty, self.targets)
        if not self.sums:  # no window met any target: every map is zero
            self._zero_sums()
        info: dict[str, Any] = {
            "nnunet": {
                "model": str(self.model.folder),
                "configuration": self.model.configuration,
                "folds": [str(f) for f in self.model.folds],
                "mirror_axes": list(self.model.mirroring_axes or ()) if mirroring else [],
                "step_size": float(step_size),
                "windows": len(plan.windows),
                "forwards": self.forwards,
                "backward_passes": self.backward_passes,
                "windows_skipped": self.windows_skipped,
                "patch_size": list(plan.patch),
                "grid": "original" if upsample else "preprocessed",
                "geometry": {
                    "preprocessed": list(geometry.preprocessed),
                    "cropped": list(geometry.cropped),
                    "bbox": [list(b) for b in geometry.bbox],
                    "original": list(geometry.original),
                    "transpose_backward": list(geometry.transpose_backward),
                    "separate_z_axis": geometry.separate_z_axis,
                },
                "nnunetv2": version("nnunetv2"),
            }
        }

        def place(maps: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            grid = (
                maps[(slice(None), *plan.unpad)] * scale
                if scale != 1.0
                else maps[(slice(None), *plan.unpad)]
            )
            if upsample:
                grid = geometry.to_original(grid)
            return postprocess(grid[None], relu_maps=relu, size=None, normalization=normalize)

        result = {}
        for method, options in self.methods:
            layer_maps = {}
            for name, layer_sums in zip(self.layer_names, self.sums, strict=True):
                raw = layer_sums[method.name]
                check_finite_maps(raw[None], method.name, name, self.targets, self.case.data[None])
                layer_maps[name] = place(raw)
            members = {}
            if self.per_fold:
                for fold, fold_sums in zip(self.model.folds, self.fold_sums, strict=True):
                    members[f"fold_{fold}"] = Explanation(
                        layer_maps={
                            name: place(s[method.name], float(len(self.model.folds)))
                            for name, s in zip(self.layer_names, fold_sums, strict=True)
                        },
                        logits=logits,
                        pixel_sets=stacked,
                        targets=tuple(self.targets),
                        method=method.name,
                        relu=relu,
                        upsampled=upsample,
                        normalize=normalize,
                        layer_shapes=self.layer_shapes,
                        method_options=dict(options),
                        info={"nnunet": {"fold": str(fold)}},
                    )
            method_info = info
            if members:
                method_info = {
                    "nnunet": {**info["nnunet"], "fold_agreement": _agreement(members, stacked)}
                }
            result[method.name] = Explanation(
                layer_maps=layer_maps,
                logits=logits,
                pixel_sets=stacked,
                targets=tuple(self.targets),
                method=method.name,
                relu=relu,
                upsampled=upsample,
                normalize=normalize,
                layer_shapes=self.layer_shapes,
                method_options=dict(options),
                info=method_info,
                members=members,
            )
        return result

    def _zero_sums(self) -> None:
        """Layer names and zero maps when no forward was recorded (every target empty)."""
        from segcam.recording import resolve_layers

        network = self.model.networks[0]
        names = [name for name, _ in resolve_layers(network, self.layer)]
        self.layer_names = tuple(names)
        like = torch.zeros((), dtype=self.dtype, device=self.device)
        self.sums = [
            {
                m.name: like.new_zeros((len(self.targets), *self.plan.padded))
                for m, _ in self.methods
            }
            for _ in names
        ]
        self.fold_sums = (
            [[{k: v.clone() for k, v in d.items()} for d in self.sums] for _ in self.model.folds]
            if self.per_fold
            else []
        )


def _agreement(
    members: Mapping[str, Explanation], pixel_sets: torch.Tensor, margin: int = 3
) -> dict[str, Any]:
    """Mean pairwise Spearman rank correlation of the folds' maps, inside and around M."""
    from scipy.stats import spearmanr

    names = list(members)
    first = members[names[0]]
    result: dict[str, Any] = {}
    sets = pixel_sets[0].float()
    dims = sets.ndim - 1
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    around = pool(sets[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    for layer in first.layers:
        per_target = []
        for t in range(sets.shape[0]):
            inside, near = sets[t] > 0, around[t]
            scores: dict[str, float | None] = {}
            for label, region in (("inside", inside), ("around", near & ~inside)):
                values = [
                    members[n].layer_maps[layer][0, t][region].double().cpu().numpy() for n in names
                ]
                if len(names) < 2 or values[0].size < 3:
                    scores[label] = None
                    continue
                correlations = []
                for i, j in itertools.combinations(range(len(names)), 2):
                    rho = spearmanr(values[i], values[j]).statistic
                    correlations.append(float(rho) if math.isfinite(rho) else 0.0)
                scores[label] = float(np.mean(correlations))
            per_target.append(scores)
        result[layer] = per_target
    return result
