"""Fixtures of the applications' tests."""

from __future__ import annotations

import numpy as np
import pytest

from segcam.testing.synthetic import shapes_scene


@pytest.fixture
def scene(tmp_path):
    image, _ = shapes_scene(1_000_011)
    path = tmp_path / "scene.npy"
    np.save(path, image[0])
    return path
