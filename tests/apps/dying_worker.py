"""--preprocess functions that kill or slow their own process: stand-ins for the OOM killer, a
segfault in a C reader, and a long input during which the run's parent is killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

MARK = 666.0  # an input whose first value is this kills the worker explaining it


def die_on_mark(array: np.ndarray) -> np.ndarray:
    """SIGKILL this process on a marked input, every time."""
    if float(array.flat[0]) == MARK:
        os.kill(os.getpid(), signal.SIGKILL)
    return array


def die_once_on_mark(array: np.ndarray) -> np.ndarray:
    """SIGKILL this process on a marked input the first time only (SEGCAM_TEST_DIED records it)."""
    record = Path(os.environ["SEGCAM_TEST_DIED"])
    if float(array.flat[0]) == MARK and not record.exists():
        record.write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return array


def slow(array: np.ndarray) -> np.ndarray:
    """Take SEGCAM_TEST_SLOW seconds (default 1) per input."""
    time.sleep(float(os.environ.get("SEGCAM_TEST_SLOW", "1")))
    return array
