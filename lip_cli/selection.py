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


def change_interval(counts: PairedCounts, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for the accuracy change of paired rows: Newcombe's hybrid score method.

    Newcombe (1998), Statistics in Medicine 17:2635, method 10: the Wilson intervals of both
    accuracies combined with the correlation phi of the paired table. Unlike the Wald interval it
    stays inside [-1, 1] and keeps its coverage when the change is near zero or the rows are few.
    """
    rows = counts.rows
    if rows == 0:
        return -1.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    a, b, c, d = counts.both, counts.gains, counts.losses, counts.neither
    p1, p2 = (a + b) / rows, (a + c) / rows  # accuracy after, before
    l1, u1 = _wilson(a + b, rows, z)
    l2, u2 = _wilson(a + c, rows, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    change = p1 - p2
    low = change - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = change + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return max(low, -1.0), min(high, 1.0)


def _points(value: float) -> str:
    return f"{100 * value:+.1f} pt"


REPAIRED = "repaired"  # --k auto: a k confirmed on validation rows, applied
UNCONFIRMED = "unconfirmed"  # --k auto: nothing confirmed (or no rows that can confirm), unchanged
GIVEN = "given"  # a given k the validation set does not show worse
UNCHECKED = "unchecked"  # a given k with no validation set: nothing checked it
REFUSED = "refused"  # a given k the validation set shows significantly worse at alpha
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
        f"k = {decision.best_k} against the unrepaired layer on the {where} rows",
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
        return change_interval(self.test)

    @property
    def confirmed(self) -> bool:
        """With --k auto: whether the chosen k passed the test and is applied."""
        return not self.given and self.k != self.rank

    @property
    def significantly_worse(self) -> bool:
        """Whether the test rows show the head at k worse than the unrepaired layer, at alpha."""
        return self.test.losses > self.test.gains and self.p_value_drop <= self.alpha

    @property
    def outcome(self) -> str:
        """REPAIRED, UNCONFIRMED (auto), GIVEN or REFUSED (a given k the validation set shows worse)."""
        if self.given:
            return REFUSED if self.significantly_worse else GIVEN
        return REPAIRED if self.confirmed else UNCONFIRMED

    def accuracy(self, k: int) -> float:
        """Accuracy of the head at k (best_k or the rank) over the selection and confirmation rows."""
        test = self.test
        right = test.both + (test.gains if k == self.best_k and k != self.rank else test.losses)
        if self.selection_rows:
            right += round(self.selection_accuracies[self.ks.index(k)] * self.selection_rows)
        return right / max(self.selection_rows + test.rows, 1)


def _interval_text(decision: Decision) -> str:
    low, high = decision.interval
    return f"95% CI {100 * low:+.1f} to {_points(high)}"


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
        reason = (
            f"best {named} ({_points(change)} on selection) not confirmed "
            f"({_points(test.change)}, p = {decision.p_value:.2g} on {rows} rows"
            + (f", needs p <= {decision.level:g}" if tests > 1 else "")
            + "); weights unchanged"
        )
    return replace(decision, reason=reason)


def significance(decision: Decision) -> str:
    """Whether the change of a given k is significant, in words, with the one-sided p-value."""
    test, alpha = decision.test, decision.alpha
    if test.gains > test.losses and decision.p_value <= alpha:
        return f"a significant gain (p = {decision.p_value:.2g})"
    if decision.significantly_worse:
        return f"a significant drop (p = {decision.p_value_drop:.2g})"
    p = decision.p_value if test.gains >= test.losses else decision.p_value_drop
    return f"not significant at alpha {alpha:g} (p = {p:.2g})"


def assess_given_k(test: PairedCounts, k: int, rank: int, alpha: float) -> Decision:
    """A k the user gave, tested against the unrepaired layer on the whole validation set."""
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


def selection_curve(
    stats: lip.LapStatistics, rows: Rows, targets: str, total: Total = _same
) -> tuple[list[int], list[float]]:
    """Accuracies on the grid, then at every k between the best grid point's neighbours, sorted by k."""
    ks = k_grid(stats.svd.rank)
    accuracies = curve(stats, rows, ks, targets, total)
    extra = refined_ks(ks, best_k(ks, accuracies))
    if extra:
        accuracies += curve(stats, rows, extra, targets, total)
        pairs = sorted(zip(ks + extra, accuracies, strict=True))
        ks, accuracies = [k for k, _ in pairs], [accuracy for _, accuracy in pairs]
    return ks, accuracies


AUTO_TARGETS = "auto"  # choose the targets on the selection part too


def _choose_and_test(
    stats: lip.LapStatistics, chooses: Rows, confirms: Rows, options: Sequence[str], total: Total
) -> tuple[str, list[int], list[float], int, int, PairedCounts]:
    """The best (targets, k) on `chooses` (ties: the larger k, then the paper's targets), with its
    curve, the rows that chose it, and its paired table against the unrepaired layer on `confirms`."""
    curves = {option: selection_curve(stats, chooses, option, total) for option in options}

    def score(option: str) -> tuple[float, int, bool]:
        ks, accuracies = curves[option]
        best = best_k(ks, accuracies)
        return accuracies[ks.index(best)], best, option == "paper"

    chosen = max(options, key=score)
    ks, accuracies = curves[chosen]
    best = best_k(ks, accuracies)
    rows = int(total(torch.tensor([float(sum(int(z.shape[0]) for z, _ in chooses))]))[0])
    return chosen, ks, accuracies, best, rows, compare_heads(stats, best, chosen, confirms, total)


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
    rank = stats.svd.rank
    options = lip.TARGETS if targets == AUTO_TARGETS else (targets,)
    directions = (
        [(selection, confirmation), (confirmation, selection)] if cross_fit else [(selection, confirmation)]
    )
    tried = [_choose_and_test(stats, *parts, options, total) for parts in directions]

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
        table = compare_heads(stats, runner, chosen, directions[index][0], total)
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
    chooses, confirms = [(projections[~confirm], labels[~confirm])], [(projections[confirm], labels[confirm])]
    option, _, _, best, _, test = _choose_and_test(stats, chooses, confirms, options, _same)
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
