"""The result of :func:`segcam.explain`: maps, logits, pixel sets and how they were made.

Files: ``.npz`` (NumPy, always available) or ``.safetensors`` (the ``[safetensors]`` extra), each
holding the arrays plus JSON metadata. Neither format pickles, so loading a file runs no code.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from segcam.checks import check_finite_maps
from segcam.errors import ExplanationFileError, LayerError
from segcam.fusion import fuse_layers
from segcam.io.writing import atomic_write
from segcam.pixel_sets import as_pixel_set
from segcam.postprocess import PostProcessing
from segcam.targets import Target, TargetLike, warn_empty_pixel_sets

__all__ = ["Explanation", "SavedTarget", "assemble", "load"]

FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class SavedTarget(Target):
    """A target read back from a file: its class, its description and the stored pixel set."""

    class_index: int
    description: Mapping[str, Any]
    mask: torch.Tensor = field(repr=False)

    def pixel_set(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return as_pixel_set(self.mask, logits, f"SavedTarget(class {self.class_index})")

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return dict(self.description)


def _describe(target: TargetLike) -> dict[str, Any]:
    describe = getattr(target, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"type": type(target).__name__, "class_index": int(target.class_index)}


@dataclass(frozen=True, eq=False)
class Explanation:
    """Maps for T targets through one or more layers of one batch of N inputs.

    Attributes:
        layer_maps: layer name -> maps of shape (N, T, *S), in the order the layers were given.
            S is the input's spatial size when up-sampled, else the layer's.
        logits: the model's output (N, K, *S_out), detached.
        pixel_sets: the pixel set M of every sample and target, (N, T, *S_out) bool.
        targets: the targets, in order.
        method: the registered method name.
        relu, upsampled, normalize: the post-processing applied to the raw maps.
        layer_shapes: layer name -> activation shape (N, C, *S_layer) (token layers: as laid
            on their grid).
        method_options: the method's options as used (defaults included).
        info: further facts about how the maps were made (JSON-like), e.g. the windows of
            :func:`segcam.explain_sliding_window`.
        members: the explanations this one sums, by name (an ensemble's members: nnU-Net's
            folds as ``fold_0``, ... with ``segcam.nnunet.explain(per_fold=True)``); not saved
            to files.
    """

    layer_maps: Mapping[str, torch.Tensor]
    logits: torch.Tensor
    pixel_sets: torch.Tensor
    targets: tuple[TargetLike, ...]
    method: str
    relu: bool
    upsampled: bool
    normalize: str | None
    layer_shapes: Mapping[str, tuple[int, ...]]
    method_options: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    members: Mapping[str, Explanation] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_maps", MappingProxyType(dict(self.layer_maps)))
        object.__setattr__(self, "layer_shapes", MappingProxyType(dict(self.layer_shapes)))
        object.__setattr__(self, "method_options", MappingProxyType(dict(self.method_options)))
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name!r}: {tuple(maps.shape)}" for name, maps in self.layer_maps.items()
        )
        steps = [s for s, on in (("relu", self.relu), ("upsampled", self.upsampled)) if on]
        if self.normalize:
            steps.append(f"normalize={self.normalize}")
        return (
            f"Explanation(method={self.method!r}, layers={{{shapes}}}, "
            f"targets={list(self.targets)!r}, postprocess={steps or 'raw'})"
        )

    @property
    def layers(self) -> tuple[str, ...]:
        """The explained layers' names, in order."""
        return tuple(self.layer_maps)

    @property
    def maps(self) -> torch.Tensor:
        """The maps (N, T, *S) of the single explained layer.

        With several layers the maps may differ in resolution, so there is no single tensor:
        use :attr:`layer_maps` (or ``explain(..., upsample=True)`` and stack them yourself).
        """
        if len(self.layer_maps) != 1:
            raise LayerError(
                f"this explanation holds {len(self.layer_maps)} layers ({', '.join(self.layers)}); "
                f"use .layer_maps[name] for one of them"
            )
        return next(iter(self.layer_maps.values()))

    def fused(self, rule: str = "layercam", *, gamma: float = 2.0) -> torch.Tensor:
        """The layers' maps combined into one (N, T, *S_in) map: see :func:`segcam.fuse_layers`."""
        return fuse_layers(self, rule, gamma=gamma)

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored with the arrays."""
        return {
            "format": "segcam.explanation",
            "version": FORMAT_VERSION,
            "layers": list(self.layers),
            "layer_shapes": {name: list(shape) for name, shape in self.layer_shapes.items()},
            "method": self.method,
            "method_options": dict(self.method_options),
            "info": dict(self.info),
            "relu": self.relu,
            "upsampled": self.upsampled,
            "normalize": self.normalize,
            "targets": [_describe(target) for target in self.targets],
        }

    def _arrays(self) -> dict[str, torch.Tensor]:
        arrays = {f"map_{i}": maps for i, maps in enumerate(self.layer_maps.values())}
        arrays["logits"] = self.logits
        arrays["pixel_sets"] = self.pixel_sets
        return {key: value.detach().cpu().contiguous() for key, value in arrays.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` (``.npz`` or ``.safetensors``) atomically; return the path.

        The file appears complete or not at all (:func:`segcam.io.writing.atomic_write`: the
        folder is created, the data written under a temporary name, synced and renamed); a
        folder that cannot be made or written raises :class:`~segcam.errors.OutputFileError`.
        """
        if not isinstance(path, str | os.PathLike):
            raise ExplanationFileError(
                f"save takes a file path (str or pathlib.Path); got {type(path).__name__}"
            )
        target = Path(path)
        suffix = target.suffix.lower()
        if suffix not in (".npz", ".safetensors"):
            raise ExplanationFileError(
                f"cannot save to {target}: use a .npz or .safetensors file name"
            )
        arrays, metadata = self._arrays(), json.dumps(self.metadata())
        payload = None if suffix == ".npz" else _safetensors_bytes(arrays, metadata)
        with atomic_write(target) as stream:
            if payload is None:
                numpy_arrays = {key: value.numpy() for key, value in arrays.items()}
                numpy_arrays["metadata"] = np.array(metadata)
                _write_npz(stream, numpy_arrays)
            else:
                stream.write(payload)
        return target


def assemble(
    raw_maps: Mapping[str, Mapping[str, torch.Tensor]],
    method_options: Mapping[str, Mapping[str, Any]],
    *,
    logits: torch.Tensor,
    pixel_sets: torch.Tensor,
    targets: Sequence[TargetLike],
    post: PostProcessing,
    size: Sequence[int] | None,
    layer_shapes: Mapping[str, tuple[int, ...]],
    inputs: torch.Tensor,
    info: Mapping[str, Any] | None = None,
    method_info: Mapping[str, Mapping[str, Any]] | None = None,
    members: Mapping[str, Mapping[str, Explanation]] | None = None,
    warn_empty: bool = True,
) -> dict[str, Explanation]:
    """The one assembly of explanations from raw maps, shared by every driver.

    Whole inputs (:func:`segcam.explain`), sliding windows and nnU-Net cases all end here: the
    raw maps are checked to be finite (a :class:`~segcam.errors.NonFiniteError` names the
    method, layer and target), an empty pixel set is warned about once
    (:class:`~segcam.errors.SegCamWarning`), and ``post`` is applied (ReLU, up-sampling to
    ``size``, normalisation).

    Args:
        raw_maps: method name -> layer name -> raw maps (N, T, *grid), in the output's order.
        method_options: method name -> its options as used.
        logits: the logits the scores were taken on (N, K, *S).
        pixel_sets: the targets' pixel sets (N, T, *S).
        targets: the targets, in order.
        post: the post-processing.
        size: the grid maps are up-sampled to (``None``: maps a driver already placed on
            their grid).
        layer_shapes: layer name -> activation shape.
        inputs: the input, whose scale an overflow message names.
        info: facts shared by every method's explanation.
        method_info: method name -> facts that replace ``info`` for that method.
        members: method name -> its member explanations (nnU-Net's folds).
        warn_empty: False for explanations assembled as members of another.
    """
    for method, layers in raw_maps.items():
        for layer, maps in layers.items():
            check_finite_maps(maps, method, layer, targets, inputs)
    if warn_empty:
        warn_empty_pixel_sets(pixel_sets.flatten(2).any(dim=2), targets)
    return {
        method: Explanation(
            layer_maps={layer: post.apply(maps, size) for layer, maps in layers.items()},
            logits=logits,
            pixel_sets=pixel_sets,
            targets=tuple(targets),
            method=method,
            relu=post.relu,
            upsampled=post.upsample,
            normalize=post.normalize,
            layer_shapes=dict(layer_shapes),
            method_options=dict(method_options[method]),
            info=dict((method_info or {}).get(method, info or {})),
            members=dict((members or {}).get(method, {})),
        )
        for method, layers in raw_maps.items()
    }


_PROBE_BYTES = 1 << 20


def _write_npz(stream: Any, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` (a zip of ``.npy`` members) that ``np.load`` reads, written fast.

    Each member is streamed into the archive (no in-memory copy), deflated at level 1, or stored
    when a 1 MiB probe of it shrinks by less than a fifth: float logits barely compress, while
    maps and pixel sets do, and level 1 compresses them within a few percent of level 6 (the
    benchmarks page, "Choices measured", has the figures).
    """
    with zipfile.ZipFile(
        stream, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True
    ) as archive:
        for key, array in arrays.items():
            array = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d
            probe = array.reshape(-1)[: max(_PROBE_BYTES // max(array.itemsize, 1), 1)].tobytes()
            shrinks = len(zlib.compress(probe, 1)) < 0.8 * len(probe)
            member: str | zipfile.ZipInfo = f"{key}.npy"
            if not shrinks:  # a ZipInfo carries its own compression: stored
                member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                member.compress_type = zipfile.ZIP_STORED
            with archive.open(member, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)


def _safetensors_bytes(arrays: dict[str, torch.Tensor], metadata: str) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError as error:
        raise ExplanationFileError(
            "saving .safetensors needs the safetensors package: pip install 'segcam[safetensors]'"
        ) from error
    return bytes(save(arrays, metadata={"segcam": metadata}))


_METADATA_BYTES = 16 << 20  # JSON metadata larger than this is not an explanation's
_HEADER_BYTES = 4096  # room for an .npy header beyond the data


def _expected_shapes(metadata: dict[str, Any], layers: list[str]) -> dict[str, tuple[int, ...]]:
    """The arrays an explanation needs and their shapes, from its metadata (-1: any size).

    Checks the format and version first.
    """
    if not isinstance(metadata, dict) or metadata.get("format") != "segcam.explanation":
        raise ExplanationFileError("not a segcam explanation file")
    if metadata.get("version") != FORMAT_VERSION:
        raise ExplanationFileError(
            f"format version {metadata.get('version')}; this segcam reads version {FORMAT_VERSION}"
        )
    shapes = {name: tuple(int(v) for v in metadata["layer_shapes"][name]) for name in layers}
    batch, targets = next(iter(shapes.values()))[0], len(metadata["targets"])
    expected: dict[str, tuple[int, ...]] = {
        "logits": (batch, -1),
        "pixel_sets": (batch, targets),
    }
    for index, name in enumerate(layers):
        grid = shapes[name][2:] if not metadata["upsampled"] else ()
        expected[f"map_{index}"] = (batch, targets, *grid)
    return expected


def _check_shape(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    prefix = len(expected)
    if len(shape) < max(prefix, 3) or any(
        e not in (-1, s) for e, s in zip(expected, shape[:prefix], strict=False)
    ):
        raise ExplanationFileError(
            f"member {key!r} has shape {shape}, which does not fit the metadata "
            f"(expected {expected} then the grid)"
        )


def _read_npz(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Only the members an explanation needs, each checked against the metadata first.

    The declared (uncompressed) size of every member read is bounded by what its shape needs,
    so a crafted archive cannot make ``load`` allocate more than the explanation's arrays.
    """
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        info = members.get("metadata.npy")
        if info is None or info.file_size > _METADATA_BYTES:
            raise ExplanationFileError(f"cannot read {path}: no metadata member of sane size")
        with archive.open(info) as stream:
            metadata = json.loads(str(np.lib.format.read_array(stream, allow_pickle=False)))
        layers = list(metadata.get("layers", [])) if isinstance(metadata, dict) else []
        expected = _expected_shapes(metadata, layers)
        arrays: dict[str, torch.Tensor] = {}
        for key, prefix in expected.items():
            info = members.get(f"{key}.npy")
            if info is None:
                raise ExplanationFileError(f"cannot read {path}: member {key!r} is missing")
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                else:
                    raise ExplanationFileError(f"member {key!r}: .npy version {version}")
                _check_shape(key, tuple(shape), prefix)
                needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if info.file_size > needed + _HEADER_BYTES:
                    raise ExplanationFileError(
                        f"cannot read {path}: member {key!r} declares {info.file_size} bytes for "
                        f"an array of {needed}"
                    )
            with archive.open(info) as stream:
                arrays[key] = torch.from_numpy(np.lib.format.read_array(stream, allow_pickle=False))
    return arrays, metadata


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise ExplanationFileError(
                "reading .safetensors needs the safetensors package: "
                "pip install 'segcam[safetensors]'"
            ) from error
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads(handle.metadata()["segcam"])
            layers = list(metadata.get("layers", [])) if isinstance(metadata, dict) else []
            expected = _expected_shapes(metadata, layers)
            arrays = {}
            for key, prefix in expected.items():
                _check_shape(key, tuple(handle.get_slice(key).get_shape()), prefix)
                arrays[key] = handle.get_tensor(key)
        return arrays, metadata
    raise ExplanationFileError(f"cannot read {path}: expected a .npz or .safetensors file")


def load(path: str | os.PathLike[str]) -> Explanation:
    """Read an explanation written by :meth:`Explanation.save` (maps and logits on the CPU)."""
    source = Path(path)
    if source.is_dir():
        raise ExplanationFileError(f"cannot read {source}: a folder, not a saved explanation")
    if not source.is_file():
        raise ExplanationFileError(f"cannot read {source}: no such file")
    try:
        arrays, metadata = _read(source)
        if metadata.get("format") != "segcam.explanation":
            raise ExplanationFileError(f"{source} is not a segcam explanation file")
        if metadata.get("version") != FORMAT_VERSION:
            raise ExplanationFileError(
                f"{source} has format version {metadata.get('version')}; this segcam reads "
                f"version {FORMAT_VERSION}"
            )
        layers = list(metadata["layers"])
        pixel_sets = arrays["pixel_sets"].bool()
        targets: tuple[TargetLike, ...] = tuple(
            SavedTarget(int(described["class_index"]), described, pixel_sets[:, index])
            for index, described in enumerate(metadata["targets"])
        )
        return Explanation(
            layer_maps={name: arrays[f"map_{i}"] for i, name in enumerate(layers)},
            logits=arrays["logits"],
            pixel_sets=pixel_sets,
            targets=targets,
            method=str(metadata["method"]),
            relu=bool(metadata["relu"]),
            upsampled=bool(metadata["upsampled"]),
            normalize=metadata["normalize"],
            layer_shapes={k: tuple(v) for k, v in metadata["layer_shapes"].items()},
            method_options=dict(metadata.get("method_options", {})),
            info=dict(metadata.get("info", {})),
        )
    except ExplanationFileError as error:
        if str(source) in str(error):
            raise
        raise ExplanationFileError(f"cannot read {source}: {error}") from error
    except (KeyError, ValueError, TypeError, OSError, zipfile.BadZipFile) as error:
        raise ExplanationFileError(
            f"cannot read {source}: damaged or not an explanation ({error})"
        ) from error
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ExplanationFileError(f"cannot read {source}: {error}") from error
