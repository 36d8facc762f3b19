"""Reference answers to the exercises of 04_denoising_score_matching.py.

Try each exercise yourself first; `pytest tests/test_04_exercises.py` tells you whether your
answer is right. These answers are what the checks are validated against.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def exercise_perturbed_gaussian_score(x: Tensor, mean: Tensor, cov: Tensor,
                                      sigma: float) -> Tensor:
    """x~ ~ N(mean, cov + sigma^2 I), so the score is -(cov + sigma^2 I)^{-1} (x~ - mean)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    # solve (C + sigma^2 I) u = (x - mean)^T for all points at once: u is (D, N)
    return -torch.linalg.solve(cov + sigma**2 * eye, (x - mean).T).T


def exercise_scaled_dsm_loss(score_fn, x0: Tensor, scale: float, sigma: float,
                             noise: Tensor) -> Tensor:
    """x~ = scale x0 + sigma z; the kernel score is -(x~ - scale x0)/sigma^2 = -z/sigma, so the
    weighted residual sigma (s(x~) - (-z/sigma)) = sigma s(x~) + z is the same as for scale = 1;
    only the point where the network is evaluated moves."""
    x_noisy = scale * x0 + sigma * noise
    residual = sigma * score_fn(x_noisy) + noise
    return 0.5 * residual.reshape(len(x0), -1).square().sum(1).mean()


def exercise_scaled_tweedie(score_fn, x_noisy: Tensor, scale: float, sigma: float) -> Tensor:
    """y = scale x0 is data with x~ = y + sigma z, so E[y | x~] = x~ + sigma^2 s(x~) (Section 2.5)
    and E[x0 | x~] = (x~ + sigma^2 s(x~)) / scale."""
    return (x_noisy + sigma**2 * score_fn(x_noisy)) / scale


def exercise_noise_prediction(score_fn, x_noisy: Tensor, sigma: float) -> Tensor:
    """E[z | x~] = (x~ - E[x0 | x~]) / sigma = (x~ - x~ - sigma^2 s(x~)) / sigma = -sigma s(x~)."""
    return -sigma * score_fn(x_noisy)


def exercise_hdr_mass(log_p_grid: Tensor, cell_area: float, log_c: float) -> float:
    """Midpoint rule over the grid points inside the region: sum_{log p >= log c} p * cell area."""
    inside = log_p_grid >= log_c
    return (log_p_grid[inside].exp().sum() * cell_area).item()
