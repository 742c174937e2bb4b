"""``segcam evaluate``: score the methods on the built-in benchmarks or a user's labelled folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segcam.apps.cli.options import (
    UsageError,
    add_bundle_option,
    add_classes_option,
    add_intensity_options,
    add_model_options,
    intensity,
    model_from_args,
)
from segcam.methods import REGISTRY

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Declare ``segcam evaluate``."""
    parser = commands.add_parser(
        "evaluate", help="score the methods on the built-in benchmarks (tables, plots)"
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="NAME|FOLDER",
        help="built-in benchmark: evidence (known evidence), ct (held-out CT "
        "slices), randomisation (cascading parameter randomisation); or a "
        "folder of inputs scored against --labels",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FOLDER",
        help="ground-truth label maps, same file names as the --data inputs",
    )
    add_model_options(parser)
    parser.add_argument(
        "--nnunet",
        type=Path,
        metavar="MODEL_FOLDER",
        help="an nnU-Net trained-model folder: --data holds raw cases (_0000 files), --labels "
        "their label files (<case id><file ending>); scored through nnU-Net's whole inference",
    )
    parser.add_argument(
        "--folds", nargs="+", default=None, metavar="F", help="(--nnunet) folds (default all)"
    )
    parser.add_argument(
        "--disable-tta", "--disable_tta", action="store_true", help="(--nnunet) no mirroring"
    )
    add_bundle_option(
        parser,
        "a MONAI bundle folder: --data holds its images, --labels their label files (same "
        "names); scored through the bundle's own pipeline",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=8,
        help="deletion and insertion steps through the model's pipeline (--nnunet, --bundle; "
        "default 8: each step is one whole inference, the cost is said before it starts)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the randomisation's seed (--nnunet, --bundle)"
    )
    parser.add_argument("--layer", action="append", metavar="NAME", help="(folder mode)")
    add_classes_option(parser, " (folder mode; classes 1.. are scored)")
    add_intensity_options(parser)
    parser.add_argument("--methods", nargs="+", choices=list(REGISTRY), default=list(REGISTRY))
    parser.add_argument("--count", type=int, default=100, help="evidence scenes (default 100)")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.set_defaults(run=run)


def _run_pipeline(args: argparse.Namespace) -> int:
    """``--nnunet`` or ``--bundle``: the user's own model on labelled cases, by its pipeline."""
    import torch

    from segcam.apps.evaluation import write_outputs
    from segcam.apps.evaluation.pipelines import bundle_cases, evaluate_pipeline, nnunet_cases

    if args.nnunet is not None and args.bundle is not None:
        raise UsageError("--nnunet and --bundle: give one of them")
    folders = [Path(d) for d in args.data or []]
    if len(folders) != 1 or not folders[0].is_dir() or args.labels is None or not args.layer:
        raise UsageError(
            "--nnunet/--bundle need --data FOLDER (the cases), --labels FOLDER and --layer"
        )
    if not args.labels.is_dir():
        raise UsageError(f"--labels {args.labels}: no such folder")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    methods = [m for m in args.methods if REGISTRY[m].needs_gradient]
    if not methods:
        raise UsageError("--methods: gradient methods only through a pipeline")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.nnunet is not None:
        folds: Any = (
            "all" if args.folds is None else [int(f) if f.isdigit() else f for f in args.folds]
        )
        cases = nnunet_cases(
            args.nnunet, folders[0], args.labels, folds=folds, mirroring=not args.disable_tta
        )
        model = cases[0].model if cases else None
        patch = tuple(int(p) for p in model.configuration_manager.patch_size) if model else ()
        channels = int(cases[0].inputs.shape[1]) if cases else 1
        example = torch.zeros((1, channels, *patch)) if cases else None
        name = f"nnunet_{Path(args.nnunet).name}"
    else:
        cases = bundle_cases(args.bundle, folders[0], args.labels)
        example = None
        if cases:
            bundle = cases[0].model
            window = bundle.sliding_window()
            shape = tuple(cases[0].inputs.shape[2:])
            roi = shape if window is None else window["roi_size"]
            roi = [roi] * len(shape) if isinstance(roi, int) else roi
            sizes = [int(r) if int(r) > 0 else int(n) for r, n in zip(roi, shape, strict=True)]
            example = torch.zeros((1, bundle.in_channels or 1, *sizes))
        name = f"bundle_{Path(args.bundle).name}"
    if not cases:
        raise UsageError(f"--data {folders[0]}: no cases")
    records = evaluate_pipeline(
        cases, methods, args.layer, dataset=name, steps=args.steps, seed=args.seed,
        example_input=example, say=say,
    )  # fmt: skip
    written = write_outputs(name, records, args.out)
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks; print the files written."""
    from segcam.apps.evaluation import BUILT_IN, evaluate_folder, run_evaluation, write_outputs

    if args.nnunet is not None or args.bundle is not None:
        return _run_pipeline(args)

    data = args.data or sorted(BUILT_IN)
    folders = [Path(d) for d in data if d not in BUILT_IN]
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--data {folder}: neither a built-in benchmark nor a folder")
        if args.labels is None or args.model is None or not args.layer:
            raise UsageError("--data FOLDER needs --labels FOLDER, --model and --layer")
    written = run_evaluation([d for d in data if d in BUILT_IN], args.methods, args.out, args.count)
    for folder in folders:
        model = model_from_args(args)
        records = evaluate_folder(
            model,
            folder,
            args.labels,
            args.methods,
            args.layer,
            class_names=args.classes,
            intensity=intensity(args),
            progress=lambda line: print(line, file=sys.stderr),
        )
        written += write_outputs(folder.name, records, args.out)
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0
