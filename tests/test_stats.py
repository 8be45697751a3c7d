"""The Wilson score interval against published values and its defining equation."""

import math

import pytest

from pipeline.stats import Z_95, wilson_interval


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score
        # without continuity correction), 95%: 81/263, 15/148, 0/20, 1/29. Printed to 4 decimals.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombes_table(k, n, low, high):
    got = wilson_interval(k, n)
    # The table rounds to 4 decimals: agreement within half a unit of the last place.
    assert got[0] == pytest.approx(low, abs=5e-5) and got[1] == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (3, 24), (12, 24), (24, 24), (7, 500), (499, 500)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p0 solves |k/n - p0| = z sqrt(p0 (1 - p0) / n), the interval's definition
    (where it is not clamped at 0 or 1); tolerance: float64 rounding of a few operations."""
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    for bound in (low, high):
        if bound in (0.0, 1.0):
            assert (bound == 0.0 and k == 0) or (bound == 1.0 and k == n)
            continue
        assert abs(k / n - bound) == pytest.approx(Z_95 * math.sqrt(bound * (1 - bound) / n), rel=1e-9)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 5)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(6, 5)
