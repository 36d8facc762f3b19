"""Reference solutions for the exercises of 10_advanced_applications.py.

Try the exercises first: the checks in tests/test_10_exercises.py say what is wrong and give
hints. Each function here has the signature and docstring task of its stub in the module.
"""

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def exercise_cfg_combination(d_cond: Tensor, d_uncond: Tensor, w: float) -> Tensor:
    # s_w = (1 + w) s_c - w s_u and D = x + sigma^2 s: the x terms add up to (1 + w - w) x = x,
    # so the same weights combine the denoisers.
    return (1 + w) * d_cond - w * d_uncond


def exercise_classifier_gradient(logits_fn: Callable[[Tensor], Tensor], x: Tensor,
                                 labels: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    log_p = logits_fn(x).log_softmax(dim=1)  # log p(y | x): the logits minus their logsumexp
    chosen = log_p.gather(1, labels[:, None]).sum()  # image n's term depends on x[n] only
    return torch.autograd.grad(chosen, x)[0]


def exercise_replacement_step(x: Tensor, mask: Tensor, y: Tensor, sigma: float,
                              z: Tensor) -> Tensor:
    noised = y + sigma * z  # the observation of the known pixels at level sigma
    return mask * noised + (1 - mask) * x


def exercise_psnr(x: Tensor, ref: Tensor) -> Tensor:
    mse = (x - ref).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def exercise_tweedie_denoise(x_noisy: Tensor, score: Callable[[Tensor, float], Tensor],
                             sigma: float) -> Tensor:
    return x_noisy + sigma**2 * score(x_noisy, sigma)
