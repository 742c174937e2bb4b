"""The viewer's state and every request it answers, validated; no web framework here.

Arrays travel as base64 of little-endian bytes (float32 maps, uint8 images and masks), row-major,
with their shape alongside. A 3D input is viewed one slice at a time along ``axis`` (0, 1 or 2 of
its spatial axes, in stored voxel order); a slice keeps the order of the two remaining axes.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import segcam
from segcam.errors import (
    InputError,
    LayerNotOnPathError,
    MethodNotSupportedError,
    OptionError,
    SegCamError,
)
from segcam.explainer import Explainer
from segcam.methods import REGISTRY, get_method
from segcam.recording import check_model_inputs, describe_layers, run_model, select_logits
from segcam.sliding import blended_logits, explain_sliding_window_methods
from segcam.viz import grey, overlay

__all__ = ["DEFAULT_METHODS", "RequestError", "ViewerSession"]

DEFAULT_METHODS = ("seg-grad-cam", "seg-hires-grad-cam")
AXIS_NAMES = {0: "sagittal (axis 0)", 1: "coronal (axis 1)", 2: "axial (axis 2)"}
MAX_EXPLAINERS = 3  # kept forwards (one per recently used layer)


class RequestError(SegCamError, ValueError):
    """A request the viewer refuses; its message is shown in the page (HTTP 400)."""


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _int(payload: Mapping[str, Any], key: str, low: int, high: int, what: str) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what} must be an integer; got {value!r}")
    if not low <= value < high:
        raise RequestError(f"{what} {value} is out of range [0, {high})")
    return value


def _index_list(value: Any, sizes: Sequence[int], what: str, *, end: bool = False) -> list[int]:
    if not isinstance(value, list) or len(value) != len(sizes):
        raise RequestError(f"{what} must be a list of {len(sizes)} integers; got {value!r}")
    result = []
    for axis, (item, size) in enumerate(zip(value, sizes, strict=True)):
        if isinstance(item, bool) or not isinstance(item, int):
            raise RequestError(f"{what}[{axis}] must be an integer; got {item!r}")
        if not (0 <= item <= size if end else 0 <= item < size):
            raise RequestError(
                f"{what}[{axis}] = {item} is outside the image (axis {axis} has {size} pixels)"
            )
        result.append(item)
    return result


_PLUMBING = re.compile(
    r"(Norm|Dropout|ReLU|ELU|GELU|SiLU|Sigmoid|Softmax|Tanh|Identity|PReLU|Mish|Hardswish"
    r"|Flatten|Pad)\w*$"
)


def _plumbing(type_name: str) -> bool:
    """Norm, dropout, activation and identity modules: they add no block of their own."""
    return bool(_PLUMBING.search(type_name))


def _describe_key(key: Any) -> dict[str, Any]:
    """A JSON description of a target key (kind, class, and its box, pixel or mask size)."""
    kind, c, *rest = key
    described: dict[str, Any] = {"kind": kind, "class_index": int(c)}
    if kind == "box":
        described["box"] = [list(pair) for pair in rest[0]]
    elif kind == "pixel":
        described["index"] = list(rest[0])
    return described


def _description(metadata: Mapping[str, Any]) -> str:
    """NIfTI's 80-character description: method, class, layer, target kind."""
    text = (
        f"segcam {metadata['method']} class={metadata['class']} layer={metadata['layer']} "
        f"target={metadata['target']['kind']}"
    )
    return text[:79]


def _png_with_colour_bar(display: np.ndarray, heat: np.ndarray) -> bytes:
    """The overlay with a colour bar on its right, from 0 to the map's maximum."""
    from PIL import Image, ImageDraw

    picture = overlay(display, heat)
    height = picture.shape[0]
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(12, axis=1)
    bar = overlay(np.zeros_like(ramp), ramp, alpha=1.0)
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    label = np.full((height, 64, 3), 255, dtype=np.uint8)
    image = Image.fromarray(np.concatenate([picture, gap, bar, label], axis=1))
    draw = ImageDraw.Draw(image)
    left = picture.shape[1] + 4 + 12 + 2
    draw.text((left, 0), f"{float(max(heat.max(), 0)):.3g}", fill=(0, 0, 0))
    draw.text((left, max(height - 12, 0)), "0", fill=(0, 0, 0))
    stream = io.BytesIO()
    image.save(stream, format="PNG")
    return stream.getvalue()


@dataclass
class ViewerSession:
    """One input and one model, explained on request.

    Args:
        model: the segmentation network (eval mode).
        inputs: the model's input for one sample, (C, *S) (after intensity processing).
        display: what the page shows, (*S) in [0, 1]; by default the input's channel mean,
            min-max scaled.
        class_names: one name per output class (default ``class 0``, ...).
        layers: the layers offered (default: every module on the path whose output has the
            input's rank, deepest-first order kept as in the model).
        default_layer: the layer selected at start (default: the middle of ``layers``).
        affine: voxel-to-world matrix for NIfTI export (default identity).
        output: how to find the logits (as for :func:`segcam.explain`).
        layer_labels: short readable names shown beside layer names (e.g. ``bottleneck``).
    """

    model: nn.Module
    inputs: torch.Tensor
    display: np.ndarray | None = None
    class_names: Sequence[str] = ()
    layers: Sequence[str] = ()
    default_layer: str | None = None
    affine: np.ndarray | None = None
    output: Any = None
    title: str = "segcam"
    max_upload_bytes: int = 16 * 2**20
    sliding_window: Mapping[str, Any] | None = None
    layer_labels: Mapping[str, str] = field(default_factory=dict)
    _explainers: OrderedDict[str, Explainer] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _uploaded: np.ndarray | None = field(default=None, repr=False)
    _cache: dict[Any, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim not in (3, 4):
            raise InputError(
                f"inputs must be (C, H, W) or (C, D, H, W); got {tuple(self.inputs.shape)}"
            )
        self.spatial = tuple(int(s) for s in self.inputs.shape[1:])
        example = self.inputs[None]
        if self.sliding_window:  # the model may not take the whole input: describe a window
            logits = blended_logits(self.model, example, output=self.output, **self.sliding_window)
            roi = self.sliding_window["roi_size"]
            roi = [roi] * len(self.spatial) if isinstance(roi, int) else list(roi)
            example = example[(slice(None), slice(None), *(slice(0, r) for r in roi))]
        else:
            with torch.no_grad():
                check_model_inputs(self.model, example)  # rank and channels, named
                logits = select_logits(
                    run_model(self.model, example), self.output, self.inputs.ndim + 1
                )
        self.classes = int(logits.shape[1])
        self.prediction = (
            (logits.argmax(1)[0] if self.classes > 1 else (logits[:, 0] > 0).long()[0])
            .numpy()
            .astype(np.uint8)
        )
        if not self.class_names:
            self.class_names = [f"class {c}" for c in range(max(self.classes, 2))]
        if len(self.class_names) != max(self.classes, 2):
            raise OptionError(
                f"{len(self.class_names)} class names for a model with {self.classes} classes"
            )
        if self.display is None:
            self.display = grey(self.inputs.float().mean(0).numpy())
        self.display = np.asarray(self.display, dtype=np.float32)
        table = describe_layers(self.model, example)
        self._layer_shapes = {
            info.name: info.shape
            for info in table
            if info.on_path and info.shape is not None and info.calls == 1 and info.name
        }
        if not self.layers:
            rank = self.inputs.ndim + 1
            kinds = {info.name: info.type_name for info in table}
            self.layers = [
                n
                for n, s in self._layer_shapes.items()
                if len(s) == rank and s[1] > self.classes and not _plumbing(kinds.get(n, ""))
            ] or list(self._layer_shapes)
        unknown = [name for name in self.layers if name not in self._layer_shapes]
        if unknown:
            raise LayerNotOnPathError(f"layers not on the model's path (or unknown): {unknown}")
        self.layers = list(self.layers)
        if self.default_layer is None:
            self.default_layer = self.layers[len(self.layers) // 2]
        if self.default_layer not in self.layers:
            raise OptionError(f"default layer {self.default_layer!r} is not among the layers")

    # ------------------------------------------------------------------ info and slices

    def info(self) -> dict[str, Any]:
        """Everything the page needs to build its controls."""
        return {
            "title": self.title,
            "dims": len(self.spatial),
            "shape": list(self.spatial),
            "classes": list(self.class_names),
            "layers": [
                {
                    "name": name,
                    "shape": list(self._layer_shapes[name]),
                    "label": self.layer_labels.get(name, ""),
                }
                for name in self.layers
            ],
            "default_layer": self.default_layer,
            "methods": [
                {"name": name, "summary": method.summary} for name, method in REGISTRY.items()
            ],
            "default_methods": list(DEFAULT_METHODS),
            "axes": [AXIS_NAMES[a] for a in range(len(self.spatial))]
            if len(self.spatial) == 3
            else [],
            "max_upload_bytes": self.max_upload_bytes,
            "sliding_window": dict(self.sliding_window) if self.sliding_window else None,
        }

    def _view(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        if len(self.spatial) == 2:
            return -1, -1
        axis = _int(payload, "axis", 0, 3, "axis")
        index = _int(payload, "index", 0, self.spatial[axis], f"slice index on axis {axis}")
        return axis, index

    def _cut(self, array: np.ndarray, view: tuple[int, int]) -> np.ndarray:
        axis, index = view
        return array if axis < 0 else np.take(array, index, axis=axis)

    def slice(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The displayed image and the prediction on one slice (the whole image in 2D)."""
        view = self._view(payload)
        assert self.display is not None
        image = self._cut(self.display, view)
        return {
            "shape": list(image.shape),
            "image": _b64((np.clip(image, 0, 1) * 255).round().astype(np.uint8)),
            "prediction": _b64(self._cut(self.prediction, view)),
        }

    # ------------------------------------------------------------------ targets

    def upload_mask(self, data: bytes) -> dict[str, Any]:
        """Keep an uploaded mask (.npy or PNG of the input's spatial shape) as a pixel set."""
        if len(data) > self.max_upload_bytes:
            raise RequestError(
                f"upload of {len(data)} bytes is over the limit of {self.max_upload_bytes}"
            )
        if data.startswith(b"\x93NUMPY"):
            stream = io.BytesIO(data)
            try:  # the header first: shape and dtype are checked before any allocation
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, _ = read_header(stream)
            except (ValueError, OSError, SyntaxError) as error:
                raise RequestError(f"cannot read the .npy upload: {error}") from None
            self._check_upload_shape(tuple(shape))
            try:
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError) as error:
                raise RequestError(f"cannot read the .npy upload: {error}") from None
        elif data.startswith(b"\x89PNG\r\n\x1a\n"):
            try:
                from PIL import Image

                with warnings.catch_warnings():  # its size is checked right below
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(data))  # reads the header only
                width, height = image.size
            except Exception as error:  # Pillow raises many types for damaged files
                raise RequestError(f"cannot read the PNG upload: {error}") from None
            self._check_upload_shape((height, width))  # before decoding (no pixel bombs)
            try:
                array = np.asarray(image.convert("L"))
            except Exception as error:  # Pillow raises many types for damaged files
                raise RequestError(f"cannot read the PNG upload: {error}") from None
        else:
            raise RequestError("the upload must be a .npy array or a PNG image")
        if tuple(array.shape) != self.spatial:
            raise RequestError(
                f"the uploaded mask has shape {tuple(array.shape)}; the image has {self.spatial}"
            )
        if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
            raise RequestError(f"the uploaded mask has dtype {array.dtype}, not numbers")
        self._uploaded = np.asarray(array) != 0
        return {"pixels": int(self._uploaded.sum())}

    def _check_upload_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.spatial:
            raise RequestError(
                f"the uploaded mask has shape {tuple(shape)}; the image has {self.spatial}"
            )

    def _target(self, payload: Mapping[str, Any]) -> tuple[segcam.Target, Any]:
        """The target of a request and a hashable key of it."""
        c = _int(payload, "class", 0, max(self.classes, 2), "class")
        spec = payload.get("target") or {"kind": "predicted"}
        if not isinstance(spec, Mapping):
            raise RequestError(f"target must be an object; got {spec!r}")
        kind = spec.get("kind")
        if kind == "predicted":
            return segcam.Predicted(c), ("predicted", c)
        if kind == "pixel":
            index = _index_list(spec.get("index"), self.spatial, "pixel index")
            return segcam.Pixel(c, tuple(index)), ("pixel", c, tuple(index))
        if kind == "box":
            start = _index_list(spec.get("start"), self.spatial, "box start")
            stop = _index_list(spec.get("stop"), self.spatial, "box stop", end=True)
            if any(a >= b for a, b in zip(start, stop, strict=True)):
                raise RequestError(f"the box is empty: start {start}, stop {stop}")
            box = [(a, b) for a, b in zip(start, stop, strict=True)]
            return segcam.Box(c, box), ("box", c, tuple(box))
        if kind == "mask":
            mask = self._mask(spec)
            return segcam.Mask(c, torch.from_numpy(mask)), ("mask", c, mask.tobytes())
        if kind == "uploaded":
            if self._uploaded is None:
                raise RequestError("no mask was uploaded")
            return segcam.Mask(c, torch.from_numpy(self._uploaded)), (
                "uploaded",
                c,
                id(self._uploaded),
            )
        raise RequestError(f"unknown target kind {kind!r}: predicted, pixel, box, mask or uploaded")

    def _mask(self, spec: Mapping[str, Any]) -> np.ndarray:
        """A painted mask: the whole image (2D) or one slice (3D), as base64 bytes 0/1."""
        view = self._view(spec) if len(self.spatial) == 3 else (-1, -1)
        plane = self._cut(np.zeros(self.spatial, dtype=np.uint8), view).shape
        try:
            raw = base64.b64decode(str(spec.get("data", "")), validate=True)
        except ValueError:
            raise RequestError("the painted mask is not valid base64") from None
        if len(raw) != int(np.prod(plane)):
            raise RequestError(
                f"the painted mask has {len(raw)} pixels; the slice has {int(np.prod(plane))}"
            )
        painted = np.frombuffer(raw, dtype=np.uint8).reshape(plane) != 0
        mask = np.zeros(self.spatial, dtype=bool)
        if view[0] < 0:
            mask[...] = painted
        else:
            where: list[Any] = [slice(None)] * 3
            where[view[0]] = view[1]
            mask[tuple(where)] = painted
        return mask

    # ------------------------------------------------------------------ explain

    def _explain_missing(
        self, explainer: Explainer | None, layer: str, target: segcam.Target, methods: list[str]
    ) -> list[tuple[str, segcam.Explanation]]:
        if explainer is not None:
            return list(explainer.explain_methods([target], methods).items())
        assert self.sliding_window is not None
        for method in methods:
            try:
                get_method(method).require_sliding_window()
            except MethodNotSupportedError as error:
                raise RequestError(str(error)) from None
        return list(
            explain_sliding_window_methods(
                self.model,
                self.inputs[None],
                target,
                layer,
                methods=methods,
                output=self.output,
                **self.sliding_window,
            ).items()
        )

    def _explainer(self, layer: str) -> Explainer | None:
        if self.sliding_window:
            return None  # every request runs the windows that meet its pixel set
        if layer in self._explainers:
            self._explainers.move_to_end(layer)
            return self._explainers[layer]
        explainer = Explainer(self.model, layer, relu=True, upsample=True, output=self.output)
        explainer.forward(self.inputs[None])
        self._explainers[layer] = explainer
        while len(self._explainers) > MAX_EXPLAINERS:
            _, old = self._explainers.popitem(last=False)
            old.close()
        return explainer

    def _request(self, payload: Mapping[str, Any]) -> tuple[str, list[str], segcam.Target, Any]:
        """The layer, methods and target of a request, checked."""
        layer = payload.get("layer", self.default_layer)
        if not isinstance(layer, str) or layer not in self.layers:
            raise RequestError(f"unknown layer {layer!r}; choose one of the listed layers")
        methods = payload.get("methods", list(DEFAULT_METHODS))
        if not isinstance(methods, list) or not 1 <= len(methods) <= 4:
            raise RequestError("methods must be a list of 1 to 4 method names")
        for method in methods:
            if not isinstance(method, str) or method not in REGISTRY:
                raise RequestError(f"unknown method {method!r}; registered: {', '.join(REGISTRY)}")
        target, key = self._target(payload)
        return layer, methods, target, key

    def _maps(
        self, layer: str, methods: list[str], target: segcam.Target, key: Any
    ) -> dict[str, dict[str, np.ndarray]]:
        """The maps of a target for each method (cached for the latest layer and target)."""
        with self._lock:
            explainer = self._explainer(layer)
            self._cache = {k: v for k, v in self._cache.items() if k[:2] == (layer, key)}
            missing = [m for m in dict.fromkeys(methods) if (layer, key, m) not in self._cache]
            if missing:
                for method, expl in self._explain_missing(explainer, layer, target, missing):
                    self._cache[layer, key, method] = {
                        "map": expl.maps[0, 0].float().cpu().numpy(),
                        "pixel_set": expl.pixel_sets[0, 0].cpu().numpy(),
                    }
            return {method: self._cache[layer, key, method] for method in methods}

    def explain(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Maps of the requested target for each requested method, cut to the current view.

        The maps are ReLU'd and up-sampled to the input grid, not normalised (the page scales
        them for display); ``max`` is over the whole map, so the colour bar does not change when
        the slice does.
        """
        started = time.perf_counter()
        layer, methods, target, key = self._request(payload)
        view = self._view(payload)
        maps = self._maps(layer, methods, target, key)
        pixel_set = next(iter(maps.values()))["pixel_set"]
        cut_set = self._cut(pixel_set, view)
        result = {
            "layer": layer,
            "shape": list(cut_set.shape),
            "pixels": int(pixel_set.sum()),
            "pixel_set": _b64(cut_set.astype(np.uint8)),
            "maps": [
                {
                    "method": method,
                    "data": _b64(self._cut(value["map"], view).astype("<f4")),
                    "max": float(value["map"].max()),
                }
                for method, value in maps.items()
            ],
        }
        result["milliseconds"] = round((time.perf_counter() - started) * 1e3, 1)
        return result

    # ------------------------------------------------------------------ export

    def export(self, payload: Mapping[str, Any]) -> tuple[bytes, str, str]:
        """A file of the request's map: (content, media type, file name).

        The request names everything (``format``, ``method``, ``class``, ``target``,
        ``layer``), so each tab exports what it shows. Formats: ``nifti`` (3D, ``.nii.gz`` with
        the affine and a description), ``json`` (the sidecar: class, layer, target, method),
        ``png`` (2D, the overlay with a colour bar), ``npz`` (map, pixel set, metadata).
        """
        kind = payload.get("format")
        method = payload.get("method")
        if not isinstance(method, str) or method not in REGISTRY:
            raise RequestError(f"unknown method {method!r}; registered: {', '.join(REGISTRY)}")
        layer, _, target, key = self._request({**payload, "methods": [method]})
        value = self._maps(layer, [method], target, key)[method]
        heat, pixel_set = value["map"], value["pixel_set"]
        c = int(target.class_index)
        metadata = {
            "format": "segcam.viewer.export",
            "segcam": segcam.__version__,
            "method": method,
            "class_index": c,
            "class": self.class_names[c] if c < len(self.class_names) else str(c),
            "layer": layer,
            "layer_label": self.layer_labels.get(layer, ""),
            "target": _describe_key(key),
            "pixels": int(pixel_set.sum()),
            "map_max": float(heat.max()),
            "shape": list(heat.shape),
        }
        stem = "_".join(
            re.sub(r"[^A-Za-z0-9.-]+", "-", str(part))
            for part in ("segcam", method, metadata["class"], layer, key[0])
        )
        if kind == "json":
            content = (json.dumps(metadata, indent=1) + "\n").encode()
            return content, "application/json", f"{stem}.json"
        if kind == "npz":
            stream = io.BytesIO()
            np.savez_compressed(
                stream, map=heat, pixel_set=pixel_set, metadata=np.array(json.dumps(metadata))
            )
            return stream.getvalue(), "application/octet-stream", f"{stem}.npz"
        if kind == "png":
            if len(self.spatial) != 2:
                raise RequestError("PNG export is for 2D images; export 3D maps as NIfTI")
            assert self.display is not None
            return _png_with_colour_bar(self.display, heat), "image/png", f"{stem}.png"
        if kind == "nifti":
            if len(self.spatial) != 3:
                raise RequestError("NIfTI export is for 3D volumes; export 2D maps as PNG")
            import gzip

            from segcam.io.files import nifti_bytes

            affine = np.eye(4) if self.affine is None else self.affine
            raw = nifti_bytes(heat, affine, description=_description(metadata))
            content = gzip.compress(raw, compresslevel=6)
            return content, "application/gzip", f"{stem}.nii.gz"
        raise RequestError(f"unknown export format {kind!r}: nifti, json, png or npz")

    def close(self) -> None:
        """Free every kept forward graph."""
        for explainer in self._explainers.values():
            explainer.close()
        self._explainers.clear()
