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


def exercise_dsm_bias_floor(cov: Tensor, sigma: float) -> float:
    """In Sigma's eigenbasis coordinate k of x - mu has variance lambda_k and the score
    difference multiplies it by d_k = 1/(lambda_k + sigma^2) - 1/lambda_k, so
    F_floor = 1/2 sum_k lambda_k d_k^2 = sum_k sigma^4 / (2 lambda_k (lambda_k + sigma^2)^2).
    For small sigma, d_k ~ -sigma^2 / lambda_k^2: the floor shrinks like sigma^4."""
    lam = torch.linalg.eigvalsh(cov.to(torch.float64))
    d = 1 / (lam + sigma**2) - 1 / lam
    return (0.5 * lam * d.square()).sum().item()
