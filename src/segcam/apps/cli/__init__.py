"""The ``segcam`` command line: explain, layers, methods, view, evaluate, demo.

One module per command, each with ``add_parser(commands)`` and ``run(args)``; option groups shared
by several commands are declared once in :mod:`segcam.apps.cli.options`. Every command calls the
library's public API. A :class:`~segcam.errors.SegCamError` prints one line and exits with status
2 (a batch whose inputs partly failed exits with 1); anything else is a bug or an unforeseen
failure, printed as one ``unexpected error`` line, also exit 2. ``--debug`` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import segcam
from segcam.apps.cli import demo, evaluate, explain, layers, methods, view
from segcam.apps.cli.options import UsageError
from segcam.apps.naming import printable
from segcam.errors import SegCamError
from segcam.layers import LIST_LAYERS_HINT

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

COMMANDS = (explain, layers, methods, view, evaluate, demo)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage itself is behind ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: each command module declares its own subcommand."""
    parser = _Parser(prog="segcam", description=segcam.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segcam {segcam.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """One line per warning on the command line, without Python's file and source line."""
    print(f"segcam: warning: {message}", file=sys.stderr)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--window -200,300`` -> ``--window=-200,300``: argparse would read -200,300 as an option."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--window" and index + 1 < len(argv):
            joined.append(f"--window={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


CLI_LAYERS_HINT = "(list them with segcam layers and the same model options)"


def _debug_anywhere(argv: list[str]) -> list[str]:
    """``--debug`` anywhere on the line, not only before the command: moved to the front.

    Every error says "run again with --debug"; arguments after ``--`` are left alone.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    rest = [a for a in argv[:end] if a != "--debug"]
    return ["--debug", *rest, *argv[end:]]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segcam`` console script; returns the exit status."""
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_values(_debug_anywhere(given)))
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        status: int = args.run(args)
        return status
    except KeyboardInterrupt:
        print("segcam: interrupted", file=sys.stderr)
        return 130
    except SegCamError as error:
        if args.debug:
            traceback.print_exc()  # the traceback asked for; the status stays the error's
            return 2
        message = printable(str(error).replace(LIST_LAYERS_HINT, CLI_LAYERS_HINT))
        print(f"segcam: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug or an unforeseen failure: one line, the traceback on demand
        if args.debug:
            traceback.print_exc()
            return 2
        print(
            f"segcam: unexpected error: {type(error).__name__}: {error} (run again with --debug "
            f"for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 2
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
