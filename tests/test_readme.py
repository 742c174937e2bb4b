"""The README's API example runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")  # untrained net: may be empty
def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert tuple(namespace["expl"].maps.shape) == (2, 2, 128, 128)
    assert tuple(namespace["raw"].maps.shape) == (2, 1, 64, 64)
    assert (tmp_path / "maps.npz").is_file()


@pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")  # random weights: may be empty
def test_readme_third_party_command_runs(tmp_path, monkeypatch):
    """The README's pretrained-model command, as written, on the same architecture."""
    import shlex

    import numpy as np
    import torch
    from monai.networks.nets import UNet

    from segcam.apps.cli import main

    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
        if "--model monai:UNet" in b
    )  # fmt: skip
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0] == "segcam"
    kwargs = json.loads(argv[argv.index("--model-kwargs") + 1])
    torch.manual_seed(0)
    torch.save(UNet(**kwargs).state_dict(), tmp_path / "model.pt")  # stands in for the download
    nibabel = pytest.importorskip("nibabel")
    volume = np.random.default_rng(0).normal(40, 60, size=(96, 96, 96)).astype(np.float32)
    nibabel.save(
        nibabel.Nifti1Image(volume, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "spleen_ct.nii.gz"
    )
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    written = sorted(p.name for p in (tmp_path / "spleen-maps" / "spleen_ct").iterdir())
    assert "seg-hires-grad-cam.npz" in written and "seg-grad-cam.npz" in written
