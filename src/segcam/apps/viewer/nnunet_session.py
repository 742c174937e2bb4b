"""The viewer on an nnU-Net model: one case, nnU-Net's segmentation, exact whole-case maps.

The page shows the case in its original geometry, in the case file's own array order (for
NIfTI, nibabel's (i, j, k); nnU-Net's SimpleITK and nibabel readers give (k, j, i), which the
session transposes at its edges), so an upload of the case's own label file lines up and an
export lies voxel for voxel on the source array. Every target (predicted sets, boxes, pixels,
painted or uploaded masks) is explained by :class:`segcam.nnunet.CaseExplainer` through
nnU-Net's windows, mirroring, folds and export: nnU-Net's prediction once at start, and per
(fold, window, mirroring group) the recorded forward of the layer last asked for, so a new
pixel set costs the partial backward passes of the windows it meets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import segcam
from segcam import Explainer
from segcam.apps.specs import label_map
from segcam.apps.viewer.layers import LayerMenu, on_path_shapes
from segcam.apps.viewer.session import RequestError, ViewerSession
from segcam.errors import InputFileError, OptionError
from segcam.layers import describe_layers
from segcam.memory_format import MemoryFormat
from segcam.methods import get_method
from segcam.nnunet import KEEP_BYTES
from segcam.targets import ResolvedTargets

__all__ = ["NnUNetViewerSession", "nnunet_session"]

_BLOCK = re.compile(r"^(encoder|decoder)\.stages\.\d+$")


def _ras_affine(properties: Mapping[str, Any], dims: int) -> np.ndarray:
    """The voxel-to-world matrix (RAS, as NIfTI) of the case in the file's (i, j, k) order."""
    affine = np.eye(4)
    if dims != 3:
        return affine
    nibabel_stuff = properties.get("nibabel_stuff")
    if nibabel_stuff:  # the array nnU-Net reorients (if it does) is the one shown
        key = "reoriented_affine" if "reoriented_affine" in nibabel_stuff else "original_affine"
        return np.asarray(nibabel_stuff[key], dtype=float)
    stuff = properties.get("sitk_stuff")
    if not stuff or len(stuff["spacing"]) != 3:
        return affine
    direction = np.asarray(stuff["direction"], dtype=float).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(np.asarray(stuff["spacing"], dtype=float))
    affine[:3, 3] = lps_to_ras @ np.asarray(stuff["origin"], dtype=float)
    return affine


def file_order(reader_name: str, dims: int) -> tuple[int, ...]:
    """The axes that bring the reader's array to the file's own order ((k, j, i) -> (i, j, k))."""
    from segcam.nnunet.files import reverses_axes

    return (2, 1, 0) if dims == 3 and reverses_axes(reader_name) else tuple(range(dims))


@dataclass(eq=False)
class NnUNetViewerSession(ViewerSession):
    """A :class:`ViewerSession` whose explanations go through nnU-Net's whole inference.

    Args:
        nnunet_model: from :func:`segcam.nnunet.load`.
        case: a read case (:func:`segcam.nnunet.read_case`).
        original: the case's channels on the original grid (C, *S), for display.
        step_size, mirroring: nnU-Net's inference settings.
        order: the axes that bring the reader's arrays to the shown order (:func:`file_order`);
            ``ground_truth`` is given in the shown order.
        keep_bytes: the budget of kept window forwards (:class:`segcam.nnunet.CaseExplainer`).
    """

    nnunet_model: Any = None
    case: Any = None
    original: np.ndarray | None = None
    step_size: float = 0.5
    mirroring: bool = True
    order: tuple[int, ...] = (0, 1, 2)
    keep_bytes: int = KEEP_BYTES
    _predicted: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from segcam import nnunet

        model, case = self.nnunet_model, self.case
        assert model is not None and case is not None and self.original is not None
        dims = len(case.original_shape)
        if sorted(self.order) != list(range(dims)):
            self.order = tuple(range(dims))
        self._back = tuple(int(a) for a in np.argsort(self.order))
        self.spatial = tuple(int(case.original_shape[a]) for a in self.order)
        self._case = nnunet.CaseExplainer(
            model, case, step_size=self.step_size, mirroring=self.mirroring,
            keep_bytes=self.keep_bytes, memory_format=self.memory_format,
        )  # fmt: skip
        prediction = self._case.prediction
        heads = int(model.label_manager.num_segmentation_heads)
        self.classes = heads
        self._predicted = {c: prediction.predicted(model, c) for c in range(heads)}
        self.prediction = self.shown(np.asarray(prediction.segmentation, dtype=np.uint8))
        if not self.class_names:
            self.class_names = list(model.class_names)
        if len(self.class_names) != max(heads, 2):
            raise OptionError(f"{len(self.class_names)} class names for {heads} output channels")
        self.forward_seconds = float("nan")  # gradient-free methods are not offered here
        network = model.networks[0]
        channels = int(case.data.shape[0])
        patch = tuple(int(p) for p in model.configuration_manager.patch_size)
        table = describe_layers(network, torch.zeros((1, channels, *patch)))
        shapes = on_path_shapes(table)
        layers = list(self.layers) or [name for name in shapes if _BLOCK.match(name)]
        unknown = [name for name in layers if name not in shapes]
        if unknown:
            raise OptionError(f"layers not on the network's path (or unknown): {unknown}")
        if self.default_layer is None:
            decoders = [name for name in layers if name.startswith("decoder.")]
            self.default_layer = (decoders or layers)[-1]
        if self.default_layer not in layers:
            raise OptionError(f"default layer {self.default_layer!r} is not among the layers")
        if self.affine is None:
            self.affine = _ras_affine(case.properties, len(self.spatial))
        schemes = list(getattr(model.configuration_manager, "normalization_schemes", []))
        if not self.intensity_unit and schemes[:1] == ["CTNormalization"]:
            self.intensity_unit = "HU"  # the first channel is a CT in Hounsfield units
        original = np.asarray(self.original, dtype=np.float32)
        self._arrays(self.shown(original[0] if self.intensity_unit == "HU" else original.mean(0)))
        from segcam.nnunet.model import block_name

        labels = self.layer_labels or {name: block_name(name) for name in layers}
        self._set_menu(LayerMenu(shapes, set(), layers, layers, labels, self.default_layer))

    def shown(self, array: np.ndarray) -> np.ndarray:
        """An array in the reader's order, in the shown (the file's) order."""
        return np.ascontiguousarray(np.transpose(array, self.order))

    def info(self) -> dict[str, Any]:  # noqa: D102
        result = super().info()
        result["nnunet"] = {
            "folds": [str(f) for f in self.nnunet_model.folds],
            "configuration": self.nnunet_model.configuration,
            "step_size": self.step_size,
            "mirroring": self.mirroring,
        }
        result["methods"] = [m for m in result["methods"] if get_method(m["name"]).needs_gradient]
        return result

    def _explainer(self, layer: str) -> Explainer | None:
        return None  # every request runs nnU-Net's windows that meet its pixel set

    def _explain_missing(
        self, explainer: Explainer | None, layer: str, target: segcam.Target, methods: list[str]
    ) -> list[tuple[str, segcam.Explanation]]:
        for method in methods:
            if not get_method(method).needs_gradient:
                raise RequestError(f"{method}: gradient-free methods are not available here")
        c = int(target.class_index)
        if isinstance(target, segcam.Predicted):  # nnU-Net's own set, computed once
            pixel_set = self._predicted[c]
        else:  # the set on the shown grid, in the reader's order
            stand_in = torch.zeros(()).expand(1, max(self.classes, c + 1), *self.spatial)
            shown = ResolvedTargets.resolve([target], stand_in).pixel_sets[0][0]
            pixel_set = shown.permute(self._back)
        explanations = self._case.explain_methods(
            segcam.Mask(c, pixel_set), layer, methods, relu=False
        )  # raw on the original grid: ReLU follows there, as in nnunet.explain
        return [(method, _transposed(e, self.order)) for method, e in explanations.items()]

    def close(self) -> None:  # noqa: D102
        super().close()
        self._case.close()


def _transposed(explanation: segcam.Explanation, order: tuple[int, ...]) -> segcam.Explanation:
    """The explanation with its maps, logits and pixel sets in the shown order."""
    axes = (0, 1, *(2 + a for a in order))
    return dataclasses.replace(
        explanation,
        layer_maps={name: maps.permute(axes) for name, maps in explanation.layer_maps.items()},
        logits=explanation.logits.permute(axes),
        pixel_sets=explanation.pixel_sets.permute(axes),
    )


def nnunet_session(
    folder: str,
    files: list[str],
    *,
    folds: Any = "all",
    checkpoint: str = "checkpoint_final.pth",
    step_size: float = 0.5,
    mirroring: bool = True,
    trust_checkpoint: bool = False,
    layers: list[str] | None = None,
    device: str = "cpu",
    ground_truth: str | None = None,
    memory_format: MemoryFormat = "auto",
) -> NnUNetViewerSession:
    """A viewer session on an nnU-Net model folder and one case's channel files.

    ``ground_truth``: the case's label file, read by the model's own reader, so it lies in the
    same array order as the case (outlined as the truth; a file of another grid is refused).
    """
    from segcam import nnunet

    model = nnunet.load(
        folder, folds=folds, checkpoint=checkpoint, device=device,
        trust_checkpoint=trust_checkpoint,
    )  # fmt: skip
    reader = model.plans_manager.image_reader_writer_class()
    case = nnunet.read_case(model, files)
    original, _ = reader.read_images(files)
    truth = None
    if ground_truth is not None:
        try:
            labels, _ = reader.read_seg(ground_truth)
        except Exception as error:  # the readers raise many types for unreadable files
            raise InputFileError(f"--ground-truth {ground_truth}: cannot read ({error})") from error
        values = np.asarray(labels)[0]
        if tuple(values.shape) != tuple(int(v) for v in case.original_shape):
            raise InputFileError(
                f"--ground-truth {ground_truth}: shape {tuple(values.shape)}, but the case's is "
                f"{tuple(case.original_shape)}"
            )
        truth = label_map(values, f"--ground-truth {ground_truth}")
    order = file_order(type(reader).__name__, len(case.original_shape))
    return NnUNetViewerSession(
        model=model.networks[0],
        inputs=case.data,
        nnunet_model=model,
        case=case,
        original=np.asarray(original),
        step_size=step_size,
        mirroring=mirroring,
        layers=layers or [],
        ground_truth=None if truth is None else np.ascontiguousarray(np.transpose(truth, order)),
        order=order,
        title=f"{files[0]} with nnU-Net {model.configuration}",
        memory_format=memory_format,
    )
