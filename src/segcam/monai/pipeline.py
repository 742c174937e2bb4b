r"""A bundle's pipeline around its network: preprocessing, inferer, postprocessing and its inverse.

A bundle predicts an image as ``monai.bundle.run`` does: the preprocessing (load, orientation,
resampling, intensity) gives the network's input $\tilde X$ on the *preprocessed* grid; the
inferer gives logits $y$ there; the postprocessing (softmax, ``Invertd`` back to the original
image, argmax, writing) gives the segmentation the bundle writes.

``Invertd`` applies the inverse of the image's recorded spatial transforms (``Spacingd``'s
resampling, ``Orientationd``'s axis flips and permutations, crops, pads, resizes) to the
prediction. Every such inverse is a resampling: linear in the values. Applied to the **logits**
instead of the probabilities it is the export $E$, and the score of a target with pixel set M
on the original grid is

$$
y^c_M = \sum_{v} M(v)\, E(y^c)(v) = \sum_{u} (E^\top M)(u)\, y^c(u),
$$

a :class:`segcam.Weighted` target with $W = E^\top M$ on the preprocessed grid.
:class:`Export` runs MONAI's own inverse (the transforms' ``inverse``, as ``Invertd`` calls them,
but without its ``detach``) and takes $E^\top$ by autograd through it; transforms whose inverse
is not known to be a linear resampling are refused by name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcam.monai.bundle import BundleError, MonaiBundle

__all__ = [
    "IMAGE_KEY",
    "LINEAR_INVERSES",
    "PRED_KEY",
    "BundleCase",
    "BundlePrediction",
    "Export",
    "export_of",
    "iter_pipeline_names",
    "iter_transforms",
    "load_image",
    "network_device",
    "network_input",
    "predict",
    "preprocess_loaded",
    "read_case",
    "read_original",
    "run_inferer",
]

IMAGE_KEY = "image"  # the Model Zoo's keys (MONAI's CommonKeys): the input and the prediction
PRED_KEY = "pred"

# Recorded transforms whose inverse is a resampling, a crop or a zero pad: linear in the values.
LINEAR_INVERSES = frozenset({
    "Orientation", "Spacing", "SpatialResample", "ResampleToMatch", "Resize", "Zoom", "Rotate",
    "Rotate90", "Flip", "Affine", "SpatialPad", "BorderPad", "DivisiblePad", "Pad", "SpatialCrop",
    "CenterSpatialCrop", "CenterScaleCrop", "CropForeground", "ResizeWithPadOrCrop", "Crop",
    "Identity",
})  # fmt: skip
# Recorded transforms whose inverse leaves torch (NumPy): no gradient through them, and why.
OUTSIDE_TORCH = {
    "ToTensor": "its inverse converts the values to NumPy; EnsureTyped keeps them in torch",
    "ToTensord": "its inverse converts the values to NumPy; EnsureTyped keeps them in torch",
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _transforms(pipeline: Any) -> list[Any]:
    """A Compose's transforms, nested ones flattened, in the order they run."""
    if pipeline is None:
        return []
    inner = getattr(pipeline, "transforms", None)
    if type(pipeline).__name__ == "Compose" and isinstance(inner, Sequence):
        return [t for item in inner for t in _transforms(item)]
    if isinstance(pipeline, list | tuple):
        return [t for item in pipeline for t in _transforms(item)]
    return [pipeline]


def _keys(transform: Any) -> tuple[Any, ...]:
    keys = getattr(transform, "keys", ())
    return tuple(keys) if isinstance(keys, list | tuple) else (keys,)


@dataclass(eq=False)
class BundleCase:
    """One image after the bundle's preprocessing.

    Attributes:
        source: what was read (the image file, or the data given to the preprocessing).
        data: the preprocessing's output (the bundle's item: ``image`` and what it adds).
        image: the network's input (C, *S) on the preprocessed grid (a MONAI ``MetaTensor``
            carrying its transforms).
        original_shape: the grid of the original image, as the export brings values back to it.
        original_affine: that grid's affine (RAS, MONAI's convention), or None.
    """

    source: Any
    data: dict[Any, Any]
    image: Any
    original_shape: tuple[int, ...]
    original_affine: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The preprocessed grid."""
        return tuple(int(s) for s in self.image.shape[1:])


@dataclass(frozen=True)
class Export:
    """E: values on the preprocessed grid brought to the original one by the bundle's ``Invertd``.

    ``invertd`` is the postprocessing's ``Invertd`` of the prediction (None: the bundle writes
    its prediction on the preprocessed grid, and E is the identity).
    """

    invertd: Any = None
    operations: tuple[str, ...] = ()

    def _inverse(self, values: torch.Tensor, case: BundleCase) -> torch.Tensor:
        from monai.data.meta_tensor import MetaTensor
        from monai.transforms.utils import allow_missing_keys_mode, convert_applied_interp_mode

        invertd = self.invertd
        index = _keys(invertd).index(PRED_KEY)
        orig_key = invertd.orig_keys[index]
        source = case.data[orig_key]
        operations = source.applied_operations
        if invertd.nearest_interp[index]:
            operations = convert_applied_interp_mode(
                trans_info=operations, mode="nearest", align_corners=None
            )
        tracked = MetaTensor(
            values, meta=deepcopy(source.meta), applied_operations=deepcopy(operations)
        )
        with allow_missing_keys_mode(invertd.transform):
            inverted = invertd.transform.inverse({orig_key: tracked})[orig_key]
        result = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
        return torch.as_tensor(result)

    def grid(self, case: BundleCase) -> tuple[int, ...]:
        """The grid E brings values to: the original image's (the preprocessed one without)."""
        return case.original_shape if self.invertd is not None else case.shape

    def __call__(self, values: torch.Tensor, case: BundleCase) -> torch.Tensor:
        """E(values): (T, *S_preprocessed) -> (T, *S_original), differentiable."""
        if self.invertd is None:
            return values
        return self._inverse(values, case)

    def adjoint(self, weights: torch.Tensor, case: BundleCase, dtype: torch.dtype) -> torch.Tensor:
        r"""$E^\top$ weights: (T, *S_original) -> (T, *S_preprocessed), by autograd through E."""
        if self.invertd is None:
            return weights.to(dtype)
        probe = torch.zeros(
            (weights.shape[0], *case.shape), dtype=dtype, device=weights.device, requires_grad=True
        )
        with torch.enable_grad():
            exported = self._inverse(probe, case)
            if tuple(exported.shape[1:]) != tuple(weights.shape[1:]):
                raise BundleError(
                    f"the bundle's Invertd gives a grid of {tuple(exported.shape[1:])}, not the "
                    f"original image's {tuple(weights.shape[1:])}"
                )
            if not exported.requires_grad:  # an inverse that leaves autograd: not differentiable
                raise BundleError(
                    f"the bundle's Invertd inverts {', '.join(self.operations)} outside torch "
                    f"(through NumPy, as a spline resampling, mode 3, does): segcam takes the "
                    f"gradient through the inverse; use a bilinear or nearest mode"
                )
            (gradient,) = torch.autograd.grad((exported * weights.to(exported.dtype)).sum(), probe)
        return gradient.detach()


def _export(bundle: MonaiBundle, data: Mapping[Any, Any], image: Any) -> Export:
    """The postprocessing's ``Invertd`` of the prediction, its recorded transforms checked."""
    inverts = [
        t for t in _transforms(bundle.postprocessing)
        if type(t).__name__ == "Invertd" and PRED_KEY in _keys(t)
    ]  # fmt: skip
    if not inverts:
        return Export()
    if len(inverts) > 1:
        raise BundleError(f"{bundle.folder}: the postprocessing inverts {PRED_KEY!r} twice")
    invertd = inverts[0]
    orig_key = invertd.orig_keys[_keys(invertd).index(PRED_KEY)]
    if orig_key not in data or not hasattr(data[orig_key], "applied_operations"):
        raise BundleError(
            f"{bundle.folder}: the postprocessing's Invertd inverts the transforms of "
            f"orig_keys {orig_key!r}, which the preprocessing does not give (it gives "
            f"{', '.join(map(repr, data))})"
        )
    if callable(invertd.post_func[_keys(invertd).index(PRED_KEY)]):
        raise BundleError(
            f"{bundle.folder}: the postprocessing's Invertd applies a post_func to the "
            f"prediction; segcam brings logits back by the inverse alone"
        )
    operations = tuple(str(op.get("class", "?")) for op in image.applied_operations)
    outside = [name for name in operations if name in OUTSIDE_TORCH]
    if outside:
        raise BundleError(
            f"{bundle.folder}: the preprocessing applies {outside[0]}: "
            f"{OUTSIDE_TORCH[outside[0]]}, and segcam takes the gradient through the inverse"
        )
    refused = [name for name in operations if name not in LINEAR_INVERSES]
    if refused:
        raise BundleError(
            f"{bundle.folder}: the preprocessing applies {', '.join(refused)}, whose inverse "
            f"segcam does not know to be linear; the explanation through Invertd would not be "
            f"exact (supported: {', '.join(sorted(LINEAR_INVERSES))})"
        )
    return Export(invertd, operations)


def load_image(bundle: MonaiBundle, path: str | Path) -> Any:
    """The image as the preprocessing's ``LoadImaged`` gives it (a MONAI ``MetaTensor``).

    Raises:
        BundleError: the preprocessing has no ``LoadImaged``, or it cannot read the file.
    """
    from monai.transforms.utils import allow_missing_keys_mode

    loaders = [t for t in _transforms(bundle.preprocessing) if type(t).__name__ == "LoadImaged"]
    if not loaders:
        raise BundleError(f"{bundle.folder}: the preprocessing has no LoadImaged")
    try:
        with allow_missing_keys_mode(loaders[0]):
            return loaders[0]({IMAGE_KEY: str(path)})[IMAGE_KEY]
    except Exception as error:  # MONAI's readers raise many types
        raise BundleError(
            f"{path}: the bundle's reader cannot read it ({_first_line(error)})"
        ) from None


def preprocess_loaded(bundle: MonaiBundle, loaded: Any) -> BundleCase:
    """The preprocessing after ``LoadImaged`` on an image already loaded.

    Its values may have changed (a perturbed image), its metadata is the loaded one's: the case
    :func:`read_case` makes from the file, for other values.
    """
    from monai.transforms.transform import apply_transform

    steps = _transforms(bundle.preprocessing)
    first = next(i for i, t in enumerate(steps) if type(t).__name__ == "LoadImaged")
    data: dict[Any, Any] = {IMAGE_KEY: loaded}
    for transform in steps[first + 1 :]:
        data = dict(apply_transform(transform, data))
    image = data[IMAGE_KEY]
    shape = tuple(int(v) for v in torch.as_tensor(loaded.meta["spatial_shape"]).flatten())
    return BundleCase(loaded, data, image, shape, loaded.meta.get("original_affine"))


def read_case(bundle: MonaiBundle, image: str | Path | Mapping[str, Any]) -> BundleCase:
    """Run the bundle's preprocessing on an image file (or on the item it takes).

    Raises:
        BundleError: no preprocessing, or the preprocessing fails on the image (its reason).
    """
    if bundle.preprocessing is None:
        raise BundleError(f"{bundle.folder}: the config has no preprocessing")
    item = dict(image) if isinstance(image, Mapping) else {IMAGE_KEY: str(image)}
    try:
        data = dict(bundle.preprocessing(item))
    except Exception as error:  # MONAI wraps the failing transform's error
        cause: BaseException = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = _first_line(cause)
        source = str(item.get(IMAGE_KEY, ""))
        if "DICOM" in reason and not source.lower().endswith(".dcm") and Path(source).is_file():
            reason = (
                f"MONAI has no reader for {Path(source).name} here (for NRRD and MetaImage it "
                f"needs ITK: pip install itk)"
            )
        raise BundleError(
            f"{item.get(IMAGE_KEY, item)}: the bundle's preprocessing fails: {reason}"
        ) from None
    tensor = data.get(IMAGE_KEY)
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 3:
        raise BundleError(
            f"{bundle.folder}: the preprocessing does not give an {IMAGE_KEY!r} tensor (C, *S)"
        )
    meta = getattr(tensor, "meta", {}) or {}
    shape = meta.get("spatial_shape")
    original = (
        tuple(int(s) for s in torch.as_tensor(shape).flatten().tolist())
        if shape is not None
        else tuple(tensor.shape[1:])
    )
    return BundleCase(image, data, tensor, original, meta.get("original_affine"))


@dataclass(eq=False)
class BundlePrediction:
    """The bundle's prediction of a case.

    Attributes:
        logits: the inferer's logits (K, *S) on the preprocessed grid.
        output: the postprocessing's prediction (without writing), on the original grid as the
            bundle writes it: (1, *S) labels or (K, *S) one channel per class.
        export: E, for the logits and the maps.
    """

    logits: torch.Tensor
    output: torch.Tensor
    export: Export = field(default_factory=Export)

    @property
    def multi_label(self) -> bool:
        """Whether the output has a channel per class whose sets overlap (sigmoid heads)."""
        output = self.output
        if output.shape[0] == 1:
            return False
        return bool(((output > 0.5).sum(0) != 1).any())

    def predicted(self, class_index: int) -> torch.Tensor:
        """The voxels the bundle's output gives class c.

        A single-logit network (sigmoid, one channel): its 0/1 output is class 1 (segcam's
        convention: class 0 is its negation). Labels (one channel of K > 1 classes): labels == c.
        A channel per class (one-hot or multi-label): channel c > 0.5.
        """
        output = self.output
        if output.shape[0] == 1 and int(self.logits.shape[0]) == 1:
            positive = output[0] > 0.5
            return positive if class_index == 1 else ~positive
        if output.shape[0] == 1:
            return output[0].round().long() == class_index
        return output[class_index] > 0.5

    @property
    def labels(self) -> torch.Tensor:
        """The segmentation as labels (*S): one-hot channels as their index, a sigmoid's 0/1.

        Raises:
            BundleError: a multi-label output (overlapping channels) has no label map.
        """
        output = self.output
        if output.shape[0] == 1:
            return (output[0] > 0.5).long() if int(self.logits.shape[0]) == 1 else (
                output[0].round().long())  # fmt: skip
        if self.multi_label:
            raise BundleError(
                "the bundle's output is multi-label (a channel per class, overlapping or empty "
                "at some voxels): it has no label map; its channels are the classes' sets"
            )
        return output.argmax(0)


def _postprocess(bundle: MonaiBundle, case: BundleCase, logits: torch.Tensor) -> torch.Tensor:
    """The postprocessing on the logits, writers (``Save*``) left out: its ``pred``."""
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.transform import apply_transform

    item = dict(case.data)
    image = case.image
    item[PRED_KEY] = MetaTensor(
        logits, meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations)
    )
    for transform in _transforms(bundle.postprocessing):
        if type(transform).__name__.startswith("Save"):
            continue
        try:
            item = dict(apply_transform(transform, item))
        except Exception as error:  # MONAI wraps the failing transform's error
            cause: BaseException = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise BundleError(
                f"{bundle.folder}: the postprocessing's {type(transform).__name__} fails: "
                f"{_first_line(cause)}"
            ) from None
    output = item[PRED_KEY]
    result = output.as_tensor() if isinstance(output, MetaTensor) else torch.as_tensor(output)
    return result.detach()


def network_device(bundle: MonaiBundle) -> tuple[torch.device, torch.dtype]:
    """Where the bundle's network runs and in which float type (its parameters')."""
    parameter = next(iter(bundle.network.parameters()), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def network_input(bundle: MonaiBundle, case: BundleCase) -> torch.Tensor:
    """The case's image as the network takes it: (1, C, *S), on its device, in its dtype."""
    device, dtype = network_device(bundle)
    return torch.as_tensor(case.image.as_tensor())[None].to(device=device, dtype=dtype)


def run_inferer(bundle: MonaiBundle, case: BundleCase) -> torch.Tensor:
    """The bundle's own inferer on the case, without gradients: logits (K, *S)."""
    inputs = network_input(bundle, case)
    with torch.no_grad():
        if bundle.inferer is None:
            out = bundle.network(inputs)
        else:
            out = bundle.inferer(inputs, bundle.network)
    if not isinstance(out, torch.Tensor):
        raise BundleError(
            f"{bundle.folder}: the network returns a {type(out).__name__}, not a logits tensor"
        )
    logits = out.as_tensor() if hasattr(out, "as_tensor") else out
    return logits[0].detach()


def export_of(bundle: MonaiBundle, case: BundleCase) -> Export:
    """E of the case: the postprocessing's ``Invertd`` (the identity without one), checked."""
    return _export(bundle, case.data, case.image)


def predict(
    bundle: MonaiBundle, case: BundleCase, logits: torch.Tensor | None = None
) -> BundlePrediction:
    """The bundle's prediction: its inferer (or ``logits`` given), then its postprocessing.

    Raises:
        BundleError: the postprocessing fails, or its output is not on E's grid.
    """
    export = export_of(bundle, case)
    logits = run_inferer(bundle, case) if logits is None else logits.detach()
    output = _postprocess(bundle, case, logits)
    expected = export.grid(case)
    if tuple(output.shape[1:]) != tuple(expected):
        raise BundleError(
            f"{bundle.folder}: the postprocessing's prediction lies on a grid of "
            f"{tuple(output.shape[1:])}, not on {tuple(expected)}: a spatial step other than "
            f"Invertd, which segcam does not follow"
        )
    return BundlePrediction(logits, output, export)


def iter_transforms(pipeline: Any) -> Iterator[Any]:
    """A pipeline's transforms, nested ``Compose`` opened, in the order they run."""
    yield from _transforms(pipeline)


def iter_pipeline_names(pipeline: Any) -> Iterator[str]:
    """The class names of a pipeline's transforms, in order (for the manifest)."""
    for transform in _transforms(pipeline):
        yield type(transform).__name__


def read_original(bundle: MonaiBundle, path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A file as the bundle's ``LoadImaged`` reads it, on its own grid, and that grid's affine.

    The array is (*S), channels averaged; the affine is MONAI's (RAS), or None where the reader
    gives none. The grid the export brings maps to (the image itself, a label file beside it).

    Raises:
        BundleError: the preprocessing has no ``LoadImaged``, or it cannot read the file.
    """
    loaded = load_image(bundle, path)
    array = np.asarray(torch.as_tensor(loaded).detach().cpu(), dtype=np.float32)
    meta = getattr(loaded, "meta", {}) or {}
    channel = meta.get("original_channel_dim", "no_channel")
    if isinstance(channel, torch.Tensor):
        channel = int(channel)
    if isinstance(channel, int | np.integer) and array.ndim >= 3:
        array = array.mean(axis=int(channel))
    affine = meta.get("original_affine", meta.get("affine"))
    matrix = None if affine is None else np.asarray(torch.as_tensor(affine), dtype=np.float64)
    return np.ascontiguousarray(array), matrix
