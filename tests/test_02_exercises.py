"""Checks for the exercises of 02_score_matching_theory.py.

Each check compares an implementation with ground truth that does not reuse the answer's own
formula: autograd (the module's generic ISM loss, Hessians of exact log-densities), the DSM
loss computed from its definition by double quadrature, the binomial formula for Gaussian
moments, and exact central differences of a cubic. ``exercise_tests`` turns the checks into
three tests: the reference passes, every wrong answer below fails, and your answer passes (or
is skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module, load_solutions

pytestmark = pytest.mark.ch02
F64 = torch.float64
m = load_module("02")


def _solution(name):
    return getattr(load_solutions("02"), name)


# -- 2.1 ISM objective of the cubic score model ---------------------------------------------------
def check_cubic_ism_objective(fn):
    got = fn(torch.tensor([[0.0], [2.0]], dtype=F64), 1.0, torch.tensor([1.0], dtype=F64))
    assert_close(got, torch.tensor(-2.5, dtype=F64),
                 what="the worked example x = [[0], [2]], a = 1, b = [1]",
                 hint="at both points x - b = +-1: d s / d x = ?, and 1/2 s^2 = 1/2",
                 rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for D, a in ((1, 0.7), (2, 1.3), (4, 0.4)):
        x = 1.2 * torch.randn(60, D, generator=gen, dtype=F64) + 0.5
        b = torch.randn(D, generator=gen, dtype=F64)

        def score(z, a=a, b=b):
            return -a * (z - b) ** 3

        # Ground truth: the generic ISM loss, with the Jacobian trace taken by autograd.
        expected = m.ism_loss(score, x, create_graph=False)
        assert_close(fn(x, a, b), expected, what=f"J_ISM of s = -a (x - b)^3 in D = {D}, a = {a}",
                     hint="d s_i / d x_i = -3 a (x_i - b_i)^2 (the power rule), summed over i; "
                          "|s|^2 sums the squares of the D entries; then average over samples",
                     rtol=1e-10, atol=1e-12)


def cubic_trace_sign_flipped(x, a, b):
    u = x - b
    return (3 * a * u.square().sum(1) + 0.5 * a**2 * (u**3).square().sum(1)).mean()


def cubic_trace_missing_factor_3(x, a, b):
    u = x - b
    return (-a * u.square().sum(1) + 0.5 * a**2 * (u**3).square().sum(1)).mean()


def cubic_square_of_the_sum(x, a, b):
    u = x - b  # |s|^2 taken as (sum_i s_i)^2: right in D = 1 only
    return (-3 * a * u.square().sum(1) + 0.5 * a**2 * (u**3).sum(1).square()).mean()


# -- 2.2 polynomial energy -----------------------------------------------------------------------
def check_fit_polynomial_energy(fn):
    x = torch.tensor([-1.0, 1.0], dtype=F64)
    assert_close(fn(x, (2,)), torch.tensor([0.5], dtype=F64), what="the worked example",
                 hint="theta = 1 / (2 avg_n x_n^2)", rtol=1e-10, atol=1e-12)
    # A sample exactly at x = 0 with a linear term (n = 1): psi'' = n (n - 1) x^(n - 2) must be
    # 0 there, but computed literally it is 0 * 0^(-1) = 0 * inf = NaN in floating point.
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=F64)
    S = ((x - x.mean()) ** 2).mean()
    assert_close(fn(x, (2, 1)), torch.stack([1 / (2 * S), -x.mean() / S]),
                 what="powers (2, 1) on samples that include x = 0",
                 hint="for n_k = 1, n_k (n_k - 1) x^(n_k - 2) is 0 * 0^(-1) = 0 * inf = NaN at "
                      "x = 0 in floating point; psi'' of x^1 is simply 0, so build that column "
                      "as zeros (and never compute x^(-1))", rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    # Gaussian data, E = theta_1 x^2 + theta_2 x: the ISM solution is exactly
    # theta_1 = 1 / (2 S), theta_2 = -x_bar / S with S the biased sample variance.
    x = 1.3 + 0.7 * torch.randn(500, generator=gen, dtype=F64)
    S = ((x - x.mean()) ** 2).mean()
    assert_close(fn(x, (2, 1)), torch.stack([1 / (2 * S), -x.mean() / S]),
                 what="powers (2, 1) on Gaussian samples",
                 hint="for a Gaussian, score matching gives the moment estimates: "
                      "E = (x - x_bar)^2 / (2 S) + const", rtol=1e-8, atol=1e-10)
    # The quartic of Section 4.3, against the module's closed-form solver.
    theta_true = torch.tensor(m.QUARTIC_THETA, dtype=F64)
    x = m.sample_by_inverse_cdf(lambda z: -m.quartic_energy(z, theta_true), -5, 5, 2000, gen)
    expected = m.exp_family_ism_solution(*m.quartic_features(x))
    assert_close(fn(x, (4, 2, 1)), expected, what="powers (4, 2, 1) on quartic samples",
                 hint="psi'' of x^4 is 12 x^2, of x^2 is 2, of x is 0", rtol=1e-8, atol=1e-10)


def fit_sign_flipped(x, powers):
    return -_solution("exercise_fit_polynomial_energy")(x, powers)


def fit_literal_formula_nan_at_zero(x, powers):
    """Right everywhere except at x = 0, where n (n - 1) x^(n - 2) = 0 * inf for n = 1."""
    dpsi = torch.stack([n * x ** (n - 1) for n in powers], dim=1)
    d2psi = torch.stack([n * (n - 1) * x ** (n - 2) for n in powers], dim=1)
    return torch.linalg.solve(dpsi.T @ dpsi / len(x), d2psi.mean(0))


def fit_missing_n_minus_one(x, powers):
    dpsi = torch.stack([n * x ** (n - 1) for n in powers], dim=1)
    d2psi = torch.stack([n * x ** (n - 2) for n in powers], dim=1)  # forgot the (n - 1)
    return torch.linalg.solve(dpsi.T @ dpsi / len(x), d2psi.mean(0))


# -- 2.3 DSM constant for N(m, Sigma) -----------------------------------------------------------
def _as_number(got, what):
    if isinstance(got, (float, int)) or (torch.is_tensor(got) and got.numel() == 1):
        return float(got)
    raise AssertionError(f"{what}: expected a number, got {type(got).__name__}")


def _c_sigma_by_quadrature(s0, sigma):
    """1D data N(0.3, s0^2): C_sigma = J_DSM of the perfect model grad log p_sigma (where
    J_ESM,sigma = 0), with J_DSM computed from its definition by double quadrature."""
    p = GaussianMixture([1.0], [[0.3]], [[[s0**2]]])
    x, _ = m.grid_1d(p, sigma, 1201)
    return m.dsm_loss_on_grid(p.perturbed(sigma).score, x, m.dsm_grid_moments(p, x, sigma)).item()


def _c_sigma_by_hessian(mean, cov, sigma):
    """C_sigma = D/(2 sigma^2) - 1/2 E|grad log p_sigma|^2 = D/(2 sigma^2) + 1/2 E tr H, with H
    the Hessian of log p_sigma (module 01, Section 2.8). p_sigma is common.datasets' exactly
    perturbed Gaussian, whose Hessian (by autograd) is the same at every point."""
    p_sigma = GaussianMixture([1.0], [mean.tolist()], [cov.tolist()]).perturbed(sigma)
    H = torch.autograd.functional.hessian(lambda v: p_sigma.log_prob(v[None])[0],
                                          mean.to(F64) + 0.1)
    return len(mean) / (2 * sigma**2) + 0.5 * torch.trace(H).item()


def check_dsm_constant_gaussian(fn):
    got = _as_number(fn(1.0, torch.tensor([[1.0]], dtype=F64)), "the worked example")
    assert_close(got, 0.25, what="the worked example D = 1, Sigma = [[1]], sigma = 1",
                 hint="what is the law of x + sigma z?", rtol=1e-10, atol=1e-12)
    for s0, sigma in ((0.9, 0.5), (0.5, 2.0)):
        got = _as_number(fn(sigma, torch.tensor([[s0**2]], dtype=F64)), "1D case")
        assert_close(got, _c_sigma_by_quadrature(s0, sigma),
                     what=f"C_sigma for 1D data N(m, {s0}^2), sigma = {sigma} (ground truth: "
                          "the DSM loss of the perfect model, by double quadrature)",
                     hint="p_sigma is Gaussian too; what is its variance?", rtol=1e-8, atol=1e-10)
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(4, 4, generator=gen, dtype=F64)
    cases = [(0.3, torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)),  # strongly correlated
             (1.0, torch.tensor([[4.0, -0.3, 0.0], [-0.3, 0.2, 0.05], [0.0, 0.05, 1.0]],
                                dtype=F64)),  # very anisotropic
             (0.1, B @ B.T + 0.1 * torch.eye(4, dtype=F64))]
    for sigma, cov in cases:
        D = len(cov)
        mean = torch.linspace(-1, 1, D, dtype=F64)
        got = _as_number(fn(sigma, cov), f"D = {D}")
        assert_close(got, _c_sigma_by_hessian(mean, cov, sigma),
                     what=f"C_sigma for N(m, Sigma) in D = {D}, sigma = {sigma}",
                     hint="p_sigma = N(m, ?); E|grad log N(m, V)|^2 = tr(V^{-1}), which needs "
                          "the whole matrix, not just its diagonal", rtol=1e-8, atol=1e-10)


def dsm_constant_forgot_noise_in_p_sigma(sigma, cov):
    return len(cov) / (2 * sigma**2) - 0.5 * torch.trace(torch.linalg.inv(cov)).item()


def dsm_constant_diagonal_only(sigma, cov):
    return len(cov) / (2 * sigma**2) - 0.5 * (1 / (cov.diagonal() + sigma**2)).sum().item()


def dsm_constant_isotropic_average(sigma, cov):
    D = len(cov)
    v = torch.trace(cov).item() / D  # replaces Sigma by (tr Sigma / D) I
    return D / (2 * sigma**2) - D / (2 * (v + sigma**2))


def dsm_constant_wrong_sign(sigma, cov):
    cov_sigma = cov + sigma**2 * torch.eye(len(cov), dtype=cov.dtype)
    return len(cov) / (2 * sigma**2) + 0.5 * torch.trace(torch.linalg.inv(cov_sigma)).item()


# -- 2.4 Gaussian moments by Stein ---------------------------------------------------------------
def _double_factorial(n):
    return math.prod(range(n, 0, -2)) if n > 0 else 1


def _gaussian_moments(k, mu, std):
    """E[x^j] = sum over even i of C(j, i) mu^(j-i) std^i (i - 1)!!  (binomial expansion)."""
    return torch.tensor([sum(math.comb(j, i) * mu ** (j - i) * std**i * _double_factorial(i - 1)
                             for i in range(0, j + 1, 2)) for j in range(k + 1)], dtype=F64)


def check_gaussian_moments_by_stein(fn):
    assert_close(fn(4, 0.0, 1.0), torch.tensor([1.0, 0, 1, 0, 3], dtype=F64),
                 what="the worked example N(0, 1), k = 4", hint="E[x^4] = 3 for N(0, 1)",
                 rtol=1e-12, atol=1e-12)
    for k, mu, std in ((6, 0.0, 1.0), (5, 1.5, 0.7), (8, -0.4, 2.0), (0, 3.0, 1.0)):
        assert_close(torch.as_tensor(fn(k, mu, std), dtype=F64), _gaussian_moments(k, mu, std),
                     what=f"raw moments E[x^0..x^{k}] of N({mu}, {std}^2)",
                     hint="Stein for N(mu, std^2): E[(x - mu) f(x)] = std^2 E[f'(x)]; take "
                          "f = x^(j-1) and split x^j = (x - mu) x^(j-1) + mu x^(j-1)",
                     rtol=1e-10, atol=1e-10)


def moments_missing_j_minus_one(k, mu, std):
    out = [1.0]
    for j in range(1, k + 1):
        out.append(mu * out[j - 1] + std**2 * (out[j - 2] if j >= 2 else 0.0))
    return torch.tensor(out, dtype=F64)


def moments_std_instead_of_variance(k, mu, std):
    out = [1.0]
    for j in range(1, k + 1):
        out.append(mu * out[j - 1] + std * (j - 1) * (out[j - 2] if j >= 2 else 0.0))
    return torch.tensor(out, dtype=F64)


def moments_central_instead_of_raw(k, mu, std):
    # E[(x - mu)^j] = std^2 (j - 1) E[(x - mu)^(j-2)]: right only when mu = 0.
    out = [1.0]
    for j in range(1, k + 1):
        out.append(std**2 * (j - 1) * (out[j - 2] if j >= 2 else 0.0))
    return torch.tensor(out, dtype=F64)


# -- 2.5 divergence by finite differences --------------------------------------------------------
def check_divergence_finite_differences(fn):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert_close(fn(lambda z: -z, x), torch.full((5,), -3.0, dtype=F64),
                 what="the worked example s(x) = -x in D = 3", rtol=1e-6, atol=1e-6,
                 hint="the divergence of -x is -D")

    # A strongly nonlinear score, s(x) = -x^3 entrywise: div s = -3 |x|^2. Its central
    # difference is exact up to -h^2 per coordinate, [-(x+h)^3 + (x-h)^3] / (2h) = -3x^2 - h^2,
    # while a forward difference is off by about 3 |x| h.
    x = 2 * torch.randn(20, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    D = x.shape[1]
    hint = ("central difference [s_i(x + h e_i) - s_i(x - h e_i)] / (2h), summed over i, keeping "
            "component i only, with the h you are given")
    for h in (1e-4, 1e-2):
        assert_close(fn(lambda z: -z**3, x, h=h), -3 * x.square().sum(1) - D * h**2,
                     what=f"divergence of s(x) = -x^3 with h = {h} (exact central difference: "
                          "-3 |x|^2 - D h^2)", hint=hint, rtol=1e-9, atol=1e-8)

    torch.manual_seed(3)
    net = m.mlp_score_net(4, hidden=16).double()
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        got = fn(net, x)
    assert_close(got, m.jacobian_trace(net, x), what="divergence of an MLP score at 20 points",
                 hint=hint, rtol=1e-5, atol=1e-6)


def fd_divided_by_h(score_fn, x, h=1e-4):
    return 2 * _solution("exercise_divergence_finite_differences")(score_fn, x, h)


def fd_all_components(score_fn, x, h=1e-4):
    div = torch.zeros(len(x), dtype=x.dtype)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        div = div + (score_fn(x + step) - score_fn(x - step)).sum(1) / (2 * h)  # wrong axis
    return div


def fd_forward_differences(score_fn, x, h=1e-4):
    div = torch.zeros(len(x), dtype=x.dtype)
    s = score_fn(x)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        div = div + (score_fn(x + step)[:, i] - s[:, i]) / h  # O(h) error
    return div


def fd_ignores_h(score_fn, x, h=1e-4):
    return _solution("exercise_divergence_finite_differences")(score_fn, x, 1e-4)


EXERCISES = [
    Exercise("exercise_cubic_ism_objective", check_cubic_ism_objective,
             [cubic_trace_sign_flipped, cubic_trace_missing_factor_3, cubic_square_of_the_sum]),
    Exercise("exercise_fit_polynomial_energy", check_fit_polynomial_energy,
             [fit_sign_flipped, fit_missing_n_minus_one, fit_literal_formula_nan_at_zero]),
    Exercise("exercise_dsm_constant_gaussian", check_dsm_constant_gaussian,
             [dsm_constant_forgot_noise_in_p_sigma, dsm_constant_diagonal_only,
              dsm_constant_isotropic_average, dsm_constant_wrong_sign]),
    Exercise("exercise_gaussian_moments_by_stein", check_gaussian_moments_by_stein,
             [moments_missing_j_minus_one, moments_std_instead_of_variance,
              moments_central_instead_of_raw]),
    Exercise("exercise_divergence_finite_differences", check_divergence_finite_differences,
             [fd_divided_by_h, fd_all_components, fd_forward_differences, fd_ignores_h]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("02", EXERCISES)


def test_literal_formula_is_right_away_from_zero():
    """The x = 0 case is what catches fit_literal_formula_nan_at_zero: on the other cases of
    the check it agrees with the reference, so without x = 0 it would pass."""
    gen = torch.Generator().manual_seed(1)
    x = 1.3 + 0.7 * torch.randn(500, generator=gen, dtype=F64)
    torch.testing.assert_close(fit_literal_formula_nan_at_zero(x, (2, 1)),
                               _solution("exercise_fit_polynomial_energy")(x, (2, 1)))
    with pytest.raises(AssertionError, match="x = 0"):
        check_fit_polynomial_energy(fit_literal_formula_nan_at_zero)
