"""Shared helpers: the slow reference implementation and peer-library imports."""

from __future__ import annotations

import copy
import itertools
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from segcam.pixel_sets import as_pixel_set

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
    with y = sum over M of the class-c logit (one-channel outputs: class 0 = -logit); the other
    registered methods from their papers' equations with per-position or per-block loops
    (Grad-CAM++, Seg-XRes-CAM with 2-blocks and max), numpy's SVD (Eigen-CAM), and one masked
    forward at a time (Score-CAM).
    Returns {(method, layer): (N, T, *S_layer)}. Runs on a deep copy, so the model under test
    keeps no .grad.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        logits = model(inputs)
    maps = {}
    masked = {}
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

            def class_map_of(output, target=target):
                if output.shape[1] == 1:
                    return output[:, 0] if target.class_index == 1 else -output[:, 0]
                return output[:, target.class_index]

            score = class_map_of(output)[0][pixel_set].sum()
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
                plus = sum(
                    _grad_cam_pp_weight(activation[k], gradient[k]) * activation[k]
                    for k in channels
                )
                xres = sum(_block_max(gradient[k], 2) * activation[k] for k in channels)
                eigen = _eigen_reference(activation, pixel_set)
                if (n, name) not in masked:
                    masked[n, name] = _masked_outputs(model, inputs[n], activation)
                score = _score_reference(masked[n, name], activation, class_map_of, pixel_set)
                for method, value in (
                    ("seg-hires-grad-cam", hires),
                    ("seg-grad-cam", grad),
                    ("seg-layer-cam", layer),
                    ("seg-xgrad-cam", xgrad),
                    ("seg-grad-cam++", plus),
                    ("seg-xres-cam", xres),
                    ("seg-eigen-cam", eigen),
                    ("seg-score-cam", score),
                ):
                    key = (method, name)
                    if key not in maps:
                        maps[key] = torch.zeros(
                            (inputs.shape[0], len(targets), *activation.shape[1:]),
                            dtype=activation.dtype,
                        )
                    maps[key][n, t] = value.to(maps[key].dtype) if torch.is_tensor(value) else value
    return maps


def _grad_cam_pp_weight(activation, gradient):
    """Grad-CAM++ weight of one channel (Chattopadhay et al., Eq. 19), exp(y) factor dropped."""
    g = gradient.flatten().double()
    denominator = 2 * g**2 + activation.double().sum() * g**3
    alpha = torch.zeros_like(g)
    nonzero = denominator != 0
    alpha[nonzero] = g[nonzero] ** 2 / denominator[nonzero]
    return float((alpha * g.clamp_min(0)).sum())


def _block_max(values, size):
    """Each position takes the max over its block of ``size`` per axis (last blocks partial)."""
    result = torch.empty_like(values)
    starts = [range(0, extent, size) for extent in values.shape]
    for corner in itertools.product(*starts):
        block = tuple(slice(c, c + size) for c in corner)
        result[block] = values[block].max()
    return result


def _eigen_reference(activation, pixel_set):
    """Projection on the first right singular vector of the centred (positions x channels)."""
    if not pixel_set.any():
        return torch.zeros(activation.shape[1:], dtype=activation.dtype)
    matrix = activation.double().flatten(1).T.numpy()
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = torch.from_numpy(centred @ vt[0])
    grid = activation.shape[1:]
    weights = torch.nn.functional.interpolate(
        pixel_set[None, None].double(), size=grid, mode="area"
    ).flatten()
    covariance = float(((weights - weights.mean()) * projection).sum())
    tie = abs(covariance) <= 1e-6 * float(projection.abs().sum()) * float(
        (weights - weights.mean()).abs().max()
    )
    if tie:
        sign = 1.0 if projection.max() >= -projection.min() else -1.0
    else:
        sign = 1.0 if covariance > 0 else -1.0
    return (sign * projection).reshape(grid).to(activation.dtype)


def _masked_outputs(model, image, activation):
    """Score-CAM's masked inputs (Wang et al., Eq. 3-4), one forward at a time: their outputs."""
    mode = "bilinear" if image.ndim == 3 else "trilinear"
    outputs = []
    for k in range(activation.shape[0]):
        up = torch.nn.functional.interpolate(
            activation[k][None, None], size=image.shape[1:], mode=mode, align_corners=False
        )[0, 0]
        span = up.max() - up.min()
        mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
        with torch.no_grad():
            outputs.append(model((image * mask)[None]))
    return outputs


def _score_reference(outputs, activation, class_map_of, pixel_set):
    """Score-CAM map: softmax over channels of the masked scores weights the channels."""
    if not pixel_set.any():
        return torch.zeros_like(activation[0])
    scores = torch.tensor(
        [float(class_map_of(output)[0][pixel_set].sum()) for output in outputs],
        dtype=torch.float64,
    )
    weights = torch.softmax(scores, dim=0)
    return sum(float(weights[k]) * activation[k] for k in range(activation.shape[0]))


def assert_close_scaled(actual, expected, tolerance=1e-5):
    """max |actual - expected| <= tolerance * max |expected| (relative to the map's scale)."""
    scale = max(float(expected.abs().max()), 1e-12)
    error = float((actual - expected).abs().max())
    assert error <= tolerance * scale, (
        f"max abs diff {error:.3e} > {tolerance:g} x scale {scale:.3e}"
    )


def fake_torchvision_ops():
    """Define torchvision's two CUDA ops that PyPI's torchvision needs with the CPU torch.

    Test harness only: pytorch-grad-cam imports torchvision, and nnU-Net's own trainer lookup
    imports every trainer variant (some import timm, which imports torchvision).
    """
    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        fake_torchvision_ops.library = library  # keep the fragment alive


def import_pytorch_grad_cam():
    """Import pytorch-grad-cam; its torchvision import needs two CUDA ops, faked here."""
    fake_torchvision_ops()
    import pytorch_grad_cam

    return pytorch_grad_cam


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Chromium is missing: run `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        outside = []
        page.on(
            "request",
            lambda request: (
                outside.append(request.url)
                if not request.url.startswith("http://127.0.0.1")
                else None
            ),
        )
        yield page
        browser.close()
        assert outside == []  # the page never reaches beyond its own server
