"""Rates with honest uncertainty: the Wilson score interval of a binomial proportion.

A reproduction rate measured on ``n`` samples (``k`` of them copies of a training image) is an
estimate; the report gives it with a 95% interval. The Wilson score interval (Wilson 1927)
keeps its coverage close to nominal for small ``n`` and for rates near 0 or 1, where the
textbook ``p +- z sqrt(p (1 - p) / n)`` collapses to a zero-width interval at ``k = 0`` or
``k = n``; it is what Brown, Cai and DasGupta (2001) recommend for small samples.
"""

from __future__ import annotations

import math

# The two-sided 95% normal quantile, Phi^-1(0.975).
Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` for ``successes`` of ``trials``, both in [0, 1].

    ``z``: the normal quantile of the confidence level (default 95%). With no trials the
    proportion is unknown: ``(0.0, 1.0)``.
    """
    k, n = int(successes), int(trials)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 (k = n) the bound is exactly 0 (1); clamp the rounding residue.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high
