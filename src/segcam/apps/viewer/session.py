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
from collections.abc import Callable, Mapping, Sequence
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
    panels_of,
    parse_target,
)
from segcam.apps.viewer.uploads import read_mask
from segcam.checks import check_model_inputs, run_model
from segcam.errors import InputError, MethodNotSupportedError, OptionError
from segcam.layers import describe_layers
from segcam.memory_format import MemoryFormat
from segcam.methods import REGISTRY, get_method
from segcam.outputs import select_logits
from segcam.postprocess import relu, upsample
from segcam.sliding import explain_sliding_window_methods
from segcam.viz import grey
from segcam.windows import blended_logits

__all__ = ["DEFAULT_METHODS", "RequestError", "SupersededError", "ViewerSession", "depth_labels"]

KEPT_UPLOADS = 16  # pages whose uploaded masks are kept (the least recent one goes first)
KEPT_MAPS = 12  # computed maps kept (method, layer, target), the least recently used go first
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
        affine: voxel-to-world matrix for NIfTI export (default identity). For a 2D image,
            the 4x4 matrix of the volume it was cut from across that volume's third axis: the
            image is then shown as that plane is in 3D (e.g. axial, anterior at the top).
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
    memory_format: MemoryFormat = "auto"  # the convolutions' layout (segcam.memory_format)
    _uploads: OrderedDict[str, Upload] = field(default_factory=OrderedDict, repr=False)
    _uploads_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cache: OrderedDict[Any, dict[str, Any]] = field(default_factory=OrderedDict, repr=False)

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
        self._forwards = KeptForwards(
            self.model, self.inputs[None], self.output, memory_format=self.memory_format
        )
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
        self._flat = None
        if len(self.spatial) == 2 and self.affine is not None:
            # a slice of an oriented volume (its first two axes): shown as that volume's plane
            # across its third axis, e.g. the axial plane with anterior at the top
            self._flat, self.oblique = planes(self.affine)[0][2], planes(self.affine)[1]
        self.grid = Grid(self.spatial, self._planes, self._flat)
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
            "flat": None if self._flat is None else self._flat.describe((*self.spatial, 1)),
            "default_axis": next((p.axis for p in self._planes if p.name == "axial"), 2)
            if self._planes
            else None,
            "oriented": self.affine is not None and len(self.spatial) == 3,
            # voxel index -> world mm (RAS, as NIfTI): the read-out and slice positions in mm
            "affine": np.asarray(self.affine, dtype=float).tolist()
            if self.affine is not None and len(self.spatial) == 3
            else None,
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
        if explainer is not None:  # raw: ReLU and up-sampling follow in _store
            return list(
                explainer.explain_methods([target], methods, relu=False, upsample=False).items()
            )
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
                relu=False,
                upsample=False,
                memory_format=self.memory_format,
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
    ) -> dict[str, dict[str, Any]]:
        """The maps of one target for each method (see :meth:`_maps_of`)."""
        return self._maps_of([(layer, methods, target, key)], client)[0]

    def _maps_of(
        self, works: Sequence[tuple[str, list[str], segcam.Target, TargetKey]], client: str | None
    ) -> list[dict[str, dict[str, Any]]]:
        """Per (layer, methods, target, key): method -> ``map``, ``signed``, ``pixel_set``.

        ``map`` is the method's map with ReLU, then up-sampled to the input grid, as
        :func:`segcam.explain` gives it; ``signed`` the raw map up-sampled (no ReLU), so the page
        can say where the map is negative. The :data:`KEPT_MAPS` most recently used are cached.
        A request for the same maps as the page's running one (a slice change) waits for them
        instead of cancelling it; any other request of the page cancels it.
        """
        work = tuple((layer, key, tuple(methods)) for layer, methods, _, key in works)
        with self._gate.run(client, work):
            for layer, methods, target, key in works:
                explainer = self._explainer(layer)
                missing = [m for m in dict.fromkeys(methods) if (layer, key, m) not in self._cache]
                if missing:
                    for method, expl in self._explain_missing(explainer, layer, target, missing):
                        self._cache[layer, key, method] = self._store(expl)
            found = [
                {method: self._cache[layer, key, method] for method in methods}
                for layer, methods, _, key in works
            ]
            # the most recently used maps stay (two panels, an export, another tab), up to
            # KEPT_MAPS: a slice change after an export of another layer is not a new pass
            for layer, methods, _, key in works:
                for method in methods:
                    self._cache.move_to_end((layer, key, method))
            while len(self._cache) > KEPT_MAPS:
                self._cache.popitem(last=False)
            return found

    def _store(self, explanation: segcam.Explanation) -> dict[str, Any]:
        """A computed map as the cache keeps it: ReLU'd on the input grid, its raw form, facts.

        The signed map on the input grid is made on first use (:meth:`_signed`): most
        requests show no signed panel, and its up-sampling is a third of a 3D update.
        """
        raw = explanation.maps[:1, :1].float()
        heat = upsample(relu(raw), self.spatial)[0, 0].cpu().numpy()
        pixel_set = explanation.pixel_sets[0, 0].cpu().numpy()
        flat, inside_set = heat.ravel(), pixel_set.ravel()
        mass = float(flat.sum(dtype=np.float64))
        top = int(np.argmax(flat))
        others = {axis: tuple(a for a in range(heat.ndim) if a != axis) for axis in range(3)}
        return {
            "map": heat,
            "raw": raw,
            "pixel_set": pixel_set,
            # the raw map's extremes (its up-sampled values lie between them)
            "min": float(raw.min()),
            "signed_max": float(raw.max()),
            # where ReLU removed the (negative) evidence, the map is 0: how much of the input
            "zero_share": float(np.count_nonzero(flat <= 0)) / flat.size,
            "argmax": [int(i) for i in np.unravel_index(top, heat.shape)],
            "inside": float(flat[inside_set].sum(dtype=np.float64)) / mass if mass > 0 else 0.0,
            # per slice along each axis (a volume): the strip along the slider
            "profile": {a: heat.sum(axis=o).tolist() for a, o in others.items()}
            if heat.ndim == 3
            else {},
        }

    def _signed(self, value: dict[str, Any]) -> np.ndarray:
        """The raw map up-sampled to the input grid (no ReLU), made once per cached map."""
        if "signed" not in value:
            value["signed"] = upsample(value["raw"], self.spatial)[0, 0].cpu().numpy()
        signed: np.ndarray = value["signed"]
        return signed

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
        """Maps of the requested target for each map panel, cut to the current view.

        Panels (:func:`~segcam.apps.viewer.requests.panels_of`) name a method, and may name
        their own layer and class (two layers or two classes side by side); by default one
        panel per method at the request's layer and class. Each map entry holds:

        - ``data``: the map with ReLU, up-sampled to the input grid, not normalised (the page
          scales it), and its ``max`` over the whole map (the colour bar does not change with
          the slice); the raw map's ``min`` and ``signed_max``; ``zero_share``, ``argmax`` and
          ``inside`` (the share of its mass in the pixel set);
        - when the panel is signed or the cut is all 0: ``slice_min``, the signed map's minimum
          on the cut (negative there: the ReLU'd map is 0 because the evidence is negative);
          with ``signed``, the signed cut itself.

        ``pixels``, ``extent`` ([first, last] voxel per axis), ``stats`` and the profile's
        ``set`` describe the first panel's pixel set. ``planes`` (optional, 3D) asks for more
        cuts ({axis, index}) of the same maps; ``with_slice`` (optional) adds each view's
        :meth:`slice`, so that the page draws new slices and their maps in one frame.
        """
        started = time.perf_counter()
        layer, _, target, key = self._request({**payload, "methods": [DEFAULT_METHODS[0]]})
        panels = panels_of(payload)
        view = self.grid.view(payload)
        extra = payload.get("planes", [])
        if not isinstance(extra, list) or len(extra) > 3 or (extra and len(self.spatial) != 3):
            raise RequestError("planes must be a list of up to 3 {axis, index} of a volume")
        extra_views = [self.grid.view(item if isinstance(item, Mapping) else {}) for item in extra]
        client = client_of(payload)
        with_slice = payload.get("with_slice", False)
        if not isinstance(with_slice, bool):
            raise RequestError(f"with_slice must be true or false; got {with_slice!r}")
        # one work per (layer, class): its target and the methods of its panels
        groups: dict[tuple[str, int], tuple[segcam.Target, TargetKey, list[str]]] = {}
        where = []  # per panel: its (layer, class)
        for panel in panels:
            panel_layer = layer if panel.layer is None else self._layer({"layer": panel.layer})
            c = int(target.class_index) if panel.class_index is None else panel.class_index
            if (panel_layer, c) not in groups:
                same = c == int(target.class_index)
                panel_target, panel_key = (
                    (target, key) if same else self._request({**payload, "class": c})[2:]
                )
                groups[panel_layer, c] = (panel_target, panel_key, [])
            groups[panel_layer, c][2].append(panel.method)
            where.append((panel_layer, c))
        works = [(g_layer, methods, t, k) for (g_layer, _), (t, k, methods) in groups.items()]
        computed = dict(zip(groups, self._maps_of(works, client), strict=True))
        first = next(iter(computed[where[0]].values()))
        pixel_set = first["pixel_set"]

        def cut(view: tuple[int, int]) -> dict[str, Any]:
            cut_set = self.grid.cut(pixel_set, view)
            entries = []
            for panel, (panel_layer, c) in zip(panels, where, strict=True):
                value = computed[panel_layer, c][panel.method]
                shown = self.grid.cut(value["map"], view)
                entry = {
                    "method": panel.method,
                    "layer": panel_layer,
                    "class": c,
                    "data": b64(shown.astype("<f4")),
                    "max": float(value["map"].max()),
                    "min": value["min"],
                    "signed_max": value["signed_max"],
                    "zero_share": value["zero_share"],
                    "argmax": value["argmax"],
                    "inside": value["inside"],
                }
                if panel.signed or not shown.any():  # signed shown, or why the cut is 0
                    signed = self.grid.cut(self._signed(value), view)
                    entry["slice_min"] = float(signed.min())
                    if panel.signed:
                        entry["signed"] = b64(np.asarray(signed).astype("<f4"))
                if value["pixel_set"] is not pixel_set:
                    entry["pixel_set"] = b64(
                        self.grid.cut(value["pixel_set"], view).astype(np.uint8)
                    )
                entries.append(entry)
            return {
                "shape": list(cut_set.shape),
                "pixel_set": b64(cut_set.astype(np.uint8)),
                "maps": entries,
            }

        result = {"layer": layer, "pixels": int(pixel_set.sum()), **cut(view)}
        result.update(self.grid.extent(pixel_set))
        # once per cached map: the set's facts do not change with the slice
        result["stats"] = _cached(first, ("stats",), lambda: self._region_stats(pixel_set))
        if len(self.spatial) == 3:  # per slice along the shown view: the set and each map's mass
            others = tuple(a for a in range(3) if a != view[0])
            result["profile"] = {
                "axis": view[0],
                "set": _cached(
                    first,
                    ("set_profile", view[0]),
                    lambda: pixel_set.sum(axis=others).astype(int).tolist(),
                ),
                "maps": [
                    computed[g][panel.method]["profile"][view[0]]
                    for panel, g in zip(panels, where, strict=True)
                ],
            }
        if extra_views:
            result["planes"] = [
                {
                    "axis": a,
                    "index": i,
                    **cut((a, i)),
                    **({"slice": self.slice({"axis": a, "index": i})} if with_slice else {}),
                }
                for a, i in extra_views
            ]
        if with_slice:
            result["slice"] = self.slice(payload)
        result["milliseconds"] = round((time.perf_counter() - started) * 1e3, 1)
        return result

    def _region_stats(self, pixel_set: np.ndarray) -> dict[str, Any]:
        """The pixel set's voxels, volume (ml, from the affine) and mean intensity."""
        voxels = int(pixel_set.sum())
        stats: dict[str, Any] = {"voxels": voxels}
        if len(self.spatial) == 3 and self.affine is not None:
            voxel_mm3 = abs(float(np.linalg.det(np.asarray(self.affine)[:3, :3])))
            stats["ml"] = voxels * voxel_mm3 / 1000.0
        if voxels and self.intensity is not None:
            stats["mean_intensity"] = float(self.intensity[pixel_set].mean(dtype=np.float64))
            stats["unit"] = self.intensity_unit
        return stats

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
        signed = payload.get("signed", False)
        if not isinstance(signed, bool):
            raise RequestError(f"signed must be true or false; got {signed!r}")
        if signed and payload.get("format") == "png":
            raise RequestError(
                "a signed map exports as NIfTI or arrays; 'save view' saves it as shown (PNG)"
            )
        layer, _, target, key = self._request({**payload, "methods": [method]})
        value = self._maps(layer, [method], target, key)[method]
        heat = self._signed(value) if signed else value["map"]
        pixel_set = value["pixel_set"]
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
            "map": "signed (no ReLU)" if signed else "ReLU",
            "map_max": float(heat.max()),
            "map_min": float(heat.min()),
            "shape": list(heat.shape),
        }
        if len(self.spatial) == 3 and "axis" in payload:  # the slice the page showed
            axis, index = self.grid.view(payload)
            metadata["view"] = {"axis": axis, "index": index, "plane": self._planes[axis].name}
        assert self.display is not None
        display = self.display
        if payload.get("format") in ("png", "pixel_set") and len(self.spatial) == 2:
            # an image: in the orientation the page shows
            heat, pixel_set, display = (
                self.grid.cut(a, (-1, -1)) for a in (heat, pixel_set, display)
            )
        return export_file(
            payload.get("format"),
            heat,
            pixel_set,
            metadata,
            spatial=self.spatial,
            display=display,
            affine=self.affine,
            signed=self._signed(value),
        )

    def close(self) -> None:
        """Free every kept forward graph."""
        self._forwards.close()


def _cached(value: dict[Any, Any], key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``value[key]``, made by ``make`` the first time (facts of a cached map)."""
    if key not in value:
        value[key] = make()
    return value[key]
