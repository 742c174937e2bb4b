"""Option groups shared by several commands, declared once, and the parsers of their values.

The groups: model, intensity, classes, output, sliding window, method options.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcam.errors import SegCamError
from segcam.memory_format import MEMORY_FORMATS
from segcam.methods import resolve_methods
from segcam.outputs import FromProbabilities, OutputSpec

__all__ = [
    "UsageError",
    "add_classes_option",
    "add_intensity_options",
    "add_model_options",
    "add_output_option",
    "add_sliding_window_option",
    "check_device",
    "intensity",
    "logits_output",
    "model_from_args",
    "non_negative_float",
    "output_spec",
    "parse_method_options",
    "positive_int",
]


class UsageError(SegCamError, ValueError):
    """A command-line mistake, reported in one line (exit status 2)."""


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise argparse.ArgumentTypeError(f"expected finite LOW,HIGH, got {text!r}")
    if not high > low:
        raise argparse.ArgumentTypeError(f"{text!r}: HIGH must exceed LOW")
    return low, high


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"spatial_dims\": 2}'")
    return value


def _sliding_window(text: str) -> dict[str, Any]:
    """``ROI[,OVERLAP]``: 96, 96x96x64, 96,0.5 -> {"roi_size": ..., "overlap": ...}."""
    roi_text, _, overlap_text = text.partition(",")
    try:
        sizes = [int(part) for part in roi_text.lower().split("x")]
        overlap = float(overlap_text) if overlap_text else 0.25
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROI[,OVERLAP], e.g. 96 or 96x96x64,0.5"
        ) from None
    if any(size < 1 for size in sizes) or not 0 <= overlap < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: window sizes must be positive and the overlap in [0, 1)"
        )
    return {"roi_size": sizes[0] if len(sizes) == 1 else sizes, "overlap": overlap}


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def check_device(text: str) -> None:
    """Refuse, before any work, a device that is malformed or not on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {text!r} is not a device: use cpu, cuda, cuda:1, mps, ..."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: this machine has no CUDA device (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s), "
                f"0..{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available here (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {text}: only cpu, cuda and mps are supported")


def _class_names(text: str) -> list[str]:
    """``NAME,NAME,...``: each class once, none empty (spaces around a name are dropped)."""
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty class name; give NAME,NAME,...")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, twice))} named more than once: a target by name would be "
            f"ambiguous; give each class its own name"
        )
    return names


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-kwargs``, ``--weights``, ``--trust-pickle``."""
    group = parser.add_argument_group(
        "model",
        "A model the factory returns in training mode is put in eval mode; one it returns in "
        "eval mode keeps its submodules' modes (e.g. instance norms set to use each input's "
        "statistics).",
    )
    group.add_argument("--model", help="package.module:factory or monai:NetName")
    group.add_argument(
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="keyword arguments for the factory",
    )
    group.add_argument(
        "--weights",
        type=Path,
        help="a checkpoint (.pt/.pth/.ckpt, or .safetensors): a state_dict, or one nested under "
        "a key (state_dict, model, network_weights, net, ... are tried), module./_orig_mod. "
        "prefixes stripped",
    )
    group.add_argument(
        "--weights-key",
        metavar="KEY",
        help="where the state_dict lies in the checkpoint (dotted for nested keys, e.g. ema.model)",
    )
    group.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --weights to be a pickled whole model (runs code from it)",
    )


def _step_size(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: the step size is a fraction in (0, 1]")
    return value


def _fold_name(text: str) -> int | str:
    if text.isdigit():
        return int(text)
    if text == "all":
        return "all"
    raise argparse.ArgumentTypeError(f"{text!r}: a fold is a number (0, 1, ...) or 'all'")


def add_nnunet_options(
    parser: argparse.ArgumentParser, *, inference: bool = True, save_seg: bool = True
) -> None:
    """``--nnunet MODEL_FOLDER`` (or ``-d -c [-tr] [-p]``) and nnUNetv2_predict's flags.

    nnU-Net's own spellings are taken as its users type them: ``-d DATASET -c CONFIGURATION
    [-tr TRAINER] [-p PLANS]`` find the model under ``$nnUNet_results`` as ``nnUNetv2_predict``
    finds it (:func:`resolve_nnunet_folder`), ``-f``, ``-chk``, ``-step_size``,
    ``--disable_tta`` beside segcam's ``--step-size`` and ``--disable-tta``.
    """
    group = parser.add_argument_group(
        "nnU-Net",
        "an nnU-Net v2 trained-model folder instead of --model (pip install 'segcam[nnunet]'); "
        "inputs are raw cases as for nnUNetv2_predict -i (CASE_0000.nii.gz, CASE_0001.nii.gz, "
        "...); nnUNetv2_predict's spellings work too",
    )
    group.add_argument("--nnunet", type=Path, metavar="MODEL_FOLDER", help="the model folder")
    group.add_argument(
        "-d",
        dest="nnunet_dataset",
        metavar="DATASET",
        help="as nnUNetv2_predict -d: the dataset name or id; the model is found under "
        "$nnUNet_results (with -c, -tr, -p)",
    )
    group.add_argument(
        "-c", dest="nnunet_configuration", metavar="CONFIGURATION", help="e.g. 3d_fullres (with -d)"
    )
    group.add_argument(
        "-tr", dest="nnunet_trainer", default="nnUNetTrainer", help="trainer (with -d)"
    )
    group.add_argument("-p", dest="nnunet_plans", default="nnUNetPlans", help="plans (with -d)")
    group.add_argument(
        "-f",
        "--folds",
        nargs="+",
        type=_fold_name,
        metavar="FOLD",
        help="folds to use (default: every fold present)",
    )
    group.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file name in each fold folder",
    )
    group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoints that pickle arbitrary objects (runs code from them)",
    )
    if not inference:
        return
    group.add_argument(
        "--step-size",
        "-step_size",
        type=_step_size,
        default=None,
        help="sliding-window step as a fraction of the patch (default 0.5)",
    )
    group.add_argument(
        "--disable-tta",
        "--disable_tta",
        action="store_true",
        help="no mirroring test-time augmentation",
    )
    if not save_seg:
        return
    group.add_argument(
        "--save-seg",
        action="store_true",
        help="also write nnU-Net's segmentation of each case (as nnUNetv2_predict writes it)",
    )
    group.add_argument(
        "--per-fold",
        action="store_true",
        help="also write each fold's own maps (names end in __fold_<f>) and the folds' "
        "agreement (into the manifest)",
    )


def resolve_nnunet_folder(args: argparse.Namespace) -> None:
    """``-d DATASET -c CONFIGURATION [-tr TRAINER] [-p PLANS]`` -> ``args.nnunet``.

    The folder is nnU-Net's own answer (``get_output_folder`` under ``$nnUNet_results``, the
    dataset id resolved as ``nnUNetv2_predict`` resolves it). Refused with one line: ``-d``
    beside ``--nnunet``, ``-d`` without ``-c`` (or ``-c`` without ``-d``), ``$nnUNet_results``
    unset, an unknown dataset, a folder that is not there.
    """
    import os

    dataset = getattr(args, "nnunet_dataset", None)
    configuration = getattr(args, "nnunet_configuration", None)
    if dataset is None:
        if configuration is not None:
            raise UsageError("-c names nnU-Net's configuration of -d DATASET: give -d too")
        return
    if args.nnunet is not None:
        raise UsageError("-d and --nnunet both name the model: give one of them")
    if configuration is None:
        raise UsageError(
            f"-d {dataset} needs -c CONFIGURATION (e.g. 3d_fullres), as nnUNetv2_predict"
        )
    if not os.environ.get("nnUNet_results"):  # noqa: SIM112 - nnU-Net's own name
        raise UsageError(
            f"-d {dataset} finds the model under $nnUNet_results, which is not set: export it as "
            f"for nnUNetv2_predict, or give --nnunet MODEL_FOLDER"
        )
    try:
        from nnunetv2.utilities.file_path_utilities import get_output_folder
    except ImportError as error:
        raise UsageError(f"-d needs nnU-Net: pip install 'segcam[nnunet]' ({error})") from None
    try:
        folder = Path(
            get_output_folder(dataset, args.nnunet_trainer, args.nnunet_plans, configuration)
        )
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UsageError(f"-d {dataset}: {reason}") from None
    if not folder.is_dir():
        raise UsageError(
            f"-d {dataset} -c {configuration}: no trained model at {folder} (trainer "
            f"{args.nnunet_trainer}, plans {args.nnunet_plans}; -tr and -p choose others)"
        )
    args.nnunet = folder


# nnU-Net's options and their defaults: given without an nnU-Net model, they are refused
NNUNET_ONLY = {
    "folds": ("-f/--folds", None),
    "checkpoint": ("-chk/--checkpoint", "checkpoint_final.pth"),
    "trust_checkpoint": ("--trust-checkpoint", False),
    "step_size": ("--step-size", None),
    "disable_tta": ("--disable-tta", False),
    "save_seg": ("--save-seg", False),
    "per_fold": ("--per-fold", False),
}


def refuse_nnunet_only(args: argparse.Namespace, allowed: tuple[str, ...] = ()) -> None:
    """One line when nnU-Net's options come without an nnU-Net model (they were ignored).

    ``allowed``: the options (by ``dest``) the command's other model takes too (a bundle's
    ``save_seg``).
    """
    given = [
        flag
        for dest, (flag, default) in NNUNET_ONLY.items()
        if dest not in allowed and hasattr(args, dest) and getattr(args, dest) != default
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)}: nnU-Net's options, for an nnU-Net model (--nnunet MODEL_FOLDER "
            f"or -d DATASET -c CONFIGURATION)"
        )


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """The model the model options describe (``--model``, ``--weights``, ...), loaded."""
    from segcam.apps.specs import load_model

    return load_model(
        args.model,
        args.weights,
        args.model_kwargs,
        trust_pickle=args.trust_pickle,
        weights_key=args.weights_key,
    )


def add_bundle_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--bundle FOLDER``: a MONAI bundle in the Model Zoo's layout."""
    parser.add_argument("--bundle", type=Path, metavar="FOLDER", help=help_text)


def add_intensity_options(parser: argparse.ArgumentParser) -> None:
    """``--window``, ``--zscore``, ``--minmax``."""
    group = parser.add_argument_group("intensity")
    group.add_argument(
        "--window",
        type=_pair,
        metavar="LOW,HIGH",
        help="clip intensities to [LOW, HIGH] and scale to [0, 1]",
    )
    group.add_argument("--zscore", action="store_true", help="subtract mean, divide by std")
    group.add_argument("--minmax", action="store_true", help="scale intensities to [0, 1]")


def intensity(args: argparse.Namespace) -> dict[str, Any]:
    """The intensity options as keyword arguments of ``apply_intensity``."""
    return {"window": args.window, "zscore": args.zscore, "minmax": args.minmax}


def add_classes_option(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--classes NAME,NAME,...``."""
    parser.add_argument(
        "--classes",
        type=_class_names,
        default=[],
        metavar="NAMES",
        help=f"class names in order, e.g. background,liver,tumour{what}",
    )


def given_model_options(args: argparse.Namespace) -> list[str]:
    """The model, output and intensity options given, by flag.

    An nnU-Net model folder or a bundle's own config gives all of them, so they are refused
    beside ``--nnunet`` or ``--bundle``.
    """
    options: tuple[tuple[str, str, Any], ...] = (
        ("--model", "model", None),
        ("--weights", "weights", None),
        ("--model-kwargs", "model_kwargs", {}),
        ("--weights-key", "weights_key", None),
        ("--trust-pickle", "trust_pickle", False),
        ("--output", "output", None),
        ("--logits-from", "logits_from", "logits"),
        ("--sliding-window", "sliding_window", None),
        ("--preprocess", "preprocess", None),
        ("--window", "window", None),
        ("--zscore", "zscore", False),
        ("--minmax", "minmax", False),
    )
    return [
        flag
        for flag, dest, default in options
        if hasattr(args, dest) and getattr(args, dest) not in (default, None, False, {})
    ]


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """``--output KEY|INDEX`` and ``--logits-from``: where the logits are, and what they are."""
    parser.add_argument(
        "--output",
        type=logits_output,
        help="key or index of the logits in the model's output",
    )
    parser.add_argument(
        "--logits-from",
        choices=["logits", "probabilities"],
        default="logits",
        help="probabilities: the model's output is softmax/sigmoid probabilities; explain "
        "log-probabilities (softmax) or the exact logits (sigmoid) made from them (see "
        "segcam.FromProbabilities for what this changes)",
    )


def output_spec(output: str | int | None, logits_from: str) -> OutputSpec:
    """The library's output spec for ``--output`` and ``--logits-from``."""
    return FromProbabilities(output) if logits_from == "probabilities" else output


def logits_output(text: str) -> str | int:
    """An index when the text is an integer, else a key."""
    return int(text) if text.lstrip("-").isdigit() else text


def add_memory_format_option(parser: argparse.ArgumentParser) -> None:
    """``--memory-format auto|channels-last|contiguous`` (:mod:`segcam.memory_format`)."""
    parser.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="auto",
        help="the convolutions' memory layout: auto = channels-last 3D convolutions for a "
        "float32 volume on the CPU (oneDNN's fast kernels, the same maps to float32 rounding), "
        "contiguous = the plain layout (an nnU-Net model's logits bit for bit nnU-Net's)",
    )


def add_sliding_window_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--sliding-window ROI[,OVERLAP]``, ``--sw-mode``, ``--sw-sigma`` (MONAI's blending)."""
    parser.add_argument(
        "--sliding-window", type=_sliding_window, metavar="ROI[,OVERLAP]", help=help_text
    )
    parser.add_argument(
        "--sw-mode",
        choices=["gaussian", "constant"],
        default=None,
        help="how the windows are blended, as MONAI's sliding_window_inference mode "
        "(default gaussian; MONAI's SlidingWindowInferer defaults to constant)",
    )
    parser.add_argument(
        "--sw-sigma",
        type=_sigma_scale,
        default=None,
        metavar="S",
        help="the Gaussian's sigma as a fraction of the window (default 0.125, as MONAI)",
    )


def _sigma_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"the sigma scale must be positive, got {text!r}")
    return value


def sliding_window_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """The sliding-window settings the options describe (None: the whole input at once).

    Raises:
        UsageError: ``--sw-mode`` or ``--sw-sigma`` without ``--sliding-window``, or a sigma
            with constant blending.
    """
    window = getattr(args, "sliding_window", None)
    mode, sigma = getattr(args, "sw_mode", None), getattr(args, "sw_sigma", None)
    if window is None:
        if mode is not None or sigma is not None:
            given = "--sw-mode" if mode is not None else "--sw-sigma"
            raise UsageError(f"{given} sets how --sliding-window blends its windows: give it too")
        return None
    if sigma is not None and mode == "constant":
        raise UsageError("--sw-sigma is the Gaussian's: constant blending has none")
    return {**window, "mode": mode or "gaussian", "sigma_scale": 0.125 if sigma is None else sigma}


def _option_value(text: str) -> Any:
    """An option's value: none, an int, a float, ints separated by commas, or the text."""
    if text.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if "," in text:
        try:
            return [int(part) for part in text.split(",")]
        except ValueError:
            pass
    return text


def parse_method_options(specs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD:KEY=VALUE`` strings as {method: {key: value}}, checked against the registry.

    Names and values are checked here, before any model is loaded or run.
    """
    result: dict[str, dict[str, Any]] = {}
    for spec in specs:
        method, colon, assignment = spec.partition(":")
        key, equals, value = assignment.partition("=")
        if not colon or not equals or not key:
            raise UsageError(f"--method-option {spec!r}: expected METHOD:KEY=VALUE")
        if method not in methods:
            raise UsageError(
                f"--method-option {spec!r}: method {method!r} is not among --method "
                f"({', '.join(methods)})"
            )
        result.setdefault(method, {})[key] = _option_value(value)
    try:
        resolve_methods(methods, result)
    except SegCamError as error:
        raise UsageError(f"--method-option: {error}") from None
    return result
