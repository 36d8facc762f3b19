"""Reference answers to the exercises of 01_score_functions_basics.py.

Try each exercise yourself first; `pytest tests/test_01_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def exercise_student_t_score(x: Tensor, nu: float) -> Tensor:
    """log p = -(nu + 1)/2 log(1 + x^2/nu) + const  =>  s(x) = -(nu + 1) x / (nu + x^2).

    Far from 0 the score decays like -(nu + 1)/x instead of growing like the Gaussian's -x:
    heavy tails pull back only weakly.
    """
    return -(nu + 1) * x / (nu + x**2)


def exercise_ring_score(x: Tensor, radius: float, width: float) -> Tensor:
    """E = (r - R)^2 / (2 w^2) with r = |x|;  grad E = (r - R)/w^2 * x/r;  s = -grad E."""
    r = x.norm(dim=1, keepdim=True)
    return -(r - radius) / width**2 * x / r


def exercise_mixture_score(x: Tensor, weights: Tensor, means: Tensor, std: float) -> Tensor:
    """s(x) = sum_k r_k(x) (-(x - mu_k) / std^2), responsibilities by a stable softmax."""
    diff = x[:, None, :] - means[None, :, :]  # (N, K, D)
    D = x.shape[1]
    # log w_k + log N(x; mu_k, std^2 I); the normaliser is the same for every k (shared std),
    # so it would cancel in the softmax, but we keep it to show the full log-density.
    log_comp = (weights.log()[None, :] - 0.5 * diff.square().sum(-1) / std**2
                - 0.5 * D * math.log(2 * math.pi * std**2))
    r = torch.softmax(log_comp, dim=1)  # (N, K)
    return (r[:, :, None] * (-diff / std**2)).sum(1)


def exercise_density_from_score(score_values: Tensor, x_grid: Tensor) -> Tensor:
    """log p(x_j) = log p(x_0) + cumulative trapezoid integral of s; then normalise."""
    dx = x_grid[1:] - x_grid[:-1]
    increments = 0.5 * (score_values[1:] + score_values[:-1]) * dx
    log_p = torch.cat([torch.zeros(1, dtype=score_values.dtype), torch.cumsum(increments, 0)])
    p = torch.exp(log_p - log_p.max())
    return p / torch.trapezoid(p, x_grid)


def exercise_product_of_gaussians(mean1: Tensor, cov1: Tensor, mean2: Tensor,
                                  cov2: Tensor) -> tuple[Tensor, Tensor]:
    """Sigma^{-1} = P1 + P2 and mu = Sigma (P1 mu1 + P2 mu2)."""
    p1, p2 = torch.linalg.inv(cov1), torch.linalg.inv(cov2)
    cov = torch.linalg.inv(p1 + p2)
    mean = cov @ (p1 @ mean1 + p2 @ mean2)
    return mean, cov
