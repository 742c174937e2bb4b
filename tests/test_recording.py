"""Properties: 3D of depth 1 = 2D, batch permutation, the model left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from monai.networks.nets import UNet
from torch import nn

import segcam
from segcam.testing import HeadNet, tiny_segnet

METHODS = st.sampled_from(segcam.list_methods())
pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")


@given(
    seed=st.integers(0, 2**16),
    height=st.integers(2, 9),
    width=st.integers(2, 9),
    batch=st.integers(1, 3),
    method=METHODS,
    layer=st.sampled_from(["body.0", "body.1", "body", "head", "upsample"]),
    relu=st.booleans(),
    upsample=st.booleans(),
)
def test_depth_one_volume_equals_image(seed, height, width, batch, method, layer, relu, upsample):
    # Normalisation is left out: on a nearly constant map it magnifies rounding differences
    # between 2D and 3D convolutions; it is a pure function tested on its own.
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, 1, 2 * height, 2 * width), generator=generator)
    box = [(0, height), (width // 2, 2 * width)]
    targets = [segcam.Predicted(1), segcam.Box(2, box), segcam.AllPixels(0)]
    options = {"relu": relu, "upsample": upsample}
    flat = segcam.explain(tiny_segnet(2, seed=seed), image, targets, layer, method, **options)
    targets_3d = [segcam.Predicted(1), segcam.Box(2, [(0, 1), *box]), segcam.AllPixels(0)]
    # the plain layout in both: the 3D default's channels-last kernels round differently
    # (tests/test_memory_format.py holds each layout to a float64 reference)
    volume = segcam.explain(
        tiny_segnet(3, seed=seed), image[:, :, None], targets_3d, layer, method,
        memory_format="contiguous", **options,
    )  # fmt: skip
    assert volume.maps.shape[:3] == (batch, 3, 1)
    # within 1e-5 of the map's scale, the suite's criterion: 2D and 3D convolutions round
    # differently, and Score-CAM's softmax over channel scores amplifies that (seed 660: 2.5e-6
    # on maps of scale 2.4 with one thread, the same before and after the layout work)
    scale = max(float(flat.maps.abs().max()), 1e-3)
    torch.testing.assert_close(volume.maps[:, :, 0], flat.maps, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(volume.logits[:, :, 0], flat.logits, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**16), batch=st.integers(2, 5), method=METHODS, data=st.data())
def test_permuting_the_batch_permutes_the_maps(seed, batch, method, data):
    permutation = data.draw(st.permutations(list(range(batch))))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 1, 8, 8), generator=generator)
    masks = torch.rand((batch, 8, 8), generator=generator) > 0.5
    model = tiny_segnet(2, seed=seed)
    targets = [segcam.Mask(0, masks), segcam.Predicted(2)]
    base = segcam.explain(model, x, targets, "body.1", method, upsample=False, relu=False)
    shuffled_targets = [segcam.Mask(0, masks[permutation]), segcam.Predicted(2)]
    shuffled = segcam.explain(
        model, x[permutation], shuffled_targets, "body.1", method, upsample=False, relu=False
    )
    torch.testing.assert_close(shuffled.maps, base.maps[permutation], rtol=1e-5, atol=1e-6)


def _state(model):
    return {
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: p.grad for name, p in model.named_parameters()},
        "values": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "hooks": {
            name: (
                len(module._forward_hooks),
                len(module._forward_pre_hooks),
                len(module._backward_hooks),
                len(getattr(module, "_backward_pre_hooks", {})),
            )
            for name, module in model.named_modules()
        },
    }


def _assert_same_state(before, after):
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for name, grad in before["grad"].items():
        assert after["grad"][name] is grad  # same object (or still None), never written
    for name, value in before["values"].items():
        torch.testing.assert_close(after["values"][name], value, rtol=0, atol=0)


def _mixed_model():
    model = UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, dropout=0.1)
    model.eval()
    model.model[0].train()  # a mixed state must survive as it is
    for parameter in model.model[1].parameters():
        parameter.requires_grad_(False)
    first = next(model.model[2].parameters())
    first.grad = torch.full_like(first, 3.0)  # a .grad the user left must stay untouched
    return model


@pytest.mark.parametrize("method", segcam.list_methods())
def test_model_state_unchanged(method):
    model = _mixed_model()
    before = _state(model)
    x = torch.randn(2, 1, 16, 16)
    segcam.explain(
        model, x, [segcam.Predicted(1), segcam.AllPixels(2)], ["model.1", "model.2"], method
    )
    _assert_same_state(before, _state(model))
    torch.testing.assert_close(
        next(model.model[2].parameters()).grad,
        torch.full_like(next(model.model[2].parameters()), 3.0),
    )


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = HeadNet(2)

    def forward(self, x):
        self.inner(x)
        raise RuntimeError("boom inside the model")


def test_no_hook_survives_an_exception_inside_the_model():
    model = Exploding().eval()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        segcam.explain(
            model, torch.randn(1, 1, 4, 4), segcam.AllPixels(0), ["inner.body", "inner.head"]
        )
    _assert_same_state(before, _state(model))


def test_no_hook_survives_a_target_error():
    model = tiny_segnet(2)
    before = _state(model)
    with pytest.raises(segcam.errors.ClassIndexError):
        segcam.explain(model, torch.randn(1, 1, 4, 4), segcam.AllPixels(7), "body")
    _assert_same_state(before, _state(model))


def test_frozen_parameters_and_outer_no_grad():
    model = tiny_segnet(2)
    x = torch.randn(2, 1, 8, 8)
    expected = segcam.explain(model, x, segcam.Predicted(1), "body.1").maps
    frozen = copy.deepcopy(model).requires_grad_(False)
    torch.testing.assert_close(
        segcam.explain(frozen, x, segcam.Predicted(1), "body.1").maps, expected
    )
    with torch.no_grad():
        inside = segcam.explain(model, x, segcam.Predicted(1), "body.1").maps
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside, expected)
    with torch.inference_mode():
        x_inference = x.clone()
        inside_inference = segcam.explain(model, x_inference, segcam.Predicted(1), "body.1").maps
    torch.testing.assert_close(inside_inference, expected)


def test_input_requiring_grad_keeps_no_grad():
    model = tiny_segnet(2)
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    segcam.explain(model, x, segcam.AllPixels(1), "body")
    assert x.grad is None


def test_inplace_op_after_the_layer():
    # The recorded activation must be the layer's output, not what an in-place ReLU made of it.
    conv = nn.Conv2d(1, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1)).eval()
    reference = nn.Sequential(conv, nn.ReLU(), model[2]).eval()
    x = torch.randn(2, 1, 6, 6)
    a = segcam.explain(model, x, segcam.AllPixels(1), "0", relu=False, upsample=False)
    b = segcam.explain(reference, x, segcam.AllPixels(1), "0", relu=False, upsample=False)
    torch.testing.assert_close(a.maps, b.maps)
    assert (a.maps < 0).any()  # pre-ReLU values kept their sign


def test_nothing_upstream_of_the_layer_is_saved_for_backward():
    # Before the first hooked layer runs, no graph is recorded: the first convolution would
    # otherwise save its input x (for its weight gradient).
    model = tiny_segnet(2)
    x = torch.randn(1, 1, 8, 8)
    saved = []

    def pack(tensor):
        saved.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        segcam.explain(model, x, segcam.AllPixels(1), "body.2")
    assert saved, "the layers after body.2 record a graph"
    assert x.data_ptr() not in saved
    upstream_saved = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        segcam.explain(model, x, segcam.AllPixels(1), "body.0")
    assert len(saved) > upstream_saved  # hooking earlier records more


class Fault(nn.Module):
    """Raises during the forward pass when armed; an identity otherwise."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("fault inside the model")
        return x


def _faulty_model(position):
    net = tiny_segnet(2)
    modules = [*net.body, net.head, net.upsample]
    modules.insert(position, Fault())
    return nn.Sequential(*modules).eval()


@given(
    position=st.integers(0, 6),
    layers=st.sets(st.integers(0, 6), min_size=1, max_size=4),
    method=METHODS,
    relu=st.booleans(),
    outer_no_grad=st.booleans(),
    fail=st.booleans(),
)
def test_model_left_as_it_was_with_or_without_exceptions(
    position, layers, method, relu, outer_no_grad, fail
):
    model = _faulty_model(position)
    model[position].armed = fail
    first = next(model.parameters())
    first.grad = torch.full_like(first, 2.0)
    before = _state(model)
    names = [str(index) for index in sorted(layers)]
    x = torch.randn(2, 1, 8, 8)
    grad_mode = torch.no_grad() if outer_no_grad else torch.enable_grad()
    with grad_mode:
        if fail:
            with pytest.raises(RuntimeError, match="fault inside the model"):
                segcam.explain(model, x, segcam.AllPixels(1), names, method, relu=relu)
        else:
            segcam.explain(model, x, segcam.AllPixels(1), names, method, relu=relu)
        assert torch.is_grad_enabled() is not outer_no_grad
    _assert_same_state(before, _state(model))


class _Saved:
    """What the pack hook stores instead of a tensor, so its lifetime can be watched."""

    def __init__(self, tensor):
        self.tensor = tensor


def test_graph_is_freed_when_explain_returns():
    import gc
    import weakref

    model = tiny_segnet(2)
    watched = []

    def pack(tensor):
        saved = _Saved(tensor)
        watched.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        expl = segcam.explain(
            model, torch.randn(2, 1, 8, 8), [segcam.AllPixels(1), segcam.Predicted(0)], "body.1"
        )
    gc.collect()
    assert watched, "the forward after the layer saved tensors for backward"
    assert all(reference() is None for reference in watched)
    assert not expl.maps.requires_grad and not expl.logits.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_maps_keep_the_input_dtype(dtype):
    model = HeadNet(2).eval().to(dtype)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    expl = segcam.explain(model, x, segcam.AllPixels(1), "body", relu=False, upsample=False)
    assert expl.maps.dtype == dtype and expl.logits.dtype == dtype
    bias = model.head.bias[1].detach()
    expected = (expl.logits[:, 1] - bias).double()  # the closed form, up to the dtype's rounding
    resolution = 1e-12 if dtype == torch.float64 else 2e-2  # bfloat16 keeps 8 bits of mantissa
    error = (expl.maps[:, 0].double() - expected).abs().max()
    assert error <= resolution * expected.abs().max()
