"""Choosing k: the split, the exact McNemar test, the interval, and the decision through the library."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import make_head
from hypothesis import given, settings
from hypothesis import strategies as st

from lip_cli import LapStatistics, count_correct, lip, power, selection
from lip_cli.selection import PairedCounts


def direct_tail(gains: int, losses: int) -> Fraction:
    """P(X >= gains), X ~ Bin(gains + losses, 1/2), summed term by term in exact fractions."""
    n = gains + losses
    return Fraction(sum(math.comb(n, i) for i in range(max(gains, 0), n + 1)), 2**n)


@pytest.mark.parametrize(
    ("gains", "losses"),
    [(0, 0), (5, 0), (0, 5), (3, 3), (10, 4), (4, 10), (1, 0), (0, 1), (60, 40), (501, 499)],
)
def test_p_value_is_the_sum_of_binomial_terms(gains: int, losses: int) -> None:
    assert selection.mcnemar_p_value(gains, losses) == pytest.approx(
        float(direct_tail(gains, losses)), rel=1e-12
    )


def test_p_value_special_cases() -> None:
    assert selection.mcnemar_p_value(0, 0) == 1.0  # no discordant rows: no evidence
    assert selection.mcnemar_p_value(5, 0) == 1 / 32  # a sweep of 5
    assert selection.mcnemar_p_value(3, 3) == 42 / 64  # a tie is far from significant
    assert selection.mcnemar_p_value(0, 9) == 1.0  # one-sided: losses never count as evidence of a gain


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_one_sided_p_values_of_both_directions_add_up(gains: int, losses: int) -> None:
    exact = direct_tail(gains, losses)
    assert selection.mcnemar_p_value(gains, losses) == pytest.approx(float(exact), rel=1e-12, abs=1e-300)
    if gains + losses:  # P(X >= g) + P(X >= l + 1) = 1 for X ~ Bin(g + l, 1/2)
        total = exact + direct_tail(losses + 1, gains - 1) if gains else exact
        assert total == 1


def test_large_counts_use_logs_and_agree_with_exact_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "EXACT_UP_TO", 100)  # the float64 log path from 101 trials on
    n = 3001
    for gains in (n // 2 - 80, n // 2 + 1, n // 2 + 90, n - 2):
        assert selection.binomial_upper_tail(gains, n) == pytest.approx(
            float(direct_tail(gains, n - gains)), rel=1e-9
        )


def test_interval_properties() -> None:
    for counts in [
        PairedCounts(50, 12, 3, 35),
        PairedCounts(0, 0, 0, 10),
        PairedCounts(0, 7, 0, 0),
        PairedCounts(3, 1, 9, 2),
    ]:
        low, high = selection.change_interval(counts)
        assert -1 <= low <= counts.change <= high <= 1
        mirrored = PairedCounts(counts.both, counts.losses, counts.gains, counts.neither)
        assert selection.change_interval(mirrored) == pytest.approx((-high, -low))
    wide, narrow = (
        selection.change_interval(PairedCounts(50, 12, 3, 35)),
        selection.change_interval(PairedCounts(500, 120, 30, 350)),
    )
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize(("rows", "shares"), [(200, (0.55, 0.08, 0.04, 0.33)), (60, (0.7, 0.05, 0.05, 0.2))])
def test_interval_covers_the_true_change_95_percent_of_the_time(rows: int, shares: tuple[float, ...]) -> None:
    rng = np.random.default_rng(7)
    tables = rng.multinomial(rows, shares, size=4000)
    truth = shares[1] - shares[2]
    covered = [
        low <= truth <= high
        for low, high in (selection.change_interval(PairedCounts(*map(int, table))) for table in tables)
    ]
    coverage = float(np.mean(covered))
    assert (
        0.93 <= coverage <= 0.975
    )  # Newcombe's method 10 keeps close to its level; 3 SE of 4000 runs is 0.01


def test_split_is_seeded_exact_and_within_the_eligible_rows() -> None:
    eligible = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.3
    first, again, other = (selection.split_rows(eligible, seed) for seed in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.sum()) == int(eligible.sum()) // 2
    assert not bool((first & ~eligible).any())


def test_minimum_rows_follows_alpha() -> None:
    assert selection.minimum_rows(0.05) == 10  # 5 confirmation rows: a sweep has p = 1/32
    assert selection.minimum_rows(0.01) == 14  # 7: 1/128
    assert selection.minimum_rows(0.05, tests=2) == 12  # cross-fitted, 6 rows: 1/64 <= 0.05 / 2
    assert selection.minimum_rows(0.5) == 2
    for alpha in (0.05, 0.01, 0.2):
        rows = selection.minimum_rows(alpha)
        level = alpha / selection.TESTS
        sweep = selection.mcnemar_p_value(selection.confirmation_count(rows), 0)
        smaller = selection.mcnemar_p_value(selection.confirmation_count(rows - 1), 0)
        assert sweep <= level < smaller or selection.confirmation_count(
            rows - 1
        ) == selection.confirmation_count(rows)


def test_grid_refinement_and_ties() -> None:
    grid = selection.k_grid(128)
    assert len(grid) == 65 and grid[0] == 0 and grid[-1] == 128
    index = grid.index(16)
    assert selection.refined_ks(grid, 16) == [
        k for k in range(grid[index - 1] + 1, grid[index + 1]) if k not in grid
    ]
    assert selection.refined_ks(selection.k_grid(1000), 16) == [k for k in range(1, 31) if k != 16]
    assert selection.refined_ks(grid, 0) == [1]
    assert selection.refined_ks(list(range(9)), 4) == []
    assert selection.best_k([0, 1, 2, 3], [0.5, 0.7, 0.7, 0.6]) == 2  # ties go to the larger k


def test_correct_mask_matches_count_correct() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 5.0, 0.0]])
    for labels in (
        torch.tensor([0, 2, 2]),
        torch.eye(3)[[0, 2, 2]],
        torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    ):
        mask = lip.correct_mask(logits, labels)
        assert mask.dtype == torch.bool and mask.tolist() == [True, True, False]
        assert count_correct(logits, labels) == 2


def test_row_hits_of_the_two_compared_heads() -> None:
    """The paired test compares the original head (k = rank) with the repaired one, row by row."""
    head = make_head(n=300, q=12, l=5, seed=3)
    stats = LapStatistics(head.weight, head.bias)
    stats.update(head.features, head.labels)
    heads = lip.KCurve(stats, [stats.svd.rank, 2], "paper")
    before, after = heads.row_hits(stats.project(head.features), head.labels)
    original = (head.features @ head.weight.T + head.bias).argmax(1) == head.labels
    assert torch.equal(before, original)
    repaired = lip.repair(stats, 2, "paper").weight
    expected = (head.features @ repaired.T + head.bias).argmax(1) == head.labels
    assert torch.equal(after, expected)


def test_paired_counts_of_two_masks() -> None:
    before = torch.tensor([True, True, False, False, True])
    after = torch.tensor([True, False, True, False, True])
    assert selection.as_counts(selection.paired_counts(before, after)) == PairedCounts(2, 1, 1, 1)


def _auto_on_random_labels(seed: int, targets: str = "paper", cross_fit: bool = False) -> selection.Decision:
    """A head, training rows and validation rows whose labels are independent of the features."""
    generator = torch.Generator().manual_seed(seed)
    q, classes = 6, 4
    weight = torch.randn(classes, q, generator=generator, dtype=torch.float64)
    bias = torch.randn(classes, generator=generator, dtype=torch.float64) * 0.1
    x = torch.randn(120, q, generator=generator, dtype=torch.float64)
    y = torch.randint(classes, (120,), generator=generator)
    stats = LapStatistics(weight, bias)
    stats.update(x[:60], y[:60])
    z = stats.project(x[60:])
    confirm = selection.split_rows(torch.ones(60, dtype=torch.bool), seed)
    parts = [(z[~confirm], y[60:][~confirm])], [(z[confirm], y[60:][confirm])]
    return selection.auto_k(stats, *parts, targets, cross_fit=cross_fit)


@pytest.mark.parametrize("cross_fit", [False, True])
@pytest.mark.parametrize("targets", ["paper", "logit-scale", "auto"])
def test_false_changes_stay_within_alpha_when_no_k_can_help(
    targets: str, cross_fit: bool, monkeypatch
) -> None:
    # the rows a 1-point gain would need are 99% of a decision's time here and play no part in it
    # (tests/test_power.py checks them): left out, the 1,440 decisions take seconds, not minutes
    monkeypatch.setattr(power, "rows_needed", lambda *args, **kwargs: None)
    runs = 240
    decisions = [_auto_on_random_labels(seed, targets, cross_fit) for seed in range(runs)]
    changed = sum(decision.confirmed for decision in decisions) / runs
    proposed = sum(decision.best_k != decision.rank for decision in decisions) / runs
    assert proposed > 0.3  # the selection part alone would change the head often: the test is what stops it
    assert changed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)
    tests = 2 if cross_fit else 1
    assert all(decision.tests == tests and decision.level == 0.05 / tests for decision in decisions)


def test_cross_fitting_takes_the_stronger_of_two_one_way_decisions(monkeypatch) -> None:
    """Each half chooses once and is tested once; the smaller p-value decides, each test at alpha / 2."""
    monkeypatch.setattr(power, "rows_needed", lambda *args, **kwargs: None)  # as above: no part in it
    for seed in range(40):
        both = _auto_on_random_labels(seed, cross_fit=True)
        one_way = _auto_on_random_labels(seed)
        assert one_way.tests == 1 and one_way.level == one_way.alpha
        if one_way.best_k != one_way.rank:
            assert both.p_value <= one_way.p_value
        assert both.confirmed == (both.best_k != both.rank and both.p_value <= 0.025)


def test_a_cross_fitted_test_needs_p_below_alpha_over_two() -> None:
    table = PairedCounts(50, 9, 2, 39)  # p = 0.0327: below 0.05, above 0.025
    assert 0.025 < selection.mcnemar_p_value(9, 2) < 0.05
    args = ([0, 1, 2], [0.5, 0.6, 0.5], 100, table, 1, 2, 0.05, "val")
    assert selection.decide(*args).confirmed
    crossed = selection.decide(*args, tests=2)
    assert not crossed.confirmed and crossed.k == 2 and "needs p <= 0.025" in crossed.reason


@functools.cache
def _collapsed_head() -> tuple[LapStatistics, torch.Tensor, torch.Tensor, float, float]:
    """A 20-class logistic regression on Gaussian clusters with its tail after k = 8 scaled by 0.05."""
    generator = torch.Generator().manual_seed(5)
    classes, q = 20, 32
    centres = torch.randn(classes, q, generator=generator, dtype=torch.float64)

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(classes, (n,), generator=generator)
        return centres[labels] + torch.randn(n, q, generator=generator, dtype=torch.float64), labels

    x, y = rows(2000)
    x_val, y_val = rows(2000)
    weight = torch.zeros(classes, q, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=60, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 1e-3 * (weight**2).sum()
        value.backward()
        return value

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: one thread is faster, much faster on a busy machine
    try:
        optimiser.step(loss)
    finally:
        torch.set_num_threads(threads)
    weight, bias = weight.detach(), bias.detach()
    u, s, vh = torch.linalg.svd(weight.T, full_matrices=False)
    collapsed = ((u * torch.cat([s[:8], 0.05 * s[8:]])) @ vh).T

    def accuracy(w: torch.Tensor) -> float:
        return float(((x_val @ w.T + bias).argmax(1) == y_val).double().mean())

    stats = LapStatistics(collapsed, bias)
    stats.update(x, y)
    return stats, x_val, y_val, accuracy(weight), accuracy(collapsed)


def test_a_collapsed_tail_is_repaired_and_confirmed() -> None:
    stats, x_val, y_val, clean, collapsed = _collapsed_head()
    assert clean > 0.98 and collapsed < clean - 0.05  # the construction does what it says
    z = stats.project(x_val)
    confirm = selection.split_rows(torch.ones(len(y_val), dtype=torch.bool), 0)
    decision = selection.auto_k(
        stats, [(z[~confirm], y_val[~confirm])], [(z[confirm], y_val[confirm])], "logit-scale"
    )
    assert decision.confirmed and decision.k < stats.svd.rank and decision.p_value < 1e-6
    assert decision.test.rows == 1000 and decision.selection_rows == 1000
    assert decision.test.gains > decision.test.losses
    low, high = decision.interval
    assert 0 < low <= decision.test.change <= high
    assert decision.reason.startswith(f"k = {decision.k}: +") and decision.reason.endswith("repaired")
    repaired = lip.repair(stats, decision.k, "logit-scale").weight
    after = float(((x_val @ repaired.T + stats.bias).argmax(1) == y_val).double().mean())
    assert after > collapsed + 0.05
    assert decision.accuracy(decision.k) == pytest.approx(after)


def test_refinement_evaluates_every_k_around_the_best_grid_point() -> None:
    head = make_head(n=400, q=90, l=80, seed=9)
    stats = LapStatistics(head.weight, head.bias)
    stats.update(head.features[:200], head.labels[:200])
    z = stats.project(head.features[200:])
    labels = head.labels[200:]
    decision = selection.auto_k(stats, [(z[:100], labels[:100])], [(z[100:], labels[100:])], "paper")
    grid = selection.k_grid(80)
    assert set(grid) <= set(decision.ks) and decision.ks == sorted(decision.ks)
    best_on_grid = selection.best_k(grid, [decision.selection_accuracies[decision.ks.index(k)] for k in grid])
    assert set(selection.refined_ks(grid, best_on_grid)) <= set(decision.ks)
    assert decision.best_k == selection.best_k(decision.ks, decision.selection_accuracies)
    direct = selection.curve(stats, [(z[:100], labels[:100])], decision.ks, "paper")
    assert direct == decision.selection_accuracies


def test_targets_chosen_with_k_on_the_selection_part() -> None:
    stats, x_val, y_val, _, _ = _collapsed_head()
    z = stats.project(x_val)
    confirm = selection.split_rows(torch.ones(len(y_val), dtype=torch.bool), 0)
    parts = [(z[~confirm], y_val[~confirm])], [(z[confirm], y_val[confirm])]
    chosen = selection.auto_k(stats, *parts, "auto")
    each = {targets: selection.auto_k(stats, *parts, targets) for targets in lip.TARGETS}
    best = max(each.values(), key=lambda d: d.selection_accuracies[d.ks.index(d.best_k)])
    assert chosen.targets == best.targets == "logit-scale" and chosen.targets_chosen
    assert (chosen.best_k, chosen.test) == (best.best_k, best.test)
    assert chosen.confirmed and "(logit-scale targets)" in chosen.reason
    assert not each["paper"].targets_chosen and "targets)" not in each["paper"].reason
