"""selection.auto_k_repeated: p-values of repeated splits aggregated at their gamma-quantile."""

from __future__ import annotations

import pytest
import torch
from conftest import make_head

from lip_cli import selection
from lip_cli.lip import LapStatistics


@pytest.mark.parametrize(
    "p_values, gamma, expected",
    [
        ([0.01, 0.02, 0.5, 0.9], 0.5, 0.04),  # the 2nd smallest of 4, over gamma
        ([0.01, 0.02, 0.03, 0.9, 0.9], 0.5, 0.06),  # ceil(2.5) = 3rd smallest
        ([0.3], 0.5, 0.6),
        ([0.6, 0.7], 0.5, 1.0),  # capped at 1
        ([0.04, 0.2, 0.01, 0.5], 0.25, 0.04),  # the smallest of 4 at gamma 1/4
        ([0.04, 0.2, 0.01, 0.5], 1.0, 0.5),  # the largest
    ],
)
def test_quantile_aggregation(p_values: list[float], gamma: float, expected: float) -> None:
    assert selection.aggregate_p_values(p_values, gamma) == pytest.approx(expected)


def _null_problem(seed: int) -> tuple[LapStatistics, torch.Tensor, torch.Tensor]:
    """Labels independent of the features (so no k can help), at a realistic size: 400 training and
    1,000 validation rows, 10 classes (about 10% of the confirmation rows discordant)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 32, generator=generator, dtype=torch.float64)
    bias = torch.randn(10, generator=generator, dtype=torch.float64) * 0.1
    x = torch.randn(1400, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(10, (1400,), generator=generator)
    stats = LapStatistics(weight, bias)
    stats.update(x[:400], y[:400])
    return stats, stats.project(x[400:]), y[400:]


def test_repeated_splits_keep_the_level_where_the_best_split_would_not() -> None:
    """80 null problems, 5 splits each: the aggregate changes the head in at most alpha of them,
    where taking the best of the 5 splits (seed shopping) changes about twice alpha."""
    changed = 0
    for seed in range(80):
        stats, z, y = _null_problem(seed)
        changed += selection.auto_k_repeated(stats, z, y, "logit-scale", 0.05, splits=5).confirmed
    assert changed <= 4  # alpha of 80


def test_one_split_is_auto_k() -> None:
    """Each split is what auto_k decides on the same halves; the k applied is one the counted splits chose."""
    head = make_head(n=600, q=16, l=8, seed=21)  # an untrained head that LAP helps
    stats = LapStatistics(head.weight, head.bias)
    stats.update(head.features[:300], head.labels[:300])
    z, y = stats.project(head.features[300:]), head.labels[300:]
    decision = selection.auto_k_repeated(stats, z, y, "paper", 0.05, splits=6, seed=3)
    for index, (k, p) in enumerate(zip(decision.split_ks, decision.split_p_values, strict=True)):
        confirm = selection.split_rows(torch.ones(300, dtype=torch.bool), 3 + index)
        single = selection.auto_k(stats, [(z[~confirm], y[~confirm])], [(z[confirm], y[confirm])], "paper")
        assert (k, p) == (single.best_k, single.p_value if single.best_k != stats.svd.rank else 1.0)
    assert decision.p_value == pytest.approx(selection.aggregate_p_values(decision.split_p_values))
    assert decision.confirmed and decision.p_value <= 0.05
    counted = [k for k, p in zip(decision.split_ks, decision.split_p_values, strict=True) if p <= 0.025]
    assert decision.k == max(set(counted), key=lambda k: (counted.count(k), k))
    assert f"confirmed in {decision.split_confirmations} of 6 splits" in decision.reason
