"""The gate of `lip compare`: thresholds on what label noise does to a head, and their verdicts.

Pure functions on numbers and counts, no files and no terminal. A threshold is
`--fail-below METRIC=VALUE` or `--fail-above METRIC=VALUE`; the metrics compare B with the
reference A:

- `phi@K`: the subspace similarity phi(K, K) of the top-K right singular vectors, in [0, 1];
- `angle@K`: the largest principal angle between the top-K subspaces, in degrees;
- `effective-rank`: B's effective rank minus A's (`VALUE%`: that change in percent of A's);
- `energy@K`: B's share of the energy in its top K components minus A's (`VALUE%`: in percent of A's);
- `accuracy`: B's validation accuracy minus A's, each head on its own features of the same rows,
  as a fraction (-0.01: one point). It fails only when the exact one-sided McNemar test
  (`selection.mcnemar_p_value`) shows B worse at alpha and the change is below VALUE; when it
  does not fail but its rows could not detect a drop of max(-VALUE, 1 point) with probability 0.8
  (`power`), the verdict is "too few rows to tell".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lip_cli import power, selection

PASSED, FAILED, TOO_FEW = "passed", "failed", "too few rows"
BELOW, ABOVE = "below", "above"
SIZED = ("phi", "angle", "energy")  # metrics taken at a subspace size K
RELATIVE = ("effective-rank", "energy")  # metrics that take VALUE% (of A's value)
METRICS = ("phi", "angle", "effective-rank", "energy", "accuracy")
_SPEC = re.compile(r"^(?P<metric>[a-z-]+)(?:@(?P<k>\d+))?=(?P<value>[^=%]+)(?P<percent>%?)$")


@dataclass(frozen=True)
class Threshold:
    """One threshold: the gate fails when `metric` lies `direction` (below / above) `value`."""

    metric: str
    k: int | None
    value: float
    direction: str
    relative: bool = False  # VALUE%: a change in percent of the reference's value

    @property
    def name(self) -> str:
        return self.metric + ("" if self.k is None else f"@{self.k}")

    @property
    def text(self) -> str:
        """As the user wrote it, normalised: `--fail-below phi@5=0.9`."""
        return f"--fail-{self.direction} {self.name}={self.value:g}{'%' if self.relative else ''}"

    @property
    def rule(self) -> str:
        """What passing means, in words: `phi@5 >= 0.9`."""
        sign = ">=" if self.direction == BELOW else "<="
        return f"{self.name} {sign} {self.value:g}{'%' if self.relative else ''}"


def parse_threshold(text: str, direction: str) -> Threshold:
    """`METRIC[@K]=VALUE[%]` as a Threshold; ValueError with a one-line reason otherwise."""
    match = _SPEC.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not METRIC=VALUE (e.g. phi@5=0.9, angle@5=30, effective-rank=-10%)")
    metric, k, percent = match["metric"], match["k"], bool(match["percent"])
    if metric not in METRICS:
        raise ValueError(f"{text!r}: unknown metric {metric!r}; one of {', '.join(METRICS)}")
    if metric in SIZED and k is None:
        raise ValueError(f"{text!r}: {metric} is taken at a subspace size; give it, e.g. {metric}@5")
    if metric not in SIZED and k is not None:
        raise ValueError(f"{text!r}: {metric} takes no @K")
    if k is not None and int(k) < 1:
        raise ValueError(f"{text!r}: K must be at least 1")
    if percent and metric not in RELATIVE:
        raise ValueError(f"{text!r}: only effective-rank and energy take a % (of the reference's value)")
    try:
        value = float(match["value"])
    except ValueError:
        raise ValueError(f"{text!r}: {match['value']!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: the value must be a finite number")
    if metric == "phi" and not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r}: phi lies in [0, 1]")
    if metric == "angle" and not 0.0 <= value <= 90.0:
        raise ValueError(f"{text!r}: principal angles lie in [0, 90] degrees")
    if metric == "accuracy" and (direction != BELOW or not -1.0 <= value <= 0.0):
        raise ValueError(
            f"{text!r}: accuracy takes --fail-below and a change in [-1, 0] (e.g. -0.01: a one-point drop)"
        )
    return Threshold(metric, None if k is None else int(k), value, direction, percent)


@dataclass(frozen=True)
class Check:
    """One threshold judged on one comparison."""

    threshold: Threshold
    comparison: str  # the compared checkpoint's label
    value: float | None  # the measured metric (None: accuracy with no rows)
    verdict: str  # PASSED, FAILED or TOO_FEW
    detail: str  # one sentence: what was measured against what

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED


def _crossed(threshold: Threshold, value: float) -> bool:
    return value < threshold.value if threshold.direction == BELOW else value > threshold.value


def change(before: float, after: float, relative: bool) -> float:
    """after - before, or that in percent of before (inf or nan when before is 0)."""
    if not relative:
        return after - before
    if before == 0:
        return 0.0 if after == before else math.copysign(math.inf, after - before)
    return 100.0 * (after - before) / abs(before)


def judge(threshold: Threshold, comparison: str, value: float) -> Check:
    """A spectral threshold on its measured value (the change, for the change metrics)."""
    verdict = FAILED if _crossed(threshold, value) or math.isnan(value) else PASSED
    unit = "%" if threshold.relative else (" degrees" if threshold.metric == "angle" else "")
    shown = {"effective-rank": "effective rank change", "energy": f"top-{threshold.k} energy change"}
    what = shown.get(threshold.metric, threshold.name)
    detail = f"{what} = {value:.4g}{unit}; " + (
        f"crosses {threshold.text}" if verdict == FAILED else f"holds {threshold.rule}"
    )
    return Check(threshold, comparison, value, verdict, detail)


@dataclass(frozen=True)
class AccuracyTest:
    """The paired accuracy test of B against A on the same validation rows."""

    counts: selection.PairedCounts  # before = the reference A, after = the compared head B
    alpha: float
    p_value_drop: float  # one-sided: B worse than A
    interval: tuple[float, float]  # the change B - A, each end a one-sided (1 - alpha) bound
    drop_detected: float  # the drop this test detects with probability power.LEVEL
    detectable: bool  # whether these rows detect it with probability power.LEVEL
    rows_needed: int | None  # rows that would, at the measured discordance


def accuracy_test(counts: selection.PairedCounts, alpha: float, margin: float) -> AccuracyTest:
    """The exact one-sided McNemar test that B is worse than A, its interval, and its power to see
    a drop of max(-margin, 1 point): a true drop of g needs a discordance of at least g, so the
    power is taken at the larger of the measured discordance and g."""
    drop = max(-margin, power.ONE_POINT)
    discordant = counts.gains + counts.losses
    measured = discordant / counts.rows if counts.rows else 0.0
    discordance = min(max(measured, drop), 1.0)
    detectable = counts.rows > 0 and power.power(counts.rows, discordance, drop, alpha) >= power.LEVEL
    return AccuracyTest(
        counts=counts,
        alpha=alpha,
        p_value_drop=selection.mcnemar_p_value(counts.losses, counts.gains),
        interval=selection.change_bounds(counts, alpha),
        drop_detected=drop,
        detectable=detectable,
        rows_needed=None if detectable else power.rows_needed(measured, alpha, drop),
    )


def judge_accuracy(threshold: Threshold, comparison: str, test: AccuracyTest) -> Check:
    """Fails when B is significantly worse (p <= alpha) and its change lies below the threshold;
    TOO_FEW when it does not fail but the rows could not have seen the drop."""
    counts = test.counts
    low, high = test.interval
    measured = (
        f"accuracy change {100 * counts.change:+.1f} pt on {counts.rows:,} rows "
        f"({100 * (1 - 2 * test.alpha):g}% CI {100 * low:+.1f} to {100 * high:+.1f} pt), "
        f"p = {test.p_value_drop:.2g} for a drop"
    )
    if test.p_value_drop <= test.alpha and counts.change < threshold.value:
        return Check(threshold, comparison, counts.change, FAILED, f"{measured}: significantly worse")
    if not test.detectable:
        needed = f"; about {test.rows_needed:,} would" if test.rows_needed else ""
        detail = (
            f"{measured}: too few rows to tell, a {100 * test.drop_detected:.1f}-point drop would go "
            f"unseen more than {100 * (1 - power.LEVEL):.0f}% of the time{needed}"
        )
        return Check(threshold, comparison, counts.change, TOO_FEW, detail)
    return Check(threshold, comparison, counts.change, PASSED, f"{measured}: not significantly worse")


def verdict(checks: list[Check]) -> str:
    """The gate's verdict: FAILED when any check failed, else TOO_FEW when one could not tell."""
    if any(check.verdict == FAILED for check in checks):
        return FAILED
    return TOO_FEW if any(check.verdict == TOO_FEW for check in checks) else PASSED
