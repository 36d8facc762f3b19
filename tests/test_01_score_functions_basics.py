"""Tests of module 01's teaching code: every equation it states, checked numerically."""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.modules import load_module

pytestmark = pytest.mark.ch01
m = load_module("01")
F64 = torch.float64


def _spd(gen, D):
    A = torch.randn(D, D, generator=gen, dtype=F64)
    return A @ A.T + 0.5 * torch.eye(D, dtype=F64)


def test_gaussian_log_prob_matches_torch(gen):
    mean, cov = torch.randn(3, generator=gen, dtype=F64), _spd(gen, 3)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    ref = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    torch.testing.assert_close(m.gaussian_log_prob(x, mean, cov), ref)


@pytest.mark.parametrize("D", [1, 2, 5])
def test_gaussian_score_is_autograd_of_log_prob(gen, D):
    """s(x) = -Sigma^{-1}(x - mu), full covariance, and the 1D form -(x - mu)/sigma^2."""
    mean, cov = torch.randn(D, generator=gen, dtype=F64), _spd(gen, D)
    x = 3 * torch.randn(30, D, generator=gen, dtype=F64)
    auto = m.autograd_score(lambda z: m.gaussian_log_prob(z, mean, cov), x)
    torch.testing.assert_close(m.gaussian_score(x, mean, cov), auto)
    if D == 1:
        torch.testing.assert_close(auto, -(x - mean) / cov[0, 0])


def test_mixture_score_is_posterior_weighted_component_scores(gen):
    """s(x) = sum_k r_k(x) s_k(x), assembled by hand from module 01's gaussian_score."""
    mix = m.example_mixture_2d()
    x = 3 * torch.randn(40, 2, generator=gen, dtype=F64)
    r = torch.softmax(torch.stack([w.log() + m.gaussian_log_prob(x, mu, c) for w, mu, c in
                                   zip(mix.weights, mix.means, mix.covs)], dim=1), dim=1)
    by_hand = sum(r[:, k, None] * m.gaussian_score(x, mix.means[k], mix.covs[k])
                  for k in range(mix.n_components))
    torch.testing.assert_close(by_hand, mix.score(x))
    torch.testing.assert_close(mix.score(x), m.autograd_score(mix.log_prob, x))


def test_banana_score_is_minus_grad_energy(gen):
    x = 2 * torch.randn(50, 2, generator=gen, dtype=F64)
    for kappa in (0.0, 0.5, 1.3):
        auto = m.autograd_score(lambda z: -m.banana_energy(z, kappa), x)
        torch.testing.assert_close(m.banana_score(x, kappa), auto)


def test_banana_normaliser_is_two_pi():
    """Z = integral of exp(-E) = 2 pi (x1 ~ N(0,1), x2 | x1 ~ N(kappa x1^2, 1)), by quadrature."""
    from scipy import integrate

    def inner(x1):
        return integrate.quad(lambda x2: math.exp(-m.banana_energy(
            torch.tensor([[x1, x2]], dtype=F64)).item()), -20, 60)[0]

    Z, _ = integrate.quad(inner, -10, 10, limit=100)
    assert Z == pytest.approx(2 * math.pi, rel=1e-6)


def test_score_is_invariant_to_the_normaliser(gen):
    """grad log(exp(-E)/Z) = grad(-E) for any constant Z: the score never sees Z."""
    x = 2 * torch.randn(50, 2, generator=gen, dtype=F64)
    s_unnorm = m.autograd_score(lambda z: -m.banana_energy(z), x)
    for log_z in (0.0, math.log(2 * math.pi), 123.4):
        s = m.autograd_score(lambda z, c=log_z: -m.banana_energy(z) - c, x)
        torch.testing.assert_close(s, s_unnorm, rtol=0, atol=0)
    torch.testing.assert_close(m.autograd_score(m.banana_log_prob, x), m.banana_score(x))


def test_affine_score_matches_pushed_forward_density(gen):
    """s_Y(y) = A^{-T} s_X(A^{-1}(y - b)) against the exact density of y = A x + b."""
    mix = m.example_mixture_2d()
    A = torch.randn(2, 2, generator=gen, dtype=F64) + 2 * torch.eye(2, dtype=F64)
    b = torch.randn(2, generator=gen, dtype=F64)
    y = 3 * torch.randn(40, 2, generator=gen, dtype=F64)
    pushed = m.affine_mixture(mix, A, b)
    torch.testing.assert_close(m.affine_score(mix.score, A, b)(y), pushed.score(y))
    # the transpose matters: A^{-1} in its place gives a different field for non-symmetric A
    wrong = torch.linalg.solve(A, mix.score(torch.linalg.solve(A, (y - b).T).T).T).T
    assert (wrong - pushed.score(y)).abs().max() > 1e-2


def test_affine_mixture_matches_simulation(gen):
    mix = m.example_mixture_2d()
    x = mix.sample(100_000, gen, dtype=F64)
    y = x @ m.AFFINE_A.T + m.AFFINE_B
    pushed = m.affine_mixture(mix, m.AFFINE_A, m.AFFINE_B)
    torch.testing.assert_close(y.mean(0), pushed.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), pushed.covariance(), atol=0.03, rtol=0.02)


def test_tempered_score_is_beta_times_score(gen):
    mix = m.example_mixture_1d()
    x = 3 * torch.randn(40, 1, generator=gen, dtype=F64)
    for beta in (0.3, 2.0):
        auto = m.autograd_score(lambda z: beta * mix.log_prob(z), x)
        torch.testing.assert_close(m.tempered_score(mix.score, beta)(x), auto)


def test_score_moments_mean_zero_and_fisher_information(gen):
    """E_p[s] = 0 and E_p[s s^T] = Sigma^{-1}, within 5 Monte Carlo standard errors."""
    mean, cov = torch.tensor([0.5, -1.0, 2.0], dtype=F64), _spd(gen, 3)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((200_000,))
    mom = m.score_moments(lambda z: m.gaussian_score(z, mean, cov), x)
    assert (mom["mean"].abs() < 5 * mom["mean_se"]).all(), mom["mean"]
    err = (mom["second_moment"] - torch.linalg.inv(cov)).abs()
    assert (err < 5 * mom["second_moment_se"]).all(), err
    # the check can fail: Sigma (instead of Sigma^{-1}) is many standard errors away
    assert ((mom["second_moment"] - cov).abs() > 5 * mom["second_moment_se"]).any()


def test_banana_fisher_information_is_minus_expected_hessian(gen):
    """Non-Gaussian case: E[s s^T] = -E[Hessian log p] = diag(1 + 4 kappa^2, 1)."""
    kappa = 0.7
    x = m.banana_sample(200_000, kappa, gen)
    mom = m.score_moments(lambda z: m.banana_score(z, kappa), x)
    exact = torch.diag(torch.tensor([1 + 4 * kappa**2, 1.0], dtype=F64))
    assert ((mom["second_moment"] - exact).abs() < 5 * mom["second_moment_se"]).all()
    # -E[Hessian] by autograd on a subsample agrees with the same closed form
    hess = torch.func.vmap(torch.func.hessian(
        lambda z: m.banana_log_prob(z[None], kappa)[0]))(x[:20_000])
    torch.testing.assert_close(-hess.mean(0), exact, atol=0.06, rtol=0)
    # and E[s] = 0
    assert (mom["mean"].abs() < 5 * mom["mean_se"]).all()


def test_banana_sampler_matches_density(gen):
    """Exact sampler: the histogram of x2 - kappa x1^2 is N(0, 1), of x1 is N(0, 1)."""
    x = m.banana_sample(100_000, 0.5, gen)
    resid = x[:, 1] - 0.5 * x[:, 0] ** 2
    for v in (x[:, 0], resid):
        assert abs(v.mean()) < 0.02 and abs(v.std() - 1) < 0.02


def test_mixture_score_moments_mean_zero(gen):
    """E_p[s] = 0 holds for any smooth density, e.g. the 3-component mixture."""
    mix = m.example_mixture_2d()
    mom = m.score_moments(mix.score, mix.sample(200_000, gen, dtype=F64))
    assert (mom["mean"].abs() < 5 * mom["mean_se"]).all(), mom["mean"]


def test_quick_run_writes_all_figures(quick_run):
    run = quick_run("01")
    results = run.result
    names = {p.name for p in (run.outdir / m.MODULE).glob("*.png")}
    assert names == {"densities_and_scores_1d.png", "score_fields_2d.png",
                     "normalised_vs_unnormalised.png", "score_magnitude.png",
                     "affine_and_tempering.png", "score_moments.png"}
    assert results["Z_numerical"] == pytest.approx(2 * math.pi, rel=1e-4)
    assert results["banana_dev"] < 5 and results["fisher_dev"] < 5
    for key in ("1d_autograd_error", "gaussian_autograd_error", "mixture_autograd_error",
                "banana_autograd_error", "affine_error", "tempering_error"):
        assert results[key] < 1e-10, key
    # The prose of Section 4.5 quotes these shares of the heavier bump (grid integrals, so the
    # same in --quick and default runs): the mixture weight at beta = 1, about 0.83 at beta = 3.
    mass = results["heavy_mass"]
    assert mass[1.0] == pytest.approx(0.70, abs=2e-3)
    assert mass[3.0] == pytest.approx(0.83, abs=5e-3)
    assert 0.5 < mass[0.3] < 0.70


def test_gaussian_mixture_from_common_is_the_same_model():
    """A one-component GaussianMixture is the Gaussian of Section 3.2."""
    mean, cov = m.GAUSS_MEAN, m.GAUSS_COV
    g = GaussianMixture([1.0], mean[None], cov[None])
    x = torch.randn(10, 2, dtype=F64)
    torch.testing.assert_close(g.log_prob(x), m.gaussian_log_prob(x, mean, cov))
    torch.testing.assert_close(g.score(x), m.gaussian_score(x, mean, cov))
