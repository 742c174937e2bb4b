"""Metrics of explanations: pure functions (:mod:`segcam.metrics.functional`) and thin classes.

The classes accumulate a functional metric over batches (``update``) and report the mean and
count of the defined values (``compute``), in the style of torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from segcam.metrics.functional import (
    Curves,
    MetricError,
    cascading_randomization,
    deletion_insertion,
    energy_inside,
    fold_agreement,
    pointing_game,
    relevance_rank_accuracy,
    spearman,
)

__all__ = [
    "Curves",
    "DeletionInsertionAUC",
    "EnergyInside",
    "MetricError",
    "PointingGame",
    "RelevanceRankAccuracy",
    "cascading_randomization",
    "deletion_insertion",
    "energy_inside",
    "fold_agreement",
    "pointing_game",
    "relevance_rank_accuracy",
    "spearman",
]


class _Mean:
    """Mean of a per-sample metric over all updates; NaN (undefined) values are counted apart."""

    function: Callable[[torch.Tensor, Any], torch.Tensor]

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.undefined = 0

    def update(self, maps: torch.Tensor, region: Any) -> torch.Tensor:
        """Add a batch; return its per-sample values."""
        values = type(self).function(maps, region)
        defined = ~torch.isnan(values)
        self.total += float(values[defined].sum())
        self.count += int(defined.sum())
        self.undefined += int((~defined).sum())
        return values

    def compute(self) -> float:
        """Mean over all defined values so far (NaN before any)."""
        return self.total / self.count if self.count else math.nan


class EnergyInside(_Mean):
    """Running mean of :func:`energy_inside`."""

    function = staticmethod(energy_inside)


class PointingGame(_Mean):
    """Running mean of :func:`pointing_game` (the hit rate)."""

    function = staticmethod(pointing_game)


class RelevanceRankAccuracy(_Mean):
    """Running mean of :func:`relevance_rank_accuracy`."""

    function = staticmethod(relevance_rank_accuracy)


class DeletionInsertionAUC:
    """Running mean of the deletion or insertion AUC (:func:`deletion_insertion`) of one model.

    ``update(inputs, maps, target)`` scores a batch and returns its per-sample AUCs;
    ``compute()`` is the mean over all samples so far.
    """

    def __init__(self, model: torch.nn.Module, mode: str = "deletion", **options: Any) -> None:
        self.model, self.mode, self.options = model, mode, options
        self.total = 0.0
        self.count = 0

    def update(self, inputs: torch.Tensor, maps: torch.Tensor, target: Any) -> torch.Tensor:
        """Add a batch; return its per-sample AUCs."""
        curves = deletion_insertion(
            self.model,
            inputs,
            maps,
            target,
            mode=self.mode,  # type: ignore[arg-type]
            **self.options,
        )
        values = curves.auc
        self.total += float(values.sum())
        self.count += int(values.numel())
        return values

    def compute(self) -> float:
        """Mean AUC over all samples so far (NaN before any)."""
        return self.total / self.count if self.count else math.nan
