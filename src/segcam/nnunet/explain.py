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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcam.core import method_maps
from segcam.errors import OptionError
from segcam.explanation import Explanation, assemble
from segcam.layers import LayerSpec, resolve_layers
from segcam.methods import Method, MethodOptions, resolve_methods
from segcam.metrics import fold_agreement
from segcam.nnunet.case import CaseLike, NnUNetCase, read_case
from segcam.nnunet.model import NnUNetModel
from segcam.nnunet.predict import NnUNetPrediction, export, predict_logits, run_folds
from segcam.nnunet.targets import predicted_sets, resolve_targets
from segcam.nnunet.windows import (
    Window,
    WindowPlan,
    flip,
    mirror_batch_size,
    network_dtype_device,
    plan_case,
    window_input,
)
from segcam.postprocess import Normalization, PostProcessing
from segcam.postprocess import upsample as upsample_maps
from segcam.recording import record_forward
from segcam.targets import TargetLike, as_pixel_set, score_gradient, uses_logits

__all__ = ["explain", "explain_and_predict", "explain_methods"]

LayerSums = list[dict[str, torch.Tensor]]
"""Per layer: method name -> summed maps (T, *padded) on the padded preprocessed grid."""


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
    post = PostProcessing(relu, upsample, normalize)
    read = read_case(model, case)
    plan = plan_case(model, read, step_size, mirroring)
    target_list = resolve_targets(model, targets)
    # Sets fixed beforehand: one pass predicts and explains. Else nnU-Net's prediction first.
    sets_fixed = not any(uses_logits(t) for t in target_list)
    prediction = None if sets_fixed else export(model, read, predict_logits(model, read, plan))
    target_list = predicted_sets(model, target_list, prediction)
    explanation = _CaseExplanation(model, read, plan, target_list, chosen, layer, per_fold)
    if prediction is not None:  # the prediction pass ran every forward once without gradients
        explanation.forwards = len(model.networks) * len(plan.windows) * len(plan.mirrors)
    blended = explanation.run(blend=sets_fixed, progress=progress)
    if prediction is None:
        assert blended is not None
        prediction = export(model, read, blended)
    facts = _facts(model, plan, read, explanation, mirroring, step_size, upsample)
    return explanation.assemble(prediction, post, facts), prediction


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


class _CaseExplanation:
    r"""The explanation pass of one case over folds, windows and mirrors (one graph at a time).

    Per window: the score's gradient output for each target met there (the targets' own rule,
    :func:`segcam.targets.score_gradient`, with the weights $\Omega$ of the module's
    docstring), one partial backward to the layers, and each map up-sampled to the window
    (:func:`segcam.postprocess.upsample`), flipped back and summed on the padded grid.
    """

    def __init__(
        self,
        model: NnUNetModel,
        case: NnUNetCase,
        plan: WindowPlan,
        targets: list[TargetLike],
        methods: list[tuple[Method, dict[str, Any]]],
        layer: LayerSpec | Sequence[LayerSpec],
        per_fold: bool,
    ) -> None:
        self.model, self.case, self.plan = model, case, plan
        self.targets, self.methods, self.layer, self.per_fold = targets, methods, layer, per_fold
        self.dtype, self.device = network_dtype_device(model.networks[0])
        heads = model.label_manager.num_segmentation_heads
        stand_in = torch.zeros((), device=self.device).expand(1, heads, *case.geometry.original)
        self.pixel_sets = [
            as_pixel_set(t.pixel_set(stand_in), stand_in, repr(t))[0] for t in targets
        ]
        # W = E^T M per target, zero-padded like the input (the exact weights of the export)
        weights = case.geometry.from_original(
            torch.stack(self.pixel_sets).to(device=self.device, dtype=torch.float64)
        )
        storage = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.weights = weights.new_zeros((len(targets), *plan.padded), dtype=storage)
        self.weights[(slice(None), *plan.unpad)] = weights
        self.sigmoid_pair = not model.label_manager.has_regions
        self.mirror_batch = mirror_batch_size(plan)
        self.forwards = 0
        self.backward_passes = 0
        self.windows_skipped = 0
        self.layer_names: tuple[str, ...] = ()
        self.layer_shapes: dict[str, tuple[int, ...]] = {}
        self.fold: LayerSums = []  # the current fold's sums
        self.sums: LayerSums = []  # all folds' sums
        self.fold_sums: list[LayerSums] = []  # each fold's, with per_fold

    def run(
        self, *, blend: bool, progress: Callable[[int, int], None] | None = None
    ) -> torch.Tensor | None:
        """Every fold and window; with ``blend``, also nnU-Net's blended logits (float16).

        Blending needs every window's logits at batch 1 (nnU-Net's forwards, bit for bit), so
        windows that meet no target run too; without it they are skipped.
        """
        plan = self.plan

        def step(
            network: nn.Module, padded: torch.Tensor, window: Window
        ) -> list[torch.Tensor] | None:
            active = [t for t in range(len(self.targets)) if bool(self.weights[(t, *window)].any())]
            if not active:
                self.windows_skipped += 1
                if not blend:
                    return None
            return self._window(network, padded, window, active, 1 if blend else self.mirror_batch)

        return run_folds(
            self.model,
            self.case,
            plan,
            step,
            blend=blend,
            end_fold=self._end_fold,
            progress=progress,
        )

    def _gradient_output(self, t: int, window: Window) -> torch.Tensor:
        r"""$\Omega$ on the window: W~ g / sum g over the forwards, exact in float64."""
        plan = self.plan
        share = self.weights[(t, *window)] * plan.gaussian.double() / plan.counts[window]
        return share / (len(self.model.networks) * len(plan.mirrors))

    def _window(
        self,
        network: nn.Module,
        padded: torch.Tensor,
        window: Window,
        active: list[int],
        batch: int,
    ) -> list[torch.Tensor]:
        """Forward one window under every mirroring; backward for the active targets.

        ``batch`` mirrorings share one forward (a batch of flipped inputs): faster, but its
        logits differ from nnU-Net's batch-1 forwards by float rounding, so the blending pass
        (whose logits are nnU-Net's) uses 1. Returns the logits per mirroring, in order.
        """
        plan = self.plan
        outputs: list[torch.Tensor] = []
        shares = {t: self._gradient_output(t, window) for t in active}
        for first in range(0, len(plan.mirrors), batch):
            group = plan.mirrors[first : first + batch]
            x = torch.cat([window_input(padded, plan, window, axes) for axes in group])
            self.forwards += len(group)
            if not active:
                with torch.no_grad():
                    logits = network(x)
                outputs.extend(logits[k : k + 1] for k in range(len(group)))
                continue
            with record_forward(network, x, self.layer) as recorded:
                outputs.extend(recorded.logits[k : k + 1] for k in range(len(group)))
                self._start_fold(recorded.layer_names, recorded.layer_shapes, recorded.logits)
                gradients = (
                    score_gradient(
                        recorded.logits,
                        self.targets[t].class_index,
                        torch.stack([flip(shares[t], axes, 0) for axes in group]),
                        sigmoid_pair=self.sigmoid_pair,
                    )
                    for t in active
                )
                self.backward_passes += len(active) * len(group)
                for t, maps in zip(
                    active, method_maps(recorded, gradients, self.methods), strict=True
                ):
                    self._accumulate(t, window, group, maps)
        return outputs

    def _start_fold(
        self, names: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]], like: torch.Tensor
    ) -> None:
        if not self.layer_names:
            self.layer_names = names
            self.layer_shapes = {k: (1, *tuple(v)[1:]) for k, v in shapes.items()}
        if not self.fold:
            size = (len(self.targets), *self.plan.padded)
            self.fold = [{m.name: like.new_zeros(size) for m, _ in self.methods} for _ in names]

    def _accumulate(
        self,
        t: int,
        window: Window,
        group: Sequence[tuple[int, ...]],
        maps: Mapping[str, tuple[torch.Tensor, ...]],
    ) -> None:
        """Each layer's map (B, *grid) up-sampled to the window, flipped back, summed."""
        for name, per_layer in maps.items():
            for index, layer_map in enumerate(per_layer):
                up = upsample_maps(layer_map[:, None], self.plan.patch)
                total = self.fold[index][name][(t, *window)]
                for k, axes in enumerate(group):
                    total += flip(up[k, 0], axes, 0)

    def _end_fold(self) -> None:
        fold, self.fold = self.fold, []
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

    def assemble(
        self, prediction: NnUNetPrediction, post: PostProcessing, info: dict[str, Any]
    ) -> dict[str, Explanation]:
        """The explanations on the original grid (or the preprocessed one: ``upsample=False``)."""
        plan, geometry = self.plan, self.case.geometry
        if not self.sums:  # no window met any target: every map is zero
            self._zero_maps()

        def place(sums: LayerSums, scale: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
            placed: dict[str, dict[str, torch.Tensor]] = {}
            for method, _ in self.methods:
                placed[method.name] = {}
                for name, layer_sums in zip(self.layer_names, sums, strict=True):
                    grid = layer_sums[method.name][(slice(None), *plan.unpad)]
                    grid = grid * scale if scale != 1.0 else grid
                    placed[method.name][name] = (
                        geometry.to_original(grid) if post.upsample else grid
                    )[None]
            return placed

        logits = prediction.original_logits()[None]
        pixel_sets = torch.stack(self.pixel_sets)[None].to(logits.device)
        options = {m.name: o for m, o in self.methods}

        def assemble_placed(
            raw: dict[str, dict[str, torch.Tensor]], **facts: Any
        ) -> dict[str, Explanation]:
            return assemble(
                raw,
                options,
                logits=logits,
                pixel_sets=pixel_sets,
                targets=self.targets,
                post=post,
                size=None,  # placed on their grid already
                layer_shapes=self.layer_shapes,
                inputs=self.case.data[None],
                **facts,
            )

        members: dict[str, dict[str, Explanation]] = {m.name: {} for m, _ in self.methods}
        per_fold = zip(self.model.folds, self.fold_sums, strict=True) if self.per_fold else ()
        for fold, fold_sums in per_fold:
            scale = float(len(self.model.folds))  # a fold's own maps: F times its share
            fold_info = {"nnunet": {"fold": str(fold)}}
            for method, member in assemble_placed(
                place(fold_sums, scale), info=fold_info, warn_empty=False
            ).items():
                members[method][f"fold_{fold}"] = member
        method_info = {
            method: {
                "nnunet": {
                    **info["nnunet"],
                    "fold_agreement": fold_agreement(
                        {name: member.layer_maps for name, member in folds.items()}, pixel_sets
                    ),
                }
            }
            for method, folds in members.items()
            if folds
        }
        return assemble_placed(
            place(self.sums), info=info, method_info=method_info, members=members
        )

    def _zero_maps(self) -> None:
        """Layer names and zero maps when no forward was recorded (every target empty)."""
        names = [name for name, _ in resolve_layers(self.model.networks[0], self.layer)]
        self.layer_names = tuple(names)
        like = torch.zeros((), dtype=self.dtype, device=self.device)
        size = (len(self.targets), *self.plan.padded)
        self.sums = [{m.name: like.new_zeros(size) for m, _ in self.methods} for _ in names]
        if self.per_fold:
            self.fold_sums = [
                [{k: v.clone() for k, v in d.items()} for d in self.sums] for _ in self.model.folds
            ]


def _facts(
    model: NnUNetModel,
    plan: WindowPlan,
    case: NnUNetCase,
    explanation: _CaseExplanation,
    mirroring: bool,
    step_size: float,
    upsample: bool,
) -> dict[str, Any]:
    """``info["nnunet"]``: the model, the windows and passes, and the way back to the image."""
    from importlib.metadata import version

    geometry = case.geometry
    return {
        "nnunet": {
            "model": str(model.folder),
            "configuration": model.configuration,
            "folds": [str(f) for f in model.folds],
            "mirror_axes": list(model.mirroring_axes or ()) if mirroring else [],
            "step_size": float(step_size),
            "windows": len(plan.windows),
            "forwards": explanation.forwards,
            "backward_passes": explanation.backward_passes,
            "windows_skipped": explanation.windows_skipped,
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
