"""The explanation pass of one nnU-Net case: every fold, window and mirroring, exactly.

:class:`CaseExplanation` runs nnU-Net's fold/window loop (:func:`segcam.nnunet.predict.run_folds`)
with recorded forwards; per window it takes the score's gradient output of each target met
there (the targets' own rule, with the weights of :mod:`segcam.nnunet.explain`'s formula), one
partial backward to the layers, and sums each map, up-sampled to its window and flipped back, on
the padded preprocessed grid. :meth:`CaseExplanation.assemble` brings the sums to the original
grid as nnU-Net brings its logits and hands them to :func:`segcam.explanation.assemble`.

:class:`~segcam.kept.KeptWindows` keeps recorded forwards (activations and the graph from the
layers to the logits) per (fold, window, mirroring group) within a byte budget, so that a later
pass for new targets on the same layers runs only the partial backward passes
(:class:`~segcam.nnunet.explain.CaseExplainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcam.checks import run_model
from segcam.core import MapRecord, method_maps
from segcam.explanation import Explanation, assemble
from segcam.kept import KEEP_BYTES, KeepBudget, KeptWindows
from segcam.layers import LayerSpec, resolve_layers
from segcam.memory_format import MemoryFormat
from segcam.methods import Method
from segcam.metrics import fold_agreement
from segcam.nnunet.case import NnUNetCase
from segcam.nnunet.model import NnUNetModel
from segcam.nnunet.predict import NnUNetPrediction, run_folds
from segcam.nnunet.windows import (
    Window,
    WindowPlan,
    flip,
    mirror_batch_size,
    network_dtype_device,
    window_input,
)
from segcam.postprocess import PostProcessing
from segcam.postprocess import upsample as upsample_maps
from segcam.recording import RecordedForward, record_forward
from segcam.targets import ResolvedTargets, TargetLike

__all__ = [
    "KEEP_BYTES",
    "CaseExplanation",
    "KeepBudget",
    "KeptWindows",
    "LayerSums",
    "case_facts",
]

WindowKey = tuple[int, tuple[Any, ...], int, int]  # fold, window bounds, first mirroring, batch

LayerSums = list[dict[str, torch.Tensor]]
"""Per layer: method name -> summed maps (T, *padded) on the padded preprocessed grid."""


def _bounds(window: Window) -> tuple[Any, ...]:
    """A window as hashable bounds (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop) if isinstance(s, slice) else s for s in window)


class CaseExplanation:
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
        kept: KeptWindows | None = None,
        layout: MemoryFormat = "auto",
    ) -> None:
        self.model, self.case, self.plan, self.kept = model, case, plan, kept
        self.layout = layout
        self.targets, self.methods, self.layer, self.per_fold = targets, methods, layer, per_fold
        self.dtype, self.device = network_dtype_device(model.networks[0])
        heads = model.label_manager.num_segmentation_heads
        stand_in = torch.zeros((), device=self.device).expand(1, heads, *case.geometry.original)
        self.resolved = ResolvedTargets.resolve(targets, stand_in)  # sets on the original grid
        self.pixel_sets = [pixel_set[0] for pixel_set in self.resolved.pixel_sets]
        # W = E^T w per target (w = M, or a Weighted target's own), zero-padded like the input
        # (the exact weights of the export)
        weights = case.geometry.from_original(
            torch.stack([w[0] for w in self.resolved.weights]).to(
                device=self.device, dtype=torch.float64
            )
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
            layout=self.layout,
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

            def inputs(group: Sequence[tuple[int, ...]] = group) -> torch.Tensor:
                return torch.cat([window_input(padded, plan, window, axes) for axes in group])

            if not active:
                self.forwards += len(group)
                with torch.no_grad():
                    logits = run_model(network, inputs())
                outputs.extend(logits[k : k + 1] for k in range(len(group)))
                continue
            recorded, keep = self._recorded(network, inputs, (window, first), len(group))
            try:
                outputs.extend(recorded.logits[k : k + 1] for k in range(len(group)))
                self._start_fold(recorded.layer_names, recorded.layer_shapes, recorded.logits)
                scores = [
                    (
                        t,
                        self.resolved.score_gradient(
                            t,
                            recorded.logits,
                            torch.stack([flip(shares[t], axes, 0) for axes in group]),
                            sigmoid_pair=self.sigmoid_pair,
                        ),
                    )
                    for t in active
                ]
                self.backward_passes += len(active) * len(group)
                for record in method_maps(recorded, scores, self.methods, keep_graph=keep):
                    self._accumulate(record, window, group)
            finally:
                if not keep:
                    recorded.release()
        return outputs

    def _recorded(
        self,
        network: nn.Module,
        inputs: Callable[[], torch.Tensor],
        where: tuple[Window, int],
        size: int,
    ) -> tuple[RecordedForward, bool]:
        """The recorded forward of a window's mirroring group: kept, or run now."""
        if self.kept is None:
            self.forwards += size
            return record_forward(network, inputs(), self.layer), False
        fold = self.model.networks.index(network)
        key = (fold, _bounds(where[0]), where[1], size)
        if key in self.kept.forwards:
            return self.kept.forwards[key], True
        self.forwards += size
        return self.kept.record(key, network, inputs(), self.layer)

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
        self, record: MapRecord, window: Window, group: Sequence[tuple[int, ...]]
    ) -> None:
        """A layer's window map (B, *grid) up-sampled to the window, flipped back, summed."""
        up = upsample_maps(record.map[:, None], self.plan.patch)
        total = self.fold[record.layer][record.method][(record.target, *window)]
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
        if not self.sums:  # no window met any target: every map is zero
            self._zero_maps()

        def place(sums: LayerSums, scale: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
            return self._placed(sums, post.upsample, scale)

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

    def _placed(
        self, sums: LayerSums, upsample: bool, scale: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Method -> layer -> maps (1, T, *grid): unpadded, scaled, on the original grid."""
        placed: dict[str, dict[str, torch.Tensor]] = {}
        for method, _ in self.methods:
            placed[method.name] = {}
            for name, layer_sums in zip(self.layer_names, sums, strict=True):
                grid = layer_sums[method.name][(slice(None), *self.plan.unpad)]
                grid = grid * scale if scale != 1.0 else grid
                placed[method.name][name] = (
                    self.case.geometry.to_original(grid) if upsample else grid
                )[None]
        return placed

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


def case_facts(
    model: NnUNetModel,
    plan: WindowPlan,
    case: NnUNetCase,
    explanation: CaseExplanation,
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
