"""The fast path against the slow references written straight from the equations (references.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet, UNet

import segcam
from references import REFERENCES, assert_close_scaled, reference_maps
from segcam.memory_format import convolution_layout

# Untrained nets may predict no pixel of a class: empty pixel sets are part of what is compared.
pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")

RAW = {"relu": False, "upsample": False, "normalize": None}
METHODS = segcam.list_methods()
PRECISE = {"seg-xgrad-cam", "seg-grad-cam++", "seg-score-cam"}


def test_every_registered_method_has_its_slow_reference():
    # a new method without its textbook version fails here (zennit pairs each rule so)
    assert sorted(REFERENCES) == sorted(segcam.list_methods())


def unet(dims):
    return UNet(dims, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def basic_unet(dims):
    return BasicUNet(dims, 1, 3, features=(4, 4, 8, 8, 16, 4))


def segresnet(dims):
    return SegResNet(
        dims,
        init_filters=8,
        in_channels=1,
        out_channels=3,
        blocks_down=(1, 1, 1),
        blocks_up=(1, 1),
        norm=("group", {"num_groups": 4}),
    )


def attention_unet(dims):
    return AttentionUnet(dims, 1, 3, channels=(4, 8, 16), strides=(2, 2))


# (factory, layers: bottleneck-ish / decoder / near output)
NETWORKS = {
    "UNet": (unet, ["model.1.submodule.1", "model.1.submodule", "model.2"]),
    "BasicUNet": (basic_unet, ["down_4", "upcat_2", "upcat_1"]),
    "SegResNet": (segresnet, ["down_layers.2", "up_layers.0", "up_layers.1"]),
    "AttentionUnet": (attention_unet, ["model.1.submodule", "model.1", "model.2"]),
}


def _targets(batch, spatial, generator):
    masks = torch.rand((batch, *spatial), generator=generator) > 0.7
    box = [(s // 4, s // 2 + 1) for s in spatial]
    pixel = [s // 3 for s in spatial]
    return [
        segcam.Predicted(1),
        segcam.Mask(2, masks),
        segcam.Box(0, box),
        segcam.Pixel(1, pixel),
        segcam.AllPixels(2),
        segcam.Region(0),
    ]


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_equals_reference(name, spatial_dims, seed):
    factory, layers = NETWORKS[name]
    torch.manual_seed(seed)
    model = factory(spatial_dims).eval()
    batch = 1 + seed
    spatial = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    if name == "BasicUNet" and spatial_dims == 3:
        spatial = (32, 16, 16)  # four halvings must leave more than one position for its norms
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 1, *spatial), generator=generator)
    targets = _targets(batch, spatial, generator)
    # the reference's forwards in the layout segcam's default gives them (channels-last 3D
    # convolutions on the CPU): the equations are checked here, the layout against float64 in
    # tests/test_memory_format.py
    with convolution_layout(model, x, "auto"):
        reference = reference_maps(model, x, targets, layers)
    # Three methods magnify float32 rounding, so they are compared in float64, where they are
    # well posed: XGrad-CAM divides by sum_p A_k, near 0 for signed (normalised) activations;
    # Grad-CAM++ divides by 2 G^2 + G^3 sum_p A_k, which cancels; Score-CAM's softmax turns an
    # absolute rounding error of the score (a sum over hundreds of pixels, batched forwards vs
    # one at a time) into a relative error of the weights.
    model64, x64 = copy.deepcopy(model).double(), x.double()
    reference64 = reference_maps(model64, x64, targets, layers)
    for method in METHODS:
        precise = method in PRECISE
        expl = segcam.explain(
            model64 if precise else model, x64 if precise else x, targets, layers, method, **RAW
        )
        for layer in layers:
            expected = (reference64 if precise else reference)[method, layer]
            assert expl.layer_maps[layer].shape == expected.shape
            assert_close_scaled(expl.layer_maps[layer], expected)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_fast_equals_reference_more_seeds(seed):
    model = unet(3).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((3, 1, 24, 24, 24), generator=generator)
    targets = _targets(3, (24, 24, 24), generator)
    model, x = model.double(), x.double()
    reference = reference_maps(model, x, targets, ["model.1.submodule"])
    for method in METHODS:
        expl = segcam.explain(model, x, targets, "model.1.submodule", method, **RAW)
        assert_close_scaled(expl.maps, reference[method, "model.1.submodule"])
