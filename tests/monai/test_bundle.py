"""segcam.monai.load_bundle: a bundle folder in the Model Zoo's layout, read by MONAI's parser."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("monai")

from segcam.apps.cli import main
from segcam.monai import BundleError, load_bundle
from segcam.testing.bundles import NETWORK, write_bundle

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # MONAI's own deprecation notes
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),
]


def test_the_bundle_s_own_network_weights_and_pipeline(tmp_path):
    folder = write_bundle(tmp_path / "spleen")
    bundle = load_bundle(folder)
    expected = torch.load(folder / "models" / "model.pt", weights_only=True)
    loaded = bundle.network.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not bundle.network.training and bundle.in_channels == 1
    assert type(bundle.preprocessing).__name__ == "Compose"
    assert [type(t).__name__ for t in bundle.preprocessing.transforms][2:4] == [
        "Orientationd", "Spacingd",
    ]  # fmt: skip
    # MONAI's SlidingWindowInferer blends with constant weights unless told otherwise
    assert bundle.sliding_window() == {
        "roi_size": [32, 32, 16], "overlap": 0.5, "mode": "constant", "sigma_scale": 0.125,
        "sw_batch_size": 4,
    }  # fmt: skip
    # a nested checkpoint (as some bundles save it) and a DataParallel prefix load the same
    nested = {"model": {f"module.{k}": v for k, v in expected.items()}}
    again = load_bundle(write_bundle(tmp_path / "nested", state=nested))
    assert all(torch.equal(again.network.state_dict()[k], expected[k]) for k in expected)


def test_gaussian_blending_and_the_inferers_segcam_cannot_reproduce(tmp_path):
    gaussian = {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "mode": "gaussian",
                "sigma_scale": 0.25}  # fmt: skip
    bundle = load_bundle(write_bundle(tmp_path / "g", inferer=gaussian))
    window = bundle.sliding_window()
    assert window["mode"] == "gaussian" and window["sigma_scale"] == 0.25
    reflect = {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16],
               "padding_mode": "reflect"}  # fmt: skip
    with pytest.raises(BundleError, match="pads with reflect"):
        load_bundle(write_bundle(tmp_path / "r", inferer=reflect)).sliding_window()
    simple = load_bundle(write_bundle(tmp_path / "s", inferer={"_target_": "SimpleInferer"}))
    assert simple.sliding_window() is None


def test_a_folder_that_is_not_a_usable_bundle_is_one_clear_error(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(BundleError, match="a file, not a bundle folder"):
        load_bundle(tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no configs/inference\.json"):
        load_bundle(tmp_path / "empty")
    folder = write_bundle(tmp_path / "b")
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match="checkpoint is missing"):
        load_bundle(folder)
    torch.save({"weights": object}, folder / "models" / "model.pt")  # pickles a class
    with pytest.raises(BundleError, match="weights only"):
        load_bundle(folder)
    other = dict(NETWORK, channels=[8, 16, 32])
    from monai.networks.nets import UNet

    torch.save(UNet(**{k: v for k, v in other.items() if k != "_target_"}).state_dict(),
               folder / "models" / "model.pt")  # fmt: skip
    with pytest.raises(BundleError, match="does not fit network_def"):
        load_bundle(folder)
    broken = write_bundle(tmp_path / "c", network={"_target_": "NoSuchNet"}, state={})
    with pytest.raises(BundleError, match="network_def cannot be built"):
        load_bundle(broken)


def test_layers_lists_the_bundle_s_network_on_one_window(tmp_path, capsys):
    folder = write_bundle(tmp_path / "spleen")
    assert main(["layers", "--bundle", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "model.2" in out and "(1, 2, 32, 32, 16)" in out  # the head, on one 32x32x16 window
    assert main(["layers", "--bundle", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no such bundle folder" in err and err.count("\n") == 1
