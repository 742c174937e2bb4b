"""Issue 13's API rows: each bad or edge input gets its specific error, or the corrected result."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import segcam
from segcam import errors
from segcam.testing import HeadNet, tiny_segnet

torch.manual_seed(0)
UNET = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
X = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
LAYER = "model.1.submodule"


def explain(*args, **kwargs):
    """The issue's E(...): segcam.explain(UNet2D, rand(2,1,64,64), AllPixels(1), layer, ...)."""
    return segcam.explain(UNET, *args, **kwargs)


class Counting(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


# ------------------------------------------------------------- tracebacks become clear errors


def test_wrong_rank_for_the_model_is_refused_before_the_forward():
    model = Counting(UNET)
    with pytest.raises(errors.InputError, match=r"does not fit the model.*Conv2d.*1 channel"):
        segcam.explain(model, torch.rand(1, 1, 8, 64, 64), segcam.AllPixels(1), "model." + LAYER)
    assert model.calls == 0


def test_wrong_channels_for_the_model_is_refused_before_the_forward():
    with pytest.raises(errors.InputError, match=r"\(2, 3, 64, 64\) does not fit.*1 channel"):
        explain(torch.rand(2, 3, 64, 64), segcam.AllPixels(1), LAYER)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_wrong_dtype_for_the_model(dtype):
    with pytest.raises(errors.InputError, match=f"input is {dtype}.*parameters are torch.float32"):
        explain(X.to(dtype), segcam.AllPixels(1), LAYER)


def test_input_on_another_device():
    with pytest.raises(errors.InputError, match="meta tensors, which hold no data"):
        explain(X.to("meta"), segcam.AllPixels(1), LAYER)
    model = Counting(tiny_segnet(2).to(torch.float64))
    with pytest.raises(errors.InputError, match=r"torch\.float32 but the model's parameters"):
        segcam.explain(model, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "model.body.3")
    assert model.calls == 0


def test_mask_on_another_device_is_moved_or_refused():
    mask = torch.zeros(64, 64, dtype=torch.bool, device="meta")
    with pytest.raises(errors.TargetError, match="cannot move the mask from meta"):
        explain(X, segcam.Mask(1, mask), LAYER)


@pytest.mark.parametrize("targets", [None, 3, "predicted"])
def test_targets_that_are_not_targets(targets):
    with pytest.raises(errors.TargetError, match="targets must be a target or a sequence"):
        explain(X, targets, LAYER)


def test_layer_given_as_a_number():
    with pytest.raises(errors.LayerNotFoundError, match="layer must be a module name"):
        explain(X, segcam.AllPixels(1), 3)


def test_max_graph_bytes_is_checked_at_construction():
    model = Counting(UNET)
    with pytest.raises(errors.OptionError, match="max_graph_bytes must be None or a number"):
        segcam.Explainer(model, "model." + LAYER, max_graph_bytes="1GB")
    assert model.calls == 0


def test_pixel_index_as_a_tensor():
    by_tensor = explain(X, segcam.Pixel(1, torch.tensor([5, 6])), LAYER)
    by_tuple = explain(X, segcam.Pixel(1, (5, 6)), LAYER)
    torch.testing.assert_close(by_tensor.maps, by_tuple.maps)
    per_sample = explain(X, segcam.Pixel(1, torch.tensor([[5, 6], [7, 8]])), LAYER)
    assert per_sample.pixel_sets[0, 0, 5, 6] and per_sample.pixel_sets[1, 0, 7, 8]


def test_torchscript_model_is_refused():
    scripted = torch.jit.script(tiny_segnet(2))
    with pytest.raises(errors.LayerError, match="TorchScript"):
        segcam.explain(scripted, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")


def test_an_error_inside_the_model_is_a_model_error():
    # a 60x60 input to a net whose skip connections need multiples of 4
    with pytest.raises(errors.ModelError, match=r"the model failed on the input \(1, 1, 60, 62\)"):
        explain(torch.rand(1, 1, 60, 62), segcam.AllPixels(1), LAYER)
    try:
        explain(torch.rand(1, 1, 60, 62), segcam.AllPixels(1), LAYER)
    except errors.ModelError as error:
        assert isinstance(error.__cause__, RuntimeError)  # the original error, chained


# ------------------------------------------------------------- silent wrong results fixed


def test_probabilities_are_warned_about():
    softmax = nn.Sequential(UNET, nn.Softmax(dim=1)).eval()
    with pytest.warns(errors.SegCamWarning, match="looks like probabilities"):
        segcam.explain(softmax, X, segcam.AllPixels(1), "0." + LAYER)
    sigmoid = nn.Sequential(tiny_segnet(2), nn.Sigmoid()).eval()
    with pytest.warns(errors.SegCamWarning, match="ends in Sigmoid"):
        segcam.explain(sigmoid, torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "0.body.3")


class PooledNet(nn.Module):
    """A channels-first layer of shape (N, 32, 32, 8): 32 channels after AvgPool2d((2, 8))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.pool = nn.AvgPool2d((2, 8))
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.pool(self.conv(x))), size=x.shape[2:])


def test_channels_first_pooling_output_is_not_read_as_channels_last():
    expl = segcam.explain(PooledNet().eval(), torch.rand(1, 1, 64, 64), segcam.AllPixels(1), "pool")
    assert expl.layer_shapes["pool"] == (1, 32, 32, 8)


def test_overflowing_input_raises_instead_of_nan_maps():
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        explain(X * 1e38, segcam.AllPixels(1), LAYER)
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        segcam.explain_sliding_window(UNET, X * 1e38, segcam.AllPixels(1), LAYER, 32)
    with pytest.raises(errors.NonFiniteError, match=r"NaN or Inf"):
        # a target read from the prediction: the blended logits come first
        target = segcam.Probability(1, threshold=0.0)
        segcam.explain_sliding_window(UNET, X * 1e38, target, LAYER, 32)


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (segcam.Pixel(1, (2.7, 3.9)), "coordinates must be integers; got 2.7"),
        (segcam.Box(1, [(0.5, 10), (0, 10)]), "coordinates must be integers; got 0.5"),
        (segcam.Box(1, [slice(0, 1000), (0, 10)]), r"\(0, 1000\) on axis 0 lie outside 0..64"),
        (segcam.Box(1, [(0, 100), (0, 10)]), r"\(0, 100\) on axis 0 lie outside 0..64"),
        (segcam.Box(1, [(10, 5), (0, 10)]), "start > stop"),
        (segcam.Box(1, [slice(-10, None), (0, 10)]), "lie outside"),
    ],
)
def test_coordinates_are_integers_and_boxes_follow_one_rule(target, pattern):
    with pytest.raises(errors.TargetError, match=pattern):
        explain(X, target, LAYER)


def test_box_with_open_slice_ends():
    open_ended = explain(X, segcam.Box(1, [slice(None, 10), slice(50, None)]), LAYER)
    explicit = explain(X, segcam.Box(1, [(0, 10), (50, 64)]), LAYER)
    torch.testing.assert_close(open_ended.maps, explicit.maps)


def test_pool_size_true_is_refused():
    with pytest.raises(errors.OptionError, match="pool_size must be a positive int"):
        explain(X, segcam.AllPixels(1), LAYER, "seg-xres-cam", method_options={"pool_size": True})


def test_explainer_keeps_a_snapshot_of_its_input():
    x = X.clone()
    explainer = segcam.Explainer(UNET, LAYER, method="seg-score-cam")
    explainer.forward(x)
    options = {"max_channels": 4}
    before = explainer.explain(segcam.AllPixels(1), method_options=options).maps
    x.mul_(0)  # the caller changes x in place after the forward
    after = explainer.explain(segcam.AllPixels(1), method_options=options).maps
    explainer.close()
    torch.testing.assert_close(after, before)


# ------------------------------------------------------------- crafted explanation files


def test_load_reads_only_the_members_it_needs(tmp_path):
    expl = segcam.explain(HeadNet(2), torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")
    path = expl.save(tmp_path / "maps.npz")
    with (
        zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("extra.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array(member, np.zeros(64 << 20, dtype=np.float32))
    assert path.stat().st_size < 1 << 20  # a small file that would decompress to 256 MiB
    tracemalloc.start()
    loaded = segcam.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    torch.testing.assert_close(loaded.maps, expl.maps)
    assert peak < 16 << 20


def test_load_checks_shapes_against_the_metadata(tmp_path):
    expl = segcam.explain(HeadNet(2), torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")
    path = expl.save(tmp_path / "maps.npz")
    with np.load(path) as archive:
        members = {key: archive[key] for key in archive.files}
    members["map_0"] = np.zeros(7, dtype=np.float32)
    np.savez(tmp_path / "bad.npz", **members)
    with pytest.raises(errors.ExplanationFileError, match=r"'map_0' has shape \(7,\)"):
        segcam.load(tmp_path / "bad.npz")
