"""Reference answers to the exercises of 02_score_matching_theory.py.

Try each exercise yourself first; `pytest tests/test_02_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def exercise_cubic_ism_objective(x: Tensor, a: float, b: Tensor) -> Tensor:
    """J_ISM = mean_n sum_i [ -3 a (x_ni - b_i)^2 + 1/2 a^2 (x_ni - b_i)^6 ].

    s_i = -a (x_i - b_i)^3 depends on x_i alone, so the Jacobian is diagonal with entries
    d s_i / d x_i = -3 a (x_i - b_i)^2, and |s|^2 = a^2 sum_i (x_i - b_i)^6.
    (For fixed b, J_ISM = -3 a m2 + 1/2 a^2 m6 with m2, m6 the sample averages of
    sum_i (x_i - b_i)^2 and sum_i (x_i - b_i)^6, so the best a is 3 m2 / m6.)
    """
    u = x - b  # (N, D)
    trace = -3 * a * u.square().sum(1)  # tr(grad_x s), (N,)
    half_norm_sq = 0.5 * a**2 * (u**3).square().sum(1)  # 1/2 |s|^2, (N,)
    return (trace + half_norm_sq).mean()


def exercise_fit_polynomial_energy(x: Tensor, powers: tuple[int, ...]) -> Tensor:
    """theta = M^{-1} v with M = avg psi' psi'^T, v = avg psi'', and psi_k = x^(n_k).

    psi_k' = n x^(n-1) and psi_k'' = n (n-1) x^(n-2), which is 0 for n = 1 (written as zeros so
    that x^(-1) is never computed).
    """
    dpsi = torch.stack([n * x ** (n - 1) for n in powers], dim=1)  # (N, K)
    d2psi = torch.stack([n * (n - 1) * x ** (n - 2) if n >= 2 else torch.zeros_like(x)
                         for n in powers], dim=1)  # (N, K)
    M = dpsi.T @ dpsi / len(x)  # avg psi' psi'^T
    return torch.linalg.solve(M, d2psi.mean(0))


def exercise_dsm_constant_gaussian(sigma: float, cov: Tensor) -> float:
    """C_sigma = D / (2 sigma^2) - 1/2 tr( (Sigma + sigma^2 I)^{-1} ).

    x~ = x + sigma z is a sum of independent Gaussians, so p_sigma = N(m, Sigma + sigma^2 I).
    Its score -(Sigma + sigma^2 I)^{-1} (x~ - m) has E|score|^2 = tr of the Fisher information
    (Sigma + sigma^2 I)^{-1} (module 01, Section 2.8).
    """
    D = cov.shape[0]
    cov_sigma = cov + sigma**2 * torch.eye(D, dtype=cov.dtype)
    return D / (2 * sigma**2) - 0.5 * torch.trace(torch.linalg.inv(cov_sigma)).item()


def exercise_gaussian_moments_by_stein(k: int, mu: float, std: float) -> Tensor:
    """E[x^j] = mu E[x^(j-1)] + std^2 (j-1) E[x^(j-2)].

    For N(mu, std^2), s_p(x) = -(x - mu) / std^2, so Stein's identity reads
    E[(x - mu) f(x)] = std^2 E[f'(x)]. With f = x^(j-1):
    E[x^j] - mu E[x^(j-1)] = E[(x - mu) x^(j-1)] = std^2 (j-1) E[x^(j-2)].
    """
    m = [1.0]
    for j in range(1, k + 1):
        previous = m[j - 2] if j >= 2 else 0.0
        m.append(mu * m[j - 1] + std**2 * (j - 1) * previous)
    return torch.tensor(m, dtype=torch.float64)


def exercise_divergence_finite_differences(score_fn: Callable[[Tensor], Tensor], x: Tensor,
                                           h: float = 1e-4) -> Tensor:
    """sum_i [s_i(x + h e_i) - s_i(x - h e_i)] / (2 h): 2 D evaluations of s, error O(h^2).

    Central differences cancel the h s_i'' / 2 term that a forward difference keeps: the error
    is h^2 s_i''' / 6 instead of h s_i'' / 2.
    """
    div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        div = div + (score_fn(x + step)[:, i] - score_fn(x - step)[:, i]) / (2 * h)
    return div
