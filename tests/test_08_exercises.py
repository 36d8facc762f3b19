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


# -- 8.3 DDPM ancestral step, derived ----------------------------------------------------------
def _gaussian_step_setting(c, m, abar_prev, beta):
    """Data N(m, c I) in 2D. Returns the laws of x_{i-1} and x_i as (mean, var), alpha_bar_i,
    and the exact noise predictor eps(x_i) = -sqrt(1 - alpha_bar_i) grad log p_i(x_i)."""
    mean1, var1 = math.sqrt(abar_prev) * m, abar_prev * c + 1 - abar_prev  # p_{i-1}
    mean2, var2 = math.sqrt(1 - beta) * mean1, (1 - beta) * var1 + beta  # p_i
    abar = abar_prev * (1 - beta)
    eps_of = lambda x: math.sqrt(1 - abar) * (x - mean2) / var2
    return (mean1, var1), (mean2, var2), abar, eps_of


def check_ddpm_ancestral_step(fn):
    m0 = torch.tensor([0.7, -1.2], dtype=F64)
    x1 = torch.ones(1, 1, dtype=F64)
    assert_close(fn(x1, 0 * x1, 0.19, 0.5, 0.0, 0 * x1), torch.tensor([[1 / 0.9]], dtype=F64),
                 what="the worked example (x = 1, eps_pred = 0, beta = 0.19)",
                 hint="with no predicted noise the step only undoes the shrinking of the "
                      "forward step", rtol=1e-10)
    gen = _gen(7)
    for c, abar_prev, beta in ((0.5, 0.9, 0.02), (2.0, 0.3, 0.2), (0.05, 0.99, 0.4)):
        (mean1, var1), (mean2, var2), abar, eps_of = _gaussian_step_setting(c, m0, abar_prev,
                                                                            beta)
        x = mean2 + math.sqrt(var2) * torch.randn(30, 2, generator=gen, dtype=F64)
        # Gaussian conditioning: Cov(x_{i-1}, x_i) = sqrt(1 - beta) var1 (per coordinate)
        posterior_mean = mean1 + math.sqrt(1 - beta) * var1 / var2 * (x - mean2)
        z = torch.randn(30, 2, generator=gen, dtype=F64)
        assert_close(fn(x, eps_of(x), beta, abar, 0.0, z), posterior_mean,
                     what=f"sigma_i = 0 on Gaussian data (c={c}, alpha_bar_i={abar:.3g}, "
                          f"beta_i={beta}): E[x_(i-1) | x_i] by Gaussian conditioning",
                     hint="(a) Tweedie for y = a x + b z with a = sqrt(1 - beta_i); (b) "
                          "eps_pred estimates the noise of x_i relative to x_0, whose "
                          "standard deviation is sqrt(1 - alpha_bar_i), not sqrt(beta_i)",
                     formula="x_(i-1) = (x_i - beta_i / sqrt(1 - alpha_bar_i) eps_pred) / "
                             "sqrt(1 - beta_i) + sigma_i z",
                     mistakes=[(ddpm_step_missing_rescale(x, eps_of(x), beta, abar, 0.0, z),
                                "Tweedie's mean is divided by the forward step's scale "
                                "sqrt(1 - beta_i)"),
                               (ddpm_step_without_sqrt(x, eps_of(x), beta, abar, 0.0, z),
                                "the score is -eps / sqrt(1 - alpha_bar_i): a standard "
                                "deviation, not a variance"),
                               (ddpm_step_noise_of_one_step(x, eps_of(x), beta, abar, 0.0, z),
                                "eps_pred is the noise of x_i relative to x_0 (std "
                                "sqrt(1 - alpha_bar_i)), not of the last step (std sqrt(beta_i))")],
                     rtol=1e-9, atol=1e-12)
    # With the exact posterior variance as sigma_i^2, samples of p_i become samples of p_{i-1}.
    c, abar_prev, beta, n = 0.5, 0.6, 0.3, 40_000
    (mean1, var1), (mean2, var2), abar, eps_of = _gaussian_step_setting(c, m0, abar_prev, beta)
    posterior_var = var1 - (1 - beta) * var1**2 / var2
    x = mean2 + math.sqrt(var2) * torch.randn(n, 2, generator=gen, dtype=F64)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    out = fn(x, eps_of(x), beta, abar, math.sqrt(posterior_var), z)
    # tolerances: 5 standard errors of a mean (sqrt(var / n)) and of a variance (var sqrt(2/n))
    assert_close(out.mean(0), mean1.expand(2), what=f"mean of {n} steps from p_i",
                 hint="the noise must be added, sigma_i z, with mean zero",
                 atol=5 * math.sqrt(var1 / n), rtol=0)
    assert_close(out.var(0), torch.full((2,), var1, dtype=F64),
                 what=f"variance of {n} steps from p_i (should be p_(i-1)'s, {var1:.4f})",
                 hint="the added noise sigma_i z must be independent of the mean and have "
                      "variance sigma_i^2", atol=5 * var1 * math.sqrt(2 / n), rtol=0)


def ddpm_step_without_sqrt(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    return (x - beta_i / (1 - alpha_bar_i) * eps_pred) / (1 - beta_i) ** 0.5 + sigma_i * z


def ddpm_step_missing_rescale(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    return x - beta_i / (1 - alpha_bar_i) ** 0.5 * eps_pred + sigma_i * z


def ddpm_step_noise_of_one_step(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    return (x - beta_i ** 0.5 * eps_pred) / (1 - beta_i) ** 0.5 + sigma_i * z


def ddpm_step_noise_subtracted(x, eps_pred, beta_i, alpha_bar_i, sigma_i, z):
    ref = (x - beta_i / (1 - alpha_bar_i) ** 0.5 * eps_pred) / (1 - beta_i) ** 0.5
    return ref - sigma_i * z.abs()  # a noise with non-zero mean


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
             [ddpm_step_without_sqrt, ddpm_step_missing_rescale, ddpm_step_noise_of_one_step,
              ddpm_step_noise_subtracted]),
    Exercise("exercise_corrector_step_size", check_corrector_step_size,
             [step_size_not_squared, step_size_missing_two]),
    Exercise("exercise_hutchinson_divergence", check_hutchinson_divergence,
             [hutchinson_without_jacobian, hutchinson_trace_of_jacobian_transposed_wrong_probe]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("08", EXERCISES)


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


def test_ddpm_step_check_uses_ground_truth_not_the_formula():
    """8.3 is checked against Gaussian conditioning and the law of the output; the one-step-noise
    mistake (eps scaled by sqrt(beta_i)) agrees with the answer at the worked example, so only
    the Gaussian cases catch it, with a message that says what is wrong."""
    x1 = torch.ones(1, 1, dtype=F64)
    assert ddpm_step_noise_of_one_step(x1, 0 * x1, 0.19, 0.5, 0.0, 0 * x1).item() == \
        pytest.approx(1 / 0.9)
    with pytest.raises(AssertionError, match="not of the last step"):
        check_ddpm_ancestral_step(ddpm_step_noise_of_one_step)
    with pytest.raises(AssertionError, match="mean of 40000 steps"):
        check_ddpm_ancestral_step(ddpm_step_noise_subtracted)
