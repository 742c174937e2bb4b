"""The viewer on an nnU-Net model: one case, nnU-Net's segmentation, exact whole-case maps.

The page shows the case in its original geometry (the array order of nnU-Net's reader) with
nnU-Net's own segmentation; every target (predicted sets, boxes, pixels, painted or uploaded
masks) is explained by :func:`segcam.nnunet.explain_methods` through nnU-Net's windows,
mirroring, folds and export. The predicted sets are computed once, with the segmentation, and
then held fixed, so a request runs one explanation pass over the windows its pixel set meets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import segcam
from segcam import Explainer
from segcam.apps.viewer.layers import LayerMenu, on_path_shapes
from segcam.apps.viewer.session import RequestError, ViewerSession
from segcam.errors import InputFileError, OptionError
from segcam.layers import describe_layers
from segcam.methods import get_method

__all__ = ["NnUNetViewerSession", "nnunet_session"]

_BLOCK = re.compile(r"^(encoder|decoder)\.stages\.\d+$")


def _ras_affine(properties: Mapping[str, Any], dims: int) -> np.ndarray:
    """The voxel-to-world matrix (RAS, as NIfTI) of an array in SimpleITK's (k, j, i) order."""
    stuff = properties.get("sitk_stuff")
    affine = np.eye(4)
    if not stuff or dims != 3 or len(stuff["spacing"]) != 3:
        return affine
    direction = np.asarray(stuff["direction"], dtype=float).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    columns = lps_to_ras @ direction @ np.diag(np.asarray(stuff["spacing"], dtype=float))
    affine[:3, :3] = columns[:, ::-1]  # array axes (k, j, i)
    affine[:3, 3] = lps_to_ras @ np.asarray(stuff["origin"], dtype=float)
    return affine


@dataclass(eq=False)
class NnUNetViewerSession(ViewerSession):
    """A :class:`ViewerSession` whose explanations go through nnU-Net's whole inference.

    Args:
        nnunet_model: from :func:`segcam.nnunet.load`.
        case: a read case (:func:`segcam.nnunet.read_case`).
        original: the case's channels on the original grid (C, *S), for display.
        step_size, mirroring: nnU-Net's inference settings.
    """

    nnunet_model: Any = None
    case: Any = None
    original: np.ndarray | None = None
    step_size: float = 0.5
    mirroring: bool = True
    _predicted: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from segcam import nnunet

        model, case = self.nnunet_model, self.case
        assert model is not None and case is not None and self.original is not None
        self.spatial = tuple(int(s) for s in case.original_shape)
        prediction = nnunet.predict(model, case, step_size=self.step_size, mirroring=self.mirroring)
        heads = int(model.label_manager.num_segmentation_heads)
        self.classes = heads
        self._predicted = {c: prediction.predicted(model, c) for c in range(heads)}
        self.prediction = np.asarray(prediction.segmentation, dtype=np.uint8)
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
        self._arrays(original[0] if self.intensity_unit == "HU" else original.mean(0))
        from segcam.nnunet.model import block_name

        labels = self.layer_labels or {name: block_name(name) for name in layers}
        self._set_menu(LayerMenu(shapes, set(), layers, layers, labels, self.default_layer))

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
        from segcam import nnunet

        for method in methods:
            if not get_method(method).needs_gradient:
                raise RequestError(f"{method}: gradient-free methods are not available here")
        if isinstance(target, segcam.Predicted):  # nnU-Net's own set, computed once
            target = segcam.Mask(target.class_index, self._predicted[target.class_index])
        return list(
            nnunet.explain_methods(
                self.nnunet_model,
                self.case,
                target,
                layer,
                methods,
                step_size=self.step_size,
                mirroring=self.mirroring,
            ).items()
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
        if not np.isfinite(values).all() or (values != np.round(values)).any() or values.min() < 0:
            raise InputFileError(
                f"--ground-truth {ground_truth}: not labels (non-negative integers)"
            )
        truth = values.astype(np.uint8 if values.max() < 256 else np.int64)
    return NnUNetViewerSession(
        model=model.networks[0],
        inputs=case.data,
        nnunet_model=model,
        case=case,
        original=np.asarray(original),
        step_size=step_size,
        mirroring=mirroring,
        layers=layers or [],
        ground_truth=truth,
        title=f"{files[0]} with nnU-Net {model.configuration}",
    )
