"""Power of the exact one-sided McNemar test that confirms a repair: what its rows could detect.

Pure functions on counts, no files and no terminal. Of n paired rows a share d is discordant
(exactly one of the two heads right). Under a true accuracy gain g the discordant count is
D ~ Bin(n, d) and the gains among them X | D ~ Bin(D, (1 + g / d) / 2). The test
(`selection.mcnemar_p_value`) rejects when P(Bin(D, 1/2) >= X) <= alpha, that is when X reaches the
critical count c(D). Its power is the sum over D of P(D) P(X >= c(D) | D), summed term by term over
every D within 12 standard deviations (+ 20) of n d, where the rest of Bin(n, d) weighs < 1e-15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.8  # the detection probability the figures are stated at
ONE_POINT = 0.01  # the accuracy gain whose rows needed are stated
_NEGLIGIBLE = 1e-18  # a tail sum stops once its terms fall below this share of the sum
_RECHECK = 1e-9  # a running tail this close to alpha is recomputed from its terms


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


def power(rows: int, discordance: float, gain: float, alpha: float) -> float:
    """The probability that the test confirms a head whose true accuracy gain is `gain` when the two
    heads disagree on a share `discordance` of rows, on `rows` confirmation rows at `alpha`."""
    _check(rows, discordance, gain, alpha)
    if rows == 0 or discordance == 0.0:
        return 0.0
    q = min(max((1.0 + gain / discordance) / 2.0, 0.0), 1.0)
    mean, spread = rows * discordance, math.sqrt(rows * discordance * (1.0 - discordance))
    low = max(0, math.floor(mean - 12 * spread - 20))
    high = min(rows, math.ceil(mean + 12 * spread + 20))
    count = critical_count(low, alpha)
    null, alternative = tail(low, count, 0.5), tail(low, count, q)
    total = 0.0
    for discordant in range(low, high + 1):
        if discordant > low:  # one more trial: P(S' >= c) = P(S >= c) + p P(S = c - 1)
            null += 0.5 * _pmf(discordant - 1, count - 1, 0.5)
            alternative += q * _pmf(discordant - 1, count - 1, q)
            if abs(null - alpha) <= _RECHECK * alpha:
                null = tail(discordant, count, 0.5)
            while null > alpha:
                null -= _pmf(discordant, count, 0.5)
                alternative -= _pmf(discordant, count, q)
                count += 1
        total += _pmf(rows, discordant, discordance) * max(alternative, 0.0)
    return min(total, 1.0)


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
    slightly in the rows, so this is the crossing of `level` that the search meets.
    """
    discordance = max(discordance, gain)
    if discordance > 1.0:
        return None
    z = NormalDist().inv_cdf(1.0 - alpha) + NormalDist().inv_cdf(level)
    guess = max(1, math.ceil(z * z * discordance / gain**2))
    low, high = guess * 3 // 4, min(max(guess * 5 // 4, 1), limit)
    while power(high, discordance, gain, alpha) < level:
        if high >= limit:
            return None
        low, high = high, min(2 * high, limit)
    while low > 0 and power(low, discordance, gain, alpha) >= level:
        low, high = low // 2, low
    while high - low > 1:
        middle = (low + high) // 2
        if power(middle, discordance, gain, alpha) >= level:
            high = middle
        else:
            low = middle
    return high


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
