"""Tests of module 02's teaching code: every identity it states, checked numerically.

The "must verify" items of the curriculum:
- ISM - ESM is constant in the parameters across a sweep (exactly on a 1D grid, and within
  Monte Carlo error in 2D for neural-network scores);
- DSM - ESM on the perturbed density is constant (same two ways), equal to C_sigma;
- Stein's identity E_p[s_p f + grad f] = 0 for several test functions f.
Each is paired with a deliberately broken variant that the same check must reject, so the
tests can fail.
"""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.modules import load_module

pytestmark = pytest.mark.ch02
m = load_module("02")
F64 = torch.float64


def _mlp(D, seed, hidden=16):
    torch.manual_seed(seed)
    return m.mlp_score_net(D, hidden).double()


def _weight_line(net, seed):
    """Models along a line theta_0 + t delta in the network's weight space, t in [-1, 1]."""
    theta0 = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    delta = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    for t in torch.linspace(-1, 1, 7, dtype=F64):
        torch.nn.utils.vector_to_parameters(theta0 + t * 0.5 * delta, net.parameters())
        yield net


# -- the Jacobian trace -------------------------------------------------------------------------
def test_jacobian_trace_equals_trace_of_full_jacobian(gen):
    net = _mlp(5, 0)
    x = torch.randn(7, 5, generator=gen, dtype=F64)
    full = torch.stack([torch.autograd.functional.jacobian(lambda v: net(v[None])[0], xi)
                        for xi in x])  # (7, 5, 5)
    torch.testing.assert_close(m.jacobian_trace(net, x), full.diagonal(dim1=1, dim2=2).sum(1))


def test_jacobian_trace_flattens_image_shaped_inputs(gen):
    """s(x) = tanh(w * x) elementwise on (N, 2, 3, 3): tr = sum w (1 - tanh^2(w x))."""
    w = torch.rand(2, 3, 3, generator=gen, dtype=F64) + 0.5
    x = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    expected = (w * (1 - torch.tanh(w * x) ** 2)).flatten(1).sum(1)
    torch.testing.assert_close(m.jacobian_trace(lambda z: torch.tanh(w * z), x), expected)


def test_jacobian_trace_of_constant_and_bad_shapes():
    x = torch.zeros(3, 2, dtype=F64)
    torch.testing.assert_close(m.jacobian_trace(lambda z: torch.ones(3, 2, dtype=F64), x),
                               torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="shape of its input"):
        m.jacobian_trace(lambda z: z.sum(1), x)
    with pytest.raises(ValueError, match="reduction"):
        m.ism_loss(lambda z: -z, x, reduction="sum")


def test_ism_parameter_gradient_goes_through_the_trace(gen):
    """d J_ISM / d w by autograd (create_graph=True) equals a central finite difference."""
    net = _mlp(3, 1)
    x = torch.randn(64, 3, generator=gen, dtype=F64)
    weight = net[0].weight
    m.ism_loss(net, x).backward()
    h = 1e-6
    for idx in [(0, 0), (3, 2), (7, 1)]:
        with torch.no_grad():
            weight[idx] += h
            up = m.ism_loss(net, x, create_graph=False).item()
            weight[idx] -= 2 * h
            down = m.ism_loss(net, x, create_graph=False).item()
            weight[idx] += h
        assert weight.grad[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)


def test_without_create_graph_the_trace_drops_out_of_the_parameter_gradient(gen):
    """Section 3.2: with create_graph=False, backward() sees only 1/2 |s|^2, silently."""
    net = _mlp(3, 1)
    x = torch.randn(64, 3, generator=gen, dtype=F64)
    params = list(net.parameters())
    wrong = torch.autograd.grad(m.ism_loss(net, x, create_graph=False), params)
    norm_only = torch.autograd.grad(0.5 * net(x).square().sum(1).mean(), params)
    right = torch.autograd.grad(m.ism_loss(net, x), params)
    for g_wrong, g_norm in zip(wrong, norm_only):
        torch.testing.assert_close(g_wrong, g_norm)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, right)) > 1e-3


# -- must verify: ISM - ESM is constant -----------------------------------------------------------
def _exact_offsets_1d(models, ism_fn=None):
    """ESM - ISM for each model, as exact expectations on the grid of the 1D target."""
    ism_fn = ism_fn or m.ism_loss
    p = m.target_1d()
    x, _ = m.grid_1d(p, 0.0, 1201)
    w = m.grid_weights(p.log_prob, x)
    C = (w * m.esm_minus_ism(p.score, x)).sum().item()
    offsets = torch.stack([(w * m.esm_loss(s, x, p.score, "none")).sum()
                           - (w * ism_fn(s, x, "none", create_graph=False)).sum()
                           for s in models]).detach()
    return offsets, C


def _mixture_models():
    return [m.target_1d(m2).score for m2 in (-3.0, -1.0, 0.5, 2.0, 3.5, 5.0)]


def _mlp_models_1d():
    return [lambda z, n=net: n(z) for net in _weight_line(_mlp(1, 2, hidden=32), 3)]


def _ism_trace_sign_flipped(score_fn, x, reduction="mean", create_graph=True):
    s, tr = m.score_and_jacobian_trace(score_fn, x, create_graph)
    return -tr + 0.5 * s.square().sum(1)


def test_ism_minus_esm_is_constant_exactly_in_1d():
    """On exact expectations the offset is the same for every model, and equals 1/2 E_p|s_p|^2."""
    for models in (_mixture_models(), _mlp_models_1d()):
        offsets, C = _exact_offsets_1d(models)
        assert offsets.max() - offsets.min() < 1e-9, offsets
        torch.testing.assert_close(offsets, torch.full_like(offsets, C), rtol=0, atol=1e-9)


def test_ism_constancy_check_rejects_a_wrong_trace_sign():
    offsets, _ = _exact_offsets_1d(_mixture_models(), ism_fn=_ism_trace_sign_flipped)
    assert offsets.max() - offsets.min() > 0.1


def _mc_ism_offsets(ism_fn, gen, n=4000):
    """2D Gaussian data N(m, Sigma): ESM - ISM on samples for MLP scores, with standard errors."""
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.5], [0.5, 0.7]], dtype=F64)
    prec = torch.linalg.inv(cov)
    x = mean + torch.randn(n, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T
    C = 0.5 * torch.trace(prec).item()  # 1/2 E|Sigma^{-1}(x - m)|^2 = 1/2 tr Sigma^{-1}
    z = []
    for net in _weight_line(_mlp(2, 4), 5):
        diff = (m.esm_loss(net, x, lambda v: m.gaussian_score_precision(v, mean, prec), "none")
                - ism_fn(net, x, "none", create_graph=False)).detach()
        est, se = m.mean_and_se(diff)
        z.append(abs(est.item() - C) / se.item())
    return torch.tensor(z)


def test_ism_minus_esm_is_constant_within_monte_carlo_error_in_2d(gen):
    """For MLP scores along a line in weight space, ESM - ISM = 1/2 tr Sigma^{-1} within 4 s.e."""
    z = _mc_ism_offsets(m.ism_loss, gen)
    assert (z < 4).all(), z


def test_ism_monte_carlo_check_rejects_a_wrong_trace_sign(gen):
    assert (_mc_ism_offsets(_ism_trace_sign_flipped, gen) > 4).any()


# -- must verify: DSM - ESM on the perturbed density is constant -------------------------------
@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_dsm_minus_esm_is_constant_exactly_in_1d(sigma):
    p = m.target_1d()
    p_sigma = p.perturbed(sigma)
    x, _ = m.grid_1d(p, sigma, 1001)
    moments = m.dsm_grid_moments(p, x, sigma)
    w = m.grid_weights(p_sigma.log_prob, x)
    C = (w * m.dsm_minus_esm(p_sigma.score, x, sigma)).sum().item()
    models = [m.target_1d(m2, sigma**2).score for m2 in (-3.0, 0.0, 2.0, 4.0)]
    models += [lambda z, n=net: n(z) for net in _weight_line(_mlp(1, 6, hidden=32), 7)]
    offsets = torch.stack([m.dsm_loss_on_grid(s, x, moments)
                           - (w * m.esm_loss(s, x, p_sigma.score, "none")).sum()
                           for s in models]).detach()
    torch.testing.assert_close(offsets, torch.full_like(offsets, C), rtol=0, atol=1e-9)
    # At m2 = 2 the model is p_sigma itself: ESM = 0 and DSM reaches its floor C_sigma.
    assert m.dsm_loss_on_grid(models[2], x, moments).item() == pytest.approx(C, abs=1e-9)


def _mc_dsm_offsets(gen, target_scale=1.0, n=20_000):
    """Gaussian data N(m, s0^2 I) in 2D: DSM - ESM_sigma for MLP scores, in standard errors of
    the closed-form C_sigma = D/(2 sigma^2) - D/(2 (s0^2 + sigma^2)). ``target_scale`` != 1
    breaks the DSM target on purpose."""
    D, s0, sigma = 2, 0.8, 0.5
    mean = torch.tensor([1.0, -0.5], dtype=F64)
    x0 = mean + s0 * torch.randn(n, D, generator=gen, dtype=F64)
    noise = torch.randn(n, D, generator=gen, dtype=F64)
    v = s0**2 + sigma**2
    C = D / (2 * sigma**2) - D / (2 * v)
    z = []
    for net in _weight_line(_mlp(D, 8), 9):
        if target_scale == 1.0:
            dsm = m.dsm_loss_unweighted(net, x0, sigma, noise=noise, reduction="none")
        else:  # a wrong target -(z / sigma) * scale
            dsm = 0.5 * (net(x0 + sigma * noise) + target_scale * noise / sigma).square().sum(1)
        esm = m.esm_loss(net, x0 + sigma * noise, lambda u: -(u - mean) / v, "none")
        est, se = m.mean_and_se((dsm - esm).detach())
        z.append(abs(est.item() - C) / se.item())
    return torch.tensor(z)


def test_dsm_minus_esm_is_constant_within_monte_carlo_error_in_2d(gen):
    z = _mc_dsm_offsets(gen)
    assert (z < 4).all(), z


def test_dsm_monte_carlo_check_rejects_a_wrong_target(gen):
    assert (_mc_dsm_offsets(gen, target_scale=0.5) > 4).any()


@pytest.mark.parametrize("sigma", [0.2, 0.5, 2.0])
def test_posterior_view_of_dsm(sigma):
    """Section 2.6 on the grid of the 1D mixture: E[-z/sigma | x~] = grad log p_sigma(x~), and
    C_sigma = 1/2 E tr Cov(z/sigma | x~) >= 0 (law of total variance)."""
    p = m.target_1d()
    p_sigma = p.perturbed(sigma)
    x, _ = m.grid_1d(p, sigma, 1201)
    c0, c1, c2 = m.dsm_grid_moments(p, x, sigma)  # c0: law of x~; c1 / c0: E[t | x~]
    seen = c0 > 1e-12 * c0.max()  # where p_sigma is not negligible
    torch.testing.assert_close((c1 / c0)[seen], p_sigma.score(x)[seen, 0], rtol=1e-7, atol=1e-7)
    # 1/2 sum_j c0_j Var(t | x~_j) = 1/2 E|t|^2 - 1/2 sum_j c0_j E[t | x~_j]^2 = c2 - ...
    C_posterior = (c2 - 0.5 * (c1[seen] ** 2 / c0[seen]).sum()).item()
    w = m.grid_weights(p_sigma.log_prob, x)
    C_formula = (w * m.dsm_minus_esm(p_sigma.score, x, sigma)).sum().item()
    assert C_posterior == pytest.approx(C_formula, rel=1e-9)
    assert C_formula > 0
    # Broken on purpose: dropping the score term leaves D/(2 sigma^2), which is too large.
    assert abs(C_posterior - 1 / (2 * sigma**2)) > 1e-3


# -- must verify: Stein's identity --------------------------------------------------------------
def test_stein_identity_holds_for_the_true_score(gen):
    p = m.target_2d()
    x = p.sample(20_000, gen, dtype=F64)
    for name, f in m.TEST_FUNCTIONS.items():
        mean, se = m.mean_and_se(m.stein_residual(p.score, f, x))
        assert ((mean.abs() / se) < 4).all(), (name, mean, se)
    # Vector form with g = a wrong model's score (all three means shifted): the step of ISM.
    g = GaussianMixture(p.weights, p.means + 0.7, p.covs).score
    mean, se = m.mean_and_se(m.stein_vector_residual(p.score, g, x))
    assert abs(mean.item()) < 4 * se.item()


def test_stein_identity_exposes_a_wrong_score(gen):
    """The moment-matched Gaussian passes f = 1 and f = x1 but fails the nonlinear f."""
    p = m.target_2d()
    x = p.sample(20_000, gen, dtype=F64)
    prec = torch.linalg.inv(p.covariance())

    def score_gauss(z):
        return m.gaussian_score_precision(z, p.mean(), prec)

    for name, f in m.TEST_FUNCTIONS.items():
        mean, se = m.mean_and_se(m.stein_residual(score_gauss, f, x))
        z = (mean.abs() / se).max().item()
        assert (z < 4) if name in ("1", "x₁") else (z > 8), (name, z)


def test_stein_identity_exactly_on_a_grid():
    """1D: sum_j w_j (s_p f + f') = 0 to round-off for the mixture target; nonzero for a shifted
    score."""
    p = m.target_1d()
    x, _ = m.grid_1d(p, 0.0, 1201)
    w = m.grid_weights(p.log_prob, x)
    tests = [lambda z: torch.sin(3 * z[:, 0]), lambda z: z[:, 0] ** 3,
             lambda z: torch.tanh(z[:, 0])]
    for f in tests:
        assert abs((w[:, None] * m.stein_residual(p.score, f, x)).sum().item()) < 1e-10
        shifted = (w[:, None] * m.stein_residual(lambda z: p.score(z) + 0.3, f, x)).sum().item()
        assert abs(shifted) > 1e-3


# -- closed-form fits ---------------------------------------------------------------------------
def test_gaussian_ism_solution_is_the_minimiser(gen):
    """At mu = x_bar, P = S^{-1}: grad J_ISM = 0 and J_ISM = -1/2 tr S^{-1}; BFGS finds it."""
    x = torch.randn(500, 3, generator=gen, dtype=F64) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.6]], dtype=F64) + 2.0
    mu, P = m.gaussian_ism_solution(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(torch.linalg.inv(P), torch.cov(x.T, correction=0))
    mu_ = mu.clone().requires_grad_(True)
    P_ = P.clone().requires_grad_(True)
    loss = m.ism_loss(lambda z: -(z - mu_) @ (0.5 * (P_ + P_.T)), x)
    g_mu, g_P = torch.autograd.grad(loss, (mu_, P_))
    assert g_mu.abs().max() < 1e-10 and g_P.abs().max() < 1e-10
    assert loss.item() == pytest.approx(-0.5 * torch.trace(P).item(), abs=1e-12)


def test_exp_family_solution_matches_bfgs_and_recovers_the_truth(gen):
    theta_true = torch.tensor(m.QUARTIC_THETA, dtype=F64)
    x = m.sample_by_inverse_cdf(lambda z: -m.quartic_energy(z, theta_true), -5, 5, 4000, gen)
    dpsi, d2psi = m.quartic_features(x)
    theta = m.exp_family_ism_solution(dpsi, d2psi)
    se = m.exp_family_ism_se(dpsi, d2psi, theta)
    assert ((theta - theta_true).abs() < 4 * se).all(), (theta, se)
    start = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    theta_bfgs = m.fit_by_bfgs(lambda t: m.ism_loss(lambda z: m.quartic_score(z, t), x[:, None]),
                               start, 100)[-1]
    torch.testing.assert_close(theta_bfgs, theta, rtol=0, atol=1e-8)


def test_gaussian_fit_reaches_the_closed_form_after_one_newton_step(gen):
    """Section 3.8: BFGS alone to about 1e-8; one Newton step on the quadratic J_ISM to
    round-off (checked for several samples, since BFGS's own accuracy varies)."""
    for seed in range(3):
        x = torch.randn(300, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) \
            @ torch.tensor([[1.0, 0.0], [0.6, 0.7]], dtype=F64) + 0.5
        mu, P = m.gaussian_ism_solution(x)
        target = torch.stack([P[0, 0], P[0, 1], P[1, 1], *(P @ mu)])

        def loss_fn(theta):
            P_ = torch.stack([theta[:2], theta[1:3]])
            return m.ism_loss(lambda z: -z @ P_ + theta[3:], x)

        start = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
        bfgs = m.fit_by_bfgs(loss_fn, start, 100)[-1]
        assert (bfgs - target).abs().max() < 1e-7
        assert (m.newton_step(loss_fn, bfgs) - target).abs().max() < 1e-11
        # From far away too: one step is enough because the loss is quadratic.
        assert (m.newton_step(loss_fn, start) - target).abs().max() < 1e-10


def test_fisher_divergence_of_the_quartic_fit_is_the_quadratic_form(gen):
    """Section 3.7: F(p, p_theta_hat) = 1/2 (theta_hat - theta)^T A (theta_hat - theta)."""
    theta = torch.tensor(m.QUARTIC_THETA, dtype=F64)
    theta_hat = theta + torch.tensor([0.03, -0.1, 0.05], dtype=F64)
    grid = torch.linspace(-4.0, 4.0, 4001, dtype=F64)
    w = m.grid_weights(lambda z: -m.quartic_energy(z, theta), grid)
    diff = m.quartic_score(grid, theta_hat) - m.quartic_score(grid, theta)
    fisher = (w * 0.5 * diff**2).sum()
    dpsi, _ = m.quartic_features(grid)
    A = (w[:, None] * dpsi).T @ dpsi
    d = theta_hat - theta
    assert fisher.item() == pytest.approx((0.5 * d @ A @ d).item(), rel=1e-10)


def test_score_matching_pins_down_mode_weights_poorly():
    """Section 4.3: across samples, the fitted quartic's right-mode mass scatters several times
    more than the fraction of samples in that mode (the empirical estimate)."""
    theta = torch.tensor(m.QUARTIC_THETA, dtype=F64)
    valley = m.quartic_valley(m.QUARTIC_THETA)
    grid = torch.linspace(-4.0, 4.0, 4001, dtype=F64)
    fitted, fractions = [], []
    for seed in range(30):
        x = m.sample_by_inverse_cdf(lambda z: -m.quartic_energy(z, theta), -5, 5, 2000,
                                    torch.Generator().manual_seed(seed))
        theta_hat = m.exp_family_ism_solution(*m.quartic_features(x))
        fitted.append(m.mass_above(lambda z: -m.quartic_energy(z, theta_hat), grid, valley))
        fractions.append((x > valley).double().mean().item())
    fitted, fractions = torch.tensor(fitted), torch.tensor(fractions)
    true_mass = m.mass_above(lambda z: -m.quartic_energy(z, theta), grid, valley)
    assert abs(fractions.mean().item() - true_mass) < 0.01
    assert fitted.std() > 2.5 * fractions.std(), (fitted.std(), fractions.std())
    # The valley is where E' = 0 between the wells.
    assert abs(m.quartic_score(torch.tensor(valley, dtype=F64), theta).item()) < 1e-12


def test_quartic_fits_to_gaussian_data_are_often_not_normalisable():
    """Section 4.3: on N(0, 1) data (true theta_1 = 0), theta_hat_1 < 0 about half the time."""
    negative = 0
    for seed in range(40):
        x = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=F64)
        negative += int(m.exp_family_ism_solution(*m.quartic_features(x))[0] < 0)
    assert 10 <= negative <= 30, negative


def test_quartic_score_and_features_match_autograd(gen):
    x = torch.randn(30, generator=gen, dtype=F64).requires_grad_(True)
    theta = (0.7, -1.1, 0.4)
    (grad,) = torch.autograd.grad(-m.quartic_energy(x, theta).sum(), x)
    torch.testing.assert_close(m.quartic_score(x.detach(), theta), grad)
    dpsi, d2psi = m.quartic_features(x.detach())
    torch.testing.assert_close(-(dpsi @ torch.tensor(theta, dtype=F64)), grad)
    torch.testing.assert_close(m.jacobian_trace(lambda z: m.quartic_score(z, theta),
                                                x.detach()[:, None]),
                               -(d2psi @ torch.tensor(theta, dtype=F64)))


def test_inverse_cdf_sampler_matches_the_density(gen):
    """Samples of exp(-(x - 1)^2 / (2 * 0.49)): mean 1 and variance 0.49 within 5 s.e."""
    n = 50_000
    x = m.sample_by_inverse_cdf(lambda z: -(z - 1) ** 2 / (2 * 0.49), -6, 8, n, gen)
    assert abs(x.mean().item() - 1.0) < 5 * math.sqrt(0.49 / n)
    assert abs(x.var().item() - 0.49) < 5 * 0.49 * math.sqrt(2 / n)


def test_fisher_divergence_of_two_gaussians(gen):
    """F(N(m1, s1^2), N(m2, s2^2)) = 1/2 E[(a x + b)^2]

    with a = 1/s2^2 - 1/s1^2 and b = m1/s1^2 - m2/s2^2 (the difference of the two scores).
    """
    m1, s1, m2, s2 = 0.5, 1.2, -0.3, 0.8
    a, b = 1 / s2**2 - 1 / s1**2, m1 / s1**2 - m2 / s2**2
    exact = 0.5 * (a**2 * (s1**2 + m1**2) + 2 * a * b * m1 + b**2)
    x = m1 + s1 * torch.randn(100_000, 1, generator=gen, dtype=F64)
    values = m.fisher_divergence(lambda z: -(z - m1) / s1**2, lambda z: -(z - m2) / s2**2, x,
                                 reduction="none")
    est, se = m.mean_and_se(values)
    assert abs(est.item() - exact) < 4 * se.item()


# -- the script ---------------------------------------------------------------------------------
def test_main_quick_runs_end_to_end(quick_run):
    run = quick_run("02")
    r = run.result
    outdir = run.outdir / m.MODULE
    for name in ("ism_vs_esm_sweep", "gaussian_ism_fit", "quartic_energy_fit", "stein_identity",
                 "dsm_vs_esm_sweep", "jacobian_trace_cost"):
        assert (outdir / f"{name}.png").stat().st_size > 10_000, name
    assert r["ism_offset_spread"] < 1e-9 and r["dsm_offset_spread"] < 1e-9
    assert r["gauss_bfgs_err"] < 1e-7  # BFGS alone: about 8 digits (its line-search limit)
    assert r["gauss_mu_err"] < 1e-11 and r["gauss_P_err"] < 1e-11
    assert r["quartic_gd_vs_cf"] < 1e-8
    assert r["dsm_C"] == pytest.approx(r["dsm_kernel_term"] - r["dsm_score_term"], rel=1e-12)
    assert "What this run measured" in run.out and "exercise_cubic_ism_objective" in run.out
