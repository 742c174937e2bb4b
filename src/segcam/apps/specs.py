"""Text specifications used by the command line: models, weights, targets, intensity options.

Kept apart from the CLI so that they can be tested and reused (the viewer reads the same specs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcam import targets as target_module
from segcam.errors import SegCamError, TargetError
from segcam.io.files import InputFile, InputFileError, read_input

__all__ = [
    "SpecError",
    "apply_intensity",
    "file_sha256",
    "label_map",
    "load_callable",
    "load_model",
    "parse_class",
    "parse_target",
]


class SpecError(SegCamError, ValueError):
    """A command-line specification (model, target, option) cannot be understood."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file; of a folder (a DICOM series): of its files' names and bytes."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:name`` -> the object it names (imported)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SpecError(f"{what} {spec!r} must look like package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(f"{what} {spec!r}: cannot import {module_name} ({error})") from error
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise SpecError(f"{what} {spec!r}: {module_name} has no {attribute}")
        found = getattr(found, part)
    if not callable(found):
        raise SpecError(f"{what} {spec!r} is not callable")
    return found  # type: ignore[no-any-return]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            name.endswith(("constants.pkl", "code/__torch__.py")) or "/code/" in name
            for name in archive.namelist()
        )


COMMON_KEYS = ("state_dict", "model_state_dict", "model", "network_weights", "net", "weights")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _read_checkpoint(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise SpecError(
                "--weights .safetensors needs pip install 'segcam[safetensors]'"
            ) from error
        try:
            return dict(load_file(str(path)))
        except Exception as error:  # safetensors raises its own types for damaged files
            raise SpecError(
                f"--weights {path}: not a readable .safetensors file ({type(error).__name__}: "
                f"{error})"
            ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SpecError(
            f"--weights {path}: not a tensors-only checkpoint ({type(error).__name__}: "
            f"{first[:200]}); a pickled whole model loads only with --trust-pickle, and only "
            f"from a source you trust"
        ) from error


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _state_dict(checkpoint: Any, path: Path, key: str | None) -> tuple[dict[str, Any], str]:
    """The state dict inside a checkpoint, and where it was found."""
    if key is not None:
        found: Any = checkpoint
        for part in key.split("."):
            if not isinstance(found, dict) or part not in found:
                top = list(checkpoint)[:10] if isinstance(checkpoint, dict) else []
                raise SpecError(f"--weights-key {key!r} is not in {path} (its keys: {top})")
            found = found[part]
        if not _is_state_dict(found):
            raise SpecError(f"--weights {path}: key {key!r} does not hold a state dict")
        return found, f"key {key!r}"
    if _is_state_dict(checkpoint):
        return checkpoint, "the whole file"
    if isinstance(checkpoint, dict):
        for common in COMMON_KEYS:
            if _is_state_dict(checkpoint.get(common)):
                return checkpoint[common], f"key {common!r}"
        listed = ", ".join(map(repr, list(checkpoint)[:10]))
        raise SpecError(
            f"--weights {path}: no state dict found: it holds keys {listed}; tried "
            f"{', '.join(COMMON_KEYS)}; name the right one with --weights-key"
        )
    raise SpecError(f"--weights {path}: expected a state_dict (name -> tensor)")


def _strip_prefixes(state: dict[str, Any], wanted: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Strip ``module.`` / ``_orig_mod.`` prefixes the model's own names do not have."""
    stripped = []
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(
                k.startswith(prefix) for k in wanted
            ):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def _first(names: list[str], count: int = 3) -> str:
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names) - count} more)" if len(names) > count else "")


def load_weights(model: nn.Module, path: Path, key: str | None = None) -> str:
    """Load a checkpoint into ``model`` as checkpoints are found in the wild; say what was done.

    The state dict is the file itself, ``key`` (dotted for nested keys), or the first of
    :data:`COMMON_KEYS` that holds one (Lightning's ``state_dict``, nnU-Net's
    ``network_weights``, ``model``, ``net``, ...); a ``module.`` / ``_orig_mod.`` prefix
    (DataParallel, torch.compile) is stripped; missing ``num_batches_tracked`` buffers are
    accepted. Anything else that does not fit is refused with the missing and unexpected keys
    summarised. Always ``torch.load(weights_only=True)``.
    """
    state, where = _state_dict(_read_checkpoint(path), path, key)
    wanted = dict(model.state_dict())
    state, stripped = _strip_prefixes(dict(state), set(wanted))
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in tolerated]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(wanted[k].shape)}"
        for k in sorted(set(state) & set(wanted))
        if tuple(state[k].shape) != tuple(wanted[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} of other shapes ({_first(mismatched)})")
        raise SpecError(
            f"--weights {path} ({where}) does not fit the model {type(model).__name__}: "
            f"{'; '.join(parts)}"
        )
    model.load_state_dict(state, strict=False)
    notes = [f"from {where}"]
    if stripped:
        notes.append(f"prefix {'+'.join(stripped)} stripped")
    if tolerated:
        notes.append(f"{len(tolerated)} num_batches_tracked buffers absent")
    return ", ".join(notes)


def load_model(
    spec: str | None,
    weights: Path | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    trust_pickle: bool = False,
    weights_key: str | None = None,
) -> nn.Module:
    """Build the model of ``spec`` and load ``weights`` (:func:`load_weights`).

    Modes: a model the factory returns in training mode is put in eval mode; a model it returns
    in eval mode is left as it is, so submodules the factory set to training mode on purpose
    (instance statistics, say) keep it.

    ``spec`` is ``package.module:factory`` (called with ``kwargs``) or ``monai:NetName``
    (``monai.networks.nets.NetName(**kwargs)``). With ``trust_pickle`` and no spec, ``weights`` is
    a pickled whole model (``torch.load(weights_only=False)``: runs code from the file).
    TorchScript files are refused: their modules cannot be hooked.
    """
    kwargs = dict(kwargs or {})
    if weights is not None:
        if not weights.is_file():
            raise SpecError(f"--weights {weights}: no such file")
        if _is_torchscript(weights):
            raise SpecError(
                f"--weights {weights} is a TorchScript archive: scripted modules cannot be hooked "
                f"for CAMs; export the state_dict of the Python model instead"
            )
    if spec is None:
        if weights is None or not trust_pickle:
            raise SpecError("--model is required (or a pickled whole model with --trust-pickle)")
        model = torch.load(weights, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise SpecError(f"--weights {weights} holds {type(model).__name__}, not a model")
        return model.eval()
    if spec.startswith("monai:"):
        try:
            from monai.networks import nets
        except ImportError as error:
            raise SpecError("monai: models need pip install 'segcam[monai]'") from error
        name = spec.removeprefix("monai:")
        if not hasattr(nets, name):
            raise SpecError(f"--model {spec}: monai.networks.nets has no {name}")
        factory: Callable[..., Any] = getattr(nets, name)
    else:
        factory = load_callable(spec, "--model")
    try:
        model = factory(**kwargs)
    except SegCamError:
        raise
    except Exception as error:  # factories refuse their arguments with any exception type
        raise SpecError(
            f"--model {spec} with --model-kwargs {json.dumps(kwargs)}: "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(model, torch.jit.ScriptModule):
        raise SpecError(f"--model {spec} returned a TorchScript module, which cannot be hooked")
    if not isinstance(model, nn.Module):
        raise SpecError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, weights_key)
    return model.eval() if model.training else model


def parse_class(text: str, class_names: Sequence[str]) -> int:
    """A class by index (``2``) or by name from ``--classes`` (``tumour``)."""
    digits = text.removeprefix("-")
    if digits.isascii() and digits.isdigit():  # not '²' or other Unicode digits int() refuses
        return int(text)
    if text in class_names:
        return list(class_names).index(text)
    known = f"; known names: {', '.join(class_names)}" if class_names else " (give --classes)"
    raise TargetError(f"unknown class {text!r}{known}")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise TargetError(f"{what}: {text!r} is not a comma-separated list of integers") from None


EXACT_LABELS = 2**24  # float32 holds every integer up to here exactly, and no further


def split_label(argument: str, spec: str) -> tuple[str, int | None]:
    """``FILE=LABEL`` -> (FILE, LABEL); a plain ``FILE`` -> (FILE, None).

    Raises:
        TargetError: ``FILE`` exists but ``LABEL`` is no label value (a non-negative integer
            below 2**24).
    """
    path, equals, label = argument.rpartition("=")
    if not equals or Path(argument).is_file():
        return argument, None
    if not (label.isascii() and label.isdigit()):
        if Path(path).is_file():
            raise TargetError(
                f"--target {spec!r}: label {label!r} is not a label value; give a non-negative "
                f"integer, FILE=LABEL"
            )
        return argument, None
    if int(label) >= EXACT_LABELS:
        raise TargetError(
            f"--target {spec!r}: label {label} is beyond the labels segcam reads exactly "
            f"(below {EXACT_LABELS})"
        )
    return path, int(label)


def label_map(values: np.ndarray, what: str) -> np.ndarray:
    """Reference labels as integers (uint8 when they fit), or one line naming ``what``.

    Raises:
        InputFileError: values that are not non-negative integers (NaN, fractions, negatives).
    """
    values = np.asarray(values)
    if not np.isfinite(values).all() or (values != np.round(values)).any() or values.min() < 0:
        raise InputFileError(f"{what}: not labels (non-negative integers)")
    return np.round(values).astype(np.uint8 if values.max() < 256 else np.int64)


def mask_file(spec: str) -> Path | None:
    """The file a ``mask:C:FILE[=LABEL]`` or ``region:C:FILE[=LABEL]`` target reads (else None)."""
    kind, _, rest = spec.partition(":")
    argument = rest.partition(":")[2]
    if kind not in ("mask", "region") or not argument:
        return None
    return Path(split_label(argument, spec)[0])


def mask_geometry(data: InputFile) -> tuple[str, np.ndarray] | None:
    """Where a file's voxels lie, to compare a mask file with its input: None when unknown."""
    if data.nifti_affine is not None:
        return "affine", np.asarray(data.nifti_affine, dtype=np.float64)
    if data.medical is not None:
        g = data.medical.geometry
        return "itk", np.array([*g.spacing, *g.origin, *g.direction], dtype=np.float64)
    return None


def check_mask_geometry(spec: str, mask: tuple[str, np.ndarray] | None, data: InputFile) -> None:
    """Refuse a mask file whose voxels lie elsewhere than the input's (flipped, other spacing).

    Raises:
        InputFileError: both files say where their voxels lie, in the same terms, and differ.
    """
    image = mask_geometry(data)
    if mask is None or image is None or mask[0] != image[0] or mask[1].shape != image[1].shape:
        return
    if not np.allclose(mask[1], image[1], rtol=1e-4, atol=1e-3):
        what = "affine" if mask[0] == "affine" else "spacing, origin or direction"
        raise InputFileError(
            f"--target {spec!r}: the mask file's {what} differs from the input's (its voxels lie "
            f"elsewhere); resample it onto the input's grid first"
        )


def parse_target(spec: str, class_names: Sequence[str] = ()) -> target_module.Target:
    """Parse one ``--target``.

    Forms: ``predicted:C``, ``probability:C[:THRESHOLD]``, ``all:C``, ``mask:C:FILE[=LABEL]``,
    ``region:C[:FILE[=LABEL]]`` (a 0/1 mask gives its ones, a label map the voxels labelled C,
    ``=LABEL`` those of that value), ``pixel:C:I,J[,K]``, ``box:C:I0,J0,I1,J1`` (2D) or
    ``box:C:I0,J0,K0,I1,J1,K1`` (3D; ends exclusive). C is an index or a name from ``--classes``.
    """
    kind, _, rest = spec.partition(":")
    class_text, _, argument = rest.partition(":")
    if not class_text:
        raise TargetError(f"--target {spec!r}: expected KIND:CLASS[:...], e.g. predicted:1")
    c = parse_class(class_text, class_names)
    if kind == "predicted":
        return target_module.Predicted(c)
    if kind == "all":
        return target_module.AllPixels(c)
    if kind == "probability":
        try:
            threshold = float(argument) if argument else 0.5
        except ValueError:
            raise TargetError(
                f"--target {spec!r}: threshold {argument!r} is not a number"
            ) from None
        return target_module.Probability(c, threshold)
    if kind in ("mask", "region"):
        if not argument:
            if kind == "region":
                return target_module.Region(c)
            raise TargetError(f"--target {spec!r}: mask needs a file, mask:CLASS:FILE")
        path, label = split_label(argument, spec)
        try:
            mask = read_input(path).array
        except InputFileError as error:
            raise TargetError(f"--target {spec!r}: {error}") from error
        if mask.size and float(np.nanmax(np.abs(mask))) >= EXACT_LABELS:
            raise TargetError(
                f"--target {spec!r}: {path} holds values of {EXACT_LABELS} or more, which are "
                f"not read exactly; renumber its labels"
            )
        # one channel: its values, read as Mask reads an array (a label map: the class's label);
        # several: any of them. FILE=LABEL takes the voxels of that label value.
        values = mask[0] if mask.shape[0] == 1 else mask.any(axis=0)
        if label is not None:
            values = values == label
        return (
            target_module.Region(c, values) if kind == "region" else target_module.Mask(c, values)
        )
    if kind == "pixel":
        return target_module.Pixel(c, tuple(_ints(argument, f"--target {spec!r}")))
    if kind == "box":
        values = _ints(argument, f"--target {spec!r}")
        if len(values) not in (4, 6):
            raise TargetError(
                f"--target {spec!r}: a box is I0,J0,I1,J1 (2D) or I0,J0,K0,I1,J1,K1 (3D)"
            )
        half = len(values) // 2
        return target_module.Box(c, [(values[i], values[i + half]) for i in range(half)])
    raise TargetError(
        f"--target {spec!r}: unknown kind {kind!r}; use predicted, probability, all, mask, region, "
        f"pixel or box"
    )


def apply_intensity(
    array: np.ndarray,
    *,
    window: tuple[float, float] | None = None,
    zscore: bool = False,
    minmax: bool = False,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Apply the intensity options in order: window, z-score, min-max, a user function.

    The window clips to [low, high] and scales to [0, 1]; the user function takes and returns the
    (C, *S) array.
    """
    result = array.astype(np.float32)
    if window is not None:
        low, high = window
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SpecError(f"--window {low},{high}: the bounds must be finite numbers")
        if not high > low:
            raise SpecError(f"--window {low},{high}: the upper bound must exceed the lower")
        result = (np.clip(result, low, high) - low) / (high - low)
    if zscore:
        std = float(result.std())
        result = (result - result.mean()) / (std if std > 0 else 1.0)
    if minmax:
        span = float(result.max() - result.min())
        result = (result - result.min()) / (span if span > 0 else 1.0)
    if preprocess is not None:
        name = getattr(preprocess, "__qualname__", repr(preprocess))
        try:
            returned = preprocess(result)
        except SegCamError:
            raise
        except Exception as error:
            raise SpecError(
                f"--preprocess {name} failed on the (C, *S) array {result.shape}: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(returned, np.ndarray | torch.Tensor) or returned.ndim != result.ndim:
            what = (
                f"a {returned.ndim}-D array"
                if isinstance(returned, np.ndarray | torch.Tensor)
                else type(returned).__name__
            )
            raise SpecError(
                f"--preprocess {name} returned {what}; it must return a (C, *S) array like the "
                f"{result.ndim}-D one it is given"
            )
        try:
            result = np.asarray(returned, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise SpecError(f"--preprocess {name} returned values that are not numbers") from error
    return np.ascontiguousarray(result, dtype=np.float32)
