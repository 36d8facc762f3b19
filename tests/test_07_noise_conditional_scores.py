"""Tests of module 07: the ladder rules, step sizes, annealed Langevin, weights, NCSN, images."""

import math

import numpy as np
import pytest
import torch

from common.datasets import GaussianMixture
from common.modules import load_module

pytestmark = pytest.mark.ch07
m = load_module("07")
m3 = load_module("03")
m6 = load_module("06")
F64 = torch.float64
DATA = GaussianMixture.separated_modes()


def ladder(sigma_max=20.0, sigma_min=0.01, n=20):
    return m6.GeometricNoise(sigma_min, sigma_max, n).levels(F64)


def final_state(*args, **kwargs):
    """The end point of annealed_langevin_states (07 has no separate end-point function)."""
    *_, x = m.annealed_langevin_states(*args, **kwargs)
    return x


def annealed_exact(n, steps, seed, r=0.3, sigma_max=20.0):
    sig = ladder(sigma_max)  # the module's L = 20
    x0 = m.prior_sample(n, (2,), sigma_max, torch.Generator().manual_seed(seed))
    return final_state(m6.exact_noise_score_fn(DATA), x0, sig, step_size=r * sig[-1].item() ** 2,
                       n_steps=steps, generator=torch.Generator().manual_seed(seed + 1))


# -- Must verify 1: exact perturbed scores recover the 0.8/0.2 weights within 0.05 --
def test_annealed_langevin_with_exact_scores_recovers_weights():
    x = annealed_exact(1500, 100, seed=0)
    w = m3.mode_fractions(x, DATA)[0].item()
    assert abs(w - 0.8) < 0.05, f"annealed weight {w:.3f}, expected 0.8 +- 0.05"
    # ...where plain Langevin from the same start, with as many steps, does not (module 03)
    x0 = m.prior_sample(1500, (2,), 20.0, torch.Generator().manual_seed(0))
    *_, plain = m3.langevin(DATA.score, x0, 0.1, 2000, torch.Generator().manual_seed(1))
    w_plain = m3.mode_fractions(plain, DATA)[0].item()
    assert abs(w_plain - 0.8) > 0.15, f"plain Langevin weight {w_plain:.3f} unexpectedly right"


@pytest.mark.parametrize("sigma_max", [1.0, 2.0])
def test_too_small_sigma_max_fails_to_recover_weights(sigma_max):
    """p_sigma_max still has a deep valley (Section 2.3): chains stay in their basins."""
    assert m.valley_depth(DATA, sigma_max) < 0.1
    x = annealed_exact(1000, 100, seed=2, sigma_max=sigma_max)
    w = m3.mode_fractions(x, DATA)[0].item()
    assert abs(w - 0.8) > 0.1, f"sigma_max = {sigma_max} gave weight {w:.3f}; expected a failure"


def test_sigma_max_past_the_merging_point_is_enough():
    """sigma_max = 5 > 4.6: merged modes, the weights come out right (the rule: an upper bound)."""
    assert m.valley_depth(DATA, 5.0) == 1.0
    x = annealed_exact(1500, 100, seed=3, sigma_max=5.0)
    w = m3.mode_fractions(x, DATA)[0].item()
    assert abs(w - 0.8) < 0.05, f"sigma_max = 5 gave weight {w:.3f}, expected 0.8 +- 0.05"


# -- where the modes of p_sigma merge (Sections 2.2 and 2.3) --
def test_valley_depth_matches_closed_form_for_equal_weights():
    """Equal weights, std s = sqrt(1 + sigma^2), means +-m on a line: the valley is at the
    midpoint and the peaks at +-m (for m >> s), so p(valley)/p(peak) = 2 e^{-m^2/2s^2} /
    (1 + e^{-2m^2/s^2}); the bumps merge exactly when s = m, i.e. sigma = sqrt(m^2 - 1) = 7."""
    equal = GaussianMixture.separated_modes((0.5, 0.5))
    half = 5 * math.sqrt(2)  # m = |mu_1 - mu_2| / 2
    s2 = 2.0  # sigma = 1
    truth = 2 * math.exp(-half**2 / (2 * s2)) / (1 + math.exp(-2 * half**2 / s2))
    assert m.valley_depth(equal, 1.0) == pytest.approx(truth, rel=1e-4)
    assert m.merge_sigma(equal) == pytest.approx(math.sqrt(half**2 - 1), abs=1e-3)
    assert m.valley_depth(equal, 6.9) < 1.0 and m.valley_depth(equal, 7.1) == 1.0


def test_unequal_weights_merge_earlier_and_numbers_quoted_in_prose():
    assert m.merge_sigma(DATA) == pytest.approx(4.64, abs=0.01)
    assert m.valley_depth(DATA, 1.0) == pytest.approx(1.5e-5, rel=0.05)
    assert m.valley_depth(DATA, 2.0) == pytest.approx(0.026, abs=0.001)
    assert m.valley_depth(DATA, 3.0) == pytest.approx(0.31, abs=0.005)
    # Section 2.4: the heavy side's equilibrium mass at the L = 10 and L = 20 levels near 3
    assert m.basin_mass(DATA, 20.46 / 2.333**2) == pytest.approx(0.781, abs=0.001)
    assert m.basin_mass(DATA, 20.46 / 1.494**5) == pytest.approx(0.796, abs=0.001)


# -- Must verify 2: the learned NCSN's distance to data within a factor of the exact sampler's
@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    sig = ladder()
    model = m6.NoiseConditionalScoreNet(dim=2, hidden=64, embed_dim=32, n_layers=3, generator=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, m6.warmup_lr_lambda(50))
    ema = m6.EMA(model, 0.99)
    gen = torch.Generator().manual_seed(1)
    loop = m6.training_iterator(model, opt,
                            lambda mdl, x0: m6.noise_conditional_loss(mdl, x0, sig.float(), gen),
                            lambda: DATA.sample(256, gen, dtype=torch.float32), 800,
                            scheduler=sched, ema=ema, grad_clip=1.0)
    for _ in loop:
        pass
    return ema.averaged(model)


LEARNED_FACTOR = 2.0  # stated in the module's summary: SW2 learned / SW2 exact sampler < 2


def test_learned_ncsn_distance_within_factor_of_exact(trained_model):
    n, steps, sig = 1000, 50, ladder()
    kw = {"step_size": 0.3 * sig[-1].item() ** 2, "n_steps": steps}
    x0 = m.prior_sample(n, (2,), 20.0, torch.Generator().manual_seed(5))
    exact = final_state(m6.exact_noise_score_fn(DATA), x0, sig, **kw,
                        generator=torch.Generator().manual_seed(6))
    learned = final_state(m.learned_score_fn(trained_model), x0, sig, **kw,
                          generator=torch.Generator().manual_seed(6))
    ref = DATA.sample(n, torch.Generator().manual_seed(7), dtype=F64)
    q_exact, q_learned = (m.sw_and_mmd(x, ref, seed=0) for x in (exact, learned))
    assert q_learned["sw"] < LEARNED_FACTOR * q_exact["sw"], (q_learned, q_exact)
    # the better-founded comparison of the summary: no error beyond the weights, i.e. each
    # sample is about as far from the data as perfect components with its own weights
    for x, q in [(exact, q_exact), (learned, q_learned)]:
        control = m.same_weights_control(DATA, m.heavy_weight(x, DATA), n,
                                         torch.Generator().manual_seed(9))
        assert 0.8 < q["sw"] / m.sw_and_mmd(control, ref, seed=0)["sw"] < 1.25
    # the check can fail: an untrained network is far worse
    untrained = m6.NoiseConditionalScoreNet(dim=2, hidden=64, embed_dim=32, generator=0).eval()
    bad = final_state(m.learned_score_fn(untrained), x0, sig, **kw,
                      generator=torch.Generator().manual_seed(6))
    assert m.sw_and_mmd(bad, ref, seed=0)["sw"] > LEARNED_FACTOR * q_exact["sw"]


def test_data_baseline_is_not_a_floor():
    """Section 4.2: a sample whose heavy share lands nearer the reference's than a typical data
    draw's scores below the data-vs-data baseline."""
    n = 2000
    ref = DATA.sample(n, torch.Generator().manual_seed(7), dtype=F64)
    base = m.data_baseline(DATA, ref, 8, seed=0)
    matched = m.same_weights_control(DATA, m.heavy_weight(ref, DATA), n,
                                     torch.Generator().manual_seed(1))
    assert m.sw_and_mmd(matched, ref, seed=0)["sw"] < base["sw"], base


# -- the ladder rules --
def test_overlap_criterion_matches_monte_carlo_in_high_dimension():
    gamma = m.ratio_from_overlap(784)
    assert m.overlap_criterion(gamma, 784) == pytest.approx(0.5, abs=1e-9)
    assert 1.07 < gamma < 1.09
    mc = m.overlap_monte_carlo(gamma, 784, 20_000, torch.Generator().manual_seed(0))
    assert abs(mc - 0.5) < 0.03, mc  # normal approximation of |x|; MC se 0.0035
    # CIFAR-10: NCSNv2's 232 levels from 50 to 0.01 have ratio 1.037, near the criterion
    assert m.ratio_from_overlap(3072) == pytest.approx((50 / 0.01) ** (1 / 231), abs=0.005)


def test_overlap_criterion_does_not_bind_in_2d():
    assert m.ratio_from_overlap(2) is None and m.ratio_from_overlap(4) is None
    g = np.geomspace(1.0, 100.0, 200)
    for dim in (1, 2, 3, 4):  # Section 2.4: C >= Phi(3) - Phi(-3) = 0.9973 when sqrt(2D) < 3
        assert (m.overlap_criterion(g, dim) >= 0.9973 - 1e-9).all()
    assert m.ratio_from_overlap(5) is not None


def test_max_pairwise_distance_and_level_count():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    assert m.max_pairwise_distance(x) == pytest.approx(5.0)
    assert m.max_pairwise_distance(x.reshape(3, 1, 2, 1)) == pytest.approx(5.0)
    assert m.n_levels_for(8.0, 1.0, 2.0) == 4
    assert m.n_levels_for(8.0, 1.0, 1.9) == 5
    sig = m6.GeometricNoise(1.0, 8.0, m.n_levels_for(8.0, 1.0, 2.0)).levels(F64)
    torch.testing.assert_close(sig, torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64))


def test_step_sizes_scale_with_sigma_squared():
    sig = ladder()
    alpha = m.step_sizes(sig, 3e-5)
    torch.testing.assert_close(alpha / sig**2, torch.full_like(sig, 3e-5 / sig[-1].item() ** 2))
    assert alpha[-1].item() == pytest.approx(3e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0])
def test_step_bias_below_the_data_detail(sigma):
    """Section 2.5: on a unit-variance mode, p_sigma is N(0, 1 + sigma^2) and the step
    r sigma^2 leaves a relative variance excess of about r sigma^2 / (4 (1 + sigma^2)): r/4 at
    large sigma, fading below sigma ~ 1. Checked against simulated chains."""
    r, n = 0.3, 100_000
    v, alpha = 1 + sigma**2, r * sigma**2
    g = torch.Generator().manual_seed(0)
    x = math.sqrt(v) * torch.randn(n, 1, generator=g, dtype=F64)  # start in equilibrium
    n_steps = int(10 / (alpha / (2 * v)))  # about 10 relaxation times of the variance
    for _ in range(n_steps):
        x = m3.langevin_step(x, -x / v, alpha, g)
    excess = x.var().item() / v - 1
    approx = r * sigma**2 / (4 * (1 + sigma**2))
    se = math.sqrt(2 / n) * (1 + excess)
    assert abs(excess - approx) < 5 * se + 0.1 * approx, (excess, approx)
    # the exact value (module 03's fixed point) is within 10% of the approximation for r = 0.3
    exact = m3.ula_stationary_variance(v, alpha) / v - 1
    assert exact == pytest.approx(approx, rel=0.1)
    if sigma >= 3:
        assert exact == pytest.approx(r / 4, rel=0.2)  # the "sigma above the detail" picture


def test_step_bias_fades_at_small_sigma():
    """Below sigma ~ 1 the excess falls like r sigma^2 / 4 (too small to simulate cheaply)."""
    r = 0.3
    for sigma in (0.1, 0.03, 0.01):
        v = 1 + sigma**2
        exact = m3.ula_stationary_variance(v, r * sigma**2) / v - 1
        assert exact == pytest.approx(r * sigma**2 / (4 * v), rel=1e-3)
        assert exact < 0.011 * r / 4


def test_variance_ratio_matches_simulated_chain():
    """Technique 4's closed form against the chain x <- x - (r/2) x + sqrt(r) z (sigma = 1)."""
    r, T, gamma, n = 0.2, 15, 2.3, 200_000
    g = torch.Generator().manual_seed(0)
    x = gamma * torch.randn(n, generator=g, dtype=F64)
    for _ in range(T):
        x = m3.langevin_step(x[:, None], -x[:, None], r, g)[:, 0]
    se = x.var().item() * math.sqrt(2 / n)
    assert abs(m.variance_ratio_after(r, T, gamma) - x.var().item()) < 5 * se
    # long-run limit = module 03's ULA stationary variance
    assert m.variance_ratio_after(r, 10_000, gamma) == pytest.approx(
        m3.ula_stationary_variance(1.0, r))
    r4 = m.technique4_step_ratio(100, 2.3)
    assert abs(m.variance_ratio_after(r4, 100, 2.3) - 1) < 0.05


@pytest.mark.parametrize("n_steps, gamma", [(100, 1.494), (100, 2.333), (5, 1.0815)])
def test_technique4_ratio_is_above_one_and_minimised(n_steps, gamma):
    """Section 2.6: both excess terms are positive, so v_T / sigma^2 > 1 for every r, and the
    Technique 4 r is the minimum (brings the ratio as close to 1 as it gets)."""
    r = np.geomspace(1e-4, 1.9, 5000)
    ratio = m.variance_ratio_after(r, n_steps, gamma)
    assert (ratio > 1).all()
    r4 = m.technique4_step_ratio(n_steps, gamma)
    assert m.variance_ratio_after(r4, n_steps, gamma) <= ratio.min() + 1e-6
    # the split into the start's leftover and the step bias adds up
    a, s_inf = 1 - r / 2, 1 / (1 - r / 4)
    np.testing.assert_allclose(ratio, 1 + a ** (2 * n_steps) * (gamma**2 - s_inf) + (s_inf - 1))
    assert m.technique4_step_ratio(100, 1.494) == pytest.approx(0.061, abs=0.001)


# -- the training loss: the zero network and the floor (Section 4.3) --
def test_zero_network_scores_half_the_dimension():
    x0 = DATA.sample(40_000, torch.Generator().manual_seed(0), dtype=F64)
    loss, _ = m6.noise_conditional_loss(lambda x, s: torch.zeros_like(x), x0, ladder(),
                                        torch.Generator().manual_seed(1))
    # 1/2 |z|^2 with z ~ N(0, I_2) has mean 1 and standard deviation 1
    assert abs(loss.item() - 1.0) < 5 / math.sqrt(40_000), loss.item()


def test_loss_floor_of_a_unit_gaussian_is_half_d_over_one_plus_sigma_squared():
    gauss = GaussianMixture.isotropic([1.0], [[0.0, 0.0]], 1.0)
    sig = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    n = 40_000
    floor = m.loss_floor(gauss, sig, n, torch.Generator().manual_seed(0))
    truth = float(np.mean([1.0 / (1 + s**2) for s in sig.tolist()]))  # (D/2) / (1 + sigma^2)
    # per-sample terms are (1/2)|.|^2 of a Gaussian: sd about the mean; three levels averaged
    assert abs(floor - truth) < 5 * truth / math.sqrt(3 * n), (floor, truth)
    # the mixture's floor sits between 0 and D/2 = 1, near 0.63 for the module's 20 levels
    mix_floor = m.loss_floor(DATA, ladder(20.46), 20_000, torch.Generator().manual_seed(1))
    assert 0.6 < mix_floor < 0.66, mix_floor


# -- helpers of the figures and the summary --
def test_same_weights_control_has_exact_counts_and_true_components():
    x = m.same_weights_control(DATA, 0.7, 20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 2)
    heavy = x[:14_000]
    assert m3.mode_fractions(x, DATA)[0].item() == pytest.approx(0.7, abs=1e-3)
    torch.testing.assert_close(heavy.mean(0), DATA.means[0], atol=0.05, rtol=0)
    torch.testing.assert_close(heavy.var(0), torch.ones(2, dtype=F64), atol=0.05, rtol=0)


def test_distances_of_a_pure_weight_error():
    """Section 4.2: with unit modes 14.1 apart, a weight error dw alone gives
    MMD^2 ~ (2/3) dw^2 (bandwidth 1) and SW2^2 ~ 0.4 dw |mu_1 - mu_2|^2."""
    n, dw = 3000, 0.3
    ref = m.same_weights_control(DATA, 0.8, n, torch.Generator().manual_seed(0))
    x = m.same_weights_control(DATA, 0.8 - dw, n, torch.Generator().manual_seed(1))
    q = m.sw_and_mmd(x, ref, seed=0)
    assert q["mmd"] == pytest.approx(2 / 3 * dw**2, rel=0.15), q
    assert 0.33 < q["sw"] ** 2 / (dw * 200) < 0.47, q  # "about 0.4 survives"
    # the unbiased MMD^2 of two draws of the same law scatters around 0, by about 1/n
    same = m.same_weights_control(DATA, 0.8, n, torch.Generator().manual_seed(2))
    assert abs(m.sw_and_mmd(same, ref, seed=0)["mmd"]) < 3 / n


def test_levels_shown_match_the_prose():
    """Section 4.5 names levels 1, 5, 7, 10 and 20 of the default ladder."""
    sig = ladder(20.46).tolist()
    show = m.levels_to_show(sig, m.Config().show_sigmas)
    assert [i + 1 for i in show] == [1, 5, 7, 10, 20]


def test_summary_marks():
    assert m.with_mark("0.80", True, quick=False).endswith("ok")
    assert m.with_mark("0.60", False, quick=False).endswith("MISS")
    assert m.with_mark("0.60", False, quick=True) == "0.60"
    row = m.sweep_row(1.0, 0.59, m.valley_depth(DATA, 1.0), 20.5, quick=False)
    assert row[1].endswith("ok") and "fails" in row[2] and "valley/peak = 1e-05" in row[2]
    row = m.sweep_row(5.0, 0.70, 1.0, 20.5, quick=False)
    assert row[1].endswith("MISS")


# -- the sampler --
def test_generator_yields_each_level_and_denoised_state():
    sig = ladder(n=4)
    x0 = torch.zeros(5, 2, dtype=F64)
    states = list(m.annealed_langevin_states(m6.exact_noise_score_fn(DATA), x0, sig,
                                             step_size=1e-5, n_steps=3,
                                             generator=torch.Generator().manual_seed(0)))
    assert len(states) == 5 and all(s.shape == (5, 2) for s in states)
    no_denoise = list(m.annealed_langevin_states(m6.exact_noise_score_fn(DATA), x0, sig,
                                                 step_size=1e-5, n_steps=3,
                                                 generator=torch.Generator().manual_seed(0),
                                                 denoise=False))
    assert len(no_denoise) == 4
    torch.testing.assert_close(no_denoise[-1], states[-2])


def test_final_denoising_step_is_the_posterior_mean():
    sig = torch.tensor([3.0, 0.5], dtype=F64)
    x0 = m.prior_sample(50, (2,), 3.0, torch.Generator().manual_seed(0))
    *_, last, denoised = m.annealed_langevin_states(m6.exact_noise_score_fn(DATA), x0, sig,
                                                     step_size=0.05, n_steps=5,
                                                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(denoised, DATA.posterior_mean(last, 0.5))


def test_agrees_with_module_06_sketch():
    """06's annealed_langevin(step_ratio) equals ours with step_size = step_ratio * sigma_L^2."""
    sig = ladder(n=5)
    x0 = m.prior_sample(20, (2,), 20.0, torch.Generator().manual_seed(0))
    ours = final_state(m6.exact_noise_score_fn(DATA), x0, sig, step_size=0.3 * sig[-1].item() ** 2,
                       n_steps=7, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError):  # the step arguments are keyword-only (06's order differs)
        list(m.annealed_langevin_states(m6.exact_noise_score_fn(DATA), x0, sig, 7, 0.3))
    theirs = m6.annealed_langevin(m6.exact_noise_score_fn(DATA), x0, sig, 7, 0.3,
                                  torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, theirs)


def test_basin_mass_is_the_equilibrium_fraction():
    g = torch.Generator().manual_seed(0)
    for sigma in (0.5, 5.0):
        x = DATA.perturbed(sigma).sample(100_000, g, dtype=F64)
        frac = m3.mode_fractions(x, DATA)[0].item()
        assert abs(frac - m.basin_mass(DATA, sigma)) < 5 * math.sqrt(0.25 / 100_000)


# -- the conv net, on small synthetic tensors --
def test_conv_net_shapes_scaling_and_training_step():
    torch.manual_seed(0)
    net = m.SmallConvScoreNet(channels=1, width=16, emb_dim=16, generator=0)
    x = torch.randn(3, 1, 12, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = net(x, sigma)
    assert out.shape == x.shape
    torch.testing.assert_close(out * sigma[:, None, None, None], net.unscaled(x, sigma))
    assert net(x, 2.0).shape == x.shape  # a number broadcasts to every sample
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(2, 1, 10, 10), 1.0)
    # a few Adam steps on one fixed batch lower the weighted DSM loss
    x0 = torch.rand(8, 1, 8, 8)
    sig = torch.tensor([0.1, 0.5, 2.0])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = m6.noise_conditional_loss(net, x0, sig, torch.Generator().manual_seed(0))
        m6.optimizer_step(net, opt, loss)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]


# -- end to end --
def test_main_quick_writes_figures(quick_run):
    run = quick_run("07")
    out = run.result
    folder = run.outdir / m.MODULE
    for name in ("noise_schedule", "training_loss", "mode_weights", "samples_per_level"):
        assert (folder / f"{name}.png").exists(), name
    assert len(out["exact"]["exact_states"]) == m.Config().n_levels + 1


def test_images_without_mnist_stops_with_clear_message(tmp_path):
    with pytest.raises(SystemExit) as info:
        m.main(["--quick", "--images", "--data-dir", str(tmp_path / "nothing"),
                "--outdir", str(tmp_path)])
    msg = str(info.value.code)
    assert "MNIST is not under" in msg and "train-images-idx3-ubyte" in msg
    assert "add --download" in msg


def test_failed_download_does_not_suggest_the_flag_already_given(tmp_path, monkeypatch):
    """--download without network: the message gives the failure and the manual route, not
    "add --download" again; no empty folders are left in the data root."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once, offline
    with pytest.raises(SystemExit) as info:
        m.main(["--quick", "--images", "--download", "--data-dir", str(tmp_path / "data"),
                "--outdir", str(tmp_path / "out")])
    msg = str(info.value.code)
    assert "downloading it failed" in msg and "train-images-idx3-ubyte" in msg
    assert "add --download" not in msg
    assert not (tmp_path / "data").exists()


def test_images_quick_run(tmp_path, real_mnist_root):
    m.main(["--quick", "--images", "--outdir", str(tmp_path)])
    assert (tmp_path / m.MODULE / "mnist_samples.png").exists()
