"""``segcam demo``: the CT liver-tumour demo (report.html, NIfTI), the CT fetched on first use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Declare ``segcam demo``."""
    parser = commands.add_parser(
        "demo",
        help="the CT liver-tumour demo (report.html, NIfTI); downloads the demo CT (4.5 MB) "
        "into the user's cache on first use",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never download: fail when the demo CT is not cached (SEGCAM_DATA_DIR chooses "
        "the folder)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the report into ``--out``."""
    from segcam.apps.demo.report import run_demo

    return run_demo(args.out, offline=args.offline)
