"""Targets of an nnU-Net case: classes by name, label files, and nnU-Net's own predicted sets.

A target for an nnU-Net model names its class by index or by its name in ``dataset.json``
(regions of region models by the region's name); a ``Mask`` may be a label file, read with the
plans' reader in the case's array order; ``Predicted(c)`` (and ``Region(c)`` without a mask) is
the set of voxels nnU-Net's *export* labels c, so the explained set is the one
``nnUNetv2_predict`` writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcam.errors import ClassIndexError, TargetError
from segcam.nnunet.model import NnUNetModel
from segcam.pixel_sets import mask_values_as_set
from segcam.targets import ExportedSet, Predicted, Region, TargetLike, as_target_list

if TYPE_CHECKING:
    from segcam.nnunet.predict import NnUNetPrediction

__all__ = ["ExportedSet", "class_index_of", "predicted_sets", "resolve_targets"]


def class_index_of(model: NnUNetModel, value: Any, target: TargetLike) -> int:
    """The output channel of a class given by index or by its ``dataset.json`` name.

    Raises:
        ClassIndexError: a name the model does not have, or an index outside its heads.
    """
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


def _class_labels(model: NnUNetModel, index: int) -> list[int]:
    """The label value(s) of output channel ``index`` in ``dataset.json`` (a region: several)."""
    value = model.dataset_json.get("labels", {}).get(model.class_names[index], index)
    return [int(v) for v in np.ravel(value)]


def _read_mask_file(model: NnUNetModel, target: TargetLike) -> TargetLike:
    """A mask given as a label file (``FILE`` or ``FILE=LABEL``), read with the plans' reader.

    A 0/1 mask gives its ones, a label map the voxels of the class's label(s) in
    ``dataset.json``, ``FILE=LABEL`` the voxels of that value.
    """
    mask = getattr(target, "mask", None)
    if not isinstance(mask, str | Path):
        return target
    path, label = Path(mask), None
    head, equals, tail = str(mask).rpartition("=")
    if not path.is_file() and equals and tail.isascii() and tail.isdigit():
        path, label = Path(head), int(tail)
    what = type(target).__name__
    if not path.is_file():
        raise TargetError(f"{what}: no such label file {path}")
    reader = model.plans_manager.image_reader_writer_class()
    try:
        labels, _ = reader.read_seg(str(path))
    except Exception as error:  # readers raise many types
        raise TargetError(f"{what}: cannot read {path}: {error}") from error
    values = np.asarray(labels[0])
    if label is not None:
        chosen = values == label
    else:
        chosen = np.asarray(
            mask_values_as_set(values, _class_labels(model, target.class_index), what)
        )
    return dataclasses.replace(target, mask=chosen)  # type: ignore[type-var]


def resolve_targets(
    model: NnUNetModel, targets: TargetLike | Sequence[TargetLike]
) -> list[TargetLike]:
    """The targets with class indices for names and masks read from their label files."""
    result = []
    for target in as_target_list(targets):
        target = _with_class(target, class_index_of(model, target.class_index, target))
        result.append(_read_mask_file(model, target))
    return result


def predicted_sets(
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
                target = ExportedSet(target.class_index, predicted, description, repr(target))
        result.append(target)
    return result
