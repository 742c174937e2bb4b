"""Combine the maps of several layers of one explanation into one map per sample and target.

Shallow layers see fine detail, deep ones semantics; LayerCAM (Jiang et al., IEEE TIP 2021,
Sec. III-C) fuses them by scaling each map with a saturating tanh and taking the element-wise
maximum. All layers come from the same forward and backward passes: fusing costs no model call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from segcam.errors import OptionError
from segcam.postprocess import normalize, relu, upsample

__all__ = ["FUSION_RULES", "LayerMaps", "fuse_layers"]

FUSION_RULES: tuple[str, ...] = ("layercam", "max", "mean")


class LayerMaps(Protocol):
    """What fusion reads of an :class:`~segcam.Explanation`: its maps per layer, its pixel sets.

    (A protocol, so that fusion sits below the explanation it serves.)
    """

    @property
    def layer_maps(self) -> Mapping[str, torch.Tensor]:  # noqa: D102
        ...

    @property
    def pixel_sets(self) -> torch.Tensor:  # noqa: D102
        ...


def fuse_layers(
    explanation: LayerMaps, rule: str = "layercam", *, gamma: float = 2.0
) -> torch.Tensor:
    r"""One (N, T, *S) map from all layers of ``explanation``, S the output's grid.

    Each layer's map is made non-negative (ReLU) and up-sampled to the grid of the pixel sets
    (bilinear/trilinear) if it is not already; then, per sample and target:

    - ``"layercam"``: $\hat L_l = \tanh(\gamma L_l / \max L_l)$, fused
      $\max_l \hat L_l$ (LayerCAM's scaling, applied to every layer so that all share the
      range [0, tanh(gamma)]);
    - ``"max"``: $\max_l L_l / \max L_l$;
    - ``"mean"``: $\operatorname{mean}_l L_l / \max L_l$.

    A map that is zero everywhere stays zero (never NaN).

    Args:
        explanation: an explanation of one or more layers.
        rule: ``"layercam"``, ``"max"`` or ``"mean"``.
        gamma: LayerCAM's scale factor (the paper uses 2).

    Returns:
        The fused maps, (N, T, *S), values in [0, 1].
    """
    if rule not in FUSION_RULES:
        raise OptionError(f"rule must be one of {', '.join(FUSION_RULES)}; got {rule!r}")
    if not gamma > 0:
        raise OptionError(f"gamma must be positive; got {gamma!r}")
    size = tuple(explanation.pixel_sets.shape[2:])
    scaled = []
    for maps in explanation.layer_maps.values():
        unit = normalize(upsample(relu(maps), size), "max")
        scaled.append(torch.tanh(gamma * unit) if rule == "layercam" else unit)
    stacked = torch.stack(scaled)
    return stacked.mean(dim=0) if rule == "mean" else stacked.amax(dim=0)
