"""segcam.layers: layer specs resolved to modules, with one clear error for anything else."""

from __future__ import annotations

import pytest

import segcam
from segcam import errors
from small_nets import X, explain


def test_layer_given_as_a_number():
    with pytest.raises(errors.LayerNotFoundError, match="layer must be a module name"):
        explain(X, segcam.AllPixels(1), 3)
