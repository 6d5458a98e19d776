"""The power of the exact one-sided McNemar test (`lip_cli.power`): against a direct float64 sum, a
Monte-Carlo simulation of confirmation sets, and its algebraic properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lip_cli import power, selection

ALPHAS = st.sampled_from([0.01, 0.05, 0.1, 0.2])


def reference_power(rows: int, discordance: float, gain: float, alpha: float) -> float:
    """Every D from 0 to n, the critical count from selection's own exact p-value, exact binomial terms."""
    q = (1 + gain / discordance) / 2
    total = 0.0
    for discordant in range(rows + 1):
        gains = next(
            (c for c in range(1, discordant + 1) if selection.mcnemar_p_value(c, discordant - c) <= alpha),
            discordant + 1,
        )
        upper = sum(
            math.comb(discordant, x) * q**x * (1 - q) ** (discordant - x)
            for x in range(gains, discordant + 1)
        )
        total += (
            math.comb(rows, discordant)
            * discordance**discordant
            * (1 - discordance) ** (rows - discordant)
            * upper
        )
    return total


@settings(max_examples=60, deadline=None)
@given(discordant=st.integers(0, 400), alpha=ALPHAS)
def test_critical_count_is_where_the_exact_test_starts_to_reject(discordant: int, alpha: float) -> None:
    count = power.critical_count(discordant, alpha)
    assert count >= 1
    if count <= discordant:
        assert selection.mcnemar_p_value(count, discordant - count) <= alpha
    if count - 1 >= 1:
        assert selection.mcnemar_p_value(count - 1, discordant - count + 1) > alpha


@pytest.mark.parametrize(
    ("rows", "discordance", "gain", "alpha"),
    [
        (40, 0.3, 0.1, 0.05),
        (120, 0.1, 0.04, 0.05),
        (150, 0.5, 0.0, 0.05),
        (90, 0.9, 0.3, 0.01),
        (25, 1.0, 0.5, 0.1),
    ],
)
def test_power_matches_a_direct_float64_sum(rows: int, discordance: float, gain: float, alpha: float) -> None:
    assert power.power(rows, discordance, gain, alpha) == pytest.approx(
        reference_power(rows, discordance, gain, alpha), abs=1e-12
    )


@pytest.mark.parametrize(
    ("rows", "discordance", "gain"), [(200, 0.2, 0.05), (1000, 0.1, 0.02), (359, 0.25, 0.05), (60, 0.5, 0.2)]
)
def test_power_matches_simulated_confirmation_sets(rows: int, discordance: float, gain: float) -> None:
    """The share of simulated confirmation sets (gain, loss or concordant rows drawn independently)
    that the test itself rejects."""
    simulations, alpha = 4000, 0.05
    rng = np.random.default_rng(rows)
    shares = [(discordance + gain) / 2, (discordance - gain) / 2, 1 - discordance]
    tables = rng.multinomial(rows, shares, size=simulations)
    rejected = np.mean([selection.mcnemar_p_value(int(g), int(loss)) <= alpha for g, loss, _ in tables])
    expected = power.power(rows, discordance, gain, alpha)
    assert abs(rejected - expected) <= 4.5 * math.sqrt(expected * (1 - expected) / simulations) + 1e-3


@pytest.mark.parametrize(("discordant", "gain_share"), [(30, 0.7), (100, 0.6), (400, 0.55)])
def test_power_at_a_given_discordance_matches_simulation(discordant: int, gain_share: float) -> None:
    """Conditioned on D discordant rows: the share of simulated sets with that discordance rejected."""
    alpha, simulations = 0.05, 4000
    gains = np.random.default_rng(discordant).binomial(discordant, gain_share, size=simulations)
    rejected = np.mean([selection.mcnemar_p_value(int(g), discordant - int(g)) <= alpha for g in gains])
    expected = power.tail(discordant, power.critical_count(discordant, alpha), gain_share)
    assert abs(rejected - expected) <= 4.5 * math.sqrt(expected * (1 - expected) / simulations) + 1e-3
    # all rows discordant: the unconditional power is the conditional one
    assert power.power(discordant, 1.0, 2 * gain_share - 1, alpha) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 600),
    discordance=st.floats(0.01, 0.95),
    low=st.floats(0, 1),
    high=st.floats(0, 1),
    alpha=ALPHAS,
)
def test_power_grows_with_the_gain_and_the_rows_and_holds_alpha_at_no_gain(
    rows: int, discordance: float, low: float, high: float, alpha: float
) -> None:
    low, high = sorted((low * discordance, high * discordance))
    rounding = 1e-9  # a sum of up to 1,200 float64 terms near 1 (seen: 1 - 1e-12 against 1 - 3e-16)
    at_zero = power.power(rows, discordance, 0.0, alpha)
    assert at_zero <= alpha + 1e-12  # the exact test never rejects more often than alpha under no gain
    assert power.power(rows, discordance, -low, alpha) <= at_zero + rounding
    assert at_zero <= power.power(rows, discordance, low, alpha) + rounding
    assert (
        power.power(rows, discordance, low, alpha) <= power.power(rows, discordance, high, alpha) + rounding
    )
    assert (
        power.power(rows, discordance, high, alpha)
        <= power.power(2 * rows, discordance, high, alpha) + rounding
    )


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(10, 3000), discordance=st.floats(0.02, 0.6), alpha=ALPHAS)
def test_smallest_detectable_gain_is_where_power_reaches_80_percent(
    rows: int, discordance: float, alpha: float
) -> None:
    gain = power.smallest_detectable_gain(rows, discordance, alpha)
    if gain is None:
        assert power.power(rows, discordance, discordance, alpha) < power.LEVEL
        return
    assert power.power(rows, discordance, gain, alpha) >= power.LEVEL
    assert power.power(rows, discordance, max(gain - 2e-5, 0.0), alpha) < power.LEVEL


@pytest.mark.parametrize(("discordance", "alpha"), [(0.05, 0.05), (0.2, 0.05), (0.3, 0.01), (0.004, 0.05)])
def test_rows_needed_for_a_one_point_gain(discordance: float, alpha: float) -> None:
    rows = power.rows_needed(discordance, alpha)
    used = max(discordance, power.ONE_POINT)  # a 1-point gain needs at least 1% of rows to disagree
    assert power.power(rows, used, power.ONE_POINT, alpha) >= power.LEVEL
    assert power.power(rows - 1, used, power.ONE_POINT, alpha) < power.LEVEL
    z = 1.6449 if alpha == 0.05 else 2.3263
    assert rows == pytest.approx((z + 0.8416) ** 2 * used / power.ONE_POINT**2, rel=0.15)  # the normal rule


def test_assess_states_what_a_test_could_detect() -> None:
    figures = power.assess(1000, 100, 1000, "k = 3 on the confirmation rows", 0.05, validation_share=0.5)
    assert figures.discordance == 0.1 and figures.rows == 1000 and figures.level == 0.8
    assert figures.smallest_detectable_gain == pytest.approx(power.smallest_detectable_gain(1000, 0.1, 0.05))
    assert figures.validation_rows_for_one_point == 2 * power.rows_needed(0.1, 0.05)
    nothing = power.assess(1000, 0, 1000, "no discordant row", 0.05)
    assert nothing.smallest_detectable_gain is None and nothing.validation_rows_for_one_point is None
    with pytest.raises(ValueError):
        power.power(100, 0.1, 0.2, 0.05)  # a gain larger than the discordance is impossible


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 90), discordance=st.floats(0.01, 1.0), share=st.floats(0, 1), alpha=ALPHAS)
def test_the_recurrence_matches_the_direct_sum_anywhere(
    rows: int, discordance: float, share: float, alpha: float
) -> None:
    """The walk over D (critical counts and tails by their recurrences) against every term summed."""
    gain = (2 * share - 1) * discordance
    assert power.power(rows, discordance, gain, alpha) == pytest.approx(
        reference_power(rows, discordance, gain, alpha), abs=1e-10
    )
