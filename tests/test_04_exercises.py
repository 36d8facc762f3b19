"""Checks for the exercises of 04_denoising_score_matching.py.

Each check compares an implementation with ground truth (the exact perturbed scores and
posterior means of common.datasets.GaussianMixture, a closed-form loss, or a closed-form
probability) and explains what went wrong. ``exercise_tests`` turns the checks into three
tests: the reference passes, every wrong answer below fails, and your answer passes (or is
skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.exercises import Exercise, assert_close, call_checked, exercise_tests
from common.modules import load_module
from common.plotting import grid_points

pytestmark = pytest.mark.ch04
F64 = torch.float64


def _spd(gen, D):
    A = torch.randn(D, D, generator=gen, dtype=F64)
    return A @ A.T + 0.3 * torch.eye(D, dtype=F64)


def _mixture():
    """A 2D mixture with full covariances (the one of module 04)."""
    return load_module("04").triangle_mixture_2d()


# -- 4.1 perturbed Gaussian score -------------------------------------------------------------
def check_perturbed_gaussian_score(fn):
    gen = torch.Generator().manual_seed(0)
    for D in (2, 3):
        mean, cov = torch.randn(D, generator=gen, dtype=F64), _spd(gen, D)
        x = 2 * torch.randn(40, D, generator=gen, dtype=F64)
        for sigma in (0.3, 1.5):
            expected = GaussianMixture([1.0], mean[None], cov[None]).perturbed_score(x, sigma)
            what = f"perturbed score of a {D}D Gaussian, sigma={sigma}"
            got = call_checked(fn, x, mean, cov, sigma, what=what,
                               hint="x holds one point per ROW; the (D, D) matrix acts on each "
                                    "row, so solve against (x - mean).T and transpose back")
            assert_close(got, expected, what=what,
                         hint="x~ = x + sigma z is a sum of two independent Gaussians: what "
                              "is its covariance? Then use the Gaussian score of module 01",
                         formula="s_sigma(x~) = -(cov + sigma^2 I)^{-1} (x~ - mean)",
                         mistakes=[(perturbed_score_without_noise(x, mean, cov, sigma),
                                    "this is the score of the clean Gaussian: the noise "
                                    "sigma z adds to the covariance"),
                                   (perturbed_score_sigma_not_squared(x, mean, cov, sigma),
                                    "sigma enters the covariance as a variance, sigma^2"),
                                   (-expected, "the sign: the score points towards the mean")],
                         rtol=1e-8, atol=1e-10)


def perturbed_score_without_noise(x, mean, cov, sigma):
    return -torch.linalg.solve(cov, (x - mean).T).T


def perturbed_score_not_transposed(x, mean, cov, sigma):
    """Solves against (x - mean) of shape (N, D) as if it were (D, N): a shape error."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    return -torch.linalg.solve(cov + sigma**2 * eye, x - mean)


def perturbed_score_sigma_not_squared(x, mean, cov, sigma):
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    return -torch.linalg.solve(cov + sigma * eye, (x - mean).T).T


# -- 4.2 scaled DSM loss ----------------------------------------------------------------------
def _model_score(x):
    """A fixed nonlinear stand-in for a network."""
    return -x + 0.4 * torch.sin(2 * x.flip(1)) - 0.1


def check_scaled_dsm_loss(fn):
    gen = torch.Generator().manual_seed(1)
    x0 = _mixture().sample(300, gen, dtype=F64)
    z = torch.randn(300, 2, generator=gen, dtype=F64)
    for scale, sigma in ((1.0, 0.5), (0.6, 0.8), (0.95, 0.1)):
        x_noisy = scale * x0 + sigma * z
        target = -(x_noisy - scale * x0) / sigma**2  # grad log N(x~; scale x0, sigma^2 I)
        expected = 0.5 * (sigma**2 * (_model_score(x_noisy) - target).square().sum(1)).mean()
        got = fn(_model_score, x0, scale, sigma, z)
        assert_close(got, expected, what=f"scaled DSM loss (scale={scale}, sigma={sigma})",
                     hint="evaluate the score at x~ = scale * x0 + sigma * z; the weighted "
                          "residual is sigma * s(x~) + z; average 1/2 |residual|^2 over the "
                          "batch", rtol=1e-10, atol=1e-12)
    # for scale = 1 it is the module's dsm_loss_sigma2
    m = load_module("04")
    assert_close(fn(_model_score, x0, 1.0, 0.3, z),
                 m.dsm_loss_sigma2(_model_score, x0, 0.3, noise=z),
                 what="scale = 1 against dsm_loss_sigma2 of Section 3.1", rtol=1e-10, atol=1e-12)


def scaled_dsm_forgets_scale(score_fn, x0, scale, sigma, noise):
    return 0.5 * (sigma * score_fn(x0 + sigma * noise) + noise).square().sum(1).mean()


def scaled_dsm_unweighted(score_fn, x0, scale, sigma, noise):
    return 0.5 * (score_fn(scale * x0 + sigma * noise) + noise / sigma).square().sum(1).mean()


def scaled_dsm_sign_error(score_fn, x0, scale, sigma, noise):
    return 0.5 * (sigma * score_fn(scale * x0 + sigma * noise) - noise).square().sum(1).mean()


# -- 4.3 scaled Tweedie -----------------------------------------------------------------------
def check_scaled_tweedie(fn):
    gen = torch.Generator().manual_seed(2)
    mix = _mixture()
    for scale, sigma in ((1.0, 0.4), (0.7, 0.5), (0.3, 0.95)):
        x_noisy = mix.perturbed(sigma, scale).sample(200, gen, dtype=F64)
        expected = mix.posterior_mean(x_noisy, sigma, scale)  # Gaussian conditioning
        got = fn(lambda x: mix.perturbed_score(x, sigma, scale), x_noisy, scale, sigma)
        assert_close(got, expected, what=f"E[x0 | x~] for x~ = {scale} x0 + {sigma} z",
                     hint="Tweedie's formula gives the posterior mean of whatever was "
                          "noised, and here that is not x0 itself; try the docstring's point "
                          "mass by hand",
                     rtol=1e-8, atol=1e-10)


def scaled_tweedie_forgets_division(score_fn, x_noisy, scale, sigma):
    return x_noisy + sigma**2 * score_fn(x_noisy)


def scaled_tweedie_sigma_not_squared(score_fn, x_noisy, scale, sigma):
    return (x_noisy + sigma * score_fn(x_noisy)) / scale


# -- 4.4 noise prediction ---------------------------------------------------------------------
def check_noise_prediction(fn):
    gen = torch.Generator().manual_seed(3)
    mix = _mixture()
    for sigma in (0.1, 0.5, 2.0):
        x_noisy = mix.perturbed(sigma).sample(200, gen, dtype=F64)
        expected = (x_noisy - mix.posterior_mean(x_noisy, sigma)) / sigma  # E[z | x~]
        got = fn(lambda x: mix.perturbed_score(x, sigma), x_noisy, sigma)
        assert_close(got, expected, what=f"E[z | x~] at sigma={sigma}",
                     hint="E[z | x~] = (x~ - E[x0 | x~]) / sigma and Tweedie gives E[x0 | x~]",
                     rtol=1e-8, atol=1e-10)


def noise_prediction_divides_by_sigma(score_fn, x_noisy, sigma):
    return -score_fn(x_noisy) / sigma


def noise_prediction_sign_error(score_fn, x_noisy, sigma):
    return sigma * score_fn(x_noisy)


# -- 4.5 mass of a highest-density region -----------------------------------------------------
def check_hdr_mass(fn):
    X, _, pts = grid_points((-8, 8), (-8, 8), 801)
    area = (X[0, 1] - X[0, 0]) ** 2
    log_p = -math.log(2 * math.pi) - 0.5 * pts.square().sum(1)  # standard 2D Gaussian
    for r in (1.0, 2.0, 3.0):
        log_c = -math.log(2 * math.pi) - r**2 / 2
        got = fn(log_p, float(area), log_c)
        assert_close(got, 1 - math.exp(-r**2 / 2),
                     what=f"mass of the disc |x| <= {r} under the standard 2D Gaussian",
                     hint="sum exp(log p) over the grid points with log p >= log c, times the "
                          "cell area", rtol=0, atol=2e-3)
    # the module's 99% region, found from a quantile of samples, holds 99% of the mass
    m = load_module("04")
    gen = torch.Generator().manual_seed(4)
    perturbed = _mixture().perturbed(0.2)
    log_c = m.hdr_log_threshold(perturbed.log_prob(perturbed.sample(100_000, gen, dtype=F64)))
    X, _, pts = grid_points((-6, 6), (-6, 6), 601)
    area = float((X[0, 1] - X[0, 0]) ** 2)
    assert_close(fn(perturbed.log_prob(pts), area, log_c), 0.99,
                 what="mass of module 04's 99% highest-density region at sigma = 0.2",
                 hint="only points inside the region (log p >= log c) count", rtol=0, atol=3e-3)


def hdr_mass_without_cell_area(log_p_grid, cell_area, log_c):
    return log_p_grid[log_p_grid >= log_c].exp().sum().item()


def hdr_mass_of_the_outside(log_p_grid, cell_area, log_c):
    return (log_p_grid[log_p_grid < log_c].exp().sum() * cell_area).item()


EXERCISES = [
    Exercise("exercise_perturbed_gaussian_score", check_perturbed_gaussian_score,
             [perturbed_score_without_noise, perturbed_score_sigma_not_squared,
              perturbed_score_not_transposed]),
    Exercise("exercise_scaled_dsm_loss", check_scaled_dsm_loss,
             [scaled_dsm_forgets_scale, scaled_dsm_unweighted, scaled_dsm_sign_error]),
    Exercise("exercise_scaled_tweedie", check_scaled_tweedie,
             [scaled_tweedie_forgets_division, scaled_tweedie_sigma_not_squared]),
    Exercise("exercise_noise_prediction", check_noise_prediction,
             [noise_prediction_divides_by_sigma, noise_prediction_sign_error]),
    Exercise("exercise_hdr_mass", check_hdr_mass,
             [hdr_mass_without_cell_area, hdr_mass_of_the_outside]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("04", EXERCISES)


def test_examples_in_docstrings_hold():
    """The worked examples quoted in the stubs' docstrings, computed with the reference."""
    from common.modules import load_solutions

    sol = load_solutions("04")
    s = sol.exercise_perturbed_gaussian_score(torch.tensor([[2.0, 0.0]], dtype=F64),
                                              torch.zeros(2, dtype=F64),
                                              torch.eye(2, dtype=F64), 1.0)
    torch.testing.assert_close(s, torch.tensor([[-1.0, 0.0]], dtype=F64))
    x = torch.randn(5, 2, dtype=F64)
    # 4.3: point mass at m = (1, 2), scale 0.5, sigma 1: the answer is m for every x~, and the
    # example tells the right answer from the wrong ones (forgetting or multiplying the scale)
    mass, scale = torch.tensor([1.0, 2.0], dtype=F64), 0.5
    score = lambda y: -(y - scale * mass) / 1.0**2  # noqa: E731
    torch.testing.assert_close(sol.exercise_scaled_tweedie(score, x, scale, 1.0),
                               mass.expand(5, 2))
    no_division = scaled_tweedie_forgets_division(score, x, scale, 1.0)
    assert not torch.allclose(no_division, mass.expand(5, 2))
    assert not torch.allclose(no_division * scale, mass.expand(5, 2))  # multiplied instead
    torch.testing.assert_close(sol.exercise_noise_prediction(lambda y: -y / 4, x, 2.0), x / 2)


def test_perturbed_score_messages(monkeypatch):
    """4.1: a transposed solve is reported as a shape problem, not a raw RuntimeError; a known
    mistake is named; the formula is shown only with SBGM_SHOW_SOLUTION=1."""
    monkeypatch.delenv("SBGM_SHOW_SOLUTION", raising=False)
    with pytest.raises(AssertionError) as info:
        check_perturbed_gaussian_score(perturbed_score_not_transposed)
    assert "raised RuntimeError" in str(info.value) and "one point per ROW" in str(info.value)
    with pytest.raises(AssertionError) as info:
        check_perturbed_gaussian_score(perturbed_score_without_noise)
    message = str(info.value)
    assert "score of the clean Gaussian" in message and "(cov + sigma^2 I)^{-1}" not in message
    monkeypatch.setenv("SBGM_SHOW_SOLUTION", "1")
    with pytest.raises(AssertionError, match=r"formula: s_sigma\(x~\) = -\(cov \+ sigma\^2"):
        check_perturbed_gaussian_score(perturbed_score_sigma_not_squared)
