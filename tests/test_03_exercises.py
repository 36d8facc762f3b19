"""Checks for the exercises of 03_langevin_dynamics.py.

Spoiler warning: the "wrong answers" below are near-solutions. Try the exercises first.

Each check compares an implementation with ground truth (the exact variance recursion of the
chain, the discrete Lyapunov equation solved by scipy, the update written out in matrix form, a
bisection on the exact stationary covariance) and explains what went wrong. ``exercise_tests``
turns the checks into three tests: the reference passes, every wrong answer below fails, and
your answer passes (or is skipped while it still raises NotImplementedError).
"""

import math

import numpy as np
import pytest
import torch
from scipy.linalg import eigh, solve_discrete_lyapunov

from common.exercises import Exercise, assert_close, call_checked, exercise_tests

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
        args = (var0, v, eps, k)
        assert_close(torch.as_tensor(got, dtype=F64), torch.tensor(expected, dtype=F64),
                     rtol=1e-9, atol=1e-12,
                     what=f"Var(x_k) for variance0={var0}, v={v}, eps={eps}, k={k}",
                     hint="the recursion Var_{j+1} = a^2 Var_j + eps is linear: write Var_j - "
                          "v_eps, where v_eps is its fixed point, and see how that gap shrinks "
                          "per step",
                     formula="Var_k = a^(2k) variance0 + v_eps (1 - a^(2k)), a = 1 - eps/(2v), "
                             "v_eps = v / (1 - eps/(4v))",
                     mistakes=[(power_k_instead_of_2k(*args),
                                "the exponent: x is multiplied by a each step, so its variance "
                                "by a^2; after k steps that is a^(2k), not a^k"),
                               (start_variance_forgotten(*args),
                                "the start: the chain still remembers variance0 after k steps, "
                                "through a term that fades like the gap to the fixed point"),
                               (true_variance_as_limit(*args),
                                "the limit: with a finite step ULA settles at its own fixed "
                                "point v_eps, which is above the target's variance v")])


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
        got = call_checked(fn, cov, eps, what=f"ULA stationary covariance in {dim}D")
        assert_close(got, expected, rtol=1e-7, atol=1e-9,
                     what=f"stationary covariance of ULA on a {dim}D Gaussian, eps={eps:.3f}",
                     hint="in the eigenbasis of C the chain splits into D independent 1D "
                          "chains, one per eigenvalue, each with the 1D answer of Section 2.3",
                     formula="C = U diag(lambda) U^T, S = U diag(lambda / (1 - eps/(4 lambda))) "
                             "U^T",
                     mistakes=[(first_order_only(cov, eps),
                                "you kept only the first-order bias eps/4; the exact fixed point "
                                "is needed"),
                               (entrywise_formula(cov, eps),
                                "you applied the 1D formula to each entry of C; it holds per "
                                "eigenvalue, not per entry (C is not diagonal)")])


def first_order_only(cov, step_size):
    return cov + step_size / 4 * torch.eye(len(cov), dtype=cov.dtype)


def entrywise_formula(cov, step_size):
    return cov / (1.0 - step_size / (4.0 * cov))


# -- 3.3 preconditioned Langevin step -----------------------------------------------------------
def check_preconditioned_langevin_step(fn):
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    args = (x, torch.tensor([[-1.0, 0.0]], dtype=F64), 0.5,
            torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=F64),
            torch.tensor([[0.0, 1.0]], dtype=F64))
    example = call_checked(fn, *args, what="the worked example of the docstring")
    # M = [[4, 2], [2, 2]]: drift 0.25 M s = (-1, -0.5), noise sqrt(0.5) L z = (0, sqrt(0.5));
    # the wrong noise @ L (z^T L = (1, 1)) would give [[sqrt(0.5), sqrt(0.5) - 0.5]]
    assert_close(example, torch.tensor([[0.0, math.sqrt(0.5) - 0.5]], dtype=F64),
                 what="the worked example of the docstring",
                 hint="the drift is preconditioned by M = L L^T, and the noise must have "
                      "covariance eps M",
                 formula="x + (eps/2) M s + sqrt(eps) L z",
                 mistakes=[(wrong(*args), message) for wrong, message in STEP_MISTAKES])
    gen = torch.Generator().manual_seed(5)
    n, dim, eps = 16, 3, 0.3
    x, score, z = (torch.randn(n, dim, generator=gen, dtype=F64) for _ in range(3))
    L = torch.tril(torch.randn(dim, dim, generator=gen, dtype=F64))
    L.diagonal().abs_().add_(0.5)  # a valid Cholesky factor with non-zero off-diagonals
    M = L @ L.T
    expected = torch.stack([x[i] + 0.5 * eps * M @ score[i] + math.sqrt(eps) * L @ z[i]
                            for i in range(n)])
    got = call_checked(fn, x, score, eps, L, z, what="preconditioned Langevin step")
    assert_close(got, expected,
                 what="preconditioned step at 16 random states (3D, non-diagonal L)",
                 hint="with rows as states, a matrix acts on each row from the right through "
                      "its transpose; the noise must have covariance eps M = eps L L^T",
                 formula="x + (eps/2) score @ M.T + sqrt(eps) noise @ L.T, M = L @ L.T",
                 mistakes=[(wrong(x, score, eps, L, z), message)
                           for wrong, message in STEP_MISTAKES])


def noise_uses_transpose(x, score, step_size, chol, noise):
    M = chol @ chol.T
    return x + 0.5 * step_size * score @ M.T + math.sqrt(step_size) * noise @ chol


def noise_scaled_by_m(x, score, step_size, chol, noise):
    M = chol @ chol.T
    return x + 0.5 * step_size * score @ M.T + math.sqrt(step_size) * noise @ M.T


def drift_not_preconditioned(x, score, step_size, chol, noise):
    return x + 0.5 * step_size * score + math.sqrt(step_size) * noise @ chol.T


STEP_MISTAKES = [
    (noise_uses_transpose, "the noise: with rows as states L z is z @ L.T, not z @ L (whose "
                           "covariance is L^T L, not L L^T = M)"),
    (noise_scaled_by_m, "the noise is scaled by M, so its covariance is eps M^2; scale it by "
                        "a square root of M"),
    (drift_not_preconditioned, "the drift: it must be preconditioned by M as well, or the "
                               "chain no longer samples p"),
]


# -- 3.4 step size for a tolerance on the stationary variances ----------------------------------
def _worst_relative_error(cov, eps):
    """max over directions u of u^T S u / u^T C u - 1, S from the discrete Lyapunov equation."""
    C = cov.numpy()
    A = np.eye(len(C)) - 0.5 * eps * np.linalg.inv(C)
    S = solve_discrete_lyapunov(A, eps * np.eye(len(C)))
    return float(eigh(S, C, eigvals_only=True).max() - 1.0)  # generalised eigenvalues of (S, C)


def _eps_by_bisection(cov, tolerance):
    lo, hi = 0.0, 4.0 * float(np.linalg.eigvalsh(cov.numpy()).min()) * (1 - 1e-12)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _worst_relative_error(cov, mid) <= tolerance else (lo, mid)
    return lo


def check_step_size_for_tolerance(fn):
    gen = torch.Generator().manual_seed(8)
    B = torch.randn(3, 3, generator=gen, dtype=F64)
    rotated = B @ B.T + 0.3 * torch.eye(3, dtype=F64)  # non-diagonal: diag(C) is not the answer
    cases = [(torch.diag(torch.tensor([1.0, 4.0], dtype=F64)), 0.01),
             (torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64), 0.05), (rotated, 0.2)]
    for cov, tol in cases:
        expected = _eps_by_bisection(cov, tol)
        got = fn(cov, tol)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise AssertionError(f"expected a float step size, got {type(got).__name__}") from None
        if not abs(got - expected) <= 1e-6 * expected:
            error = (_worst_relative_error(cov, got) if 0 < got < 4 * float(
                np.linalg.eigvalsh(cov.numpy()).min()) else float("inf"))
            raise AssertionError(
                f"step size for tolerance {tol} on C with eigenvalues "
                f"{np.round(np.linalg.eigvalsh(cov.numpy()), 4).tolist()}: expected "
                f"{expected:.7f}, got {got:.7f}; at your step size the worst relative variance "
                f"error is {error:.5f} instead of {tol}.\n  hint: the smallest eigenvalue is "
                f"the worst direction (not the diagonal of C), and v_eps / v - 1 = "
                f"(eps/(4v)) / (1 - eps/(4v)) exactly; the first-order eps/(4v) is not enough")


def first_order_tolerance(cov, tolerance):
    return 4.0 * torch.linalg.eigvalsh(cov).min().item() * tolerance


def largest_eigenvalue(cov, tolerance):
    return 4.0 * torch.linalg.eigvalsh(cov).max().item() * tolerance / (1.0 + tolerance)


def smallest_diagonal_entry(cov, tolerance):
    return 4.0 * cov.diagonal().min().item() * tolerance / (1.0 + tolerance)


EXERCISES = [
    Exercise("exercise_ula_variance_after_k_steps", check_ula_variance_after_k_steps,
             [power_k_instead_of_2k, start_variance_forgotten, true_variance_as_limit]),
    Exercise("exercise_ula_stationary_covariance", check_ula_stationary_covariance,
             [first_order_only, entrywise_formula]),
    Exercise("exercise_preconditioned_langevin_step", check_preconditioned_langevin_step,
             [noise_uses_transpose, noise_scaled_by_m, drift_not_preconditioned]),
    Exercise("exercise_step_size_for_tolerance", check_step_size_for_tolerance,
             [first_order_tolerance, largest_eigenvalue, smallest_diagonal_entry]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("03", EXERCISES)


# -- the messages: what is wrong first, the formula only when asked for --------------------------
STEPPED = [(check_ula_variance_after_k_steps, power_k_instead_of_2k, "a^(2k), not a^k",
            "v_eps = v / (1 - eps/(4v))"),
           (check_ula_variance_after_k_steps, start_variance_forgotten, "remembers variance0",
            "v_eps = v / (1 - eps/(4v))"),
           (check_ula_stationary_covariance, entrywise_formula, "per eigenvalue, not per entry",
            "diag(lambda / (1 - eps/(4 lambda)))"),
           (check_ula_stationary_covariance, first_order_only, "first-order bias",
            "diag(lambda / (1 - eps/(4 lambda)))"),
           (check_preconditioned_langevin_step, noise_uses_transpose, "z @ L.T, not z @ L",
            "sqrt(eps) L z"),
           (check_preconditioned_langevin_step, drift_not_preconditioned, "the drift",
            "sqrt(eps) L z"),
           (check_preconditioned_langevin_step, noise_scaled_by_m, "eps M^2", "sqrt(eps) L z")]


@pytest.mark.parametrize("check, wrong, diagnosis, formula", STEPPED,
                         ids=[w.__name__ for _, w, _, _ in STEPPED])
def test_failure_names_the_mistake_and_hides_the_formula(check, wrong, diagnosis, formula,
                                                         monkeypatch):
    monkeypatch.delenv("SBGM_SHOW_SOLUTION", raising=False)
    with pytest.raises(AssertionError) as info:
        check(wrong)
    message = str(info.value)
    assert "what is wrong: " in message and diagnosis in message, message
    assert formula not in message and "SBGM_SHOW_SOLUTION=1" in message, message
    monkeypatch.setenv("SBGM_SHOW_SOLUTION", "1")
    with pytest.raises(AssertionError) as info:
        check(wrong)
    assert formula in str(info.value)


def test_a_transposed_matrix_product_fails_with_a_message():
    """3.3: x @ L with a (3, 3) L runs fine, so the shape check is in 3.2's (D, D) products:
    a chain that multiplies by a (D, 1) column raises inside the answer; the check reports it."""
    def column_instead_of_matrix(cov, step_size):
        return cov @ torch.ones(len(cov), 1, dtype=cov.dtype).T
    with pytest.raises(AssertionError, match="raised RuntimeError"):
        check_ula_stationary_covariance(column_instead_of_matrix)
