"""Targets: a class index ``c`` and a pixel set ``M`` over the output grid, per sample.

The score a target explains is the masked logit sum (Vinogradova et al., AAAI 2020; Rheude et al.,
MELBA 2024)::

    y^c_M = sum_{p in M} y^c_p

on raw logits. For single-channel (sigmoid) models, class 1 is the logit and class 0 its negation,
so ``c`` ranges over {0, 1}.

Writing your own target
-----------------------
Subclass :class:`Target` (or provide any object with the same two members)::

    class Ring(segcam.targets.Target):
        def __init__(self, class_index: int, inner: float, outer: float) -> None:
            self.class_index = class_index
            ...

        def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
            # logits: detached (N, K, *S) on the model's device; return (N, *S) or (*S), bool or 0/1
            ...

``explain`` validates what ``pixel_set`` returns (shape, values) and moves nothing off the device.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from segcam.errors import (
    SegCamWarning,
    TargetError,
    user_stacklevel,
)
from segcam.pixel_sets import (
    as_pixel_set,
    check_class_index,
    class_logits,
    class_probabilities,
    largest_component,
    mask_values_as_set,
    num_classes,
    predicted_as,
)

__all__ = [
    "AllPixels",
    "Box",
    "ExportedSet",
    "Mask",
    "Pixel",
    "Predicted",
    "Probability",
    "Region",
    "ResolvedTargets",
    "Target",
    "TargetLike",
    "Weighted",
    "as_target_list",
    "class_logits",
    "largest_component",
    "num_classes",
    "predicted_as",
    "score_gradient",
    "target_pixel_sets",
    "uses_logits",
    "warn_empty_pixel_sets",
]


@runtime_checkable
class TargetLike(Protocol):
    """What ``explain`` needs of a target: a class index and a pixel set per sample.

    ``uses_logits`` declares whether :meth:`pixel_set` reads the logits' values (``Predicted``,
    ``Probability``) or only their shape and device (``Mask``, ``Box``): sliding windows need a
    first prediction pass only for the former. A target object without the attribute is taken
    to read the values (the safe choice; see :func:`uses_logits`).
    """

    @property
    def class_index(self) -> int:
        """The class c whose logits are summed over the pixel set."""
        ...

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the pixel set M as a (N, *S) or (*S) bool / 0-1 tensor for detached logits."""
        ...


def uses_logits(target: TargetLike) -> bool:
    """Whether the target's pixel set depends on the logits' values (its ``uses_logits``)."""
    return bool(getattr(target, "uses_logits", True))


def as_target_list(targets: TargetLike | Sequence[TargetLike]) -> list[TargetLike]:
    """One target or a sequence of them, as a checked non-empty list."""
    if isinstance(targets, TargetLike):
        items = [targets]
    elif isinstance(targets, Sequence | tuple | list) and not isinstance(targets, str):
        items = list(targets)
    else:
        raise TargetError(
            f"targets must be a target or a sequence of them (e.g. segcam.Predicted(1)); got "
            f"{type(targets).__name__}"
        )
    if not items:
        raise TargetError("targets is empty: give at least one target, e.g. segcam.Predicted(1)")
    for item in items:
        if not isinstance(item, TargetLike):
            raise TargetError(
                f"{item!r} is not a target: it needs a class_index and a pixel_set(logits) method "
                f"(see segcam.targets)"
            )
    return items


def target_pixel_sets(targets: Sequence[TargetLike], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each target's pixel set (N, *S) bool on ``logits``, its class index checked first."""
    result = []
    for target in targets:
        check_class_index(target.class_index, logits)
        result.append(as_pixel_set(target.pixel_set(logits), logits, repr(target)))
    return result


@dataclass(frozen=True, eq=False)
class ResolvedTargets:
    """Targets resolved once on one forward's logits, for every driver to consume.

    Attributes:
        targets: the targets, in order.
        pixel_sets: each target's pixel set M (N, *S) bool, its class index checked.
        stacked: the pixel sets as one (N, T, *S) tensor.
        nonempty: (N, T): whether M holds a pixel, per sample and target.
        active: the targets with a non-empty M in some sample (the others take no backward pass
            and keep a zero map).
    """

    targets: tuple[TargetLike, ...]
    pixel_sets: tuple[torch.Tensor, ...]
    stacked: torch.Tensor = field(repr=False)
    nonempty: torch.Tensor = field(repr=False)
    active: tuple[int, ...]
    weights: tuple[torch.Tensor, ...] = ()  # each score's weights w: M itself, or a target's own

    @classmethod
    def resolve(cls, targets: Sequence[TargetLike], logits: torch.Tensor) -> ResolvedTargets:
        """Each target's pixel set on ``logits`` (N, K, *S) (:func:`target_pixel_sets`).

        A target with ``score_weights(logits)`` (:class:`Weighted`) scores the weighted sum
        of its class's logits; every other target's weights are its pixel set.
        """
        pixel_sets = tuple(target_pixel_sets(targets, logits))
        stacked = torch.stack(pixel_sets, dim=1)
        nonempty = stacked.flatten(2).any(dim=2)
        active = tuple(t for t in range(len(targets)) if bool(nonempty[:, t].any()))
        weights = tuple(
            target.score_weights(logits) if hasattr(target, "score_weights") else pixel_set
            for target, pixel_set in zip(targets, pixel_sets, strict=True)
        )
        return cls(tuple(targets), pixel_sets, stacked, nonempty, active, weights)

    def score_gradient(
        self,
        t: int,
        logits: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        sigmoid_pair: bool = True,
    ) -> torch.Tensor:
        """Target t's score gradient on ``logits`` (:func:`score_gradient`); its own if none."""
        pixel_set = self.weights[t] if weights is None else weights
        return score_gradient(
            logits, self.targets[t].class_index, pixel_set, sigmoid_pair=sigmoid_pair
        )


def score_gradient(
    logits: torch.Tensor, class_index: int, weights: torch.Tensor, *, sigmoid_pair: bool = True
) -> torch.Tensor:
    """D y^c_M / d logits: ``weights`` (the pixel set, 0/1 or blended) in channel c, else 0.

    ``weights`` are (N, *S), one set per sample (a batch of windows may weigh each its own).
    For a single-channel output, class 1 is the logit and class 0 its negation (the two classes
    of one sigmoid), so the gradient is negated for class 0 unless ``sigmoid_pair=False``
    (nnU-Net's region heads, where each channel is a region of its own).
    """
    grad = torch.zeros_like(logits)
    weights = weights.to(logits.dtype)
    if logits.shape[1] == 1 and sigmoid_pair:
        grad[:, 0] = weights if class_index == 1 else -weights
    else:
        grad[:, class_index] = weights
    return grad


def warn_empty_pixel_sets(nonempty: torch.Tensor, targets: Sequence[TargetLike]) -> None:
    """One :class:`~segcam.errors.SegCamWarning` naming the (target, samples) with an empty M."""
    empty = ~nonempty  # (N, T)
    parts = []
    for t, target in enumerate(targets):
        samples = empty[:, t].nonzero().flatten().tolist()
        if samples:
            which = "all samples" if len(samples) == empty.shape[0] else f"samples {samples}"
            parts.append(f"target {t} {target!r} in {which}")
    if parts:
        warnings.warn(
            f"empty pixel set for {'; '.join(parts)}: the score is 0 and the map is all zero",
            SegCamWarning,
            stacklevel=user_stacklevel(),
        )


class Target(abc.ABC):
    """A class index and a pixel set; subclasses define :meth:`pixel_set`.

    ``uses_logits`` says whether :meth:`pixel_set` reads the logits' values; a subclass that
    only reads their shape sets it to ``False``.
    """

    class_index: int
    uses_logits: bool = True

    @abc.abstractmethod
    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the pixel set M for detached logits (N, K, *S): (N, *S) or (*S), bool or 0/1."""

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description, stored with saved explanations."""
        return {"type": type(self).__name__, "class_index": int(self.class_index)}


@dataclass(frozen=True, eq=False)
class Mask(Target):
    """A given pixel set: ``mask`` of shape (*S) for every sample or (N, *S) per sample.

    Args:
        class_index: the class c whose logits are summed.
        mask: bool or 0/1 tensor or array over the output grid, or a label map (whole numbers
            beyond 0 and 1, such as a ground truth): then the pixels labelled c
            (:func:`segcam.pixel_sets.mask_values_as_set`).
    """

    uses_logits = False  # reads only the logits' shape and device

    class_index: int
    mask: Any = field(repr=False)

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        what = f"Mask(class {self.class_index})"
        return as_pixel_set(mask_values_as_set(self.mask, self.class_index, what), logits, what)

    def __repr__(self) -> str:
        shape = tuple(getattr(self.mask, "shape", ()))
        return f"Mask(class_index={self.class_index}, mask=<{shape}>)"


@dataclass(frozen=True, eq=False)
class Weighted(Target):
    r"""A weighted sum of class c's logits: $y^c_w = \sum_v w(v)\, y^c(v)$; M = {w != 0}.

    The score of a pipeline whose last steps are linear (resampling back to the original
    image: $w = E^\top M$), or of a soft region. Its maps are those of the weighted score; the
    pixel set (where ``w`` is not 0) is what is reported and drawn.

    Args:
        class_index: the class c.
        weights: real, finite, of shape (*S) for every sample or (N, *S) per sample (tensor or
            array).
    """

    uses_logits = False  # reads only the logits' shape, dtype and device

    class_index: int
    weights: Any = field(repr=False)

    def score_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The weights as (N, *S) in the logits' dtype and device, checked."""
        what = f"Weighted(class {self.class_index})"
        values = torch.as_tensor(np.asarray(self.weights) if not isinstance(
            self.weights, torch.Tensor) else self.weights)  # fmt: skip
        if values.is_complex() or not (values.is_floating_point() or values.dtype in _INTEGERS):
            raise TargetError(f"{what}: the weights must be real numbers; got {values.dtype}")
        spatial = tuple(logits.shape[2:])
        if tuple(values.shape) == spatial:
            values = values.expand(logits.shape[0], *spatial)
        if tuple(values.shape) != (logits.shape[0], *spatial):
            raise TargetError(
                f"{what}: weights of shape {tuple(values.shape)}; the output grid is {spatial} "
                f"(or {(logits.shape[0], *spatial)} per sample)"
            )
        dtype = (
            torch.float64 if values.dtype == torch.float64 else logits.dtype
        )  # as exact as given
        values = values.to(device=logits.device, dtype=dtype)
        if not bool(torch.isfinite(values).all()):
            raise TargetError(f"{what}: the weights hold NaN or Inf")
        return values

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.score_weights(logits) != 0

    def __repr__(self) -> str:
        shape = tuple(getattr(self.weights, "shape", ()))
        return f"Weighted(class_index={self.class_index}, weights=<{shape}>)"


_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


@dataclass(frozen=True, eq=False)
class ExportedSet(Target):
    """A class's voxels in a pipeline's own export (nnU-Net's, a MONAI bundle's), fixed beforehand.

    It stands for the user's target (``Predicted(c)``) and keeps that target's description.
    """

    uses_logits = False

    class_index: int
    mask: torch.Tensor = field(repr=False)
    description: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        """The fixed set, checked against the logits' grid."""
        return as_pixel_set(self.mask, logits, self.label)

    def describe(self) -> dict[str, Any]:
        """The user's target as described, with the set's source."""
        return dict(self.description)

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Predicted(Target):
    """The pixels predicted as class c: argmax over classes == c (logit > 0 for one channel)."""

    class_index: int

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0) == (self.class_index == 1)
        return predicted_as(logits, self.class_index)


@dataclass(frozen=True)
class Probability(Target):
    """The pixels where p(c) > threshold (softmax over classes; sigmoid for one channel)."""

    class_index: int
    threshold: float = 0.5

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating):
            raise TargetError(
                f"Probability threshold must be a number in [0, 1); got {threshold!r} "
                f"({type(threshold).__name__})"
            )
        if not 0.0 <= threshold < 1.0:
            raise TargetError(f"Probability threshold must lie in [0, 1), got {self.threshold}")
        return class_probabilities(logits, self.class_index) > self.threshold

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {**super().describe(), "threshold": float(self.threshold)}


@dataclass(frozen=True)
class AllPixels(Target):
    """Every pixel of the output grid."""

    uses_logits = False  # reads only the logits' shape and device

    class_index: int

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.ones(
            (logits.shape[0], *logits.shape[2:]), dtype=torch.bool, device=logits.device
        )


def _coordinate(value: Any, what: str) -> int:
    """An integer coordinate; floats, bools and other types are refused (never truncated)."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TargetError(
            f"{what}: coordinates must be integers; got {value!r} ({type(value).__name__})"
        )
    return int(value)


def _check_spatial_index(index: Sequence[int], spatial: tuple[int, ...], what: str) -> None:
    if len(index) != len(spatial):
        raise TargetError(
            f"{what}: index {tuple(index)} has {len(index)} coordinates, "
            f"the output grid {spatial} has {len(spatial)}"
        )
    for axis, (position, size) in enumerate(zip(index, spatial, strict=True)):
        if not 0 <= int(position) < size:
            raise TargetError(
                f"{what}: coordinate {position} on axis {axis} is outside the output grid "
                f"{spatial} (valid 0..{size - 1})"
            )


@dataclass(frozen=True)
class Pixel(Target):
    """One pixel (voxel): ``index`` = (i, j[, k]) for every sample, or a list of N such tuples."""

    uses_logits = False  # reads only the logits' shape and device

    class_index: int
    index: Sequence[int] | Sequence[Sequence[int]]

    def _per_sample(self, batch: int) -> list[tuple[int, ...]]:
        what = f"Pixel(class {self.class_index})"
        index: Any = self.index
        if isinstance(index, torch.Tensor | np.ndarray):
            index = index.tolist()  # a (D,) or (N, D) array of coordinates
        if not isinstance(index, Sequence) or isinstance(index, str) or not index:
            raise TargetError(f"{what}: index must be (i, j[, k]) or one such per sample")
        first = index[0]
        if isinstance(first, Sequence) or getattr(first, "ndim", 0) >= 1:  # one row per sample
            rows = [tuple(_coordinate(v, what) for v in row) for row in index]
            if len(rows) != batch:
                raise TargetError(f"{what}: {len(rows)} indices for a batch of {batch}")
            return rows
        return [tuple(_coordinate(v, what) for v in index)] * batch

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        spatial = tuple(int(s) for s in logits.shape[2:])
        result = torch.zeros((logits.shape[0], *spatial), dtype=torch.bool, device=logits.device)
        for sample, index in enumerate(self._per_sample(int(logits.shape[0]))):
            _check_spatial_index(index, spatial, f"Pixel(class {self.class_index})")
            result[(sample, *index)] = True
        return result

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {**super().describe(), "index": np.asarray(self.index).tolist()}


def _as_slice(bound: slice | Sequence[int], size: int, axis: int, what: str) -> slice:
    """One rule for slices and (start, stop) pairs: integers with 0 <= start <= stop <= size.

    ``None`` in a slice stands for the axis's start or end. Nothing is clamped: a bound outside
    the grid, a float, a negative index or start > stop is a :class:`TargetError`; start == stop
    is an empty box (a zero map and the empty-pixel-set warning).
    """
    if isinstance(bound, slice):
        if bound.step not in (None, 1):
            raise TargetError(f"{what}: slices with a step are not supported (axis {axis})")
        start = 0 if bound.start is None else _coordinate(bound.start, what)
        stop = size if bound.stop is None else _coordinate(bound.stop, what)
    else:
        if isinstance(bound, str) or not isinstance(bound, Sequence) or len(bound) != 2:
            raise TargetError(f"{what}: axis {axis} bound {bound!r} is not a (start, stop) pair")
        start, stop = _coordinate(bound[0], what), _coordinate(bound[1], what)
    if not (0 <= start <= size and 0 <= stop <= size):
        raise TargetError(f"{what}: bounds ({start}, {stop}) on axis {axis} lie outside 0..{size}")
    if start > stop:
        raise TargetError(f"{what}: bounds ({start}, {stop}) on axis {axis} have start > stop")
    return slice(start, stop)


@dataclass(frozen=True)
class Box(Target):
    """A box: a ``slice`` or ``(start, stop)`` pair per spatial axis, the same for every sample."""

    uses_logits = False  # reads only the logits' shape and device

    class_index: int
    slices: Sequence[slice | Sequence[int]]

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        spatial = tuple(int(s) for s in logits.shape[2:])
        what = f"Box(class {self.class_index})"
        if len(self.slices) != len(spatial):
            raise TargetError(
                f"{what}: {len(self.slices)} bounds for a {len(spatial)}-D output grid {spatial}"
            )
        region = tuple(
            _as_slice(bound, size, axis, what)
            for axis, (bound, size) in enumerate(zip(self.slices, spatial, strict=True))
        )
        result = torch.zeros((logits.shape[0], *spatial), dtype=torch.bool, device=logits.device)
        result[(slice(None), *region)] = True
        return result

    def describe(self) -> dict[str, Any]:  # noqa: D102
        what = f"Box(class {self.class_index})"

        def plain(value: Any) -> int | None:  # NumPy and 0-d tensor bounds as JSON integers
            return None if value is None else _coordinate(value, what)

        bounds = [
            [plain(b.start), plain(b.stop)] if isinstance(b, slice) else [plain(v) for v in b]
            for b in self.slices
        ]
        return {**super().describe(), "slices": bounds}


@dataclass(frozen=True, eq=False)
class Region(Target):
    """The largest connected component of a mask (face connectivity), per sample.

    Args:
        class_index: the class c.
        mask: the mask whose largest component is taken, as for :class:`Mask`; ``None`` takes the
            predicted region of class c (a lesion among several, say).
    """

    class_index: int
    mask: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # a given mask is read without the logits' values; the predicted region needs them
        object.__setattr__(self, "uses_logits", self.mask is None)

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mask is None:
            base = Predicted(self.class_index).pixel_set(logits)
        else:
            what = f"Region(class {self.class_index})"
            given = mask_values_as_set(self.mask, self.class_index, what)
            base = as_pixel_set(given, logits, what)
        return largest_component(base)

    def __repr__(self) -> str:
        if self.mask is None:
            return f"Region(class_index={self.class_index}, mask=<predicted>)"
        shape = tuple(getattr(self.mask, "shape", ()))
        return f"Region(class_index={self.class_index}, mask=<{shape}>)"
