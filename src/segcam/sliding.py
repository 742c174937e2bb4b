r"""Explanations of sliding-window predictions: the whole stitched volume, window by window.

Sliding-window inference (MONAI's ``sliding_window_inference``) runs the model on overlapping
windows :math:`w` of size ``roi_size`` and blends their logits with an importance map
:math:`g` (constant or Gaussian):

.. math::
    Y(p) = \frac{\sum_w g_w(p)\, y_w(p)}{\sum_w g_w(p)} .

The target score is the masked sum of the *blended* logits, :math:`y^c_M = \sum_{p \in M}
Y^c(p)`. Blending is linear, so its gradient with respect to window w's logits is
:math:`g_w(p) / \sum_{w'} g_{w'}(p)` on M in channel c and 0 elsewhere: each window takes its own
backward pass from its logits (with that weight as the gradient output) to the layer, exactly
the gradient of the whole-volume score, and a window whose output does not meet M is skipped.
Each window's map is computed from its own activation and gradient with the registered method
(an averaging method, such as Seg-Grad CAM's mean of the gradient, averages over that window's
layer positions: a channel of one window is another activation than the same channel of
another window) and the window maps are added on the whole-volume grid. The blending weights
are already inside each window's gradient, so the sum *is* the blending; for a layer feeding a
1x1 head Seg-HiRes-Grad CAM gives :math:`(Y^c - b_c) 1[M]` over the whole volume, as without
windows.

Placement: at the layer's resolution when every window starts on a multiple of the layer's
stride (roi / window grid) and the volume is a multiple of it; otherwise each window map is
up-sampled to its window's input extent (bilinear/trilinear, as the post-processing does) and
added on the input grid. Memory holds one batch of windows' graph at a time plus the output
arrays (blended logits, count map, one map per target and layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcam.core import (
    OutputSpec,
    _as_target_list,
    _check_inputs,
    _check_normalize,
    _grad_output,
    _warn_empty,
    record_forward,
    select_logits,
    target_pixel_sets,
)
from segcam.errors import InputError
from segcam.explanation import Explanation
from segcam.methods import get_method, resolve_options
from segcam.postprocess import Normalization, postprocess
from segcam.postprocess import upsample as upsample_maps
from segcam.recording import LayerSpec
from segcam.targets import (
    AllPixels,
    Box,
    Mask,
    Pixel,
    Region,
    TargetLike,
)
from segcam.tokens import to_channels_first

__all__ = ["blended_logits", "explain_sliding_window", "window_slices"]


def _scan_interval(size: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[int]:
    """MONAI's scan interval: roi * (1 - overlap) rounded down, at least 1; roi where it fills."""
    result = []
    for s, r, o in zip(size, roi, overlap, strict=True):
        result.append(r if r == s else max(int(r * (1 - o)), 1))
    return result


def window_slices(
    size: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float] = 0.25
) -> list[tuple[slice, ...]]:
    """The windows of a sliding-window pass, in MONAI's order (last axis fastest).

    Starts are multiples of the scan interval; the last start of an axis is moved back so that
    the window ends at the volume's end (as ``monai.data.utils.dense_patch_slices``).
    """
    overlaps = [overlap] * len(size) if isinstance(overlap, int | float) else list(overlap)
    interval = _scan_interval(size, roi, overlaps)
    starts = []
    for s, r, i in zip(size, roi, interval, strict=True):
        count = math.ceil((s - r) / i) + 1 if s > r else 1
        starts.append(sorted({min(k * i, s - r) for k in range(count)}))
    windows = [()]  # type: list[tuple[int, ...]]
    for axis_starts in starts:
        windows = [(*w, a) for w in windows for a in axis_starts]
    return [tuple(slice(a, a + r) for a, r in zip(w, roi, strict=True)) for w in windows]


def importance_map(
    roi: Sequence[int], mode: str, sigma_scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The blending weight of a window, as MONAI's ``compute_importance_map``.

    Ones, or the separable Gaussian with sigma = ``sigma_scale`` * roi per axis, its values
    raised to at least max(min, 1e-3) (MONAI's floor, which keeps window corners from vanishing).
    """
    if mode == "constant":
        return torch.ones(tuple(roi), dtype=dtype, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'constant' or 'gaussian'; got {mode!r}")
    weight = torch.ones((), dtype=torch.float32, device=device)
    for axis, r in enumerate(roi):
        x = torch.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        profile = torch.exp(x**2 / (-2 * (sigma_scale * r) ** 2))
        weight = weight.unsqueeze(-1) * profile[(None,) * axis] if axis else profile
    floor = max(float(weight.min()), 1e-3)
    return weight.clamp_min(floor).to(dtype)


def blended_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    roi_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    output: OutputSpec = None,
) -> torch.Tensor:
    """Sliding-window inference without gradients: the blended logits (N, K, *S).

    The same windows and weights as :func:`explain_sliding_window` (and MONAI's
    ``sliding_window_inference``).
    """
    _check_inputs(inputs)
    spatial = tuple(int(s) for s in inputs.shape[2:])
    roi = _roi(roi_size, spatial)
    windows = window_slices(spatial, roi, overlap)
    weight = importance_map(roi, mode, sigma_scale, inputs.dtype, inputs.device)
    count = torch.zeros(spatial, dtype=inputs.dtype, device=inputs.device)
    blended: torch.Tensor | None = None
    with torch.inference_mode(False), torch.no_grad():
        for start in range(0, len(windows), sw_batch_size):
            group = windows[start : start + sw_batch_size]
            batch = torch.cat([inputs[(slice(None), slice(None), *w)] for w in group])
            logits = select_logits(model(batch), output, inputs.ndim)
            blended = _blend(blended, logits, group, weight, inputs.shape[0], spatial)
            for window in group:
                count[window] += weight
    assert blended is not None
    return blended.div_(count)


def _static(target: TargetLike) -> bool:
    """Whether the pixel set is known without the prediction (no first inference pass)."""
    declared = getattr(target, "uses_logits", None)
    if declared is not None:
        return not bool(declared)
    if isinstance(target, Region):
        return target.mask is not None
    return isinstance(target, Mask | Box | Pixel | AllPixels)


def _roi(roi_size: int | Sequence[int], spatial: tuple[int, ...]) -> tuple[int, ...]:
    roi = (roi_size,) * len(spatial) if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != len(spatial) or any(not isinstance(r, int) or r < 1 for r in roi):
        raise InputError(
            f"roi_size must be a positive int or {len(spatial)} positive ints; got {roi_size!r}"
        )
    if any(r > s for r, s in zip(roi, spatial, strict=True)):
        raise InputError(
            f"roi_size {roi} is larger than the input {spatial}: explain the whole input with "
            f"segcam.explain, or pad it to the window size"
        )
    return roi


def explain_sliding_window(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    roi_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    method: str = "seg-hires-grad-cam",
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    output: OutputSpec = None,
    method_options: Mapping[str, Any] | None = None,
) -> Explanation:
    r"""Explain the blended whole-volume prediction of sliding-window inference, exactly.

    The score of a target is :math:`y^c_M = \sum_{p \in M} Y^c(p)` on the blended logits Y of
    MONAI's ``sliding_window_inference`` with the same ``roi_size``, ``overlap``, ``mode`` and
    ``sigma_scale`` (see :mod:`segcam.sliding` for the gradient and how window maps combine).
    Windows whose output does not meet any target's pixel set take no backward pass. Targets
    that depend on the prediction (``Predicted``, ``Probability``, ``Region`` without a mask)
    need the blended logits first: one extra pass without gradients; ``Mask``, ``Box``,
    ``Pixel`` and ``AllPixels`` do not. Gradient methods only: a gradient-free method's
    channel weights have no defined meaning across windows.

    Args:
        model: the segmentation network, as for :func:`segcam.explain`.
        inputs: (N, C, *S), S at least ``roi_size`` on every axis.
        targets: one target or a sequence, over the whole input's grid.
        layer: a layer or a list of them, as for :func:`segcam.explain`.
        roi_size: the window size (one int for every axis, or one per axis).
        overlap: the windows' overlap fraction, per axis or for all.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: the Gaussian's sigma as a fraction of the window size.
        sw_batch_size: windows per forward pass.
        method: a registered gradient method.
        relu: keep only positive evidence.
        upsample: resize the whole-volume maps to the input's grid.
        normalize: ``None``, ``"max"`` or ``"minmax"``, per map.
        output: how to find the logits in the model's output.
        method_options: the method's options.

    Returns:
        An :class:`Explanation` of the whole input; ``logits`` are the blended logits and
        ``info["sliding_window"]`` holds the windows run, skipped and the placement.
    """
    chosen = get_method(method)
    if not chosen.needs_gradient:
        raise ValueError(
            f"{method!r} is gradient-free: its maps are not defined across windows; use a "
            f"gradient method with sliding windows"
        )
    options = resolve_options(chosen, method_options)
    _check_normalize(normalize)
    _check_inputs(inputs)
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int; got {sw_batch_size!r}")
    target_list = _as_target_list(targets)
    spatial = tuple(int(s) for s in inputs.shape[2:])
    roi = _roi(roi_size, spatial)
    windows = window_slices(spatial, roi, overlap)
    weight = importance_map(roi, mode, sigma_scale, inputs.dtype, inputs.device)
    count = torch.zeros(spatial, dtype=inputs.dtype, device=inputs.device)
    for window in windows:
        count[window] += weight
    batch = inputs.shape[0]

    def crops(group: list[tuple[slice, ...]]) -> torch.Tensor:
        return torch.cat([inputs[(slice(None), slice(None), *w)] for w in group])

    groups = [windows[i : i + sw_batch_size] for i in range(0, len(windows), sw_batch_size)]
    blended: torch.Tensor | None = None
    static = all(_static(t) for t in target_list)
    if not static:  # the prediction first: one pass without gradients
        blended = blended_logits(
            model,
            inputs,
            roi,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            sw_batch_size=sw_batch_size,
            output=output,
        )

    state: dict[str, Any] = {"pixel_sets": None, "maps": None, "grids": None}

    def pixel_sets_for(reference: torch.Tensor) -> list[torch.Tensor]:
        if state["pixel_sets"] is None:
            state["pixel_sets"] = target_pixel_sets(target_list, reference)
        result: list[torch.Tensor] = state["pixel_sets"]
        return result

    ran = backward = 0
    names: list[str] = []
    for group in groups:
        if state["pixel_sets"] is not None:
            touched = [
                any(bool(p[(slice(None), *w)].any()) for p in state["pixel_sets"]) for w in group
            ]
            if not any(touched):
                if static:  # the blended logits still need this window's prediction
                    with torch.inference_mode(False), torch.no_grad():
                        logits = select_logits(model(crops(group)), output, inputs.ndim)
                    blended = _blend(blended, logits, group, weight, batch, spatial)
                ran += len(group)
                continue
        recorded = record_forward(model, crops(group), layer, output)
        ran += len(group)
        try:
            window_logits = recorded.detached_logits
            if static:
                blended = _blend(blended, window_logits, group, weight, batch, spatial)
                if state["pixel_sets"] is None:
                    shape = (batch, window_logits.shape[1], *spatial)
                    # a zero-stride stand-in: these targets read only its shape and device
                    pixel_sets_for(window_logits.new_zeros(()).expand(shape))
            else:
                assert blended is not None
                pixel_sets_for(blended)
            if state["maps"] is None:
                names = recorded.layer_names
                state["grids"] = [
                    tuple(recorded.layer_shapes[name][2:]) for name in recorded.layer_names
                ]
                state["maps"] = _accumulators(
                    state["grids"], roi, spatial, windows, batch, len(target_list), inputs
                )
            sets = state["pixel_sets"]
            # d y^c_M / d y_w = g_w / count on M, in channel c: per window of the group
            scale = torch.cat(
                [(weight / count[w]).expand(batch, *roi) for w in group]
            )  # (B*N, *roi)
            active = []
            for t, target in enumerate(target_list):
                window_sets = torch.cat([sets[t][(slice(None), *w)] for w in group])
                if bool(window_sets.any()):
                    active.append((t, target, window_sets.to(scale.dtype) * scale))
            if active:
                backward += len(group)
            grid_activations = recorded._grid_activations()
            for position, (t, target, gradient_weight) in enumerate(active):
                assert recorded.logits is not None
                gradients = torch.autograd.grad(
                    recorded.logits,
                    recorded.activations,
                    grad_outputs=_grad_output(window_logits, target.class_index, gradient_weight),
                    retain_graph=position < len(active) - 1,
                )
                for index, (activation, gradient, layout) in enumerate(
                    zip(grid_activations, gradients, recorded.layouts, strict=True)
                ):
                    window_maps = chosen.compute(
                        activation, to_channels_first(gradient, layout), **options
                    )
                    _place(state["maps"][index], window_maps, group, t, batch, roi)
        finally:
            recorded.release()

    assert blended is not None and state["pixel_sets"] is not None and state["maps"] is not None
    if static:
        blended = blended.div_(count)  # in place: no second output-sized array
    stacked_sets = torch.stack(state["pixel_sets"], dim=1)
    nonempty = stacked_sets.flatten(2).any(dim=2)
    _warn_empty(nonempty, target_list)
    layer_maps = {}
    layer_shapes = {}
    placements = []
    for name, accumulator in zip(names, state["maps"], strict=True):
        maps = accumulator["maps"]
        placements.append(accumulator["placement"])
        layer_shapes[name] = (batch, -1, *maps.shape[2:])
        layer_maps[name] = postprocess(
            maps, relu_maps=relu, size=spatial if upsample else None, normalization=normalize
        )
    return Explanation(
        layer_maps=layer_maps,
        logits=blended,
        pixel_sets=stacked_sets,
        targets=tuple(target_list),
        method=chosen.name,
        relu=relu,
        upsampled=upsample,
        normalize=normalize,
        layer_shapes=layer_shapes,
        method_options=options,
        info={
            "sliding_window": {
                "roi_size": list(roi),
                "overlap": overlap if isinstance(overlap, int | float) else list(overlap),
                "mode": mode,
                "windows": len(windows),
                "windows_run": ran,
                "windows_backward": backward,
                "windows_skipped": len(windows) - backward,
                "placement": dict(zip(names, placements, strict=True)),
            }
        },
    )


def _blend(
    blended: torch.Tensor | None,
    logits: torch.Tensor,
    group: list[tuple[slice, ...]],
    weight: torch.Tensor,
    batch: int,
    spatial: tuple[int, ...],
) -> torch.Tensor:
    """Add g_w * y_w of each window of the group (logits (len(group)*N, K, *roi))."""
    if blended is None:
        blended = logits.new_zeros((batch, logits.shape[1], *spatial))
    for k, window in enumerate(group):
        blended[(slice(None), slice(None), *window)] += weight * logits[k * batch : (k + 1) * batch]
    return blended


def _accumulators(
    grids: list[tuple[int, ...]],
    roi: tuple[int, ...],
    spatial: tuple[int, ...],
    windows: list[tuple[slice, ...]],
    batch: int,
    targets: int,
    inputs: torch.Tensor,
) -> list[dict[str, Any]]:
    """Per layer: the whole-volume map and where window maps go (layer or input grid)."""
    result: list[dict[str, Any]] = []
    for grid in grids:
        factors = [r // g if g and r % g == 0 else 0 for r, g in zip(roi, grid, strict=True)]
        aligned = all(f > 0 for f in factors) and all(
            s % f == 0 for s, f in zip(spatial, factors, strict=True)
        )
        aligned = aligned and all(
            w.start % f == 0 for window in windows for w, f in zip(window, factors, strict=True)
        )
        if aligned:
            size = tuple(s // f for s, f in zip(spatial, factors, strict=True))
            result.append(
                {
                    "placement": "layer",
                    "factors": factors,
                    "maps": inputs.new_zeros((batch, targets, *size)),
                }
            )
        else:
            result.append(
                {
                    "placement": "input",
                    "factors": None,
                    "maps": inputs.new_zeros((batch, targets, *spatial)),
                }
            )
    return result


def _place(
    accumulator: dict[str, Any],
    window_maps: torch.Tensor,
    group: list[tuple[slice, ...]],
    t: int,
    batch: int,
    roi: tuple[int, ...],
) -> None:
    """Add each window's (N, *grid) maps of target t at its place on the whole grid."""
    maps = accumulator["maps"]
    for k, window in enumerate(group):
        part = window_maps[k * batch : (k + 1) * batch]
        if accumulator["placement"] == "layer":
            where = tuple(
                slice(w.start // f, w.stop // f)
                for w, f in zip(window, accumulator["factors"], strict=True)
            )
        else:
            part = upsample_maps(part[:, None], roi)[:, 0]
            where = window
        maps[(slice(None), t, *where)] += part
