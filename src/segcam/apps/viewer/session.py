"""The viewer's session: one input and one model, and every request it answers.

The session coordinates; each job has its own module: :mod:`~segcam.apps.viewer.requests`
(parsing and checking every field), :mod:`~segcam.apps.viewer.layers` (the layer menu),
:mod:`~segcam.apps.viewer.compute` (kept forwards, the fast layout, superseding),
:mod:`~segcam.apps.viewer.display` (window/level presets), :mod:`~segcam.apps.viewer.exports`
(files of the shown map) and :mod:`~segcam.apps.viewer.planes` (radiological orientation).
No web framework here: :mod:`~segcam.apps.viewer.app` serves these methods.

Requests of one page (``client``) supersede each other: a newer explanation request of the same
page cancels an older one still waiting or computing (it answers 409), at the next forward pass
of the model (gradient-free methods run one per channel batch).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import segcam
from segcam import Explainer
from segcam.apps.viewer.compute import KeptForwards, RequestGate
from segcam.apps.viewer.display import intensity_summary
from segcam.apps.viewer.exports import describe_key, export_file
from segcam.apps.viewer.layers import LayerMenu, depth_labels
from segcam.apps.viewer.planes import Plane, planes
from segcam.apps.viewer.requests import (
    DEFAULT_METHODS,
    Grid,
    RequestError,
    SupersededError,
    TargetKey,
    Upload,
    b64,
    client_of,
    methods_of,
    parse_target,
)
from segcam.apps.viewer.uploads import read_mask
from segcam.checks import check_model_inputs, run_model
from segcam.errors import InputError, MethodNotSupportedError, OptionError
from segcam.layers import describe_layers
from segcam.methods import REGISTRY, get_method
from segcam.outputs import select_logits
from segcam.sliding import explain_sliding_window_methods
from segcam.viz import grey
from segcam.windows import blended_logits

__all__ = ["DEFAULT_METHODS", "RequestError", "SupersededError", "ViewerSession", "depth_labels"]

KEPT_UPLOADS = 16  # pages whose uploaded masks are kept (the least recent one goes first)
WARM_FORWARD_BELOW = 2.0  # a first forward faster than this is timed again, warm
CONFIRM_SECONDS = 5.0  # a gradient-free request on a volume estimated above this asks first


@dataclass
class ViewerSession:
    """One input and one model, explained on request.

    Args:
        model: the segmentation network (eval mode).
        inputs: the model's input for one sample, (C, *S) (after intensity processing).
        display: what the page shows, (*S) in [0, 1]; by default the input's channel mean,
            min-max scaled.
        class_names: one name per output class (default ``class 0``, ...).
        layers: the layers offered (default: :class:`~segcam.apps.viewer.layers.LayerMenu`'s).
        default_layer: the layer selected at start (default: the last decoder layer).
        affine: voxel-to-world matrix for NIfTI export (default identity).
        output: how to find the logits (as for :func:`segcam.explain`).
        layer_labels: short readable names shown beside layer names (e.g. ``bottleneck``);
            by default :func:`depth_labels` of the layers.
        intensity: the values the crosshair reads out and window/level applies to, (*S); by
            default the input's channel mean (e.g. the CT in HU, before any windowing).
        intensity_unit: their unit (``HU`` offers CT window presets).
        ground_truth: reference labels (*S), shown as an outline when given.
        provenance: what every export names as its source: the input file, the model, the
            weights and their SHA-256 (the command line fills it in).
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
    provenance: Mapping[str, Any] = field(default_factory=dict)
    _uploads: OrderedDict[str, Upload] = field(default_factory=OrderedDict, repr=False)
    _uploads_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cache: dict[Any, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim not in (3, 4):
            raise InputError(
                f"inputs must be (C, H, W) or (C, D, H, W); got {tuple(self.inputs.shape)}"
            )
        self.spatial = tuple(int(s) for s in self.inputs.shape[1:])
        self.forward_seconds = float("nan")  # one forward pass without gradients, measured
        example, logits = self._first_forward()
        self._set_prediction(logits)
        self._arrays(self.inputs.float().mean(0).numpy())
        self._set_menu(
            LayerMenu.build(
                describe_layers(self.model, example),
                self.spatial,
                self.classes,
                self.layers,
                self.layer_labels,
                self.default_layer,
            )
        )

    def _first_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of the whole input, and an input the model takes (a window, if slid)."""
        example = self.inputs[None]
        if self.sliding_window:  # the model may not take the whole input: describe a window
            logits = blended_logits(self.model, example, output=self.output, **self.sliding_window)
            roi = self.sliding_window["roi_size"]
            roi = [roi] * len(self.spatial) if isinstance(roi, int) else list(roi)
            return example[(slice(None), slice(None), *(slice(0, r) for r in roi))], logits
        with torch.no_grad():
            check_model_inputs(self.model, example)  # rank and channels, named
            started = time.perf_counter()
            logits = select_logits(run_model(self.model, example), self.output, example.ndim)
            self.forward_seconds = time.perf_counter() - started
            if self.forward_seconds < WARM_FORWARD_BELOW:
                # the first forward is cold (kernels chosen, memory found): the estimates of
                # gradient-free methods were 4x too high on the demo CT; a second one is what
                # their masked inputs cost, and it is cheap where the first was
                started = time.perf_counter()
                run_model(self.model, example)
                self.forward_seconds = time.perf_counter() - started
        return example, logits

    def _set_prediction(self, logits: torch.Tensor) -> None:
        self.classes = int(logits.shape[1])
        predicted = logits.argmax(1)[0] if self.classes > 1 else (logits[:, 0] > 0).long()[0]
        self.prediction = predicted.numpy().astype(np.uint8)
        if not self.class_names:
            self.class_names = [f"class {c}" for c in range(max(self.classes, 2))]
        if len(self.class_names) != max(self.classes, 2):
            raise OptionError(
                f"{len(self.class_names)} class names for a model with {self.classes} classes"
            )

    def _set_menu(self, menu: LayerMenu) -> None:
        self.menu = menu
        self.layers, self.default_layer, self.layer_labels = (
            list(menu.offered),
            menu.default,
            dict(menu.labels),
        )
        self._forwards = KeptForwards(self.model, self.inputs[None], self.output)
        self._gate = RequestGate(self.model)

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
        self.grid = Grid(self.spatial, self._planes)
        self._intensity_summary = intensity_summary(self.intensity, self.intensity_unit)

    # ------------------------------------------------------------------ info and slices

    def info(self) -> dict[str, Any]:
        """Everything the page needs to build its controls."""
        gradient_free = [m.name for m in REGISTRY.values() if not m.needs_gradient]
        return {
            "title": self.title,
            "dims": len(self.spatial),
            "shape": list(self.spatial),
            "classes": list(self.class_names),
            **self.menu.describe(),
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

    def plane(self, axis: int) -> Plane:
        """How slices across voxel axis ``axis`` are shown (3D inputs)."""
        return self._planes[axis]

    def slice(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One shown slice (the whole image in 2D): image, intensities, prediction, labels."""
        view = self.grid.view(payload)
        assert self.display is not None and self.intensity is not None
        image = self.grid.cut(self.display, view)
        result = {
            "shape": list(image.shape),
            "image": b64((np.clip(image, 0, 1) * 255).round().astype(np.uint8)),
            "intensity": b64(self.grid.cut(self.intensity, view).astype("<f4")),
            "prediction": b64(self.grid.cut(self.prediction, view)),
        }
        if self.ground_truth is not None:
            labels = np.asarray(self.grid.cut(self.ground_truth, view))
            result["ground_truth"] = b64(np.clip(labels, 0, 255).astype(np.uint8))
        return result

    def upload_mask(self, data: bytes, client: str = "") -> dict[str, Any]:
        """Keep an uploaded mask (.npy, PNG or NIfTI on the input's grid) as ``client``'s pixel set.

        Each page (``client``) keeps its own upload: another tab's upload never changes this
        page's maps or exports. The most recent :data:`KEPT_UPLOADS` pages' uploads are kept.
        """
        if len(data) > self.max_upload_bytes:
            raise RequestError(
                f"upload of {len(data)} bytes is over the limit of {self.max_upload_bytes}"
            )
        client = client_of({"client": client})
        affine = self.affine if len(self.spatial) == 3 else None
        upload = Upload.of(read_mask(data, self.spatial, affine, RequestError))
        with self._uploads_lock:
            self._uploads[client] = upload
            self._uploads.move_to_end(client)
            while len(self._uploads) > KEPT_UPLOADS:
                self._uploads.popitem(last=False)
        labelled = upload.values != 0
        return {"pixels": int(labelled.sum()), **self.grid.extent(labelled)}

    def uploaded(self, client: str) -> Upload | None:
        """The mask ``client`` uploaded last (None: none)."""
        with self._uploads_lock:
            return self._uploads.get(client)

    # ------------------------------------------------------------------ explain

    def _explainer(self, layer: str) -> Explainer | None:
        """The layer's kept forward (None: every request runs the windows it meets)."""
        return None if self.sliding_window else self._forwards.get(layer)

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

    def _layer(self, payload: Mapping[str, Any]) -> str:
        """The request's layer (any on-path layer of the input's rank), checked."""
        layer = payload.get("layer", self.default_layer)
        if not isinstance(layer, str) or layer not in self.menu.all_layers:
            raise RequestError(f"unknown layer {layer!r}; choose one of the listed layers")
        return layer

    def _request(self, payload: Mapping[str, Any]) -> tuple[str, list[str], segcam.Target, Any]:
        """The layer, methods and target of a request, checked."""
        layer = self._layer(payload)
        methods = methods_of(payload)
        uploaded = self.uploaded(client_of(payload))
        target, key = parse_target(payload, self.grid, self.classes, uploaded)
        return layer, methods, target, key

    def cancel(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Cancel the page's pending or computing request (it answers 409)."""
        self._gate.cancel(client_of(payload))
        return {"cancelled": True}

    def _maps(
        self,
        layer: str,
        methods: list[str],
        target: segcam.Target,
        key: TargetKey,
        client: str | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """The maps of a target for each method (cached for the latest layer and target).

        A request for the same maps as the page's running one (a slice change) waits for them
        instead of cancelling it; any other request of the page cancels it.
        """
        with self._gate.run(client, (layer, key, tuple(methods))):
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
        channels = int(self.menu.shapes[layer][1])
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
        ``planes`` (optional, 3D) asks for more cuts ({axis, index}) of the same maps;
        ``with_slice`` (optional) adds the view's :meth:`slice`, so that the page draws a new
        slice and its maps in one frame.
        """
        started = time.perf_counter()
        layer, methods, target, key = self._request(payload)
        view = self.grid.view(payload)
        extra = payload.get("planes", [])
        if not isinstance(extra, list) or len(extra) > 3 or (extra and len(self.spatial) != 3):
            raise RequestError("planes must be a list of up to 3 {axis, index} of a volume")
        extra_views = [self.grid.view(item if isinstance(item, Mapping) else {}) for item in extra]
        client = client_of(payload)
        maps = self._maps(layer, methods, target, key, client)
        pixel_set = next(iter(maps.values()))["pixel_set"]

        def cut(view: tuple[int, int]) -> dict[str, Any]:
            cut_set = self.grid.cut(pixel_set, view)
            return {
                "shape": list(cut_set.shape),
                "pixel_set": b64(cut_set.astype(np.uint8)),
                "maps": [
                    {
                        "method": method,
                        "data": b64(self.grid.cut(value["map"], view).astype("<f4")),
                        "max": float(value["map"].max()),
                    }
                    for method, value in maps.items()
                ],
            }

        result = {"layer": layer, "pixels": int(pixel_set.sum()), **cut(view)}
        result.update(self.grid.extent(pixel_set))
        if extra_views:
            result["planes"] = [{"axis": a, "index": i, **cut((a, i))} for a, i in extra_views]
        if payload.get("with_slice") is True:
            result["slice"] = self.slice(payload)
        result["milliseconds"] = round((time.perf_counter() - started) * 1e3, 1)
        return result

    # ------------------------------------------------------------------ export

    def export(self, payload: Mapping[str, Any]) -> tuple[bytes, str, str]:
        """A file of the request's map: (content, media type, file name).

        The request names everything (``format``, ``method``, ``class``, ``target``,
        ``layer``, and the shown ``axis`` and ``index``), so each tab exports what it shows
        (:mod:`segcam.apps.viewer.exports` has the formats).
        """
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
            **({"provenance": dict(self.provenance)} if self.provenance else {}),
            "method": method,
            "class_index": c,
            "class": self.class_names[c] if c < len(self.class_names) else str(c),
            "layer": layer,
            "layer_label": self.layer_labels.get(layer, ""),
            "target": describe_key(key),
            "pixels": int(pixel_set.sum()),
            "map_max": float(heat.max()),
            "shape": list(heat.shape),
        }
        if len(self.spatial) == 3 and "axis" in payload:  # the slice the page showed
            axis, index = self.grid.view(payload)
            metadata["view"] = {"axis": axis, "index": index, "plane": self._planes[axis].name}
        assert self.display is not None
        return export_file(
            payload.get("format"),
            heat,
            pixel_set,
            metadata,
            spatial=self.spatial,
            display=self.display,
            affine=self.affine,
        )

    def close(self) -> None:
        """Free every kept forward graph."""
        self._forwards.close()
