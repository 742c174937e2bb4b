"""The viewer's state and every request it answers, validated; no web framework here.

Arrays travel as base64 of little-endian bytes (float32 maps and intensities, uint8 images and
masks), row-major, with their shape alongside. A 3D input is viewed one slice at a time across
``axis`` (0, 1 or 2 of its spatial axes, in stored voxel order), shown in radiological order when
the session has an affine (:mod:`segcam.apps.viewer.planes`): every plane the server sends or
receives (images, predictions, maps, painted masks) is in that display order.

Requests of one page (``client``) supersede each other: a newer explanation request of the same
page cancels an older one still waiting or computing (it answers 409), at the next forward pass
of the model (gradient-free methods run one per channel batch).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import segcam
from segcam import Explainer
from segcam.apps.viewer.planes import Plane, planes
from segcam.apps.viewer.uploads import read_mask
from segcam.checks import check_model_inputs, run_model
from segcam.errors import (
    InputError,
    LayerNotOnPathError,
    MethodNotSupportedError,
    ModelError,
    OptionError,
    SegCamError,
)
from segcam.layers import describe_layers
from segcam.methods import REGISTRY, get_method
from segcam.outputs import select_logits
from segcam.sliding import blended_logits, explain_sliding_window_methods
from segcam.viz import grey, overlay

__all__ = ["DEFAULT_METHODS", "RequestError", "SupersededError", "ViewerSession", "depth_labels"]

DEFAULT_METHODS = ("seg-grad-cam", "seg-hires-grad-cam")
AXIS_NAMES = {0: "sagittal (axis 0)", 1: "coronal (axis 1)", 2: "axial (axis 2)"}
MAX_EXPLAINERS = 3  # kept forwards (one per recently used layer)


class RequestError(SegCamError, ValueError):
    """A request the viewer refuses; its message is shown in the page (HTTP 400)."""


class SupersededError(SegCamError):
    """A request cancelled by a newer one of the same page, or by its cancel button (HTTP 409)."""


CT_PRESETS = (  # (name, level, width) in HU, as CT viewers offer them
    ("soft tissue", 40.0, 400.0),
    ("liver", 60.0, 160.0),
    ("lung", -600.0, 1500.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
)
CONFIRM_SECONDS = 5.0  # a gradient-free request on a volume estimated above this asks first


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
    r"|Flatten|Pad)\w*$|^ADN$"
)


def _plumbing(type_name: str) -> bool:
    """Norm, dropout, activation and identity modules: they add no block of their own."""
    return bool(_PLUMBING.search(type_name))


def depth_labels(
    names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], spatial: Sequence[int]
) -> dict[str, str]:
    """Readable names for any encoder-decoder: ``encoder 1`` ... ``bottleneck`` ... ``decoder 1``.

    ``names`` in execution order; a layer's depth is how many halvings its grid is below the
    input's (``round(log2(input voxels / layer voxels) / dims)``). Layers before the deepest
    one are the encoder, those after it the decoder; several layers at one depth are numbered
    (``encoder 2 #1``, ``#2``).
    """
    dims = len(spatial)
    whole = float(np.prod(spatial))
    depth = {}
    for name in names:
        size = float(np.prod(shapes[name][2:])) or 1.0
        depth[name] = max(0, round(float(np.log2(max(whole / size, 1.0))) / dims))
    if not depth:
        return {}
    deepest = max(depth.values())
    part, seen_deepest = {}, False
    for name in names:
        if deepest == 0:
            part[name] = "block"
        elif depth[name] == deepest:
            part[name], seen_deepest = "bottleneck", True
        else:
            part[name] = f"{'decoder' if seen_deepest else 'encoder'} {depth[name]}"
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(part[name], []).append(name)
    labels = {}
    for group, members in groups.items():
        for k, name in enumerate(members, 1):
            labels[name] = group if len(members) == 1 else f"{group} #{k}"
    return labels


def _channels_last_helps(inputs: torch.Tensor) -> bool:
    """Whether the fast channels-last forward applies: a float32 volume on the CPU.

    oneDNN's channels-last 3D convolutions are several times faster there (backward above all:
    35 vs 225 ms for a 3-channel 128^3 convolution on 2 cores).
    """
    return inputs.ndim == 5 and inputs.device.type == "cpu" and inputs.dtype == torch.float32


@contextmanager
def _channels_last_convolutions(model: nn.Module) -> Iterator[None]:
    """Feed every 3D (transposed) convolution a channels-last input while the block runs.

    The recorded graph keeps the channels-last tensors, so its backward passes run the fast
    kernels too. The values are the same up to float32 summation order. Hooks are removed on
    exit, exceptions included; the model's parameters are not touched.
    """

    def to_channels_last(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.ndim == 5 and first.dtype == torch.float32:
            return (first.contiguous(memory_format=torch.channels_last_3d), *args[1:])
        return None

    kinds = (nn.Conv3d, nn.ConvTranspose3d)
    handles = [
        m.register_forward_pre_hook(to_channels_last)
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
        layer_labels: short readable names shown beside layer names (e.g. ``bottleneck``);
            by default :func:`depth_labels` of the layers.
        intensity: the values the crosshair reads out and window/level applies to, (*S); by
            default the input's channel mean (e.g. the CT in HU, before any windowing).
        intensity_unit: their unit (``HU`` offers CT window presets).
        ground_truth: reference labels (*S), shown as an outline when given.
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
    intensity: np.ndarray | None = None
    intensity_unit: str = ""
    ground_truth: np.ndarray | None = None
    _explainers: OrderedDict[str, Explainer] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _uploaded: np.ndarray | None = field(default=None, repr=False)
    _cache: dict[Any, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    _latest: dict[str, int] = field(default_factory=dict, repr=False)
    _generation: int = field(default=0, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim not in (3, 4):
            raise InputError(
                f"inputs must be (C, H, W) or (C, D, H, W); got {tuple(self.inputs.shape)}"
            )
        self.spatial = tuple(int(s) for s in self.inputs.shape[1:])
        self.forward_seconds = float("nan")  # one forward pass without gradients, measured
        example = self.inputs[None]
        if self.sliding_window:  # the model may not take the whole input: describe a window
            logits = blended_logits(self.model, example, output=self.output, **self.sliding_window)
            roi = self.sliding_window["roi_size"]
            roi = [roi] * len(self.spatial) if isinstance(roi, int) else list(roi)
            example = example[(slice(None), slice(None), *(slice(0, r) for r in roi))]
        else:
            with torch.no_grad():
                check_model_inputs(self.model, example)  # rank and channels, named
                started = time.perf_counter()
                logits = select_logits(
                    run_model(self.model, example), self.output, self.inputs.ndim + 1
                )
                self.forward_seconds = time.perf_counter() - started
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
        self._arrays(self.inputs.float().mean(0).numpy())
        table = sorted(describe_layers(self.model, example), key=lambda info: info.order)
        self._layer_shapes = {
            info.name: info.shape
            for info in table
            if info.on_path and info.shape is not None and info.calls == 1 and info.name
        }
        rank = self.inputs.ndim + 1
        kinds = {info.name: info.type_name for info in table}
        wrapped = {info.name for info in table if info.same_as}  # a block returns it as is
        self._hidden = {
            n for n in self._layer_shapes if _plumbing(kinds.get(n, "")) or n in wrapped
        }
        self._all_layers = [n for n, s in self._layer_shapes.items() if len(s) == rank]
        if not self.layers:
            self.layers = [
                n
                for n in self._all_layers
                if self._layer_shapes[n][1] > self.classes and n not in self._hidden
            ] or list(self._all_layers)
        unknown = [name for name in self.layers if name not in self._layer_shapes]
        if unknown:
            raise LayerNotOnPathError(f"layers not on the model's path (or unknown): {unknown}")
        self.layers = list(self.layers)
        if not self.layer_labels:
            shown = [n for n in self._all_layers if n not in self._hidden or n in self.layers]
            self.layer_labels = depth_labels(shown, self._layer_shapes, self.spatial)
        if self.default_layer is None:
            self.default_layer = self._sensible_layer()
        if self.default_layer not in self.layers:
            raise OptionError(f"default layer {self.default_layer!r} is not among the layers")

    def _arrays(self, values: np.ndarray) -> None:
        """Display, intensities and planes; ``values`` are the default intensities (*S)."""
        if self.display is None:
            self.display = grey(values)
        self.display = np.asarray(self.display, dtype=np.float32)
        if self.intensity is None:
            self.intensity = values
        self.intensity = np.asarray(self.intensity, dtype=np.float32)
        for name, array in (("intensity", self.intensity), ("ground_truth", self.ground_truth)):
            if array is not None and tuple(array.shape) != self.spatial:
                raise InputError(
                    f"{name} has shape {tuple(array.shape)}; the input's grid is {self.spatial}"
                )
        self._planes, self.oblique = planes(self.affine) if len(self.spatial) == 3 else ([], False)
        self._intensity_summary = self._intensity_info()  # range, percentiles: computed once

    def _sensible_layer(self) -> str:
        """The last decoder layer (fine grid, semantic features), else the middle of the list."""
        decoders = [n for n in self.layers if self.layer_labels.get(n, "").startswith("decoder")]
        if decoders:
            finest = min(int(self.layer_labels[n].split()[1]) for n in decoders)
            return [n for n in decoders if int(self.layer_labels[n].split()[1]) == finest][-1]
        return self.layers[len(self.layers) // 2]

    # ------------------------------------------------------------------ info and slices

    def _layer_entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "shape": list(self._layer_shapes[name]),
            "label": self.layer_labels.get(name, ""),
        }

    def _intensity_info(self) -> dict[str, Any]:
        assert self.intensity is not None
        finite = self.intensity[np.isfinite(self.intensity)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        lowest, highest = (float(finite.min()), float(finite.max())) if finite.size else (0, 1)
        presets = [{"name": "auto (1-99%)", "level": (low + high) / 2, "width": high - low}]
        presets.append(
            {"name": "full range", "level": (lowest + highest) / 2, "width": highest - lowest}
        )
        if self.intensity_unit == "HU":
            presets += [{"name": n, "level": lv, "width": w} for n, lv, w in CT_PRESETS]
        for preset in presets:
            preset["level"], preset["width"] = (
                float(preset["level"]),
                max(float(preset["width"]), 1e-6),
            )
        return {"unit": self.intensity_unit, "min": lowest, "max": highest, "presets": presets}

    def info(self) -> dict[str, Any]:
        """Everything the page needs to build its controls."""
        gradient_free = [m.name for m in REGISTRY.values() if not m.needs_gradient]
        return {
            "title": self.title,
            "dims": len(self.spatial),
            "shape": list(self.spatial),
            "classes": list(self.class_names),
            "layers": [self._layer_entry(name) for name in self.layers],
            "all_layers": [
                {**self._layer_entry(name), "hidden": name in self._hidden}
                for name in self._all_layers
                if name not in self.layers
            ],
            "default_layer": self.default_layer,
            "methods": [
                {"name": name, "summary": method.summary, "kind": method.kind}
                for name, method in REGISTRY.items()
            ],
            "gradient_free": gradient_free,
            "default_methods": list(DEFAULT_METHODS),
            "axes": [plane.name for plane in self._planes],
            "planes": [plane.describe(self.spatial) for plane in self._planes],
            "default_axis": next((p.axis for p in self._planes if p.name == "axial"), 2)
            if self._planes
            else None,
            "oriented": self.affine is not None and len(self.spatial) == 3,
            "oblique": self.oblique,
            "intensity": self._intensity_summary,
            "ground_truth": self.ground_truth is not None,
            "max_upload_bytes": self.max_upload_bytes,
            "sliding_window": dict(self.sliding_window) if self.sliding_window else None,
        }

    def _view(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        if len(self.spatial) == 2:
            return -1, -1
        axis = _int(payload, "axis", 0, 3, "axis")
        index = _int(payload, "index", 0, self.spatial[axis], f"slice index on axis {axis}")
        return axis, index

    def plane(self, axis: int) -> Plane:
        """How slices across voxel axis ``axis`` are shown (3D inputs)."""
        return self._planes[axis]

    def _cut(self, array: np.ndarray, view: tuple[int, int]) -> np.ndarray:
        axis, index = view
        return array if axis < 0 else self._planes[axis].cut(array, index)

    def slice(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One shown slice (the whole image in 2D): image, intensities, prediction, labels."""
        view = self._view(payload)
        assert self.display is not None and self.intensity is not None
        image = self._cut(self.display, view)
        result = {
            "shape": list(image.shape),
            "image": _b64((np.clip(image, 0, 1) * 255).round().astype(np.uint8)),
            "intensity": _b64(self._cut(self.intensity, view).astype("<f4")),
            "prediction": _b64(self._cut(self.prediction, view)),
        }
        if self.ground_truth is not None:
            labels = np.asarray(self._cut(self.ground_truth, view))
            result["ground_truth"] = _b64(np.clip(labels, 0, 255).astype(np.uint8))
        return result

    # ------------------------------------------------------------------ targets

    def upload_mask(self, data: bytes) -> dict[str, Any]:
        """Keep an uploaded mask (.npy, PNG or NIfTI on the input's grid) as a pixel set."""
        if len(data) > self.max_upload_bytes:
            raise RequestError(
                f"upload of {len(data)} bytes is over the limit of {self.max_upload_bytes}"
            )
        affine = self.affine if len(self.spatial) == 3 else None
        self._uploaded = read_mask(data, self.spatial, affine, RequestError)
        return {"pixels": int(self._uploaded.sum()), **self._extent(self._uploaded)}

    def _extent(self, pixel_set: np.ndarray) -> dict[str, Any]:
        """Where a pixel set lies: its [first, last] index on each axis (None when empty)."""
        if not pixel_set.any():
            return {"extent": None}
        extent = []
        for axis in range(pixel_set.ndim):
            others = tuple(a for a in range(pixel_set.ndim) if a != axis)
            hits = np.flatnonzero(pixel_set.any(axis=others))
            extent.append([int(hits[0]), int(hits[-1])])
        return {"extent": extent}

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
        """A painted mask: the whole image (2D), or painted slices of a volume (3D).

        3D: ``slices`` is a list of ``{axis, index, data}``, each plane in display order (one
        slice: ``axis``, ``index`` and ``data`` on the spec itself). ``data`` is base64 bytes 0/1.
        """
        mask = np.zeros(self.spatial, dtype=bool)
        if len(self.spatial) == 2:
            mask[...] = self._painted(spec, (-1, -1))
            return mask
        slices = spec.get("slices", [spec])
        if not isinstance(slices, list) or not 1 <= len(slices) <= sum(self.spatial):
            raise RequestError(f"slices must be a list of 1 to {sum(self.spatial)} painted slices")
        for item in slices:
            if not isinstance(item, Mapping):
                raise RequestError(f"a painted slice must be an object; got {item!r}")
            view = self._view(item)
            plane = self._planes[view[0]]
            painted = np.zeros(self.spatial, dtype=bool)
            plane.place(self._painted(item, view), painted, view[1])
            mask |= painted
        return mask

    def _painted(self, spec: Mapping[str, Any], view: tuple[int, int]) -> np.ndarray:
        plane = self._cut(np.zeros(self.spatial, dtype=np.uint8), view).shape
        try:
            raw = base64.b64decode(str(spec.get("data", "")), validate=True)
        except ValueError:
            raise RequestError("the painted mask is not valid base64") from None
        if len(raw) != int(np.prod(plane)):
            raise RequestError(
                f"the painted mask has {len(raw)} pixels; the slice has {int(np.prod(plane))}"
            )
        return np.asarray(np.frombuffer(raw, dtype=np.uint8).reshape(plane) != 0, dtype=bool)

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
        inputs = self.inputs[None]
        if _channels_last_helps(inputs):
            try:
                with _channels_last_convolutions(self.model):
                    explainer.forward(inputs)
            except ModelError:  # a model that needs contiguous tensors (e.g. .view): as is
                explainer.forward(inputs)
        else:
            explainer.forward(inputs)
        self._explainers[layer] = explainer
        while len(self._explainers) > MAX_EXPLAINERS:
            _, old = self._explainers.popitem(last=False)
            old.close()
        return explainer

    def _layer(self, payload: Mapping[str, Any]) -> str:
        """The request's layer (any on-path layer of the input's rank), checked."""
        layer = payload.get("layer", self.default_layer)
        if not isinstance(layer, str) or layer not in self._all_layers:
            raise RequestError(f"unknown layer {layer!r}; choose one of the listed layers")
        return layer

    def _request(self, payload: Mapping[str, Any]) -> tuple[str, list[str], segcam.Target, Any]:
        """The layer, methods and target of a request, checked."""
        layer = self._layer(payload)
        methods = payload.get("methods", list(DEFAULT_METHODS))
        if not isinstance(methods, list) or not 1 <= len(methods) <= 4:
            raise RequestError("methods must be a list of 1 to 4 method names")
        for method in methods:
            if not isinstance(method, str) or method not in REGISTRY:
                raise RequestError(f"unknown method {method!r}; registered: {', '.join(REGISTRY)}")
        target, key = self._target(payload)
        return layer, methods, target, key

    def _client(self, payload: Mapping[str, Any]) -> str:
        client = payload.get("client", "")
        if not isinstance(client, str) or len(client) > 64:
            raise RequestError("client must be a short string (the page's own id)")
        return client

    def cancel(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Cancel the page's pending or computing request (it answers 409)."""
        client = self._client(payload)
        with self._guard:
            self._generation += 1
            self._latest[client] = self._generation
        return {"cancelled": True}

    @contextmanager
    def _supersedable(self, client: str | None) -> Iterator[None]:
        """Run a request of ``client`` under the lock; a newer one of the same page cancels it.

        The check runs before every module's forward (gradient-free methods and new layers run
        forward passes; a gradient request is short and ends on its own). ``None`` (an export):
        never cancelled.
        """
        if client is None:
            with self._lock:
                yield
            return
        with self._guard:
            self._generation += 1
            mine = self._latest[client] = self._generation

        def check(*_: Any) -> None:
            if self._latest.get(client) != mine:
                raise SupersededError("superseded by a newer request of this page")

        handles = [m.register_forward_pre_hook(check) for m in self.model.modules()]
        try:
            with self._lock:
                check()
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _maps(
        self,
        layer: str,
        methods: list[str],
        target: segcam.Target,
        key: Any,
        client: str | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """The maps of a target for each method (cached for the latest layer and target)."""
        with self._supersedable(client):
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

    def estimate(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """What a request would cost: forward passes and seconds per gradient-free method.

        A gradient method takes one backward pass (and a forward for a new layer); Score-CAM
        one forward per kept channel (in batches), Eigen-CAM none. ``confirm`` is true when a
        volume's gradient-free request is estimated above :data:`CONFIRM_SECONDS`.
        """
        layer = self._layer(payload)
        methods = payload.get("methods", [])
        if not isinstance(methods, list) or not all(
            isinstance(m, str) and m in REGISTRY for m in methods
        ):
            raise RequestError(f"methods must be registered method names; got {methods!r}")
        channels = int(self._layer_shapes[layer][1])
        forward = self.forward_seconds if np.isfinite(self.forward_seconds) else 1.0
        rows, total = [], 0.0
        for name in dict.fromkeys(methods):
            method = get_method(name)
            forwards = 0
            if not method.needs_gradient and "batch_size" in method.options:
                kept = method.options.get("max_channels") or channels
                forwards = min(int(kept), channels)  # masked inputs, one per kept channel
            seconds = forwards * forward
            total += seconds
            rows.append(
                {"method": name, "kind": method.kind, "masked_inputs": forwards, "seconds": seconds}
            )
        confirm = (
            len(self.spatial) == 3
            and any(not get_method(r["method"]).needs_gradient for r in rows)
            and total > CONFIRM_SECONDS
        )
        return {
            "layer": layer,
            "channels": channels,
            "methods": rows,
            "seconds": total,
            "forward_seconds": forward,
            "confirm": bool(confirm),
        }

    def explain(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Maps of the requested target for each requested method, cut to the current view.

        The maps are ReLU'd and up-sampled to the input grid, not normalised (the page scales
        them for display); ``max`` is over the whole map, so the colour bar does not change when
        the slice does. ``extent`` says where the pixel set lies ([first, last] voxel per axis);
        ``planes`` (optional, 3D) asks for more cuts ({axis, index}) of the same maps.
        """
        started = time.perf_counter()
        layer, methods, target, key = self._request(payload)
        view = self._view(payload)
        extra = payload.get("planes", [])
        if not isinstance(extra, list) or len(extra) > 3 or (extra and len(self.spatial) != 3):
            raise RequestError("planes must be a list of up to 3 {axis, index} of a volume")
        extra_views = [self._view(item if isinstance(item, Mapping) else {}) for item in extra]
        client = self._client(payload)
        maps = self._maps(layer, methods, target, key, client)
        pixel_set = next(iter(maps.values()))["pixel_set"]

        def cut(view: tuple[int, int]) -> dict[str, Any]:
            cut_set = self._cut(pixel_set, view)
            return {
                "shape": list(cut_set.shape),
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

        result = {"layer": layer, "pixels": int(pixel_set.sum()), **cut(view)}
        result.update(self._extent(pixel_set))
        if extra_views:
            result["planes"] = [{"axis": a, "index": i, **cut((a, i))} for a, i in extra_views]
        result["milliseconds"] = round((time.perf_counter() - started) * 1e3, 1)
        return result

    # ------------------------------------------------------------------ export

    def export(self, payload: Mapping[str, Any]) -> tuple[bytes, str, str]:
        """A file of the request's map: (content, media type, file name).

        The request names everything (``format``, ``method``, ``class``, ``target``,
        ``layer``, and the shown ``axis`` and ``index``), so each tab exports what it shows.
        Formats: ``nifti`` (3D, ``.nii.gz`` with the affine and a description), ``json`` (the
        sidecar: class, layer, target, method, shown slice), ``png`` (2D, the overlay with a
        colour bar), ``npz`` (map, pixel set, metadata).
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
        if len(self.spatial) == 3 and "axis" in payload:  # the slice the page showed
            axis, index = self._view(payload)
            metadata["view"] = {"axis": axis, "index": index, "plane": self._planes[axis].name}
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
