"""The README's API example runs as written."""

from __future__ import annotations

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
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's notes on its own defaults
def test_readme_bundle_command_runs(tmp_path, monkeypatch):
    """The README's Model Zoo command, as written, on a bundle of the spleen bundle's layout."""
    import shlex

    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    from segcam.apps.cli import main
    from segcam.testing.bundles import write_bundle, write_oblique_ct

    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
        if "--bundle" in b
    )  # fmt: skip
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0] == "segcam"
    spleen = {  # the spleen_ct_segmentation bundle's network_def and inferer
        "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
        "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
        "norm": "batch",
    }  # fmt: skip
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4,
               "overlap": 0.5}  # fmt: skip
    write_bundle(tmp_path / "spleen_ct_segmentation", network=spleen, inferer=inferer)
    write_oblique_ct(tmp_path / "spleen_ct.nii.gz", (100, 96, 36))
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    folder = tmp_path / "spleen-maps" / "spleen_ct"
    written = sorted(p.name for p in folder.iterdir())
    assert "seg-hires-grad-cam.npz" in written and "seg-grad-cam.npz" in written
    assert "seg-hires-grad-cam__model.1.submodule.2__t0-predicted-spleen.nii.gz" in written
