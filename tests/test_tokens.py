"""Transformer layers (issue 6): token sequences and channels-last grids laid on the grid.

The reference hooks the layer, takes dy^c_M/dA with .backward() and lays A and G on the grid
by hand (UNETR's own proj_feat: view(N, *grid, C) then channels first), then applies the
equation of Seg-HiRes-Grad CAM / Seg-Grad CAM.
"""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

import segcam
from segcam.errors import LayerError

RAW = {"relu": False, "upsample": False, "normalize": None}


def _reference(model, x, class_index, mask, layer, lay):
    """(N, *grid) HiRes and Grad maps from a hooked .backward(); ``lay`` puts A on the grid."""
    model = copy.deepcopy(model)
    store = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        output = model(x)
    finally:
        handle.remove()
    (output[:, class_index] * mask).sum().backward()
    activation, gradient = lay(store["a"].detach()), lay(store["a"].grad)
    hires = (gradient * activation).sum(1)
    weights = gradient.flatten(2).mean(2)
    grad = torch.einsum("nc,nc...->n...", weights, activation)
    return hires, grad


def _unetr(dims, size):
    torch.manual_seed(0)
    return UNETR(
        in_channels=1,
        out_channels=3,
        img_size=size,
        spatial_dims=dims,
        feature_size=8,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
    ).eval()


@pytest.mark.parametrize(("dims", "size"), [(2, (64, 48)), (3, (32, 32, 48))])
def test_unetr_token_blocks(dims, size):
    model = _unetr(dims, size)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, *size), generator=generator)
    mask = torch.rand((2, *size), generator=generator) > 0.6
    grid = tuple(s // 16 for s in size)
    layer = "vit.blocks.2"

    def lay(tokens):  # UNETR.proj_feat
        return tokens.view(tokens.shape[0], *grid, tokens.shape[2]).movedim(-1, 1)

    hires, grad = _reference(model, x, 1, mask, layer, lay)
    for method, expected in (("seg-hires-grad-cam", hires), ("seg-grad-cam", grad)):
        expl = segcam.explain(model, x, segcam.Mask(1, mask), layer, method, **RAW)
        assert expl.maps.shape == (2, 1, *grid)
        assert expl.layer_shapes[layer] == (2, 48, *grid)
        scale = float(expected.abs().max())
        assert float((expl.maps[:, 0] - expected).abs().max()) <= 1e-5 * scale
    # the stated layout gives the same maps; every method runs on tokens
    stated = segcam.TokenLayer(layer, grid=grid, prefix_tokens=0)
    for method in segcam.list_methods():
        options = {"max_channels": 6} if method == "seg-score-cam" else None
        auto = segcam.explain(
            model, x, segcam.Mask(1, mask), layer, method, **RAW, method_options=options
        )
        explicit = segcam.explain(
            model, x, segcam.Mask(1, mask), stated, method, **RAW, method_options=options
        )
        torch.testing.assert_close(auto.maps, explicit.maps)
        assert auto.maps.shape == (2, 1, *grid) and torch.isfinite(auto.maps).all()
    upsampled = segcam.explain(model, x, segcam.Mask(1, mask), layer)
    assert upsampled.maps.shape == (2, 1, *size)


class ClassTokenSegmenter(nn.Module):
    """A tiny ViT segmenter with a class token: patches of 4, one mixing block, a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.embed = nn.Conv2d(1, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6, generator=generator))
        self.block = nn.Sequential(nn.Linear(6, 6), nn.GELU())
        self.mix = nn.Linear(6, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x)
        grid = patches.shape[2:]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches.flatten(2).mT], 1)
        tokens = self.block(tokens)
        tokens = tokens + self.mix(tokens[:, :1])  # the class token feeds every patch token
        features = tokens[:, 1:].mT.reshape(x.shape[0], 6, *grid)
        return nn.functional.interpolate(self.head(features), size=x.shape[2:])


def test_class_token_is_inferred_and_dropped():
    model = ClassTokenSegmenter().eval()
    x = torch.randn(2, 1, 16, 20)
    mask = torch.zeros(2, 16, 20, dtype=torch.bool)
    mask[:, 4:12, 8:16] = True

    def lay(tokens):
        return tokens[:, 1:].mT.reshape(tokens.shape[0], tokens.shape[2], 4, 5)

    hires, _ = _reference(model, x, 1, mask, "block", lay)
    expl = segcam.explain(model, x, segcam.Mask(1, mask), "block", **RAW)
    torch.testing.assert_close(expl.maps[:, 0], hires, rtol=1e-5, atol=1e-6)
    stated = segcam.TokenLayer("block", grid=(4, 5))  # prefix: 21 tokens - 20 on the grid
    torch.testing.assert_close(
        segcam.explain(model, x, segcam.Mask(1, mask), stated, **RAW).maps, expl.maps
    )


def test_tokens_that_do_not_fit_are_refused():
    model = ClassTokenSegmenter().eval()
    x = torch.randn(1, 1, 16, 20)
    with pytest.raises(LayerError, match=r"21 tokens and no patch grid.*segcam.TokenLayer"):
        segcam.explain(model, x, segcam.AllPixels(1), segcam.TokenLayer("block", prefix_tokens=0))
    with pytest.raises(LayerError, match=r"'mix' returns 1 tokens and no patch grid"):
        segcam.explain(model, x, segcam.AllPixels(1), "mix")
    with pytest.raises(LayerError, match=r"grid \(4, 4\) with 1 extra tokens"):
        segcam.explain(
            model, x, segcam.AllPixels(1), segcam.TokenLayer("block", grid=(4, 4), prefix_tokens=1)
        )


@pytest.mark.parametrize("dims", [2, 3])
def test_swin_unetr_channels_last_blocks(dims):
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, spatial_dims=dims, feature_size=12).eval()
    size = (64, 64) if dims == 2 else (64, 32, 32)  # its instance norms need 2+ deep cells
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((1, 1, *size), generator=generator)
    mask = torch.rand((1, *size), generator=generator) > 0.5
    layer = "swinViT.layers2.0.blocks.1"
    hires, grad = _reference(model, x, 1, mask, layer, lambda t: t.movedim(-1, 1))
    grid = tuple(s // 4 for s in size)
    expl = segcam.explain(model, x, segcam.Mask(1, mask), layer, **RAW)
    assert expl.maps.shape == (1, 1, *grid) and expl.layer_shapes[layer] == (1, 24, *grid)
    assert float((expl.maps[:, 0] - hires).abs().max()) <= 1e-5 * float(hires.abs().max())
    stated = segcam.TokenLayer(layer, layout="channels_last")
    explicit = segcam.explain(model, x, segcam.Mask(1, mask), stated, "seg-grad-cam", **RAW)
    assert float((explicit.maps[:, 0] - grad).abs().max()) <= 1e-5 * float(grad.abs().max())
    # a channels-first stage of the same network is left as it is
    stage = segcam.explain(model, x, segcam.Mask(1, mask), "swinViT.layers2.0", **RAW)
    assert stage.maps.shape == (1, 1, *(s // 8 for s in size))


def test_layouts_inferred_from_shapes():
    from segcam.tokens import Layout, infer_layout

    assert infer_layout("a", (1, 8, 16, 16), (64, 64), None) == Layout("channels_first", (16, 16))
    # (1, 16, 16, 8) on 64x64: channels-first grid (16, 8) and channels-last grid (16, 16) both
    # fit; the module that made it decides, and without one the guess is refused
    with pytest.raises(LayerError, match="both fit the input"):
        infer_layout("a", (1, 16, 16, 8), (64, 64), None)
    block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    assert infer_layout("a", (1, 16, 16, 8), (64, 64), None, block) == Layout(
        "channels_last", (16, 16)
    )
    pool = nn.AvgPool2d((2, 8))  # the same shape from a 64x64 input: channels-first
    assert infer_layout("a", (1, 32, 32, 8), (64, 64), None, pool) == Layout(
        "channels_first", (32, 8)
    )
    # both readings follow the input's proportions: PyTorch's channels-first wins
    assert infer_layout("a", (1, 4, 4, 4), (16, 16), None).kind == "channels_first"
    assert infer_layout("a", (1, 1 + 49, 8), (56, 56), None) == Layout("tokens", (7, 7), 1)
    assert infer_layout("a", (1, 64, 8), (32, 32, 32), None) == Layout("tokens", (4, 4, 4), 0)
    with pytest.raises(LayerError, match="cannot be laid on the 2D grid"):
        infer_layout("a", (1, 5), (8, 8), None)
    with pytest.raises(LayerError, match="not tokens"):
        infer_layout("a", (1, 5, 4, 4), (8, 8), segcam.TokenLayer("a", layout="tokens"))


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
