"""Checks for the exercises of 06_score_networks.py.

Each check compares an implementation with ground truth (the module's own building blocks, a
closed form, a Monte Carlo estimate with a tolerance from its standard error, or the EMA class
run step by step) and explains what went wrong. ``exercise_tests`` turns the checks into three
tests: the reference passes, every wrong answer below fails, and your answer passes (or is
skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module, load_solutions

pytestmark = pytest.mark.ch06
F64 = torch.float64
m = load_module("06")


# -- 6.1 Fourier features ------------------------------------------------------------------------
def check_fourier_features(fn):
    assert_close(fn(torch.tensor([0.25], dtype=F64), torch.tensor([1.0], dtype=F64)),
                 torch.tensor([[1.0, 0.0]], dtype=F64), what="the worked example t = 0.25, W = 1",
                 hint="sin(2 pi * 1 * 0.25) = 1 and cos(...) = 0", atol=1e-12)
    emb = m.GaussianFourierFeatures(16, scale=3.0, generator=0).double()
    t = torch.linspace(-2, 2, 41, dtype=F64)
    assert_close(fn(t, emb.W), emb(t), what="features of 41 times with 8 frequencies (scale 3)",
                 hint="shape (N, 2K): all sines first, then all cosines; angles 2 pi W t",
                 rtol=1e-10, atol=1e-12)


def fourier_missing_two_pi(t, W):
    angle = t[:, None] * W[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def fourier_interleaved(t, W):
    angle = 2 * math.pi * t[:, None] * W[None, :]
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # sin, cos, sin, cos, ...


# -- 6.2 sigma^2-weighted DSM loss ---------------------------------------------------------------
def _dsm_case():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 2, generator=gen, dtype=F64)
    z = torch.randn(64, 2, generator=gen, dtype=F64)
    sigma = torch.exp(torch.empty(64, dtype=F64).uniform_(-4, 1.5, generator=gen))
    return x0, sigma, z


def check_weighted_dsm_loss(fn):
    x0, sigma, z = _dsm_case()
    oracle = lambda x, s: -(x - x0) / s[:, None] ** 2  # = -z / sigma at x = x0 + sigma z
    assert_close(fn(oracle, x0, sigma, z), torch.zeros(64, dtype=F64),
                 what="loss of the noise oracle s = -z / sigma",
                 hint="x = x0 + sigma z and the loss is 1/2 |sigma s + z|^2", atol=1e-10)
    zero = lambda x, s: torch.zeros_like(x)
    assert_close(fn(zero, x0, sigma, z), 0.5 * z.square().sum(1),
                 what="loss of s = 0 (must not depend on sigma)",
                 hint="with the sigma^2 weight, s = 0 costs 1/2 |z|^2 at every level",
                 rtol=1e-10, atol=1e-12)
    mix = GaussianMixture.eight_gaussians()
    score = lambda x, s: mix.perturbed_score(x, 0.0) + 0.3 * x * s[:, None]  # some (x, sigma) map
    expected = m.conditional_dsm_loss(score, x0, sigma, z)
    assert_close(fn(score, x0, sigma, z), expected,
                 what="loss of a score that depends on x and sigma, 64 samples",
                 hint="call score_fn(x0 + sigma z, sigma) with the per-sample sigma (N,)",
                 rtol=1e-10, atol=1e-12)


def dsm_unweighted(score_fn, x0, sigma, z):
    s = score_fn(x0 + sigma[:, None] * z, sigma)
    return 0.5 * (s + z / sigma[:, None]).square().sum(1)


def dsm_sign_flipped(score_fn, x0, sigma, z):
    s = score_fn(x0 + sigma[:, None] * z, sigma)
    return 0.5 * (sigma[:, None] * s - z).square().sum(1)


def dsm_score_at_clean_data(score_fn, x0, sigma, z):
    s = score_fn(x0, sigma)
    return 0.5 * (sigma[:, None] * s + z).square().sum(1)


# -- 6.3 RMS score of perturbed Gaussian data ---------------------------------------------------
def check_gaussian_score_rms(fn):
    assert_close(fn(torch.eye(2, dtype=F64), torch.tensor([1.0], dtype=F64)),
                 torch.tensor([1.0], dtype=F64), what="the worked example C = I, D = 2, sigma = 1",
                 hint="sqrt(tr((I + I)^{-1})) = sqrt(2 / 2)", rtol=1e-10)
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.05]], dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 30.0], dtype=F64)
    expected = torch.stack([torch.linalg.inv(cov + s**2 * torch.eye(3, dtype=F64)).trace().sqrt()
                            for s in sigma])
    levels = ", ".join(f"{s:g}" for s in sigma.tolist())
    assert_close(fn(cov, sigma), expected,
                 what=f"RMS score for a 3D covariance at sigma = [{levels}] (index i is the "
                      f"i-th sigma)",
                 hint="E|s|^2 = tr((C + sigma^2 I)^{-1}) = sum_k 1 / (lambda_k + sigma^2): "
                      "check sigma squared (the noise variance, not sigma, adds to C); the "
                      "answer is sqrt(D)/sigma only for large sigma", rtol=1e-8)
    # Monte Carlo: sample x = x0 + sigma z and average |s(x)|^2 with the exact score.
    gen = torch.Generator().manual_seed(2)
    g = GaussianMixture([1.0], torch.zeros(1, 3, dtype=F64), cov[None])
    for s in (0.1, 2.0):
        x = g.perturbed(s).sample(100_000, gen, dtype=F64)
        sq = g.perturbed_score(x, s).square().sum(1)
        mc, se = sq.mean().sqrt(), sq.std() / math.sqrt(len(sq)) / (2 * sq.mean().sqrt())
        value = fn(cov, torch.tensor([s], dtype=F64))[0]
        if abs(value - mc) > 5 * se:
            raise AssertionError(f"RMS score at sigma = {s}: Monte Carlo gives {mc:.4f} +- "
                                 f"{se:.4f}, got {float(value):.4f}. Hint: check sigma squared")


def rms_pure_law(cov, sigma):
    return math.sqrt(cov.shape[0]) / sigma


def rms_sigma_not_squared(cov, sigma):
    lam = torch.linalg.eigvalsh(cov)
    return (1.0 / (lam[None, :] + sigma[:, None])).sum(1).sqrt()  # sigma where sigma^2 belongs


def rms_trace_of_inverse_wrong(cov, sigma):
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    return torch.stack([(1.0 / (cov + s**2 * eye).trace()).sqrt() for s in sigma])


# -- 6.4 EMA closed form ------------------------------------------------------------------------
def check_ema_closed_form(fn):
    gen = torch.Generator().manual_seed(3)
    history = torch.randn(60, 5, generator=gen, dtype=F64).cumsum(0)  # a random walk of weights
    result = fn(history, 0.9)
    if isinstance(result, torch.Tensor) and result.dtype != history.dtype:
        raise AssertionError(f"history is {history.dtype} but the result is {result.dtype}. "
                             f"Hint: keep history's dtype (build the weights with "
                             f"dtype=history.dtype); float32 loses the digits the check needs")
    assert_close(fn(torch.tensor([[2.0], [1.0], [1.0]], dtype=F64), 0.5),
                 torch.tensor([1.25], dtype=F64), what="the worked example (theta_0 = 2)",
                 hint="0.5^2 * 2 + 0.5 * (0.5 * 1 + 1 * 1): theta_0 keeps weight d^n, "
                      "not (1 - d) d^n", rtol=1e-12)
    for decay in (0.0, 0.9, 0.99):
        net = torch.nn.Linear(5, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(history[0])
        ema = m.EMA(net, decay)
        for row in history[1:]:
            with torch.no_grad():
                net.weight.copy_(row)
            ema.update(net)
        assert_close(fn(history, decay), ema.shadow["weight"][0],
                     what=f"EMA of 59 updates with decay {decay}, against module 06's EMA class",
                     hint="theta_0 keeps weight d^n; theta_k gets (1 - d) d^(n - k)",
                     rtol=1e-10, atol=1e-10)


def ema_weights_reversed(history, decay):
    n = history.shape[0] - 1
    k = torch.arange(n + 1, dtype=history.dtype)
    w = (1 - decay) * decay ** k
    w[0] = decay**n
    return w @ history


def ema_forgets_initial_weights(history, decay):
    n = history.shape[0] - 1
    k = torch.arange(1, n + 1, dtype=history.dtype)
    return ((1 - decay) * decay ** (n - k)) @ history[1:]


def ema_initial_weight_like_the_others(history, decay):
    n = history.shape[0] - 1
    k = torch.arange(n + 1, dtype=history.dtype)
    return ((1 - decay) * decay ** (n - k)) @ history  # theta_0 gets (1 - d) d^n, not d^n


def ema_in_float32(history, decay):
    n = history.shape[0] - 1
    k = torch.arange(n + 1, dtype=torch.float32)
    w = (1 - decay) * decay ** (n - k)
    w[0] = decay**n
    return w @ history.float()


# -- 6.5 warm-up + cosine -----------------------------------------------------------------------
def check_warmup_cosine_lambda(fn):
    cases = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.5, 110: 0.0, 500: 0.0}
    for step, expected in cases.items():
        value = fn(step, 10, 110)
        if not math.isclose(value, expected, abs_tol=1e-9):
            raise AssertionError(f"warm-up 10, total 110, step {step}: expected {expected}, "
                                 f"got {value}. Hint: (k + 1) / W below W, then "
                                 f"1/2 (1 + cos(pi (k - W) / (T - W)))")
    warm = m.warmup_lr_lambda(25)
    for step in range(25):
        if not math.isclose(fn(step, 25, 1000), warm(step)):
            raise AssertionError(f"step {step}: the warm-up part should equal "
                                 f"warmup_lr_lambda(25)({step}) = {warm(step)}")
    values = [fn(k, 25, 1000) for k in range(25, 1000)]
    if any(b > a + 1e-12 for a, b in zip(values, values[1:])):
        raise AssertionError("after the warm-up the multiplier must never increase")


def cosine_without_warmup(step, warmup_steps, total_steps):
    if step >= total_steps:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


def cosine_off_by_one(step, warmup_steps, total_steps):
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def cosine_missing_half(step, warmup_steps, total_steps):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    return math.cos(0.5 * math.pi * (step - warmup_steps) / (total_steps - warmup_steps))


EXERCISES = [
    Exercise("exercise_fourier_features", check_fourier_features,
             [fourier_missing_two_pi, fourier_interleaved]),
    Exercise("exercise_weighted_dsm_loss", check_weighted_dsm_loss,
             [dsm_unweighted, dsm_sign_flipped, dsm_score_at_clean_data]),
    Exercise("exercise_gaussian_score_rms", check_gaussian_score_rms,
             [rms_pure_law, rms_sigma_not_squared, rms_trace_of_inverse_wrong]),
    Exercise("exercise_ema_closed_form", check_ema_closed_form,
             [ema_weights_reversed, ema_forgets_initial_weights,
              ema_initial_weight_like_the_others, ema_in_float32]),
    Exercise("exercise_warmup_cosine_lambda", check_warmup_cosine_lambda,
             [cosine_without_warmup, cosine_off_by_one, cosine_missing_half]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("06", EXERCISES)


def test_examples_in_docstrings_hold():
    """The worked examples quoted in the stubs' docstrings, computed with the reference."""
    sol = load_solutions("06")
    x0, sigma, z = _dsm_case()
    zero = sol.exercise_weighted_dsm_loss(lambda x, s: torch.zeros_like(x), x0, sigma, z)
    torch.testing.assert_close(zero, 0.5 * z.square().sum(1))
    big = sol.exercise_gaussian_score_rms(torch.eye(2, dtype=F64), torch.tensor([1e3], dtype=F64))
    assert big.item() == pytest.approx(math.sqrt(2) / 1e3, rel=1e-5)
    small = sol.exercise_gaussian_score_rms(torch.diag(torch.tensor([4.0, 0.25], dtype=F64)),
                                            torch.tensor([1e-6], dtype=F64))
    assert small.item() == pytest.approx(math.sqrt(0.25 + 4.0), rel=1e-6)  # sqrt(tr C^{-1})
    assert sol.exercise_warmup_cosine_lambda(60, 10, 110) == pytest.approx(0.5)
    ema = sol.exercise_ema_closed_form(torch.tensor([[2.0], [1.0], [1.0]], dtype=F64), 0.5)
    assert ema.item() == pytest.approx(1.25)
