"""What the viewer shows besides maps: the intensity range and the window/level presets.

Presets: the 1-99 % percentiles, the full range, and for a CT in Hounsfield units the usual
windows (soft tissue, liver, lung, bone, brain), soft tissue the default. Computed once per
session.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CT_PRESETS", "intensity_summary"]

CT_PRESETS = (  # (name, level, width) in HU, as CT viewers offer them
    ("soft tissue", 40.0, 400.0),
    ("liver", 60.0, 160.0),
    ("lung", -600.0, 1500.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
)


def intensity_summary(intensity: np.ndarray, unit: str) -> dict[str, Any]:
    """The unit, range and window/level presets of the read-out intensities (*S)."""
    finite = intensity[np.isfinite(intensity)]
    low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    lowest, highest = (float(finite.min()), float(finite.max())) if finite.size else (0, 1)
    presets = [{"name": "auto (1-99%)", "level": (low + high) / 2, "width": high - low}]
    presets.append(
        {"name": "full range", "level": (lowest + highest) / 2, "width": highest - lowest}
    )
    if unit == "HU":
        presets += [{"name": n, "level": lv, "width": w} for n, lv, w in CT_PRESETS]
    for preset in presets:
        preset["level"], preset["width"] = (
            float(preset["level"]),
            max(float(preset["width"]), 1e-6),
        )
    # a CT opens in the soft-tissue window, as CT viewers do; anything else in its 1-99 % range
    default = 2 if unit == "HU" else 0
    return {"unit": unit, "min": lowest, "max": highest, "presets": presets, "default": default}
