"""Checks for the exercises of 08_score_sde.py (see common/exercises.py for the mechanism)."""

import math

import pytest
import torch

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module

pytestmark = pytest.mark.ch08
F64 = torch.float64
m = load_module("08")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- 8.1 prior mismatch --------------------------------------------------------------------------
def check_prior_mismatch_kl(fn):
    gen = _gen(0)
    A = torch.randn(3, 3, generator=gen, dtype=F64)
    cov = A @ A.T + 0.3 * torch.eye(3, dtype=F64)
    mean = torch.randn(3, generator=gen, dtype=F64)
    for alpha, sigma in ((0.0066, 0.99998), (0.5, 0.8), (1.0, 10.0)):
        S = alpha**2 * cov + sigma**2 * torch.eye(3, dtype=F64)
        p_T = torch.distributions.MultivariateNormal(alpha * mean, S)
        prior = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=F64),
                                                       torch.eye(3, dtype=F64))
        expected = torch.distributions.kl_divergence(p_T, prior)
        assert_close(torch.as_tensor(fn(mean, cov, alpha, sigma)), expected,
                     what=f"KL(p_T || N(0, I)) for alpha_T={alpha}, sigma_T={sigma}",
                     hint="p_T = N(alpha mean, alpha^2 cov + sigma^2 I); KL(N(m,S)||N(0,I)) = "
                          "1/2 [tr S + |m|^2 - D - log det S]", rtol=1e-8)


def kl_reversed(mean, cov, alpha_T, sigma_T):
    D = mean.shape[0]
    m = alpha_T * mean
    S = alpha_T**2 * cov + sigma_T**2 * torch.eye(D, dtype=cov.dtype)
    P = torch.linalg.inv(S)  # KL(N(0, I) || N(m, S))
    return 0.5 * (torch.trace(P) + m @ P @ m - D + torch.logdet(S))


def kl_forgets_alpha_on_cov(mean, cov, alpha_T, sigma_T):
    D = mean.shape[0]
    m = alpha_T * mean
    S = cov + sigma_T**2 * torch.eye(D, dtype=cov.dtype)
    return 0.5 * (torch.trace(S) + m @ m - D - torch.logdet(S))


# -- 8.2 Euler ODE sampler ----------------------------------------------------------------------
def _reference_euler(sde, score_fn, x, n_steps, eps):
    ts = torch.linspace(sde.T, eps, n_steps + 1, dtype=F64)
    for i in range(n_steps):
        t = torch.full((len(x),), ts[i].item(), dtype=F64)
        x = x - sde.reverse_drift(x, t, score_fn(x, t), probability_flow=True) * (ts[i] - ts[i + 1])
    return x


def check_euler_ode_sampler(fn):
    from common.datasets import GaussianMixture

    gauss = GaussianMixture([1.0], [[0.5, -0.3]], [[[1.0, 0.6], [0.6, 0.8]]])
    for sde in (m.VPSDE(), m.VESDE()):
        score = m.exact_score_fn(gauss, sde)
        x_T = sde.prior_sample((50, 2), _gen(5), F64)
        for n in (1, 7):
            expected = _reference_euler(sde, score, x_T.clone(), n, 1e-3)
            assert_close(fn(sde, score, x_T.clone(), n, 1e-3), expected,
                         what=f"{sde.name}: Euler probability-flow ODE with {n} step(s)",
                         hint="x <- x - [f - 1/2 g^2 s](x, t_i) * (t_i - t_{i+1}), times from T "
                              "down to eps, drift evaluated at the start of each step",
                         rtol=1e-8, atol=1e-8)
    # and it transports the prior to the data: many steps reproduce the data's mean
    sde = m.VPSDE()
    x = fn(sde, m.exact_score_fn(gauss, sde), sde.prior_sample((4000, 2), _gen(6), F64), 200,
           1e-3)
    assert_close(x.mean(0), gauss.mean(), what="mean of 4000 samples after 200 Euler steps (VP)",
                 hint="the ODE maps the prior to the data", atol=0.08, rtol=0)


def euler_forward_in_time(sde, score_fn, x_T, n_steps, eps=1e-3):
    ts = torch.linspace(sde.T, eps, n_steps + 1, dtype=F64)
    x = x_T
    for i in range(n_steps):
        t = torch.full((len(x),), ts[i].item(), dtype=F64)
        x = x + sde.reverse_drift(x, t, score_fn(x, t), probability_flow=True) * (ts[i] - ts[i + 1])
    return x


def euler_with_sde_drift(sde, score_fn, x_T, n_steps, eps=1e-3):
    ts = torch.linspace(sde.T, eps, n_steps + 1, dtype=F64)
    x = x_T
    for i in range(n_steps):
        t = torch.full((len(x),), ts[i].item(), dtype=F64)
        x = x - sde.reverse_drift(x, t, score_fn(x, t)) * (ts[i] - ts[i + 1])
    return x


# -- 8.3 DDPM ancestral step --------------------------------------------------------------------
def check_ddpm_ancestral_step(fn):
    gen = _gen(7)
    x, eps, z = torch.randn(3, 30, 2, generator=gen, dtype=F64).unbind()
    for beta, abar, sig in ((0.02, 0.5, 0.1), (0.2, 0.9, 0.3), (1e-4, 1e-3, 0.0)):
        score = -eps / math.sqrt(1 - abar)
        expected = (x + beta * score) / math.sqrt(1 - beta) + sig * z
        assert_close(fn(x, eps, beta, abar, sig, z), expected,
                     what=f"DDPM step with beta={beta}, alpha_bar={abar}, sigma={sig}",
                     hint="substitute s = -eps / sqrt(1 - alpha_bar) into (x + beta s) / "
                          "sqrt(1 - beta), then add sigma z", rtol=1e-10)


def ddpm_step_without_sqrt(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    return (x - beta_i / (1 - alpha_bar_i) * eps_pred) / (1 - beta_i) ** 0.5 + sigma_i * z


def ddpm_step_missing_rescale(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    return x - beta_i / (1 - alpha_bar_i) ** 0.5 * eps_pred + sigma_i * z


# -- 8.4 corrector step size --------------------------------------------------------------------
def check_corrector_step_size(fn):
    gen = _gen(3)
    s = 3 * torch.randn(64, 2, generator=gen, dtype=F64)
    z = torch.randn(64, 2, generator=gen, dtype=F64)
    for snr, alpha in ((0.16, 1.0), (0.05, 0.9)):
        eps = torch.as_tensor(fn(s, z, snr, alpha), dtype=F64)
        ratio = (eps * s).norm(dim=1).mean() / ((2 * eps).sqrt() * z).norm(dim=1).mean()
        assert_close(ratio, torch.tensor(snr * math.sqrt(alpha), dtype=F64),
                     what=f"signal-to-noise ratio reached with your eps (snr={snr}, "
                          f"alpha={alpha})",
                     hint="||eps s|| / ||sqrt(2 eps) z|| = sqrt(eps/2) |s| / |z|; solve for eps "
                          "using batch-mean norms", rtol=1e-6)


def step_size_not_squared(score, z, snr, alpha=1.0):
    return 2 * alpha * snr * z.norm(dim=1).mean() / score.norm(dim=1).mean()


def step_size_missing_two(score, z, snr, alpha=1.0):
    return alpha * (snr * z.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2


# -- 8.5 Hutchinson -----------------------------------------------------------------------------
def check_hutchinson_divergence(fn):
    gen = _gen(4)
    W = torch.randn(3, 3, generator=gen, dtype=F64)

    def field(x):
        return torch.tanh(x @ W.T) + x**2

    x = torch.randn(40, 3, generator=gen, dtype=F64)
    v = torch.randint(0, 2, (40, 3), generator=gen).to(F64) * 2 - 1
    J = torch.func.vmap(torch.func.jacrev(lambda z: field(z[None])[0]))(x)  # (N, 3, 3)
    expected = torch.einsum("ni,nij,nj->n", v, J, v)
    assert_close(fn(field, x, v), expected, what="v^T (d fn/dx) v at 40 points",
                 hint="one torch.autograd.grad of (fn(x) * v).sum() gives v^T J per sample; "
                      "dot it with v", rtol=1e-8, atol=1e-10)


def hutchinson_without_jacobian(fn, x, v):
    return (fn(x) * v).sum(1)


def hutchinson_trace_of_jacobian_transposed_wrong_probe(fn, x, v):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)  # 1^T J, not v^T J
    return (g * v).sum(1)


EXERCISES = [
    Exercise("exercise_prior_mismatch_kl", check_prior_mismatch_kl,
             [kl_reversed, kl_forgets_alpha_on_cov]),
    Exercise("exercise_euler_ode_sampler", check_euler_ode_sampler,
             [euler_forward_in_time, euler_with_sde_drift]),
    Exercise("exercise_ddpm_ancestral_step", check_ddpm_ancestral_step,
             [ddpm_step_without_sqrt, ddpm_step_missing_rescale]),
    Exercise("exercise_corrector_step_size", check_corrector_step_size,
             [step_size_not_squared, step_size_missing_two]),
    Exercise("exercise_hutchinson_divergence", check_hutchinson_divergence,
             [hutchinson_without_jacobian, hutchinson_trace_of_jacobian_transposed_wrong_probe]),
]

test_reference_passes, test_wrong_answer_fails, test_your_answer = exercise_tests("08", EXERCISES)


def test_every_exercise_in_the_module_is_checked():
    from common.exercises import list_exercises

    assert sorted(n for n, _ in list_exercises(vars(m))) == sorted(e.name for e in EXERCISES)


def test_docstring_examples_hold():
    from common.modules import load_solutions

    sol = load_solutions("08")
    mean, cov = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    a = math.exp(-10.05 / 2)
    kl = sol.exercise_prior_mismatch_kl(mean, cov, a, math.sqrt(1 - a * a))
    assert abs(kl.item()) < 1e-12
    sde = m.VPSDE()
    x = torch.ones(3, 2, dtype=F64)
    score = lambda y, t: -y
    one = sol.exercise_euler_ode_sampler(sde, score, x, 1, 1e-3)
    t = torch.ones(3, dtype=F64)
    torch.testing.assert_close(one, x - sde.reverse_drift(x, t, -x, True) * (1 - 1e-3))
    step = sol.exercise_ddpm_ancestral_step(torch.ones(1, 1), torch.zeros(1, 1), 0.19, 0.5, 0.0,
                                            torch.zeros(1, 1))
    assert step.item() == pytest.approx(1 / 0.9)
    eps = sol.exercise_corrector_step_size(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                                           0.1, 1.0)
    assert eps.item() == pytest.approx(0.005)
    div = sol.exercise_hutchinson_divergence(lambda z: 3 * z, torch.zeros(1, 2),
                                             torch.tensor([[1.0, -1.0]]))
    assert div.item() == pytest.approx(6.0)
