"""The viewer's exports: the shown map as a file, made from the request, never from state.

Each export names everything it holds (method, class, layer, target, the shown slice) in its
metadata, so two tabs never export each other's maps. Formats: ``nifti`` (3D, ``.nii.gz`` with
the input's affine and a description), ``json`` (the metadata as a sidecar), ``png`` (2D, the
overlay with a colour bar), ``npz`` (map, signed map, pixel set, metadata) and ``pixel_set``
(the explained set: NIfTI 0/1 with the input's affine in 3D, a PNG mask in 2D). Files are made
in memory; the page downloads them.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segcam.apps.naming import map_stem, safe_name
from segcam.apps.viewer.requests import RequestError, TargetKey
from segcam.viz import overlay

__all__ = ["EXPORT_FORMATS", "describe_key", "export_file"]

EXPORT_FORMATS = ("nifti", "json", "png", "npz", "pixel_set")


def describe_key(key: TargetKey) -> dict[str, Any]:
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
    signed = " signed" if str(metadata.get("map", "")).startswith("signed") else ""
    text = (
        f"segcam {metadata['method']}{signed} class={metadata['class']} "
        f"layer={metadata['layer']} target={metadata['target']['kind']}"
    )
    if len(text) <= 79:
        return text
    cut = text[:76].rsplit(" ", 1)[0]  # whole words, never one cut in the middle
    return f"{cut}..."


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


def export_file(
    kind: Any,
    heat: np.ndarray,
    pixel_set: np.ndarray,
    metadata: Mapping[str, Any],
    *,
    spatial: Sequence[int],
    display: np.ndarray,
    affine: np.ndarray | None,
    signed: np.ndarray | None = None,
) -> tuple[bytes, str, str]:
    """(content, media type, file name) of one map in the format ``kind``.

    ``npz`` also holds the raw signed map (``signed_map``) when it is given.
    """
    # the one naming scheme of map files (segcam.apps.naming): the viewer explains one target
    stem = map_stem(
        metadata["method"], metadata["layer"], 0, metadata["target"]["kind"], str(metadata["class"])
    )
    if str(metadata.get("map", "")).startswith("signed"):
        stem += "__signed"  # never the same name as the ReLU'd map's
    if kind == "json":
        content = (json.dumps(metadata, indent=1) + "\n").encode()
        return content, "application/json", f"{stem}.json"
    if kind == "npz":
        stream = io.BytesIO()
        arrays = {"map": heat, "pixel_set": pixel_set, "metadata": np.array(json.dumps(metadata))}
        if signed is not None:
            arrays["signed_map"] = signed
        np.savez_compressed(stream, **arrays)  # type: ignore[arg-type]
        return stream.getvalue(), "application/octet-stream", f"{stem}.npz"
    if kind == "png":
        if len(spatial) != 2:
            raise RequestError("PNG export is for 2D images; export 3D maps as NIfTI")
        return _png_with_colour_bar(display, heat), "image/png", f"{stem}.png"
    if kind == "pixel_set":  # the explained set: NIfTI (3D, 0/1 on the input's grid) or PNG (2D)
        kind_name, class_name = (
            safe_name(metadata["target"]["kind"]),
            safe_name(str(metadata["class"])),
        )
        stem = f"pixel_set__t0-{kind_name}-{class_name}"
        if len(spatial) == 3:
            from segcam.io.files import nifti_bytes

            description = (
                f"segcam pixel set class={metadata['class']} target={metadata['target']['kind']}"
            )
            raw = nifti_bytes(
                pixel_set.astype(np.float32),
                np.eye(4) if affine is None else affine,
                description=description,
            )
            return gzip.compress(raw, compresslevel=6), "application/gzip", f"{stem}.nii.gz"
        from PIL import Image

        stream = io.BytesIO()
        Image.fromarray((np.asarray(pixel_set) != 0).astype(np.uint8) * 255).save(stream, "PNG")
        return stream.getvalue(), "image/png", f"{stem}.png"
    if kind == "nifti":
        if len(spatial) != 3:
            raise RequestError("NIfTI export is for 3D volumes; export 2D maps as PNG")
        from segcam.io.files import nifti_bytes

        affine = np.eye(4) if affine is None else affine
        raw = nifti_bytes(heat, affine, description=_description(metadata))
        return gzip.compress(raw, compresslevel=6), "application/gzip", f"{stem}.nii.gz"
    raise RequestError(f"unknown export format {kind!r}: nifti, json, png, npz or pixel_set")
