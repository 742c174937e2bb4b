"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")  # untrained net: may be empty
def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert tuple(namespace["expl"].maps.shape) == (2, 2, 128, 128)
    assert tuple(namespace["raw"].maps.shape) == (2, 1, 64, 64)
    assert (tmp_path / "maps.npz").is_file()
