"""Checks for the exercises of 01_score_functions_basics.py.

Spoiler warning: the "wrong answers" below are near-solutions. Try the exercises first.

Each check compares an implementation with ground truth (autograd of the log-density, or the
GaussianMixture class) and explains what went wrong. ``exercise_tests`` turns the checks into
three tests: the reference passes, every wrong answer below fails, and your answer passes (or is
skipped while it still raises NotImplementedError).
"""

import math
import re

import pytest
import torch

from common.datasets import GaussianMixture
from common.exercises import Exercise, assert_close, exercise_tests

pytestmark = pytest.mark.ch01
F64 = torch.float64


def _solution():
    from common.modules import load_solutions

    return load_solutions("01")


def _autograd_score(log_prob, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_prob(x).sum(), x)
    return g


# -- 1.1 Student-t ------------------------------------------------------------------------------
def check_student_t_score(fn):
    x = torch.linspace(-10, 10, 41, dtype=F64)
    for nu in (1.0, 3.5, 30.0):
        expected = _autograd_score(lambda z: -(nu + 1) / 2 * torch.log1p(z**2 / nu), x)
        assert_close(fn(x, nu), expected, what=f"Student-t score with nu={nu} on [-10, 10]",
                     hint="differentiate -(nu+1)/2 * log(1 + x^2/nu); the result decays to 0 "
                          "far from the origin")


def gaussian_instead_of_t(x, nu):
    return -x


def missing_nu_plus_one(x, nu):
    return -x / (nu + x**2)


# -- 1.2 ring -----------------------------------------------------------------------------------
def check_ring_score(fn):
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=gen, dtype=F64)
    for radius, width in ((2.0, 0.5), (1.0, 0.3)):
        energy = lambda z: (z.norm(dim=1) - radius) ** 2 / (2 * width**2)
        expected = _autograd_score(lambda z: -energy(z), x)
        assert_close(fn(x, radius, width), expected,
                     what=f"ring score (radius={radius}, width={width}) at 64 random points",
                     hint="s = -(|x| - radius) / width^2 * x / |x|: it points towards the circle")


def ring_sign_flipped(x, radius, width):
    r = x.norm(dim=1, keepdim=True)
    return (r - radius) / width**2 * x / r


def ring_unit_vector_missing(x, radius, width):
    r = x.norm(dim=1, keepdim=True)
    return -(r - radius) / width**2 * x


# -- 1.3 mixture --------------------------------------------------------------------------------
def check_mixture_score(fn):
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], dtype=F64)
    std = 0.7
    gen = torch.Generator().manual_seed(1)
    mix = GaussianMixture.isotropic(weights, means, std)
    # First near the data, where every formula is finite: is the mixture score right?
    x = 2 * torch.randn(50, 2, generator=gen, dtype=F64)
    expected = mix.score(x)
    comp = -(x[:, None, :] - means[None]) / std**2  # (N, K, D) component scores
    assert_close(fn(x, weights, means, std), expected,
                 what="mixture score at 50 points near the data",
                 hint="each component's score -(x - mu_k) / std^2 enters with the probability "
                      "that x came from component k, which depends on x",
                 formula="s(x) = sum_k r_k(x) (-(x - mu_k) / std^2), "
                         "r_k(x) = w_k N(x; mu_k, std^2 I) / sum_j w_j N(x; mu_j, std^2 I)",
                 mistakes=[((weights[None, :, None] * comp).sum(1),
                            "you weighted the component scores by the prior weights w_k; "
                            "use the responsibilities r_k(x) (Bayes' rule), which change with x"),
                           (-expected, "the sign: the score points towards the means")],
                 rtol=1e-7, atol=1e-9)
    # Then far away (50+ std from every mean), where the densities underflow to 0.
    far = torch.tensor([[40.0, 0.0], [0.0, -45.0]], dtype=F64)
    assert_close(fn(far, weights, means, std), mix.score(far),
                 what="mixture score at 2 points 50+ std away from every component",
                 hint="your answer is right near the data; out here every N(x; mu_k, std^2 I) "
                      "underflows to 0 and r_k = 0/0. Compute r_k from LOG-densities with "
                      "torch.softmax(log w_k + log N_k, dim=1), which subtracts the largest "
                      "first and stays finite", rtol=1e-7, atol=1e-9)
    one = fn(x[:5], torch.ones(1, dtype=F64), means[:1], std)
    assert_close(one, -(x[:5] - means[0]) / std**2, what="one-component mixture",
                 hint="with K = 1 the score is -(x - mu) / std^2")


def prior_weights_instead_of_posterior(x, weights, means, std):
    comp = -(x[:, None, :] - means[None]) / std**2
    return (weights[None, :, None] * comp).sum(1)


def mixture_sign_flipped(x, weights, means, std):
    return -_solution().exercise_mixture_score(x, weights, means, std)


def naive_densities_underflow(x, weights, means, std):
    dens = weights * torch.exp(-0.5 * (x[:, None, :] - means[None]).square().sum(-1) / std**2)
    r = dens / dens.sum(1, keepdim=True)  # 0/0 = nan far from every component
    return (r[:, :, None] * (-(x[:, None, :] - means[None]) / std**2)).sum(1)


# -- 1.4 density from score ---------------------------------------------------------------------
def check_density_from_score(fn):
    x = torch.linspace(-8, 8, 2001, dtype=F64)
    mix = GaussianMixture.isotropic([0.3, 0.7], [[-2.0], [1.5]], [0.5, 0.8])
    s = mix.score(x[:, None])[:, 0]
    expected = mix.log_prob(x[:, None]).exp()
    assert_close(fn(s, x), expected, what="density recovered from the score of a 1D mixture",
                 hint="integrate the score cumulatively (trapezoid), exponentiate, and divide "
                      "by the integral so the result integrates to 1", rtol=1e-3, atol=1e-5)


def density_not_normalised(score_values, x_grid):
    dx = x_grid[1] - x_grid[0]
    inc = 0.5 * (score_values[1:] + score_values[:-1]) * dx
    return torch.exp(torch.cat([torch.zeros(1, dtype=x_grid.dtype), torch.cumsum(inc, 0)]))


def density_normalised_by_sum(score_values, x_grid):
    dx = x_grid[1] - x_grid[0]
    inc = 0.5 * (score_values[1:] + score_values[:-1]) * dx
    log_p = torch.cat([torch.zeros(1, dtype=x_grid.dtype), torch.cumsum(inc, 0)])
    p = torch.exp(log_p - log_p.max())
    return p / p.sum()  # a sum, not an integral: off by the factor dx


def density_sign_flipped(score_values, x_grid):
    dx = x_grid[1] - x_grid[0]
    inc = -0.5 * (score_values[1:] + score_values[:-1]) * dx
    log_p = torch.cat([torch.zeros(1, dtype=x_grid.dtype), torch.cumsum(inc, 0)])
    p = torch.exp(log_p - log_p.max())
    return p / torch.trapezoid(p, x_grid)


# -- 1.5 product of Gaussians -------------------------------------------------------------------
def check_product_of_gaussians(fn):
    m1, c1 = torch.tensor([0.0]), torch.tensor([[1.0]])
    m2, c2 = torch.tensor([2.0]), torch.tensor([[1.0]])
    mean, cov = fn(m1.double(), c1.double(), m2.double(), c2.double())
    assert_close(mean, torch.tensor([1.0]), what="mean of N(0,1) * N(2,1)",
                 hint="the precision-weighted average of the two means")
    assert_close(cov, torch.tensor([[0.5]]), what="covariance of N(0,1) * N(2,1)",
                 hint="precisions add: 1/1 + 1/1 = 2, so the variance is 1/2")
    gen = torch.Generator().manual_seed(2)
    A, B = (torch.randn(2, 3, 3, generator=gen, dtype=F64)).unbind()
    c1, c2 = A @ A.T + 0.5 * torch.eye(3, dtype=F64), B @ B.T + 0.5 * torch.eye(3, dtype=F64)
    m1, m2 = torch.randn(2, 3, generator=gen, dtype=F64).unbind()
    mean, cov = fn(m1, c1, m2, c2)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    score_sum = -torch.linalg.solve(c1, (x - m1).T).T - torch.linalg.solve(c2, (x - m2).T).T
    assert_close(-torch.linalg.solve(cov, (x - mean).T).T, score_sum,
                 what="score of the returned Gaussian vs s1(x) + s2(x) at 20 points (3D)",
                 hint="match -Sigma^{-1}(x - mu) with -(P1 + P2) x + P1 mu1 + P2 mu2")


def product_adds_covariances(mean1, cov1, mean2, cov2):
    return (mean1 + mean2) / 2, cov1 + cov2


def product_averages_means(mean1, cov1, mean2, cov2):
    p1, p2 = torch.linalg.inv(cov1), torch.linalg.inv(cov2)
    return (mean1 + mean2) / 2, torch.linalg.inv(p1 + p2)


EXERCISES = [
    Exercise("exercise_student_t_score", check_student_t_score,
             [gaussian_instead_of_t, missing_nu_plus_one]),
    Exercise("exercise_ring_score", check_ring_score,
             [ring_sign_flipped, ring_unit_vector_missing]),
    Exercise("exercise_mixture_score", check_mixture_score,
             [prior_weights_instead_of_posterior, naive_densities_underflow,
              mixture_sign_flipped]),
    Exercise("exercise_density_from_score", check_density_from_score,
             [density_not_normalised, density_sign_flipped, density_normalised_by_sum]),
    Exercise("exercise_product_of_gaussians", check_product_of_gaussians,
             [product_adds_covariances, product_averages_means]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("01", EXERCISES)


def test_examples_in_docstrings_hold():
    """The worked examples quoted in the stubs' docstrings, computed with the reference."""
    from common.modules import load_solutions

    sol = load_solutions("01")
    assert sol.exercise_student_t_score(torch.tensor([2.0]), 4.0).item() == pytest.approx(-1.25)
    s = sol.exercise_ring_score(torch.tensor([[3.0, 0.0]]), 2.0, 0.5)
    torch.testing.assert_close(s, torch.tensor([[-4.0, 0.0]]))
    x = torch.linspace(-8, 8, 1601, dtype=F64)
    p = sol.exercise_density_from_score(-x, x)
    torch.testing.assert_close(p, torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi), rtol=1e-4,
                               atol=1e-6)


# -- what a failing check tells the learner (the checks' messages are part of the exercise) -----
def _message(check, wrong):
    with pytest.raises(AssertionError) as info:
        check(wrong)
    return str(info.value)


def test_mixture_hint_matches_the_mistake(monkeypatch):
    """1.3: prior weights are named as such; an answer that only fails far away is told about
    underflow, not sent back to the posterior it already uses; no formula unless asked."""
    monkeypatch.delenv("SBGM_SHOW_SOLUTION", raising=False)
    prior = _message(check_mixture_score, prior_weights_instead_of_posterior)
    assert "prior weights w_k" in prior and "r_k(x) = w_k N" not in prior
    sign = _message(check_mixture_score, mixture_sign_flipped)
    assert "the sign" in sign
    underflow = _message(check_mixture_score, naive_densities_underflow)
    assert "50+ std away" in underflow and "NaN" in underflow and "LOG-densities" in underflow
    assert "prior weights" not in underflow
    monkeypatch.setenv("SBGM_SHOW_SOLUTION", "1")
    assert "r_k(x) = w_k N" in _message(check_mixture_score, prior_weights_instead_of_posterior)


def test_density_message_shows_where_it_is_wrong():
    """1.4: the message lists the worst grid points (near the modes at x = -2 and 1.5, indices
    ~750 and ~1190 of 2,001), not the first 8, which are ~0 in both answers."""
    message = _message(check_density_from_score, density_normalised_by_sum)
    assert "the 5 worst of 2001 entries" in message
    indices = [int(i) for i in re.findall(r"index \((\d+),\): expected", message)]
    assert len(indices) == 5 and all(500 < i < 1500 for i in indices), indices
