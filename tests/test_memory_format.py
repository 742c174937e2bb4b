"""The convolutions' memory layout: the choice, the hooks, the fall back, and float64 references.

Every layout's float32 maps are held to a float64 reference (float64 has no fast kernels, so
``"auto"`` keeps its plain layout): the new default's maps must be no farther from float64 than
the plain layout's (within independent rounding: 1.5x plus 1e-6 of the scale), and within 1e-5
of the map's scale wherever the plain layout's are. Some random networks are ill-conditioned in
float32 whatever the layout (a SegResNet's Seg-HiRes map at ``up_layers.1``: 4e-2 of its scale
in both); there only the first criterion applies. Asked for everywhere (2D here), channels-last
rounds coarser on wide convolutions, and the methods that magnify rounding (XGrad-CAM,
Grad-CAM++, Score-CAM) differ by chance in either layout: within 4x there.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

import segcam
from segcam.errors import ModelError, OptionError
from segcam.memory_format import check_memory_format, chosen_layout, convolution_layout

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
RAW = {"relu": False, "upsample": False}
# magnify float32 rounding (tests/test_references.py compares them in float64 only): XGrad-CAM
# and Grad-CAM++ divide by near-cancelling sums, Score-CAM's softmax over channel scores
MAGNIFYING = {"seg-xgrad-cam", "seg-grad-cam++", "seg-score-cam"}
CONVOLUTIONS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _dims(d):
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[d]
    norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[d]
    return conv, norm


def plain_conv_unet(d):
    conv, norm = _dims(d)
    return PlainConvUNet(
        1, 3, (8, 16, 32), conv, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), False, norm,
        {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


def residual_encoder_unet(d):
    conv, norm = _dims(d)
    return ResidualEncoderUNet(
        1, 3, (8, 16, 32), conv, 3, (1, 2, 2), (1, 2, 2), 3, (1, 1), False, norm,
        {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


NETWORKS = {
    "UNet": (
        lambda d: UNet(d, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1),
        ["model.1.submodule", "model.2"],
    ),
    "BasicUNet": (
        lambda d: BasicUNet(d, 1, 3, features=(8, 8, 16, 16, 32, 8)),
        ["upcat_2", "upcat_1"],
    ),
    "SegResNet": (
        lambda d: SegResNet(
            d,
            init_filters=8,
            in_channels=1,
            out_channels=3,
            blocks_down=(1, 1, 1),
            blocks_up=(1, 1),
            norm=("group", {"num_groups": 4}),
        ),
        ["up_layers.0", "up_layers.1"],
    ),
    "DynUNet": (
        lambda d: DynUNet(
            d, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2]
        ),
        ["upsamples.0", "upsamples.1"],
    ),
    "PlainConvUNet": (plain_conv_unet, ["decoder.stages.0", "decoder.stages.1"]),
    "ResidualEncoderUNet": (residual_encoder_unet, ["decoder.stages.0", "decoder.stages.1"]),
}


def _relative_error(maps, reference, layers):
    return max(
        float((maps.layer_maps[name].double() - reference.layer_maps[name]).abs().max())
        / max(float(reference.layer_maps[name].abs().max()), 1e-12)
        for name in layers
    )


class _ChannelsLastSpy:
    """Counts the convolutions that ran on channels-last inputs (after the layout's hooks)."""

    def __init__(self, model):
        self.count = 0
        self.handles = [
            m.register_forward_hook(self.hook)  # it sees the input the pre-hooks made
            for m in model.modules()
            if isinstance(m, CONVOLUTIONS)
        ]

    def hook(self, _, args, __):
        x = args[0]
        layout = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
        if x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
            self.count += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_layout_is_as_near_float64_as_the_plain_one(name, dims):
    # 3D: the default ("auto"); 2D: asked for (the default keeps 2D plain)
    factory, layers = NETWORKS[name]
    torch.manual_seed(0)
    model = factory(dims).eval()
    spatial = (16, 16, 16) if dims == 3 else (32, 32)
    if name == "BasicUNet" and dims == 3:
        spatial = (32, 16, 16)  # four halvings must leave more than one position for its norms
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, *spatial), generator=generator)
    masks = torch.rand((2, *spatial), generator=generator) > 0.7
    targets = [segcam.Predicted(1), segcam.Mask(2, masks), segcam.AllPixels(0)]
    layout = "auto" if dims == 3 else "channels-last"
    assert chosen_layout(model, x, layout) == "channels-last"
    model64, x64 = copy.deepcopy(model).double(), x.double()
    assert chosen_layout(model64, x64) == "contiguous"
    for method in segcam.list_methods():
        reference = segcam.explain(model64, x64, targets, layers, method, **RAW)
        plain = segcam.explain(model, x, targets, layers, method, memory_format="contiguous", **RAW)
        spy = _ChannelsLastSpy(model)
        try:
            new = segcam.explain(model, x, targets, layers, method, memory_format=layout, **RAW)
        finally:
            spy.remove()
        assert spy.count > 0, "no convolution ran channels-last: the comparison would be moot"
        plain_error = _relative_error(plain, reference, layers)
        new_error = _relative_error(new, reference, layers)
        if layout == "auto" and method not in MAGNIFYING:
            assert new_error <= 1.5 * plain_error + 1e-6, (method, plain_error, new_error)
            if plain_error <= 1e-5:
                assert new_error <= 1e-5, (method, plain_error, new_error)
        else:  # every convolution channels-last: oneDNN's kernels round 2-5x coarser on wide
            # ones (e.g. 128 channels at 8³: 2.2e-6 vs 4.5e-7); and the methods that magnify
            # rounding turn either layout's into errors of 1e-5 that differ by chance
            assert new_error <= 4 * plain_error + 1e-6, (method, plain_error, new_error)


def test_the_choice():
    unet3d = UNet(3, 1, 3, channels=(8, 16), strides=(2,)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert chosen_layout(unet3d, x) == "channels-last"
    assert chosen_layout(unet3d, x, "contiguous") == "contiguous"
    assert chosen_layout(unet3d, x.double()) == "contiguous"  # float64: no fast kernels
    unet2d = UNet(2, 1, 3, channels=(8, 16), strides=(2,)).eval()
    assert chosen_layout(unet2d, torch.randn(1, 1, 16, 16)) == "contiguous"
    assert chosen_layout(unet2d, torch.randn(1, 1, 16, 16), "channels-last") == "channels-last"
    wide = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.Conv3d(16, 16, 1)).eval()
    assert chosen_layout(wide, torch.randn(1, 16, 8, 8, 8)) == "contiguous"  # no few channels
    assert chosen_layout(nn.Linear(4, 4), torch.randn(1, 1, 2, 2, 4), "channels-last") == (
        "contiguous"
    )
    for bad in ("channels_last", "CHANNELS-LAST", 3, None):
        with pytest.raises(OptionError, match="memory_format must be one of"):
            check_memory_format(bad)
    with pytest.raises(OptionError, match="memory_format"):
        segcam.explain(unet3d, x, segcam.AllPixels(0), "model.1", memory_format="fast")


def test_hooks_are_removed_and_the_model_left_as_it_was():
    model = UNet(3, 1, 3, channels=(8, 16), strides=(2,)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    before = copy.deepcopy(model.state_dict())
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    with convolution_layout(model, x) as layout:
        assert layout == "channels-last"
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) > sum(hooks)
    with pytest.raises(RuntimeError, match="inside"), convolution_layout(model, x):
        raise RuntimeError("inside")
    segcam.explain(model, x, segcam.Predicted(1), "model.1.submodule")
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous()
    # an enclosing block's choice holds inside (a driver's), unless one is asked for
    with convolution_layout(model, x, "contiguous"):
        with convolution_layout(model, x) as inner:
            assert inner == "contiguous"
        with convolution_layout(model, x, "channels-last") as inner:
            assert inner == "channels-last"


class _NeedsContiguous(nn.Module):
    """A few-channel 3D convolution, then a ``.view`` that channels-last tensors cannot take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        flat = y.view(y.shape[0], -1)  # fails on a channels-last y
        return self.head(flat.view_as(y))


def test_a_model_that_needs_contiguous_tensors_runs_in_the_plain_layout():
    torch.manual_seed(0)
    model = _NeedsContiguous().eval()
    x = torch.randn(2, 4, 8, 8, 8)
    with pytest.raises(ModelError, match="--memory-format contiguous"):
        segcam.explain(model, x, segcam.AllPixels(1), "conv", memory_format="channels-last")
    plain = segcam.explain(model, x, segcam.AllPixels(1), "conv", memory_format="contiguous")
    # auto: the failed forward (its hooked layer had run) is forgotten and run again plainly
    auto = segcam.explain(model, x, segcam.AllPixels(1), "conv", **RAW)
    again = segcam.explain(model, x, segcam.AllPixels(1), "conv", **RAW)  # marked: plain now
    assert torch.equal(auto.logits, plain.logits) and torch.equal(again.logits, plain.logits)
    torch.testing.assert_close(auto.maps, segcam.explain(
        model, x, segcam.AllPixels(1), "conv", memory_format="contiguous", **RAW
    ).maps, rtol=0, atol=0)  # fmt: skip
    assert chosen_layout(model, x) == "contiguous"


def test_drivers_take_the_choice():
    torch.manual_seed(0)
    model = UNet(3, 1, 3, channels=(8, 16), strides=(2,), num_res_units=1).eval()
    x = torch.randn(2, 1, 24, 24, 24)  # a batch of 2: oneDNN's kernels, not the reference ones
    target = segcam.Predicted(1)
    for memory_format in ("contiguous", "channels-last"):
        spy = _ChannelsLastSpy(model)
        try:
            whole = segcam.explain(model, x, target, "model.1", memory_format=memory_format)
            explainer = segcam.Explainer(model, "model.1", memory_format=memory_format)
            explainer.forward(x)
            kept = explainer.explain(target)
            windows = segcam.explain_sliding_window(
                model, x, target, "model.1", 16, memory_format=memory_format
            )
        finally:
            spy.remove()
        assert (spy.count > 0) == (memory_format == "channels-last")
        torch.testing.assert_close(kept.maps, whole.maps)
        assert windows.maps.shape == whole.maps.shape
    with pytest.raises(OptionError, match="memory_format"):
        segcam.Explainer(model, "model.1", memory_format="nhwc")
    with pytest.raises(OptionError, match="memory_format"):
        segcam.explain_sliding_window(model, x, target, "model.1", 16, memory_format="x")


class _Picky(nn.Module):
    """Refuses an odd last axis (a bad input, in either layout); counts its forwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if x.shape[-1] % 2:
            raise ValueError("the last axis must be even")
        return self.head(self.conv(x))


def test_a_bad_input_is_one_error_and_keeps_the_fast_layout():
    model = _Picky().eval()
    good, bad = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 7)
    with pytest.raises(ModelError, match="the last axis must be even") as raised:
        segcam.explain(model, bad, segcam.AllPixels(1), "conv")
    # run once more plainly (the layout could have been the cause), then its own error, once:
    # not chained to the first attempt's, and the model keeps the fast layout for good inputs
    assert model.calls == 2
    assert raised.value.__context__ is None or not isinstance(raised.value.__context__, ModelError)
    assert chosen_layout(model, good) == "channels-last"
    with pytest.raises(ModelError, match="--memory-format contiguous"):
        segcam.explain(model, bad, segcam.AllPixels(1), "conv", memory_format="channels-last")


def test_the_innermost_block_decides_for_its_modules_in_its_thread():
    torch.manual_seed(0)
    model = _NeedsContiguous().eval()
    wide = UNet(3, 1, 3, channels=(8, 16), strides=(2,)).eval()
    x, y = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 1, 16, 16, 16)
    plain = segcam.explain(wide, y, segcam.Predicted(1), "model.1", memory_format="contiguous")
    spy = _ChannelsLastSpy(wide)
    try:
        # an explicit contiguous run inside a channels-last block: the plain forward, bit for bit
        with convolution_layout(wide, y, "channels-last"):
            inner = segcam.explain(
                wide, y, segcam.Predicted(1), "model.1", memory_format="contiguous"
            )
            assert spy.count == 0
            # another thread's forwards are not this block's
            thread = threading.Thread(target=lambda: wide(y))
            thread.start()
            thread.join()
            assert spy.count == 0
            wide(y)
            assert spy.count > 0
    finally:
        spy.remove()
    assert torch.equal(inner.logits, plain.logits) and torch.equal(inner.maps, plain.maps)
    # auto inside a contiguous block, for a model that needs the fall back: it works
    reference = segcam.explain(model, x, segcam.AllPixels(1), "conv", memory_format="contiguous")
    with convolution_layout(model, x, "contiguous"):
        auto = segcam.explain(model, x, segcam.AllPixels(1), "conv", memory_format="auto")
    assert torch.equal(auto.logits, reference.logits)
    # a submodule's own block inside its parent's: the submodule's choice holds
    parent = nn.Sequential(_NeedsContiguous()).eval()
    with convolution_layout(parent, x, "channels-last"):
        inner_plain = segcam.explain(
            parent[0], x, segcam.AllPixels(1), "conv", memory_format="contiguous"
        )
    assert torch.equal(
        inner_plain.logits,
        segcam.explain(
            parent[0], x, segcam.AllPixels(1), "conv", memory_format="contiguous"
        ).logits,
    )
