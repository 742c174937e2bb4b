"""Shared helpers: the slow reference implementation and peer-library imports."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from segcam.targets import as_pixel_set

# Under pytest-xdist each worker gets one core; more torch threads than cores thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "segcam", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
# CI runs the same examples every time: a red build then always means a real regression.
settings.register_profile("segcam-ci", parent=settings.get_profile("segcam"), derandomize=True)
# Many more examples, for a hunt: pytest --hypothesis-profile=segcam-stress
settings.register_profile("segcam-stress", parent=settings.get_profile("segcam"), max_examples=400)
settings.load_profile("segcam-ci" if os.environ.get("CI") else "segcam")


def reference_maps(model, inputs, targets, layer_names):
    """Maps straight from the equations, one sample and one target at a time, with .backward().

    Seg-HiRes-Grad CAM: L = sum_k dy/dA_k * A_k; Seg-Grad CAM: L = sum_k mean_p(dy/dA_k) A_k,
    with y = sum over M of the class-c logit (one-channel outputs: class 0 = -logit).
    Returns {(method, layer): (N, T, *S_layer)}. Runs on a deep copy, so the model under test
    keeps no .grad.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        logits = model(inputs)
    maps = {}
    for n in range(inputs.shape[0]):
        for t, target in enumerate(targets):
            pixel_set = as_pixel_set(target.pixel_set(logits), logits, "reference")[n]
            store = {}

            def hook(module, _inputs, output, store=store):
                output.retain_grad()
                store[module] = output

            handles = [modules[name].register_forward_hook(hook) for name in layer_names]
            try:
                output = model(inputs[n : n + 1])
            finally:
                for handle in handles:
                    handle.remove()
            if output.shape[1] == 1:
                class_map = output[0, 0] if target.class_index == 1 else -output[0, 0]
            else:
                class_map = output[0, target.class_index]
            score = class_map[pixel_set].sum()
            model.zero_grad(set_to_none=True)
            score.backward()
            for name in layer_names:
                recorded = store[modules[name]]
                activation = recorded[0].detach()
                gradient = recorded.grad
                gradient = torch.zeros_like(activation) if gradient is None else gradient[0]
                channels = range(activation.shape[0])
                hires = sum(gradient[k] * activation[k] for k in channels)
                grad = sum(gradient[k].mean() * activation[k] for k in channels)
                layer = sum(gradient[k].clamp_min(0) * activation[k] for k in channels)
                xgrad = sum(
                    (
                        (gradient[k] * activation[k]).sum() / activation[k].sum()
                        if activation[k].sum() != 0
                        else 0.0
                    )
                    * activation[k]
                    for k in channels
                )
                for method, value in (
                    ("seg-hires-grad-cam", hires),
                    ("seg-grad-cam", grad),
                    ("seg-layer-cam", layer),
                    ("seg-xgrad-cam", xgrad),
                ):
                    key = (method, name)
                    if key not in maps:
                        maps[key] = torch.zeros(
                            (inputs.shape[0], len(targets), *activation.shape[1:]),
                            dtype=activation.dtype,
                        )
                    maps[key][n, t] = value.to(maps[key].dtype) if torch.is_tensor(value) else value
    return maps


def assert_close_scaled(actual, expected, tolerance=1e-5):
    """max |actual - expected| <= tolerance * max |expected| (relative to the map's scale)."""
    scale = max(float(expected.abs().max()), 1e-12)
    error = float((actual - expected).abs().max())
    assert error <= tolerance * scale, (
        f"max abs diff {error:.3e} > {tolerance:g} x scale {scale:.3e}"
    )


def import_pytorch_grad_cam():
    """Import pytorch-grad-cam; its torchvision import needs two CUDA ops, faked here."""
    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        import_pytorch_grad_cam.library = library  # keep the fragment alive
    import pytorch_grad_cam

    return pytorch_grad_cam


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
