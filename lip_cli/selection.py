"""Choosing k: the grid, a seeded selection / confirmation split, an exact test, the decision.

Pure functions on tensors and counts, no files and no terminal. `--k auto` chooses k on one half of
the rows that judge it (the validation set, or held-out training rows) and changes the head only
when the choice beats the unrepaired layer on the other half by an exact one-sided McNemar test:
the best of many noisy accuracy estimates beats the original by chance, a fresh test does not.
Cross-fitting (k chosen on each half, tested on the other, each test at alpha / 2) is available
(`auto_k(..., cross_fit=True)`) but not the default: on the accuracy benchmark it confirmed more
real gains than the 50/50 split in one run and fewer in the next (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from lip_cli import lip, power

CONFIRMATION_SHARE = 0.5  # of the rows that judge k; the other half chooses it
TESTS = 1  # tests at alpha / TESTS that --k auto runs; cross-fitted it would be 2 (Bonferroni)
SPLIT_SEED_OFFSET = 104_729  # the split's stream differs from the held-out mask's for the same --seed
EXACT_UP_TO = 20_000  # discordant rows summed in exact integers; above, in float64 logs
Rows = list[tuple[Tensor, Tensor]]  # (projections X U (n, r), labels) chunks
Total = Callable[[Tensor], Tensor]  # adds counts over processes (the identity in one process)


def _same(counts: Tensor) -> Tensor:
    return counts


def k_grid(rank: int) -> list[int]:
    """The k values a first look evaluates: every k up to 64 of them, else 65 spread out."""
    return lip.k_grid(rank)


def refined_ks(grid: Sequence[int], best: int) -> list[int]:
    """Every k strictly between the grid's neighbours of `best` that the grid did not evaluate."""
    index = list(grid).index(best)
    low = grid[max(index - 1, 0)]
    high = grid[min(index + 1, len(grid) - 1)]
    return [k for k in range(low + 1, high) if k not in grid]


def best_k(ks: Sequence[int], accuracies: Sequence[float]) -> int:
    """The k with the highest accuracy; ties go to the larger k (the smaller change)."""
    best = max(accuracies)
    return max(k for k, value in zip(ks, accuracies, strict=True) if value == best)


def minimum_rows(alpha: float, share: float = CONFIRMATION_SHARE, tests: int = TESTS) -> int:
    """The fewest rows that split into two parts where a confirmation at `alpha` is possible at all.

    Even a sweep (every confirmation row a gain) has p = 0.5 ** rows, so the confirmation part needs
    ceil(log2(tests / alpha)) rows (each of `tests` tests runs at alpha / tests); the other part one.
    """
    needed = max(1, math.ceil(math.log2(tests / alpha) - 1e-12))
    rows = 2
    while confirmation_count(rows, share) < needed or rows - confirmation_count(rows, share) < 1:
        rows += 1
    return rows


def confirmation_count(rows: int, share: float = CONFIRMATION_SHARE) -> int:
    return int(rows * share)


def split_rows(eligible: Tensor, seed: int, share: float = CONFIRMATION_SHARE) -> Tensor:
    """A seeded boolean mask of the confirmation rows: exactly int(share * m) of the m eligible rows.

    The mask is over every row index, so processes that each stream a range of the rows agree on it.
    """
    generator = torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET)
    candidates = torch.nonzero(eligible).flatten()
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)]
    confirm = torch.zeros(eligible.numel(), dtype=torch.bool)
    confirm[chosen[: confirmation_count(candidates.numel(), share)]] = True
    return confirm


@dataclass(frozen=True)
class PairedCounts:
    """The paired 2x2 table of two heads on the same rows."""

    both: int = 0  # right before and after
    gains: int = 0  # right after the repair only
    losses: int = 0  # right before the repair only
    neither: int = 0

    @property
    def rows(self) -> int:
        return self.both + self.gains + self.losses + self.neither

    @property
    def change(self) -> float:
        """Accuracy after minus accuracy before, as a fraction."""
        return (self.gains - self.losses) / self.rows if self.rows else 0.0


def paired_counts(before: Tensor, after: Tensor) -> Tensor:
    """(both, gains, losses, neither) of two boolean correctness masks, as a float64 tensor to add up."""
    return torch.stack(
        [(before & after).sum(), (~before & after).sum(), (before & ~after).sum(), (~before & ~after).sum()]
    ).to(torch.float64)


def as_counts(table: Tensor) -> PairedCounts:
    return PairedCounts(*(int(round(float(value))) for value in table.cpu()))


def binomial_upper_tail(successes: int, trials: int) -> float:
    """P(X >= successes) for X ~ Binomial(trials, 1/2): a direct sum of the binomial terms.

    Exact in integers up to `EXACT_UP_TO` trials (correctly rounded to float), beyond that a
    log-sum-exp of the terms in float64.
    """
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if trials <= EXACT_UP_TO:
        total, term = 0, math.comb(trials, successes)
        for i in range(successes, trials + 1):
            total += term
            term = term * (trials - i) // (i + 1)
        return total / 2**trials
    i = torch.arange(successes, trials + 1, dtype=torch.float64)
    n = torch.tensor(float(trials), dtype=torch.float64)
    logs = torch.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) - n * math.log(2)
    return float(torch.logsumexp(logs, 0).exp().clamp(max=1.0))


def mcnemar_p_value(gains: int, losses: int) -> float:
    """Exact one-sided McNemar test that the repair is better: P(X >= gains), X ~ Bin(gains + losses, 1/2).

    Only the discordant rows count; with none the p-value is 1.
    """
    return binomial_upper_tail(gains, gains + losses)


def _wilson(successes: int, rows: int, z: float) -> tuple[float, float]:
    p = successes / rows
    centre = (p + z * z / (2 * rows)) / (1 + z * z / rows)
    half = z * math.sqrt(p * (1 - p) / rows + z * z / (4 * rows * rows)) / (1 + z * z / rows)
    return centre - half, centre + half


def _lower_share(successes: int, trials: int, level: float) -> float:
    """The one-sided (1 - level) Clopper-Pearson lower bound of a binomial share: the share p at
    which P(Bin(trials, p) >= successes) = level (0 with no successes).

    Its first step is the test's own: the bound is at least 1/2 exactly when the exact p-value
    P(Bin(trials, 1/2) >= successes) is at most `level`, so the bound and the test never disagree.
    The terms are summed in numpy (a bound costs well under a millisecond for hundreds of rows).
    """
    if successes <= 0:
        return 0.0
    i = np.arange(successes, trials + 1, dtype=np.float64)
    log_choose = math.lgamma(trials + 1) - _log_gamma(i + 1) - _log_gamma(trials - i + 1)

    def tail(share: float) -> float:  # P(Bin(trials, share) >= successes), increasing in share
        if share >= 1.0:
            return 1.0
        logs = log_choose + i * math.log(share) + (trials - i) * math.log1p(-share)
        top = float(logs.max())
        return math.exp(top) * float(np.exp(logs - top).sum())

    low, high = (0.5, 1.0) if binomial_upper_tail(successes, trials) <= level else (0.0, 0.5)
    while high - low > 1e-10:  # tail(low) <= level < tail(high) throughout
        middle = (low + high) / 2
        if tail(middle) <= level:
            low = middle
        else:
            high = middle
    return low


def _log_gamma(values: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(values)).numpy()


def change_bounds(counts: PairedCounts, level: float) -> tuple[float, float]:
    """The accuracy change's interval that matches the exact one-sided McNemar test at `level`:
    each end a one-sided bound at (1 - level) or better, so (1 - 2 level) two-sided (90% at 0.05).

    The change is d (2p - 1), with d the share of discordant rows and p the share of gains among
    them. Each end is the extreme of that product over a box: p within its Clopper-Pearson bounds
    (the test's own inversion), d within its Wilson bounds, each at `level`. So the lower end is
    above 0 exactly when the test of a gain rejects at `level`, the upper end below 0 exactly when
    the test of a drop does (`mcnemar_p_value`), and the box makes it conservative (at least the
    coverage stated: about 92-98% for a stated 90% in tests/test_selection.py).
    """
    rows, discordant = counts.rows, counts.gains + counts.losses
    if discordant == 0:
        return 0.0, 0.0
    low_share = 2 * _lower_share(counts.gains, discordant, level) - 1
    high_share = 1 - 2 * _lower_share(counts.losses, discordant, level)
    least, most = _wilson(discordant, rows, max(NormalDist().inv_cdf(1 - level), 0.0))
    least, most = min(least, discordant / rows), max(most, discordant / rows)  # rounding at 0 and 1
    low = low_share * (most if low_share < 0 else least)
    high = high_share * (least if high_share < 0 else most)
    return max(low, -1.0), min(high, 1.0)


def _points(value: float) -> str:
    return f"{100 * value:+.1f} pt"


REPAIRED = "repaired"  # --k auto: a k confirmed on validation rows, applied
UNCONFIRMED = "unconfirmed"  # --k auto: nothing confirmed (or no rows that can confirm), unchanged
GIVEN = "given"  # a given k the validation set does not show lower: written, checked for harm only
UNCHECKED = "unchecked"  # a given k with no validation set: nothing checked it, written as asked
REFUSED = "refused"  # a given k the validation set shows lower by any amount: not written
TRAINED_ON = (
    "the network trained on them, so their features carry their noisy labels and a head that agrees "
    "more with them may only be memorising more"
)  # why held-out training rows cannot confirm a change


def outcome(decision: Decision | None) -> str:
    """What a repair's evidence says; UNCHECKED for a given k with no validation set."""
    return UNCHECKED if decision is None else decision.outcome


def decision_power(decision: Decision, share: float = CONFIRMATION_SHARE) -> power.Power | None:
    """The power of the decision's own test, at the discordance its rows measured (None: none)."""
    test = decision.test
    if test.gains + test.losses == 0:
        return None
    where = (
        "validation"
        if decision.given
        else "held-out training"
        if decision.data == "holdout"
        else "confirmation"
    )
    return power.assess(
        test.rows,
        test.gains + test.losses,
        test.rows,
        f"k = {decision.best_k} against the unrepaired layer, measured on the {test.rows:,} {where} rows",
        decision.level,
        1.0 if decision.given else share,
    )


@dataclass(frozen=True)
class Decision:
    """What the rows that judge k say, and what lip does about it."""

    k: int  # the k applied: the rank when the layer stays as it is
    best_k: int  # the best k on the selection part (the given k when there was no selection)
    rank: int
    data: str  # "val" or "holdout"
    selection_rows: int  # 0 for a given k: the whole validation set tests it
    selection_change: float  # accuracy change at best_k on the selection part
    test: PairedCounts  # best_k against the unrepaired layer, on the confirmation rows
    alpha: float
    ks: list[int]  # the ks evaluated on the selection part
    selection_accuracies: list[float]
    reason: str = ""
    given: bool = False  # a k the user gave, tested on the whole validation set
    targets: str = "paper"  # the LAP targets of best_k
    targets_chosen: bool = False  # whether they were chosen on the selection part too (--targets auto)
    power: power.Power | None = None  # what the test could detect (None: no discordance measured)
    tests: int = 1  # cross-fitted: 2, each half chose k once and tested the other's choice once

    @property
    def level(self) -> float:
        """The level each test runs at: alpha, Bonferroni-divided over the cross-fitted tests."""
        return self.alpha / self.tests

    @property
    def p_value(self) -> float:
        """One-sided: the repair is better than the unrepaired layer."""
        return mcnemar_p_value(self.test.gains, self.test.losses)

    @property
    def p_value_drop(self) -> float:
        """One-sided the other way: the repair is worse."""
        return mcnemar_p_value(self.test.losses, self.test.gains)

    @property
    def interval(self) -> tuple[float, float]:
        """The change's interval that matches the test: each end a one-sided (1 - level) bound."""
        return change_bounds(self.test, self.level)

    @property
    def interval_level(self) -> float:
        """The two-sided coverage of `interval`: 1 - 2 level (90% at alpha 0.05)."""
        return 1.0 - 2.0 * self.level

    @property
    def confirmed(self) -> bool:
        """With --k auto: whether the chosen k passed the test and is applied."""
        return not self.given and self.k != self.rank

    @property
    def lower(self) -> bool:
        """Whether the test rows show the head at k lower than the unrepaired layer, by any amount."""
        return self.test.losses > self.test.gains

    @property
    def significantly_worse(self) -> bool:
        """Whether the test rows show the head at k worse than the unrepaired layer, at the level."""
        return self.lower and self.p_value_drop <= self.level

    @property
    def outcome(self) -> str:
        """REPAIRED, UNCONFIRMED (auto), GIVEN or REFUSED (a given k the validation set shows lower
        by any amount: a given k must not cost accuracy, whether or not the drop is significant)."""
        if self.given:
            return REFUSED if self.lower else GIVEN
        return REPAIRED if self.confirmed else UNCONFIRMED

    def accuracy(self, k: int) -> float:
        """Accuracy of the head at k (best_k or the rank) on the test rows: the confirmation rows
        with --k auto (the selection rows chose best_k as the best of many, so their accuracy at it
        is biased upwards), the whole validation set for a given k."""
        test = self.test
        right = test.both + (test.gains if k == self.best_k and k != self.rank else test.losses)
        return right / max(test.rows, 1)


def _interval_text(decision: Decision) -> str:
    low, high = decision.interval
    return f"{100 * decision.interval_level:.4g}% CI {100 * low:+.1f} to {_points(high)}"


def _one_sided(decision: Decision, end: str) -> str:
    """One end of the interval in words: the one-sided (1 - level) bound it is."""
    low, high = decision.interval
    bound = low if end == "lower" else high
    return f"one-sided {100 * (1 - decision.level):.4g}% {end} bound {_points(bound)}"


def decide(
    ks: list[int],
    selection_accuracies: list[float],
    selection_rows: int,
    test: PairedCounts,
    best: int,
    rank: int,
    alpha: float,
    data: str,
    targets: str = "paper",
    targets_chosen: bool = False,
    tests: int = 1,
) -> Decision:
    """Apply `best` only when it beats the unrepaired layer on the confirmation rows at alpha / tests."""
    change = selection_accuracies[ks.index(best)] - selection_accuracies[ks.index(rank)]
    decision = Decision(
        rank,
        best,
        rank,
        data,
        selection_rows,
        change,
        test,
        alpha,
        ks,
        selection_accuracies,
        targets=targets,
        targets_chosen=targets_chosen,
        tests=tests,
    )
    decision = replace(decision, power=decision_power(decision))
    rows = f"{test.rows:,}"
    level = f" <= alpha/{tests} = {decision.level:g}, k chosen on either half" if tests > 1 else ""
    named = f"k = {best}" + (f" ({targets} targets)" if targets_chosen else "")
    if best == rank:
        reason = (
            f"no k beats the unrepaired layer on the {selection_rows:,} selection rows; weights unchanged"
        )
    elif data == "holdout":
        reason = (
            f"best {named} ({_points(change)} on {selection_rows:,} held-out training rows) not tested: "
            "no validation set; weights unchanged"
        )
    elif decision.p_value <= decision.level:
        decision = replace(decision, k=best)
        reason = (
            f"{named}: {_points(test.change)} on {rows} confirmation rows "
            f"({_interval_text(decision)}), p = {decision.p_value:.2g}{level}, repaired"
        )
    else:
        needed = decision.power.validation_rows_for_one_point if decision.power else None
        reason = (
            f"best {named} ({_points(change)} on selection) not confirmed "
            f"({_points(test.change)}, p = {decision.p_value:.2g} on {rows} confirmation rows"
            + (f", needs p <= {decision.level:g}" if tests > 1 else "")
            + f"); weights unchanged; these rows chose k = {best}, so --k {best} on them is no evidence "
            "of a gain: --k auto on more validation rows can settle it"
            + (f" (about {needed:,} detect a 1-point gain 80% of the time)" if needed else "")
        )
    return replace(decision, reason=reason)


def significance(decision: Decision) -> str:
    """What the validation rows say of a given k, in words: checked for harm only.

    Never "a significant gain": the k may have been chosen on these very rows (an unconfirmed
    --k auto names its best k), where its change is biased upwards.
    """
    if not decision.lower:
        return (
            f"not lower on validation ({_one_sided(decision, 'lower')}); a given k is checked for "
            "harm only: these rows may have chosen it, so its change is no evidence of a gain"
        )
    p = decision.p_value_drop
    strength = (
        f"significantly (p = {p:.2g} at alpha {decision.alpha:g})"
        if decision.significantly_worse
        else f"not significantly (p = {p:.2g}), but a given k is written only when validation does not "
        "show it lower"
    )
    return f"lower on validation ({_one_sided(decision, 'upper')}), {strength}"


def assess_given_k(test: PairedCounts, k: int, rank: int, alpha: float) -> Decision:
    """A k the user gave, checked for harm against the unrepaired layer on the whole validation set:
    refused when the validation rows show it lower by any amount (`Decision.outcome`)."""
    decision = Decision(k, k, rank, "val", 0, test.change, test, alpha, [], [], given=True)
    decision = replace(decision, power=decision_power(decision))
    reason = (
        f"k = {k}: {_points(test.change)} on {test.rows:,} validation rows "
        f"({_interval_text(decision)}), {significance(decision)}"
    )
    return replace(decision, reason=reason)


def curve(
    stats: lip.LapStatistics,
    rows: Rows,
    ks: list[int],
    targets: str = lip.DEFAULT_TARGETS,
    total: Total = _same,
) -> list[float]:
    """Accuracy after PSP + LAP at each k on some rows, counts added by `total`."""
    accuracies = lip.KCurve(stats, ks, targets)
    for z, y in rows:
        accuracies.update_projections(z, y)
    counts = total(torch.tensor([*accuracies.correct, accuracies.samples], dtype=torch.float64))
    return [float(count) / max(float(counts[-1]), 1.0) for count in counts[:-1]]


def prediction_changes(
    stats: lip.LapStatistics, k: int, targets: str, rows: Rows, total: Total = _same
) -> tuple[int, int]:
    """(rows whose predicted class differs between the head at k and the unrepaired layer, rows) on
    some rows given as projections on every direction: what a given k changes where nothing checks
    it. Ties go to the first class, as in every accuracy."""
    svd = stats.svd
    after, _ = lip.singular_values_for_k(stats, k, targets)
    counts = torch.zeros(2, dtype=torch.float64)
    for z, _labels in rows:
        v_t = svd.v.T.to(z.device, z.dtype)  # (r, l)
        before_s, change = svd.s.to(z.device, z.dtype), (after - svd.s)[k:].to(z.device, z.dtype)
        bias = None if stats.bias is None else stats.bias.to(z.device, z.dtype)
        for first in range(0, z.shape[0], 8192):
            block = z[first : first + 8192]
            logits = (block * before_s) @ v_t
            if bias is not None:
                logits += bias
            predicted = logits.argmax(dim=1)
            logits.addmm_(block[:, k:] * change, v_t[k:])
            counts[0] += float((logits.argmax(dim=1) != predicted).sum())
            counts[1] += block.shape[0]
    counts = total(counts)
    return int(round(float(counts[0]))), int(round(float(counts[1])))


def compare_heads(
    stats: lip.LapStatistics, k: int, targets: str, rows: Rows, total: Total = _same
) -> PairedCounts:
    """The paired table of the head at k against the unrepaired layer on some rows."""
    rank = stats.svd.rank
    table = torch.zeros(4, dtype=torch.float64)
    heads = lip.KCurve(stats, [rank, k], targets)
    for z, y in rows:
        before, after = heads.row_hits(z, y)
        table += paired_counts(before, after).cpu()
    return as_counts(total(table))


@dataclass(frozen=True)
class Part:
    """Rows that judge k, as the procedure sees them: how many, the accuracy of the head at any k
    on them, and the paired table of the head at a k against the unrepaired layer on them."""

    rows: int
    curve: Callable[[list[int], str], list[float]]  # (ks, targets) -> accuracies
    table: Callable[[int, str], PairedCounts]  # (k, targets) -> against the unrepaired layer


def rows_part(stats: lip.LapStatistics, rows: Rows, total: Total = _same) -> Part:
    """A `Part` of projected rows (counts added by `total`)."""
    count = int(total(torch.tensor([float(sum(int(z.shape[0]) for z, _ in rows))]))[0])
    return Part(
        count,
        lambda ks, targets: curve(stats, rows, ks, targets, total),
        lambda k, targets: compare_heads(stats, k, targets, rows, total),
    )


def selection_curve(
    stats: lip.LapStatistics, rows: Rows, targets: str, total: Total = _same
) -> tuple[list[int], list[float]]:
    """Accuracies on the grid, then at every k between the best grid point's neighbours, sorted by k."""
    return _refined_curve(rows_part(stats, rows, total), stats.svd.rank, targets)


def _refined_curve(part: Part, rank: int, targets: str) -> tuple[list[int], list[float]]:
    ks = k_grid(rank)
    accuracies = part.curve(ks, targets)
    extra = refined_ks(ks, best_k(ks, accuracies))
    if extra:
        accuracies += part.curve(extra, targets)
        pairs = sorted(zip(ks + extra, accuracies, strict=True))
        ks, accuracies = [k for k, _ in pairs], [accuracy for _, accuracy in pairs]
    return ks, accuracies


AUTO_TARGETS = "auto"  # choose the targets on the selection part too


def _choose_and_test(
    rank: int, chooses: Part, confirms: Part, options: Sequence[str]
) -> tuple[str, list[int], list[float], int, int, PairedCounts]:
    """The best (targets, k) on `chooses` (ties: the larger k, then the paper's targets), with its
    curve, the rows that chose it, and its paired table against the unrepaired layer on `confirms`."""
    curves = {option: _refined_curve(chooses, rank, option) for option in options}

    def score(option: str) -> tuple[float, int, bool]:
        ks, accuracies = curves[option]
        best = best_k(ks, accuracies)
        return accuracies[ks.index(best)], best, option == "paper"

    chosen = max(options, key=score)
    ks, accuracies = curves[chosen]
    best = best_k(ks, accuracies)
    return chosen, ks, accuracies, best, chooses.rows, confirms.table(best, chosen)


def auto_k(
    stats: lip.LapStatistics,
    selection: Rows,
    confirmation: Rows,
    targets: str = lip.DEFAULT_TARGETS,
    alpha: float = 0.05,
    data: str = "val",
    total: Total = _same,
    *,
    cross_fit: bool = False,
) -> Decision:
    """Choose k on the selection rows (grid, then every k around the best), confirm it on the others.

    Cross-fitted (`cross_fit`): the roles of the two parts are swapped for a second choice and
    test, each test at alpha / 2, and the choice with the smaller p-value is the decision (the
    first part's on a tie). With targets = "auto" both of `lip.TARGETS` are tried and the pair
    (targets, k) with the best accuracy on the choosing part wins. `stats` must not have seen
    either part (for held-out rows: the fit without them). `total` adds counts over processes so
    that every rank reaches the same decision.
    """
    parts = rows_part(stats, selection, total), rows_part(stats, confirmation, total)
    return auto_k_on(*parts, stats.svd.rank, targets, alpha, data, cross_fit=cross_fit)


def auto_k_on(
    selection: Part,
    confirmation: Part,
    rank: int,
    targets: str = lip.DEFAULT_TARGETS,
    alpha: float = 0.05,
    data: str = "val",
    *,
    cross_fit: bool = False,
) -> Decision:
    """The procedure of `auto_k` on two parts of rows, whatever computes their accuracies."""
    options = lip.TARGETS if targets == AUTO_TARGETS else (targets,)
    directions = (
        [(selection, confirmation), (confirmation, selection)] if cross_fit else [(selection, confirmation)]
    )
    tried = [_choose_and_test(rank, *parts, options) for parts in directions]

    def p_value(choice: tuple) -> float:
        test = choice[5]
        return 1.0 if choice[3] == rank else mcnemar_p_value(test.gains, test.losses)

    index = min(range(len(tried)), key=lambda i: p_value(tried[i]))
    chosen, ks, accuracies, best, rows, test = tried[index]
    decision = decide(
        ks, accuracies, rows, test, best, rank, alpha, data, chosen, len(options) > 1, len(directions)
    )
    others = [k for k in ks if k != rank]
    if best == rank and others:  # nothing to test: the discordance of the runner-up, for the rows needed
        runner = best_k(others, [accuracies[ks.index(k)] for k in others])
        table = directions[index][0].table(runner, chosen)
        where = f"the runner-up k = {runner} against the unrepaired layer on the selection rows"
        assessed = power.assess(
            test.rows, table.gains + table.losses, table.rows, where, decision.level, CONFIRMATION_SHARE
        )
        decision = replace(decision, power=assessed)
    return decision


AGGREGATION_GAMMA = 0.5  # the quantile of the split p-values that counts (the median)


def aggregate_p_values(p_values: Sequence[float], gamma: float = AGGREGATION_GAMMA) -> float:
    """Quantile aggregation of p-values from repeated splits: Q(gamma) = min(1, q_gamma(p_b / gamma)).

    Meinshausen, Meier and Buehlmann (2009), JASA 104:1671. q_gamma is the empirical gamma-quantile
    (the ceil(gamma * B)-th smallest value), so Q <= alpha exactly when at least gamma * B of the
    p_b are <= gamma * alpha; when every p_b is valid, P(Q <= alpha) <= alpha (Markov's inequality
    on that count), however the splits depend on each other.
    """
    if not p_values or not 0 < gamma <= 1:
        raise ValueError("aggregation needs some p-values and 0 < gamma <= 1")
    ordered = sorted(p_values)
    return min(1.0, ordered[max(math.ceil(gamma * len(ordered) - 1e-12), 1) - 1] / gamma)


@dataclass(frozen=True)
class RepeatedDecision:
    """`auto_k_repeated`: what B random selection / confirmation splits of the same rows say."""

    k: int  # the k applied: the rank when the layer stays as it is
    targets: str  # the targets of k
    rank: int
    alpha: float
    gamma: float
    p_value: float  # the aggregated p-value
    split_ks: list[int]  # the k each split chose (the rank: it chose no change)
    split_targets: list[str]
    split_p_values: list[float]  # each split's own one-sided McNemar p (1 where it chose no change)

    @property
    def splits(self) -> int:
        return len(self.split_p_values)

    @property
    def confirmed(self) -> bool:
        return self.k != self.rank

    @property
    def split_confirmations(self) -> int:
        """Splits that on their own would have confirmed their k at alpha."""
        return sum(p <= self.alpha for p in self.split_p_values)

    @property
    def reason(self) -> str:
        stable = f"confirmed in {self.split_confirmations} of {self.splits} splits"
        if self.confirmed:
            return (
                f"k = {self.k} ({self.targets} targets): aggregated p = {self.p_value:.2g} over "
                f"{self.splits} splits (gamma {self.gamma:g}), {stable}, repaired"
            )
        return f"aggregated p = {self.p_value:.2g} over {self.splits} splits, {stable}; weights unchanged"


def one_split(
    stats: lip.LapStatistics,
    projections: Tensor,
    labels: Tensor,
    seed: int,
    targets: str = lip.DEFAULT_TARGETS,
) -> tuple[str, int, float]:
    """What `auto_k` chooses and tests on the split of these rows seeded by `seed`: (targets, k, p),
    p = 1 where the choice is the unrepaired layer (nothing to test)."""
    options = lip.TARGETS if targets == AUTO_TARGETS else (targets,)
    confirm = split_rows(torch.ones(int(labels.shape[0]), dtype=torch.bool), seed)
    chooses = rows_part(stats, [(projections[~confirm], labels[~confirm])])
    confirms = rows_part(stats, [(projections[confirm], labels[confirm])])
    option, _, _, best, _, test = _choose_and_test(stats.svd.rank, chooses, confirms, options)
    return option, best, 1.0 if best == stats.svd.rank else mcnemar_p_value(test.gains, test.losses)


def auto_k_repeated(
    stats: lip.LapStatistics,
    projections: Tensor,
    labels: Tensor,
    targets: str = lip.DEFAULT_TARGETS,
    alpha: float = 0.05,
    splits: int = 20,
    seed: int = 0,
    gamma: float = AGGREGATION_GAMMA,
) -> RepeatedDecision:
    """`auto_k` over `splits` random halvings of the same rows (seeds seed .. seed + splits - 1),
    the split p-values aggregated by `aggregate_p_values`; the decision no longer hinges on one split.

    What it controls: under the global null (no k of the grid, with either targets, beats the
    unrepaired layer on the population), each split's p-value is valid, since its confirmation half
    never saw the choice, so P(aggregated p <= alpha) <= alpha: the chance of changing a head that no
    k can help stays under alpha. The k applied is the one chosen most often among the splits that
    count towards the aggregate (p_b <= gamma * alpha; ties: the larger k, then the paper's
    targets); that k saw every row, so its own effect is not separately confirmed: where some k
    helps and another does not, the test is of "some k helps", not of this k.
    """
    rank = stats.svd.rank
    options = lip.TARGETS if targets == AUTO_TARGETS else (targets,)
    ks, chosen_targets, p_values = [], [], []
    for index in range(splits):
        option, best, p = one_split(stats, projections, labels, seed + index, targets)
        ks.append(best)
        chosen_targets.append(option)
        p_values.append(p)
    aggregated = aggregate_p_values(p_values, gamma)
    k, applied_targets = rank, options[0]
    if aggregated <= alpha:
        counted = [(b, t) for b, t, p in zip(ks, chosen_targets, p_values, strict=True) if p <= gamma * alpha]
        k, applied_targets = max(
            set(counted), key=lambda pair: (counted.count(pair), pair[0], pair[1] == "paper")
        )
    return RepeatedDecision(k, applied_targets, rank, alpha, gamma, aggregated, ks, chosen_targets, p_values)
