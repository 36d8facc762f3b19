"""Reference answers to the exercises of 07_noise_conditional_scores.py.

Try each exercise yourself first; `pytest tests/test_07_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import math

from scipy import optimize, stats


def exercise_merge_sigma(distance: float) -> float:
    """Exercise 7.1: sqrt((d/2)^2 - 1), or 0 when the unit-variance modes already touch."""
    # each bump of p_sigma has variance s^2 = 1 + sigma^2; equal bumps merge once s >= d/2
    return math.sqrt(max((distance / 2) ** 2 - 1, 0.0))


def exercise_ncsnv2_variance_ratio(r2: float, n_steps: int, gamma: float) -> float:
    """Exercise 7.2: a^(2T) (gamma^2 - s_inf) + s_inf with a = 1 - r2, s_inf = 1/(1 - r2/2)."""
    a = 1 - r2  # x <- x - r2 x + sqrt(2 r2) sigma z, in units of sigma
    s_inf = 2 * r2 / (1 - a * a)  # fixed point of v <- a^2 v + 2 r2, = 1 / (1 - r2/2)
    return a ** (2 * n_steps) * (gamma**2 - s_inf) + s_inf


def exercise_stationary_bias(r: float, sigma: float) -> float:
    """Exercise 7.3: 1 / (1 - alpha / (4 v)) - 1 with v = 1 + sigma^2, alpha = r sigma^2."""
    v = 1 + sigma**2  # a unit-variance mode convolved with N(0, sigma^2)
    alpha = r * sigma**2
    return 1 / (1 - alpha / (4 * v)) - 1  # module 03's v / (1 - eps/(4v)), divided by v


def exercise_levels_for_overlap(sigma_max: float, sigma_min: float, dim: int,
                                target: float) -> int:
    """Exercise 7.4: gamma from C(gamma, D) = target, then 1 + ceil(log(max/min) / log gamma)."""
    def overlap(gamma):
        centre = math.sqrt(2 * dim) * (gamma - 1)
        return stats.norm.cdf(centre + 3 * gamma) - stats.norm.cdf(centre - 3 * gamma)

    gamma = optimize.brentq(lambda g: overlap(g) - target, 1.0, 100.0, xtol=1e-12)
    return 1 + math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)
