"""Reference answers to the exercises of 09_image_generation.py.

Try each exercise yourself first; `pytest tests/test_09_exercises.py` checks your answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def exercise_residual_block(block, x: Tensor, emb: Tensor) -> Tensor:
    """h = conv1(SiLU(GN(x))) + Linear(emb); out = skip(x) + conv2(SiLU(GN(h)))."""
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.emb(emb)[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    return block.skip(x) + h


def exercise_pc_step(score, x: Tensor, sigma: float, sigma_next: float, snr: float,
                     z_corrector: Tensor, z_predictor: Tensor) -> Tensor:
    """Langevin corrector at sigma, then the reverse-diffusion predictor to sigma_next."""
    s = score(x, sigma)
    s_norm = s.reshape(len(x), -1).norm(dim=1).mean()
    z_norm = z_corrector.reshape(len(x), -1).norm(dim=1).mean()
    eps = 2 * (snr * z_norm / s_norm) ** 2
    x = x + eps * s + (2 * eps).sqrt() * z_corrector
    g2 = sigma**2 - sigma_next**2  # G_i^2 of the VE step
    return x + g2 * score(x, sigma) + math.sqrt(g2) * z_predictor


def exercise_bits_per_dim(log_p: Tensor, n_dims: int, scale: float, n_levels: int) -> Tensor:
    """p_u(u) = p_y(y) scale^D (Jacobian of y = scale u + shift; a shift has Jacobian 1), and
    P(x) >= p_u(u) / n_levels^D per bin: bpd = -(log p_y + D ln scale)/(D ln 2) + log2 n_levels."""
    return -(log_p + n_dims * math.log(scale)) / (n_dims * math.log(2)) + math.log2(n_levels)


def exercise_ema_update(shadow: dict, params: dict, k: int, decay: float) -> dict:
    """d_k = min(decay, (1 + k) / (10 + k)); theta_bar <- d_k theta_bar + (1 - d_k) theta."""
    d = min(decay, (1 + k) / (10 + k))
    return {name: d * shadow[name] + (1 - d) * params[name] for name in shadow}
