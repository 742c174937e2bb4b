"""``segcam layers``: the model's layers with their output shapes, and which are on the path."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from segcam.apps.cli.options import (
    UsageError,
    add_bundle_option,
    add_model_options,
    add_nnunet_options,
    model_from_args,
    refuse_nnunet_only,
    resolve_nnunet_folder,
)
from segcam.layers import describe_layers

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Declare ``segcam layers``."""
    parser = commands.add_parser("layers", help="list layers with output shapes")
    add_model_options(parser)
    parser.add_argument(
        "--input-shape",
        default=None,
        metavar="N,C,...",
        help="example input shape (default 1,1,128,128 or 1,1,64,64,64)",
    )
    parser.add_argument("--all", action="store_true", help="also list layers off the path")
    add_bundle_option(
        parser,
        "a MONAI bundle folder (configs/inference.json, models/model.pt): its network, on one "
        "window of its inferer",
    )
    add_nnunet_options(parser, inference=False)
    parser.set_defaults(run=run)


def _run_nnunet(args: argparse.Namespace) -> int:
    """The blocks of an nnU-Net model's network on one patch, with readable names."""
    from segcam import nnunet
    from segcam.nnunet.model import available_folds, block_name

    if args.model or args.weights:
        raise UsageError("--nnunet: --model and --weights do not apply")
    folds = args.folds or available_folds(args.nnunet, args.checkpoint)[:1] or (0,)
    model = nnunet.load(
        args.nnunet,
        folds=tuple(folds[:1]),
        checkpoint=args.checkpoint,
        trust_checkpoint=args.trust_checkpoint,
    )
    network = model.networks[0]
    channels = len(model.dataset_json.get("channel_names", {})) or 1
    patch = tuple(int(p) for p in model.configuration_manager.patch_size)
    table = describe_layers(network, torch.zeros((1, channels, *patch)))
    print(f"{model.configuration}, patch {'x'.join(map(str, patch))}, classes: "
          f"{', '.join(model.class_names)}")  # fmt: skip
    print(f"{'layer':40s} {'block':26s} {'type':24s} output shape")
    for info in table:
        block = block_name(info.name)
        if not info.on_path or not (block or args.all):
            continue
        shape_text = str(info.shape) if info.shape is not None else "(not a tensor)"
        print(f"{info.name:40s} {block:26s} {info.type_name:24s} {shape_text}")
    return 0


def _bundle_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[int, ...] | None]:
    """The bundle's network and an example input: one window of its inferer (if it slides)."""
    from segcam.monai import load_bundle

    if args.model or args.weights or args.nnunet is not None:
        raise UsageError("--bundle: --model, --weights and --nnunet do not apply")
    bundle = load_bundle(args.bundle)
    window = bundle.sliding_window()
    network = bundle.network
    dims = int(getattr(network, "dimensions", None) or getattr(network, "spatial_dims", None) or 3)
    roi = window["roi_size"] if window else [64] * dims
    roi = [roi] * dims if isinstance(roi, int) else roi
    return bundle.network, (1, bundle.in_channels or 1, *roi)


def run(args: argparse.Namespace) -> int:
    """Print one line per layer."""
    resolve_nnunet_folder(args)
    if args.nnunet is not None and args.bundle is None:
        return _run_nnunet(args)
    example: tuple[int, ...] | None = None
    if args.nnunet is None:
        refuse_nnunet_only(args)
    if args.bundle is not None:
        model, example = _bundle_model(args)
    else:
        model = model_from_args(args)
    if args.input_shape is not None:  # "" is a bad shape, not the default
        shape = _input_shape(args.input_shape)
    elif example is not None:
        shape = example
    else:
        dims = getattr(model, "dimensions", None) or getattr(model, "spatial_dims", None) or 2
        in_channels = getattr(model, "in_channels", None) or 1
        shape = (1, int(in_channels), *([128] * 2 if int(dims) == 2 else [64] * 3))
    table = describe_layers(model, torch.zeros(shape))
    print(f"{'layer':60s} {'type':24s} {'output shape':22s} on path")
    for info in table:
        if not (info.on_path or args.all):
            continue
        shape_text = str(info.shape) if info.shape is not None else "(not a tensor)"
        calls = f" (runs {info.calls}x)" if info.calls > 1 else ""
        name = info.name or "(model)"
        print(
            f"{name:60s} {info.type_name:24s} {shape_text:22s} {'yes' if info.on_path else 'no'}"
            f"{calls}"
        )
    return 0


MAX_EXAMPLE_BYTES = 2**30
"""The largest example input ``segcam layers`` allocates (its float32 zeros): 1 GiB."""


def _input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape N,C,H,W`` (or N,C,D,H,W): positive sizes, an input that fits in memory."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected N,C,H,W or N,C,D,H,W") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected N,C,H,W or N,C,D,H,W of positive sizes")
    needed = 4 * math.prod(shape)
    if needed > MAX_EXAMPLE_BYTES:
        raise UsageError(
            f"--input-shape {text!r}: the example input alone would take {needed / 2**30:.3g} GiB "
            f"(at most {MAX_EXAMPLE_BYTES / 2**30:.0f} GiB); a smaller input of the same rank "
            f"shows the same layers"
        )
    return shape
