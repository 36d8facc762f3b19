"""Reference solutions to the exercises of 03_langevin_dynamics.py.

These are the answers `tests/test_03_exercises.py` checks the checkers against. Try the
exercises in the module first; each function here has the same name and signature as its stub.
"""

import math

import torch

Tensor = torch.Tensor


def exercise_ula_variance_after_k_steps(variance0: float, variance: float, step_size: float,
                                        k: int) -> float:
    """Var_k = a^(2k) variance0 + v_eps (1 - a^(2k)), a = 1 - eps/(2v), v_eps = v/(1 - eps/(4v)).

    From Var_{j+1} = a^2 Var_j + eps: Var_{j+1} - v_eps = a^2 (Var_j - v_eps), because
    v_eps = a^2 v_eps + eps is the fixed point.
    """
    a = 1.0 - step_size / (2.0 * variance)  # contraction of x - m per step
    v_eps = variance / (1.0 - step_size / (4.0 * variance))  # stationary variance
    decay = a ** (2 * k)  # the variance gap shrinks by a^2 per step
    return decay * variance0 + v_eps * (1.0 - decay)


def exercise_ula_stationary_covariance(cov: Tensor, step_size: float) -> Tensor:
    """S = U diag(lambda_i / (1 - eps/(4 lambda_i))) U^T for C = U diag(lambda) U^T.

    A = I - (eps/2) C^{-1} has C's eigenvectors, so S = A S A^T + eps I decouples into the 1D
    problem v_eps = v / (1 - eps/(4v)) along each eigen-direction.
    """
    lam, U = torch.linalg.eigh(cov)
    return U @ torch.diag(lam / (1.0 - step_size / (4.0 * lam))) @ U.T


def exercise_preconditioned_langevin_step(x: Tensor, score: Tensor, step_size: float,
                                          chol: Tensor, noise: Tensor) -> Tensor:
    """x' = x + (eps/2) M s(x) + sqrt(eps) L z with M = L L^T, for row vectors x (N, D)."""
    M = chol @ chol.T
    # (M s)^T = s^T M^T and (L z)^T = z^T L^T, row by row
    return x + 0.5 * step_size * score @ M.T + math.sqrt(step_size) * noise @ chol.T


def exercise_step_size_for_tolerance(cov: Tensor, tolerance: float) -> float:
    """eps = 4 lambda_min tolerance / (1 + tolerance).

    Along an eigen-direction with variance v, v_eps / v - 1 = (eps/(4v)) / (1 - eps/(4v)) =: r.
    r grows with eps/(4v), so the smallest eigenvalue is the worst direction; r = tolerance
    gives eps/(4v) = tolerance / (1 + tolerance).
    """
    lam_min = torch.linalg.eigvalsh(cov).min().item()
    return 4.0 * lam_min * tolerance / (1.0 + tolerance)
