"""Choosing k: the split, the exact McNemar test, the interval, and the decision through the library."""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from unittest import mock

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
    if gains + losses:  # P(X >= g) + P(X <= g - 1) = 1, and X <= g - 1 is the other way's X' >= l + 1
        other = selection.binomial_upper_tail(losses + 1, gains + losses)
        assert selection.mcnemar_p_value(gains, losses) + other == pytest.approx(1.0, rel=1e-12)


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
        low, high = selection.change_bounds(counts, 0.05)
        assert -1 <= low <= counts.change <= high <= 1
        mirrored = PairedCounts(counts.both, counts.losses, counts.gains, counts.neither)
        assert selection.change_bounds(mirrored, 0.05) == pytest.approx((-high, -low))
    wide, narrow = (
        selection.change_bounds(PairedCounts(50, 12, 3, 35), 0.05),
        selection.change_bounds(PairedCounts(500, 120, 30, 350), 0.05),
    )
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    looser = selection.change_bounds(PairedCounts(50, 12, 3, 35), 0.01)
    assert looser[0] < wide[0] and looser[1] > wide[1]


LEVELS = st.sampled_from([0.005, 0.01, 0.025, 0.05, 0.1, 0.2])  # none a dyadic fraction, so p != level


@settings(max_examples=150, deadline=None)
@given(
    both=st.integers(0, 400),
    gains=st.integers(0, 120),
    losses=st.integers(0, 120),
    neither=st.integers(0, 60),
    level=LEVELS,
)
def test_significant_exactly_when_the_interval_excludes_zero(
    both: int, gains: int, losses: int, neither: int, level: float
) -> None:
    """The one-sided test at a level and the interval shown with it never disagree: the lower end is
    above 0 exactly when the gain is significant, the upper end below 0 exactly when the drop is."""
    counts = PairedCounts(both, gains, losses, neither)
    if counts.rows == 0:
        return
    low, high = selection.change_bounds(counts, level)
    assert (low > 0) == (float(direct_tail(gains, losses)) <= level)
    assert (high < 0) == (float(direct_tail(losses, gains)) <= level)
    assert low <= counts.change <= high


@pytest.mark.parametrize(
    ("rows", "shares"),
    [(200, (0.55, 0.08, 0.04, 0.33)), (60, (0.7, 0.05, 0.05, 0.2)), (1000, (0.6, 0.12, 0.03, 0.25))],
)
def test_interval_covers_the_true_change_at_least_at_its_level(rows: int, shares: tuple[float, ...]) -> None:
    """Two-sided 90% at level 0.05 (each end a one-sided 95% bound): it covers at least that often."""
    rng = np.random.default_rng(7)
    tables = rng.multinomial(rows, shares, size=800)
    truth = shares[1] - shares[2]
    bounds = [selection.change_bounds(PairedCounts(*map(int, table)), 0.05) for table in tables]
    below = float(np.mean([truth < low for low, _ in bounds]))
    above = float(np.mean([truth > high for _, high in bounds]))
    se = math.sqrt(0.05 * 0.95 / len(tables))
    assert below <= 0.05 + 3 * se and above <= 0.05 + 3 * se  # each end a one-sided 95% bound
    assert below + above >= 0.002  # and not vacuous: it does miss sometimes


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


@functools.cache
def _null_problem(runs: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """A realistic null, vectorised over `runs` seeds: a 10-class head fitted (LAP) to 400 training
    rows with random labels, 1,000 validation rows whose labels each seed draws afresh, independent
    of the features, so every k has exactly the unrepaired layer's accuracy (1/10). Returns each
    head's predictions per targets (k, rows), each seed's labels (runs, rows) and confirmation masks."""
    generator = torch.Generator().manual_seed(11)
    q, classes, rows = 16, 10, 1000
    weight = torch.randn(classes, q, generator=generator, dtype=torch.float64)
    bias = torch.randn(classes, generator=generator, dtype=torch.float64) * 0.1
    x = torch.randn(400, q, generator=generator, dtype=torch.float64)
    stats = LapStatistics(weight, bias, compute_dtype=torch.float64)
    stats.update(x, torch.randint(classes, (400,), generator=generator))
    z = stats.project(torch.randn(rows, q, generator=generator, dtype=torch.float64))
    rank = stats.svd.rank
    predictions = {}
    for targets in lip.TARGETS:
        spectra = torch.stack([lip.singular_values_for_k(stats, k, targets)[0] for k in range(rank + 1)])
        logits = torch.einsum("nr,kr,lr->knl", z, spectra, stats.svd.v) + bias
        predictions[targets] = logits.argmax(dim=2)  # (k, rows)
    labels = torch.randint(classes, (runs, rows), generator=generator)
    ones = torch.ones(rows, dtype=torch.bool)
    confirm = torch.stack([selection.split_rows(ones, seed) for seed in range(runs)])
    return predictions, labels, confirm, rank


@functools.cache
def _null_counts(runs: int) -> dict[bool, tuple[dict[str, list], dict[str, list]]]:
    """For each part of every seed's rows (True: the confirmation part) and each targets: each k's
    accuracy there, (runs, k), and its paired table against the unrepaired layer, (runs, k, 4);
    vectorised over the seeds as batched products of 0/1 hit matrices."""
    predictions, labels, confirm, rank = _null_problem(runs)
    hits = {targets: (guessed[None] == labels[:, None]).float() for targets, guessed in predictions.items()}
    found = {}
    for part in (False, True):
        kept = (confirm if part else ~confirm).float()[:, :, None]  # (runs, rows, 1)
        rows = kept.sum(1)  # (runs, 1)
        accuracies, tables = {}, {}
        for targets, right in hits.items():  # (runs, k, rows)
            after = torch.bmm(right, kept).squeeze(2)  # (runs, k): rows right at k
            before = after[:, rank : rank + 1]  # right unrepaired
            both = torch.bmm(right, kept * right[:, rank, :, None]).squeeze(2)
            accuracies[targets] = (after / rows).double().tolist()
            counts = [both, after - both, before - both, rows - after - before + both]
            tables[targets] = torch.stack(counts, dim=2).round().long().tolist()
        found[part] = accuracies, tables
    return found


def _null_parts(seed: int, runs: int) -> tuple[selection.Part, selection.Part, int]:
    """The selection and confirmation parts of one seed of `_null_problem`, as the procedure sees them."""
    _, _, confirm, rank = _null_problem(runs)
    rows = int(confirm[seed].sum())

    def part(confirmation: bool) -> selection.Part:
        accuracies, tables = _null_counts(runs)[confirmation]
        return selection.Part(
            rows if confirmation else len(confirm[seed]) - rows,
            lambda ks, targets: [accuracies[targets][seed][k] for k in ks],
            lambda k, targets: PairedCounts(*tables[targets][seed][k]),
        )

    return part(False), part(True), rank


NULL_RUNS = 2000


def _null_decisions(targets: str, alpha: float, cross_fit: bool = False) -> list[selection.Decision]:
    return [
        selection.auto_k_on(*_null_parts(seed, NULL_RUNS), targets, alpha, cross_fit=cross_fit)
        for seed in range(NULL_RUNS)
    ]


def _null_size(decisions: list[selection.Decision], alpha: float) -> tuple[float, float]:
    """The false-change rate a valid procedure has on these decisions, and its standard error: under
    the null the gains among the D discordant confirmation rows are Bin(D, 1/2) whatever k was
    chosen on the other rows, so a proposed k is confirmed with the test's exact size at D."""
    sizes = [
        power.tail(d, power.critical_count(d, alpha), 0.5) if decision.best_k != decision.rank else 0.0
        for decision in decisions
        for d in [decision.test.gains + decision.test.losses]
    ]
    return sum(sizes) / len(sizes), math.sqrt(sum(p * (1 - p) for p in sizes)) / len(sizes)


@pytest.mark.parametrize("targets", ["paper", "auto"])  # auto: both targets, chosen with k
def test_false_changes_match_the_tests_size_on_a_realistic_null(targets: str, monkeypatch) -> None:
    """2,000 seeds of 1,000 validation rows (500 confirm, about 10% of them discordant), no k can
    help: the false-change rate is the exact test's size at the discordance each decision saw, within
    a band that excludes what testing at 2 x alpha, or on the rows that chose k, would give."""
    monkeypatch.setattr(selection, "decision_power", lambda *args, **kwargs: None)  # no part in it
    monkeypatch.setattr(power, "assess", lambda *args, **kwargs: None)
    alpha = 0.05
    decisions = _null_decisions(targets, alpha)
    rate = sum(decision.confirmed for decision in decisions) / NULL_RUNS
    expected, se = _null_size(decisions, alpha)
    doubled, doubled_se = _null_size(decisions, 2 * alpha)
    discordance = sum(d.test.gains + d.test.losses for d in decisions) / sum(d.test.rows for d in decisions)
    assert 0.06 <= discordance <= 0.15 and all(d.test.rows == 500 for d in decisions)  # as realistic as said
    assert sum(d.best_k != d.rank for d in decisions) > 0.8 * NULL_RUNS  # selection alone would change it
    assert expected + 3.5 * se < doubled - 3.5 * doubled_se  # the band excludes a test at 2 x alpha
    assert abs(rate - expected) <= 3.5 * se, (rate, expected, se)
    assert rate <= alpha


def test_cross_fitted_false_changes_stay_within_alpha_on_a_realistic_null(monkeypatch) -> None:
    """Cross-fitted, each way's test at alpha / 2: at most the sum of the two tests' sizes."""
    monkeypatch.setattr(selection, "decision_power", lambda *args, **kwargs: None)
    monkeypatch.setattr(power, "assess", lambda *args, **kwargs: None)
    alpha = 0.05
    decisions = _null_decisions("paper", alpha, cross_fit=True)
    assert all(decision.tests == 2 and decision.level == alpha / 2 for decision in decisions)
    rate = sum(decision.confirmed for decision in decisions) / NULL_RUNS
    one_way, se = _null_size(decisions, alpha / 2)
    assert rate <= 2 * one_way + 3.5 * se and rate <= alpha
    assert rate >= one_way - 3.5 * se  # it does confirm at its level, not never


def test_cross_fitting_takes_the_stronger_of_two_one_way_decisions(monkeypatch) -> None:
    """Each half chooses once and is tested once; the smaller p-value decides, each test at alpha / 2."""
    monkeypatch.setattr(power, "assess", lambda *args, **kwargs: None)  # as above: no part in it
    for seed in range(300):
        parts = _null_parts(seed, NULL_RUNS)
        both = selection.auto_k_on(*parts, cross_fit=True)
        one_way = selection.auto_k_on(*parts)
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
    confirmed = float(
        ((x_val[confirm] @ repaired.T + stats.bias).argmax(1) == y_val[confirm]).double().mean()
    )
    assert decision.accuracy(decision.k) == pytest.approx(confirmed)  # on the confirmation rows only


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


@settings(max_examples=200, deadline=None)
@given(
    counts=st.tuples(st.integers(0, 500), st.integers(0, 80), st.integers(0, 80), st.integers(0, 200)),
    alpha=LEVELS,
)
def test_a_given_k_is_refused_on_any_drop_and_never_called_a_significant_gain(counts, alpha: float) -> None:
    """Checked for harm only: refused exactly when validation shows it lower, by any amount (not only
    a significant drop), with its one-sided bound; never "a significant gain" (it may have been
    chosen on these rows)."""
    test = PairedCounts(*counts)
    if test.rows == 0:
        return
    with mock.patch.object(selection, "decision_power", lambda decision: None):
        decision = selection.assess_given_k(test, 3, 10, alpha)
    lower = test.losses > test.gains
    assert (decision.outcome == selection.REFUSED) == lower
    assert decision.outcome in (selection.REFUSED, selection.GIVEN)
    assert "significant gain" not in decision.reason and "significantly better" not in decision.reason
    low, high = decision.interval
    if lower:
        assert f"one-sided {100 * (1 - alpha):.4g}% upper bound {100 * high:+.1f} pt" in decision.reason
        significant = float(direct_tail(test.losses, test.gains)) <= alpha
        assert (", significantly (p = " in decision.reason) == significant
    else:
        assert f"one-sided {100 * (1 - alpha):.4g}% lower bound {100 * low:+.1f} pt" in decision.reason
        assert "no evidence of a gain" in decision.reason


def test_the_selection_and_confirmation_rows_of_a_validation_set_are_disjoint(tmp_path) -> None:
    """The real data path: project_rows gives the selection part exactly the rows outside the
    confirmation mask, the confirmation part exactly those inside, each once, in order."""
    from lip_cli.labelled import open_labelled_features
    from lip_cli.statistics_pass import project_rows

    head = make_head(n=230, q=7, l=4, seed=12)
    rows = torch.arange(230, dtype=torch.float64)[:, None]
    features = torch.cat([rows, head.features[:, 1:].double()], 1)  # column 0 names each row
    np.savez(tmp_path / "val.npz", features=features.numpy(), labels=head.labels.numpy())
    data = open_labelled_features(tmp_path / "val.npz", None)
    stats = LapStatistics(torch.eye(4, 7, dtype=torch.float64), compute_dtype=torch.float64)
    u = stats.svd.u  # (7, 4): orthonormal, spanning the first 4 feature columns
    confirm = selection.split_rows(torch.ones(230, dtype=torch.bool), 5)
    chooses, confirms = project_rows(data, stats, 64, confirm)

    def names(part: selection.Rows) -> list[int]:
        z = torch.cat([block for block, _ in part])
        recovered = z @ u.T  # the rows' features projected on u's span, which holds column 0
        return recovered[:, 0].round().long().tolist()

    assert names(chooses) == torch.nonzero(~confirm).flatten().tolist()
    assert names(confirms) == torch.nonzero(confirm).flatten().tolist()
    assert sum(int(z.shape[0]) for z, _ in chooses + confirms) == 230


@settings(max_examples=150, deadline=None)
@given(
    counts=st.tuples(st.integers(0, 400), st.integers(0, 90), st.integers(0, 90), st.integers(0, 100)),
    alpha=LEVELS,
    tests=st.sampled_from([1, 2]),
)
def test_a_decision_is_confirmed_exactly_when_its_interval_excludes_zero(
    counts, alpha: float, tests: int
) -> None:
    """What the decision says (text and JSON figures) never disagrees with its test: confirmed exactly
    when the interval it shows lies above 0, at the two-sided level 1 - 2 alpha / tests."""
    test = PairedCounts(*counts)
    if test.rows == 0:
        return
    with mock.patch.object(selection, "decision_power", lambda decision: None):
        decision = selection.decide([0, 1, 2], [0.5, 0.6, 0.5], 100, test, 1, 2, alpha, "val", tests=tests)
    low, high = decision.interval
    assert decision.interval_level == pytest.approx(1 - 2 * alpha / tests)
    assert decision.confirmed == (low > 0)
    if decision.confirmed:
        assert (
            f"{100 * decision.interval_level:.4g}% CI {100 * low:+.1f} to {100 * high:+.1f} pt"
            in decision.reason
        )
