"""Reference answers to the exercises of 06_score_networks.py.

Try each exercise yourself first; `pytest tests/test_06_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def exercise_fourier_features(t: Tensor, W: Tensor) -> Tensor:
    """Exercise 6.1: [sin(2 pi W t), cos(2 pi W t)], shape (N, 2K)."""
    angle = 2 * math.pi * t[:, None] * W[None, :]  # (N, K): cycles -> radians
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def exercise_weighted_dsm_loss(score_fn, x0: Tensor, sigma: Tensor, z: Tensor) -> Tensor:
    """Exercise 6.2: 1/2 |sigma s(x0 + sigma z, sigma) + z|^2 per sample, shape (N,)."""
    s_col = sigma[:, None]
    s = score_fn(x0 + s_col * z, sigma)
    return 0.5 * (s_col * s + z).square().sum(1)


def exercise_gaussian_score_rms(cov: Tensor, sigma: Tensor) -> Tensor:
    """Exercise 6.3: sqrt(tr((C + sigma^2 I)^{-1})) = sqrt(sum_k 1 / (lambda_k + sigma^2))."""
    # E|s|^2 = E (x-m)^T P P (x-m) = tr(P Sigma P) = tr(P), with P = (C + sigma^2 I)^{-1}
    lam = torch.linalg.eigvalsh(cov)  # (D,)
    return (1.0 / (lam[None, :] + sigma[:, None] ** 2)).sum(1).sqrt()


def exercise_ema_closed_form(history: Tensor, decay: float) -> Tensor:
    """Exercise 6.4: d^n theta_0 + (1 - d) sum_k d^(n-k) theta_k, shape (P,)."""
    n = history.shape[0] - 1
    k = torch.arange(n + 1, dtype=history.dtype)
    weights = (1 - decay) * decay ** (n - k)  # weight of theta_k for k >= 1
    weights[0] = decay**n  # theta_0 is where the average started
    return weights @ history


def exercise_warmup_cosine_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Exercise 6.5: linear warm-up to 1, then a half cosine down to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))
