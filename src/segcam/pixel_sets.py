"""Pixel sets: masks checked against the output grid, predicted sets, connected components.

A pixel set M is a (N, *S) bool tensor over the output grid S, one set per sample. What a
target's ``pixel_set`` returns is checked here (:func:`as_pixel_set`), the predicted set of a
class is the argmax (or, for one sigmoid channel, the sign) of the logits (:func:`predicted_as`),
and :func:`largest_component` keeps the largest face-connected component of each sample's set.
Classes of a single-channel (sigmoid) output are {0, 1}: 1 the logit, 0 its negation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segcam.errors import ClassIndexError, MaskShapeError, TargetError

__all__ = [
    "as_pixel_set",
    "check_class_index",
    "class_logits",
    "class_probabilities",
    "largest_component",
    "mask_values_as_set",
    "num_classes",
    "predicted_as",
]


def num_classes(logits: torch.Tensor) -> int:
    """Number of classes a target may name: K, or 2 for a single-channel (sigmoid) output."""
    channels = int(logits.shape[1])
    return 2 if channels == 1 else channels


def check_class_index(class_index: int, logits: torch.Tensor) -> None:
    """Raise :class:`ClassIndexError` unless ``0 <= class_index < num_classes(logits)``."""
    count = num_classes(logits)
    if (
        isinstance(class_index, torch.Tensor)
        and class_index.ndim == 0
        and not (class_index.dtype.is_floating_point or class_index.dtype == torch.bool)
    ):
        class_index = int(class_index)  # a 0-d integer tensor, as Pixel and Box take them
    if isinstance(class_index, bool) or not isinstance(class_index, int | np.integer):
        raise ClassIndexError(
            f"class index must be an int, got {class_index!r} ({type(class_index).__name__})"
        )
    if not 0 <= class_index < count:
        single = int(logits.shape[1]) == 1  # not a two-channel output, which also has 2 classes
        kind = " (single-channel output: 1 = the logit, 0 = its negation)" if single else ""
        raise ClassIndexError(
            f"class index {class_index} is out of range: the output has {count} classes{kind}, "
            f"so valid indices are 0..{count - 1}"
        )


def class_logits(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    """The logit map y^c, shape (N, *S); for one-channel outputs class 0 is the negated logit."""
    if logits.shape[1] == 1:
        return logits[:, 0] if class_index == 1 else -logits[:, 0]
    return logits[:, class_index]


def class_probabilities(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    """Softmax over classes (sigmoid for one-channel outputs) for class ``c``, shape (N, *S)."""
    if logits.shape[1] == 1:
        return torch.sigmoid(class_logits(logits, class_index))
    return torch.softmax(logits, dim=1)[:, class_index]


_COMPARE_UP_TO = 8  # classes; above, one argmax pass is faster than K - 1 comparisons


def predicted_as(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    """``logits.argmax(dim=1) == class_index``, (N, *S) bool, ties going to the lower class.

    For few classes it compares channel c with every other channel instead (strictly against
    lower classes, so ties resolve as argmax's first maximum): on the CPU that is much faster
    than torch's argmax over the class axis (the benchmarks page, "Choices measured").
    """
    classes = int(logits.shape[1])
    if classes > _COMPARE_UP_TO:
        return logits.argmax(dim=1) == class_index
    value = logits[:, class_index]
    result = torch.ones_like(value, dtype=torch.bool)
    for other in range(classes):
        if other < class_index:
            result &= value > logits[:, other]
        elif other > class_index:
            result &= value >= logits[:, other]
    return result


def mask_values_as_set(values: Any, label: int | Sequence[int], what: str) -> Any:
    """A mask, or a label map, as the pixel set a user means by it for a class of ``label``.

    - bool values, or one value besides 0 (0/1, or 0/255 as image editors save masks): the
      pixels that are not 0;
    - whole numbers with several values besides 0 (a label map, such as a ground truth file):
      the pixels whose value is ``label`` (one of ``label``, for a region of several labels);
    - anything else (a soft mask, negative values): left to :func:`as_pixel_set`, which refuses
      it with the reason.

    A tensor stays a tensor, anything else becomes a NumPy array. So a label map read from a file
    and the same labels given as an array give the same set. A label map holding one class only
    reads as a mask of it: name the label explicitly (``values == c``) where that matters.
    """
    if isinstance(values, str | os.PathLike):
        return values  # as_pixel_set says what to do with a file name
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex() or values.numel() == 0:
            return values
        finite = torch.isfinite(values) if values.is_floating_point() else None
        whole = bool(((values == values.round()) & finite).all()) if finite is not None else True
        if not whole or not bool((values >= 0).all()):
            return values
        if torch.unique(values[values != 0]).numel() <= 1:
            return values != 0
        wanted = torch.as_tensor(np.ravel(label), device=values.device).to(values.dtype)
        return torch.isin(values, wanted)
    try:
        array = np.asarray(values)
    except Exception:  # as_pixel_set reports what cannot be read
        return values
    if array.dtype.kind not in "biuf" or array.dtype == bool or array.size == 0:
        return array
    with np.errstate(invalid="ignore"):
        whole = bool(np.all(np.isfinite(array) & (array == np.round(array))))
    if not whole or not bool(np.all(array >= 0)):
        return array
    if np.unique(array[array != 0]).size <= 1:
        return array != 0
    return np.isin(array, np.ravel(label))


def as_pixel_set(mask: Any, logits: torch.Tensor, what: str) -> torch.Tensor:
    """Validate ``mask`` against the output grid and return a (N, *S) bool tensor on its device.

    Accepts a tensor or array of shape (*S) (broadcast over the batch), (N, *S) or (N, 1, *S),
    with bool or 0/1 values.
    """
    batch, spatial = int(logits.shape[0]), tuple(int(s) for s in logits.shape[2:])
    if isinstance(mask, torch.Tensor):
        try:
            tensor = mask.detach().to(logits.device)
        except (RuntimeError, NotImplementedError) as error:
            raise TargetError(
                f"{what}: cannot move the mask from {mask.device} to the output's device "
                f"{logits.device} ({error})"
            ) from error
    else:
        if isinstance(mask, str | os.PathLike):
            raise TargetError(
                f"{what}: the mask is a file name ({os.fspath(mask)!r}), not an array; read it "
                f"first (numpy.load, segcam.io.read_input), or give it to the command line as "
                f"--target mask:CLASS:FILE"
            )
        try:
            array = np.asarray(mask)
        except Exception as error:  # numpy raises many types for ragged input
            raise TargetError(f"{what}: cannot read the mask as an array ({error})") from error
        if array.dtype == object or array.dtype.kind in "USV":
            raise TargetError(f"{what}: the mask is not a numeric or bool array")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(logits.device)
    shape = tuple(int(s) for s in tensor.shape)
    if shape == spatial:
        tensor = tensor.unsqueeze(0).expand(batch, *spatial)
    elif shape == (batch, 1, *spatial):
        tensor = tensor[:, 0]
    elif shape != (batch, *spatial):
        raise MaskShapeError(
            f"{what}: mask shape {shape} does not match the output grid: expected {spatial} "
            f"(one mask for every sample) or {(batch, *spatial)} (one per sample)"
        )
    if tensor.dtype != torch.bool:
        if tensor.is_complex():
            raise TargetError(f"{what}: complex masks are not supported")
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise TargetError(
                f"{what}: mask values must be bool or 0/1; found other values "
                f"(threshold soft masks first, e.g. mask > 0.5)"
            )
        tensor = tensor != 0
    return tensor


def _neighbour_max(labels: torch.Tensor) -> torch.Tensor:
    """Max of each position and its face neighbours (4-connectivity in 2D, 6 in 3D)."""
    result = labels.clone()
    for axis in range(1, labels.ndim):
        size = labels.shape[axis]
        if size < 2:
            continue
        head = labels.narrow(axis, 1, size - 1)
        tail = labels.narrow(axis, 0, size - 1)
        result.narrow(axis, 0, size - 1).copy_(
            torch.maximum(result.narrow(axis, 0, size - 1), head)
        )
        result.narrow(axis, 1, size - 1).copy_(
            torch.maximum(result.narrow(axis, 1, size - 1), tail)
        )
    return result


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Largest face-connected component of each sample's mask, (N, *S) bool -> (N, *S) bool.

    Connectivity is by shared faces (4 in 2D, 6 in 3D), as ``scipy.ndimage.label``'s default.
    Runs on the mask's device: every foreground position starts labelled with its own flat index;
    labels spread to neighbours by max and are shortcut by pointer jumping (label <- label of the
    label) until nothing changes. Ties between equally large components go to the one that holds
    the lowest-index maximum label, which is deterministic. Empty masks stay empty.
    """
    batch = mask.shape[0]
    foreground = mask.reshape(batch, -1).bool()
    positions = foreground.shape[1]
    flat_index = torch.arange(1, positions + 1, device=mask.device, dtype=torch.int64)
    labels = torch.where(foreground, flat_index, torch.zeros_like(flat_index))
    offsets = (torch.arange(batch, device=mask.device) * (positions + 1)).unsqueeze(1)
    for _ in itertools.count():
        spread = _neighbour_max(labels.reshape(mask.shape)).reshape(batch, -1)
        spread = torch.where(foreground, spread, torch.zeros_like(spread))
        # Pointer jumping: a label is the 1-based flat index of a position in the same component,
        # whose own label is at least as large, so following it never leaves the component.
        padded = torch.cat([torch.zeros_like(spread[:, :1]), spread], dim=1)
        jumped = padded.reshape(-1)[(spread + offsets).reshape(-1)].reshape(batch, -1)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    result = torch.zeros_like(foreground)
    for sample in range(batch):
        values, counts = torch.unique(labels[sample][foreground[sample]], return_counts=True)
        if values.numel():
            result[sample] = labels[sample] == values[counts.argmax()]
    return result.reshape(mask.shape)
