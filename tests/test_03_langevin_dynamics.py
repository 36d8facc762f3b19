"""Tests of the equations of 03_langevin_dynamics.py (the curriculum's "must verify" items).

- ULA on a 1D Gaussian has the stationary variance v / (1 - eps/(4v)) of the discretised chain
  (simulation against closed form, and the bias is resolved from the true variance);
- MALA's acceptance ratio preserves the target: detailed balance holds exactly, and a histogram
  of MALA samples passes a chi-square test against the density where ULA's fails;
- the grid Fokker-Planck solution matches the Ornstein-Uhlenbeck closed form, conserves mass,
  and converges to p at rate O(h^2);
plus the building blocks' contracts, the mode-weight pitfall, an end-to-end --quick run and the
command-line errors.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common.datasets import GaussianMixture
from common.exercises import assert_close
from common.modules import load_module

pytestmark = pytest.mark.ch03
F64 = torch.float64


@pytest.fixture(scope="module")
def m03():
    return load_module("03")


# -- the Langevin step and ULA ------------------------------------------------------------------
def test_langevin_step_is_the_stated_update(m03, gen):
    """x' = x + (eps/2) s + sqrt(eps) z, with per-chain step sizes broadcast over any shape."""
    x, s, z = (torch.randn(5, 2, 3, generator=gen, dtype=F64) for _ in range(3))
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64)
    expected = x + 0.5 * eps[:, None, None] * s + eps.sqrt()[:, None, None] * z
    assert_close(m03.langevin_step(x, s, eps, noise=z), expected, what="per-chain step")
    assert_close(m03.langevin_step(x, s, 0.25, noise=z), x + 0.125 * s + 0.5 * z,
                 what="scalar step")


def test_langevin_generator_yields_every_state_reproducibly(m03):
    target = m03.mixture_2d()
    x0 = torch.zeros(7, 2, dtype=F64)
    states = list(m03.langevin(target.score, x0, 0.1, 12, torch.Generator().manual_seed(0)))
    again = list(m03.langevin(target.score, x0, 0.1, 12, torch.Generator().manual_seed(0)))
    assert len(states) == 12 and states[-1].shape == (7, 2)
    torch.testing.assert_close(states[-1], again[-1])
    assert (x0 == 0).all()  # the start is not modified in place
    # the first state is one step from x0 with the generator's first noise draw
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(states[0], 0.05 * target.score(x0) + math.sqrt(0.1) * z)


def test_step_size_is_validated(m03):
    x0 = torch.zeros(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="positive"):
        next(m03.langevin(lambda x: -x, x0, -0.1, 3))
    with pytest.raises(ValueError, match="one value per chain"):
        next(m03.langevin(lambda x: -x, x0, torch.ones(3), 3))
    with pytest.raises(ValueError, match="stable only"):
        m03.ula_stationary_variance(1.0, 4.0)
    # a tiny positive step is valid (no float32 underflow in the check): the chain barely moves
    assert next(m03.langevin(lambda x: -x, x0, 1e-300, 1)).abs().max() < 1e-140


def test_closed_form_is_the_fixed_point_of_the_variance_recursion(m03):
    for v, eps in [(1.0, 0.05), (1.0, 1.5), (0.3, 0.2), (2.0, 7.0)]:
        a, var = 1 - eps / (2 * v), 0.0
        for _ in range(5000):
            var = a * a * var + eps
        assert m03.ula_stationary_variance(v, eps) == pytest.approx(var, rel=1e-10)
    # to first order the bias is eps/4, whatever v is
    for v in (0.3, 1.0, 2.0):
        assert (m03.ula_stationary_variance(v, 1e-4) - v) / 2.5e-5 == pytest.approx(1, rel=1e-3)


def test_ula_stationary_variance_matches_closed_form(m03):
    """Simulate ULA on N(0.7, 1.5): sample variance = v / (1 - eps/(4v)) within 4 standard
    errors (s.e. = v_eps sqrt(2/N)), and for eps >= 0.5 the bias is resolved: more than 4 s.e.
    away from the true variance."""
    mean, v, n = 0.7, 1.5, 40_000
    steps = (0.05, 0.2, 0.5, 1.0, 2.0)
    eps = torch.tensor(steps, dtype=F64).repeat_interleave(n)
    x0 = torch.zeros(len(eps), 1, dtype=F64)
    *_, x = m03.langevin(lambda x: -(x - mean) / v, x0, eps, 250,
                         torch.Generator().manual_seed(7))
    x = x.reshape(len(steps), n)
    for e, chains in zip(steps, x):
        closed = m03.ula_stationary_variance(v, e)
        se = closed * math.sqrt(2 / n)
        var = chains.var().item()
        assert abs(var - closed) < 4 * se, (e, var, closed, se)
        assert abs(chains.mean().item() - mean) < 4 * math.sqrt(closed / n)  # no bias in mean
        if e >= 0.5:
            assert var - v > 4 * se, f"eps={e}: bias {var - v:.4f} not resolved (s.e. {se:.4f})"
    # a small step is nearly unbiased: v_eps / v - 1 < 1%
    assert m03.ula_stationary_variance(v, 0.05) / v - 1 < 0.01


def test_stability_limit_of_the_2d_mixture(m03):
    target = m03.mixture_2d()
    assert m03.ula_stability_limit(target) == pytest.approx(1.2, abs=1e-9)


# -- MALA ---------------------------------------------------------------------------------------
def test_log_proposal_is_the_stated_gaussian(m03, gen):
    x_to, x_from, s = (torch.randn(6, 3, generator=gen, dtype=F64) for _ in range(3))
    eps = 0.37
    ref = torch.distributions.Normal(x_from + 0.5 * eps * s, math.sqrt(eps)).log_prob(x_to)
    assert_close(m03.log_proposal(x_to, x_from, s, eps), ref.sum(1), what="log q(x'|x)")
    eps_chain = torch.linspace(0.1, 0.6, 6, dtype=F64)
    ref = torch.distributions.Normal(x_from + 0.5 * eps_chain[:, None] * s,
                                     eps_chain.sqrt()[:, None]).log_prob(x_to)
    assert_close(m03.log_proposal(x_to, x_from, s, eps_chain), ref.sum(1),
                 what="log q(x'|x), per-chain eps")


def _log_flow(m03, target, x, y, eps, log_alpha):
    """log [p(x) q(y|x) alpha(x, y)]: the probability flow from x to y."""
    return target.log_prob(x) + m03.log_proposal(y, x, target.score(x), eps) + log_alpha


def test_mala_acceptance_satisfies_detailed_balance(m03, gen):
    """p(x) q(x'|x) alpha(x, x') = p(x') q(x|x') alpha(x', x) for arbitrary pairs; dropping the
    q-ratio (a plain Metropolis test) breaks the identity, so this test can fail."""
    target = m03.mixture_2d()
    x = 1.5 * torch.randn(200, 2, generator=gen, dtype=F64)
    y = x + 0.8 * torch.randn(200, 2, generator=gen, dtype=F64)
    eps = 0.4
    lp_x, lp_y, s_x, s_y = target.log_prob(x), target.log_prob(y), target.score(x), target.score(y)
    alpha_xy = m03.mala_log_acceptance(x, y, lp_x, lp_y, s_x, s_y, eps)
    alpha_yx = m03.mala_log_acceptance(y, x, lp_y, lp_x, s_y, s_x, eps)
    assert (alpha_xy <= 0).all() and ((alpha_xy == 0) | (alpha_yx == 0)).all()
    forward = _log_flow(m03, target, x, y, eps, alpha_xy)
    backward = _log_flow(m03, target, y, x, eps, alpha_yx)
    assert_close(forward, backward, rtol=1e-10, atol=1e-10, what="detailed balance")
    naive_xy = (lp_y - lp_x).clamp(max=0)  # Metropolis without the proposal correction
    naive_yx = (lp_x - lp_y).clamp(max=0)
    gap = (_log_flow(m03, target, x, y, eps, naive_xy)
           - _log_flow(m03, target, y, x, eps, naive_yx)).abs()
    assert gap.max() > 0.1


def test_mala_preserves_the_target_histogram(m03):
    """Start 20,000 chains at exact samples of the 1D two-mode mixture and take 30 steps with a
    large eps = 1.0. MALA's samples pass Pearson's chi-square test against the mixture's CDF at
    the 0.1% level (28 bins, p-value > 1e-3 with this fixed seed); ULA's, run the same way,
    fail it decisively (p < 1e-6), which shows the test has the power to fail."""
    target = m03.mixture_1d()
    gen = torch.Generator().manual_seed(11)
    x0 = target.sample(20_000, gen, dtype=F64)
    eps, n_steps = 1.0, 30
    x_mala, acc = m03.mala_sample(target.log_prob, target.score, x0, eps, n_steps, gen)
    *_, x_ula = m03.langevin(target.score, x0, eps, n_steps, gen)
    edges = np.linspace(-2.5, 3.0, 27)
    cdf = lambda z: m03.mixture_cdf_1d(target, z)
    stat, dof, p_mala = m03.chi_square_test(x_mala[:, 0], cdf, edges)
    assert dof == 27
    assert p_mala > 1e-3, f"MALA histogram rejected: chi2 = {stat:.1f} on {dof} dof"
    assert m03.chi_square_test(x_ula[:, 0], cdf, edges)[2] < 1e-6
    assert 0.3 < acc.mean() < 0.95  # a step that really gets rejected sometimes


def test_mala_without_q_ratio_samples_the_wrong_variance(m03):
    """Section 2.4 / 4.1: the plain Metropolis test with the Langevin proposal is not invariant
    for N(0, 1); its variance goes to about v/2 for small eps (the drift is counted twice),
    while MALA's stays at v. 20,000 chains: s.e. of a variance ~ 0.01."""
    gen = torch.Generator().manual_seed(12)
    x0 = torch.randn(20_000, 1, generator=gen, dtype=F64)  # start at the target
    score, log_prob = (lambda x: -x), (lambda x: -0.5 * x[:, 0].square())
    x_good, _ = m03.mala_sample(log_prob, score, x0, 0.2, 150, gen)
    x_bad, _ = m03.mala_sample(log_prob, score, x0, 0.2, 150, gen, q_ratio=False)
    assert abs(x_good.var().item() - 1.0) < 0.05
    assert abs(x_bad.var().item() - 0.5) < 0.06, x_bad.var().item()


def test_mode_spread_sees_ula_bias(m03):
    """Spread around the nearest mode: exact samples vs ULA at eps = 0.4 (wider by
    roughly eps/4 = 0.10; per-component exact formula 0.12-0.15, no closed form for overlap)."""
    target, gen = m03.mixture_2d(), torch.Generator().manual_seed(13)
    exact, se = m03.mode_spread(target.sample(20_000, gen, dtype=F64), target)
    x0 = target.sample(4000, gen, dtype=F64)
    *_, x = m03.langevin(target.score, x0, 0.4, 100, gen)
    ula, se_ula = m03.mode_spread(x, target)
    assert 0.06 < ula - exact < 0.14 and se_ula < 0.015


def test_per_component_exact_bias_of_mixture_2d(m03):
    """Section 4.2: eps = 0.4 applied to each component variance (eigenvalue) of mixture_2d
    on its own gives v / (1 - eps/(4v)) - v between 0.12 and 0.15, above the rough eps/4."""
    covs = m03.mixture_2d().covs
    gains = [m03.ula_stationary_variance(v, 0.4) - v
             for v in torch.linalg.eigvalsh(covs).flatten().tolist()]
    assert 0.12 < min(gains) and max(gains) < 0.151 and min(gains) > 0.4 / 4


def test_chi_square_test_on_exact_samples(m03, gen):
    x = torch.randn(5000, generator=gen, dtype=F64)
    edges = np.linspace(-2, 2, 15)
    assert m03.chi_square_test(x, stats.norm.cdf, edges)[2] > 1e-3
    assert m03.chi_square_test(1.1 * x, stats.norm.cdf, edges)[2] < 1e-3


def test_mala_acceptance_falls_with_step_size(m03):
    target = m03.mixture_2d()
    gen = torch.Generator().manual_seed(2)
    x0 = target.sample(500, gen, dtype=F64)
    eps = torch.tensor([1e-4, 0.1, 0.9], dtype=F64).repeat_interleave(500)
    x, acc = m03.mala_sample(target.log_prob, target.score, x0.repeat(3, 1), eps, 20, gen)
    rates = acc.reshape(3, 500).mean(1)
    assert x.shape == (1500, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert rates[0] > 0.999 and rates[0] > rates[1] > rates[2]


# -- Fokker-Planck on a grid --------------------------------------------------------------------
def test_fokker_planck_matches_the_ornstein_uhlenbeck_marginal(m03):
    """Gaussian target: the exact p_t is Gaussian with mean m + (m0 - m) e^{-t/(2v)} and variance
    v + (v0 - v) e^{-t/v}. The grid solution matches it to L1 < 2e-3 (error O(h^2 + dt)), and
    the error shrinks as the grid is refined."""
    fine, coarse = m03.fokker_planck_ou_error(400), m03.fokker_planck_ou_error(100)
    assert fine < 2e-3
    assert coarse > 2 * fine


def test_ou_marginal_matches_simulation(m03, gen):
    """Euler-Maruyama with a small step reproduces the closed-form mean and variance at t = 1."""
    m, v, m0, v0 = 0.5, 0.8, -2.0, 0.1
    x0 = m0 + math.sqrt(v0) * torch.randn(100_000, 1, generator=gen, dtype=F64)
    *_, x = m03.langevin(lambda x: -(x - m) / v, x0, 0.005, 200, gen)
    mean_t, var_t = m03.ou_marginal(m, v, m0, v0, 1.0)
    assert x.mean().item() == pytest.approx(mean_t, abs=4 * math.sqrt(var_t / 1e5) + 0.005)
    assert x.var().item() == pytest.approx(var_t, rel=0.02)


def test_fokker_planck_conserves_mass_and_positivity(m03):
    target = m03.mixture_1d()
    grid = m03.Grid1D.uniform(-6, 6, 200)
    p0 = stats.norm.pdf(grid.centres, 4.0, 0.2)
    for p in m03.fokker_planck_1d(target.score, grid, p0, 0.5, 50):  # a large, stable dt
        assert p.sum() * grid.h == pytest.approx(1.0, abs=1e-12)
        assert p.min() >= 0


def test_fokker_planck_converges_to_the_target(m03):
    """After t = 100 (gap ~ 0.27, so e^{-gap t} ~ 1e-12) the grid density equals the discrete
    stationary solution p_{i+1}/p_i = (1 + s h/2)/(1 - s h/2), whose L1 distance to p falls by
    about 4 when h halves (O(h^2)), to below 3e-4 with 400 cells. [-4.5, 4.5] holds all but
    3e-9 of the mass and keeps the cell Peclet number below 1 even with 100 cells."""
    target = m03.mixture_1d()
    errors = []
    for n in (100, 200, 400):
        grid = m03.Grid1D.uniform(-4.5, 4.5, n)
        p0 = stats.norm.pdf(grid.centres, -3.0, 0.3)
        *_, p = m03.fokker_planck_1d(target.score, grid, p0, 0.5, 200)
        s_face = target.score(torch.as_tensor(grid.edges[1:-1])[:, None])[:, 0].numpy()
        ratio = (1 + s_face * grid.h / 2) / (1 - s_face * grid.h / 2)
        np.testing.assert_allclose(p[1:] / p[:-1], ratio, rtol=1e-8)
        exact = target.log_prob(torch.as_tensor(grid.centres)[:, None]).exp().numpy()
        errors.append(np.abs(p - exact).sum() * grid.h)
    assert errors[-1] < 3e-4, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0, errors


def test_spectral_gap_matches_dense_eigenvalues(m03):
    target = m03.mixture_1d()
    banded = m03.fokker_planck_operator(target.score, m03.Grid1D.uniform(-6, 6, 150))
    L = np.diag(banded[1]) + np.diag(banded[0, 1:], 1) + np.diag(banded[2, :-1], -1)
    eigenvalues = np.sort(np.linalg.eigvals(L).real)
    assert abs(eigenvalues[-1]) < 1e-9  # the stationary density
    assert m03.spectral_gap(banded) == pytest.approx(-eigenvalues[-2], rel=1e-8)


def test_coarse_grid_is_refused(m03):
    steep = GaussianMixture.isotropic([1.0], [[0.0]], 0.05)
    with pytest.raises(ValueError, match="Peclet"):
        m03.fokker_planck_operator(steep.score, m03.Grid1D.uniform(-6, 6, 50))


# -- the separated-modes pitfall ----------------------------------------------------------------
def test_langevin_keeps_the_starting_basin_fractions(m03):
    """On 0.8/0.2 separated modes, chains started uniformly on [-8, 8]^2 end up split like
    their starting basins (~0.5), far from 0.8; and the score at the samples is the same for
    weights 0.8/0.2 and 0.2/0.8."""
    target = GaussianMixture.separated_modes()
    gen = torch.Generator().manual_seed(4)
    x0 = 16 * torch.rand(400, 2, generator=gen, dtype=F64) - 8
    *_, x = m03.langevin(target.score, x0, 0.1, 200, gen)
    start, end = m03.mode_fractions(x0, target), m03.mode_fractions(x, target)
    assert abs(end[0] - start[0]) < 0.03
    assert end[0] < 0.65
    flipped = GaussianMixture.separated_modes(weights=(0.2, 0.8))
    diff = (target.score(x) - flipped.score(x)).norm(dim=1)
    assert (diff < 1e-6).double().mean() > 0.99


def test_separated_modes_barriers(m03):
    """Section 2.6: the drop in log p from each mode to the lowest point between them is
    |mu_1 - mu_2|^2 / 8 = 25 nats from the heavy mode and ln 4 less (~23.6) from the light one."""
    target = GaussianMixture.separated_modes()
    u = torch.linspace(0, 1, 4001, dtype=F64)[:, None]
    low = target.log_prob(target.means[0] + u * (target.means[1] - target.means[0])).min()
    heavy, light = (target.log_prob(target.means) - low).tolist()
    assert abs(heavy - 25.0) < 0.02 and abs(light - 23.6) < 0.03
    assert abs(heavy - light - math.log(4)) < 0.01


# -- the script ---------------------------------------------------------------------------------
def test_main_quick_writes_every_figure(m03, quick_run):
    run = quick_run("03")
    out = run.out
    folder = run.outdir / m03.MODULE
    for name in ("ula_bias_1d_gaussian", "samples_2d_mixture", "distance_vs_step_size_and_steps",
                 "fokker_planck_vs_particles", "mode_weights_pitfall"):
        assert (folder / f"{name}.png").stat().st_size > 10_000, name
    assert "mode weights recovered by ULA" in out and "exercise_step_size_for_tolerance" in out
