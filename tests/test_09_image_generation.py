"""Tests of module 09: the U-Net denoiser, its preconditioning and loss, the samplers, the
checkpoints, the data and sample files, the metrics, and the program (single process and torchrun).

Everything runs on tiny U-Nets (widths 8/16) and 8x8 or 28x28 synthetic images; only the last
test needs real MNIST (and skips without it)."""

import itertools
import math
import os
import pathlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import linalg

from common.datasets import DataNotFoundError
from common.modules import ROOT, load_module

pytestmark = pytest.mark.ch09
m = load_module("09")
m8 = load_module("08")
F64 = torch.float64
CPU = torch.device("cpu")
SD = 0.5  # sigma_data of the closed-form Gaussian cases


# -- helpers ------------------------------------------------------------------------------------
def tiny(image_size=8, in_channels=1, channels=(8, 16), blocks=(1, 1), **kw):
    return m.ModelConfig(in_channels=in_channels, image_size=image_size, channels=channels,
                         blocks=blocks, emb_dim=16, **kw)


def random_denoiser(mc, seed):
    """A Denoiser whose zero-initialised output layer is replaced by random weights (F != 0)."""
    torch.manual_seed(seed)
    den = m.Denoiser(mc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        den.net.out.weight.copy_(0.3 * torch.randn(den.net.out.weight.shape, generator=g))
        den.net.out.bias.copy_(0.1 * torch.randn(den.net.out.bias.shape, generator=g))
    return den.eval().requires_grad_(False)


def blobs(n, size, seed, rmin=1.0, rspan=1.5):
    """uint8 (n, 1, size, size): one Gaussian blob per image, random centre and radius."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * (size - 3) + 1.5
    radius = torch.rand(n, generator=g) * rspan + rmin
    i = torch.arange(size).float()
    d2 = (i[None, :, None] - centre[:, 0, None, None]) ** 2 \
        + (i[None, None, :] - centre[:, 1, None, None]) ** 2
    img = torch.exp(-d2 / (2 * radius[:, None, None] ** 2))
    return (255 * img).round().to(torch.uint8)[:, None]


class GaussianDenoiser(torch.nn.Module):
    """The exact posterior mean of data N(0, SD^2 I): D(x, sigma) = SD^2 / (SD^2 + sigma^2) x."""

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x))
        return m.expand_to(SD**2 / (SD**2 + sigma**2), x) * x


def train_config(steps, batch=8, **kw):
    return m.Config(model=tiny(), train_steps=steps, batch_size=batch, warmup_steps=3, **kw)


def new_state(cfg, seed=0, dataset="folder"):
    return m.make_train_state(cfg, CPU, seed, m.Distributed(), dataset)


def run_steps(state, images, n=None, path=None, save_every=500):
    """Consume n steps (all remaining if None) of training_loop; returns the yielded infos."""
    loop = m.training_loop(state, images, 0, m.Distributed(), path, save_every=save_every)
    infos = list(itertools.islice(loop, n))
    loop.close()
    return infos


def write_pngs(root, arrays, labels=None):
    """Save uint8 arrays (H, W) or (H, W, 3) as PNGs, in sub-folder class_<label> if labelled."""
    from PIL import Image

    for i, a in enumerate(arrays):
        folder = root if labels is None else root / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"{i:03d}.png")


# -- 1. the U-Net -------------------------------------------------------------------------------
@pytest.mark.parametrize("mc, sizes", [
    (tiny(28, channels=(8, 16, 16), blocks=(1, 1, 1)), [14, 7, 4]),  # odd: 7 -> 4 -> 7
    (tiny(32, in_channels=3), [16, 8]),
    (tiny(28, patch=1, channels=(8, 16), attention=False), [28, 14]),
])
def test_unet_output_has_the_input_shape_at_every_resolution(mc, sizes, gen):
    """F(x, c_noise) has x's shape (patch 2 and 1, 1 and 3 channels), and the levels run at the
    sizes the U-Net's docstring promises (28 -> 14 -> 7 -> 4 with patch 2)."""
    net = random_denoiser(mc, 0).net
    seen = []
    hooks = [blocks[-1].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
             for blocks in net.down]
    x = torch.randn(3, mc.in_channels, mc.image_size, mc.image_size, generator=gen)
    out = net(x, torch.zeros(3))
    for h in hooks:
        h.remove()
    assert out.shape == x.shape and seen == sizes
    assert out.abs().sum() > 0  # the random output layer makes F non-zero
    with pytest.raises(ValueError, match="not divisible by patch"):
        m.UNet(tiny(9))


def test_denoiser_is_c_skip_x_at_initialisation(gen):
    """The output convolution starts at zero: F = 0 and D(x, sigma) = c_skip(sigma) x exactly."""
    torch.manual_seed(0)
    den = m.Denoiser(tiny(28, channels=(8, 16, 16), blocks=(1, 1, 1)))
    x = torch.randn(4, 1, 28, 28, generator=gen)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    c_skip, c_out, c_in, c_noise = den.coefficients(sigma)
    assert torch.equal(den.net(c_in[:, None, None, None] * x, c_noise), torch.zeros_like(x))
    assert torch.equal(den(x, sigma), c_skip[:, None, None, None] * x)
    expected = SD**2 / (sigma.double() ** 2 + SD**2)
    torch.testing.assert_close(c_skip.double(), expected, rtol=1e-6, atol=0)


def test_noise_level_reaches_the_network_through_the_embedding(gen):
    """With a non-zero output layer F(x, c_noise) changes with c_noise for the same input; with
    every block's embedding projection zeroed it no longer does (so the check can fail)."""
    net = random_denoiser(tiny(), 0).net
    x = torch.randn(2, 1, 8, 8, generator=gen)
    lo, hi = torch.full((2,), math.log(0.01) / 4), torch.full((2,), math.log(20.0) / 4)
    assert (net(x, lo) - net(x, hi)).abs().max() > 1e-3
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, m.ResidualBlock):
                mod.emb.weight.zero_()
                mod.emb.bias.zero_()
    assert torch.equal(net(x, lo), net(x, hi))


def test_unet_builds_for_widths_whose_sums_are_not_multiples_of_8(gen):
    """channels = (12, 24): every width is a multiple of the 4 attention heads, but the first
    up block sees 24 + 12 = 36 channels, and GroupNorm(8, 36) refuses to be built."""
    net = random_denoiser(tiny(8, channels=(12, 24)), 0).net
    x = torch.randn(2, 1, 8, 8, generator=gen)
    assert net(x, torch.zeros(2)).shape == x.shape


# -- 2. preconditioning (Section 2.2) -----------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.01, 0.5, 5.0, 80.0])
def test_preconditioning_gives_unit_variance_input_and_target(sigma):
    """x0 ~ N(0, sd^2), x = x0 + sigma z: var(c_in x) = 1 and var((x0 - c_skip x) / c_out) = 1,
    by simulation with 200k samples (standard error of a variance of 1: sqrt(2 / n) = 0.0032)."""
    n = 200_000
    g = torch.Generator().manual_seed(int(sigma * 100))
    den = m.Denoiser(tiny(sigma_data=SD))
    x0 = SD * torch.randn(n, generator=g, dtype=F64)
    x = x0 + sigma * torch.randn(n, generator=g, dtype=F64)
    c_skip, c_out, c_in, c_noise = den.coefficients(torch.tensor(sigma, dtype=F64))
    tol = 5 * math.sqrt(2 / n)
    assert abs((c_in * x).var().item() - 1) < tol
    assert abs(((x0 - c_skip * x) / c_out).var().item() - 1) < tol
    # the formulas of Section 2.2
    s2 = sigma**2 + SD**2
    assert c_skip.item() == pytest.approx(SD**2 / s2, rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * SD / math.sqrt(s2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(s2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12, abs=1e-15)
    # the check can fail: without c_in the input's variance is sd^2 + sigma^2
    assert abs(x.var().item() - 1) > tol


# -- 3. the loss is module 08's DSM (Section 2.3) ------------------------------------------------
def test_denoiser_loss_equals_module_08_dsm_with_lambda(gen):
    """w(sigma) |D - x0|^2 / n_pixels = lambda(sigma) |s + z / sigma|^2 / n_pixels with
    lambda = sigma^2 (sigma^2 + sd^2) / sd^2 and s = (D - x) / sigma^2: by hand, and through
    module 08's dsm_loss_per_sample on a VE SDE (same z, weighting lambda(std(t)))."""
    den = random_denoiser(tiny(sigma_data=SD), 3)
    sde = m.sde_for_denoiser("ve", m.Config())
    x0 = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.linspace(0.2, 0.95, 6)
    sigma = sde.std(t)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    n_pix = x0[0].numel()
    ours = m.denoiser_loss_per_sample(den, x0, sigma, z, SD)

    def lam(t):
        s = sde.std(t)
        return s**2 * (s**2 + SD**2) / SD**2

    x = x0 + sigma[:, None, None, None] * z
    s = m.denoiser_score(den, x, sigma)
    by_hand = lam(t) * (s + z / sigma[:, None, None, None]).flatten(1).square().sum(1) / n_pix
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=0)
    via_08 = m8.dsm_loss_per_sample(m.score_fn(den, sde), sde, x0, t, lam,
                                    generator=torch.Generator().manual_seed(5)) / n_pix
    torch.testing.assert_close(ours, via_08, rtol=1e-4, atol=0)
    # the check can fail: 08's default weighting lambda = sigma^2 is another loss
    plain = m8.dsm_loss_per_sample(m.score_fn(den, sde), sde, x0, t,
                                   generator=torch.Generator().manual_seed(5)) / n_pix
    assert not torch.allclose(ours, plain, rtol=0.05)


# -- 4. one denoiser drives VE and VP (Section 2.4) ---------------------------------------------
def test_score_fn_for_ve_and_vp(gen):
    """VE: score_fn(D, ve)(x, t) is denoiser_score at sigma = std(t); VP: it is
    (1/alpha) s(x/alpha, sigma/alpha)."""
    den = random_denoiser(tiny(), 1)
    cfg = m.Config()
    x = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    ve, vp = m.sde_for_denoiser("ve", cfg), m.sde_for_denoiser("vp", cfg)
    assert torch.equal(m.score_fn(den, ve)(x, t), m.denoiser_score(den, x, ve.std(t)))
    a = vp.mean_coeff(t)[:, None, None, None]
    expected = m.denoiser_score(den, x / a, vp.std(t) / vp.mean_coeff(t)) / a
    torch.testing.assert_close(m.score_fn(den, vp)(x, t), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(m.score_fn(den, vp)(x, t), m.denoiser_score(den, x, vp.std(t)))


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_score_fn_of_the_exact_denoiser_is_the_marginal_score(name, gen):
    """Data N(0, sd^2 I), D = its posterior mean: the score of p_t = N(0, (alpha^2 sd^2 +
    sigma_t^2) I) is -x / (alpha^2 sd^2 + sigma_t^2)."""
    sde = m.sde_for_denoiser(name, m.Config())
    x = torch.randn(5, 1, 2, 2, generator=gen, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0], dtype=F64)
    var = sde.mean_coeff(t) ** 2 * SD**2 + sde.std(t) ** 2
    score = m.score_fn(GaussianDenoiser(), sde)(x, t)
    torch.testing.assert_close(score, -x / var[:, None, None, None], rtol=1e-10, atol=0)
    if name == "vp":  # the check can fail: calling D at sigma_t, ignoring alpha_t
        wrong = m.denoiser_score(GaussianDenoiser(), x, sde.std(t))
        assert not torch.allclose(wrong, score, rtol=0.01)


# -- 5. training reduces the loss ---------------------------------------------------------------
def test_training_reduces_the_loss_on_a_tiny_problem():
    """150 steps (batch 16) on 64 fixed 8x8 blobs: the mean loss of the last 20 steps is below
    0.8 x the first 20's. Measured over seeds 0-7: 0.64-0.69 when training, 0.94-1.03 with
    lr = 0; the same run with lr = 0 (below) shows the criterion can fail."""
    images = blobs(64, 8, 0)
    ratios = {}
    for lr in (2e-3, 0.0):
        cfg = m.Config(model=tiny(), train_steps=150, batch_size=16, warmup_steps=10, lr=lr)
        losses = [info["loss"] for info in run_steps(new_state(cfg), images)]
        assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
        ratios[lr] = sum(losses[-20:]) / sum(losses[:20])
    assert ratios[2e-3] < 0.8 < ratios[0.0], ratios


def test_learning_rate_schedule():
    """Linear warm-up to lr, then a cosine down to lr_final * lr at train_steps."""
    cfg = m.Config(train_steps=110, warmup_steps=10, lr=1e-3, lr_final=0.1)
    assert m.lr_at(0, cfg) == pytest.approx(1e-4)
    assert m.lr_at(9, cfg) == pytest.approx(1e-3)
    assert m.lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert m.lr_at(110, cfg) == pytest.approx(1e-4)


def test_batch_indices_split_the_global_batch_between_processes():
    """The ranks' shares of a step are the single process's global batch, in order; an epoch
    visits every image at most once; a dataset smaller than one global batch is refused."""
    n, batch = 50, 4
    for step in (0, 5, 6, 13):
        shares = [m.batch_indices(step, n, batch, 7, m.Distributed(r, 2)) for r in range(2)]
        single = m.batch_indices(step, n, 2 * batch, 7, m.Distributed())
        assert torch.equal(torch.cat(shares), single)
    epoch = torch.cat([m.batch_indices(s, n, batch, 7, m.Distributed()) for s in range(12)])
    assert len(epoch) == 48 and len(set(epoch.tolist())) == 48
    with pytest.raises(ValueError, match="fewer than one global batch"):
        m.batch_indices(0, 7, 4, 0, m.Distributed(0, 2))


def n_guided_levels(n_steps, interval, churn=m.Config.churn):
    """How many noise levels a Heun run evaluates inside ``interval``, counted by hand."""
    sig = m.edm_sigmas(n_steps, 0.002, 80.0).tolist()
    count = 0
    for s, s_next in zip(sig[:-1], sig[1:]):
        count += interval[0] <= (1 + churn) * s <= interval[1]
        count += s_next > 0 and interval[0] <= s_next <= interval[1]
    return count


def test_interval_guidance_calls_the_weak_model_only_inside_the_interval():
    """GuidedDenoiser with an interval: D_bad + w (D_good - D_bad) inside, D_good outside."""
    good = lambda x, s: torch.ones_like(x)
    bad = lambda x, s: torch.zeros_like(x)
    d = m.GuidedDenoiser(good, bad, 2.5, (0.3, 5.0))
    x = torch.zeros(2, 1, 2, 2)
    assert torch.equal(d(x, torch.full((2,), 1.0)), torch.full_like(x, 2.5))
    assert torch.equal(d(x, torch.full((2,), 10.0)), torch.ones_like(x))
    assert torch.equal(d(x, torch.full((2,), 0.1)), torch.ones_like(x))
    assert torch.equal(m.GuidedDenoiser(good, bad, 2.5)(x, torch.full((2,), 10.0)),
                       torch.full_like(x, 2.5))


# -- 6. samplers --------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_every_sampler_returns_images_and_its_nfe(sde_name):
    """run_sampler: uint8 (n, C, H, W) and NFE heun 2N-1, heun_guided 2(2N-1), EM steps + 1,
    PC 2 steps + 1 (the +1 is the final denoising), ODE >= 2; the same seed gives the same
    images; the SDE samplers' float output is finite."""
    mc = tiny()
    good, bad = random_denoiser(mc, 1), random_denoiser(mc, 2)
    cfg = m.Config(model=mc, heun_steps=3, em_steps=4, pc_steps=3, ode_tol=1e-2,
                   guide_interval=None)  # guided at every level: 2 networks per evaluation
    sde = m.sde_for_denoiser(sde_name, cfg)
    expected = {"heun": 5, "heun_guided": 10, "euler_maruyama": 5, "pc": 7}
    for name in m.SAMPLERS:
        r = m.run_sampler(name, good, bad, sde, cfg, 3, (1, 8, 8), 0, CPU)
        assert r["images"].dtype == torch.uint8 and r["images"].shape == (3, 1, 8, 8), name
        assert r["nfe"] == expected[name] if name != "ode" else r["nfe"] >= 2, (name, r["nfe"])
        again = m.run_sampler(name, good, bad, sde, cfg, 3, (1, 8, 8), 0, CPU)
        assert torch.equal(r["images"], again["images"]), name
    for name in ("euler_maruyama", "pc", "ode"):
        x = m.sde_sample(good, sde, name, (3, 1, 8, 8), cfg, torch.Generator().manual_seed(0))
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all(), name
    with pytest.raises(ValueError, match="ema_early"):
        m.run_sampler("heun_guided", good, None, sde, cfg, 3, (1, 8, 8), 0, CPU)


def test_guided_denoiser_extrapolates(gen):
    """D_w = D_bad + w (D_good - D_bad): w = 1 is the good model, w = 2 goes past it."""
    mc = tiny()
    good, bad = random_denoiser(mc, 1), random_denoiser(mc, 2)
    x, sigma = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([0.5, 3.0])
    dg, db = good(x, sigma), bad(x, sigma)
    torch.testing.assert_close(m.GuidedDenoiser(good, bad, 1.0)(x, sigma), dg)
    torch.testing.assert_close(m.GuidedDenoiser(good, bad, 2.0)(x, sigma), 2 * dg - db)


def test_edm_sigmas():
    """sigma_0 = sigma_max, sigma_{N-1} = sigma_min, sigma_N = 0, strictly decreasing, and the
    rho = 7 spacing: sigma_i^(1/7) is linear in i."""
    s = m.edm_sigmas(18, 0.002, 80.0)
    assert s.dtype == F64 and s.shape == (19,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[17].item() == pytest.approx(0.002, rel=1e-12) and s[18].item() == 0
    assert (s[1:] < s[:-1]).all()
    root = s[:-1] ** (1 / 7)
    torch.testing.assert_close(root[1:] - root[:-1], torch.full((17,), (root[1] - root[0]).item(),
                                                                dtype=F64))
    for args in [(1, 0.002, 80.0), (10, 0.0, 80.0), (10, 80.0, 0.002), (10, 5.0, 5.0)]:
        with pytest.raises(ValueError):
            m.edm_sigmas(*args)


def test_heun_on_the_exact_gaussian_denoiser_reproduces_the_data_variance():
    """Data N(0, sd^2 I) and its exact denoiser, churn 0: the ODE maps x_T to
    x_T sd / sqrt(sd^2 + sigma_max^2); Heun's error is second order (about 1% at 40 steps, 4x
    less than at 20 steps), and 4000 x 4 samples have variance sd^2 within 5 standard errors
    (sqrt(2/16000) = 1.1%) plus that 2% discretisation bias."""
    exact = SD / math.sqrt(SD**2 + 80.0**2)
    errors = []
    for n_steps in (20, 40):
        one = torch.ones(1, 1, dtype=F64)
        *_, (_, x, _) = m.heun_sample(GaussianDenoiser(), None, n_steps, x_T=one)
        errors.append(x.item() / exact - 1)
    assert abs(errors[1]) < 0.015 and 3.5 < errors[0] / errors[1] < 4.5, errors
    steps = list(m.heun_sample(GaussianDenoiser(), (4000, 1, 2, 2), 40, churn=0.0,
                               generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 40 and steps[-1][0] == 0.0
    x = steps[-1][1]
    tol = 5 * math.sqrt(2 / x.numel()) + 0.025
    assert abs(x.var().item() / SD**2 - 1) < tol, x.var().item()


# -- 7. checkpoints -----------------------------------------------------------------------------
def _assert_same_training_state(a, b):
    for (ka, va), (kb, vb) in zip(m.raw_model(a).state_dict().items(),
                                  m.raw_model(b).state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.ema.shadow.keys() == b.ema.shadow.keys()
    assert all(torch.equal(a.ema.shadow[k], b.ema.shadow[k]) for k in a.ema.shadow)
    assert a.ema.num_updates == b.ema.num_updates
    assert a.ema_early is not None and a.ema_early.keys() == b.ema_early.keys()
    assert all(torch.equal(a.ema_early[k], b.ema_early[k]) for k in a.ema_early)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])
    assert a.step == b.step and a.losses == b.losses


def test_resume_is_bitwise_exact(tmp_path):
    """12 steps in one go, or 5 steps, save, a fresh state restored from the file, 7 more steps:
    raw weights, EMA, early EMA, Adam moments, step and losses are bitwise equal. The atomic
    write leaves no .tmp file behind."""
    images, cfg = blobs(32, 8, 1), train_config(12)
    whole = new_state(cfg)
    run_steps(whole, images)
    first = new_state(cfg)
    run_steps(first, images, 5)
    path = tmp_path / "ck" / "run.pt"
    m.save_checkpoint(first, path)
    m.save_checkpoint(first, path)  # over an existing file
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt"]
    resumed = new_state(cfg)
    m.restore(resumed, m.read_checkpoint(path))
    assert resumed.step == 5 and len(resumed.losses) == 5
    run_steps(resumed, images)
    _assert_same_training_state(whole, resumed)
    # the check can fail: resuming without the optimiser's moments gives other weights
    fresh = new_state(cfg)
    payload = m.read_checkpoint(path)
    m.raw_model(fresh).load_state_dict(payload["model"])
    fresh.ema.load_state_dict(payload["ema"])
    fresh.ema_early, fresh.step, fresh.losses = payload["ema_early"], 5, list(payload["losses"])
    fresh.generator.set_state(payload["rng"])
    run_steps(fresh, images)
    with pytest.raises(AssertionError):
        _assert_same_training_state(whole, fresh)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A real checkpoint of 2 steps of a tiny model, and its configuration."""
    cfg = train_config(4)
    state = new_state(cfg)
    run_steps(state, blobs(16, 8, 2), 2)
    path = tmp_path_factory.mktemp("ck") / "good.pt"
    return m.save_checkpoint(state, path), cfg


def test_unreadable_checkpoints_raise_checkpoint_error(saved_checkpoint, tmp_path):
    """A truncated file and random bytes raise CheckpointError naming the path; a missing file
    stays a FileNotFoundError."""
    good, _ = saved_checkpoint
    raw = good.read_bytes()
    cases = {"half.pt": raw[: len(raw) // 2],
             "random.pt": np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(m.CheckpointError, match="not a readable checkpoint") as info:
            m.read_checkpoint(path)
        assert str(path) in str(info.value)
    assert m.read_checkpoint(good)["step"] == 2
    with pytest.raises(FileNotFoundError):
        m.read_checkpoint(tmp_path / "missing.pt")


def test_an_empty_checkpoint_file_raises_checkpoint_error(tmp_path):
    """A 0-byte file (a copy or a save interrupted by a full disk) is 'not a readable
    checkpoint', like a truncated one."""
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(m.CheckpointError, match="not a readable checkpoint"):
        m.read_checkpoint(path)


class _Touch:
    """Unpickling this calls Path.touch(marker): code that a weights-only load must not run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    """A file holding an arbitrary object is refused (weights_only=True) and its code not run;
    a valid torch file that is not a checkpoint dictionary is refused too."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"version": m.CHECKPOINT_VERSION, "payload": _Touch(marker)}, path)
    with pytest.raises(m.CheckpointError, match=str(path)):
        m.read_checkpoint(path)
    assert not marker.exists()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(m.CheckpointError, match="not a checkpoint of this module"):
        m.read_checkpoint(tmp_path / "list.pt")


def test_check_compatible_names_what_differs(saved_checkpoint):
    """Training settings must match (train_steps, model.channels, dataset); sampler settings
    may differ."""
    path, cfg = saved_checkpoint
    payload = m.read_checkpoint(path)
    m.check_compatible(payload, cfg, "folder", path)
    m.check_compatible(payload, replace(cfg, heun_steps=5, n_samples=3, guidance=3.0), "folder",
                       path)
    with pytest.raises(m.CheckpointError, match="train_steps: checkpoint 4, this run 13") as info:
        m.check_compatible(payload, replace(cfg, train_steps=13), "folder", path)
    assert str(path) in str(info.value)
    other = replace(cfg, model=replace(cfg.model, channels=(8, 24)))
    with pytest.raises(m.CheckpointError, match=r"model\.channels: checkpoint") as info:
        m.check_compatible(payload, other, "folder", path)
    assert "(8, 16)" in str(info.value) and "(8, 24)" in str(info.value)
    assert "train_steps" not in str(info.value) and "emb_dim" not in str(info.value)
    with pytest.raises(m.CheckpointError, match="trained on folder, this run uses mnist"):
        m.check_compatible(payload, cfg, "mnist", path)


# -- 8. a NaN stops training and keeps the last good checkpoint --------------------------------
def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    """Images with NaN: FloatingPointError naming step 0, nothing changed. A NaN weight after a
    checkpoint at step 3: the error names step 4 and the file on disk is the step-3 one."""
    cfg = train_config(10)
    state = new_state(cfg)
    before = {k: v.clone() for k, v in m.raw_model(state).state_dict().items()}
    x0 = torch.zeros(4, 1, 8, 8)
    x0[1, 0, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0"):
        m.train_step(state, x0)
    assert state.step == 0 and state.losses == []
    assert all(torch.equal(v, before[k]) for k, v in m.raw_model(state).state_dict().items())

    path = tmp_path / "run.pt"
    run_steps(state, blobs(32, 8, 3), 4, path, save_every=3)
    saved = path.read_bytes()
    assert m.read_checkpoint(path)["step"] == 3 and state.step == 4
    with torch.no_grad():
        m.raw_model(state).net.out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 4"):
        run_steps(state, blobs(32, 8, 3), path=path, save_every=1)
    assert path.read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_non_finite_gradient_does_not_reach_the_weights_or_the_checkpoint(tmp_path):
    """A gradient that overflows (here: made NaN by a hook on one parameter) while the loss is
    finite must stop training like a NaN loss does, before the weights and the checkpoint are
    overwritten with NaN."""
    state = new_state(train_config(10))
    path = tmp_path / "run.pt"
    loop = m.training_loop(state, blobs(32, 8, 3), 0, m.Distributed(), path, save_every=1)
    for _ in range(2):
        next(loop)
    m.raw_model(state).net.out.bias.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError):
        next(loop)
    assert all(torch.isfinite(p).all() for p in m.raw_model(state).parameters())
    assert all(torch.isfinite(v).all() for v in m.read_checkpoint(path)["model"].values())


# -- 9. sample files and pixel scaling ----------------------------------------------------------
def test_samples_npz_layout(tmp_path, gen):
    """arr_0: uint8 (N, H, W, C), the images permuted; arr_1: int64 labels, only when given."""
    images = torch.randint(0, 256, (5, 3, 4, 6), generator=gen, dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    with np.load(m.save_samples_npz(tmp_path / "a.npz", images, labels)) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 4, 6, 3)
        assert np.array_equal(f["arr_0"], images.permute(0, 2, 3, 1).numpy())
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == [3, 1, 4, 1, 5]
    with np.load(m.save_samples_npz(tmp_path / "b.npz", images[:, :1])) as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (5, 4, 6, 1)
    with pytest.raises(ValueError, match="uint8"):
        m.save_samples_npz(tmp_path / "c.npz", images.float())
    with pytest.raises(ValueError, match="uint8"):
        m.save_samples_npz(tmp_path / "d.npz", images[0])


def test_pixel_scaling_round_trips():
    """to_uint8(to_model_space(x)) == x for all 256 values; 0 -> -1, 255 -> 1; out-of-range
    floats are clipped."""
    x = torch.arange(256, dtype=torch.uint8)
    y = m.to_model_space(x)
    assert y[0].item() == -1.0 and y[255].item() == 1.0 and (y[1:] > y[:-1]).all()
    assert torch.equal(m.to_uint8(y), x)
    assert m.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# -- 10. Frechet distance -----------------------------------------------------------------------
def _with_exact_moments(n, mean, var, seed):
    """n samples whose empirical mean is ``mean`` and (unbiased) covariance diag(var), exactly."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # empirical cov = I
    return torch.tensor(mean, dtype=F64) + z * torch.tensor(var, dtype=F64).sqrt()


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """|mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for features with exactly these moments."""
    mu1, a = [0.5, -1.0, 2.0], [1.0, 4.0, 0.25]
    mu2, b = [0.0, 1.0, 2.5], [9.0, 1.0, 0.25]
    f1, f2 = _with_exact_moments(300, mu1, a, 0), _with_exact_moments(500, mu2, b, 1)
    expected = sum((p - q) ** 2 for p, q in zip(mu1, mu2)) \
        + sum((math.sqrt(p) - math.sqrt(q)) ** 2 for p, q in zip(a, b))
    assert m.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert m.frechet_distance(f1.float(), f2.float()) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric(gen):
    """Correlated features: the formula with scipy.linalg.sqrtm of S1 S2; d(a, b) = d(b, a);
    d(a, a) = 0."""
    mix = torch.randn(6, 6, generator=gen, dtype=F64)
    f1 = torch.randn(400, 6, generator=gen, dtype=F64) @ mix
    f2 = 0.5 + torch.randn(300, 6, generator=gen, dtype=F64) @ (mix + 0.3 * torch.eye(6))
    s1, s2 = np.cov(f1.numpy().T), np.cov(f2.numpy().T)
    diff = f1.mean(0).numpy() - f2.mean(0).numpy()
    expected = diff @ diff + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    d12, d21 = m.frechet_distance(f1, f2), m.frechet_distance(f2, f1)
    assert d12 == pytest.approx(expected, rel=1e-8)
    assert d21 == pytest.approx(d12, rel=1e-10)
    assert abs(m.frechet_distance(f1, f1.clone())) < 1e-8
    # the check can fail: a shift of 0.1 in all 6 means costs 6 * 0.1^2
    assert m.frechet_distance(f1, f1 + 0.1) == pytest.approx(0.06, rel=1e-6)


# -- 11. image folders --------------------------------------------------------------------------
def test_load_image_folder_rgb_grey_and_labels(tmp_path):
    """Two class folders of RGB PNGs: uint8 (N, 3, S, S), the pixels written, labels 0/1 in
    sorted folder order; grey PNGs give C = 1; images directly in the root have no labels;
    another size resizes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    write_pngs(tmp_path / "rgb", rgb, [0, 0, 0, 1, 1, 1])
    x, y = m.load_image_folder(tmp_path / "rgb", 8)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), rgb)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    small, _ = m.load_image_folder(tmp_path / "rgb", 4)
    assert small.shape == (6, 3, 4, 4)

    grey = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    write_pngs(tmp_path / "grey", grey)
    x, y = m.load_image_folder(tmp_path / "grey", 8)
    assert x.shape == (4, 1, 8, 8) and np.array_equal(x[:, 0].numpy(), grey) and y is None
    x2, _ = m.load_image_data("folder", tmp_path / "grey", image_size=8)
    assert torch.equal(x, x2)


def test_load_image_folder_errors(tmp_path):
    """No images: DataNotFoundError naming the folder; a corrupt .png: naming the file."""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataNotFoundError, match="no image files") as info:
        m.load_image_folder(empty, 8)
    assert str(empty) in str(info.value)
    bad = tmp_path / "bad"
    write_pngs(bad, np.zeros((2, 8, 8), np.uint8))
    (bad / "zzz.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataNotFoundError, match="not a readable image") as info:
        m.load_image_folder(bad, 8)
    assert str(bad / "zzz.png") in str(info.value)


# -- 12. the program, end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """64 grey 28x28 blobs in two class folders (64 = one global batch of --quick on 2
    processes)."""
    root = tmp_path_factory.mktemp("digits")
    images = blobs(64, 28, 0, rmin=2.0, rspan=4.0)[:, 0].numpy()
    write_pngs(root, images, [i % 2 for i in range(64)])
    return root


def _argv(folder, out, *extra):
    return ["--quick", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "28",
            "--outdir", str(out), "--checkpoint-dir", str(out / "ck"), "--threads", "1", *extra]


def test_quick_folder_run_end_to_end(digit_folder, tmp_path, capsys):
    """--quick on a folder: every sampler's npz (uint8 16x28x28x1), samples.npz = the
    recommended sampler's, the figures, the NFE of each sampler. A second run loads the
    checkpoint (no training) and writes the same samples; a different --train-steps, an
    interrupted checkpoint without --resume, or --resume without a checkpoint stop with a
    message saying why; --resume continues the interrupted run to the end."""
    r = m.main(_argv(digit_folder, tmp_path))
    out = tmp_path / m.MODULE
    arrays = {}
    for name in m.SAMPLERS:
        with np.load(out / f"samples_{name}.npz") as f:
            arrays[name] = f["arr_0"]
            assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (16, 28, 28, 1), name
    with np.load(out / "samples.npz") as f:
        first = f["arr_0"]
    assert np.array_equal(first, arrays[m.RECOMMENDED])
    nfe = {k: v["nfe"] for k, v in r["results"].items()}
    # heun_guided: 11 evaluations of the good model, plus the weak model's at the levels of
    # the 6-step grid (and their churned and Heun-corrector levels) inside [0.3, 5]
    assert nfe == {"heun": 11, "heun_guided": 11 + n_guided_levels(6, (0.3, 5.0)),
                   "euler_maruyama": 11, "pc": 11, "ode": nfe["ode"]} and nfe["ode"] >= 2, nfe
    figures = {p.name for p in out.glob("*.png")}
    assert {"training_loss.png", "samples_by_sampler.png", "quality_vs_nfe.png",
            "guidance_effect.png", "denoising_trajectory.png"} <= figures, figures
    ckpt = tmp_path / "ck" / "09_folder_quick.pt"
    saved = ckpt.read_bytes()
    assert m.read_checkpoint(ckpt)["step"] == 40
    capsys.readouterr()

    m.main(_argv(digit_folder, tmp_path))
    log = capsys.readouterr().out
    assert f"Loaded {ckpt} (step 40 of 40)" in log and "parameters for" not in log
    assert ckpt.read_bytes() == saved
    with np.load(out / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], first)

    with pytest.raises(SystemExit) as info:
        m.main(_argv(digit_folder, tmp_path, "--train-steps", "80"))
    assert str(ckpt) in str(info.value.code) and "train_steps" in str(info.value.code)

    payload = torch.load(ckpt, weights_only=True)
    payload["step"], payload["losses"] = 20, payload["losses"][:20]
    torch.save(payload, ckpt)
    with pytest.raises(SystemExit) as info:
        m.main(_argv(digit_folder, tmp_path))
    assert "--resume" in str(info.value.code) and str(ckpt) in str(info.value.code)
    trained = m.main(_argv(digit_folder, tmp_path, "--resume", "--train-only"))
    assert trained["steps_trained"] == 20 and len(trained["losses"]) == 40
    assert m.read_checkpoint(ckpt)["step"] == 40
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        m.main(_argv(digit_folder, tmp_path / "elsewhere", "--resume"))

    # --train-steps 0: sample only, whatever length the checkpoint was trained for; here with
    # the VP SDE, so its EM, PC and ODE samplers and bits/dim run end to end too
    r = m.main(_argv(digit_folder, tmp_path, "--train-steps", "0", "--sde", "vp"))
    assert r["results"]["euler_maruyama"]["nfe"] == 11 and torch.isfinite(r["bpd"]).all()
    assert m.read_checkpoint(ckpt)["step"] == 40
    with pytest.raises(SystemExit, match="--train-steps 0"):
        m.main(_argv(digit_folder, tmp_path / "elsewhere", "--train-steps", "0"))


def test_too_few_images_for_one_batch_is_a_clear_error(tmp_path):
    """8 images and --quick's batch of 32: the program stops with 'error: ...' naming the batch
    size (like the other data problems), not with a traceback from inside the training loop."""
    write_pngs(tmp_path / "few", blobs(8, 28, 0)[:, 0].numpy(), [i % 2 for i in range(8)])
    with pytest.raises(SystemExit, match="batch"):
        m.main(_argv(tmp_path / "few", tmp_path))


# -- 13. torchrun ---------------------------------------------------------------------------------
def test_torchrun_two_processes_train_identical_replicas(digit_folder, tmp_path):
    """torchrun --nproc_per_node=2 --train-only (gloo on the CPU): exit 0, DDP keeps the weights
    identical on both processes, and only rank 0 writes the one checkpoint (about 16 s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "09_image_generation.py", "--train-only", *_argv(digit_folder, tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if "it/s]" not in line and "s/it]" not in line)  # without progress bars
    assert proc.returncode == 0, log[-8000:]
    assert "Weights identical on all 2 processes: yes" in proc.stdout, log[-8000:]
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["09_folder_quick.pt"]
    payload = m.read_checkpoint(tmp_path / "ck" / files[0])
    assert payload["world_size"] == 2 and payload["step"] == 40
    assert len(payload["losses"]) == 40 and all(math.isfinite(v) for v in payload["losses"])


# -- 14. real MNIST -----------------------------------------------------------------------------
def test_mnist_training_set_has_the_documented_class_counts(real_mnist_root):
    """load_image_data("mnist"): uint8 (60000, 1, 28, 28) and the classes' known sizes."""
    x, y = m.load_image_data("mnist", train=True, download=False)
    assert x.dtype == torch.uint8 and x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                          5949]


# -- Ctrl-C saves first -------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_then_stops(tmp_path):
    """SIGINT inside StopRequested only sets a flag; the loop then finishes the step, saves the
    checkpoint at that step and raises KeyboardInterrupt; resuming from it continues exactly."""
    import signal

    cfg = train_config(10)
    images = blobs(32, 8, 5)
    path = tmp_path / "run.pt"
    state = new_state(cfg)
    with m.StopRequested() as stop:
        loop = m.training_loop(state, images, 0, m.Distributed(), path, stop=stop)
        next(loop)
        next(loop)
        os.kill(os.getpid(), signal.SIGINT)  # the handler turns it into a flag
        assert stop.requested
        assert next(loop)["step"] == 3  # the step under way finishes and is saved...
        with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
            next(loop)  # ...then the loop stops
    assert m.read_checkpoint(path)["step"] == 3
    resumed = new_state(cfg)
    m.restore(resumed, m.read_checkpoint(path))
    run_steps(resumed, images)
    straight = new_state(cfg)
    run_steps(straight, images)
    for (k, a), b in zip(m.raw_model(resumed).state_dict().items(),
                         m.raw_model(straight).state_dict().values()):
        assert torch.equal(a, b), k


# -- the Inception preprocessing ------------------------------------------------------------------
def test_inception_features_resize_scale_and_grey_to_rgb():
    """inception_features feeds the model 3 x 299 x 299 images scaled as (x - 128) / 128 and
    mean-pools spatial outputs; checked with a stand-in model (the real weights are optional)."""
    seen = []

    def stand_in(x):
        seen.append(x)
        return x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 2)  # (N, 3, 2, 2)

    flat = torch.full((3, 1, 28, 28), 64, dtype=torch.uint8)
    feats = m.inception_features(stand_in, flat, batch=2)
    assert [t.shape for t in seen] == [(2, 3, 299, 299), (1, 3, 299, 299)]
    torch.testing.assert_close(feats, torch.full((3, 3), (64 - 128) / 128))
