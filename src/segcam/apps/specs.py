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
from segcam.io.files import InputFileError, read_input

__all__ = [
    "SpecError",
    "apply_intensity",
    "file_sha256",
    "load_callable",
    "load_model",
    "parse_class",
    "parse_target",
]


class SpecError(SegCamError, ValueError):
    """A command-line specification (model, target, option) cannot be understood."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SpecError(
            f"--weights {path}: not a tensors-only checkpoint ({type(error).__name__}); a pickled "
            f"whole model loads only with --trust-pickle, and only from a source you trust"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"--weights {path}: expected a state_dict (name -> tensor)")
    return state


def load_model(
    spec: str | None,
    weights: Path | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the model of ``spec`` and load ``weights``; the result is in eval mode.

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
        state = _read_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise SpecError(f"--weights {weights} do not fit --model {spec}: {first}") from error
    return model.eval()


def parse_class(text: str, class_names: Sequence[str]) -> int:
    """A class by index (``2``) or by name from ``--classes`` (``tumour``)."""
    if text.lstrip("-").isdigit():
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


def parse_target(spec: str, class_names: Sequence[str] = ()) -> target_module.Target:
    """Parse one ``--target``.

    Forms: ``predicted:C``, ``probability:C[:THRESHOLD]``, ``all:C``, ``mask:C:FILE``,
    ``region:C[:FILE]``, ``pixel:C:I,J[,K]``, ``box:C:I0,J0,I1,J1`` (2D) or
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
        try:
            mask = read_input(argument).array
        except InputFileError as error:
            raise TargetError(f"--target {spec!r}: {error}") from error
        boolean = mask[0] != 0 if mask.shape[0] == 1 else mask.any(axis=0)
        return (
            target_module.Region(c, boolean) if kind == "region" else target_module.Mask(c, boolean)
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
