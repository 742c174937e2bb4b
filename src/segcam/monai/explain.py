r"""Exact explanations of a MONAI bundle's prediction, on the original image's grid.

The bundle predicts an image through its own pipeline (:mod:`segcam.monai.pipeline`): the
preprocessing gives the network's input $\tilde X$ on the preprocessed grid, the inferer the
logits $y$ (sliding windows blended with constant or Gaussian weights), the postprocessing's
``Invertd`` brings the prediction back to the original image. The target score is the masked sum
of the logits brought back the same way, $T = \sum_v M(v)\, E(y^c)(v)$, with M on the original
grid; E is linear, so with $W = E^\top M$ (autograd through MONAI's own inverse)

$$
T = \sum_u W(u)\, y^c(u),
$$

and the explanation of the bundle is the explanation of the :class:`segcam.Weighted` target
$(c, W)$ through the bundle's inferer, exactly: :func:`segcam.explain_sliding_window_methods`
with the inferer's ROI, overlap, blending mode, sigma and batch (an image smaller than the ROI
is zero-padded and cropped back as MONAI does), or :func:`segcam.explain_methods` without
windows.

Maps (one convention, as for nnU-Net): the raw map is up-sampled to the preprocessed grid and
brought to the original grid by E (the bundle's own inverse resampling); ReLU and normalisation
follow on the original grid. ``Predicted(c)`` (and ``Region(c)`` without a mask) is the set of
voxels the bundle's own postprocessing labels c: the segmentation ``monai.bundle.run`` writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segcam.core import explain_methods as explain_whole
from segcam.errors import OptionError, SegCamWarning, TargetError
from segcam.explanation import Explanation, assemble
from segcam.kept import KEEP_BYTES
from segcam.layers import LayerSpec
from segcam.memory_format import MemoryFormat, check_memory_format
from segcam.methods import MethodOptions, resolve_methods
from segcam.monai.bundle import MonaiBundle
from segcam.monai.pipeline import (
    BundleCase,
    BundlePrediction,
    Export,
    export_of,
    iter_pipeline_names,
    network_device,
    network_input,
    predict,
    read_case,
)
from segcam.postprocess import Normalization, PostProcessing
from segcam.sliding import explain_sliding_window_methods
from segcam.targets import (
    ExportedSet,
    Predicted,
    Probability,
    Region,
    ResolvedTargets,
    TargetLike,
    Weighted,
    as_target_list,
    uses_logits,
)

__all__ = ["explain", "explain_and_predict", "explain_methods"]

CaseInput = str | Path | Mapping[str, Any] | BundleCase


def _out_channels(bundle: MonaiBundle, case: BundleCase) -> int:
    """K: the metadata's output channels, ``network_def``'s, else one window's forward."""
    if bundle.out_channels is not None:
        return bundle.out_channels
    window = bundle.sliding_window()
    roi = case.shape if window is None else _roi(window["roi_size"], case.shape)
    device, dtype = network_device(bundle)
    probe = torch.zeros((1, case.image.shape[0], *roi), dtype=dtype, device=device)
    with torch.no_grad():
        return int(bundle.network(probe).shape[1])


def _roi(roi: int | Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """MONAI's ``fall_back_tuple``: one size for every axis; a non-positive one, the image's."""
    sizes = [roi] * len(shape) if isinstance(roi, int) else list(roi)
    return tuple(int(r) if int(r) > 0 else int(s) for r, s in zip(sizes, shape, strict=True))


def _padding(roi: Sequence[int], shape: Sequence[int]) -> list[tuple[int, int]]:
    """MONAI's padding of an image smaller than the ROI: (before, after) per axis."""
    return [
        (max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2)
        for r, s in zip(roi, shape, strict=True)
    ]


def _pad(values: torch.Tensor, padding: Sequence[tuple[int, int]]) -> torch.Tensor:
    if not any(b or a for b, a in padding):
        return values
    flat = [v for before, after in reversed(padding) for v in (before, after)]
    return torch.nn.functional.pad(values, flat)


def _crop(
    values: torch.Tensor, padding: Sequence[tuple[int, int]], shape: Sequence[int]
) -> torch.Tensor:
    index = (slice(None),) * (values.ndim - len(shape)) + tuple(
        slice(before, before + s) for (before, _), s in zip(padding, shape, strict=True)
    )
    return values[index]


def _check_targets(targets: Sequence[TargetLike]) -> None:
    """Refuse, before any window runs, the targets that read probabilities or other values."""
    for target in targets:
        if isinstance(target, Probability):
            raise TargetError(
                f"{target!r}: a probability threshold is not defined through a bundle's "
                f"inverse; use Predicted (the bundle's own segmentation), a Mask or a Region"
            )
        if uses_logits(target) and not isinstance(target, Predicted | Region):
            raise TargetError(
                f"{target!r}: a target that reads the logits' values is not defined through a "
                f"bundle's inverse; use Predicted, Mask, Box, Pixel, AllPixels or Region"
            )


def _fixed_targets(
    targets: Sequence[TargetLike], prediction: BundlePrediction | None
) -> list[TargetLike]:
    """``Predicted(c)``/``Region(c)``: the sets of the bundle's own segmentation."""
    result: list[TargetLike] = []
    for target in targets:
        if isinstance(target, Predicted | Region) and getattr(target, "mask", None) is None:
            assert prediction is not None
            predicted = prediction.predicted(target.class_index)
            if isinstance(target, Region):
                target = Region(target.class_index, predicted)
            else:
                description = {**target.describe(), "source": "bundle postprocessing"}
                target = ExportedSet(target.class_index, predicted, description, repr(target))
        result.append(target)
    return result


@dataclass(eq=False)
class _Resolution:
    """The targets of one explanation on the original grid and their weights W = E^T M.

    Resolved from the bundle's prediction: given, or made from the blended logits once every
    window has run (the first :class:`_PipelineTarget` asking for its weights).
    """

    bundle: MonaiBundle
    case: BundleCase
    export: Export
    targets: Sequence[TargetLike]
    padding: Sequence[tuple[int, int]]
    dtype: torch.dtype
    device: torch.device
    prediction: BundlePrediction | None = None
    resolved: ResolvedTargets | None = None
    weights: torch.Tensor | None = None  # (T, *padded preprocessed grid)

    def resolve(self, prediction: BundlePrediction | None) -> None:
        """The sets on the original grid (Predicted: ``prediction``'s), then W, padded."""
        self.prediction = prediction
        fixed = _fixed_targets(self.targets, prediction)
        if prediction is not None:
            classes = int(prediction.logits.shape[0])
        else:
            classes = _out_channels(self.bundle, self.case)
        _check_classes(fixed, classes)
        grid = self.export.grid(self.case)
        reference = torch.zeros((), dtype=self.dtype, device=self.device)
        self.resolved = ResolvedTargets.resolve(fixed, reference.expand(1, classes, *grid))
        weights = torch.cat([w.to(self.device) for w in self.resolved.weights])  # (T, *grid)
        adjoint = self.export.adjoint(weights, self.case, self.dtype)  # (T, *S_preprocessed)
        self.weights = _pad(adjoint, self.padding)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """W of every target, resolving on the bundle's postprocessing of ``logits`` once."""
        if self.weights is None:
            cropped = _crop(logits[0].detach(), self.padding, self.case.shape)
            self.resolve(predict(self.bundle, self.case, cropped))
        assert self.weights is not None
        return self.weights


@dataclass(frozen=True, eq=False)
class _PipelineTarget:
    """Target ``index``'s weighted score on the windows' grid, its set read from the prediction.

    It reads the blended logits (``uses_logits``): the windows driver resolves it once every
    window's forward has run (kept for the backward passes) and hands it the blended logits.
    """

    class_index: int
    index: int
    resolution: _Resolution = field(repr=False)
    uses_logits = True

    def score_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """W of this target, (1, *S), in the logits' dtype."""
        weights = self.resolution.from_logits(logits)[self.index][None]
        return weights.to(device=logits.device, dtype=logits.dtype)

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:
        """Where W is not 0."""
        return self.score_weights(logits) != 0


def _check_classes(targets: Sequence[TargetLike], classes: int) -> None:
    """Each target's class among the network's (a single logit: classes 0 and 1)."""
    for target in targets:
        c = target.class_index
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < max(classes, 2):
            from segcam.errors import ClassIndexError

            raise ClassIndexError(
                f"{target!r}: class {c!r} is out of range: the bundle's network has {classes} "
                f"output channel(s)"
            )


def explain_and_predict(
    bundle: MonaiBundle,
    image: CaseInput,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    relu: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    prediction: BundlePrediction | None = None,
    keep_bytes: int = KEEP_BYTES,
    memory_format: MemoryFormat = "auto",
) -> tuple[dict[str, Explanation], BundlePrediction]:
    """:func:`explain_methods` and the bundle's prediction of the image (its segmentation).

    ``prediction``: the case's prediction made before (:func:`segcam.monai.predict`), for a case
    explained again and again (the viewer): neither the inferer nor the postprocessing runs again.
    ``keep_bytes``: without ``prediction``, targets that read it (``Predicted``) are resolved
    once every window has run; the prediction's forwards are kept for their backward passes
    within this budget (:class:`segcam.kept.KeptWindows`; 0: a prediction pass, then a forward
    per window met, one window group's graph at a time). ``memory_format``: the convolutions'
    memory layout in every forward (:mod:`segcam.memory_format`).
    """
    layout = check_memory_format(memory_format)
    chosen = resolve_methods(methods, method_options)
    for method, _ in chosen:
        method.require_sliding_window()  # gradient methods: the score is a weighted sum
    post = PostProcessing(relu, True, normalize)
    case = image if isinstance(image, BundleCase) else read_case(bundle, image)
    export = export_of(bundle, case)
    window = bundle.sliding_window()
    target_list = as_target_list(targets)
    _check_targets(target_list)
    if bundle.out_channels is not None:
        _check_classes(target_list, bundle.out_channels)
    device, dtype = network_device(bundle)
    inputs = network_input(bundle, case)
    roi = case.shape if window is None else _roi(window["roi_size"], case.shape)
    padding = _padding(roi, case.shape)
    resolution = _Resolution(bundle, case, export, target_list, padding, dtype, device)
    if prediction is not None or not any(uses_logits(t) for t in target_list):
        resolution.resolve(prediction)  # the sets are known: W = E^T M before any window runs
        assert resolution.weights is not None
        inner: list[TargetLike] = [
            Weighted(t.class_index, w) for t, w in zip(target_list, resolution.weights, strict=True)
        ]
    else:  # the sets read the bundle's prediction: resolved once every window has run
        inner = [_PipelineTarget(t.class_index, i, resolution) for i, t in enumerate(target_list)]
    with warnings.catch_warnings():  # an empty set is warned about once, on the original grid
        warnings.filterwarnings("ignore", message="empty pixel set", category=SegCamWarning)
        if window is None:
            inner_explanations = explain_whole(
                bundle.network, inputs, inner, layer, [m.name for m, _ in chosen],
                relu=False, upsample=True, method_options=method_options, progress=progress,
                memory_format=layout,
            )  # fmt: skip
        else:
            inner_explanations = explain_sliding_window_methods(
                bundle.network, _pad(inputs, padding), inner, layer, roi,
                [m.name for m, _ in chosen], overlap=window["overlap"], mode=window["mode"],
                sigma_scale=window["sigma_scale"], sw_batch_size=window["sw_batch_size"],
                relu=False, upsample=True, method_options=method_options, progress=progress,
                keep_bytes=keep_bytes, memory_format=layout,
            )  # fmt: skip
    first = next(iter(inner_explanations.values()))
    with torch.no_grad():
        logits = _crop(first.logits[0], padding, case.shape)
        if resolution.prediction is None:  # the bundle's postprocessing of the blended logits
            resolution.prediction = predict(bundle, case, logits)
        prediction = resolution.prediction
        resolved = resolution.resolved
        assert resolved is not None
        exported_logits = export(logits.to(dtype), case)[None]

        def back(maps: torch.Tensor) -> torch.Tensor:
            return export(_crop(maps[0], padding, case.shape), case)[None]

        raw = {
            method: {name: back(maps) for name, maps in explanation.layer_maps.items()}
            for method, explanation in inner_explanations.items()
        }
    info = {
        "monai_bundle": {
            "folder": str(bundle.folder),
            "preprocessing": list(iter_pipeline_names(bundle.preprocessing)),
            "postprocessing": list(iter_pipeline_names(bundle.postprocessing)),
            "inverse": list(export.operations),
            "preprocessed_shape": list(case.shape),
            "original_shape": list(export.grid(case)),
            "sliding_window": dict(window) if window else None,
            "padding": [list(p) for p in padding] if any(any(p) for p in padding) else None,
            "windows": first.info.get("sliding_window"),
        }
    }
    explanations = assemble(
        raw,
        {name: e.method_options for name, e in inner_explanations.items()},
        logits=exported_logits,
        pixel_sets=resolved.stacked,
        targets=list(resolved.targets),
        post=post,
        size=None,  # on the original grid already
        layer_shapes=first.layer_shapes,
        inputs=inputs,
        info=info,
    )
    return explanations, prediction


def explain_methods(
    bundle: MonaiBundle,
    image: CaseInput,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    relu: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_format: MemoryFormat = "auto",
) -> dict[str, Explanation]:
    """Several gradient methods from the same forward and backward passes (see :func:`explain`)."""
    return explain_and_predict(
        bundle, image, targets, layer, methods, relu=relu, normalize=normalize,
        method_options=method_options, progress=progress, memory_format=memory_format,
    )[0]  # fmt: skip


def explain(
    bundle: MonaiBundle,
    image: CaseInput,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    method: str = "seg-hires-grad-cam",
    *,
    relu: bool = True,
    normalize: Normalization | None = None,
    method_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_format: MemoryFormat = "auto",
) -> Explanation:
    r"""Explain a MONAI bundle's prediction of one image exactly, on the original image's grid.

    The score is the masked sum of the network's logits brought back to the original image by
    the bundle's own ``Invertd``: $y^c_M = \sum_{v \in M} E(y^c)(v)$ (see the module's docstring
    for the gradient, $W = E^\top M$, and the map convention).

    Args:
        bundle: from :func:`segcam.monai.load_bundle`.
        image: the image file the bundle's preprocessing reads (``LoadImaged``), the item it takes
            (``{"image": ...}``), or a case from :func:`segcam.monai.read_case`.
        targets: targets in the original image's voxels (the array order of MONAI's reader):
            ``Predicted(c)`` = the voxels the bundle's own postprocessing labels c, ``Mask``,
            ``Box``, ``Pixel``, ``AllPixels``, ``Region``, ``Weighted``.
        layer: the layer(s) to explain (module names of the bundle's network).
        method: a gradient method (default Seg-HiRes-Grad CAM).
        relu: keep the positive part (on the original grid).
        normalize: ``"max"`` or ``"minmax"`` per map, last.
        method_options: the method's options.
        progress: called with (groups of windows done, groups).
        memory_format: the convolutions' memory layout (:mod:`segcam.memory_format`).

    Raises:
        BundleError: the image cannot go through the bundle's pipeline, or the pipeline has a
            transform whose inverse is not linear (named).
        TargetError: a target that reads probabilities (not defined through the inverse).
        OptionError: a bad option or a gradient-free method.
    """
    if not isinstance(method, str):
        raise OptionError(f"method must be one method name (str); got {method!r}")
    return explain_methods(
        bundle, image, targets, layer, [method], relu=relu, normalize=normalize,
        method_options={method: method_options} if method_options else None, progress=progress,
        memory_format=memory_format,
    )[method]  # fmt: skip
