"""Tests of module 08's SDE building blocks: every stated equation checked numerically."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from common.datasets import GaussianMixture
from common.metrics import chi2_tail, off_mode_fraction, sliced_wasserstein
from common.modules import load_module

pytestmark = pytest.mark.ch08
m = load_module("08")
F64 = torch.float64
SDES = {"ve": m.VESDE(), "vp": m.VPSDE(), "subvp": m.SubVPSDE()}


# -- forward SDEs and their closed forms --------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_forward_simulation_matches_closed_form_marginals(name, gen):
    """Euler-Maruyama paths from x_0 = 1.5: mean alpha_t x_0 and std sigma_t at t = .25, .5, 1."""
    sde, n, steps = SDES[name], 20_000, 1000
    x = torch.full((n, 1), 1.5, dtype=F64)
    dt = 1 / steps
    checks = {250: None, 500: None, 1000: None}
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=F64)
        z = torch.randn(x.shape, generator=gen, dtype=F64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * z
        if i + 1 in checks:
            tt = torch.tensor([(i + 1) * dt], dtype=F64)
            mean, std = 1.5 * sde.mean_coeff(tt).item(), sde.std(tt).item()
            se = std / math.sqrt(n)
            assert abs(x.mean().item() - mean) < 5 * se + 0.01 * abs(mean), (i, x.mean(), mean)
            # std's standard error is std / sqrt(2n) (< 0.5%); allow 3% for the O(dt) EM bias
            assert x.std().item() == pytest.approx(std, rel=0.03), (i, x.std(), std)


@pytest.mark.parametrize("name", list(SDES))
def test_closed_forms_solve_the_moment_odes(name):
    """d alpha/dt = -1/2 beta alpha (or 0) and d var/dt = -beta var + g^2, by finite differences."""
    sde = SDES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    alpha, var = sde.mean_coeff, lambda s: sde.std(s) ** 2
    dalpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
    dvar = (var(t + h) - var(t - h)) / (2 * h)
    x = torch.ones(len(t), 1, dtype=F64)
    rate = sde.drift(x, t)[:, 0]  # f(x, t) at x = 1 is the linear drift coefficient
    torch.testing.assert_close(dalpha, rate * alpha(t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dvar, 2 * rate * var(t) + sde.diffusion(t) ** 2, rtol=1e-5,
                               atol=1e-6)


def test_marginal_closed_forms_at_known_points():
    ve, vp, sub = SDES["ve"], SDES["vp"], SDES["subvp"]
    t0, t1 = torch.tensor([0.0], dtype=F64), torch.tensor([1.0], dtype=F64)
    assert ve.std(t0).item() == 0 and ve.std(t1).item() == pytest.approx(math.sqrt(100 - 1e-4))
    assert vp.mean_coeff(t1).item() == pytest.approx(math.exp(-10.05 / 2))
    assert vp.std(t1).item() == pytest.approx(math.sqrt(1 - math.exp(-10.05)))
    assert sub.std(t1).item() == pytest.approx(1 - math.exp(-10.05))
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    assert (sub.std(t) < vp.std(t)).all()  # sub-VP's variance is below VP's


@pytest.mark.parametrize("name", list(SDES))
def test_discretize_is_the_exact_transition(name):
    """Composing the one-step kernels x <- a x + G z over a grid gives alpha_T and sigma_T^2."""
    sde = SDES[name]
    ts = torch.linspace(0, 1, 41, dtype=F64)
    mean, var = 1.0, 0.0
    x = torch.ones(1, 1, dtype=F64)
    for i in range(1, len(ts)):
        f, G = sde.discretize(x, ts[i], (ts[i] - ts[i - 1]).item())
        a = 1 + f[0, 0].item()  # f_i = (a - 1) x at x = 1
        mean, var = a * mean, a * a * var + G.item() ** 2
    assert mean == pytest.approx(sde.mean_coeff(ts[-1:]).item(), rel=1e-10)
    assert var == pytest.approx(sde.std(ts[-1:]).item() ** 2, rel=1e-10)


def test_vp_step_is_ddpm():
    """For VP the exact step is x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z: a^2 + G^2 = 1."""
    sde = SDES["vp"]
    x = torch.ones(5, 1, dtype=F64)
    for t in (0.1, 0.5, 1.0):
        f, G = sde.discretize(x, t, 1e-3)
        a = 1 + f[0, 0]
        assert (a**2 + G[0] ** 2).item() == pytest.approx(1.0, abs=1e-12)


def test_ddpm_alpha_bar_converges_to_vp_alpha_squared():
    sde = SDES["vp"]
    errors = []
    for n in (10, 100, 1000):
        abar = m.ddpm_alpha_bar(sde, n)
        t = torch.arange(1, n + 1, dtype=F64) / n
        errors.append((abar - sde.mean_coeff(t) ** 2).abs().max().item())
    assert errors[2] < 0.005 and errors[2] < errors[1] / 5 < errors[0] / 25


def test_eps_prediction_is_a_scaled_score(gen):
    """For x_t = alpha x_0 + sigma eps, grad log p_t(x_t | x_0) = -eps / sigma."""
    sde = SDES["vp"]
    x0 = torch.randn(10, 2, generator=gen, dtype=F64)
    t = torch.full((10,), 0.4, dtype=F64)
    x_t, eps = sde.perturb(x0, t, gen)
    mean, std = sde.marginal(x0, t)
    kernel_score = -(x_t - mean) / std[:, None] ** 2
    torch.testing.assert_close(m.eps_to_score(eps, std), kernel_score)


def test_prior_log_prob_is_gaussian(gen):
    z = 3 * torch.randn(7, 2, generator=gen, dtype=F64)
    for sde in SDES.values():
        ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum(1)
        torch.testing.assert_close(sde.prior_log_prob(z), ref)


# -- the exact score of mixture data ------------------------------------------------------------
def test_exact_score_of_marginal_matches_simulated_perturbation(gen):
    """p_t is the mixture perturbed with (sigma_t, alpha_t): compare moments with simulation."""
    data = GaussianMixture.eight_gaussians()
    sde = SDES["vp"]
    t = 0.3
    x_t, _ = sde.perturb(data.sample(100_000, gen, F64), t, gen)
    tt = torch.tensor([t])
    marg = data.perturbed(sde.std(tt).item(), sde.mean_coeff(tt).item())
    torch.testing.assert_close(torch.cov(x_t.T), marg.covariance(), atol=0.02, rtol=0.02)


def test_exact_score_fn_rejects_mixed_times():
    f = m.exact_score_fn(GaussianMixture.eight_gaussians(), SDES["vp"])
    with pytest.raises(ValueError, match="shared time"):
        f(torch.zeros(2, 2, dtype=F64), torch.tensor([0.1, 0.2], dtype=F64))


# -- samplers with the exact score reproduce the data -------------------------------------------
@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.eight_gaussians()


def _floor(data, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sliced_wasserstein(data.sample(n, g, F64), data.sample(n, g, F64), 256, g)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "ode"])
def test_reverse_sde_and_ode_with_exact_score_reproduce_the_data(name, sampler, mixture):
    sde, n = SDES[name], 1000
    g = torch.Generator().manual_seed(5)
    score = m.exact_score_fn(mixture, sde)
    if sampler == "ode":
        x, nfe, _ = m.ode_sample(sde, score, sde.prior_sample((n, 2), g, F64))
        assert 20 < nfe < 1000
    else:
        pred, corr = ("euler_maruyama", 0) if sampler == "euler_maruyama" else \
            ("reverse_diffusion", 1)
        *_, x = m.pc_sample(sde, score, (n, 2), 400, pred, corr, generator=g, dtype=F64)
    reference = mixture.sample(n, g, F64)
    distance = sliced_wasserstein(x, reference, 256, g)
    floor = _floor(mixture, n)
    assert distance < 1.6 * floor, (distance, floor)
    # and no more samples between the modes than the data has: P(chi2_2 > 9) + 5 binomial s.e.
    p = chi2_tail(2, m.OFF_MODE_RADIUS)
    off = off_mode_fraction(x, mixture.means, mixture.precisions, m.OFF_MODE_RADIUS)
    assert off < p + 5 * math.sqrt(p * (1 - p) / n), (off, p)


def test_sampler_check_can_fail(mixture):
    """The same check rejects a reverse SDE that uses the ODE's half score term."""
    sde, n = SDES["vp"], 1000
    g = torch.Generator().manual_seed(5)
    score = m.exact_score_fn(mixture, sde)
    *_, x = m.pc_sample(sde, lambda x, t: 0.5 * score(x, t), (n, 2), 400, "euler_maruyama", 0,
                        generator=g, dtype=F64)
    distance = sliced_wasserstein(x, mixture.sample(n, g, F64), 256, g)
    assert distance > 1.6 * _floor(mixture, n)


def test_pc_sampler_yields_every_step_and_validates(mixture):
    sde = SDES["ve"]
    states = list(m.pc_sample(sde, m.exact_score_fn(mixture, sde), (5, 2), 7, dtype=F64))
    assert len(states) == 7 and states[-1].shape == (5, 2)
    with pytest.raises(ValueError, match="unknown predictor"):
        next(m.pc_sample(sde, None, (5, 2), 7, predictor="heun"))
    with pytest.raises(ValueError, match="n_steps must be positive"):
        next(m.pc_sample(sde, None, (5, 2), 0))
    with pytest.raises(ValueError, match="eps must lie"):
        m.time_grid(sde, 10, 1.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        m.VESDE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown SDE 'ddpm'"):
        m.make_sde("ddpm")


def test_corrector_reaches_the_target_snr(gen):
    sde = SDES["ve"]
    x = torch.randn(200, 2, generator=gen, dtype=F64)
    score = lambda y, t: -3 * y
    new, mean = m.langevin_corrector_step(sde, score, x, 0.5, 0.01, 0.16, gen)
    step = mean - x  # eps * s
    noise = new - mean  # sqrt(2 eps) z
    ratio = step.norm(dim=1).mean() / noise.norm(dim=1).mean()
    assert ratio.item() == pytest.approx(0.16, rel=1e-9)  # alpha = 1 for VE


# -- likelihoods --------------------------------------------------------------------------------
def test_divergences(gen):
    W = torch.randn(3, 3, generator=gen, dtype=F64)
    fn = lambda x: torch.sin(x @ W.T)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    J = torch.func.vmap(torch.func.jacrev(lambda z: fn(z[None])[0]))(x)
    torch.testing.assert_close(m.divergence_exact(fn, x), J.diagonal(dim1=1, dim2=2).sum(1))
    v = torch.randn(20, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(m.divergence_hutchinson(fn, x, v),
                               torch.einsum("ni,nij,nj->n", v, J, v))


@pytest.fixture(scope="module")
def gaussian_case():
    gauss = GaussianMixture([1.0], [[0.5, -0.3]], [[[1.0, 0.6], [0.6, 0.8]]])
    g = torch.Generator().manual_seed(3)
    x = 1.5 * gauss.sample(6, g, F64)
    return gauss, x


def test_ode_log_likelihood_of_a_gaussian_within_one_percent(gaussian_case):
    gauss, x = gaussian_case
    sde = SDES["vp"]
    logp, nfe = m.ode_log_likelihood(sde, m.exact_score_fn(gauss, sde), x, divergence="exact")
    truth = gauss.log_prob(x)
    assert ((logp - truth).abs() / truth.abs()).max() < 0.01, (logp, truth)
    assert nfe > 10


def test_hutchinson_log_likelihood_unbiased(gaussian_case):
    gauss, x = gaussian_case
    sde, reps = SDES["vp"], 64
    g = torch.Generator().manual_seed(4)
    logp, _ = m.ode_log_likelihood(sde, m.exact_score_fn(gauss, sde), x.repeat(reps, 1),
                                   divergence="hutchinson", generator=g)
    logp = logp.reshape(reps, len(x))
    se = logp.std(0) / math.sqrt(reps)
    assert (logp.std(0) > 0).all()  # genuinely random
    assert ((logp.mean(0) - gauss.log_prob(x)).abs() < 5 * se + 0.01).all()


def test_likelihood_rejects_unknown_divergence(gaussian_case):
    gauss, x = gaussian_case
    with pytest.raises(ValueError, match="divergence must be"):
        m.ode_log_likelihood(SDES["vp"], m.exact_score_fn(gauss, SDES["vp"]), x, divergence="x")


# -- continuous-time DSM ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ve", "vp"])
def test_dsm_loss_at_the_exact_score_matches_its_closed_form(name):
    """Data N(0, c^2 I) in D dims: with the exact score, E|sigma_t s + z|^2 at time t equals
    D alpha_t^2 c^2 / (alpha_t^2 c^2 + sigma_t^2); dsm_loss averages it over t ~ U(eps, T)."""
    sde, D, c, eps = SDES[name], 2, 0.7, 1e-5
    data = GaussianMixture.isotropic([1.0], [[0.0] * D], c)

    def per_t(t):
        tt = torch.tensor([t], dtype=F64)
        a2, s2 = sde.mean_coeff(tt).item() ** 2, sde.std(tt).item() ** 2
        return D * a2 * c * c / (a2 * c * c + s2)

    expected = integrate.quad(per_t, eps, 1, limit=200)[0] / (1 - eps)
    g = torch.Generator().manual_seed(0)
    # p_t = N(0, (alpha_t^2 c^2 + sigma_t^2) I), so its score is -x / (alpha_t^2 c^2 + sigma_t^2)
    def net(x, t):
        return -x / (sde.mean_coeff(t)[:, None] ** 2 * c * c + sde.std(t)[:, None] ** 2)

    values = torch.stack([m.dsm_loss(net, sde, data.sample(1000, g, F64), eps, g)
                          for _ in range(4)])
    # each batch loss is a mean of 1000 terms of spread ~ D; 4 batches: SE ~ 0.03
    assert values.mean().item() == pytest.approx(expected, abs=0.1), (values, expected)
    # the check can fail: a network that outputs 0 scores E|z|^2 = D
    wrong = m.dsm_loss(lambda x, t: torch.zeros_like(x), sde, data.sample(4000, g, F64), eps, g)
    assert wrong.item() == pytest.approx(D, rel=0.05) and wrong.item() > expected + 0.3


# -- the module as a program --------------------------------------------------------------------
def test_quick_run_writes_all_figures(quick_run):
    run = quick_run("08")
    r, out = run.result, run.out
    # the learned-vs-exact table: one row per SDE and sampler, then the data's floor
    head = out.index("Learned vs exact score")
    table = out[head:out.index("What this run measured")].splitlines()
    assert "off modes exact / learned" in table[2] and "MMD exact / learned" in table[2]
    for key, name in zip(m.SDE_NAMES, ("VE", "VP", "sub-VP")):
        for sampler in m.SAMPLERS:
            e, q = r["exact_quality"][key][sampler], r["learned_quality"][key][sampler]
            row = [line for line in table if line.split()[:2] == [name, sampler]]
            assert len(row) == 1, (name, sampler, table)
            assert f"{e['off']:.1%} / {q['off']:.1%}" in row[0]
            assert f"{q['mmd'] / e['mmd']:.2f}" in row[0]
    assert any(line.startswith("data") and "P(chi2_2 > 9) = 1.1%" in line for line in table)
    assert "mean log p of 50 data points: true / exact-score ODE / learned ODE" in out
    assert "near the exact-score row" not in out  # the old claim, with nothing measured
    names = {p.name for p in (run.outdir / m.MODULE).glob("*.png")}
    assert names == {"forward_marginals.png", "forward_sde_vs_closed_form.png",
                     "samplers_exact_score.png", "sampler_convergence.png",
                     "reverse_trajectories.png", "likelihood.png",
                     "ddpm_connection.png", "training_losses.png", "samplers_learned_score.png",
                     "learned_score_error.png"}
    assert r["gauss_rel_err"] < 0.01 and r["gauss_abs_err_true_pT"] < 1e-3


def test_sample_quality_of_data_and_of_a_smeared_sampler(mixture):
    """Data against data: off-mode share ~ P(chi2_2 > 9) and MMD near its floor; a 'sampler'
    that puts 20% of its points on the ring between the modes is caught by both, while its SW
    barely moves (the defect the learned-score table exists to show)."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    ref, x = mixture.sample(n, g, F64), mixture.sample(n, g, F64)
    good = m.sample_quality_2d(x, ref, mixture, g)
    p = chi2_tail(2, m.OFF_MODE_RADIUS)
    assert abs(good["off"] - p) < 5 * math.sqrt(p * (1 - p) / n), good
    # 20% of the points moved onto the circle half-way between neighbouring modes (at angles
    # (k + 1/2) pi/4, 0.77 from each mode centre: 5 standard deviations)
    k = torch.randint(0, 8, (n // 5,), generator=g).to(F64)
    angle = (k + 0.5) * math.pi / 4 + 0.1 * torch.randn(n // 5, generator=g, dtype=F64)
    between = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    smeared = torch.cat([x[: n - n // 5], between])
    bad = m.sample_quality_2d(smeared, ref, mixture, g)
    assert bad["off"] > good["off"] + 0.15, (bad, good)
    assert bad["mmd"] > 2 * good["mmd"], (bad, good)
    assert bad["sw"] < 2 * good["sw"], (bad, good)  # SW hardly notices


def test_comparison_rows_report_exact_learned_and_their_ratio():
    q = {"off": 0.012, "mmd": 0.020, "sw": 0.1}
    learned = {"off": 0.25, "mmd": 0.050, "sw": 0.12}
    r = {"exact_quality": {n: {s: q for s in m.SAMPLERS} for n in SDES},
         "learned_quality": {n: {s: learned for s in m.SAMPLERS} for n in SDES},
         "quality_floor": {"off": (0.011, 0.002), "mmd": (0.021, 0.003), "sw": (0.09, 0.02)}}
    rows = m.comparison_rows(r, SDES)
    assert len(rows) == 3 * 3 + 1 and all(len(row) == 6 for row in rows)
    assert rows[0] == ("VE", "EM", "1.2% / 25.0%", "0.020 / 0.050", "2.50", "0.100 / 0.120")
    assert rows[-1][0] == "data" and "1.1%" in rows[-1][2] and rows[-1][3] == "0.021 +- 0.003"


@pytest.mark.parametrize("name", list(SDES))
def test_band_time_sampler_makes_log_sigma_uniform_on_the_band(name):
    """log sigma_t of the drawn times is U(log lo, log hi): its deciles sit at the uniform's
    within 3 Kolmogorov-Smirnov-sized steps; uniform t (the old sampling) would fail."""
    sde, (lo, hi), n = SDES[name], (2e-3, 1.0), 20_000
    g = torch.Generator().manual_seed(7)
    t = m.band_time_sampler(sde, (lo, hi))(n, g)
    assert t.shape == (n,) and t.min() >= 1e-5 and t.max() <= sde.T
    a, b = math.log(lo), math.log(min(hi, sde.std(torch.tensor([sde.T])).item()))
    u = (sde.std(t).log() - a) / (b - a)  # should be U(0, 1)
    levels = torch.linspace(0.1, 0.9, 9, dtype=F64)
    gap = (torch.quantile(u, levels) - levels).abs().max().item()
    assert gap < 3 / math.sqrt(n) * 1.36, gap
    t_uniform = 1e-5 + (sde.T - 1e-5) * torch.rand(n, generator=g, dtype=F64)
    u_wrong = ((sde.std(t_uniform).log() - a) / (b - a)).clamp(0, 1)
    assert (torch.quantile(u_wrong, levels) - levels).abs().max().item() > 0.1


def _log_likelihood_by_finite_differences(sde, score, x, eps):
    """log p_eps(x) by the same ODE, solved independently: scipy RK45 at tight tolerance on
    (x, int div f~), the divergence by central finite differences of the drift f~ (no autograd),
    one point at a time."""
    h, out = 1e-4, []
    for x0 in x:
        def rhs(t, state):
            z = torch.from_numpy(state[:2])[None]
            tt = torch.full((1,), t, dtype=F64)
            drift = lambda y: sde.reverse_drift(y, tt, score(y, tt), probability_flow=True)
            div = sum((drift(z + h * e) - drift(z - h * e))[0, i] / (2 * h)
                      for i, e in enumerate(torch.eye(2, dtype=F64)[:, None]))
            return np.concatenate([drift(z)[0].numpy(), [div.item()]])

        sol = integrate.solve_ivp(rhs, (eps, sde.T), np.concatenate([x0.numpy(), [0.0]]),
                                  rtol=1e-7, atol=1e-7)
        z_T = torch.from_numpy(sol.y[:2, -1])[None]
        out.append(sde.prior_log_prob(z_T).item() + sol.y[2, -1])
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_learned_network_log_likelihood_agrees_with_a_finite_difference_solve(name, mixture):
    """The learned-score row's log p: module 08's network (seeded, untrained: the check is about
    the gradient-safe path, not the training) through as_score_fn and ode_log_likelihood,
    against an independent solve whose divergence comes from finite differences of a float64
    copy of the network. Dropping the network's Jacobian (a no_grad wrapper) misses by far more."""
    sde, eps = SDES[name], 0.05  # a random network is stiff as sigma_t -> 0: stop earlier
    torch.manual_seed(0)
    net = m.make_score_net(sde).requires_grad_(False)  # as after EMA's averaged(): frozen
    net64 = copy.deepcopy(net).double()
    g = torch.Generator().manual_seed(1)
    x = mixture.sample(2, g, F64)
    got, _ = m.ode_log_likelihood(sde, m.as_score_fn(net), x, eps=eps, rtol=1e-6, atol=1e-6)
    check = _log_likelihood_by_finite_differences(sde, lambda y, t: net64(y, t), x, eps)
    assert (got - check).abs().max().item() < 5e-3, (got, check)

    def no_jacobian(y, t):
        return m.as_score_fn(net)(y.detach(), t)

    if name == "ve":  # f = 0: nothing left to differentiate, and the module says so
        with pytest.raises(RuntimeError):
            m.ode_log_likelihood(sde, no_jacobian, x, eps=eps)
    else:
        wrong, _ = m.ode_log_likelihood(sde, no_jacobian, x, eps=eps, rtol=1e-6, atol=1e-6)
        assert (wrong - check).abs().min().item() > 0.1, (wrong, check)


def test_exact_dsm_loss_is_below_a_bad_networks_loss(gen):
    """The exact score's loss is the floor: a network outputting 0 scores E|z|^2 = D = 2."""
    data = GaussianMixture.eight_gaussians()
    floor = m.exact_dsm_loss(data, SDES["vp"], gen, n_times=20, n_per_time=200)
    assert 0.2 < floor < 1.5
    zero = m.dsm_loss(lambda x, t: torch.zeros_like(x), SDES["vp"], data.sample(4000, gen, F64),
                      generator=gen)
    assert zero.item() == pytest.approx(2.0, rel=0.05) and zero.item() > floor + 0.5


def test_prior_mismatch_explains_the_likelihood_error(gaussian_case):
    """With the true p_T in place of the prior, the ODE log-likelihood is exact to the solver."""
    gauss, x = gaussian_case
    sde = SDES["vp"]
    score = m.exact_score_fn(gauss, sde)
    logp, _ = m.ode_log_likelihood(sde, score, x, log_p_T=m.exact_log_prob_t(gauss, sde, sde.T))
    assert (logp - gauss.log_prob(x)).abs().max() < 1e-3


def test_batched_likelihood_tolerance_is_for_the_batch_not_each_point():
    """solve_ivp's error norm covers the whole state: a hard point (centre of the ring, where
    log p ~ -80) in a batch of easy ones misses the tolerance; alone, or with a tighter
    tolerance, it does not. The remaining ~4e-3 at the centre is log p_eps - log p_0."""
    data, sde = m.make_data(), SDES["vp"]
    score = m.exact_score_fn(data, sde)
    centre = torch.tensor([[-1 / 13, -1 / 13]], dtype=F64)
    batch = torch.tensor([[-1 / 13, -1 / 13], [1 / 13, 1 / 13], [2.0, 0.0], [0.0, 2.0],
                          [1.0, 1.0], [-2.0, 0.5], [0.3, -0.3], [2.5, 2.5]], dtype=F64)
    truth = data.log_prob(batch)
    err_batch = (m.ode_log_likelihood(sde, score, batch)[0] - truth).abs().max()
    err_alone = max((m.ode_log_likelihood(sde, score, x[None])[0] - t).abs().item()
                    for x, t in zip(batch, truth))
    tight = m.ode_log_likelihood(sde, score, batch, rtol=1e-7, atol=1e-7)[0]
    err_tight = (tight - truth).abs().max()
    assert max(err_alone, err_tight) < 4.5e-3  # ~ the eps gap below
    assert err_batch > 2 * max(err_alone, err_tight)
    gap = m.exact_log_prob_t(data, sde, 1e-5)(centre) - data.log_prob(centre)
    assert 2e-3 < gap.item() < 5e-3


def test_reverse_em_step_is_an_ode_step_plus_a_langevin_step(gen):
    """f - g^2 s = (f - 1/2 g^2 s) - 1/2 g^2 s: EM = Euler ODE step + module 03's Langevin step
    x + eps/2 s + sqrt(eps) z with eps = g^2 dt (same z)."""
    data, sde = m.make_data(), SDES["vp"]
    score = m.exact_score_fn(data, sde)
    x, t, dt = torch.randn(5, 2, generator=gen, dtype=F64), 0.4, 0.01
    x_em, _ = m.euler_maruyama_step(sde, score, x, t, dt, torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    tt = torch.full((5,), t, dtype=F64)
    ode = x - sde.reverse_drift(x, tt, score(x, tt), probability_flow=True) * dt
    eps = sde.diffusion(tt)[0].item() ** 2 * dt
    langevin = ode + eps / 2 * score(x, tt) + math.sqrt(eps) * z
    assert torch.allclose(x_em, langevin, atol=1e-12)


def test_ve_three_step_em_overshoots_the_variance_drop():
    """First of 3 VE steps: sigma 10 -> ~1, true variance drop 99, EM removes g(T)^2 dt ~ 460."""
    sde = SDES["ve"]
    t = m.time_grid(sde, 3, 1e-3)
    s0, s1 = sde.std(t[:1]).item(), sde.std(t[1:2]).item()
    assert s1 == pytest.approx(1.0, abs=0.01)
    g2dt = sde.diffusion(t[:1]).item() ** 2 * (t[0] - t[1]).item()
    assert g2dt == pytest.approx(460, rel=0.01)
    assert g2dt / (s0 ** 2 - s1 ** 2) == pytest.approx(4.6, rel=0.02)


# -- learned (nn.Module) scores in the likelihood ODE ------------------------------------------
class GaussianImageScore(torch.nn.Module):
    """The exact score of p_t for image data x_0 ~ N(mu_c, c_c^2) independently per pixel of
    channel c, written as a network: a 1x1 convolution (identity weights, with gradients) of
    x - alpha_t mu, divided by alpha_t^2 c^2 + sigma_t^2. Linear in x, like a trained net."""

    def __init__(self, sde, mu, c):
        super().__init__()
        self.sde = sde
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32)[None, :, None, None])
        self.register_buffer("c2", torch.as_tensor(c, dtype=torch.float32)[None, :, None, None]
                             ** 2)
        n_ch = self.mu.shape[1]
        self.mix = torch.nn.Conv2d(n_ch, n_ch, 1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(n_ch)[:, :, None, None])

    def var_t(self, t, x):
        a = m.expand_to(self.sde.mean_coeff(t), x)
        return a, a * a * self.c2.to(x) + m.expand_to(self.sde.std(t), x) ** 2

    def forward(self, x, t):
        a, var = self.var_t(t, x)
        return -self.mix(x - a * self.mu.to(x)) / var  # -(x - alpha_t mu) / var_t


IMG_MU, IMG_C = [0.3, -0.5], [0.5, 2.0]


def _gaussian_image_log_prob(x, mu, var):
    """log N(x; mu, var) summed over all but the batch axis; mu, var broadcast (1, C, 1, 1)."""
    return (-0.5 * (x - mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)


@pytest.fixture(scope="module")
def image_case():
    sde = SDES["vp"]
    net = GaussianImageScore(sde, IMG_MU, IMG_C)
    g = torch.Generator().manual_seed(11)
    mu = torch.tensor(IMG_MU, dtype=F64)[None, :, None, None]
    c = torch.tensor(IMG_C, dtype=F64)[None, :, None, None]
    x = mu + c * torch.randn(3, 2, 3, 3, generator=g, dtype=F64)  # (N, C, H, W), D = 18
    truth = _gaussian_image_log_prob(x, mu, c**2)
    tT = torch.tensor([sde.T], dtype=F64)
    aT, sT = sde.mean_coeff(tT).item(), sde.std(tT).item()

    def log_p_T(z):  # p_T = N(alpha_T mu, alpha_T^2 c^2 + sigma_T^2), exact here
        return _gaussian_image_log_prob(z, aT * mu, aT**2 * c**2 + sT**2)

    return sde, net, x, truth, log_p_T


@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad"])
def test_likelihood_of_a_network_score_on_images_matches_the_closed_form(image_case, grad_mode):
    """ode_log_likelihood(sde, as_score_fn(net), x) on (N, C, H, W) data equals log N(x; mu, c^2)
    (with the true p_T, so only solver and float32 error remain), also when called under
    torch.no_grad(). A score wrapped under no_grad drops its share of the divergence: the old
    as_score_fn was off by 90 nats here."""
    sde, net, x, truth, log_p_T = image_case
    score = m.as_score_fn(net)
    with torch.set_grad_enabled(grad_mode == "enabled"):
        logp, _ = m.ode_log_likelihood(sde, score, x, log_p_T=log_p_T)
    assert (logp - truth).abs().max().item() < 0.01, (logp, truth)
    # the check can fail: the same network evaluated without gradients (the old wrapper)
    def no_grad_score(x, t):
        with torch.no_grad():
            return score(x, t)

    wrong, _ = m.ode_log_likelihood(sde, no_grad_score, x, log_p_T=log_p_T)
    assert (wrong - truth).abs().min().item() > 1.0


def test_likelihood_hutchinson_with_a_network_score(image_case):
    """This network's Jacobian is diagonal (pixels do not interact), and a Rademacher probe
    reads a diagonal exactly (v_i^2 = 1, module 05): Hutchinson must give the closed form."""
    sde, net, x, truth, log_p_T = image_case
    g = torch.Generator().manual_seed(2)
    logp, _ = m.ode_log_likelihood(sde, m.as_score_fn(net), x, divergence="hutchinson",
                                   generator=g, log_p_T=log_p_T)
    assert (logp - truth).abs().max().item() < 0.01, (logp, truth)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_likelihood_calls_the_network_once_per_right_hand_side(image_case, divergence):
    """Drift and divergence come from one forward pass: network calls == NFE (was 2 NFE)."""
    sde, net, x, _, _ = image_case
    score, calls = m.as_score_fn(net), [0]

    def counted(x, t):
        calls[0] += 1
        return score(x, t)

    _, nfe = m.ode_log_likelihood(sde, counted, x[:1], divergence=divergence,
                                  generator=torch.Generator().manual_seed(0), rtol=1e-3,
                                  atol=1e-3)
    assert calls[0] == nfe, (calls[0], nfe)


def test_likelihood_refuses_a_score_without_gradients():
    """VE has f = 0: a score evaluated under no_grad leaves nothing to differentiate."""
    sde = SDES["ve"]

    def no_grad_score(x, t):
        with torch.no_grad():
            return -x / (1 + m.expand_to(sde.std(t), x) ** 2)

    with pytest.raises(RuntimeError, match="no_grad"):
        m.ode_log_likelihood(sde, no_grad_score, torch.zeros(2, 2, dtype=F64))


def test_samplers_build_no_graph_and_leave_the_callers_grad_mode_alone(image_case):
    sde, net, _, _, _ = image_case
    score = m.as_score_fn(net)
    assert score(torch.zeros(1, 2, 3, 3), torch.full((1,), 0.5)).requires_grad  # caller decides
    g = torch.Generator().manual_seed(0)
    for x in m.pc_sample(sde, score, (2, 2, 3, 3), 3, generator=g):
        assert not x.requires_grad and torch.is_grad_enabled()
    x, _, _ = m.ode_sample(sde, score, sde.prior_sample((2, 2, 3, 3), g), rtol=1e-2, atol=1e-2)
    assert not x.requires_grad


# -- noise drawn on the tensor's device ----------------------------------------------------------
class _GeneratorElsewhere:
    """Stands in for a torch.Generator on a GPU (this test runs on CPU-only machines too)."""

    device = torch.device("cuda", 0)


def _noise_draws():
    sde, x = SDES["vp"], torch.zeros(3, 2, dtype=F64)
    score = lambda y, t: -y
    return {
        "perturb": lambda g: sde.perturb(x, 0.5, g),
        "prior_sample": lambda g: sde.prior_sample((3, 2), g, F64),
        "euler_maruyama": lambda g: m.euler_maruyama_step(sde, score, x, 0.5, 0.1, g),
        "reverse_diffusion": lambda g: m.reverse_diffusion_step(sde, score, x + 1, 0.5, 0.1, g),
        "corrector": lambda g: m.langevin_corrector_step(sde, score, x + 1, 0.5, 0.1, 0.16, g),
        "rademacher_probe": lambda g: m.ode_log_likelihood(sde, score, x, divergence="hutchinson",
                                                           generator=g),
        "dsm_loss": lambda g: m.dsm_loss(score, sde, x, generator=g),
        "dsm_loss_given_t": lambda g: m.dsm_loss_per_sample(score, sde, x, 0.5, generator=g),
        "dequantize": lambda g: m.dequantize(torch.zeros(3, dtype=torch.uint8), g),
    }


@pytest.mark.parametrize("name", list(_noise_draws()))
def test_a_generator_on_another_device_is_a_clear_error(name):
    with pytest.raises(ValueError, match="generator is on cuda:0 but the tensor is on cpu"):
        _noise_draws()[name](_GeneratorElsewhere())


def test_cpu_noise_is_the_same_as_before_the_device_change():
    """randn with a CPU generator and explicit dtype on the CPU: the numbers of the old
    torch.randn(..., generator=g, dtype=d).to(device), so CPU results stay bit-identical."""
    sde, x0 = SDES["vp"], torch.ones(4, 3, dtype=F64)
    _, z = sde.perturb(x0, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(z, torch.randn(x0.shape, generator=torch.Generator().manual_seed(7),
                                      dtype=F64))
    prior = sde.prior_sample((4, 3), torch.Generator().manual_seed(8), F64)
    assert torch.equal(prior, torch.randn(4, 3, generator=torch.Generator().manual_seed(8),
                                          dtype=F64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_is_seedable():
    from common.seeding import make_generator

    sde, score = SDES["vp"], lambda y, t: -y
    runs = [list(m.pc_sample(sde, score, (8, 2), 5, generator=make_generator(3, "cuda"),
                             device="cuda"))[-1] for _ in range(2)]
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])


# -- step_hook: acting between sampler steps ----------------------------------------------------
def test_step_hook_is_called_after_every_step_with_the_next_time(mixture):
    sde, n_steps = SDES["vp"], 6
    score = m.exact_score_fn(mixture, sde)
    seen = []

    def record(x, t_next, i):
        assert torch.is_grad_enabled()  # the hook runs in the caller's grad mode
        seen.append((i, t_next, x.clone()))
        return x

    states = list(m.pc_sample(sde, score, (4, 2), n_steps, generator=torch.Generator()
                              .manual_seed(1), dtype=F64, step_hook=record))
    plain = list(m.pc_sample(sde, score, (4, 2), n_steps, generator=torch.Generator()
                             .manual_seed(1), dtype=F64))
    assert [i for i, _, _ in seen] == list(range(n_steps))
    assert [t for _, t, _ in seen] == m.time_grid(sde, n_steps, 1e-3)[1:].tolist()
    for (_, _, x), y, z in zip(seen, states, plain):
        assert torch.equal(x, y) and torch.equal(y, z)  # it sees what is yielded (x_mean last)


def test_step_hook_replaces_the_state(mixture):
    """An inpainting-like hook that pins coordinate 0 to 0.7: every yield, the final x_mean
    included, keeps it, and the later steps start from the replaced state."""
    sde, n_steps, known = SDES["vp"], 8, 0.7
    score = m.exact_score_fn(mixture, sde)

    def pin(x, t_next, i):
        x = x.clone()
        x[:, 0] = known
        return x

    kw = dict(n_steps=n_steps, predictor="euler_maruyama", corrector_steps=1, dtype=F64)
    states = list(m.pc_sample(sde, score, (50, 2), generator=torch.Generator().manual_seed(2),
                              step_hook=pin, **kw))
    free = list(m.pc_sample(sde, score, (50, 2), generator=torch.Generator().manual_seed(2),
                            **kw))
    assert len(states) == n_steps
    assert all((x[:, 0] == known).all() for x in states)
    assert not torch.allclose(states[-1][:, 1], free[-1][:, 1])  # the pinned state propagated
    with pytest.raises(TypeError, match="must return the new state"):
        list(m.pc_sample(sde, score, (5, 2), 3, dtype=F64, step_hook=lambda x, t, i: None))


# -- Tweedie's denoised estimate ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7])
def test_denoised_estimate_is_the_gaussian_posterior_mean(name, t, gen):
    """Data N(mu, C): E[x_0 | x_t] = mu + alpha C (alpha^2 C + sigma^2 I)^{-1} (x_t - alpha mu)."""
    sde = SDES[name]
    mu = torch.tensor([0.5, -0.3], dtype=F64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    gauss = GaussianMixture([1.0], [mu.tolist()], [cov.tolist()])
    x_t = 2 * torch.randn(20, 2, generator=gen, dtype=F64)
    tt = torch.tensor([t], dtype=F64)
    a, s = sde.mean_coeff(tt).item(), sde.std(tt).item()
    gain = a * cov @ torch.linalg.inv(a * a * cov + s * s * torch.eye(2, dtype=F64))
    posterior_mean = mu + (x_t - a * mu) @ gain.T
    x0_hat = m.denoised_estimate(sde, m.exact_score_fn(gauss, sde), x_t, t)
    torch.testing.assert_close(x0_hat, posterior_mean)
    if name != "ve":  # the check can fail: forgetting the 1/alpha_t (alpha_t = 1 only for VE)
        score = m.exact_score_fn(gauss, sde)(x_t, tt.expand(20))
        assert not torch.allclose(x_t + s * s * score, posterior_mean, atol=1e-3)


def test_denoised_estimate_of_a_network_on_images(image_case):
    sde, net, x, _, _ = image_case
    net = copy.deepcopy(net).double()  # float64: at t = 0.9, 1/alpha_t ~ 30 amplifies rounding
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    a, var = net.var_t(t, x)
    expected = net.mu + a * net.c2 / var * (x - a * net.mu)  # per-pixel Gaussian conditioning
    torch.testing.assert_close(m.denoised_estimate(sde, net, x, t), expected)


# -- bits per dimension and dequantisation ------------------------------------------------------
def test_bits_per_dim_of_the_uniform_model_is_eight():
    """Uniform on [-1, 1]^D: log p_y = -D ln 2, and 8 bits per dimension exactly."""
    for D in (1, 784, 3072):
        log_p = torch.tensor([-D * math.log(2)], dtype=F64)
        assert m.bits_per_dim(log_p, D).item() == pytest.approx(8.0, abs=1e-12)
    # [0, 1) data (scale 1) with a uniform model: log p = 0, again 8 bits
    assert m.bits_per_dim(torch.zeros(1, dtype=F64), 10, scale=1.0).item() == pytest.approx(8.0)
    assert m.bits_per_dim(torch.zeros(1, dtype=F64), 10, 1.0, n_levels=2).item() == \
        pytest.approx(1.0)


GAUSS_PIX_MEAN = torch.tensor([-0.3, 0.1, 0.5, 0.0], dtype=F64)
GAUSS_PIX_STD = torch.tensor([0.2, 0.35, 0.5, 0.8], dtype=F64)
PIXELS = torch.tensor([40, 140, 200, 128], dtype=torch.uint8)


def _gaussian_model_bounds():
    """For a Gaussian model N(m, s^2) of y = 2 u - 1 on 4 pixels and the image PIXELS:
    the exact discrete -log2 P(x) / D (CDF differences over each pixel's cell) and
    E_U[log p_y(y)] in closed form (E[(y - m)^2] over the cell y in [lo, hi))."""
    m_, s_ = GAUSS_PIX_MEAN, GAUSS_PIX_STD
    lo = 2 * PIXELS.double() / 256 - 1
    hi = 2 * (PIXELS.double() + 1) / 256 - 1
    normal = torch.distributions.Normal(m_, s_)
    discrete_bpd = -torch.log2(normal.cdf(hi) - normal.cdf(lo)).sum() / 4
    mean_sq = ((hi - m_) ** 3 - (lo - m_) ** 3) / (3 * (hi - lo))  # E_U (y - m)^2
    mean_log_p = (-0.5 * mean_sq / s_**2 - torch.log(s_) - 0.5 * math.log(2 * math.pi)).sum()
    return discrete_bpd, mean_log_p


def test_bits_per_dim_bounds_the_discrete_likelihood_of_a_gaussian_model():
    """E_U[bpd] >= -log2 P(x) / D (Jensen), and for a smooth model the gap is tiny."""
    discrete_bpd, mean_log_p = _gaussian_model_bounds()
    bpd = m.bits_per_dim(mean_log_p[None], 4).item()
    assert discrete_bpd.item() <= bpd < discrete_bpd.item() + 1e-3, (bpd, discrete_bpd)
    # the missing terms of the docstring: no log2(256) -> negative; no Jacobian -> +1 bit
    no_levels = -mean_log_p.item() / (4 * math.log(2)) - math.log2(2)
    no_jacobian = -mean_log_p.item() / (4 * math.log(2)) + 8
    assert no_levels == pytest.approx(bpd - 8) and no_levels < 0
    assert no_jacobian == pytest.approx(bpd + 1)


def test_dequantize_then_bits_per_dim_by_monte_carlo():
    """The pipeline: mean over U of bits_per_dim(log p_y(dequantize(x))) -> the closed form."""
    _, mean_log_p = _gaussian_model_bounds()
    g = torch.Generator().manual_seed(0)
    y = m.dequantize(PIXELS.expand(20_000, 4), g, dtype=F64)
    log_p = torch.distributions.Normal(GAUSS_PIX_MEAN, GAUSS_PIX_STD).log_prob(y).sum(1)
    bpd = m.bits_per_dim(log_p, 4)
    se = bpd.std().item() / math.sqrt(len(bpd))
    expected = m.bits_per_dim(mean_log_p[None], 4).item()
    assert abs(bpd.mean().item() - expected) < 5 * se + 1e-9, (bpd.mean(), expected, se)


def test_dequantize_range_cells_and_errors():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(256, dtype=torch.uint8).repeat(40)
    y = m.dequantize(x, g, dtype=F64)
    assert y.dtype == F64 and (y >= -1).all() and (y < 1).all()
    assert torch.equal(torch.floor((y + 1) / 2 * 256).long(), x.long())  # each in its own cell
    u = (y + 1) / 2 * 256 - x.double()  # the uniform noise U, mean 1/2, variance 1/12
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / len(u))
    y01 = m.dequantize(x, torch.Generator().manual_seed(1), scale=1.0, shift=0.0, dtype=F64)
    torch.testing.assert_close(y01, (y + 1) / 2)  # same U, the [0, 1) scaling
    assert m.dequantize(x[:3]).dtype == torch.get_default_dtype()
    with pytest.raises(TypeError, match="integer pixel values"):
        m.dequantize(torch.zeros(3))
    with pytest.raises(ValueError, match="0..255"):
        m.dequantize(torch.tensor([0, 256]))
    with pytest.raises(ValueError, match="n_dims"):
        m.bits_per_dim(torch.zeros(1), 0)


# -- continuous-time DSM per sample and its weightings ------------------------------------------
def _dsm_by_hand(net, sde, x0, t, seed):
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    a, s = m.expand_to(sde.mean_coeff(t), x0), m.expand_to(sde.std(t), x0)
    x_t = a * x0 + s * z
    return net(x_t, t), z, s


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_per_sample_weightings_by_hand(name, gen):
    sde = SDES[name]
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=F64)  # image-shaped
    t = torch.linspace(0.05, 0.95, 6, dtype=F64)
    W = torch.randn(2, 2, generator=gen, dtype=F64)

    def net(x, t):  # any function of (x, t) will do
        return torch.einsum("ij,njhw->nihw", W, x) * m.expand_to(1 + t, x)

    s_theta, z, sigma = _dsm_by_hand(net, sde, x0, t, seed=5)
    g2 = sde.diffusion(t) ** 2

    def loss(weighting):
        return m.dsm_loss_per_sample(net, sde, x0, t, weighting,
                                     generator=torch.Generator().manual_seed(5))

    manual_sigma2 = (sigma * s_theta + z).flatten(1).square().sum(1)  # |sigma s + z|^2
    torch.testing.assert_close(loss("sigma2"), manual_sigma2)
    manual_lik = g2 * (s_theta + z / sigma).flatten(1).square().sum(1)  # g^2 |s + z/sigma|^2
    torch.testing.assert_close(loss("likelihood"), manual_lik)
    manual_cb = (1 + t**2) * (s_theta + z / sigma).flatten(1).square().sum(1)
    torch.testing.assert_close(loss(lambda t: 1 + t**2), manual_cb)
    assert loss("sigma2").shape == (6,)
    assert not torch.allclose(loss("likelihood"), manual_sigma2)  # the weightings differ


def test_dsm_loss_is_the_mean_of_the_per_sample_loss(gen):
    sde, x0 = SDES["subvp"], torch.randn(64, 2, generator=gen)
    net = lambda x, t: -x * m.expand_to(1 + t, x)
    per = m.dsm_loss_per_sample(net, sde, x0, generator=torch.Generator().manual_seed(9))
    total = m.dsm_loss(net, sde, x0, generator=torch.Generator().manual_seed(9))
    assert per.shape == (64,) and torch.equal(per.mean(), total)


def test_dsm_loss_per_sample_validates(gen):
    sde, x0 = SDES["vp"], torch.zeros(4, 2)
    net = lambda x, t: x
    with pytest.raises(ValueError, match="weighting must be"):
        m.dsm_loss_per_sample(net, sde, x0, weighting="uniform")
    with pytest.raises(ValueError, match="one time per sample"):
        m.dsm_loss_per_sample(net, sde, x0, t=torch.ones(3) * 0.5)
    with pytest.raises(ValueError, match="one value per sample"):
        m.dsm_loss_per_sample(net, sde, x0, weighting=lambda t: t[:2])


@pytest.mark.parametrize("name, limit", [("ve", 1.0), ("vp", 1.0), ("subvp", 2.0)])
def test_likelihood_weight_over_sigma2_grows_like_one_over_t(name, limit):
    """g(t)^2 / sigma_t^2 ~ c / t near t = 0 (c = 1 for VE and VP, 2 for sub-VP)."""
    sde = SDES[name]
    t = torch.tensor([1e-6, 1e-7], dtype=F64)
    ratio = t * sde.diffusion(t) ** 2 / sde.std(t) ** 2
    torch.testing.assert_close(ratio, torch.full_like(t, limit), rtol=1e-3, atol=0)
