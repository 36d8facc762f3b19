"""Checks for the exercises of 02_score_matching_theory.py.

Each check compares an implementation with ground truth (autograd, closed forms from sample
moments, or the binomial formula for Gaussian moments) and explains what went wrong.
``exercise_tests`` turns the checks into three tests: the reference passes, every wrong answer
below fails, and your answer passes (or is skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module, load_solutions

pytestmark = pytest.mark.ch02
F64 = torch.float64
m = load_module("02")


# -- 2.1 Gaussian ISM objective ------------------------------------------------------------------
def check_gaussian_ism_objective(fn):
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    assert_close(fn(x, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)),
                 torch.tensor(-1.5, dtype=F64), what="the worked example (x = +-e_1, P = I)",
                 hint="-tr(I) + 1/2 * mean(|x_n|^2) = -2 + 0.5", rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for D in (1, 3):
        x = torch.randn(50, D, generator=gen, dtype=F64) + 1.0
        mu = torch.randn(D, generator=gen, dtype=F64)
        B = torch.randn(D, D, generator=gen, dtype=F64)
        P = B @ B.T + 0.5 * torch.eye(D, dtype=F64)
        # Ground truth: the generic ISM loss with the Jacobian trace taken by autograd.
        expected = m.ism_loss(lambda z: -(z - mu) @ P, x, create_graph=False)
        assert_close(fn(x, mu, P), expected, what=f"J_ISM of s = -P(x - mu) in D = {D}",
                     hint="tr(grad s) = -tr P for every sample; the squared-norm term is "
                          "1/2 * mean over samples of |P (x_n - mu)|^2",
                     rtol=1e-10, atol=1e-12)


def ism_trace_sign_flipped(x, mu, P):
    return torch.trace(P) + 0.5 * ((x - mu) @ P).square().sum(1).mean()


def ism_missing_half(x, mu, P):
    return -torch.trace(P) + ((x - mu) @ P).square().sum(1).mean()


# -- 2.2 polynomial energy -----------------------------------------------------------------------
def check_fit_polynomial_energy(fn):
    x = torch.tensor([-1.0, 1.0], dtype=F64)
    assert_close(fn(x, (2,)), torch.tensor([0.5], dtype=F64), what="the worked example",
                 hint="theta = 1 / (2 mean(x^2))", rtol=1e-10, atol=1e-12)
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
    return -load_solutions("02").exercise_fit_polynomial_energy(x, powers)


def fit_missing_p_minus_one(x, powers):
    dpsi = torch.stack([p * x ** (p - 1) for p in powers], dim=1)
    d2psi = torch.stack([p * x ** (p - 2) for p in powers], dim=1)  # forgot the (p - 1)
    return torch.linalg.solve(dpsi.T @ dpsi / len(x), d2psi.mean(0))


# -- 2.3 DSM constant ----------------------------------------------------------------------------
def check_dsm_constant_gaussian(fn):
    for sigma, s0, D in ((1.0, 1.0, 1), (0.1, 1.0, 2), (0.5, 2.0, 784), (3.0, 0.2, 3)):
        expected = D / (2 * sigma**2) - D / (2 * (s0**2 + sigma**2))
        got = fn(sigma, s0, D)
        if not isinstance(got, (float, int)) and not (torch.is_tensor(got) and got.numel() == 1):
            raise AssertionError(f"expected a number, got {type(got).__name__}")
        assert_close(float(got), expected, what=f"C_sigma for sigma={sigma}, s0={s0}, D={D}",
                     hint="p_sigma = N(m, (s0^2 + sigma^2) I) and E|grad log N(m, v I)|^2 = D/v",
                     rtol=1e-10, atol=1e-12)


def dsm_constant_missing_dim(sigma, s0, dim):
    return 1 / (2 * sigma**2) - 1 / (2 * (s0**2 + sigma**2))


def dsm_constant_wrong_sign(sigma, s0, dim):
    return dim / (2 * sigma**2) + dim / (2 * (s0**2 + sigma**2))


def dsm_constant_kernel_term_only(sigma, s0, dim):
    return dim / (2 * sigma**2)


# -- 2.4 Gaussian moments by Stein ---------------------------------------------------------------
def _double_factorial(n):
    return math.prod(range(n, 0, -2)) if n > 0 else 1


def _gaussian_moments(k, mu, s):
    """E[x^j] = sum over even i of C(j, i) mu^(j-i) s^i (i - 1)!!  (binomial expansion)."""
    return torch.tensor([sum(math.comb(j, i) * mu ** (j - i) * s**i * _double_factorial(i - 1)
                             for i in range(0, j + 1, 2)) for j in range(k + 1)], dtype=F64)


def check_gaussian_moments_by_stein(fn):
    assert_close(fn(4, 0.0, 1.0), torch.tensor([1.0, 0, 1, 0, 3], dtype=F64),
                 what="the worked example N(0, 1), k = 4", hint="E[x^4] = 3 for N(0, 1)",
                 rtol=1e-12, atol=1e-12)
    for k, mu, s in ((6, 0.0, 1.0), (5, 1.5, 0.7), (8, -0.4, 2.0), (0, 3.0, 1.0)):
        assert_close(torch.as_tensor(fn(k, mu, s), dtype=F64), _gaussian_moments(k, mu, s),
                     what=f"moments E[x^0..x^{k}] of N({mu}, {s}^2)",
                     hint="E[x^j] = mu E[x^(j-1)] + s^2 (j-1) E[x^(j-2)]",
                     rtol=1e-10, atol=1e-10)


def moments_missing_j_minus_one(k, mu, s):
    out = [1.0]
    for j in range(1, k + 1):
        out.append(mu * out[j - 1] + s**2 * (out[j - 2] if j >= 2 else 0.0))
    return torch.tensor(out, dtype=F64)


def moments_s_instead_of_s_squared(k, mu, s):
    out = [1.0]
    for j in range(1, k + 1):
        out.append(mu * out[j - 1] + s * (j - 1) * (out[j - 2] if j >= 2 else 0.0))
    return torch.tensor(out, dtype=F64)


# -- 2.5 divergence by finite differences --------------------------------------------------------
def check_divergence_finite_differences(fn):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert_close(fn(lambda z: -z, x), torch.full((5,), -3.0, dtype=F64),
                 what="the worked example s(x) = -x in D = 3", rtol=1e-6, atol=1e-6,
                 hint="the divergence of -x is -D")
    torch.manual_seed(3)
    net = m.mlp_score_net(4, hidden=16).double()
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        got = fn(net, x)
    assert_close(got, m.jacobian_trace(net, x), what="divergence of an MLP score at 20 points",
                 hint="central difference [s_i(x + h e_i) - s_i(x - h e_i)] / (2h), summed "
                      "over i, keeping component i only", rtol=1e-5, atol=1e-6)


def fd_divided_by_h(score_fn, x, h=1e-4):
    return 2 * load_solutions("02").exercise_divergence_finite_differences(score_fn, x, h)


def fd_all_components(score_fn, x, h=1e-4):
    div = torch.zeros(len(x), dtype=x.dtype)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        div = div + (score_fn(x + step) - score_fn(x - step)).sum(1) / (2 * h)  # wrong axis
    return div


test_reference_passes, test_wrong_answer_fails, test_your_answer = exercise_tests("02", [
    Exercise("exercise_gaussian_ism_objective", check_gaussian_ism_objective,
             [ism_trace_sign_flipped, ism_missing_half]),
    Exercise("exercise_fit_polynomial_energy", check_fit_polynomial_energy,
             [fit_sign_flipped, fit_missing_p_minus_one]),
    Exercise("exercise_dsm_constant_gaussian", check_dsm_constant_gaussian,
             [dsm_constant_missing_dim, dsm_constant_wrong_sign, dsm_constant_kernel_term_only]),
    Exercise("exercise_gaussian_moments_by_stein", check_gaussian_moments_by_stein,
             [moments_missing_j_minus_one, moments_s_instead_of_s_squared]),
    Exercise("exercise_divergence_finite_differences", check_divergence_finite_differences,
             [fd_divided_by_h, fd_all_components]),
])
