"""Power of the exact one-sided McNemar test that confirms a repair: what its rows could detect.

Pure functions on counts, no files and no terminal. Of n paired rows a share d is discordant
(exactly one of the two heads right). Under a true accuracy gain g the discordant count is
D ~ Bin(n, d) and the gains among them X | D ~ Bin(D, (1 + g / d) / 2). The test
(`selection.mcnemar_p_value`) rejects when P(Bin(D, 1/2) >= X) <= alpha, that is when X reaches the
critical count c(D). Its power is the sum over D of P(D) P(X >= c(D) | D), over every D within 12
standard deviations (+ 20) of n d, where the rest of Bin(n, d) weighs < 1e-15; each P(X >= c(D) | D)
follows from the previous D's by a recurrence (`_Walk`), so a decision's figures cost milliseconds.
These figures are the power of the confirmation test alone, at the discordance measured: choosing
k on the other rows adds its own noise, so a whole `--k auto` run confirms a real gain less often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.8  # the detection probability the figures are stated at
ONE_POINT = 0.01  # the accuracy gain whose rows needed are stated
_NEGLIGIBLE = 1e-18  # a tail sum stops once its terms fall below this share of the sum
_RECHECK = 1e-9  # a running tail this close to alpha is recomputed from its terms
_LOG_HALF = math.log(0.5)


def _pmf(trials: int, successes: int, p: float) -> float:
    """P(Bin(trials, p) = successes)."""
    if successes < 0 or successes > trials:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        return float(successes == (trials if p >= 1.0 else 0))
    log = (
        math.lgamma(trials + 1)
        - math.lgamma(successes + 1)
        - math.lgamma(trials - successes + 1)
        + successes * math.log(p)
        + (trials - successes) * math.log1p(-p)
    )
    return math.exp(log)


def tail(trials: int, first: int, p: float) -> float:
    """P(Bin(trials, p) >= first), summed upwards until the terms past the mode are negligible."""
    total = 0.0
    for successes in range(max(first, 0), trials + 1):
        term = _pmf(trials, successes, p)
        total += term
        if successes > trials * p and term <= _NEGLIGIBLE * total:
            break
    return min(total, 1.0)


def critical_count(discordant: int, alpha: float) -> int:
    """The fewest gains among `discordant` rows that the test calls significant at `alpha`
    (discordant + 1 when not even a sweep is)."""
    z = NormalDist().inv_cdf(1.0 - alpha)
    count = min(discordant + 1, max(0, math.ceil(discordant / 2 + z * math.sqrt(discordant) / 2)))
    while count > 0 and tail(discordant, count - 1, 0.5) <= alpha:
        count -= 1
    while tail(discordant, count, 0.5) > alpha:
        count += 1
    return count


def _check(rows: int, discordance: float, gain: float, alpha: float) -> None:
    if rows < 0 or not 0.0 <= discordance <= 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"rows {rows}, discordance {discordance}, alpha {alpha}: out of range")
    if abs(gain) > discordance + 1e-12:
        raise ValueError(f"a gain of {gain} needs a discordance of at least {abs(gain)}, not {discordance}")


class _Walk:
    """The recurrence behind every power figure, for one alpha and one share q of gains among the
    discordant rows: walking D up one row at a time, the critical count c(D) (the fewest gains the
    test calls significant among D discordant rows; D + 1 when not even a sweep is), the null tail
    P(Bin(D, 1/2) >= c(D)) and the confirming tail P(Bin(D, q) >= c(D)), each updated in O(1):

        P(Bin(D + 1, p) >= c) = P(Bin(D, p) >= c) + p P(Bin(D, p) = c - 1),

    the binomial terms by their ratios, in logs (no term underflows). c(D + 1) is c(D) or c(D) + 1.
    The confirming tails are kept, so that a bisection over the rows asks for each D once.
    """

    def __init__(self, alpha: float, q: float) -> None:
        self.alpha, self.q = alpha, q
        self.first = 0
        self.tails: list[float] = []
        self._point = not 0.0 < q < 1.0
        self._log_miss = _log(1.0 - q)
        self._log_odds = 0.0 if self._point else math.log(q) - math.log(1.0 - q)

    def _start(self, discordant: int) -> None:
        """The walk's state at D from sums of terms (the one place it costs more than O(1))."""
        count = critical_count(discordant, self.alpha)
        self.first, self.tails = discordant, []
        self._d, self._c = discordant, count
        self._null, self._alt = tail(discordant, count, 0.5), tail(discordant, count, self.q)
        self._log_half = _log_pmf(discordant, count - 1, 0.5)  # log P(Bin(D, p) = c - 1)
        self._log_q = _log_pmf(discordant, count - 1, self.q)
        self.tails.append(self._alt if 0.0 < self.q < 1.0 else float(self.q >= 1.0 and count <= discordant))

    def _step(self) -> None:
        d, c, q = self._d, self._c, self.q  # c >= 1 and c - 1 <= d throughout
        self._null += 0.5 * math.exp(self._log_half)
        self._alt += q * math.exp(self._log_q)
        grow = math.log((d + 1) / (d + 2 - c))  # P(Bin(D + 1, p) = c - 1) / P(Bin(D, p) = c - 1)
        self._log_half += grow + _LOG_HALF  # ... is (D + 1) / (D + 2 - c) (1 - p)
        self._log_q += grow + self._log_miss
        d += 1
        if abs(self._null - self.alpha) <= _RECHECK * self.alpha:
            self._null = tail(d, c, 0.5)
        if self._null > self.alpha:  # c(D + 1) = c(D) + 1: drop the term P(Bin(D + 1, p) = c)
            ratio = math.log((d - c + 1) / c)  # ... = P(Bin(D + 1, p) = c - 1) (D + 2 - c) / c p / (1 - p)
            self._log_half += ratio
            self._log_q += ratio + self._log_odds
            self._null -= math.exp(self._log_half)
            self._alt -= math.exp(self._log_q)
            c += 1
        if self._point:  # every discordant row a gain (q = 1) or a loss (q = 0)
            self._alt = float(q >= 1.0 and c <= d)
        self._d, self._c = d, c
        self.tails.append(min(max(self._alt, 0.0), 1.0))

    def confirming(self, low: int, high: int) -> list[float]:
        """P(Bin(D, q) >= c(D)) for D = low..high."""
        if not self.tails or low < self.first:
            self._start(low)
        while self.first + len(self.tails) <= high:
            self._step()
        return self.tails[low - self.first : high - self.first + 1]


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _log_pmf(trials: int, successes: int, p: float) -> float:
    value = _pmf(trials, successes, p)
    return math.log(value) if value > 0 else _log_pmf_far(trials, successes, p)


def _log_pmf_far(trials: int, successes: int, p: float) -> float:
    """log P(Bin(trials, p) = successes) where the term underflows a float (or is 0)."""
    if successes < 0 or successes > trials or p <= 0.0 or p >= 1.0:
        return -math.inf
    return (
        math.lgamma(trials + 1)
        - math.lgamma(successes + 1)
        - math.lgamma(trials - successes + 1)
        + successes * math.log(p)
        + (trials - successes) * math.log1p(-p)
    )


def _gain_share(discordance: float, gain: float) -> float:
    return min(max((1.0 + gain / discordance) / 2.0, 0.0), 1.0)


def _over_discordance(rows: int, discordance: float, walk: _Walk) -> float:
    """The sum over D of P(Bin(rows, discordance) = D) P(confirmed | D), every D within 12 standard
    deviations + 20 of rows x discordance (the rest of Bin(rows, discordance) weighs < 1e-15); the
    weights by their ratios from the mode's term."""
    if rows == 0 or discordance == 0.0:
        return 0.0
    mean, spread = rows * discordance, math.sqrt(rows * discordance * (1.0 - discordance))
    low = max(0, math.floor(mean - 12 * spread - 20))
    high = min(rows, math.ceil(mean + 12 * spread + 20))
    confirming = walk.confirming(low, high)
    if discordance >= 1.0:
        return min(confirming[rows - low], 1.0)
    mode = min(max(int(mean), low), high)
    odds = discordance / (1.0 - discordance)
    weights = {mode: 1.0}  # relative to the mode's term, then normalised: the range holds all but
    for d in range(mode, high):  # < 1e-15 of the mass, and no lgamma rounding enters the sum
        weights[d + 1] = weights[d] * (rows - d) / (d + 1) * odds  # P(D + 1) / P(D)
    for d in range(mode, low, -1):
        weights[d - 1] = weights[d] * d / (rows - d + 1) / odds
    total = sum(weights[d] * confirming[d - low] for d in range(low, high + 1))
    return min(total / sum(weights.values()), 1.0)


def power(rows: int, discordance: float, gain: float, alpha: float) -> float:
    """The probability that the test confirms a head whose true accuracy gain is `gain` when the two
    heads disagree on a share `discordance` of rows, on `rows` confirmation rows at `alpha`: the power
    of the confirmation test alone (not of choosing k too), exact by the recurrence of `_Walk`."""
    _check(rows, discordance, gain, alpha)
    if rows == 0 or discordance == 0.0:
        return 0.0
    return _over_discordance(rows, discordance, _Walk(alpha, _gain_share(discordance, gain)))


def smallest_detectable_gain(
    rows: int, discordance: float, alpha: float, level: float = LEVEL
) -> float | None:
    """The smallest gain the test confirms with probability `level`; None when even a gain on every
    discordant row is confirmed less often."""
    if rows == 0 or discordance == 0.0 or power(rows, discordance, discordance, alpha) < level:
        return None
    low, high = 0.0, discordance
    while high - low > 1e-5:
        middle = (low + high) / 2
        if power(rows, discordance, middle, alpha) >= level:
            high = middle
        else:
            low = middle
    return high


def rows_needed(
    discordance: float, alpha: float, gain: float = ONE_POINT, level: float = LEVEL, limit: int = 10**9
) -> int | None:
    """The fewest rows on which the test confirms `gain` with probability `level`, at a discordance of
    at least the gain (a gain needs that many rows on which the heads disagree). None past `limit`.

    Found by bisection from the normal approximation's rows: an exact test's power saw-tooths
    slightly in the rows, so this is the crossing of `level` that the search meets. Every step
    shares one walk (the gains' share is the same for all rows).
    """
    discordance = max(discordance, gain)
    if discordance > 1.0:
        return None
    _check(1, discordance, gain, alpha)
    walk = _Walk(alpha, _gain_share(discordance, gain))

    def power_at(rows: int) -> float:
        return _over_discordance(rows, discordance, walk)

    z = NormalDist().inv_cdf(1.0 - alpha) + NormalDist().inv_cdf(level)
    guess = max(1, math.ceil(z * z * discordance / gain**2))
    low, high = guess * 3 // 4, min(max(guess * 5 // 4, 1), limit)
    walk.confirming(*_discordant_range(low, discordance))  # walk from the lowest D the search needs
    while power_at(high) < level:
        if high >= limit:
            return None
        low, high = high, min(2 * high, limit)
    while low > 0 and power_at(low) >= level:
        low, high = low // 2, low
    while high - low > 1:
        middle = (low + high) // 2
        if power_at(middle) >= level:
            high = middle
        else:
            low = middle
    return high


def _discordant_range(rows: int, discordance: float) -> tuple[int, int]:
    mean, spread = rows * discordance, math.sqrt(rows * discordance * (1.0 - discordance))
    return max(0, math.floor(mean - 12 * spread - 20)), min(rows, math.ceil(mean + 12 * spread + 20))


@dataclass(frozen=True)
class Power:
    """What a decision's test could detect: its rows, the heads' discordance, the gain it confirms
    with probability `level`, and the validation rows a one-point gain needs."""

    rows: int  # the rows the test runs on
    discordance: float  # share of rows where exactly one head is right, as measured
    discordance_from: str  # the rows and heads it was measured on, in words
    alpha: float
    smallest_detectable_gain: float | None  # None: no gain within the discordance reaches `level`
    validation_rows_for_one_point: int | None  # validation rows (both parts) for a 1-point gain
    level: float = LEVEL


def assess(
    rows: int,
    discordant: int,
    measured_on: int,
    discordance_from: str,
    alpha: float,
    validation_share: float = 1.0,
) -> Power:
    """The power figures of a test on `rows` rows, at the discordance measured (`discordant` of
    `measured_on` rows); `validation_share` is the share of the validation rows that the test sees."""
    discordance = discordant / measured_on if measured_on else 0.0
    needed = rows_needed(discordance, alpha) if discordance > 0 else None
    return Power(
        rows=rows,
        discordance=discordance,
        discordance_from=discordance_from,
        alpha=alpha,
        smallest_detectable_gain=smallest_detectable_gain(rows, discordance, alpha),
        validation_rows_for_one_point=None if needed is None else math.ceil(needed / validation_share),
    )
