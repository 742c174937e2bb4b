"""The slow references: every registered method written again from its paper's equations.

One function per method, in :data:`REFERENCES`, whose keys must equal ``segcam.list_methods()``
(``tests/test_reference.py`` checks it): a new method without its textbook version fails the
suite, as zennit pairs each rule with its textbook version. Each reference computes one sample's
map for one target from the layer's activation A (C, *S) and the gradient G = dy^c_M/dA of that
target's score, taken with ``.backward()`` one sample and one target at a time, with explicit
loops over channels, positions and blocks; :func:`reference_maps` runs them all.

The score: y^c_M = sum over M of the class-c logit (one-channel outputs: class 0 = -logit).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from segcam.pixel_sets import as_pixel_set


@dataclass
class Sample:
    """What a reference needs of one sample, one target and one layer."""

    activation: torch.Tensor  # (C, *S)
    gradient: torch.Tensor  # (C, *S): d y^c_M / d A
    pixel_set: torch.Tensor  # (*S_out) bool
    masked_outputs: Callable[[], list[torch.Tensor]]  # Score-CAM's masked forwards (cached)
    class_map_of: Callable[[torch.Tensor], torch.Tensor]  # output -> the class-c map (1, *S)


def _channels(sample: Sample) -> range:
    return range(sample.activation.shape[0])


def seg_hires_grad_cam(s: Sample) -> torch.Tensor:
    """Rheude et al., MELBA 2024: L = sum_k G_k * A_k, element-wise."""
    return sum(s.gradient[k] * s.activation[k] for k in _channels(s))


def seg_grad_cam(s: Sample) -> torch.Tensor:
    """Vinogradova et al., AAAI 2020: L = sum_k mean_p(G_k) A_k."""
    return sum(s.gradient[k].mean() * s.activation[k] for k in _channels(s))


def seg_layer_cam(s: Sample) -> torch.Tensor:
    """Jiang et al., TIP 2021: L = sum_k max(G_k, 0) * A_k."""
    return sum(s.gradient[k].clamp_min(0) * s.activation[k] for k in _channels(s))


def seg_xgrad_cam(s: Sample) -> torch.Tensor:
    """Fu et al., BMVC 2020: alpha_k = sum_p G_k A_k / sum_p A_k (0 where sum_p A_k = 0)."""
    a, g = s.activation, s.gradient
    return sum(
        ((g[k] * a[k]).sum() / a[k].sum() if a[k].sum() != 0 else 0.0) * a[k] for k in _channels(s)
    )


def seg_grad_cam_pp(s: Sample) -> torch.Tensor:
    """Chattopadhay et al., WACV 2018, Eq. 19 (the exp(y) factor dropped)."""
    return sum(
        _grad_cam_pp_weight(s.activation[k], s.gradient[k]) * s.activation[k] for k in _channels(s)
    )


def seg_xres_cam(s: Sample) -> torch.Tensor:
    """Hasany et al., 2023: the gradient max-pooled in 2-blocks, not averaged: sum_k B(G_k) A_k."""
    return sum(_block_max(s.gradient[k], 2) * s.activation[k] for k in _channels(s))


def seg_eigen_cam(s: Sample) -> torch.Tensor:
    """Muhammad and Yeasin, IJCNN 2020: projection on the first principal component of A."""
    return _eigen_reference(s.activation, s.pixel_set)


def seg_score_cam(s: Sample) -> torch.Tensor:
    """Wang et al., CVPRW 2020: softmax over channels of the masked-input scores weights A_k."""
    return _score_reference(s.masked_outputs(), s.activation, s.class_map_of, s.pixel_set)


REFERENCES: dict[str, Callable[[Sample], torch.Tensor]] = {
    "seg-hires-grad-cam": seg_hires_grad_cam,
    "seg-grad-cam": seg_grad_cam,
    "seg-layer-cam": seg_layer_cam,
    "seg-xgrad-cam": seg_xgrad_cam,
    "seg-grad-cam++": seg_grad_cam_pp,
    "seg-xres-cam": seg_xres_cam,
    "seg-eigen-cam": seg_eigen_cam,
    "seg-score-cam": seg_score_cam,
}
"""Method name -> its slow reference; the keys must equal ``segcam.list_methods()``."""


def reference_maps(model, inputs, targets, layer_names):
    """Every reference's maps, one sample and one target at a time, with .backward().

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
            recorded = _recorded_gradients(
                model, modules, inputs[n : n + 1], target, pixel_set, layer_names
            )

            def class_map_of(output, target=target):
                if output.shape[1] == 1:
                    return output[:, 0] if target.class_index == 1 else -output[:, 0]
                return output[:, target.class_index]

            for name, (activation, gradient) in recorded.items():

                def masked_outputs(n=n, name=name, activation=activation):
                    if (n, name) not in masked:
                        masked[n, name] = _masked_outputs(model, inputs[n], activation)
                    return masked[n, name]

                sample = Sample(activation, gradient, pixel_set, masked_outputs, class_map_of)
                for method, reference in REFERENCES.items():
                    value = reference(sample)
                    key = (method, name)
                    if key not in maps:
                        maps[key] = torch.zeros(
                            (inputs.shape[0], len(targets), *activation.shape[1:]),
                            dtype=activation.dtype,
                        )
                    maps[key][n, t] = value.to(maps[key].dtype) if torch.is_tensor(value) else value
    return maps


def _recorded_gradients(model, modules, image, target, pixel_set, layer_names):
    """{layer: (A, dy^c_M/dA)} of one sample, by hooks and .backward()."""
    store = {}

    def hook(module, _inputs, output):
        output.retain_grad()
        store[module] = output

    handles = [modules[name].register_forward_hook(hook) for name in layer_names]
    try:
        output = model(image)
    finally:
        for handle in handles:
            handle.remove()
    if output.shape[1] == 1:
        class_map = output[:, 0] if target.class_index == 1 else -output[:, 0]
    else:
        class_map = output[:, target.class_index]
    model.zero_grad(set_to_none=True)
    class_map[0][pixel_set].sum().backward()
    result = {}
    for name in layer_names:
        kept = store[modules[name]]
        activation = kept[0].detach()
        gradient = kept.grad
        result[name] = (
            activation,
            torch.zeros_like(activation) if gradient is None else gradient[0],
        )
    return result


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
