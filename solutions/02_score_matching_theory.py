"""Reference answers to the exercises of 02_score_matching_theory.py.

Try each exercise yourself first; `pytest tests/test_02_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def exercise_gaussian_ism_objective(x: Tensor, mu: Tensor, P: Tensor) -> Tensor:
    """J_ISM = -tr P + 1/2 mean_n |P (x_n - mu)|^2.

    grad_x s = -P at every point, so tr(grad_x s) = -tr P; the row form of P (x_n - mu) is
    (x_n - mu) @ P (P is symmetric).
    """
    residual = (x - mu) @ P  # (N, D): -s(x_n)
    return -torch.trace(P) + 0.5 * residual.square().sum(1).mean()


def exercise_fit_polynomial_energy(x: Tensor, powers: tuple[int, ...]) -> Tensor:
    """theta = E[psi' psi'^T]^{-1} E[psi''] with psi_k = x^{p_k}.

    psi_k' = p x^(p-1) and psi_k'' = p (p-1) x^(p-2), which is 0 for p = 1 (written as zeros so
    that x^(-1) is never computed).
    """
    dpsi = torch.stack([p * x ** (p - 1) for p in powers], dim=1)  # (N, K)
    d2psi = torch.stack([p * (p - 1) * x ** (p - 2) if p >= 2 else torch.zeros_like(x)
                         for p in powers], dim=1)  # (N, K)
    A = dpsi.T @ dpsi / len(x)  # E[psi' psi'^T]
    return torch.linalg.solve(A, d2psi.mean(0))


def exercise_dsm_constant_gaussian(sigma: float, s0: float, dim: int) -> float:
    """C_sigma = D / (2 sigma^2) - D / (2 (s0^2 + sigma^2)).

    p_sigma = N(m, (s0^2 + sigma^2) I), whose score -(x - m)/v has E|score|^2 = D / v.
    """
    return dim / (2 * sigma**2) - dim / (2 * (s0**2 + sigma**2))


def exercise_gaussian_moments_by_stein(k: int, mu: float, s: float) -> Tensor:
    """E[x^j] = mu E[x^(j-1)] + s^2 (j-1) E[x^(j-2)].

    Stein's identity for N(mu, s^2) reads E[(x - mu) f(x)] = s^2 E[f'(x)]; take f = x^(j-1).
    """
    m = [1.0]
    for j in range(1, k + 1):
        previous = m[j - 2] if j >= 2 else 0.0
        m.append(mu * m[j - 1] + s**2 * (j - 1) * previous)
    return torch.tensor(m, dtype=torch.float64)


def exercise_divergence_finite_differences(score_fn: Callable[[Tensor], Tensor], x: Tensor,
                                           h: float = 1e-4) -> Tensor:
    """sum_i [s_i(x + h e_i) - s_i(x - h e_i)] / (2 h): 2 D evaluations of s, error O(h^2)."""
    div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        div = div + (score_fn(x + step)[:, i] - score_fn(x - step)[:, i]) / (2 * h)
    return div
