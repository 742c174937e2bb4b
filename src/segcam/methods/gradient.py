"""Gradient-based segmentation CAMs: Seg-HiRes-Grad CAM and Seg-Grad CAM.

Both explain the target score y^c_M = sum_{p in M} y^c_p (raw logits) through a layer with
activation channels A_k, from the gradient G_k = dy^c_M/dA_k taken per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from segcam.errors import OptionError
from segcam.methods.registry import register

__all__ = [
    "seg_grad_cam",
    "seg_grad_cam_plus_plus",
    "seg_hires_grad_cam",
    "seg_layer_cam",
    "seg_xgrad_cam",
    "seg_xres_cam",
]


@register(
    "seg-hires-grad-cam",
    summary="element-wise gradient x activation summed over channels, L = sum_k G_k * A_k",
    reference=(
        "Rheude, Wirtz, Kuijper, Wesarg, 'Leveraging CAM Algorithms for Explaining Medical "
        "Semantic Segmentation', MELBA 2024 (after HiResCAM, Draelos & Carin 2020)"
    ),
)
def seg_hires_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-HiRes-Grad CAM: $L = \sum_k \frac{\partial y^c_M}{\partial A_k} \odot A_k$.

    Rheude et al., MELBA 2024. No spatial averaging of the gradient, so the map is faithful to the
    score: for a layer feeding a 1x1 convolution head, L = (y^c - b_c) * 1[M].

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    # vecdot is the channel sum of the element-wise product; einsum is slower for it
    # (benchmarks/bench_choices.py; for a weights-times-activation sum einsum is the faster).
    result: torch.Tensor = torch.linalg.vecdot(gradient, activation, dim=1)
    return result


@register(
    "seg-grad-cam",
    summary="channel weights = gradient averaged over positions, L = sum_k mean(G_k) * A_k",
    reference=(
        "Vinogradova, Dibrov, Myers, 'Towards Interpretable Semantic Segmentation via Gradient-"
        "weighted Class Activation Mapping', AAAI 2020 (after Grad-CAM, Selvaraju et al. 2017)"
    ),
)
def seg_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-Grad CAM: $L = \sum_k \alpha_k A_k$, channel weights from averaged gradients.

    $\alpha_k = \frac{1}{P}\sum_p \frac{\partial y^c_M}{\partial A_{k,p}}$
    (Vinogradova et al., AAAI 2020), P the number of positions of the layer's grid. For a layer
    feeding a 1x1 convolution head, L = (|M| / P) * (y^c - b_c).

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    weights = gradient.flatten(2).mean(dim=2)
    return torch.einsum("nc,nc...->n...", weights, activation)


@register(
    "seg-layer-cam",
    summary="positive gradients times activations, L = sum_k ReLU(G_k) * A_k",
    reference=(
        "Jiang, Zhang, Hou, Cheng, Wei, 'LayerCAM: Exploring Hierarchical Class Activation Maps "
        "for Localization', IEEE TIP 2021"
    ),
)
def seg_layer_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-LayerCAM: $L = \sum_k \operatorname{ReLU}(G_k) \odot A_k$, G = dy^c_M/dA.

    LayerCAM (Jiang et al., IEEE TIP 2021) with the segmentation score y^c_M. Equals
    Seg-HiRes-Grad CAM wherever every gradient is non-negative.

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    result: torch.Tensor = torch.linalg.vecdot(gradient.clamp_min(0), activation, dim=1)
    return result


@register(
    "seg-xgrad-cam",
    summary="channel weights = sum(A_k * G_k) / sum(A_k), L = sum_k alpha_k * A_k",
    reference=(
        "Fu, Hu, Dong, Guo, Gao, Yang, Tan, 'Axiom-based Grad-CAM: Towards Accurate "
        "Visualization and Explanation of CNNs', BMVC 2020"
    ),
)
def seg_xgrad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-XGrad-CAM: $L = \sum_k \alpha_k A_k$, weights from activation-weighted gradients.

    $\alpha_k = \sum_p A_{k,p} G_{k,p} / \sum_p A_{k,p}$, G = dy^c_M/dA: XGrad-CAM
    (Fu et al., BMVC 2020) with the segmentation score y^c_M. A channel whose activations sum
    to exactly 0 gets weight 0 (its ratio is undefined). For a layer
    feeding a 1x1 convolution head with M = all pixels it equals Seg-Grad CAM (both weights are
    the head's weight). Meant for non-negative (post-ReLU) activations, as in the paper.

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    flat_activation = activation.flatten(2)
    numerator = torch.linalg.vecdot(flat_activation, gradient.flatten(2), dim=2)
    denominator = flat_activation.sum(dim=2)
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    weights = torch.where(denominator != 0, numerator / safe, torch.zeros_like(numerator))
    return torch.einsum("nc,nc...->n...", weights, activation)


@register(
    "seg-grad-cam++",
    summary="weights = sum_p a_kp ReLU(G_kp), a = G^2 / (2 G^2 + G^3 sum_p A_k); L = sum_k w_k A_k",
    reference=(
        "Chattopadhay, Sarkar, Howlader, Balasubramanian, 'Grad-CAM++: Generalized Gradient-"
        "Based Visual Explanations for Deep Convolutional Networks', WACV 2018"
    ),
)
def seg_grad_cam_plus_plus(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-Grad-CAM++: Grad-CAM++ weights with the segmentation score y^c_M.

    With the exponential score $S = \exp(y^c_M)$ and a piecewise-linear network (second
    derivatives of y vanish), the paper's closed form (Chattopadhay et al., WACV 2018, Eq. 19) is

    $$
    a_{kp} = \frac{G_{kp}^2}{2 G_{kp}^2 + G_{kp}^3 \sum_q A_{kq}}, \qquad
    w_k = \sum_p a_{kp} \operatorname{ReLU}(G_{kp}), \qquad L = \sum_k w_k A_k,
    $$

    G = dy^c_M/dA. The positive factor exp(y^c_M) of dS/dA is left out, as in the reference
    implementations: it only scales the map, and it overflows for large pixel sets. Where the
    denominator is 0 (G = 0, or 2 G^2 = -G^3 sum A), a_kp = 0.

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    flat_gradient = gradient.flatten(2)
    squared = flat_gradient * flat_gradient
    activation_sum = activation.flatten(2).sum(dim=2, keepdim=True)
    denominator = 2 * squared + squared * flat_gradient * activation_sum
    nonzero = denominator != 0
    alpha = torch.where(
        nonzero, squared / torch.where(nonzero, denominator, 1.0), torch.zeros_like(squared)
    )
    weights = (alpha * flat_gradient.clamp_min(0)).sum(dim=2)
    return torch.einsum("nc,nc...->n...", weights, activation)


def _check_xres_options(options: Mapping[str, Any]) -> None:
    pool_size = options["pool_size"]
    sizes = [pool_size] if isinstance(pool_size, int) else pool_size
    if (
        not isinstance(sizes, Sequence)
        or isinstance(sizes, str)
        or not sizes
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes)
    ):
        raise OptionError(
            f"seg-xres-cam: pool_size must be a positive int or one positive int per axis; got "
            f"{pool_size!r}"
        )
    if options["pool"] not in ("max", "mean"):
        raise OptionError(f"seg-xres-cam: pool must be 'max' or 'mean'; got {options['pool']!r}")


def _pool_size(pool_size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    sizes = (pool_size,) * dims if isinstance(pool_size, int) else tuple(pool_size)
    if len(sizes) != dims:
        raise OptionError(
            f"seg-xres-cam: pool_size must be a positive int or {dims} positive ints for this "
            f"{dims}-D layer; got {pool_size!r}"
        )
    return sizes


@register(
    "seg-xres-cam",
    summary="gradients pooled in blocks (max or mean) and spread back, L = sum_k pool(G_k) * A_k",
    reference=(
        "Hasany, Petitjean, Mériaudeau, 'Seg-XRes-CAM: Explaining Spatially Local Regions in "
        "Image Segmentation', CVPR Workshops 2023"
    ),
    validate=_check_xres_options,
)
def seg_xres_cam(
    activation: torch.Tensor,
    gradient: torch.Tensor,
    *,
    pool_size: int | Sequence[int] = 2,
    pool: str = "max",
) -> torch.Tensor:
    r"""Seg-XRes-CAM: $L = \sum_k \operatorname{up}(\operatorname{pool}(G_k)) \odot A_k$.

    Hasany et al., CVPRW 2023: the gradient G = dy^c_M/dA of each channel is pooled over blocks
    of ``pool_size`` positions per axis (``pool`` = ``"max"`` or ``"mean"``, stride = block),
    every position of a block takes its block's value (nearest-neighbour up-sampling back to the
    layer's grid, as the authors' order-0 resize), and the result multiplies A element-wise,
    summed over channels. ``pool_size=1`` is Seg-HiRes-Grad CAM; a block as large as the grid
    with ``pool="mean"`` is Seg-Grad CAM. Where the grid is not a multiple of the block, the last
    block of an axis is smaller and pools only its own positions (the authors' code pads it with
    zeros instead, which biases edge blocks).

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).
        pool_size: block size, one int for every axis or one per axis.
        pool: ``"max"`` or ``"mean"``.

    Returns:
        The raw signed map, shape (N, *S).
    """
    dims = gradient.ndim - 2
    sizes = _pool_size(pool_size, dims)
    grid = tuple(gradient.shape[2:])
    if all(s == 1 for s in sizes):
        return seg_hires_grad_cam(activation, gradient)
    flat = gradient.reshape(-1, 1, *grid)
    if pool == "max":
        pooled = F.max_pool3d if dims == 3 else F.max_pool2d
        reduced = pooled(flat, sizes, sizes, ceil_mode=True)
    else:
        pooled_avg = F.avg_pool3d if dims == 3 else F.avg_pool2d
        # count_include_pad=False and ceil_mode: a partial edge block averages its own positions.
        reduced = pooled_avg(flat, sizes, sizes, ceil_mode=True, count_include_pad=False)
    spread = reduced
    for axis, size in enumerate(sizes):
        spread = spread.repeat_interleave(size, dim=2 + axis)
    for axis, size in enumerate(grid):
        spread = spread.narrow(2 + axis, 0, size)
    spread = spread.reshape(gradient.shape)
    return seg_hires_grad_cam(activation, spread)
