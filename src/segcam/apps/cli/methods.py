"""``segcam methods``: the registered methods, their kinds, options and papers."""

from __future__ import annotations

import argparse
from typing import Any

from segcam.methods import REGISTRY

__all__ = ["add_parser", "run"]

KIND_TEXT = {
    "gradient": "gradient: one backward pass per target; sliding windows",
    "activation": "gradient-free: activations only",
    "model": "gradient-free: forward passes on masked inputs",
}


def add_parser(commands: Any) -> None:
    """Declare ``segcam methods``."""
    parser = commands.add_parser("methods", help="list the registered methods")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print each method with its summary, paper, kind and options."""
    width = max(len(name) for name in REGISTRY)
    for name, method in REGISTRY.items():
        print(f"{name:{width}s}  {method.summary}")
        print(f"{'':{width}s}  {method.reference}")
        options = ", ".join(f"{key}={value!r}" for key, value in method.options.items())
        print(
            f"{'':{width}s}  {KIND_TEXT[method.kind]}"
            + (f"; options: {options}" if options else "")
        )
    return 0
