"""Checks for the exercises of 03_langevin_dynamics.py.

Spoiler warning: the "wrong answers" below are near-solutions. Try the exercises first.

Each check compares an implementation with ground truth (the exact variance recursion of the
chain, the discrete Lyapunov equation solved by scipy, the update written out in matrix form,
the exact mixture density) and explains what went wrong. ``exercise_tests`` turns the checks into
three tests: the reference passes, every wrong answer below fails, and your answer passes (or is
skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch
from scipy.linalg import solve_discrete_lyapunov

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module

pytestmark = pytest.mark.ch03
F64 = torch.float64


# -- 3.1 variance after k steps -----------------------------------------------------------------
def _variance_by_recursion(variance0, variance, step_size, k):
    a = 1.0 - step_size / (2.0 * variance)
    var = variance0
    for _ in range(k):
        var = a * a * var + step_size  # Var_{j+1} = a^2 Var_j + eps
    return var


def check_ula_variance_after_k_steps(fn):
    # (variance0, v, eps, k): a point start, starts wider than v_eps, an oscillating chain (a < 0)
    cases = [(0.0, 1.0, 0.5, 1), (0.0, 1.0, 0.5, 0), (0.0, 2.0, 0.1, 7), (5.0, 1.0, 0.2, 13),
             (0.3, 0.5, 1.5, 9), (0.0, 1.0, 0.05, 2000)]
    for var0, v, eps, k in cases:
        expected = _variance_by_recursion(var0, v, eps, k)
        got = fn(var0, v, eps, k)
        assert_close(torch.as_tensor(got, dtype=F64), torch.tensor(expected, dtype=F64),
                     rtol=1e-9, atol=1e-12,
                     what=f"Var(x_k) for variance0={var0}, v={v}, eps={eps}, k={k}",
                     hint="Var_k = a^(2k) variance0 + v_eps (1 - a^(2k)) with a = 1 - eps/(2v) "
                          "and v_eps = v / (1 - eps/(4v)); the exponent is 2k because variances "
                          "scale with a^2")


def power_k_instead_of_2k(variance0, variance, step_size, k):
    a = 1.0 - step_size / (2.0 * variance)
    v_eps = variance / (1.0 - step_size / (4.0 * variance))
    return a**k * variance0 + v_eps * (1.0 - a**k)


def start_variance_forgotten(variance0, variance, step_size, k):
    a = 1.0 - step_size / (2.0 * variance)
    v_eps = variance / (1.0 - step_size / (4.0 * variance))
    return v_eps * (1.0 - a ** (2 * k))


def true_variance_as_limit(variance0, variance, step_size, k):
    a = 1.0 - step_size / (2.0 * variance)
    return a ** (2 * k) * variance0 + variance * (1.0 - a ** (2 * k))


# -- 3.2 stationary covariance in D dimensions --------------------------------------------------
def check_ula_stationary_covariance(fn):
    gen = torch.Generator().manual_seed(3)
    for dim, frac in ((2, 0.3), (3, 0.8), (4, 0.5)):
        B = torch.randn(dim, dim, generator=gen, dtype=F64)
        cov = B @ B.T + 0.5 * torch.eye(dim, dtype=F64)
        eps = frac * 4 * torch.linalg.eigvalsh(cov).min().item()  # inside the stable range
        A = torch.eye(dim, dtype=F64) - 0.5 * eps * torch.linalg.inv(cov)
        # S = A S A^T + eps I, the discrete Lyapunov equation of the chain x' = A x + sqrt(eps) z
        expected = torch.from_numpy(solve_discrete_lyapunov(A.numpy(), eps * torch.eye(dim,
                                                             dtype=F64).numpy()))
        assert_close(fn(cov, eps), expected, rtol=1e-7, atol=1e-9,
                     what=f"stationary covariance of ULA on a {dim}D Gaussian, eps={eps:.3f}",
                     hint="diagonalise C = U diag(lambda) U^T and apply the 1D formula "
                          "lambda / (1 - eps/(4 lambda)) to each eigenvalue")


def first_order_only(cov, step_size):
    return cov + step_size / 4 * torch.eye(len(cov), dtype=cov.dtype)


def entrywise_formula(cov, step_size):
    return cov / (1.0 - step_size / (4.0 * cov))


# -- 3.3 preconditioned Langevin step -----------------------------------------------------------
def check_preconditioned_langevin_step(fn):
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    example = fn(x, torch.tensor([[-1.0, 0.0]], dtype=F64), 0.5,
                 torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64),
                 torch.tensor([[0.0, 1.0]], dtype=F64))
    assert_close(example, torch.tensor([[0.0, math.sqrt(0.5)]], dtype=F64),
                 what="the worked example of the docstring", hint="x + (eps/2) M s + sqrt(eps) L z")
    gen = torch.Generator().manual_seed(5)
    n, dim, eps = 16, 3, 0.3
    x, score, z = (torch.randn(n, dim, generator=gen, dtype=F64) for _ in range(3))
    L = torch.tril(torch.randn(dim, dim, generator=gen, dtype=F64))
    L.diagonal().abs_().add_(0.5)  # a valid Cholesky factor with non-zero off-diagonals
    M = L @ L.T
    expected = torch.stack([x[i] + 0.5 * eps * M @ score[i] + math.sqrt(eps) * L @ z[i]
                            for i in range(n)])
    assert_close(fn(x, score, eps, L, z), expected,
                 what="preconditioned step at 16 random states (3D, non-diagonal L)",
                 hint="with rows as states, M s(x) is score @ M.T and L z is noise @ L.T; the "
                      "noise must have covariance eps M = eps L L^T")


def noise_uses_transpose(x, score, step_size, chol, noise):
    M = chol @ chol.T
    return x + 0.5 * step_size * score @ M.T + math.sqrt(step_size) * noise @ chol


def noise_scaled_by_m(x, score, step_size, chol, noise):
    M = chol @ chol.T
    return x + 0.5 * step_size * score @ M.T + math.sqrt(step_size) * noise @ M.T


def drift_not_preconditioned(x, score, step_size, chol, noise):
    return x + 0.5 * step_size * score + math.sqrt(step_size) * noise @ chol.T


# -- 3.4 stationary density of the Fokker-Planck equation ---------------------------------------
def check_fokker_planck_stationary(fn):
    x = torch.linspace(-6.0, 6.0, 1201, dtype=F64)
    gaussian = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    assert_close(fn(x, -x), gaussian, rtol=1e-4, atol=1e-6,
                 what="stationary density for the score -x (expected N(0, 1))",
                 hint="p = exp(integral of s) / Z; check the sign and the normalisation")
    target = load_module("03").mixture_1d()
    score = target.score(x[:, None])[:, 0]
    density = target.log_prob(x[:, None]).exp()
    assert_close(fn(x, score), density, rtol=1e-3, atol=1e-5,
                 what="stationary density of the 1D two-mode mixture of Section 4.4",
                 hint="use the trapezoid rule for the integral of s (cumulative, starting at 0) "
                      "and for Z")


def minus_integral(x, score):
    log_p = torch.cat([score.new_zeros(1), torch.cumulative_trapezoid(-score, x)])
    p = torch.exp(log_p - log_p.max())
    return p / torch.trapezoid(p, x)


def not_normalised(x, score):
    log_p = torch.cat([score.new_zeros(1), torch.cumulative_trapezoid(score, x)])
    return torch.exp(log_p - log_p.max())


def cumsum_without_dx(x, score):
    log_p = torch.cumsum(score, 0)
    p = torch.exp(log_p - log_p.max())
    return p / torch.trapezoid(p, x)


test_reference_passes, test_wrong_answer_fails, test_your_answer = exercise_tests("03", [
    Exercise("exercise_ula_variance_after_k_steps", check_ula_variance_after_k_steps,
             [power_k_instead_of_2k, start_variance_forgotten, true_variance_as_limit]),
    Exercise("exercise_ula_stationary_covariance", check_ula_stationary_covariance,
             [first_order_only, entrywise_formula]),
    Exercise("exercise_preconditioned_langevin_step", check_preconditioned_langevin_step,
             [noise_uses_transpose, noise_scaled_by_m, drift_not_preconditioned]),
    Exercise("exercise_fokker_planck_stationary", check_fokker_planck_stationary,
             [minus_integral, not_normalised, cumsum_without_dx]),
])
