"""``segcam evaluate``: score the methods on the built-in benchmarks or a user's labelled folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segcam.apps.cli.options import (
    UsageError,
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
    parser.add_argument("--layer", action="append", metavar="NAME", help="(folder mode)")
    add_classes_option(parser, " (folder mode; classes 1.. are scored)")
    add_intensity_options(parser)
    parser.add_argument("--methods", nargs="+", choices=list(REGISTRY), default=list(REGISTRY))
    parser.add_argument("--count", type=int, default=100, help="evidence scenes (default 100)")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks; print the files written."""
    from segcam.apps.evaluation import BUILT_IN, evaluate_folder, run_evaluation, write_outputs

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
