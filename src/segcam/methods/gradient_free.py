"""Gradient-free segmentation CAMs: Seg-Eigen-CAM and Seg-Score-CAM.

Neither takes a gradient. Seg-Eigen-CAM projects the layer's activations on their first
principal component; Seg-Score-CAM weights channels by the target score y^c_M of the input
masked with each channel. Both compute the maps of all T targets of a call at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from segcam.errors import MethodNotSupportedError
from segcam.methods.registry import MethodContext, check_positive_int, register
from segcam.postprocess import upsample

__all__ = ["layer_pixel_weights", "seg_eigen_cam", "seg_score_cam"]


def layer_pixel_weights(
    pixel_sets: torch.Tensor, grid: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The fraction of each layer cell covered by the pixel set: area resampling to ``grid``.

    Args:
        pixel_sets: bool (N, T, *S_in).
        grid: the layer's spatial shape.
        dtype: the floating type of the result.

    Returns:
        (N, T, *grid) floats in [0, 1].
    """
    values = pixel_sets.to(dtype)
    if tuple(values.shape[2:]) == tuple(grid):
        return values
    resampled: torch.Tensor = F.interpolate(values, size=grid, mode="area")
    return resampled


def _principal_projection(activation: torch.Tensor) -> torch.Tensor:
    """Centred activations (N, P, C) projected on their first principal axis: (N, P)."""
    positions = activation.flatten(2).transpose(1, 2)
    centred = positions - positions.mean(dim=1, keepdim=True)
    # Covariance eigenvectors in float64: the C x C problem is small and P can be large (3D).
    wide = centred.double()
    covariance = wide.transpose(1, 2) @ wide
    _, vectors = torch.linalg.eigh(covariance)
    axis = vectors[..., -1]  # eigenvalues ascend: the last is the first principal component
    projection: torch.Tensor = (wide @ axis.unsqueeze(2)).squeeze(2).to(activation.dtype)
    return projection


@register(
    "seg-eigen-cam",
    summary="first principal component of the centred activations, sign towards the target",
    reference=(
        "Muhammad, Yeasin, 'Eigen-CAM: Class Activation Map using Principal Components', IJCNN 2020"
    ),
    kind="activation",
)
def seg_eigen_cam(activation: torch.Tensor, context: MethodContext) -> torch.Tensor:
    r"""Seg-Eigen-CAM: the activations' projection on their first principal component.

    Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): with the P positions of the layer as samples of
    C features, $X \in R^{P \times C}$, centred over positions (as PCA, and as
    pytorch-grad-cam), v the first principal axis (eigenvector of $X^T X$ with the largest
    eigenvalue), the map is $L = X v$ at each position. It is class-agnostic; the sign,
    which PCA leaves open, is fixed against the target: L is flipped when its covariance with the
    target's pixel set (area-resampled to the layer's grid), $\sum_p L_p (m_p - \bar m)$,
    is negative, so the pixel set lies on the high side. Where that covariance vanishes (a pixel
    set covering the whole grid), the sign makes $|\max L| \ge |\min L|$ (the rule of
    Chung & Ying's Seg-Eigen-CAM, 2025). An empty pixel set gives a zero map.

    Args:
        activation: A, shape (N, C, *S).
        context: the targets' pixel sets.

    Returns:
        The raw signed maps, shape (N, T, *S).
    """
    grid = tuple(activation.shape[2:])
    projection = _principal_projection(activation)  # (N, P)
    weights = layer_pixel_weights(context.pixel_sets, grid, projection.dtype).flatten(
        2
    )  # (N, T, P)
    centred = weights - weights.mean(dim=2, keepdim=True)
    covariance = torch.einsum("ntp,np->nt", centred, projection)
    scale = projection.abs().sum(dim=1, keepdim=True) * centred.abs().amax(dim=2)
    tie = covariance.abs() <= 1e-6 * scale
    peak_sign = torch.where(
        projection.amax(dim=1) >= -projection.amin(dim=1),
        torch.ones_like(projection[:, 0]),
        -torch.ones_like(projection[:, 0]),
    )
    sign = torch.where(tie, peak_sign.unsqueeze(1), covariance.sign())
    sign = torch.where(context.nonempty, sign, torch.zeros_like(sign))
    maps = sign.unsqueeze(2) * projection.unsqueeze(1)
    return maps.reshape(activation.shape[0], -1, *grid)


def _channel_order(activation: torch.Tensor, max_channels: int | None) -> torch.Tensor:
    """Per sample, the channels to use: all, or the ``max_channels`` of widest range."""
    count = activation.shape[1]
    if max_channels is None or max_channels >= count:
        return torch.arange(count, device=activation.device).expand(activation.shape[0], count)
    flat = activation.flatten(2)
    spread = flat.amax(dim=2) - flat.amin(dim=2)
    return torch.argsort(spread, dim=1, descending=True, stable=True)[:, :max_channels]


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each (B, 1, *S) map min-max scaled to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), 0.0)
    return scaled.reshape(maps.shape)


def _check_score_options(options: Mapping[str, Any]) -> None:
    check_positive_int("seg-score-cam", options, "batch_size")
    check_positive_int("seg-score-cam", options, "max_channels", allow_none=True)


@register(
    "seg-score-cam",
    summary="channel weights = softmax over channels of y^c_M(x masked by the channel's map)",
    reference=(
        "Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, 'Score-CAM: Score-Weighted Visual "
        "Explanations for Convolutional Neural Networks', CVPR Workshops 2020"
    ),
    kind="model",
    validate=_check_score_options,
)
def seg_score_cam(
    activation: torch.Tensor,
    context: MethodContext,
    *,
    batch_size: int = 32,
    max_channels: int | None = None,
) -> torch.Tensor:
    r"""Seg-Score-CAM: $L = \sum_k w_k A_k$, $w = \operatorname{softmax}_k(s_k)$.

    Score-CAM (Wang et al., CVPRW 2020) with the segmentation score: each channel map A_k is
    up-sampled to the input grid (bilinear/trilinear, half-pixel centres) and min-max scaled to
    [0, 1] (a constant channel gives an all-zero mask), $H_k$; the model scores the masked
    input, $s_k = y^c_M(x \odot H_k)$ with the target's pixel set M fixed from the original
    prediction, and the weights are the softmax of the s_k over channels. The paper's baseline
    subtraction (the score's *change*) is a shift of all s_k and leaves the softmax unchanged.
    s_k is a sum over M, so for large pixel sets the softmax tends to one channel.

    One masked input serves every target of its sample: ``ceil(C / batch_size)`` forward passes
    per sample, no gradients. ``max_channels`` caps the cost: each sample keeps the channels with
    the widest activation range (max - min over the layer's grid; ties by channel index), the
    others get weight 0. An empty pixel set gives a zero map.

    Args:
        activation: A, shape (N, C, *S).
        context: the input, pixel sets and the scoring forward pass.
        batch_size: masked inputs per forward pass.
        max_channels: ``None`` (all channels) or how many to keep per sample.

    Returns:
        The raw signed maps, shape (N, T, *S).
    """
    if context.score is None:
        raise MethodNotSupportedError(
            "seg-score-cam needs the model: call it through segcam.explain"
        )
    order = _channel_order(activation, max_channels)
    inputs = context.inputs
    input_size = tuple(inputs.shape[2:])
    targets = context.pixel_sets.shape[1]
    maps = []
    for n in range(activation.shape[0]):
        chosen = activation[n, order[n]]  # (k, *S)
        scores = []
        for start in range(0, chosen.shape[0], batch_size):
            block = chosen[start : start + batch_size].unsqueeze(1)  # (B, 1, *S)
            masks = _unit_range(upsample(block, input_size))  # (B, 1, *S_in)
            scores.append(context.score(n, inputs[n : n + 1] * masks))
        weights = torch.softmax(torch.cat(scores).to(activation.dtype), dim=0)  # (k, T)
        sample = torch.einsum("kt,k...->t...", weights, chosen)
        keep = context.nonempty[n].to(sample.dtype).reshape(targets, *([1] * (sample.ndim - 1)))
        maps.append(sample * keep)
    return torch.stack(maps)
