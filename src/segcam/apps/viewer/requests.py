"""The viewer's requests, parsed and checked: views, targets, painted masks, methods, clients.

Every field of a request is checked here, before anything is computed; a bad one is a
:class:`RequestError` (the page gets 400 and its message). Arrays travel as base64 of
little-endian bytes, row-major, with their shape alongside. A 3D input is viewed one slice at a
time across ``axis`` (0, 1 or 2 of its spatial axes, in stored voxel order), shown in
radiological order when the session has an affine (:mod:`segcam.apps.viewer.planes`): every
plane the server sends or receives is in that display order.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

import segcam
from segcam.apps.viewer.planes import Plane
from segcam.errors import SegCamError
from segcam.methods import REGISTRY

__all__ = [
    "DEFAULT_METHODS",
    "Grid",
    "Panel",
    "RequestError",
    "SupersededError",
    "TargetKey",
    "Upload",
    "b64",
    "client_of",
    "methods_of",
    "panels_of",
    "parse_target",
]

DEFAULT_METHODS = ("seg-grad-cam", "seg-hires-grad-cam")
MAX_METHODS = 4

TargetKey = tuple[Any, ...]
"""A hashable description of a target: (kind, class, box / pixel / mask bytes / upload id)."""


class RequestError(SegCamError, ValueError):
    """A request the viewer cannot answer (bad field, out of range)."""


class SupersededError(SegCamError):
    """A request cancelled by a newer one of the same page."""


def b64(array: np.ndarray) -> str:
    """An array's bytes (row-major) as base64 text."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def int_field(payload: Mapping[str, Any], key: str, low: int, high: int, what: str) -> int:
    """``payload[key]`` as an integer in [low, high)."""
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


@dataclass(frozen=True)
class Grid:
    """The input's grid and how its slices are shown: views, cuts, painted masks, extents."""

    spatial: tuple[int, ...]
    planes: Sequence[Plane]  # one per voxel axis of a volume; none for a 2D image
    flat: Plane | None = None  # a 2D image cut from an oriented volume: how it is shown

    def view(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        """The request's (axis, slice index); (-1, -1) for a 2D image."""
        if len(self.spatial) == 2:
            return -1, -1
        axis = int_field(payload, "axis", 0, 3, "axis")
        index = int_field(payload, "index", 0, self.spatial[axis], f"slice index on axis {axis}")
        return axis, index

    def cut(self, array: np.ndarray, view: tuple[int, int]) -> np.ndarray:
        """The shown plane of a (*S) array, in display order (the array itself in 2D)."""
        axis, index = view
        if axis < 0:
            return array if self.flat is None else self.flat.cut(array[..., None], 0)
        return self.planes[axis].cut(array, index)

    def extent(self, pixel_set: np.ndarray) -> dict[str, Any]:
        """Where a pixel set lies: its [first, last] index on each axis (None when empty)."""
        if not pixel_set.any():
            return {"extent": None}
        extent = []
        for axis in range(pixel_set.ndim):
            others = tuple(a for a in range(pixel_set.ndim) if a != axis)
            hits = np.flatnonzero(pixel_set.any(axis=others))
            extent.append([int(hits[0]), int(hits[-1])])
        return {"extent": extent}

    def painted_mask(self, spec: Mapping[str, Any]) -> np.ndarray:
        """A painted mask: the whole image (2D), or painted slices of a volume (3D).

        3D: ``slices`` is a list of ``{axis, index, data}``, each plane in display order (one
        slice: ``axis``, ``index`` and ``data`` on the spec itself). ``data`` is base64 bytes 0/1.
        """
        mask = np.zeros(self.spatial, dtype=bool)
        if len(self.spatial) == 2:
            painted = self._painted(spec, (-1, -1))
            if self.flat is None:
                mask[...] = painted
            else:  # back from display order to the image's
                volume = mask[..., None]
                self.flat.place(painted, volume, 0)
            return mask
        slices = spec.get("slices", [spec])
        if not isinstance(slices, list) or not 1 <= len(slices) <= sum(self.spatial):
            raise RequestError(f"slices must be a list of 1 to {sum(self.spatial)} painted slices")
        for item in slices:
            if not isinstance(item, Mapping):
                raise RequestError(f"a painted slice must be an object; got {item!r}")
            view = self.view(item)
            painted = np.zeros(self.spatial, dtype=bool)
            self.planes[view[0]].place(self._painted(item, view), painted, view[1])
            mask |= painted
        return mask

    def _painted(self, spec: Mapping[str, Any], view: tuple[int, int]) -> np.ndarray:
        plane = self.cut(np.zeros(self.spatial, dtype=np.uint8), view).shape
        try:
            raw = base64.b64decode(str(spec.get("data", "")), validate=True)
        except ValueError:
            raise RequestError("the painted mask is not valid base64") from None
        if len(raw) != int(np.prod(plane)):
            raise RequestError(
                f"the painted mask has {len(raw)} pixels; the slice has {int(np.prod(plane))}"
            )
        return np.asarray(np.frombuffer(raw, dtype=np.uint8).reshape(plane) != 0, dtype=bool)


class Upload(NamedTuple):
    """A page's uploaded mask (its values: a label map keeps its labels) and its SHA-256."""

    values: np.ndarray
    digest: str

    @classmethod
    def of(cls, values: np.ndarray) -> Upload:
        """The upload of ``values``, digested once."""
        return cls(values, hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest())


def parse_target(
    payload: Mapping[str, Any], grid: Grid, classes: int, uploaded: Upload | None
) -> tuple[segcam.Target, TargetKey]:
    """The target of a request and a hashable key of it.

    Kinds: ``predicted``, ``pixel`` (``index``), ``box`` (``start``, ``stop``), ``mask``
    (painted, :meth:`Grid.painted_mask`) and ``uploaded`` (the mask this page uploaded before;
    its key is the content's digest, so cached maps never outlive the mask they were made of).
    """
    c = int_field(payload, "class", 0, max(classes, 2), "class")
    spec = payload.get("target") or {"kind": "predicted"}
    if not isinstance(spec, Mapping):
        raise RequestError(f"target must be an object; got {spec!r}")
    kind = spec.get("kind")
    if kind == "predicted":
        return segcam.Predicted(c), ("predicted", c)
    if kind == "pixel":
        index = _index_list(spec.get("index"), grid.spatial, "pixel index")
        return segcam.Pixel(c, tuple(index)), ("pixel", c, tuple(index))
    if kind == "box":
        start = _index_list(spec.get("start"), grid.spatial, "box start")
        stop = _index_list(spec.get("stop"), grid.spatial, "box stop", end=True)
        if any(a >= b for a, b in zip(start, stop, strict=True)):
            raise RequestError(f"the box is empty: start {start}, stop {stop}")
        box = [(a, b) for a, b in zip(start, stop, strict=True)]
        return segcam.Box(c, box), ("box", c, tuple(box))
    if kind == "mask":
        mask = grid.painted_mask(spec)
        return segcam.Mask(c, torch.from_numpy(mask)), ("mask", c, mask.tobytes())
    if kind == "uploaded":
        if uploaded is None:
            raise RequestError("no mask was uploaded from this page")
        given = segcam.Mask(c, torch.from_numpy(uploaded.values))
        return given, ("uploaded", c, uploaded.digest)
    raise RequestError(f"unknown target kind {kind!r}: predicted, pixel, box, mask or uploaded")


def methods_of(payload: Mapping[str, Any]) -> list[str]:
    """The request's methods (default: :data:`DEFAULT_METHODS`), 1 to 4 registered names."""
    methods = payload.get("methods", list(DEFAULT_METHODS))
    if not isinstance(methods, list) or not 1 <= len(methods) <= MAX_METHODS:
        raise RequestError(f"methods must be a list of 1 to {MAX_METHODS} method names")
    for method in methods:
        if not isinstance(method, str) or method not in REGISTRY:
            raise RequestError(f"unknown method {method!r}; registered: {', '.join(REGISTRY)}")
    return methods


MAX_PANELS = 2  # map panels a request may fill
PANEL_KEYS = frozenset({"method", "layer", "class", "signed"})


@dataclass(frozen=True)
class Panel:
    """One map panel of a request: a method at a layer for a class, shown signed or not."""

    method: str
    layer: str | None  # None: the request's layer
    class_index: int | None  # None: the request's class
    signed: bool


def panels_of(payload: Mapping[str, Any]) -> list[Panel]:
    """The request's map panels: ``panels`` ({method, layer?, class?, signed?}), else its methods.

    A panel without a layer or class takes the request's; a request without ``panels`` has one
    panel per method, unsigned (``signed`` may list methods shown signed).
    """
    given = payload.get("panels")
    if given is None:
        signed = payload.get("signed", [])
        if not isinstance(signed, list) or not all(
            isinstance(m, str) and m in REGISTRY for m in signed
        ):
            raise RequestError(f"signed must be a list of method names; got {signed!r}")
        return [Panel(m, None, None, m in signed) for m in methods_of(payload)]
    if not isinstance(given, list) or not 1 <= len(given) <= MAX_PANELS:
        raise RequestError(f"panels must be a list of 1 to {MAX_PANELS} {{method, layer, class}}")
    panels = []
    for item in given:
        if not isinstance(item, Mapping):
            raise RequestError(f"a panel must be an object; got {item!r}")
        unknown = sorted(str(k) for k in item if k not in PANEL_KEYS)
        if unknown:
            raise RequestError(f"unknown panel fields {unknown}: method, layer, class, signed")
        method = methods_of({"methods": [item.get("method")]})[0]
        layer = item.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise RequestError(f"a panel's layer must be a layer name; got {layer!r}")
        c = item.get("class")
        if c is not None and (isinstance(c, bool) or not isinstance(c, int)):
            raise RequestError(f"a panel's class must be an integer; got {c!r}")
        signed = item.get("signed", False)
        if not isinstance(signed, bool):
            raise RequestError(f"a panel's signed must be true or false; got {signed!r}")
        panels.append(Panel(method, layer, c, signed))
    return panels


def client_of(payload: Mapping[str, Any]) -> str:
    """The requesting page's own id (requests of one page supersede each other)."""
    client = payload.get("client", "")
    if not isinstance(client, str) or len(client) > 64:
        raise RequestError("client must be a short string (the page's own id)")
    return client
