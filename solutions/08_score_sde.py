"""Reference answers to the exercises of 08_score_sde.py.

Try each exercise yourself first; `pytest tests/test_08_exercises.py` checks your answer.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def exercise_prior_mismatch_kl(mean: Tensor, cov: Tensor, alpha_T: float,
                                sigma_T: float) -> Tensor:
    """p_T = N(m, S) with m = alpha_T mean, S = alpha_T^2 cov + sigma_T^2 I;
    KL(N(m, S) || N(0, I)) = 1/2 [tr S + |m|^2 - D - log det S]."""
    D = mean.shape[0]
    m = alpha_T * mean
    S = alpha_T**2 * cov + sigma_T**2 * torch.eye(D, dtype=cov.dtype)
    return 0.5 * (torch.trace(S) + m @ m - D - torch.logdet(S))


def exercise_euler_ode_sampler(sde, score_fn, x_T: Tensor, n_steps: int,
                               eps: float = 1e-3) -> Tensor:
    """x_{i+1} = x_i - [f(x_i, t_i) - 1/2 g(t_i)^2 s(x_i, t_i)] (t_i - t_{i+1})."""
    ts = torch.linspace(sde.T, eps, n_steps + 1, dtype=torch.float64)
    x = x_T
    for i in range(n_steps):
        t = torch.full((len(x),), ts[i].item(), dtype=x.dtype)
        g = sde.diffusion(t)[:, None]
        drift = sde.drift(x, t) - 0.5 * g**2 * score_fn(x, t)
        x = x - drift * (ts[i] - ts[i + 1]).item()
    return x


def exercise_ddpm_ancestral_step(x: Tensor, eps_pred: Tensor, beta_i: float, alpha_bar_i: float,
                                 sigma_i: float, z: Tensor) -> Tensor:
    """(a) x_i = a x_{i-1} + b z with a = sqrt(1 - beta_i), b = sqrt(beta_i), so Tweedie gives
    E[x_{i-1} | x_i] = (x_i + beta_i grad log p_i(x_i)) / sqrt(1 - beta_i).
    (b) x_i = sqrt(alpha_bar_i) x_0 + sqrt(1 - alpha_bar_i) eps, whose conditional score is
    -eps / sqrt(1 - alpha_bar_i); the noise predictor's E[eps | x_i] therefore gives the
    marginal score s = -eps_pred / sqrt(1 - alpha_bar_i) (Section 2.6).
    Together: DDPM's (x - beta / sqrt(1 - alpha_bar) eps) / sqrt(1 - beta), plus sigma z."""
    return (x - beta_i / (1 - alpha_bar_i) ** 0.5 * eps_pred) / (1 - beta_i) ** 0.5 + sigma_i * z


def exercise_corrector_step_size(score: Tensor, z: Tensor, snr: float,
                                 alpha: float = 1.0) -> Tensor:
    """||eps s|| / ||sqrt(2 eps) z|| = sqrt(eps / 2) |s| / |z| = snr sqrt(alpha)
    =>  eps = 2 alpha (snr |z| / |s|)^2, with batch-mean norms."""
    s_norm = score.norm(dim=1).mean()
    z_norm = z.norm(dim=1).mean()
    return 2 * alpha * (snr * z_norm / s_norm) ** 2


def exercise_hutchinson_divergence(fn, x: Tensor, v: Tensor) -> Tensor:
    """v^T J v from one vector-Jacobian product."""
    x = x.detach().requires_grad_(True)
    (vjp,) = torch.autograd.grad((fn(x) * v).sum(), x)
    return (vjp * v).sum(1)
