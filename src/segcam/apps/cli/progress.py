"""What a long run shows while it works: bars on a terminal, one line per input in a log.

On a terminal (and with tqdm installed: the ``[cli]`` extra, part of ``[demo]``) two bars: the
inputs, with the time left, and the work within the current input (windows of a sliding window,
or targets). When stderr is not a terminal (a log, CI, a pipe) there are no bars, and each input
gives one line as it finishes. ``--quiet`` shows neither; errors and the final summary remain.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """Progress of a run over ``total`` inputs; use as a context manager.

    Args:
        total: the number of inputs.
        quiet: show nothing but what the caller prints itself.
        stream: where to write (default stderr); bars only when it is a terminal.
    """

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.total = total
        self._inputs: Any = None
        self._within: Any = None
        if quiet or not _is_terminal(self.stream):
            return
        try:
            from tqdm import tqdm
        except ImportError:  # no bars without tqdm: lines, as in a log
            return
        self._tqdm = tqdm
        self._inputs = tqdm(
            total=total, desc="inputs", unit="input", file=self.stream, position=0, leave=True
        )

    @property
    def bars(self) -> bool:
        """Whether bars are drawn (a terminal and tqdm)."""
        return self._inputs is not None

    def line(self, text: str) -> None:
        """One input finished (or skipped, or failed): a line, or a step of the inputs bar."""
        if self.quiet:
            return
        if self._inputs is None:
            print(text, file=self.stream, flush=True)
            return
        self._close_within()
        self._inputs.write(text, file=self.stream)
        self._inputs.update(1)

    def within(self, done: int, total: int) -> None:
        """Work within the current input: (done, total) windows or targets."""
        if self._inputs is None:
            return
        if self._within is None or self._within.total != total:
            self._close_within()
            self._within = self._tqdm(
                total=total, desc="  within", unit="step", file=self.stream, position=1, leave=False
            )
        self._within.update(done - self._within.n)

    def _close_within(self) -> None:
        if self._within is not None:
            self._within.close()
            self._within = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *_: object) -> None:
        self._close_within()
        if self._inputs is not None:
            self._inputs.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
