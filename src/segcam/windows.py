r"""Sliding windows: the plan, the importance map, the blended prediction.

As MONAI's ``sliding_window_inference`` lays them out: windows of size ``roi_size`` start at
MONAI's scan intervals (``overlap`` of the window between neighbours), their logits are
weighted with an importance map $g$ (``"constant"`` or ``"gaussian"``, sigma =
``sigma_scale`` x roi) and blended,

$$
Y(p) = \frac{\sum_w g_w(p)\, y_w(p)}{\sum_w g_w(p)} .
$$

:func:`plan_windows` makes the plan (windows, weights, groups of ``sw_batch_size``),
:func:`blended_logits` the prediction without gradients; the explanation of that prediction is
:mod:`segcam.sliding`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam.checks import all_finite, check_inputs, run_model
from segcam.errors import InputError, NonFiniteError, OptionError
from segcam.outputs import OutputSpec, select_logits

__all__ = [
    "SlidingWindowOptions",
    "SlidingWindowPlan",
    "Window",
    "blended_logits",
    "check_blended",
    "importance_map",
    "plan_windows",
    "predict_blended",
    "window_slices",
]

Window = tuple[slice, ...]


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
    roi: Sequence[int],
    mode: str,
    sigma_scale: float | Sequence[float],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The blending weight of a window, as MONAI's ``compute_importance_map``.

    Ones, or the separable Gaussian with sigma = ``sigma_scale`` * roi per axis (one scale for
    every axis, or one per axis), its values raised to at least max(min, 1e-3) (MONAI's floor,
    which keeps window corners from vanishing).
    """
    if mode == "constant":
        return torch.ones(tuple(roi), dtype=dtype, device=device)
    scales = _sigma_scales(sigma_scale, len(roi))
    weight = torch.ones((), dtype=torch.float32, device=device)
    for axis, r in enumerate(roi):
        x = torch.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        profile = torch.exp(x**2 / (-2 * (scales[axis] * r) ** 2))
        weight = weight.unsqueeze(-1) * profile[(None,) * axis] if axis else profile
    floor = max(float(weight.min()), 1e-3)
    return weight.clamp_min(floor).to(dtype)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 < value < math.inf


def _sigma_scales(sigma_scale: float | Sequence[float], dims: int) -> tuple[float, ...]:
    """``sigma_scale`` per axis (one number for all, or one per axis), checked positive."""
    if isinstance(sigma_scale, Sequence) and not isinstance(sigma_scale, str):
        scales = tuple(sigma_scale)
        if len(scales) == dims and all(_positive(v) for v in scales):
            return tuple(float(v) for v in scales)
    elif _positive(sigma_scale):
        return (float(sigma_scale),) * dims
    raise OptionError(
        f"sigma_scale must be a positive number or one per axis ({dims}); got {sigma_scale!r}"
    )


def _roi(roi_size: int | Sequence[int], spatial: tuple[int, ...]) -> tuple[int, ...]:
    roi = (roi_size,) * len(spatial) if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != len(spatial) or any(
        isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi
    ):
        raise InputError(
            f"roi_size must be a positive int or {len(spatial)} positive ints; got {roi_size!r}"
        )
    if any(r > s for r, s in zip(roi, spatial, strict=True)):
        raise InputError(
            f"roi_size {roi} is larger than the input {spatial}: explain the whole input with "
            f"segcam.explain, or pad it to the window size"
        )
    return roi


def _overlaps(overlap: float | Sequence[float], dims: int) -> list[float]:
    values = [overlap] * dims if isinstance(overlap, int | float) else list(overlap)
    if len(values) != dims or any(
        isinstance(o, bool) or not isinstance(o, int | float) or not 0 <= o < 1 for o in values
    ):
        raise OptionError(
            f"overlap must be a number in [0, 1) or {dims} of them (one per axis); got {overlap!r}"
        )
    return [float(o) for o in values]


@dataclass(frozen=True)
class SlidingWindowPlan:
    """The windows of a sliding-window pass and how their logits blend.

    Attributes:
        spatial: the input's spatial size.
        roi: the window size.
        overlap: the overlap per axis.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        windows: every window, in MONAI's order.
        groups: the windows in batches of ``sw_batch_size``.
        weight: the importance map g of a window (roi).
        count: the sum of the weights of every window over the whole grid (spatial).
    """

    spatial: tuple[int, ...]
    roi: tuple[int, ...]
    overlap: tuple[float, ...]
    mode: str
    windows: list[Window]
    groups: list[list[Window]]
    weight: torch.Tensor = field(repr=False)
    count: torch.Tensor = field(repr=False)

    def crops(self, inputs: torch.Tensor, group: Sequence[Window]) -> torch.Tensor:
        """The group's windows of ``inputs``, stacked on the batch axis (window-major)."""
        return torch.cat([inputs[(slice(None), slice(None), *w)] for w in group])

    def blend(
        self, blended: torch.Tensor | None, logits: torch.Tensor, group: Sequence[Window]
    ) -> torch.Tensor:
        """Add g_w * y_w of each window of the group (logits (len(group)*N, K, *roi))."""
        batch = logits.shape[0] // len(group)
        if blended is None:
            blended = logits.new_zeros((batch, logits.shape[1], *self.spatial))
        for k, window in enumerate(group):
            part = logits[k * batch : (k + 1) * batch]
            blended[(slice(None), slice(None), *window)] += self.weight * part
        return blended

    def gradient_scale(self, group: Sequence[Window], batch: int) -> torch.Tensor:
        """D Y / d y_w = g_w / sum of g over the windows, per window of the group (B*N, *roi)."""
        return torch.cat([(self.weight / self.count[w]).expand(batch, *self.roi) for w in group])


def plan_windows(
    inputs: torch.Tensor,
    roi_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 1,
) -> SlidingWindowPlan:
    """Check the options and lay out the windows and blending weights for ``inputs``.

    Raises:
        InputError: a bad input or ``roi_size``.
        OptionError: ``overlap`` outside [0, 1), an unknown ``mode``, a non-positive
            ``sigma_scale`` or ``sw_batch_size``.
    """
    check_inputs(inputs)
    spatial = tuple(int(s) for s in inputs.shape[2:])
    roi = _roi(roi_size, spatial)
    overlaps = _overlaps(overlap, len(spatial))
    if mode not in ("constant", "gaussian"):
        raise OptionError(f"mode must be 'constant' or 'gaussian'; got {mode!r}")
    _sigma_scales(sigma_scale, len(spatial))  # checked before any window
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise OptionError(f"sw_batch_size must be a positive int; got {sw_batch_size!r}")
    windows = window_slices(spatial, roi, overlaps)
    weight = importance_map(roi, mode, sigma_scale, inputs.dtype, inputs.device)
    count = torch.zeros(spatial, dtype=inputs.dtype, device=inputs.device)
    for window in windows:
        count[window] += weight
    groups = [windows[i : i + sw_batch_size] for i in range(0, len(windows), sw_batch_size)]
    return SlidingWindowPlan(spatial, roi, tuple(overlaps), mode, windows, groups, weight, count)


@dataclass(frozen=True)
class SlidingWindowOptions:
    """The five sliding-window options as one value (the keywords of the public functions)."""

    roi_size: int | Sequence[int]
    overlap: float | Sequence[float] = 0.25
    mode: str = "gaussian"
    sigma_scale: float | Sequence[float] = 0.125
    sw_batch_size: int = 1

    def plan(self, inputs: torch.Tensor) -> SlidingWindowPlan:
        """:func:`plan_windows` of ``inputs`` with these options (checked there)."""
        return plan_windows(
            inputs,
            self.roi_size,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            sw_batch_size=self.sw_batch_size,
        )


def blended_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    roi_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 1,
    output: OutputSpec = None,
) -> torch.Tensor:
    """Sliding-window inference without gradients: the blended logits (N, K, *S).

    The same windows and weights as :func:`explain_sliding_window` (and MONAI's
    ``sliding_window_inference``).
    """
    options = SlidingWindowOptions(roi_size, overlap, mode, sigma_scale, sw_batch_size)
    return predict_blended(model, inputs, options.plan(inputs), output)


def predict_blended(
    model: nn.Module, inputs: torch.Tensor, plan: SlidingWindowPlan, output: OutputSpec
) -> torch.Tensor:
    """The blended logits of a plan's windows (N, K, *S), without gradients."""
    blended: torch.Tensor | None = None
    with torch.inference_mode(False), torch.no_grad():
        for group in plan.groups:
            crops = plan.crops(inputs, group)
            logits = select_logits(run_model(model, crops), output, inputs.ndim)
            blended = plan.blend(blended, logits, group)
    assert blended is not None  # a plan has at least one window
    return blended.div_(plan.count)


def check_blended(blended: torch.Tensor) -> torch.Tensor:
    """``blended``, unless it holds NaN or Inf (:class:`~segcam.errors.NonFiniteError`)."""
    if not all_finite(blended):
        raise NonFiniteError(
            "the blended logits hold NaN or Inf: some window's logits overflowed; scale the "
            "input as the model was trained"
        )
    return blended
