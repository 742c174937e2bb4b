"""Gradient-based segmentation CAMs: Seg-HiRes-Grad CAM and Seg-Grad CAM.

Both explain the target score y^c_M = sum_{p in M} y^c_p (raw logits) through a layer with
activation channels A_k, from the gradient G_k = dy^c_M/dA_k taken per sample.
"""

from __future__ import annotations

import torch

from segcam.methods import register

__all__ = ["seg_grad_cam", "seg_hires_grad_cam", "seg_layer_cam", "seg_xgrad_cam"]


@register(
    "seg-hires-grad-cam",
    summary="element-wise gradient x activation summed over channels, L = sum_k G_k * A_k",
    reference=(
        "Rheude, Wirtz, Kuijper, Wesarg, 'Leveraging CAM Algorithms for Explaining Medical "
        "Semantic Segmentation', MELBA 2024 (after HiResCAM, Draelos & Carin 2020)"
    ),
)
def seg_hires_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""Seg-HiRes-Grad CAM: :math:`L = \sum_k \frac{\partial y^c_M}{\partial A_k} \odot A_k`.

    Rheude et al., MELBA 2024. No spatial averaging of the gradient, so the map is faithful to the
    score: for a layer feeding a 1x1 convolution head, L = (y^c - b_c) * 1[M].

    Args:
        activation: A, shape (N, C, *S).
        gradient: dy^c_M/dA, shape (N, C, *S).

    Returns:
        The raw signed map, shape (N, *S).
    """
    # vecdot is the channel sum of the element-wise product; einsum is ~10x slower here.
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
    r"""Seg-Grad CAM: :math:`L = \sum_k \alpha_k A_k`, channel weights from averaged gradients.

    :math:`\alpha_k = \frac{1}{P}\sum_p \frac{\partial y^c_M}{\partial A_{k,p}}`
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
    r"""Seg-LayerCAM: :math:`L = \sum_k \operatorname{ReLU}(G_k) \odot A_k`, G = dy^c_M/dA.

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
    r"""Seg-XGrad-CAM: :math:`L = \sum_k \alpha_k A_k`, weights from activation-weighted gradients.

    :math:`\alpha_k = \sum_p A_{k,p} G_{k,p} / \sum_p A_{k,p}`, G = dy^c_M/dA: XGrad-CAM
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
