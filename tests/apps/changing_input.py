"""A --preprocess that changes the input file while it is being explained (a test's stand-in)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def rewrite(array: np.ndarray) -> np.ndarray:
    """Rewrite the file named by SEGCAM_TEST_CHANGING with other values; return ``array``."""
    path = Path(os.environ["SEGCAM_TEST_CHANGING"])
    np.save(path, np.zeros(array.shape[1:], np.float32) + 7)
    return array
