"""Agreement with peers' implementations on the same model, layer and pixel set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam, LayerGradientXActivation
from monai.networks.nets import UNet

import segcam
from harness import import_pytorch_grad_cam
from references import assert_close_scaled

LAYERS = {
    "full resolution": "model.2.0",  # last decoder convolution, at the input's grid
    "half resolution": "model.1.submodule",
}


def _model(spatial_dims):
    torch.manual_seed(7)
    return UNet(spatial_dims, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def _masks(logits):
    # Predicted class 1 in sample 0 and a box in sample 1: different pixel sets per sample.
    masks = (logits.argmax(1) == 1).clone()
    masks[1] = False
    masks[1, 4:20, 10:30] = True
    return masks


@pytest.mark.parametrize("where", list(LAYERS))
@pytest.mark.parametrize(
    ("method", "peer_name"), [("seg-hires-grad-cam", "HiResCAM"), ("seg-grad-cam", "GradCAM")]
)
def test_pytorch_grad_cam(where, method, peer_name):
    grad_cam = import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = _model(2)
    layer = LAYERS[where]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        masks = _masks(model(x))
    peer = getattr(grad_cam, peer_name)(model=model, target_layers=[model.get_submodule(layer)])
    peer_targets = [SemanticSegmentationTarget(1, masks[n].float().numpy()) for n in range(2)]
    expected = peer(input_tensor=x, targets=peer_targets)  # ReLU, min-max, resize (OpenCV)
    peer.activations_and_grads.release()

    # pytorch-grad-cam: ReLU, min-max, OpenCV bilinear resize, min-max again. Bilinear resizing
    # is affine, so that equals segcam's relu -> upsample -> minmax.
    ours = segcam.explain(model, x, segcam.Mask(1, masks), layer, method, normalize="minmax")
    ours = ours.maps[:, 0]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("where", list(LAYERS))
def test_captum(spatial_dims, where):
    model = _model(spatial_dims)
    layer = model.get_submodule(LAYERS[where])
    spatial = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        logits = model(x)
    masks = logits.argmax(1) == 2

    def masked_score(inputs):
        return (model(inputs)[:, 2] * masks).flatten(1).sum(1)

    gxa = LayerGradientXActivation(masked_score, layer).attribute(x).sum(1)
    gradcam = LayerGradCam(masked_score, layer).attribute(x, relu_attributions=False)[:, 0]
    ours = segcam.explain(model, x, segcam.Predicted(2), layer, relu=False, upsample=False)
    ours_grad = segcam.explain(
        model, x, segcam.Predicted(2), layer, "seg-grad-cam", relu=False, upsample=False
    )
    assert_close_scaled(ours.maps[:, 0], gxa.detach())
    assert_close_scaled(ours_grad.maps[:, 0], gradcam.detach())
