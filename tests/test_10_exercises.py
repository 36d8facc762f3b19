"""Checks for the exercises of 10_advanced_applications.py (the mechanism: common/exercises.py)."""

import math

import pytest
import torch

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module

pytestmark = pytest.mark.ch10
m = load_module("10")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- 10.1 classifier-free guidance ---------------------------------------------------------------
def check_cfg_combination(fn):
    g = _gen(1)
    d_c = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    d_u = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    assert_close(fn(d_c, d_u, 0.0), d_c, what="w = 0 (the conditional model alone)",
                 hint="with w = 0 the guided score is s(x, y)")
    # ground truth through the scores: D = x + sigma^2 s, s_w = (1 + w) s_c - w s_u
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma, w = 0.7, 2.5
    s_c, s_u = (d_c - x) / sigma**2, (d_u - x) / sigma**2
    expected = x + sigma**2 * ((1 + w) * s_c - w * s_u)
    assert_close(fn(d_c, d_u, w), expected, what=f"guided denoiser at w = {w}",
                 hint="write D_w = x + sigma^2 s_w and substitute s = (D - x) / sigma^2",
                 formula="(1 + w) d_cond - w d_uncond", rtol=1e-10, atol=1e-12,
                 mistakes=[(w * d_c - (w - 1) * d_u, "w was used as the total weight of the "
                            "conditional term; CFG's w is the extra weight beyond 1"),
                           (d_c - w * (d_c - d_u), "the guidance term points the wrong way: "
                            "it should move away from the unconditional output")])


def cfg_weights_w_not_one_plus_w(d_cond, d_uncond, w):
    return w * d_cond - (w - 1) * d_uncond  # guidance "w" read as the total weight


def cfg_difference_sign_flipped(d_cond, d_uncond, w):
    return d_cond - w * (d_cond - d_uncond)


# -- 10.2 classifier gradient --------------------------------------------------------------------
def _toy_classifier():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()


def check_classifier_gradient(fn):
    net = _toy_classifier()
    g = _gen(4)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    got = fn(net, x, labels)
    # central finite differences of log softmax on a few pixels of each image
    expected = torch.zeros_like(x)
    h = 1e-6
    for n in range(len(x)):
        for idx in [(0, 0, 0), (0, 1, 2), (0, 3, 3)]:
            e = torch.zeros_like(x)
            e[(n, *idx)] = h
            lp = [net(x + s * e).log_softmax(1)[n, labels[n]] for s in (1, -1)]
            expected[(n, *idx)] = (lp[0] - lp[1]) / (2 * h)
    picked = [(n, *idx) for n in range(len(x)) for idx in [(0, 0, 0), (0, 1, 2), (0, 3, 3)]]
    if tuple(got.shape) != tuple(x.shape):
        raise AssertionError(f"expected one gradient per image, shape {tuple(x.shape)}, got "
                             f"{tuple(got.shape)}")
    def at_picked(t):
        return torch.stack([t[p] for p in picked])

    wrong = {name: at_picked(f(net, x, labels)) for name, f in
             (("logit", gradient_of_logit), ("probability", gradient_of_probability),
              ("downhill", gradient_downhill))}
    assert_close(at_picked(got), at_picked(expected),
                 what="grad_x log p(y | x) against finite differences",
                 hint="log p(y | x) is the log-softmax of the logits at the requested class",
                 formula="autograd.grad(logits_fn(x).log_softmax(1).gather(1, labels[:, None])"
                         ".sum(), x)", rtol=1e-5, atol=1e-7,
                 mistakes=[(wrong["logit"], "this is the gradient of the raw logit: it misses "
                            "the normalisation (the logsumexp over classes)"),
                           (wrong["probability"], "this is the gradient of p(y | x), not of "
                            "log p(y | x): it is p times too small"),
                           (wrong["downhill"], "the sign is flipped: guidance climbs log p")])
    assert not x.requires_grad, "the input x should not be changed to require gradients"


def gradient_of_logit(logits_fn, x, labels):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(logits_fn(x).gather(1, labels[:, None]).sum(), x)[0]


def gradient_of_probability(logits_fn, x, labels):
    x = x.detach().requires_grad_(True)
    p = logits_fn(x).softmax(1).gather(1, labels[:, None]).sum()
    return torch.autograd.grad(p, x)[0]


def gradient_downhill(logits_fn, x, labels):
    x = x.detach().requires_grad_(True)
    log_p = logits_fn(x).log_softmax(1).gather(1, labels[:, None]).sum()
    return -torch.autograd.grad(log_p, x)[0]


# -- 10.3 replacement step -----------------------------------------------------------------------
def check_replacement_step(fn):
    g = _gen(5)
    x = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    z = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 5, 5, generator=g) < 0.5).double()
    sigma = 0.8
    out = fn(x.clone(), mask, y, sigma, z)
    known = mask.bool()
    assert_close(out[~known], x[~known], what="unknown pixels",
                 hint="pixels with mask = 0 are the sampler's: leave them unchanged")
    assert_close(out[known], (y + sigma * z)[known], what="known pixels",
                 hint="the state is a noisy image at level sigma: what do the known pixels of "
                      "such an image look like?", formula="mask * (y + sigma z) + (1 - mask) x",
                 rtol=1e-10, mistakes=[(y[known], "the known pixels were put in clean; the rest "
                                        "of the state carries noise of std sigma")])


def replacement_without_noise(x, mask, y, sigma, z):
    return mask * y + (1 - mask) * x


def replacement_mask_inverted(x, mask, y, sigma, z):
    return (1 - mask) * (y + sigma * z) + mask * x


# -- 10.4 PSNR -----------------------------------------------------------------------------------
def check_psnr(fn):
    ref = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    x = ref.clone()
    x[0] += 0.1  # MSE 0.01 -> 20 dB
    x[1, :, :2] += 0.5  # half the pixels off by 0.5: MSE 0.125 -> 9.03 dB
    x[2] += 0.01  # MSE 1e-4 -> 40 dB
    expected = torch.tensor([20.0, 10 * math.log10(8), 40.0], dtype=torch.float64)
    assert_close(fn(x, ref), expected, what="PSNR of three images (dB)",
                 hint="one MSE per image, over its own pixels, then the decibels",
                 formula="10 log10(1 / MSE_n)", rtol=1e-9, atol=1e-9,
                 mistakes=[(2 * expected, "20 log10 is for amplitudes; the MSE is a power")])


def psnr_twenty_log(x, ref):
    return 20 * torch.log10(1 / (x - ref).square().flatten(1).mean(1))


def psnr_of_the_batch_mse(x, ref):
    return (10 * torch.log10(1 / (x - ref).square().mean())).expand(len(x))


# -- 10.5 Tweedie --------------------------------------------------------------------------------
def check_tweedie_denoise(fn):
    # Gaussian data N(mu, v I) blurred by sigma: score -(x - mu) / (v + sigma^2); the posterior
    # mean is mu + v / (v + sigma^2) (x - mu).
    mu, v, sigma = 0.3, 0.5, 0.8
    x = torch.randn(4, 1, 3, 3, generator=_gen(6), dtype=torch.float64)

    def score(t, s):
        return -(t - mu) / (v + s**2)

    assert_close(fn(x, score, sigma), mu + v / (v + sigma**2) * (x - mu),
                 what="E[x0 | x] for Gaussian data N(0.3, 0.5)",
                 hint="the score points towards where clean images are likely; how far to step "
                      "depends on the noise variance", formula="x + sigma^2 score(x, sigma)",
                 rtol=1e-10,
                 mistakes=[(x + sigma * score(x, sigma), "the step uses sigma, not sigma^2"),
                           (x - sigma**2 * score(x, sigma), "the step goes against the score")])


def tweedie_sigma_not_squared(x, score, sigma):
    return x + sigma * score(x, sigma)


def tweedie_sign_flipped(x, score, sigma):
    return x - sigma**2 * score(x, sigma)


EXERCISES = [
    Exercise("exercise_cfg_combination", check_cfg_combination,
             [cfg_weights_w_not_one_plus_w, cfg_difference_sign_flipped]),
    Exercise("exercise_classifier_gradient", check_classifier_gradient,
             [gradient_of_logit, gradient_of_probability, gradient_downhill]),
    Exercise("exercise_replacement_step", check_replacement_step,
             [replacement_without_noise, replacement_mask_inverted]),
    Exercise("exercise_psnr", check_psnr, [psnr_twenty_log, psnr_of_the_batch_mse]),
    Exercise("exercise_tweedie_denoise", check_tweedie_denoise,
             [tweedie_sigma_not_squared, tweedie_sign_flipped]),
]
(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("10", EXERCISES)
