"""Checks for the exercises of 07_noise_conditional_scores.py.

Each check compares an implementation with ground truth computed another way (counting the
peaks of a density on a grid, simulated Langevin chains, iterating a variance recursion,
root finding plus direct counting) and says what went wrong, with the inputs it used.
``exercise_tests`` turns the checks into three tests: the reference passes, every wrong answer
below fails, and your answer passes (or is skipped while it still raises NotImplementedError).
"""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from common.exercises import Exercise, assert_close, exercise_tests

pytestmark = pytest.mark.ch07
F64 = torch.float64


# -- 7.1 where equal-weight modes merge ------------------------------------------------------------
def _n_peaks(distance, sigma, n_grid=40_001):
    """Local maxima of 0.5 N(-d/2, s^2) + 0.5 N(d/2, s^2), s^2 = 1 + sigma^2, on a fine grid."""
    s2 = 1 + sigma**2
    t = np.linspace(-distance, distance, n_grid)
    p = np.exp(-(t + distance / 2) ** 2 / (2 * s2)) + np.exp(-(t - distance / 2) ** 2 / (2 * s2))
    inner = p[1:-1]
    return int(((inner > p[:-2]) & (inner >= p[2:])).sum())


def _merge_by_bisection(distance):
    if _n_peaks(distance, 0.0) == 1:
        return 0.0
    lo, hi = 0.0, distance
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _n_peaks(distance, mid) == 1 else (mid, hi)
    return hi


def check_merge_sigma(fn):
    for d in (14.142, 4.0, 2.5, 1.5):
        assert_close(fn(d), _merge_by_bisection(d),
                     what=f"merge sigma for distance d = {d} (unit-variance modes, equal "
                          f"weights; truth: counting the peaks of p_sigma on a grid)",
                     hint="each bump of p_sigma has variance 1 + sigma^2, and equal bumps merge "
                          "when their standard deviation reaches d/2; d <= 2 gives 0",
                     atol=2e-3, rtol=0)


def merge_ignores_data_width(distance):
    return distance / 2  # treats p_sigma's bumps as having std sigma, not sqrt(1 + sigma^2)


def merge_rule_of_thumb(distance):
    return float(distance)  # NCSNv2's sigma_max rule: an upper bound, not the merging point


# -- 7.2 Technique 4 in NCSNv2's convention ------------------------------------------------------
def _simulate_ncsnv2(r2, n_steps, gamma, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = gamma * torch.randn(n, generator=g, dtype=F64)  # sigma = 1, s(x) = -x
    for _ in range(n_steps):
        x = x + r2 * (-x) + math.sqrt(2 * r2) * torch.randn(n, generator=g, dtype=F64)
    return x.var().item()


def check_ncsnv2_variance_ratio(fn):
    assert_close(fn(0.15, 0, 2.0), 4.0, what="r2 = 0.15, T = 0, gamma = 2 (no step yet)",
                 hint="gamma^2", rtol=1e-12)
    assert_close(fn(0.15, 10_000, 2.0), 1 / (1 - 0.15 / 2),
                 what="r2 = 0.15, T = 10000, gamma = 2 (the stationary variance)",
                 hint="per step x <- (1 - r2) x + sqrt(2 r2) z: "
                      "fixed point 2 r2 / (1 - (1 - r2)^2)",
                 rtol=1e-9)
    for r2, T, gamma in [(0.05, 5, 2.0), (0.25, 3, 1.5), (0.02, 20, 3.0)]:
        sim = _simulate_ncsnv2(r2, T, gamma)
        tol = 5 * sim * math.sqrt(2 / 200_000)  # 5 standard errors of a sample variance
        assert_close(fn(r2, T, gamma), sim,
                     what=f"Var(x_T)/sigma^2 for r2 = {r2}, T = {T}, gamma = {gamma} "
                          f"(vs 200,000 simulated chains of x + r2 sigma^2 s + sqrt(2 r2) sigma z)",
                     hint="a = 1 - r2 per step and noise variance 2 r2: "
                          "v_T = a^(2T) gamma^2 + 2 r2 (1 - a^(2T)) / (1 - a^2)",
                     atol=tol, rtol=0)


def ncsnv2_module_formula(r2, n_steps, gamma):
    a = 1 - r2 / 2  # this module's convention, with NCSNv2's step plugged in unchanged
    s_inf = 1 / (1 - r2 / 4)
    return a ** (2 * n_steps) * (gamma**2 - s_inf) + s_inf


def ncsnv2_noise_not_doubled(r2, n_steps, gamma):
    a = 1 - r2
    s_inf = r2 / (1 - a * a)  # forgot the 2 in sqrt(2 alpha') z
    return a ** (2 * n_steps) * (gamma**2 - s_inf) + s_inf


# -- 7.3 the step's variance bias at level sigma ------------------------------------------------
def _bias_by_iteration(r, sigma):
    """Iterate Var <- (1 - alpha/(2v))^2 Var + alpha from v until it stops moving."""
    v = 1 + sigma**2
    alpha = r * sigma**2
    a2 = (1 - alpha / (2 * v)) ** 2
    var = v
    for _ in range(200_000):
        new = a2 * var + alpha
        if abs(new - var) < 1e-15 * var:
            break
        var = new
    return var / v - 1


def check_stationary_bias(fn):
    for r, sigma in [(0.3, 3.0), (0.3, 1.0), (0.3, 0.1), (1.0, 0.5), (2.0, 10.0)]:
        assert_close(fn(r, sigma), _bias_by_iteration(r, sigma),
                     what=f"relative variance excess for r = {r}, sigma = {sigma} (unit-variance "
                          f"mode; truth: iterating the variance recursion to its fixed point)",
                     hint="the target is N(0, 1 + sigma^2), not N(0, sigma^2); the step is "
                          "alpha = r sigma^2; module 03: v / (1 - alpha / (4 v)), exactly (not "
                          "its first-order form)",
                     rtol=1e-6, atol=1e-12)


def bias_same_at_every_level(r, sigma):
    return 1 / (1 - r / 4) - 1  # Section 2.5's large-sigma picture applied everywhere


def bias_first_order(r, sigma):
    return r * sigma**2 / (4 * (1 + sigma**2))  # the approximation, not the exact value


# -- 7.4 number of levels for a target overlap ---------------------------------------------------
def _overlap_truth(gamma, dim):
    mean, std = math.sqrt(dim), 1 / math.sqrt(2)  # |x| ~ N(sqrt D, 1/2) for sigma_i = 1
    lo, hi = gamma * (mean - 3 * std), gamma * (mean + 3 * std)
    return stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)


def _count_levels(sigma_max, sigma_min, gamma):
    L, s = 1, sigma_max
    while s > sigma_min * (1 + 1e-9):
        s, L = s / gamma, L + 1
    return L


def check_levels_for_overlap(fn):
    for args in [(50.0, 0.01, 3072, 0.5), (20.46, 0.01, 784, 0.5), (10.0, 0.1, 100, 0.9),
                 (1.0, 0.01, 10, 0.5)]:
        smax, smin, dim, target = args
        gamma = optimize.brentq(lambda g: _overlap_truth(g, dim) - target, 1.0, 100.0,
                                xtol=1e-12)
        got, want = fn(*args), _count_levels(smax, smin, gamma)
        if got != want:
            raise AssertionError(
                f"levels for sigma_max = {smax}, sigma_min = {smin}, D = {dim}, target = "
                f"{target}: expected {want} (gamma = {gamma:.5f}), got {got}. Hint: the std of "
                f"|x| is sigma / sqrt(2), so C uses sqrt(2D)(gamma - 1) +- 3 gamma; then "
                f"L - 1 = ceil(log(sigma_max / sigma_min) / log(gamma)), both ends counted")


def levels_std_sigma(sigma_max, sigma_min, dim, target):
    def overlap(g):  # forgot that the std of |x| is sigma / sqrt 2
        c = math.sqrt(dim) * (g - 1)
        return stats.norm.cdf(c + 3 * g) - stats.norm.cdf(c - 3 * g)

    gamma = optimize.brentq(lambda g: overlap(g) - target, 1.0, 100.0)
    return 1 + math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)


def levels_rounded_down(sigma_max, sigma_min, dim, target):
    def overlap(g):
        c = math.sqrt(2 * dim) * (g - 1)
        return stats.norm.cdf(c + 3 * g) - stats.norm.cdf(c - 3 * g)

    gamma = optimize.brentq(lambda g: overlap(g) - target, 1.0, 100.0)
    return 1 + int(math.log(sigma_max / sigma_min) / math.log(gamma))  # last gap too wide


EXERCISES = [
    Exercise("exercise_merge_sigma", check_merge_sigma,
             [merge_ignores_data_width, merge_rule_of_thumb]),
    Exercise("exercise_ncsnv2_variance_ratio", check_ncsnv2_variance_ratio,
             [ncsnv2_module_formula, ncsnv2_noise_not_doubled]),
    Exercise("exercise_stationary_bias", check_stationary_bias,
             [bias_same_at_every_level, bias_first_order]),
    Exercise("exercise_levels_for_overlap", check_levels_for_overlap,
             [levels_std_sigma, levels_rounded_down]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("07", EXERCISES)
