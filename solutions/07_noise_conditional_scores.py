"""Reference answers to the exercises of 07_noise_conditional_scores.py.

Try each exercise yourself first; `pytest tests/test_07_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import math

import torch
from scipy import stats

Tensor = torch.Tensor


def exercise_overlap_criterion(gamma: float, dim: int) -> float:
    """Exercise 7.1: Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma)."""
    # ends gamma sigma (sqrt D -/+ 3/sqrt 2), standardised by (r - sigma sqrt D) / (sigma/sqrt 2)
    centre = math.sqrt(2 * dim) * (gamma - 1)
    return float(stats.norm.cdf(centre + 3 * gamma) - stats.norm.cdf(centre - 3 * gamma))


def exercise_annealed_step_sizes(sigmas: Tensor, eps: float) -> Tensor:
    """Exercise 7.2: alpha_i = eps sigma_i^2 / sigma_L^2, shape (L,)."""
    return eps * (sigmas / sigmas[-1]) ** 2


def exercise_variance_ratio(r: float, n_steps: int, gamma: float) -> float:
    """Exercise 7.3: a^(2T) (gamma^2 - s_inf) + s_inf with a = 1 - r/2, s_inf = 1/(1 - r/4)."""
    a = 1 - r / 2
    s_inf = r / (1 - a * a)  # fixed point of v <- a^2 v + r, = 1 / (1 - r/4)
    return a ** (2 * n_steps) * (gamma**2 - s_inf) + s_inf


def exercise_denoise(x: Tensor, score: Tensor, sigma: float) -> Tensor:
    """Exercise 7.4: Tweedie, E[x_0 | x] = x + sigma^2 s(x, sigma)."""
    return x + sigma**2 * score


def exercise_num_levels(sigma_max: float, sigma_min: float, gamma: float) -> int:
    """Exercise 7.5: L = 1 + ceil(log(sigma_max / sigma_min) / log gamma)."""
    return 1 + math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)
