"""Metrics of explanations, as pure functions on tensors (2D and 3D alike, batched, on device).

Maps are (N, *S) at the input's resolution (``explain(..., upsample=True)``); reference regions R
are (N, *S) or (*S) bool tensors. Reductions run over ``range(1, ndim)``, so 2D and 3D work alike.

Localisation (against a region R: the pixel set M, or a ground-truth mask):
- :func:`energy_inside`: share of the map's positive mass inside R (Wang et al., Score-CAM,
  CVPRW 2020, "energy-based pointing game"; Quantus' ``AttributionLocalisation``).
- :func:`pointing_game`: is the map's maximum inside R (Zhang et al., ECCV 2016).
- :func:`relevance_rank_accuracy`: share of the |R| highest-ranked positions inside R (Arras et
  al., "CLEVR-XAI", Information Fusion 2022).

Agreement: :func:`fold_agreement`, the mean pairwise :func:`spearman` of several models' maps
(nnU-Net's folds) inside and around each pixel set.

Faithfulness: :func:`deletion_insertion` (Petsiuk et al., RISE, BMVC 2018) on the target score
y^c_M. Sanity: :func:`cascading_randomization` (Adebayo et al., NeurIPS 2018) with
:func:`spearman`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from segcam.errors import MetricError
from segcam.pixel_sets import as_pixel_set, class_logits
from segcam.targets import TargetLike

__all__ = [
    "Curves",
    "MetricError",
    "cascading_randomization",
    "deletion_insertion",
    "energy_inside",
    "fold_agreement",
    "pointing_game",
    "relevance_rank_accuracy",
    "spearman",
]


def _region(maps: torch.Tensor, region: Any, what: str) -> torch.Tensor:
    if maps.ndim not in (3, 4):
        raise MetricError(
            f"{what}: maps must be (N, H, W) or (N, D, H, W), got {tuple(maps.shape)}"
        )
    mask: torch.Tensor = torch.as_tensor(region, device=maps.device)
    if tuple(mask.shape) == tuple(maps.shape[1:]):
        mask = mask.unsqueeze(0).expand_as(maps)
    if mask.shape != maps.shape:
        raise MetricError(
            f"{what}: region shape {tuple(mask.shape)} does not match maps {tuple(maps.shape)}"
        )
    mask = mask.bool()
    empty = ~mask.flatten(1).any(dim=1)
    if bool(empty.any()):
        raise MetricError(
            f"{what}: empty region for samples {empty.nonzero().flatten().tolist()}; the metric "
            f"is undefined there"
        )
    return mask


def energy_inside(maps: torch.Tensor, region: Any) -> torch.Tensor:
    """Share of positive map mass inside R: sum(max(L, 0) * 1[R]) / sum(max(L, 0)), per sample.

    1 when all positive evidence lies in R, 0 when none does; NaN for a map without positive
    values (no evidence anywhere: undefined, not 0).
    """
    mask = _region(maps, region, "energy_inside")
    positive = maps.clamp_min(0).flatten(1)
    total = positive.sum(dim=1)
    inside = (positive * mask.flatten(1)).sum(dim=1)
    return torch.where(
        total > 0,
        inside / total.clamp_min(torch.finfo(maps.dtype).tiny),
        torch.full_like(total, math.nan),
    )


def pointing_game(maps: torch.Tensor, region: Any) -> torch.Tensor:
    """1.0 where the map's maximum lies in R, else 0.0, per sample (first maximum on ties)."""
    mask = _region(maps, region, "pointing_game")
    peak = maps.flatten(1).argmax(dim=1, keepdim=True)
    return mask.flatten(1).gather(1, peak).squeeze(1).to(maps.dtype)


def relevance_rank_accuracy(maps: torch.Tensor, region: Any) -> torch.Tensor:
    """Share of the |R| highest-valued positions that lie in R, per sample (ties by index)."""
    mask = _region(maps, region, "relevance_rank_accuracy").flatten(1)
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    sizes = mask.sum(dim=1)
    ranked_inside = mask.gather(1, order)
    within = torch.arange(flat.shape[1], device=maps.device).unsqueeze(0) < sizes.unsqueeze(1)
    return (ranked_inside & within).sum(dim=1).to(maps.dtype) / sizes.to(maps.dtype)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions) along the last axis."""
    flat = values.reshape(-1, values.shape[-1])
    ranks = torch.empty_like(flat, dtype=torch.float64)
    for row, vector in enumerate(flat):
        sorted_values, order = torch.sort(vector, stable=True)
        _, inverse, counts = torch.unique_consecutive(
            sorted_values, return_inverse=True, return_counts=True
        )
        ends = torch.cumsum(counts, 0).to(torch.float64)
        average = ends - (counts.to(torch.float64) - 1) / 2  # 1-based mean position of a group
        ranks[row, order] = average[inverse]
    return ranks.reshape(values.shape)


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample of two (N, ...) tensors (average ranks for ties).

    NaN where either sample is constant.
    """
    if first.shape != second.shape:
        raise MetricError(f"spearman: shapes {tuple(first.shape)} and {tuple(second.shape)} differ")
    a = _ranks(first.flatten(1).double())
    b = _ranks(second.flatten(1).double())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    correlation = (a * b).sum(dim=1) / denominator
    return torch.where(denominator > 0, correlation, torch.full_like(correlation, math.nan))


def fold_agreement(
    fold_maps: Mapping[str, Mapping[str, torch.Tensor]], pixel_sets: torch.Tensor, margin: int = 3
) -> dict[str, list[dict[str, float | None]]]:
    """Mean pairwise Spearman rank correlation of several models' maps, inside and around M.

    Args:
        fold_maps: model (fold) name -> layer -> maps (1, T, *S) of the same targets.
        pixel_sets: (1, T, *S) the targets' pixel sets M.
        margin: "around" is the ring of voxels within ``margin`` (max norm) of M, outside it.

    Returns:
        layer -> per target ``{"inside": r, "around": r}``: the mean over model pairs of the
        Spearman correlation of the maps' values there (a constant map counts as 0); ``None``
        with fewer than two models or fewer than 3 voxels in the region.
    """
    names = list(fold_maps)
    sets = pixel_sets[0].float()
    pool = F.max_pool3d if sets.ndim - 1 == 3 else F.max_pool2d
    around = pool(sets[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    result: dict[str, list[dict[str, float | None]]] = {}
    for layer in fold_maps[names[0]]:
        per_target = []
        for t in range(sets.shape[0]):
            inside = sets[t] > 0
            scores: dict[str, float | None] = {}
            for label, region in (("inside", inside), ("around", around[t] & ~inside)):
                values = [fold_maps[n][layer][0, t][region].double() for n in names]
                if len(names) < 2 or values[0].numel() < 3:
                    scores[label] = None
                    continue
                correlations = []
                for i, j in itertools.combinations(range(len(names)), 2):
                    rho = float(spearman(values[i][None], values[j][None])[0])
                    correlations.append(rho if math.isfinite(rho) else 0.0)
                scores[label] = sum(correlations) / len(correlations)
            per_target.append(scores)
        result[layer] = per_target
    return result


Baseline = Literal["blur", "constant", "mean"] | float | torch.Tensor


def _baseline(inputs: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(inputs).expand_as(inputs)
    if isinstance(baseline, int | float):
        return torch.full_like(inputs, float(baseline))
    if baseline == "constant":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        spatial = tuple(range(2, inputs.ndim))
        return inputs.mean(dim=spatial, keepdim=True).expand_as(inputs)
    if baseline == "blur":
        # A box blur a quarter of each axis wide: coarse content kept, detail removed.
        kernel = tuple(max(1, size // 4) | 1 for size in inputs.shape[2:])
        pool = F.avg_pool2d if inputs.ndim == 4 else F.avg_pool3d
        return pool(
            inputs, kernel, stride=1, padding=tuple(k // 2 for k in kernel), count_include_pad=False
        )
    raise MetricError(
        f"unknown baseline {baseline!r}: use 'blur', 'constant', 'mean', a number or a tensor"
    )


@dataclass(frozen=True)
class Curves:
    """Deletion or insertion curves: scores (N, steps + 1) at the given fractions, and their AUC."""

    fractions: torch.Tensor
    scores: torch.Tensor

    @property
    def auc(self) -> torch.Tensor:
        """Area under each curve over fractions in [0, 1] (trapezoidal rule), per sample."""
        return torch.trapezoid(self.scores, self.fractions.to(self.scores), dim=1)


def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    target: TargetLike,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 32,
    output: Callable[[Any], torch.Tensor] | None = None,
) -> Curves:
    r"""Deletion or insertion curves of the target score y^c_M as input positions change.

    Positions are ranked by map value (highest first; ties by index). For ``k`` in ``steps + 1``
    equal fractions of all positions, deletion replaces the top-``k`` positions (all channels) of
    the input by the baseline; insertion starts from the baseline and puts back the top-``k``.
    The score of each perturbed input is $y^c_M = \sum_{p \in M} y^c_p$ with M the
    target's pixel set on the *unperturbed* prediction (Petsiuk et al., BMVC 2018, with the
    segmentation score). A faithful map makes deletion fall fast (low AUC) and insertion rise
    fast (high AUC). Perturbed inputs run through the model in batches of ``batch_size``, under
    ``torch.no_grad``.
    """
    if maps.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise MetricError(
            f"deletion_insertion: maps {tuple(maps.shape)} must be (N, *S) at the input's "
            f"resolution {tuple(inputs.shape[2:])}; explain with upsample=True"
        )
    if steps < 1:
        raise MetricError(f"steps must be at least 1, got {steps}")
    select = output or (lambda raw: raw)
    with torch.no_grad():
        logits = select(model(inputs))
        pixel_set = as_pixel_set(target.pixel_set(logits), logits, repr(target)).to(logits.dtype)
        reference = _baseline(inputs, baseline)
        batch, positions = inputs.shape[0], maps[0].numel()
        order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(positions, device=maps.device).expand_as(order))
        fractions = torch.linspace(0, 1, steps + 1, device=inputs.device)
        counts = (fractions * positions).round().long()
        jobs = [(n, k) for n in range(batch) for k in range(steps + 1)]
        scores = torch.empty(batch, steps + 1, device=inputs.device, dtype=logits.dtype)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            samples = torch.tensor([n for n, _ in chunk], device=inputs.device)
            limits = counts[torch.tensor([k for _, k in chunk], device=inputs.device)]
            changed = (ranks[samples] < limits.unsqueeze(1)).reshape(len(chunk), 1, *maps.shape[1:])
            if mode == "insertion":
                changed = ~changed
            elif mode != "deletion":
                raise MetricError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
            perturbed = torch.where(changed, reference[samples], inputs[samples])
            chunk_logits = select(model(perturbed))
            class_map = class_logits(chunk_logits, target.class_index)
            chunk_scores = (class_map * pixel_set[samples]).flatten(1).sum(dim=1)
            for (n, k), value in zip(chunk, chunk_scores, strict=True):
                scores[n, k] = value
    return Curves(fractions=fractions, scores=scores)


def _parameter_layers_from_output(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """Names of modules with their own parameters, in reverse order of execution."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: order.append(name) if name not in order else None
                )
            )
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order[::-1]


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    explain_maps: Callable[[nn.Module], torch.Tensor],
    *,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018).

    Layers with parameters are randomised cumulatively from the output backwards (on a copy;
    the model is untouched): each gets fresh weights from ``reset_parameters()`` (PyTorch's
    default initialisation) under a seeded generator, or N(0, std of its weights) when it has
    none. After each step ``explain_maps(copy)`` is called and the Spearman rank correlation
    between the original and the new maps is recorded per sample (maps flattened over all but
    the batch axis). A method whose maps depend on the learnt parameters shows falling
    correlations.

    Returns:
        ``[(layer name, correlations (N,)), ...]`` in randomisation order.
    """
    reference = explain_maps(model).detach()
    randomised = copy.deepcopy(model)
    names = (
        list(layers) if layers is not None else _parameter_layers_from_output(randomised, inputs)
    )
    modules = dict(randomised.named_modules())
    results = []
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        for name in names:
            results.append(
                (name, _randomise_and_compare(modules[name], randomised, reference, explain_maps))
            )
    return results


def _randomise_and_compare(
    module: nn.Module,
    model: nn.Module,
    reference: torch.Tensor,
    explain_maps: Callable[[nn.Module], torch.Tensor],
) -> torch.Tensor:
    reset = getattr(module, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
        else:
            for parameter in module.parameters(recurse=False):
                parameter.normal_(0, float(parameter.std()) if parameter.numel() > 1 else 1.0)
    return spearman(reference, explain_maps(model).detach())
