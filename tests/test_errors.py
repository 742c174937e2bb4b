"""Every bad input raises its own clear error, and the model is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import segcam
from segcam import errors
from segcam.testing import HandNet, tiny_segnet

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_unknown_layer_lists_close_matches():
    with pytest.raises(errors.LayerNotFoundError, match=r"'body\.4'.*close matches: body\."):
        segcam.explain(tiny_segnet(2), X, segcam.AllPixels(0), "body.4")


def test_module_not_in_model():
    with pytest.raises(errors.LayerNotFoundError, match="not part of the model"):
        segcam.explain(tiny_segnet(2), X, segcam.AllPixels(0), nn.Conv2d(1, 1, 1))


def test_layer_given_as_module_and_duplicates():
    model = tiny_segnet(2)
    expl = segcam.explain(model, X, segcam.AllPixels(0), model.body[1])
    assert expl.layers == ("body.1",)
    with pytest.raises(errors.LayerError, match="listed twice"):
        segcam.explain(model, X, segcam.AllPixels(0), ["body.1", model.body[1]])


class SideBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_segnet(2)
        self.unused = nn.Conv2d(1, 2, 1)
        self.never = nn.Conv2d(1, 2, 1)
        self.shared = nn.Identity()
        self.pair = nn.LSTM(1, 1)

    def forward(self, x):
        self.unused(x)  # computed, but the output does not depend on it
        return self.net(self.shared(self.shared(x)))


def test_layer_not_on_the_path():
    with pytest.raises(errors.LayerNotOnPathError, match="does not depend on layer 'unused'"):
        segcam.explain(SideBranch().eval(), X, segcam.AllPixels(0), ["net.body", "unused"])


def test_layer_never_called():
    with pytest.raises(errors.LayerNotOnPathError, match="'never' never ran"):
        segcam.explain(SideBranch().eval(), X, segcam.AllPixels(0), "never")


def test_layer_called_twice():
    with pytest.raises(errors.LayerError, match="more than once"):
        segcam.explain(SideBranch().eval(), X, segcam.AllPixels(0), "shared")


def test_layer_output_not_a_tensor():
    class TupleLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.head = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            out, _ = self.lstm(x.flatten(2)[:, :, :4].reshape(x.shape[0], -1, 4))
            return self.head(out.reshape(x.shape[0], 1, -1, 4))

    with pytest.raises(errors.LayerError, match="returns tuple, not a tensor"):
        segcam.explain(TupleLayer().eval(), X, segcam.AllPixels(0), "lstm")


@pytest.mark.parametrize(
    ("inputs", "error", "pattern"),
    [
        (torch.randn(1, 8, 8), errors.InputError, r"\(N, C, H, W\).*3-D"),
        (torch.randn(1, 1, 1, 1, 8, 8), errors.InputError, "6-D"),
        (torch.ones(1, 1, 8, 8, dtype=torch.int64), errors.InputError, "floating point"),
        (np.zeros((1, 1, 8, 8), dtype=np.float32), errors.InputError, "torch.Tensor"),
        (torch.full((1, 1, 8, 8), float("nan")), errors.NonFiniteError, "NaN or Inf"),
        (
            torch.tensor([1.0, float("inf")]).repeat(32).reshape(1, 1, 8, 8),
            errors.NonFiniteError,
            "inputs hold NaN",
        ),
    ],
)
def test_bad_inputs(inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        segcam.explain(tiny_segnet(2), inputs, segcam.AllPixels(0), "body")


def test_nonfinite_logits():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_segnet(2)

        def forward(self, x):
            return self.net(x) * 1e38 * 1e38

    with pytest.raises(errors.NonFiniteError, match="logits hold NaN or Inf"):
        segcam.explain(Overflow().eval(), X, segcam.AllPixels(0), "net.body")


@pytest.mark.parametrize(
    ("model", "class_index", "pattern"),
    [
        (tiny_segnet(2), 3, "3 classes.*0..2"),
        (tiny_segnet(2), -1, "out of range"),
        (HandNet(num_classes=1), 2, "single-channel"),
        (tiny_segnet(2), 1.0, "must be an int"),
    ],
)
def test_class_out_of_range(model, class_index, pattern):
    with pytest.raises(errors.ClassIndexError, match=pattern):
        segcam.explain(model.eval(), X, segcam.AllPixels(class_index), model.head)


@pytest.mark.parametrize(
    ("target", "error", "pattern"),
    [
        (segcam.Mask(0, torch.ones(8, 9)), errors.MaskShapeError, r"\(8, 9\).*\(8, 8\)"),
        (segcam.Mask(0, torch.ones(3, 8, 8)), errors.MaskShapeError, r"\(2, 8, 8\)"),
        (segcam.Mask(0, torch.full((8, 8), 0.5)), errors.TargetError, "bool or 0/1"),
        (segcam.Pixel(0, (8, 0)), errors.TargetError, "outside the output grid"),
        (segcam.Pixel(0, (1, 2, 3)), errors.TargetError, "3 coordinates"),
        (segcam.Box(0, [(0, 2)]), errors.TargetError, "1 bounds for a 2-D"),
        (segcam.Box(0, [(0, 2), (0, 9)]), errors.TargetError, "outside 0..8"),
        (segcam.Probability(0, 1.5), errors.TargetError, r"\[0, 1\)"),
    ],
)
def test_bad_targets(target, error, pattern):
    with pytest.raises(error, match=pattern):
        segcam.explain(tiny_segnet(2), X, target, "body")


def test_not_a_target_and_no_targets():
    with pytest.raises(errors.TargetError, match="not a target"):
        segcam.explain(tiny_segnet(2), X, [segcam.AllPixels(0), 3], "body")
    with pytest.raises(errors.TargetError, match="targets is empty"):
        segcam.explain(tiny_segnet(2), X, [], "body")


def test_unknown_method_and_normalization():
    with pytest.raises(errors.MethodNotFoundError, match="seg-hires-grad-cam"):
        segcam.explain(tiny_segnet(2), X, segcam.AllPixels(0), "body", "grad-cam")
    with pytest.raises(ValueError, match="normalize"):
        segcam.explain(tiny_segnet(2), X, segcam.AllPixels(0), "body", normalize="l2")


def test_empty_pixel_set_gives_zero_map_and_warns():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[1, 2, 3] = True
    with pytest.warns(
        errors.SegCamWarning,
        match=(
            r"empty pixel set for target 0 Mask\(class_index=1, mask=<\(2, 8, 8\)>\) in "
            r"samples \[0\]; target 1 Box.* in all samples"
        ),
    ):
        expl = segcam.explain(
            tiny_segnet(2),
            X,
            [segcam.Mask(1, masks), segcam.Box(0, [(2, 2), (0, 8)])],
            ["body.1", "head"],
            relu=False,
            upsample=False,
            normalize="max",
        )
    for maps in expl.layer_maps.values():
        assert torch.isfinite(maps).all()
        assert (maps[0, 0] == 0).all() and (maps[:, 1] == 0).all()
    # At the head (4x4, up-sampled x2 by nearest), output pixel (2, 3) comes from head pixel
    # (1, 1): the raw map there is the logit itself, and 0 elsewhere; "max" makes it +-1.
    head = expl.layer_maps["head"][1, 0]
    expected = torch.zeros(4, 4)
    expected[1, 1] = torch.sign(expl.logits[1, 1, 2, 3])
    torch.testing.assert_close(head, expected)


def test_training_mode_warns():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    with pytest.warns(errors.SegCamWarning, match=r"training mode \(1\)"):
        segcam.explain(model, X, segcam.AllPixels(0), "0")
    assert model.training


class MultiOutput(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net = tiny_segnet(2)
        self.kind = kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "dict":
            return {"out": y, "aux": 2 * y}
        if self.kind == "dict-no-out":
            return {"main": y, "aux": 2 * y}
        if self.kind == "tuple":
            return (y, 2 * y)
        if self.kind == "stack":
            return torch.stack([y, 2 * y], dim=1)
        return "not a tensor"


def test_output_selection():
    def run(kind, output=None):
        return segcam.explain(
            MultiOutput(kind).eval(), X, segcam.AllPixels(1), "net.body", output=output, relu=False
        ).maps

    plain = segcam.explain(tiny_segnet(2), X, segcam.AllPixels(1), "body", relu=False).maps
    torch.testing.assert_close(run("dict"), plain)
    torch.testing.assert_close(run("dict", "aux"), 2 * plain)
    torch.testing.assert_close(run("dict-no-out", "main"), plain)
    torch.testing.assert_close(run("tuple", 1), 2 * plain)
    torch.testing.assert_close(run("stack", 0), plain)
    torch.testing.assert_close(run("stack", lambda y: y[:, 1]), 2 * plain)
    for kind, pattern in [
        ("dict-no-out", "keys \\['main', 'aux'\\]; pass output=KEY"),
        ("tuple", "tuple of 2 items; pass output=INDEX"),
        ("stack", "deep supervision stack"),
        ("string", "returned str, not a tensor"),
    ]:
        with pytest.raises(errors.OutputError, match=pattern):
            run(kind)
    with pytest.raises(errors.OutputError, match="not in the model's output keys"):
        run("dict", "logits")
    with pytest.raises(errors.OutputError, match="outside the model's 2 outputs"):
        run("tuple", 2)
