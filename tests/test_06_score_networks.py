"""Tests of module 06: embeddings, output scaling, loss identities, EMA, training, sampling."""

import math

import pytest
import torch

from common.datasets import GaussianMixture
from common.metrics import mmd_rbf, sliced_wasserstein
from common.modules import load_module

pytestmark = pytest.mark.ch06
m = load_module("06")
F64 = torch.float64


# -- Must verify 1: the Fourier embedding has the stated frequencies and shape -------------------
def test_fourier_features_shape_formula_and_fixed_frequencies():
    emb = m.GaussianFourierFeatures(64, scale=16.0, generator=0)
    assert emb.W.shape == (32,)
    assert len(list(emb.parameters())) == 0, "W must be a buffer, not a trainable parameter"
    assert "W" in emb.state_dict()
    t = torch.linspace(-1, 1, 7)
    out = emb(t)
    assert out.shape == (7, 64)
    angle = 2 * math.pi * t[:, None] * emb.W[None, :]
    torch.testing.assert_close(out, torch.cat([angle.sin(), angle.cos()], dim=1))
    # reproducible from a seed or a generator, different for another seed
    torch.testing.assert_close(m.GaussianFourierFeatures(64, 16.0, generator=0).W, emb.W)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(m.GaussianFourierFeatures(64, 16.0, generator=g).W, emb.W)
    assert not torch.allclose(m.GaussianFourierFeatures(64, 16.0, generator=1).W, emb.W)


def test_fourier_frequencies_are_normal_with_the_stated_scale():
    """W_j ~ N(0, scale^2): sample mean and std within 4 standard errors (n = 20000)."""
    scale, n = 7.5, 20_000
    W = m.GaussianFourierFeatures(2 * n, scale=scale, generator=3).W.double()
    assert abs(W.mean()) < 4 * scale / math.sqrt(n)
    assert abs(W.std() / scale - 1) < 4 / math.sqrt(2 * n)  # se of a sample std: s / sqrt(2n)
    # the check can fail: the same frequencies do not have std 2 * scale
    assert abs(W.std() / (2 * scale) - 1) > 4 / math.sqrt(2 * n)


def test_fourier_kernel_is_gaussian():
    """gamma(t).gamma(t') / (E/2) -> exp(-2 pi^2 s^2 (t - t')^2), Monte Carlo error ~ 1/sqrt(E)."""
    s, half = 4.0, 8192
    emb = m.GaussianFourierFeatures(2 * half, scale=s, generator=5)
    delta = torch.linspace(-0.5, 0.5, 101)
    k = m.embedding_kernel(emb, delta)
    gauss = torch.exp(-2 * math.pi**2 * s**2 * delta**2)
    tol = 5 / math.sqrt(2 * half)  # each value is a mean of `half` cosines, variance <= 1/2
    assert (k - gauss).abs().max() < tol
    wrong = torch.exp(-2 * math.pi**2 * (2 * s) ** 2 * delta**2)
    assert (k - wrong).abs().max() > 10 * tol


def test_fourier_kernel_side_lobes_have_rms_one_over_sqrt_e():
    """Far from Delta = 0 the kernel is a mean of E/2 cosines of variance 1/2: RMS 1/sqrt(E)."""
    E, draws = 64, 400
    far = torch.linspace(0.05, 0.3, 126)  # beyond five kernel widths 1/(2 pi 16) = 0.01
    ks = torch.stack([m.embedding_kernel(m.GaussianFourierFeatures(E, 16.0, generator=j), far)
                      for j in range(draws)])  # (draws, points)
    ms = ks.square().mean(1)
    rms = ms.mean().sqrt().item()
    # "the largest of them typically +-0.2-0.4": 10% and 90% quantiles of max |k| per draw
    low, high = ks.abs().max(1).values.quantile(torch.tensor([0.1, 0.9])).tolist()
    assert 0.18 < low < 0.25 and 0.33 < high < 0.42
    assert rms == pytest.approx(1 / math.sqrt(E), rel=0.05)
    # the check can fail: the other plausible constant 1/sqrt(E/2) is 41% larger
    assert abs(rms - 1 / math.sqrt(E / 2)) > 0.2 / math.sqrt(E)
    # and what demo_embeddings reports is the same quantity
    out = m.side_lobe_rms(m.GaussianFourierFeatures(E, 16.0, generator=1), E, seed=0)
    assert out["side_lobe_rms_avg"] == pytest.approx(1 / math.sqrt(E), rel=0.07)


def test_sinusoidal_embedding_frequencies_and_shape():
    emb = m.SinusoidalEmbedding(16, max_period=10000.0)
    half = 8
    expected = 10000.0 ** (-torch.arange(half) / (half - 1))
    torch.testing.assert_close(emb.freqs, expected)
    assert emb.freqs[0] == 1.0 and emb.freqs[-1] == pytest.approx(1e-4)
    t = torch.tensor([0.0, 3.0, 250.0])
    out = emb(t)
    assert out.shape == (3, 16)
    angle = t[:, None] * expected
    torch.testing.assert_close(out, torch.cat([angle.sin(), angle.cos()], dim=1))
    assert len(list(emb.parameters())) == 0


@pytest.mark.parametrize("bad", [0, 3, 7])
def test_embeddings_reject_odd_sizes(bad):
    with pytest.raises(ValueError):
        m.GaussianFourierFeatures(bad)
    with pytest.raises(ValueError):
        m.SinusoidalEmbedding(bad)


# -- Must verify 2: output scaling makes the learned |s| track the analytic law ------------------
def _train_nc(scale_output: bool, steps: int = 400):
    """A small noise-conditional net on a 2-component mixture, 8 levels in [0.01, 5]."""
    data = GaussianMixture.isotropic([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.3)
    sigmas = m.GeometricNoise(0.01, 5.0, 8).levels()
    torch.manual_seed(0)
    net = m.NoiseConditionalScoreNet(hidden=64, embed_dim=32, scale_output=scale_output,
                                     fourier_scale=1.0, generator=0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, m.warmup_lr_lambda(50))
    ema = m.EMA(net, 0.98)
    loop = m.training_iterator(net, opt, lambda n, x0: m.noise_conditional_loss(n, x0, sigmas, gen),
                           lambda: data.sample(256, gen, dtype=torch.float32), steps, sched, ema,
                           grad_clip=1.0)
    for _ in loop:
        pass
    report = m.score_report(ema.averaged(net), data, sigmas, 1000,
                            torch.Generator().manual_seed(2))
    return sigmas, report


def _tracks_the_law(sigmas, report) -> tuple[bool, str]:
    ratio = report["rms"] / report["exact_rms"]
    slope, exact_slope = (m.loglog_slope(sigmas, report["rms"]),
                          m.loglog_slope(sigmas, report["exact_rms"]))
    ok = bool(((ratio > 0.8) & (ratio < 1.25)).all()) and abs(slope - exact_slope) < 0.1
    return ok, f"RMS ratios {ratio.tolist()}, slope {slope:.3f} vs exact {exact_slope:.3f}"


def test_output_scaling_tracks_the_exact_score_magnitude():
    """With s = f / sigma, 400 steps suffice for RMS|s| within 20% of exact at every level."""
    sigmas, report = _train_nc(scale_output=True)
    ok, msg = _tracks_the_law(sigmas, report)
    assert ok, msg


def test_without_output_scaling_the_same_check_fails():
    """The check can fail: the same network and budget without the division misses the law."""
    sigmas, report = _train_nc(scale_output=False)
    ok, msg = _tracks_the_law(sigmas, report)
    assert not ok, msg


def test_output_scale_divides_by_sigma_broadcast():
    torch.manual_seed(0)
    scaled = m.NoiseConditionalScoreNet(dim=3, hidden=16, embed_dim=8, scale_output=True,
                                        generator=0)
    plain = m.NoiseConditionalScoreNet(dim=3, hidden=16, embed_dim=8, scale_output=False,
                                       generator=0)
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(5, 3)
    sigma = torch.tensor([0.01, 0.1, 1.0, 2.0, 7.0])
    torch.testing.assert_close(scaled(x, sigma), plain(x, sigma) / sigma[:, None])
    # a scalar sigma is broadcast over the batch
    torch.testing.assert_close(scaled(x, 0.5), scaled(x, torch.full((5,), 0.5)))
    with pytest.raises(ValueError):
        scaled(x, torch.ones(4))
    # expand_to appends singleton axes for any x.ndim (images included)
    v = torch.arange(1.0, 3.0)
    assert m.expand_to(v, torch.zeros(2, 3, 4, 5)).shape == (2, 1, 1, 1)


def test_ema_and_expand_to_are_the_shared_ones():
    """Module 06 teaches EMA and expand_to but no longer keeps copies: common/training.py has them
    (modules 03, 04, 07 and 08 use the same objects)."""
    from common import training

    assert m.EMA is training.EMA and m.expand_to is training.expand_to


def test_one_level_per_batch_computes_the_code_once_with_the_same_result():
    """Sampling passes one level for the whole batch; forward then embeds it once. The result
    must equal the per-sample path (each row alone, where no sharing happens)."""
    torch.manual_seed(0)
    noise = m.GeometricNoise(0.02, 4.0, 10)
    nets = [m.NoiseConditionalScoreNet(hidden=32, embed_dim=16, generator=0),
            m.TimeConditionalScoreNet(hidden=32, embed_dim=16, embedding="sinusoidal",
                                      output_scale=noise.sigma, time_transform=m.ddpm_time)]
    x = torch.randn(6, 2)
    for net, level in zip(nets, (0.3, 0.7)):
        shared = net(x, torch.full((6,), level))
        rows = torch.cat([net(x[i:i + 1], torch.full((1,), level)) for i in range(6)])
        torch.testing.assert_close(shared, rows)
        mixed = torch.full((6,), level)
        mixed[0] = 0.5  # one different level: the batch path with one code per sample
        torch.testing.assert_close(net(x, mixed)[1:], shared[1:])


def test_gradient_reaching_the_output_with_and_without_scaling():
    """Section 4.6: the same loss 1/2 |sigma s + z|^2, but with s = f / sigma the output gets
    dl/df = f + z, and with s = f it gets dl/df = sigma (sigma f + z): sigma times weaker at
    f ~ 0."""
    gen = torch.Generator().manual_seed(0)
    n, sigma = 4000, 0.02
    x0, z = torch.randn(n, 2, generator=gen, dtype=F64), torch.randn(n, 2, generator=gen, dtype=F64)
    f0 = 0.1 * torch.randn(n, 2, generator=gen, dtype=F64)
    sig = torch.full((n,), sigma, dtype=F64)
    grads = {}
    for scaled in (True, False):
        f = f0.clone().requires_grad_(True)
        score = (lambda x, s: f / s[:, None]) if scaled else (lambda x, s: f)
        m.conditional_dsm_loss(score, x0, sig, z).sum().backward()
        grads[scaled] = f.grad
    torch.testing.assert_close(grads[True], f0 + z)
    torch.testing.assert_close(grads[False], sigma * (sigma * f0 + z))
    ratio = (grads[False].norm() / grads[True].norm()).item()
    assert ratio == pytest.approx(sigma, rel=0.02)  # fifty times weaker at sigma = 0.02


def test_untrained_loss_is_about_half_of_f_squared_plus_d():
    """Section 2.6: the floor lies in [0, D/2] but the loss does not: a fresh network's loss is
    about 1/2 (E|f|^2 + D) >= D/2 at every level (f = sigma s nearly unrelated to z)."""
    torch.manual_seed(0)
    net = m.NoiseConditionalScoreNet(hidden=64, embed_dim=32, generator=0)
    data, n = m.mixture_data(), 20_000
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sigma in (0.02, 0.2, 4.0):
            x0, z = data.sample(n, gen), torch.randn(n, 2, generator=gen)
            sig = torch.full((n,), sigma)
            loss = m.conditional_dsm_loss(net, x0, sig, z)
            f_sq = (sigma * net(x0 + sigma * z, sig)).square().sum(1)
            se = loss.std().item() / math.sqrt(n)
            assert loss.mean().item() > 1.0 - 5 * se  # not below D/2 = 1
            assert loss.mean().item() == pytest.approx(0.5 * (f_sq.mean().item() + 2), abs=0.05)


def test_time_conditional_net_shapes_and_output_scale():
    noise = m.GeometricNoise(0.02, 4.0, 10)
    for embedding, transform in (("fourier", None), ("sinusoidal", m.ddpm_time)):
        net = m.TimeConditionalScoreNet(dim=2, hidden=32, embed_dim=16, embedding=embedding,
                                        output_scale=noise.sigma, time_transform=transform,
                                        generator=0)
        x, t = torch.randn(6, 2), torch.rand(6)
        assert net(x, t).shape == (6, 2)
        assert net(x, 0.3).shape == (6, 2)
        net.output_scale = None
        raw = net(x, t)
        net.output_scale = noise.sigma
        torch.testing.assert_close(net(x, t), raw / noise.sigma(t)[:, None])
    with pytest.raises(ValueError):
        m.TimeConditionalScoreNet(embedding="learned")


def test_concat_net_and_mlp_shapes():
    net = m.ConcatScoreNet(dim=3, hidden=16, n_layers=2)
    assert net(torch.randn(4, 3), torch.rand(4) + 0.1).shape == (4, 3)
    assert m.MLP(5, 2, hidden=8, n_layers=3)(torch.randn(7, 5)).shape == (7, 2)


# -- The 1/sigma law and the loss floors, from the exact score ---------------------------------
def test_exact_score_norm_obeys_jensen_and_the_gaussian_closed_form():
    """E|s*|^2 <= D / sigma^2 always; = tr((C + sigma^2 I)^{-1}) for Gaussian data."""
    sigmas = torch.tensor([0.02, 0.1, 0.5, 2.0, 8.0])
    gen = torch.Generator().manual_seed(0)
    rep = m.score_report(None, m.mixture_data(), sigmas, 20_000, gen)
    assert (sigmas.double() * rep["exact_rms"] <= math.sqrt(2)).all()
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
    gauss = GaussianMixture([1.0], torch.zeros(1, 2, dtype=F64), cov[None])
    rep = m.score_report(None, gauss, sigmas, 50_000, gen)
    exact = torch.stack([torch.linalg.inv(cov + s**2 * torch.eye(2, dtype=F64)).trace().sqrt()
                         for s in sigmas.double()])
    torch.testing.assert_close(rep["exact_rms"], exact, rtol=0.02, atol=0)
    # large sigma: the 1/sigma law itself
    assert rep["exact_rms"][-1].item() == pytest.approx(math.sqrt(2) / 8.0, rel=0.02)


def test_exact_score_against_the_dsm_target_on_the_ladder():
    """The numbers of Sections 2.5 and 4.6 for the module's mixture and ladder: slope -0.94
    above sigma = 0.15, ratio sigma RMS|s*| / sqrt(D) of 0.66-0.84 for 0.2 <= sigma <= 2.2 and
    0.95 at sigma = 4; sigma RMS|s*| from 0.19 (sigma_min) to 1.34 (sigma_max)."""
    sigmas = m.noise_ladder(m.Config()).levels()
    rep = m.score_report(None, m.mixture_data(), sigmas, 20_000, torch.Generator().manual_seed(0))
    scaled = sigmas.double() * rep["exact_rms"]
    ratio = scaled / math.sqrt(2)
    upper = sigmas >= 0.15
    assert m.loglog_slope(sigmas[upper], rep["exact_rms"][upper]) == pytest.approx(-0.94, abs=0.02)
    middle = ratio[(sigmas > 0.2) & (sigmas < 2.3)]
    assert middle.min() > 0.64 and middle.max() < 0.86
    assert ratio[0].item() == pytest.approx(0.95, abs=0.01)
    assert scaled[-1].item() == pytest.approx(0.19, abs=0.01)
    assert scaled[0].item() == pytest.approx(1.34, abs=0.02)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_weighted_dsm_loss_floor_and_excess(sigma):
    """1/2 E|sigma s + z|^2 = 1/2 (D - sigma^2 E|s*|^2) at s*, and exceeds it by
    1/2 sigma^2 E|s - s*|^2 for any other s (DSM = ESM + const); Monte Carlo, 5 standard errors."""
    data = m.mixture_data()
    gen = torch.Generator().manual_seed(4)
    n = 200_000
    x0 = data.sample(n, gen, dtype=F64)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    sig = torch.full((n,), sigma, dtype=F64)
    exact = lambda x, s: data.perturbed_score(x, sigma)
    loss = m.conditional_dsm_loss(exact, x0, sig, z)
    s_star = exact(x0 + sigma * z, sig)
    exact_sq = s_star.square().sum(1)
    # the step of Section 2.6: E[s* . z] = E[s* . E[z | x]] = -sigma E|s*|^2
    cross = (s_star * z).sum(1) + sigma * exact_sq
    assert abs(cross.mean()) < 5 * cross.std() / math.sqrt(n)
    floor = 0.5 * (2 - sigma**2 * exact_sq)
    diff = loss - floor  # zero mean, same samples
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(n)
    assert 0 <= floor.mean() <= 1.0
    delta = torch.tensor([0.3, -0.2], dtype=F64) / sigma
    shifted = m.conditional_dsm_loss(lambda x, s: exact(x, s) + delta, x0, sig, z)
    gap = shifted - loss - 0.5 * sigma**2 * delta.square().sum()
    assert abs(gap.mean()) < 5 * gap.std() / math.sqrt(n)
    # the unweighted loss is the weighted one divided by sigma^2
    unweighted = m.conditional_dsm_loss(exact, x0, sig, z, weighting="none")
    torch.testing.assert_close(unweighted, loss / sigma**2)


def test_loss_floor_is_denoising_error_and_not_monotone_for_the_mixture():
    """floor = E|x0 - E[x0|x]|^2 / (2 sigma^2) with E[x0|x] = x + sigma^2 s* (Tweedie); for one
    Gaussian it is 1/2 sum_k lambda_k / (lambda_k + sigma^2), falling with sigma, while the
    eight-mode mixture's floor dips near sigma = 0.2 and rises again near sigma = 0.7."""
    data, n = m.mixture_data(), 100_000
    gen = torch.Generator().manual_seed(6)
    for sigma in (0.1, 0.7):
        x0 = data.sample(n, gen, dtype=F64)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)
        s_star = data.perturbed_score(x, sigma)
        mse = (x0 - (x + sigma**2 * s_star)).square().sum(1) / (2 * sigma**2)
        floor = 0.5 * (2 - sigma**2 * s_star.square().sum(1))
        diff = mse - floor
        assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(n)
    sigmas = torch.tensor([0.05, 0.21, 0.68, 4.0])
    rep = m.score_report(None, data, sigmas, 20_000, torch.Generator().manual_seed(7))
    f, se = rep["floor"], rep["floor_se"]
    assert f[0] > f[1] + 10 * se[:2].max()  # falls ...
    assert f[2] > f[1] + 10 * se[1:3].max()  # ... rises again: modes 1.53 apart get confused
    assert f[2] > f[3] + 10 * se[2:].max()  # ... and falls
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
    gauss = GaussianMixture([1.0], torch.zeros(1, 2, dtype=F64), cov[None])
    rep = m.score_report(None, gauss, sigmas, 50_000, torch.Generator().manual_seed(8))
    lam = torch.linalg.eigvalsh(cov)
    closed = 0.5 * (lam[None] / (lam[None] + sigmas.double()[:, None] ** 2)).sum(1)
    assert ((rep["floor"] - closed).abs() < 5 * rep["floor_se"]).all()
    assert (closed[1:] < closed[:-1]).all()  # one Gaussian: monotone


def test_per_level_mean_marks_empty_levels():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0])
    level = torch.tensor([0, 0, 2, 2])
    out = m.per_level_mean(values, level, 4)
    torch.testing.assert_close(out[[0, 2]], torch.tensor([1.5, 4.0]))
    assert torch.isnan(out[[1, 3]]).all()


def test_geometric_noise_ladder():
    noise = m.GeometricNoise(0.02, 4.0, 10)
    s = noise.levels(F64)
    assert s[0].item() == pytest.approx(4.0) and s[-1].item() == pytest.approx(0.02)
    ratios = s[:-1] / s[1:]
    torch.testing.assert_close(ratios, ratios[0].expand(9))
    t = torch.rand(50, dtype=F64)
    torch.testing.assert_close(noise.t(noise.sigma(t)), t)
    assert noise.nearest_level(s).tolist() == list(range(10))
    with pytest.raises(ValueError):
        m.GeometricNoise(1.0, 0.5, 10)


# -- Must verify 3: the EMA update matches its formula ------------------------------------------
def test_ema_update_matches_formula():
    torch.manual_seed(0)
    net = m.NoiseConditionalScoreNet(hidden=8, embed_dim=8, generator=0)
    ema = m.EMA(net, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net)
    for name, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.9 * before[name] + 0.1 * p.detach())
    assert ema.num_updates == 1
    # the check can fail: the swapped weights give something else
    name, p = next(iter(net.named_parameters()))
    assert not torch.allclose(ema.shadow[name], 0.1 * before[name] + 0.9 * p.detach())


def test_ema_copy_averaged_and_state_dict():
    torch.manual_seed(0)
    net = m.NoiseConditionalScoreNet(hidden=8, embed_dim=8, generator=0)
    ema = m.EMA(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    ema.update(net)
    averaged = ema.averaged(net)
    for name, p in averaged.named_parameters():
        torch.testing.assert_close(p, ema.shadow[name])
        assert not p.requires_grad
    torch.testing.assert_close(averaged.embed[0].W, net.embed[0].W)  # buffers copied as they are
    assert not torch.allclose(next(net.parameters()), next(averaged.parameters()))  # untouched
    fresh = m.EMA(net, decay=0.1)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == 0.5 and fresh.num_updates == 1
    for name in ema.shadow:
        torch.testing.assert_close(fresh.shadow[name], ema.shadow[name])
    with pytest.raises(ValueError):
        m.EMA(net, decay=1.5)


# -- Warm-up, clipping, the training loop -------------------------------------------------------
def test_warmup_schedule_with_lambda_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, m.warmup_lr_lambda(4))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert m.warmup_lr_lambda(0)(0) == 1.0


def test_train_step_clips_the_gradient_norm():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: look at the gradients only
    loss = 100 * net(torch.randn(8, 3)).square().sum()
    norm = m.optimizer_step(net, opt, loss, grad_clip=0.5)
    after = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert norm > 0.5 and after.item() == pytest.approx(0.5, rel=1e-5)


def test_training_loop_yields_per_level_losses_and_updates_ema():
    torch.manual_seed(0)
    data = m.mixture_data()
    sigmas = m.GeometricNoise(0.05, 2.0, 5).levels()
    net = m.NoiseConditionalScoreNet(hidden=16, embed_dim=8, generator=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    ema = m.EMA(net, 0.9)
    infos = list(m.training_iterator(net, opt, lambda n, x0: m.noise_conditional_loss(n, x0, sigmas,
                                                                                  gen),
                                 lambda: data.sample(200, gen, dtype=torch.float32), 7,
                                 ema=ema, grad_clip=1.0))
    assert [i["step"] for i in infos] == list(range(7)) and ema.num_updates == 7
    assert infos[0]["level_loss"].shape == (5,)
    assert all(math.isfinite(i["loss"]) and i["grad_norm"] > 0 for i in infos)


# -- Sampling --------------------------------------------------------------------------------
def test_annealed_langevin_with_exact_score_reaches_the_data():
    data = m.mixture_data()
    sigmas = m.GeometricNoise(0.02, 4.0, 10).levels(F64)
    gen = torch.Generator().manual_seed(0)
    x = 4.0 * torch.randn(1500, 2, generator=gen, dtype=F64)
    xs = m.annealed_langevin(m.exact_noise_score_fn(data), x, sigmas, 50, 0.3, gen)
    ref = data.sample(1500, gen, dtype=F64)
    floor = sliced_wasserstein(data.sample(1500, gen, dtype=F64), ref, 256,
                               generator=torch.Generator().manual_seed(1))
    dist = sliced_wasserstein(xs, ref, 256, generator=torch.Generator().manual_seed(1))
    assert dist < 2 * floor + 0.03, (dist, floor)
    off = m.off_mode_fraction
    assert off(xs, data.means, data.precisions) < 0.025  # data: exp(-4.5) = 1.1% (+- 0.27%)
    assert off(x, data.means, data.precisions) > 0.5  # the check can fail: the starting points


def test_sample_quality_noise_levels():
    """The noise the text quotes: off-mode fraction +- sqrt(p (1-p) / n) = 0.23% for n = 2000,
    and the unbiased MMD^2 of two data sets of one distribution scatters around 0 (so it can be
    negative)."""
    data, n = m.mixture_data(), 2000
    gen = torch.Generator().manual_seed(9)
    off = torch.tensor([m.off_mode_fraction(data.sample(n, gen, dtype=F64), data.means,
                                            data.precisions)
                        for _ in range(300)])
    p = math.exp(-4.5)
    se = math.sqrt(p * (1 - p) / n)
    assert se == pytest.approx(0.0023, abs=5e-5)
    assert off.std().item() == pytest.approx(se, rel=0.15)  # std of a sample std: ~4% here
    null = torch.tensor([mmd_rbf(data.sample(400, gen), data.sample(400, gen), bandwidth=0.3)
                         for _ in range(60)])
    assert abs(null.mean()) < 4 * null.std() / math.sqrt(len(null))
    assert (null < 0).any()


def test_off_mode_fraction_of_data_is_exp_minus_k2_over_2():
    data = m.mixture_data()
    x = data.sample(100_000, torch.Generator().manual_seed(0), dtype=F64)
    p = math.exp(-4.5)
    off = m.off_mode_fraction(x, data.means, data.precisions)
    assert abs(off - p) < 5 * math.sqrt(p * (1 - p) / 100_000)


# -- The script ---------------------------------------------------------------------------------
def test_quick_run_writes_all_figures(quick_run):
    run = quick_run("06")
    r = run.result
    names = {p.name for p in (run.outdir / m.MODULE).glob("*.png")}
    assert names == {"embeddings.png", "score_norm_vs_sigma.png", "loss_per_level.png",
                     "training_strategies.png", "samples.png", "sample_quality.png"}
    assert r["jensen_ratio"] <= 1.0
    assert set(r["slopes"]) == set(m.VARIANTS)
    assert len(r["level_loss_final"]) == len(r["level_floor"]) == m.Config.quick().n_levels
    assert (r["level_loss_se"] > 0).all() and (r["level_floor_se"] >= 0).all()
    assert r["mmd_noise"] > 0
    ladder = m.noise_ladder(m.Config.quick()).levels()
    for ratio, sigma in r["rms_ratio_worst"].values():  # the signed ratio at its worst level
        assert ratio > 0 and torch.isclose(ladder, torch.tensor(sigma)).any()
    assert "SMOKE RUN" in m.quick_banner(m.Config.quick())
    assert "runs on the CPU" in m.device_note(torch.device("cuda"))


