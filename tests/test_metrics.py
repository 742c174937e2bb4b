"""Metrics on hand-made maps with known answers, against Quantus where definitions coincide."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import segcam
from segcam.metrics import (
    DeletionInsertionAUC,
    EnergyInside,
    MetricError,
    cascading_randomization,
    deletion_insertion,
    energy_inside,
    pointing_game,
    relevance_rank_accuracy,
    spearman,
)
from segcam.testing import HeadNet


def test_energy_inside_known_values():
    region = torch.tensor([[True, True], [False, False]])
    maps = torch.tensor(
        [
            [[1.0, 2.0], [0.0, 0.0]],  # all positive mass inside
            [[1.0, 1.0], [1.0, 1.0]],  # half
            [[-5.0, 3.0], [1.0, -2.0]],  # negatives ignored: 3 of 4
            [[0.0, 0.0], [-1.0, 0.0]],  # no positive evidence: undefined
        ]
    )
    values = energy_inside(maps, region)
    assert values[:3].tolist() == [1.0, 0.5, 0.75] and math.isnan(values[3])
    volume = torch.zeros(1, 2, 2, 2)
    volume[0, 1, 1, 1] = 2.0
    volume[0, 0, 0, 0] = 6.0
    inside = torch.zeros(2, 2, 2, dtype=torch.bool)
    inside[1, 1, 1] = True
    assert energy_inside(volume, inside).item() == 0.25


def test_pointing_and_rank_accuracy_known_values():
    region = torch.tensor([[True, False, False], [True, True, False]])  # |R| = 3
    maps = torch.tensor([[[5.0, 1.0, 4.0], [3.0, 0.0, 2.0]], [[0.0, 9.0, 0.0], [0.0, 0.0, 0.0]]])
    assert pointing_game(maps, region).tolist() == [1.0, 0.0]
    # sample 0: top-3 = 5 (in), 4 (out), 3 (in) -> 2/3; sample 1: 9 (out), then ties by index:
    # positions 0 (in), 2 (out) -> 1/3
    torch.testing.assert_close(relevance_rank_accuracy(maps, region), torch.tensor([2 / 3, 1 / 3]))


def test_batch_consistency():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 4, 6, 6, generator=generator)
    regions = torch.rand(5, 4, 6, 6, generator=generator) > 0.5
    for metric in (energy_inside, pointing_game, relevance_rank_accuracy):
        batched = metric(maps, regions)
        single = torch.cat([metric(maps[i : i + 1], regions[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(batched, single, equal_nan=True)


def test_bad_input():
    with pytest.raises(MetricError, match="does not match"):
        energy_inside(torch.ones(2, 4, 4), torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(MetricError, match="empty region for samples \\[1\\]"):
        region = torch.ones(2, 4, 4, dtype=torch.bool)
        region[1] = False
        pointing_game(torch.ones(2, 4, 4), region)
    with pytest.raises(MetricError, match="maps must be"):
        relevance_rank_accuracy(torch.ones(4, 4), torch.ones(4, 4))


def test_running_mean_class():
    metric = EnergyInside()
    region = torch.tensor([[True, False]])
    metric.update(torch.tensor([[[1.0, 1.0]]]), region)
    metric.update(torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]), region)
    assert metric.compute() == 0.75 and metric.count == 2 and metric.undefined == 1


class Linear(nn.Module):
    """y^0_p = 2 x_p + 1: each pixel's input is its own score contribution."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.head.weight.fill_(2.0)
            self.head.bias.fill_(1.0)

    def forward(self, x):
        return self.head(x)


def test_deletion_and_insertion_on_a_linear_model():
    x = torch.tensor([[[[4.0, 3.0, 2.0, 1.0]]]])
    perfect = 2 * x[:, 0]  # the exact contributions
    # The score over M = all pixels (class 1 of a one-channel output is the logit itself).
    target = segcam.AllPixels(1)
    deletion = deletion_insertion(Linear(), x, perfect, target, steps=4, baseline=0.0)
    # removing 4, 3, 2, 1 in turn: 2*(10, 6, 3, 1, 0) + 4 (the biases of 4 pixels)
    torch.testing.assert_close(deletion.scores[0], torch.tensor([24.0, 16.0, 10.0, 6.0, 4.0]))
    assert deletion.auc.item() == pytest.approx(0.25 * (12 + 16 + 10 + 6 + 2))
    insertion = deletion_insertion(
        Linear(), x, perfect, target, mode="insertion", steps=4, baseline=0.0
    )
    torch.testing.assert_close(insertion.scores[0], torch.tensor([4.0, 12.0, 18.0, 22.0, 24.0]))
    reverse = deletion_insertion(Linear(), x, -perfect, target, steps=4, baseline=0.0)
    assert reverse.auc.item() > deletion.auc.item()  # the worst order deletes slowest
    batched = deletion_insertion(
        Linear(),
        x.repeat(3, 1, 1, 1),
        perfect.repeat(3, 1, 1),
        target,
        steps=4,
        baseline=0.0,
        batch_size=4,
    )
    torch.testing.assert_close(batched.scores, deletion.scores.repeat(3, 1))


def test_deletion_3d_and_baselines():
    model = HeadNet(3, seed=1).eval()
    x = torch.randn(2, 1, 4, 6, 6)
    maps = segcam.explain(model, x, segcam.AllPixels(2), "body").maps[:, 0]
    for baseline in ("blur", "mean", "constant", 0.5):
        curves = deletion_insertion(model, x, maps, segcam.AllPixels(2), steps=3, baseline=baseline)
        assert curves.scores.shape == (2, 4)
        with torch.no_grad():
            full = model(x)[:, 2].flatten(1).sum(1)
        torch.testing.assert_close(curves.scores[:, 0], full)  # nothing deleted yet
    with pytest.raises(MetricError, match="input's resolution"):
        deletion_insertion(model, x, maps[:, :2], segcam.AllPixels(2))


def test_spearman_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    values = spearman(a, b)
    assert values[0].item() == pytest.approx(1.0) and values[1].item() == pytest.approx(-1.0)
    assert math.isnan(values[2].item())
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (3, 30), generator=generator).float()  # many ties
    y = torch.randn(3, 30, generator=generator)
    for row in range(3):
        expected = scipy_stats.spearmanr(x[row].numpy(), y[row].numpy()).statistic
        assert spearman(x[row : row + 1], y[row : row + 1]).item() == pytest.approx(expected)


def test_cascading_randomization_decorrelates_a_toy_net():
    model = HeadNet(2, features=8, seed=0).eval()
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]

    def maps(net):
        return segcam.explain(
            net, x, segcam.AllPixels(1), "body.1", relu=False, upsample=False
        ).maps

    steps = cascading_randomization(model, x, maps, seed=0)
    assert [name for name, _ in steps] == ["head", "body.2", "body.0"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    final = steps[-1][1]
    assert abs(float(final.mean())) < 0.2  # everything random: the ranks no longer agree
    identical = cascading_randomization(model, x, maps, layers=[])
    assert identical == []


def test_agreement_with_quantus():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    # Non-negative (as after ReLU) and free of ties: Quantus breaks rank ties arbitrarily.
    maps = np.abs(rng.normal(size=(6, 1, 10, 10))).astype(np.float32)
    regions = (rng.random((6, 1, 10, 10)) > 0.6).astype(np.float32)
    x = rng.normal(size=(6, 1, 10, 10)).astype(np.float32)
    y = np.zeros(6, dtype=int)
    ours = {
        "PointingGame": pointing_game,
        "AttributionLocalisation": energy_inside,  # same on non-negative maps
        "RelevanceRankAccuracy": relevance_rank_accuracy,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, function in ours.items():
            theirs = getattr(quantus, name)(
                disable_warnings=True,
                **({"abs": False, "normalise": False} if name == "AttributionLocalisation" else {}),
            )(model=None, x_batch=x, y_batch=y, a_batch=maps, s_batch=regions, channel_first=True)
            mine = function(torch.from_numpy(maps[:, 0]), torch.from_numpy(regions[:, 0]) > 0)
            np.testing.assert_allclose(
                mine.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-5, atol=1e-6
            )


def test_deletion_auc_class_accumulates():
    x = torch.tensor([[[[4.0, 3.0, 2.0, 1.0]]]])
    metric = DeletionInsertionAUC(Linear(), steps=4, baseline=0.0)
    first = metric.update(x, 2 * x[:, 0], segcam.AllPixels(1))
    metric.update(x, -2 * x[:, 0], segcam.AllPixels(1))
    assert first.item() == pytest.approx(11.5)
    reverse = deletion_insertion(
        Linear(), x, -2 * x[:, 0], segcam.AllPixels(1), steps=4, baseline=0.0
    ).auc.item()
    assert metric.compute() == pytest.approx((11.5 + reverse) / 2) and metric.count == 2
