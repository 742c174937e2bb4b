"""The viewer on a MONAI bundle: one image, the bundle's segmentation, maps on the image's grid.

The page shows the image as the bundle's ``LoadImaged`` reads it (for NIfTI, the file's (i, j, k)
with its affine), so an upload of the image's own label file lines up and an export lies voxel
for voxel on the source. The bundle predicts the image once at start (its preprocessing, its
inferer, its postprocessing: the segmentation ``monai.bundle.run`` writes); every target
(predicted sets, boxes, pixels, painted or uploaded masks) is then explained by
:func:`segcam.monai.explain_methods` through the bundle's windows and its ``Invertd``: each new
pixel set runs the windows forward and back again (the windows it does not meet take no
backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam import Explainer, monai
from segcam.apps.specs import label_map
from segcam.apps.viewer.layers import LayerMenu
from segcam.apps.viewer.session import RequestError, ViewerSession
from segcam.errors import InputFileError, OptionError
from segcam.layers import describe_layers
from segcam.memory_format import MemoryFormat
from segcam.methods import get_method
from segcam.targets import ResolvedTargets

__all__ = ["BundleViewerSession", "bundle_session"]


@dataclass(eq=False)
class BundleViewerSession(ViewerSession):
    """A :class:`ViewerSession` whose explanations go through a MONAI bundle's pipeline.

    Args:
        bundle: from :func:`segcam.monai.load_bundle`.
        case: the image after the bundle's preprocessing (:func:`segcam.monai.read_case`).
        original: the image on its own grid (*S), as the bundle's reader gives it (display and
            read-out).
    """

    bundle: Any = None
    case: Any = None
    original: np.ndarray | None = None

    def __post_init__(self) -> None:
        bundle, case = self.bundle, self.case
        assert bundle is not None and case is not None and self.original is not None
        self._prediction = monai.predict(bundle, case)
        if self._prediction.multi_label:
            raise InputFileError(
                f"{bundle.folder}: the bundle's output is multi-label (overlapping channels): "
                f"the viewer shows one label map; explain it with segcam explain --bundle"
            )
        labels = self._prediction.labels
        self.spatial = tuple(int(s) for s in labels.shape)
        if tuple(self.original.shape) != self.spatial:
            raise InputFileError(
                f"the image's grid {tuple(self.original.shape)} is not the bundle's output grid "
                f"{self.spatial}"
            )
        self.classes = int(self._prediction.logits.shape[0])
        self.prediction = labels.cpu().numpy().astype(np.uint8)
        if not self.class_names:
            names = bundle.class_names
            self.class_names = list(names) or [f"class {c}" for c in range(max(self.classes, 2))]
        if len(self.class_names) != max(self.classes, 2):
            raise OptionError(f"{len(self.class_names)} class names for {self.classes} outputs")
        self.forward_seconds = float("nan")  # gradient-free methods are not offered here
        window = bundle.sliding_window()
        sizes = case.shape if window is None else window["roi_size"]
        sizes = [sizes] * len(case.shape) if isinstance(sizes, int) else sizes
        roi = tuple(
            int(r) if int(r) > 0 else int(s) for r, s in zip(sizes, case.shape, strict=True)
        )
        parameter = next(iter(bundle.network.parameters()))
        example = torch.zeros((1, int(case.image.shape[0]), *roi), dtype=parameter.dtype)
        table = describe_layers(bundle.network, example.to(parameter.device))
        if self.affine is None and case.original_affine is not None:
            self.affine = np.asarray(torch.as_tensor(case.original_affine, dtype=torch.float64))
        if not self.intensity_unit and _ct_window(bundle):
            self.intensity_unit = "HU"
        self._arrays(np.asarray(self.original, dtype=np.float32))
        self._set_menu(
            LayerMenu.build(
                table, roi, self.classes, self.layers, self.layer_labels, self.default_layer
            )
        )

    def info(self) -> dict[str, Any]:  # noqa: D102
        result = super().info()
        window = self.bundle.sliding_window()
        result["bundle"] = {
            "folder": str(self.bundle.folder),
            "sliding_window": dict(window) if window else None,
            "preprocessed_shape": list(self.case.shape),
        }
        result["methods"] = [m for m in result["methods"] if get_method(m["name"]).needs_gradient]
        return result

    def _explainer(self, layer: str) -> Explainer | None:
        return None  # every request runs the bundle's windows that meet its pixel set

    def _explain_missing(
        self, explainer: Explainer | None, layer: str, target: segcam.Target, methods: list[str]
    ) -> list[tuple[str, segcam.Explanation]]:
        for method in methods:
            if not get_method(method).needs_gradient:
                raise RequestError(f"{method}: gradient-free methods are not available here")
        c = int(target.class_index)
        if isinstance(target, segcam.Predicted):  # the bundle's own set, computed once
            pixel_set = self._prediction.predicted(c)
        else:
            stand_in = torch.zeros(()).expand(1, max(self.classes, c + 1), *self.spatial)
            pixel_set = ResolvedTargets.resolve([target], stand_in).pixel_sets[0][0]
        explanations, _ = monai.explain_and_predict(
            self.bundle, self.case, segcam.Mask(c, pixel_set), layer, methods, relu=False,
            prediction=self._prediction, memory_format=self.memory_format,
        )  # fmt: skip  # raw on the original grid: ReLU follows there
        return list(explanations.items())


def _ct_window(bundle: Any) -> bool:
    """Whether the bundle windows a CT (an intensity range starting below 0, in HU)."""
    from segcam.monai.pipeline import iter_transforms

    return any(
        type(t).__name__ == "ScaleIntensityRanged" and float(getattr(t.scaler, "a_min", 0)) < 0
        for t in iter_transforms(bundle.preprocessing)
    )


def _load(bundle: Any, path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An image as the bundle's ``LoadImaged`` reads it: (*S), channels averaged; its affine."""
    from segcam.monai.pipeline import read_original

    return read_original(bundle, path)


def bundle_session(
    folder: str | Path,
    image: str | Path,
    *,
    layers: list[str] | None = None,
    device: str = "cpu",
    ground_truth: str | Path | None = None,
    memory_format: MemoryFormat = "auto",
) -> BundleViewerSession:
    """A viewer session on a MONAI bundle folder and one image.

    ``ground_truth``: the image's label file, read by the bundle's own reader, so it lies on the
    same grid (outlined as the truth; a file of another grid is refused).
    """
    bundle = monai.load_bundle(folder, device=device)
    case = monai.read_case(bundle, image)
    original, affine = _load(bundle, image)
    truth = None
    if ground_truth is not None:
        try:
            values, truth_affine = _load(bundle, ground_truth)
        except Exception as error:  # MONAI's readers raise many types for unreadable files
            raise InputFileError(f"--ground-truth {ground_truth}: cannot read ({error})") from None
        if tuple(values.shape) != tuple(original.shape):
            raise InputFileError(
                f"--ground-truth {ground_truth}: shape {tuple(values.shape)}, but the image's is "
                f"{tuple(original.shape)}"
            )
        if (
            affine is not None
            and truth_affine is not None
            and not np.allclose(affine, truth_affine, rtol=1e-4, atol=1e-3)
        ):
            raise InputFileError(
                f"--ground-truth {ground_truth}: its affine differs from the image's (its voxels "
                f"lie elsewhere); give the label file of this image"
            )
        truth = label_map(values, f"--ground-truth {ground_truth}")
    return BundleViewerSession(
        model=bundle.network,
        inputs=case.image.as_tensor().float(),
        bundle=bundle,
        case=case,
        original=original,
        layers=layers or [],
        ground_truth=truth,
        title=f"{Path(image).name} with the bundle {Path(folder).name}",
        provenance={
            "source": str(Path(image).resolve()),
            "bundle": str(Path(folder).resolve()),
        },
        memory_format=memory_format,
    )
