"""Checks for the exercises of 07_noise_conditional_scores.py.

Each check compares an implementation with ground truth (the normal CDF, a Monte Carlo run of
the Langevin chain, the exact posterior mean of a Gaussian mixture, direct counting) and says
what went wrong. ``exercise_tests`` turns the checks into three tests: the reference passes,
every wrong answer below fails, and your answer passes (or is skipped while it still raises
NotImplementedError).
"""

import math

import pytest
import torch
from scipy import stats

from common.datasets import GaussianMixture
from common.exercises import Exercise, assert_close, exercise_tests

pytestmark = pytest.mark.ch07
F64 = torch.float64


# -- 7.1 the overlap criterion -------------------------------------------------------------------
def _overlap_truth(gamma, dim):
    mean, std = math.sqrt(dim), 1 / math.sqrt(2)  # |x| ~ N(sqrt D, 1/2) for sigma_i = 1
    lo = gamma * (math.sqrt(dim) - 3 * std)
    hi = gamma * (math.sqrt(dim) + 3 * std)
    return stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)


def check_overlap_criterion(fn):
    assert_close(fn(1.0, 10), stats.norm.cdf(3) - stats.norm.cdf(-3),
                 what="C(1, D) (the worked example)", hint="at gamma = 1 the ends are +-3",
                 atol=1e-9)
    for gamma, dim in [(1.05, 784), (1.082, 784), (1.2, 100), (1.5, 2), (1.03, 3072)]:
        assert_close(fn(gamma, dim), _overlap_truth(gamma, dim),
                     what=f"C(gamma={gamma}, D={dim})",
                     hint="|x| ~ N(sigma sqrt(D), sigma^2/2): the std is sigma/sqrt(2), so the "
                          "standardised ends are sqrt(2D)(gamma - 1) +- 3 gamma", atol=1e-9)


def overlap_std_sigma(gamma, dim):
    centre = math.sqrt(dim) * (gamma - 1)  # forgot that the std of |x| is sigma / sqrt 2
    return float(stats.norm.cdf(centre + 3 * gamma) - stats.norm.cdf(centre - 3 * gamma))


def overlap_no_gamma_on_width(gamma, dim):
    centre = math.sqrt(2 * dim) * (gamma - 1)
    return float(stats.norm.cdf(centre + 3) - stats.norm.cdf(centre - 3))


# -- 7.2 step sizes ------------------------------------------------------------------------------
def check_annealed_step_sizes(fn):
    assert_close(fn(torch.tensor([4.0, 2.0, 1.0], dtype=F64), 0.1),
                 torch.tensor([1.6, 0.4, 0.1], dtype=F64), what="the worked example",
                 hint="alpha_i = eps sigma_i^2 / sigma_L^2", atol=1e-12)
    sigmas = torch.logspace(1.3, -2, 10, dtype=F64)
    alpha = fn(sigmas, 2e-5)
    assert_close(alpha / sigmas**2, torch.full((10,), 2e-5 / sigmas[-1].item() ** 2, dtype=F64),
                 what="alpha_i / sigma_i^2 on a 10-level ladder (must be constant)",
                 hint="the step scales with sigma_i squared", rtol=1e-10)


def steps_linear(sigmas, eps):
    return eps * sigmas / sigmas[-1]


def steps_normalised_by_first(sigmas, eps):
    return eps * (sigmas / sigmas[0]) ** 2


# -- 7.3 the variance ratio after T steps --------------------------------------------------------
def _simulate_ratio(r, n_steps, gamma, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = gamma * torch.randn(n, generator=g, dtype=F64)  # sigma = 1
    for _ in range(n_steps):
        x = x + 0.5 * r * (-x) + math.sqrt(r) * torch.randn(n, generator=g, dtype=F64)
    return x.var().item()


def check_variance_ratio(fn):
    assert_close(fn(0.3, 0, 2.0), 4.0, what="T = 0 (no step yet)", hint="gamma^2", rtol=1e-12)
    assert_close(fn(0.3, 10_000, 2.0), 1 / (1 - 0.3 / 4), what="T -> infinity",
                 hint="the fixed point of v <- a^2 v + r is r / (1 - a^2) = 1/(1 - r/4)",
                 rtol=1e-9)
    for r, T, gamma in [(0.1, 5, 2.0), (0.5, 3, 1.5), (0.05, 20, 3.0)]:
        sim = _simulate_ratio(r, T, gamma)
        tol = 5 * sim * math.sqrt(2 / 200_000)  # 5 standard errors of a sample variance
        assert_close(fn(r, T, gamma), sim, what=f"Var(x_T)/sigma^2, r={r}, T={T}, gamma={gamma} "
                     "(vs 200,000 simulated chains)",
                     hint="a = 1 - r/2 per step; v_T = a^(2T) v_0 + r (1 - a^(2T)) / (1 - a^2)",
                     atol=tol, rtol=0)


def variance_ratio_unbiased_limit(r, n_steps, gamma):
    a = 1 - r / 2
    return a ** (2 * n_steps) * (gamma**2 - 1) + 1  # forgot the O(r) bias of the fixed point


def variance_ratio_a_not_squared(r, n_steps, gamma):
    a = 1 - r / 2
    s_inf = 1 / (1 - r / 4)
    return a**n_steps * (gamma**2 - s_inf) + s_inf


# -- 7.4 denoising ---------------------------------------------------------------------------------
def check_denoise(fn):
    assert_close(fn(torch.tensor([[2.0]], dtype=F64), torch.tensor([[-1.0]], dtype=F64), 1.0),
                 torch.tensor([[1.0]], dtype=F64), what="the worked example", atol=1e-12)
    data = GaussianMixture.separated_modes()
    g = torch.Generator().manual_seed(3)
    for sigma in (0.5, 2.0):
        x = data.sample(200, g, dtype=F64) + sigma * torch.randn(200, 2, generator=g, dtype=F64)
        assert_close(fn(x, data.perturbed_score(x, sigma), sigma),
                     data.posterior_mean(x, sigma),
                     what=f"denoised mixture samples at sigma = {sigma} vs E[x_0 | x]",
                     hint="Tweedie: x + sigma^2 s(x)", rtol=1e-8, atol=1e-9)


def denoise_sigma_not_squared(x, score, sigma):
    return x + sigma * score


def denoise_half(x, score, sigma):
    return x + 0.5 * sigma**2 * score


# -- 7.5 number of levels --
def _count_levels(sigma_max, sigma_min, gamma):
    L, s = 1, sigma_max
    while s > sigma_min * (1 + 1e-9):
        s, L = s / gamma, L + 1
    return L


def check_num_levels(fn):
    for args in [(8.0, 1.0, 2.0), (8.0, 1.0, 1.9), (50.0, 0.01, 1.037), (20.0, 0.01, 2.3),
                 (1.0, 0.5, 3.0)]:
        got, want = fn(*args), _count_levels(*args)
        if got != want:
            raise AssertionError(f"levels for sigma_max, sigma_min, gamma = {args}: expected "
                                 f"{want}, got {got}. Hint: L - 1 = ceil(log(sigma_max / "
                                 f"sigma_min) / log(gamma)); count both ends")


def levels_floor(sigma_max, sigma_min, gamma):
    return 1 + int(math.log(sigma_max / sigma_min) / math.log(gamma))


def levels_without_endpoint(sigma_max, sigma_min, gamma):
    return math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)


test_reference_passes, test_wrong_answer_fails, test_your_answer = exercise_tests("07", [
    Exercise("exercise_overlap_criterion", check_overlap_criterion,
             [overlap_std_sigma, overlap_no_gamma_on_width]),
    Exercise("exercise_annealed_step_sizes", check_annealed_step_sizes,
             [steps_linear, steps_normalised_by_first]),
    Exercise("exercise_variance_ratio", check_variance_ratio,
             [variance_ratio_unbiased_limit, variance_ratio_a_not_squared]),
    Exercise("exercise_denoise", check_denoise, [denoise_sigma_not_squared, denoise_half]),
    Exercise("exercise_num_levels", check_num_levels, [levels_floor, levels_without_endpoint]),
])
