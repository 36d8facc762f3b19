"""Reference answers to the exercises of 05_sliced_score_matching.py.

Try each exercise yourself first; `pytest tests/test_05_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from common.modules import load_module

Tensor = torch.Tensor


def exercise_sphere_projections(n: int, dim: int, generator: torch.Generator) -> Tensor:
    """z / |z| is uniform on the unit sphere (the Gaussian density depends only on |z|);
    scaling by sqrt(D) makes E[v v^T] = (D / D) I = I, since E[u u^T] = I / D for unit u."""
    z = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return math.sqrt(dim) * z / z.norm(dim=1, keepdim=True)


def exercise_frobenius_norm_estimate(matvec: Callable[[Tensor], Tensor], dim: int,
                                     n_probes: int, generator: torch.Generator) -> Tensor:
    """E_v |A v|^2 = E_v[v^T A^T A v] = tr(A^T A) = ||A||_F^2: Hutchinson on A^T A."""
    v = load_module("05").sample_projections((n_probes, dim), "rademacher", generator,
                                             dtype=torch.float64)
    return matvec(v).square().sum(1).mean()


def exercise_ssm_forward_mode(score_fn: Callable[[Tensor], Tensor], x: Tensor,
                              v: Tensor) -> Tensor:
    """Forward mode pushes the tangent v through score_fn: jvp returns s(x) and J v row by row
    (rows are independent, so the batch Jacobian is block diagonal). Then v^T (J v)."""
    s, jv = torch.func.jvp(score_fn, (x,), (v,))
    return (v * jv).sum(1) + 0.5 * (v * s).sum(1).square()


def exercise_sigma_for_floor(cov: Tensor, floor: float) -> float:
    """In Sigma's eigenbasis coordinate k of x - mu has variance lambda_k and the score
    difference multiplies it by d_k = 1/(lambda_k + sigma^2) - 1/lambda_k
    = -sigma^2 / (lambda_k (lambda_k + sigma^2)) (the second form has no cancellation), so
        F_floor(sigma) = 1/2 sum_k lambda_k d_k^2
                       = sum_k sigma^4 / (2 lambda_k (lambda_k + sigma^2)^2),
    increasing in sigma from 0 (about sigma^4/2 sum_k lambda_k^-3 for small sigma) to
    1/2 sum_k 1/lambda_k = 1/2 tr Sigma^{-1}. Bracket the root by doubling/halving, then bisect
    on log sigma: 200 halvings of the bracket are far more than double precision needs."""
    lam = torch.linalg.eigvalsh(cov.to(torch.float64))

    def f_floor(sigma: float) -> float:
        d = -(sigma**2) / (lam * (lam + sigma**2))
        return (0.5 * lam * d.square()).sum().item()

    lo = hi = 1.0
    while f_floor(hi) < floor:
        hi *= 2
    while f_floor(lo) > floor:
        lo /= 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)  # bisection in log sigma
        if f_floor(mid) < floor:
            lo = mid
        else:
            hi = mid
        if hi / lo - 1 < 1e-15:
            break
    return math.sqrt(lo * hi)
