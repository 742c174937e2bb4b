r"""Explanations of sliding-window predictions: the whole stitched volume, window by window.

Sliding-window inference (MONAI's ``sliding_window_inference``) runs the model on overlapping
windows $w$ of size ``roi_size`` and blends their logits with an importance map
$g$ (constant or Gaussian):

$$
Y(p) = \frac{\sum_w g_w(p)\, y_w(p)}{\sum_w g_w(p)} .
$$

The target score is the masked sum of the *blended* logits, $y^c_M = \sum_{p \in M}
Y^c(p)$. Blending is linear, so its gradient with respect to window w's logits is
$g_w(p) / \sum_{w'} g_{w'}(p)$ on M in channel c and 0 elsewhere: each window takes its own
backward pass from its logits (with that weight as the gradient output) to the layer, exactly
the gradient of the whole-volume score, and a window whose output does not meet M is skipped.
Each window's map is computed from its own activation and gradient with the registered method
(an averaging method, such as Seg-Grad CAM's mean of the gradient, averages over that window's
layer positions: a channel of one window is another activation than the same channel of
another window) and the window maps are added on the whole-volume grid. The blending weights
are already inside each window's gradient, so the sum *is* the blending; for a layer feeding a
1x1 head Seg-HiRes-Grad CAM gives $(Y^c - b_c) 1[M]$ over the whole volume, as without
windows.

Placement: at the layer's resolution when every window starts on a multiple of the layer's
stride (roi / window grid) and the volume is a multiple of it; otherwise each window map is
up-sampled to its window's input extent (bilinear/trilinear, as the post-processing does) and
added on the input grid. Memory holds one batch of windows' graph at a time plus the output
arrays (blended logits, count map, one map per target, layer and method).

The computation is a plan (:func:`plan_windows`: windows, blending weights, groups), a run over
the groups of windows (each recorded through :func:`segcam.recording.record_forward` and its
gradients taken by :func:`segcam.core.method_maps`, the same path as :func:`segcam.explain`), and
a finish that divides the blended logits and post-processes the accumulated maps. Several gradient
methods share each window's backward pass (:func:`explain_sliding_window_methods`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from segcam.checks import run_model
from segcam.core import (
    Progress,
    method_maps,
)
from segcam.errors import OptionError
from segcam.explanation import Explanation, assemble
from segcam.kept import KEEP_BYTES, KeepBudget, KeptWindows
from segcam.layers import LayerSpec
from segcam.memory_format import MemoryFormat, check_memory_format, convolution_layout
from segcam.methods import Method, MethodOptions, resolve_methods
from segcam.outputs import OutputSpec, select_logits
from segcam.postprocess import Normalization, PostProcessing
from segcam.postprocess import upsample as upsample_maps
from segcam.recording import RecordedForward, record_forward
from segcam.targets import (
    ResolvedTargets,
    TargetLike,
    as_target_list,
    uses_logits,
)
from segcam.windows import (
    SlidingWindowOptions,
    SlidingWindowPlan,
    Window,
    blended_logits,
    check_blended,
    plan_windows,
    window_slices,
)

__all__ = [
    "SlidingWindowPlan",
    "blended_logits",
    "explain_sliding_window",
    "explain_sliding_window_methods",
    "plan_windows",
    "window_slices",
]


@dataclass
class _LayerAccumulator:
    """One layer's whole-volume maps (one per method) and where window maps go."""

    placement: Literal["layer", "input"]
    factors: tuple[int, ...]  # window grid -> layer grid (placement "layer"); empty otherwise
    maps: dict[str, torch.Tensor]  # method -> (N, T, *grid)

    def add(
        self,
        method: str,
        window_maps: torch.Tensor,
        group: Sequence[Window],
        t: int,
        batch: int,
        roi: tuple[int, ...],
    ) -> None:
        """Add each window's (N, *grid) maps of target t at its place on the whole grid."""
        maps = self.maps[method]
        for k, window in enumerate(group):
            part = window_maps[k * batch : (k + 1) * batch]
            where: tuple[slice, ...]
            if self.placement == "layer":
                where = tuple(
                    slice(w.start // f, w.stop // f)
                    for w, f in zip(window, self.factors, strict=True)
                )
            else:
                part = upsample_maps(part[:, None], roi)[:, 0]
                where = window
            index: tuple[slice | int, ...] = (slice(None), t, *where)
            maps[index] += part


def _accumulator(
    grid: tuple[int, ...],
    plan: SlidingWindowPlan,
    shape: tuple[int, int],
    methods: Sequence[Method],
    like: torch.Tensor,
) -> _LayerAccumulator:
    """The layer grid when every window starts on a multiple of the layer's stride, else input."""
    factors = tuple(r // g if g and r % g == 0 else 0 for r, g in zip(plan.roi, grid, strict=True))
    aligned = all(f > 0 for f in factors) and all(
        s % f == 0 for s, f in zip(plan.spatial, factors, strict=True)
    )
    aligned = aligned and all(
        w.start % f == 0 for window in plan.windows for w, f in zip(window, factors, strict=True)
    )
    size = (
        tuple(s // f for s, f in zip(plan.spatial, factors, strict=True))
        if aligned
        else plan.spatial
    )
    return _LayerAccumulator(
        placement="layer" if aligned else "input",
        factors=factors if aligned else (),
        maps={method.name: like.new_zeros((*shape, *size)) for method in methods},
    )


@dataclass
class _SlidingRun:
    """The state of one explanation run over the windows of a plan."""

    plan: SlidingWindowPlan
    targets: list[TargetLike]
    methods: list[tuple[Method, dict[str, Any]]]
    sets_fixed: bool  # no target reads the logits' values: no first prediction pass
    blended: torch.Tensor | None = None
    resolved: ResolvedTargets | None = None  # the targets' sets on the whole input
    layers: list[_LayerAccumulator] = field(default_factory=list)
    layer_names: tuple[str, ...] = ()
    windows_run: int = 0
    windows_backward: int = 0

    def touched(self, group: Sequence[Window]) -> bool:
        """Whether some window of the group meets some target's pixel set (or M is unknown)."""
        if self.resolved is None:
            return True
        sets = self.resolved.pixel_sets
        return any(bool(p[(slice(None), *w)].any()) for p in sets for w in group)


def _predict_keeping(
    model: nn.Module,
    inputs: torch.Tensor,
    plan: SlidingWindowPlan,
    layer: LayerSpec | Sequence[LayerSpec],
    output: OutputSpec,
    store: KeptWindows,
) -> torch.Tensor:
    """The blended logits, each group's forward recorded and kept while ``store``'s budget lasts.

    The same forwards, blend and division as :func:`~segcam.windows.predict_blended` (the same
    numbers); a kept group's later backward passes need no forward of their own. Once a group's
    forward would not fit, the remaining groups run without gradients.
    """
    blended: torch.Tensor | None = None
    for index, group in enumerate(plan.groups):
        crops = plan.crops(inputs, group)
        if store.budget.used + store.last_size <= store.budget.limit:
            recorded, kept = store.record(index, model, crops, layer, output)
            logits = recorded.logits
            if not kept:
                recorded.release()
        else:
            with torch.inference_mode(False), torch.no_grad():
                logits = select_logits(run_model(model, crops), output, inputs.ndim)
        blended = plan.blend(blended, logits, group)
    assert blended is not None  # a plan has at least one window
    return check_blended(blended.div_(plan.count))


def _run_group(
    run: _SlidingRun,
    model: nn.Module,
    inputs: torch.Tensor,
    group: list[Window],
    layer: LayerSpec | Sequence[LayerSpec],
    output: OutputSpec,
    kept: RecordedForward | None = None,
) -> None:
    """Forward one group of windows (or take its kept forward); the backward passes it meets."""
    plan, batch = run.plan, inputs.shape[0]
    run.windows_run += len(group)
    if not run.touched(group):
        if kept is not None:
            kept.release()
        if run.sets_fixed:  # the blended logits still need this window's prediction
            with torch.inference_mode(False), torch.no_grad():
                crops = plan.crops(inputs, group)
                logits = select_logits(run_model(model, crops), output, inputs.ndim)
            run.blended = plan.blend(run.blended, logits, group)
        return
    forward = (
        kept
        if kept is not None
        else record_forward(model, plan.crops(inputs, group), layer, output)
    )
    with forward as recorded:
        window_logits = recorded.logits
        if run.sets_fixed:
            run.blended = plan.blend(run.blended, window_logits, group)
        if run.resolved is None:
            # fixed sets read only the shape and device: a zero-stride stand-in will do
            reference = (
                window_logits.new_zeros(()).expand(batch, window_logits.shape[1], *plan.spatial)
                if run.sets_fixed
                else run.blended
            )
            assert reference is not None  # a run whose sets read the logits predicted first
            run.resolved = ResolvedTargets.resolve(run.targets, reference)
        if not run.layers:
            run.layer_names = recorded.layer_names
            run.layers = [
                _accumulator(
                    tuple(recorded.layer_shapes[name][2:]),
                    plan,
                    (batch, len(run.targets)),
                    [m for m, _ in run.methods],
                    inputs,
                )
                for name in recorded.layer_names
            ]
        _backward_passes(run, recorded, group, batch)


def _backward_passes(
    run: _SlidingRun, recorded: RecordedForward, group: list[Window], batch: int
) -> None:
    """One backward pass per target the group's windows meet; window maps accumulated."""
    plan, resolved = run.plan, run.resolved
    assert resolved is not None
    scale = plan.gradient_scale(group, batch)
    scores = []
    for t in range(len(run.targets)):
        window_sets = torch.cat([resolved.weights[t][(slice(None), *w)] for w in group])
        if bool(window_sets.any()):  # the score's weights (M, or a Weighted target's own)
            weights = window_sets.to(scale.dtype) * scale
            scores.append((t, resolved.score_gradient(t, recorded.logits, weights)))
    if scores:
        run.windows_backward += len(group)
    for record in method_maps(recorded, scores, run.methods):
        run.layers[record.layer].add(
            record.method, record.map, group, record.target, batch, plan.roi
        )


def _finish(run: _SlidingRun, inputs: torch.Tensor, post: PostProcessing) -> dict[str, Explanation]:
    """Divide the blended logits, then the one assembly (finite check, empty sets, post)."""
    plan = run.plan
    assert run.blended is not None and run.resolved is not None and run.layers
    blended = run.blended.div_(plan.count) if run.sets_fixed else run.blended  # in place
    info = {
        "sliding_window": {
            "roi_size": list(plan.roi),
            "overlap": plan.overlap[0] if len(set(plan.overlap)) == 1 else list(plan.overlap),
            "mode": plan.mode,
            "windows": len(plan.windows),
            "windows_run": run.windows_run,
            "windows_backward": run.windows_backward,
            "windows_skipped": len(plan.windows) - run.windows_backward,
            "placement": {
                name: layer.placement
                for name, layer in zip(run.layer_names, run.layers, strict=True)
            },
        }
    }
    layer_shapes = {
        name: (blended.shape[0], -1, *layer.maps[run.methods[0][0].name].shape[2:])
        for name, layer in zip(run.layer_names, run.layers, strict=True)
    }
    explanations = assemble(
        {
            method.name: {
                name: layer.maps[method.name]
                for name, layer in zip(run.layer_names, run.layers, strict=True)
            }
            for method, _ in run.methods
        },
        {method.name: options for method, options in run.methods},
        logits=blended,
        pixel_sets=run.resolved.stacked,
        targets=run.targets,
        post=post,
        size=plan.spatial,
        layer_shapes=layer_shapes,
        inputs=inputs,
        info=info,
    )
    check_blended(blended)  # after the maps' check: an overflowing map is named first
    return explanations


def explain_sliding_window_methods(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    roi_size: int | Sequence[int],
    methods: Sequence[str],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 1,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    output: OutputSpec = None,
    method_options: MethodOptions | None = None,
    progress: Progress | None = None,
    keep_bytes: int = KEEP_BYTES,
    memory_format: MemoryFormat = "auto",
) -> dict[str, Explanation]:
    """:func:`explain_sliding_window` for several gradient methods: method name -> explanation.

    Every window's forward pass and its backward passes are shared by all the methods.
    Everything is checked (methods, options, windows) before the first forward pass.
    ``progress`` is called with (groups of windows done, groups) after each group. Targets that
    read the logits need the whole prediction first: its forwards are recorded and kept within
    ``keep_bytes`` (:class:`segcam.kept.KeptWindows`), so the windows kept take their backward
    passes without a second forward; ``keep_bytes=0``: a prediction pass without gradients, then
    a recorded forward per window met, one group's graph at a time (the benchmarks page has the
    trade). ``memory_format``: the convolutions' layout in every window's forward, the
    prediction's included (:mod:`segcam.memory_format`).
    """
    layout = check_memory_format(memory_format)
    chosen = resolve_methods(methods, method_options)
    for method, _ in chosen:
        method.require_sliding_window()
    post = PostProcessing(relu, upsample, normalize)
    plan = SlidingWindowOptions(roi_size, overlap, mode, sigma_scale, sw_batch_size).plan(inputs)
    target_list = as_target_list(targets)
    run = _SlidingRun(
        plan, target_list, chosen, sets_fixed=not any(uses_logits(t) for t in target_list)
    )
    store = KeptWindows(KeepBudget(int(keep_bytes)))
    with convolution_layout(model, inputs, layout):
        try:  # kept forwards are freed however the run ends
            if not run.sets_fixed:  # the prediction first, its forwards recorded and kept
                run.blended = _predict_keeping(model, inputs, plan, layer, output, store)
            for done, group in enumerate(plan.groups, 1):
                kept = store.forwards.pop(done - 1, None)
                _run_group(run, model, inputs, group, layer, output, kept)
                if progress is not None:
                    progress(done, len(plan.groups))
        finally:
            store.close()
    return _finish(run, inputs, post)


def explain_sliding_window(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    roi_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 1,
    method: str = "seg-hires-grad-cam",
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    output: OutputSpec = None,
    method_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    memory_format: MemoryFormat = "auto",
) -> Explanation:
    r"""Explain the blended whole-volume prediction of sliding-window inference, exactly.

    The score of a target is $y^c_M = \sum_{p \in M} Y^c(p)$ on the blended logits Y of
    MONAI's ``sliding_window_inference`` with the same ``roi_size``, ``overlap``, ``mode`` and
    ``sigma_scale`` (see :mod:`segcam.sliding` for the gradient and how window maps combine).
    Windows whose output does not meet any target's pixel set take no backward pass. Targets
    whose pixel set reads the prediction (``uses_logits``: ``Predicted``, ``Probability``,
    ``Region`` without a mask) need the blended logits first: one extra pass without gradients;
    ``Mask``, ``Box``, ``Pixel`` and ``AllPixels`` do not. Gradient methods only: a
    gradient-free method's channel weights have no defined meaning across windows. Several
    methods at once: :func:`explain_sliding_window_methods`.

    Args:
        model: the segmentation network, as for :func:`segcam.explain`.
        inputs: (N, C, *S), S at least ``roi_size`` on every axis.
        targets: one target or a sequence, over the whole input's grid.
        layer: a layer or a list of them, as for :func:`segcam.explain`.
        roi_size: the window size (one int for every axis, or one per axis).
        overlap: the windows' overlap fraction in [0, 1), per axis or for all.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: the Gaussian's sigma as a fraction of the window size (or one per axis).
        sw_batch_size: windows per forward pass.
        method: a registered gradient method.
        relu: keep only positive evidence.
        upsample: resize the whole-volume maps to the input's grid.
        normalize: ``None``, ``"max"`` or ``"minmax"``, per map.
        output: how to find the logits in the model's output.
        method_options: the method's options.
        progress: called with (groups of windows done, groups) after each group.
        memory_format: the convolutions' memory layout (:mod:`segcam.memory_format`).

    Returns:
        An :class:`Explanation` of the whole input; ``logits`` are the blended logits and
        ``info["sliding_window"]`` holds the windows run, skipped and the placement.

    Raises:
        MethodNotSupportedError: a gradient-free method.
        OptionError: bad ``overlap``, ``mode``, ``sigma_scale``, ``sw_batch_size`` or options.
    """
    if not isinstance(method, str):
        raise OptionError(
            f"method must be one method name (str); got {method!r} (several: "
            f"explain_sliding_window_methods)"
        )
    return explain_sliding_window_methods(
        model,
        inputs,
        targets,
        layer,
        roi_size,
        [method],
        overlap=overlap,
        mode=mode,
        sigma_scale=sigma_scale,
        sw_batch_size=sw_batch_size,
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        output=output,
        method_options={method: method_options} if method_options is not None else None,
        progress=progress,
        memory_format=memory_format,
    )[method]
