"""
FILE: 10_advanced_applications.py
DIFFICULTY: Advanced
ESTIMATED TIME: 3 hours (about 15 minutes of it is the default run on a 2-core CPU, given
                module 09's checkpoint; about 30 minutes from nothing)
PREREQUISITES: 09_image_generation.py (the denoiser, its samplers and evaluation classifier),
               08_score_sde.py (SDEs, the PC sampler and its step hook, Tweedie's estimate),
               04_denoising_score_matching.py (Tweedie's formula)

LEARNING OBJECTIVES:
- Generate a digit on request: classifier guidance with a classifier of noisy images, and
  classifier-free guidance with a label-conditional denoiser trained with label dropout; measure
  what the guidance scale buys (the requested digit) and what it costs (diversity).
- Solve inverse problems with an unconditional model: inpainting by replacement inside the PC
  sampler, super-resolution by measurement-consistent sampling, and noisy deblurring by
  diffusion posterior sampling (Chung et al. 2023).
- Denoise in one network call with Tweedie's formula, and see why the posterior mean wins on
  PSNR while a posterior sample looks more like a digit.
- Judge reconstructions with PSNR and SSIM against simple baselines, never by eye alone.

MATHEMATICAL BACKGROUND:
- Bayes for scores: log p(x | y) = log p(x) + log p(y | x) - log p(y), and log p(y) does not
  depend on x, so at every noise level sigma
      grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p_sigma(y | x).
- Classifier guidance (Dhariwal & Nichol 2021): a classifier p_phi(y | x, sigma) trained on noisy
  images supplies the second term; a scale gamma sharpens it,
      s_gamma = s(x, sigma) + gamma grad_x log p_phi(y | x, sigma)
  (approximately the score of p(x) p(y|x)^gamma), or for the denoiser (D = x + sigma^2 s,
  Tweedie): D_gamma = D + gamma sigma^2 grad log p_phi.
- Classifier-free guidance (Ho & Salimans 2021): one network learns both s(x, y) and s(x)
  (the label replaced by a "no label" token 10% of the time in training), and
      s_w = (1 + w) s(x, y) - w s(x) = s(x, y) + w [s(x, y) - s(x)],
  i.e. the implicit classifier grad log p(y | x) = s(x, y) - s(x), scaled by w: it is
  s(x) + (1 + w) grad log p(y | x), classifier guidance with gamma = 1 + w. Because D is affine
  in s with the same x, D_w = (1 + w) D(x, y) - w D(x).
- Linear inverse problems y = A x0 + n, n ~ N(0, sigma_y^2 I). If x_t = x0 + sigma_t z, then
  y_t = A x_t = y + sigma_t A z (for sigma_y = 0) is a measurement of x_t: impose it at every
  sampler step (with a fresh z, so only approximately a draw of p(x | y)) by projecting onto
  {x : A x = y_t},
      x <- x - A^+ (A x - y_t),   A^+ = A^T (A A^T)^{-1} the pseudo-inverse.
  Inpainting: A keeps the known pixels, the projection replaces them (Song et al. 2021, App. I).
  Super-resolution: A averages f x f blocks, A^+ repeats each value f x f times (ILVR, Choi
  et al. 2021; Song et al. 2022).
- Diffusion posterior sampling, DPS (Chung et al. 2023), for noisy y: p(y | x_sigma) is
  approximated by p(y | x0 = D(x_sigma, sigma)); after each sampler step,
      x <- x - zeta_i grad_x |y - A D(x, sigma)|^2,   zeta_i = zeta / |y - A D(x, sigma)|,
  i.e. a step of 2 zeta along -grad |y - A D| (the norm, not its square).
- Tweedie's formula (module 04): E[x0 | x] = x + sigma^2 grad log p_sigma(x) = D(x, sigma).
  The posterior mean minimises the expected squared error; an exact posterior sample x' has
  E|x' - x0|^2 = 2 E|E[x0|x] - x0|^2 (twice the minimum), however real it looks, and the mean
  of k independent posterior samples (1 + 1/k) times the minimum.
- PSNR = 10 log10(1 / MSE) for images in [0, 1]; SSIM (Wang et al. 2004) compares local means,
  variances and covariance in an 11 x 11 Gaussian window (sigma 1.5).

IMPLEMENTATION NOTES:
- Reused, not copied: module 09's U-Net, Denoiser (its ``cond`` input carries the label
  embedding), GuidedDenoiser (CFG is its formula with w + 1), Heun sampler, SDE samplers with
  module 08's step hook, checkpoint reading, evaluation classifier and metrics; module 08's VE
  SDE and PC sampler; module 04's tweedie_denoise; common/training.py's EMA.
- The label-conditional denoiser starts from module 09's trained weights, with a label
  embedding initialised to zero (so it starts as exactly the unconditional model) and is
  fine-tuned for a few minutes; the noisy-image classifier is trained from scratch. Both are
  cached in --checkpoint-dir; module 09's model is trained first if it is missing.

Run:
    python 10_advanced_applications.py              # about 15 min on 2 cores with 09's model
    python 10_advanced_applications.py --quick      # a smoke run of about 25 s
    python 10_advanced_applications.py --measurement-noise 0.1
    pytest tests/test_10_exercises.py -k your_answer   # check your answers ("your_answer" as
                                                       # written: it selects the learner checks)

References:
- P. Dhariwal, A. Nichol (2021). Diffusion models beat GANs on image synthesis. NeurIPS.
  (classifier guidance)
- J. Ho, T. Salimans (2021). Classifier-free diffusion guidance. NeurIPS workshop.
- Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole (2021). Score-based
  generative modeling through stochastic differential equations. ICLR. (conditional sampling,
  imputation, Appendix I)
- J. Choi, S. Kim, Y. Jeong, Y. Gwon, S. Yoon (2021). ILVR: conditioning method for denoising
  diffusion probabilistic models. ICCV.
- Y. Song, L. Shen, L. Xing, S. Ermon (2022). Solving inverse problems in medical imaging with
  score-based generative models. ICLR.
- H. Chung, J. Kim, M. T. McCann, M. L. Klasky, J. C. Ye (2023). Diffusion posterior sampling
  for general noisy inverse problems. ICLR.
- B. Efron (2011). Tweedie's formula and selection bias. JASA.
- Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli (2004). Image quality assessment: from
  error visibility to structural similarity. IEEE TIP.
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# Everything that makes images comes from module 09 (through the module loader: file names
# that start with a digit cannot be imported by name); module 08 gives the VE SDE and the PC
# sampler with its step hook. This module adds conditioning: labels, classifiers and
# measurements.

# %%
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import Count, Real, start_run
from common.cli import make_parser as shared_parser
from common.datasets import DataNotFoundError
from common.modules import load_module
from common.plotting import image_grid
from common.progress import progress, write
from common.training import EMA

MODULE = "10_advanced_applications"
Tensor = torch.Tensor
nine = load_module("09")  # U-Net, denoiser, samplers, checkpoints, evaluation (module 09)
sde_lib = load_module("08")  # VE SDE, PC sampler with step hook (module 08)
four = load_module("04")  # Tweedie's formula (module 04)

CHECKPOINT_VERSION = nine.CHECKPOINT_VERSION


@dataclass
class AppConfig:
    """Sizes of one run. ``cpu()`` on a CPU (and on a GPU), ``quick()`` for the smoke run."""

    # label-conditional denoiser: fine-tuned from module 09's model
    cond_steps: int = 1500
    cond_batch: int = 64
    cond_lr: float = 1e-3
    label_dropout: float = 0.1  # probability that a training label is replaced by "no label"
    label_lr_boost: float = 10.0  # the new label embedding learns this much faster (Sec. 2.3)
    cond_p_mean: float = 0.5  # ln sigma ~ N(0.5, 1.2^2) in fine-tuning: where labels matter
    # classifier of noisy images, for classifier guidance
    clf_steps: int = 1500
    clf_batch: int = 128
    clf_lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # guidance sweeps
    per_class: int = 20  # samples per requested digit and setting (x 10 digits)
    cfg_scales: tuple = (0.0, 0.5, 1.0, 2.0, 4.0)
    cfg_recommended: float = 0.5  # the smallest w with >= 90% as requested (Section 4.5)
    cg_scales: tuple = (0.0, 1.0, 2.0, 4.0, 8.0)
    # inverse problems (held-out test digits)
    n_test: int = 64
    posterior_draws: int = 4  # reconstructions per measurement (inpainting, super-resolution)
    pc_steps: int = 100  # PC: 2 network evaluations per step
    superres_factor: int = 4  # 28x28 from 7x7
    blur_sigma: float = 2.0  # Gaussian blur of the deblurring problem, in pixels
    measurement_noise: float = 0.05  # sigma_y of the deblurring problem, in [-1, 1] units
    dps_steps: int = 200  # one forward and one backward pass each
    dps_zeta: float = 2.0
    tweedie_sigmas: tuple = (0.2, 0.5, 1.0, 2.0)

    @classmethod
    def cpu(cls) -> AppConfig:
        return cls()

    @classmethod
    def quick(cls) -> AppConfig:
        return cls(cond_steps=30, cond_batch=16, clf_steps=30, clf_batch=32, warmup_steps=5,
                   per_class=2, cfg_scales=(0.0, 2.0), cg_scales=(0.0, 2.0), n_test=4,
                   posterior_draws=2,
                   pc_steps=5, dps_steps=5)


def make_parser():
    parser = shared_parser("Module 10: guided generation and inverse problems with module 09's "
                           "model.")
    parser.set_defaults(threads=os.cpu_count() or 1)  # images: every core helps
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10", "folder"),
                        help="the data set of module 09's model (default mnist)")
    parser.add_argument("--image-size", type=nine.IMAGE_SIZE, default=32,
                        help="with --dataset folder: the image size module 09 used")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                        help="where module 09's model is, and where this module caches its own")
    parser.add_argument("--measurement-noise", type=Real(0), default=None,
                        help="sigma_y of the deblurring measurement, in [-1, 1] pixel units "
                             "(default 0.05)")
    parser.add_argument("--cfg-scale", type=Real(0), default=None,
                        help="the recommended classifier-free guidance scale w (default 0.5)")
    # Per test image the inverse problems take ~4 s of CPU (measured 0.1 s with --quick's 5 PC
    # and 5 DPS steps, against 100 and 200 by default) and hold ~1 MB (an estimate: the 4
    # posterior draws of every image are sampled in one batch, DPS with gradients).
    parser.add_argument("--n-test", type=Count(1, bytes_each=1e6, seconds_each=4.0,
                                               unit="image"), default=None,
                        help="held-out test images per inverse problem (default 64)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 Conditioning is one more term in the score
# We want samples of a digit *of a given class* $y$, or an image that agrees with a measurement
# $y$. Bayes' rule, $p(x \mid y) = p(x)\,p(y \mid x)/p(y)$, holds at every noise level, and the
# gradient in $x$ kills the normaliser $p(y)$:
# $$ \nabla_x \log p_\sigma(x \mid y) = \underbrace{\nabla_x \log p_\sigma(x)}_{\text{module 09's
#    model}} + \nabla_x \log p_\sigma(y \mid x). $$
# Every method in this module is a way to get the second term. Note $p_\sigma(y \mid x)$ is the
# probability of $y$ given the *noisy* image: at large $\sigma$ it is nearly flat, at small
# $\sigma$ it is that of the clean image.
#
# ## 2.2 Classifier guidance
# Train a classifier $p_\phi(y \mid x, \sigma)$ on noised training images (every $\sigma$ the
# sampler visits) and add its gradient, times a **scale** $\gamma$:
# $$ s_\gamma(x, \sigma) = s(x, \sigma) + \gamma\, \nabla_x \log p_\phi(y \mid x, \sigma). $$
# $\gamma = 1$ is Bayes' rule; $\gamma > 1$ samples $p(x)\,p(y \mid x)^\gamma$ (up to
# normalisation, and only approximately, since the power of a blurred density is not the blur
# of the power), which puts more mass where the classifier is sure. Module 01 raised a whole
# density to a power $\beta$ (tempering) and saw it concentrate on the heavier mode; here only
# the *likelihood* term is raised, so the power sharpens "looks like a 3", not "is a common
# image". In denoiser
# form ($D = x + \sigma^2 s$) the guidance adds $\gamma\,\sigma^2 \nabla_x \log p_\phi$ to $D$.
# The classifier can only help where it still recognises the digit: the figure
# `noisy_classifier_accuracy.png` shows its accuracy against $\sigma$.
#
# ## 2.3 Classifier-free guidance
# A separate classifier is a second network to train, and its gradients may be adversarial
# (push pixels in directions that convince *it*, not towards a better digit), which is why we
# judge every sample with a different classifier, module 09's. Ho & Salimans
# (2021) use the conditional model itself: train $D(x, \sigma, y)$ where the label is replaced
# by a "no label" token with probability $p_\text{drop} = 0.1$, so one network knows both
# $s(x, y)$ and $s(x)$. Bayes' rule gives an *implicit classifier*,
# $\nabla \log p(y \mid x) = s(x, y) - s(x)$, and guidance with weight $w$ is
# $$ s_w = s(x, y) + w\,[s(x, y) - s(x)] = (1 + w)\, s(x, y) - w\, s(x). $$
# $w = 0$ is the conditional model alone. Written as $s_w = s(x) + (1 + w)\,[s(x, y) - s(x)]$
# it is classifier guidance with the implicit classifier and $\gamma = 1 + w$: CFG at $w$ and
# classifier guidance at $\gamma = 1 + w$ raise the likelihood to the same power (the sweep
# figure plots both against that power). Since $D = x + \sigma^2 s$ is affine in $s$ with the
# same $x$ in every term, the same combination holds for denoisers,
# $D_w = D(x, \emptyset) + (1 + w)[D(x, y) - D(x, \emptyset)]$. Module 09's `GuidedDenoiser`
# computes exactly $D_\text{bad} + w'(D_\text{good} - D_\text{bad})$ (there, autoguidance by a
# weaker snapshot of the model); with "good" = conditional, "bad" = unconditional and
# $w' = 1 + w$ it is classifier-free guidance.
#
# Here the conditional model is *fine-tuned* from module 09's unconditional one. The label
# enters as a learned vector added to the Fourier features of the noise level, before the
# embedding's MLP (so the label's effect can depend on $\sigma$, and every residual block
# sees it), initialised to zero: training starts from exactly the unconditional model and only
# has to learn what the label adds. Two choices make that fast enough for a CPU, both measured:
# the new embedding gets 10 times the learning rate of the pretrained weights, and the noise
# levels are drawn higher than in module 09 ($\ln\sigma \sim \mathcal N(0.5, 1.2^2)$ instead of
# $\mathcal N(-1.2, 1.2^2)$), because the label matters where the image is still undecided.
# With module 09's levels, 600 steps taught the model almost nothing: at $\sigma = 10$ its
# output showed the requested digit 9% of the time (chance: 10%); with the higher levels, 98%.
#
# ## 2.4 Measurements: replacement and projection
# A linear measurement $y = A x_0$ (no noise for now) of a clean image is also a measurement
# of the noisy image $x_\sigma = x_0 + \sigma z$ that the sampler holds, with noise we can
# simulate: $A x_\sigma = y + \sigma A z$. So at each step of a sampler, draw a fresh $z$, form
# $y_\sigma = y + \sigma A z$, and move $x$ to the nearest point that satisfies
# $A x = y_\sigma$:
# $$ x \leftarrow x - A^+(A x - y_\sigma), \qquad A^+ = A^\top (A A^\top)^{-1}. $$
# The projection leaves the part of $x$ the measurement does not see (the null space of $A$) to
# the score model, which fills it in consistently with what the measurement fixed. It is an
# approximation: the fresh $z$ is independent of the noise already in $x$, so the imposed part
# and the free part do not quite belong to one noisy image, and completions can fail to join
# up with the known pixels (Section 4.5 shows such cases). Better methods exist (e.g. RePaint,
# DPS below); replacement is the simplest and the one in Song et al. (2021).
#
# * **Inpainting**: $A$ keeps the known pixels ($A^+$ puts them back, zeros elsewhere), and the
#   projection *replaces* the known pixels by their noised observation (Song et al. 2021).
# * **Super-resolution**: $A$ averages $f \times f$ blocks; $A A^\top = I/f^2$, so
#   $A^+ y$ repeats each value over its block and the projection corrects each block's mean
#   while keeping the detail inside it (the ILVR update of Choi et al. 2021).
#
# ## 2.5 Noisy measurements: diffusion posterior sampling
# With noise, $y = A x_0 + n$, $n \sim \mathcal N(0, \sigma_y^2 I)$, and an $A$ that loses
# information smoothly (a blur), exact projection amplifies the noise. Chung et al. (2023)
# approximate the likelihood of the noisy image by that of its Tweedie estimate,
# $p_\sigma(y \mid x) \approx \mathcal N(y;\, A\,D(x, \sigma),\, \sigma_y^2 I)$, and follow its
# gradient after every sampler step, with a step normalised by the residual:
# $$ x \leftarrow x - \frac{\zeta}{|y - A D(x, \sigma)|}\, \nabla_x |y - A D(x, \sigma)|^2
#    = x - 2\zeta\, \nabla_x |y - A D(x, \sigma)|. $$
# The log-likelihood's gradient would be $-\nabla |y - AD|^2 / (2\sigma_y^2)$; DPS replaces
# the factor $1/(2\sigma_y^2)$ by a step normalised by the residual, a gradient step on the
# residual's *norm* of a size that does not depend on how large the residual is (a fixed
# weight would take huge steps early, when $D$ is far off, and tiny ones late). The gradient
# passes through the network (a backward pass per step). $\zeta$ is tuned: Section 4.5 gives
# the sweep we ran.
#
# ## 2.6 Denoising in one call: Tweedie's formula
# For $x = x_0 + \sigma z$, $\mathbb E[x_0 \mid x] = x + \sigma^2 \nabla \log p_\sigma(x)$
# (module 04), which is module 09's denoiser $D(x, \sigma)$ itself. The posterior mean minimises
# the expected squared error, so no denoiser has a better expected PSNR than the exact one. But
# at large $\sigma$ it *averages* the digits the noisy image could have been, and looks blurry.
# A posterior sample (run the sampler from $\sigma$ down, starting at the noisy image) looks
# like a digit, and its expected squared error is exactly twice the minimum:
# $\mathbb E|x' - x_0|^2 = \mathbb E|x' - m|^2 + \mathbb E|m - x_0|^2 = 2\,\mathrm{MMSE}$,
# $m = \mathbb E[x_0 \mid x]$, since $x'$ and $x_0$ are independent draws from the same posterior.
# The summary prints the measured ratio: a check of how close the learned model is to the
# exact posterior.
#
# ## 2.7 PSNR and SSIM
# For images in $[0, 1]$, $\text{PSNR} = 10 \log_{10}(1/\text{MSE})$ in dB, computed per image
# and averaged (higher is better; +6 dB halves the error's amplitude). SSIM (Wang et al. 2004)
# compares, in a Gaussian window, local means $\mu$, variances $\sigma^2$ and the covariance:
# $$ \text{SSIM} = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
#    {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},\quad
#    C_1 = 0.01^2,\ C_2 = 0.03^2, $$
# averaged over the valid window positions: 1 for identical images, lower when structure
# differs. Neither rewards realism: a blurry average can beat a sharp, plausible, wrong digit.


# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 A label-conditional denoiser
# `LabelConditionalDenoiser` wraps module 09's `Denoiser` and adds a label embedding (with an
# extra row for "no label") to its noise embedding.

# %%
class LabelConditionalDenoiser(nn.Module):
    """D(x, sigma, y): module 09's denoiser with a label embedding added to its noise embedding.

    labels: (N,) integers in [0, n_classes); ``None`` or the value ``n_classes`` means "no
    label", which gives the unconditional D(x, sigma).
    """

    def __init__(self, base: nn.Module, n_classes: int):
        super().__init__()
        self.base, self.n_classes = base, n_classes
        self.label_embedding = nn.Embedding(n_classes + 1, base.cfg.emb_dim)
        nn.init.zeros_(self.label_embedding.weight)  # start as the unconditional model

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = torch.full((len(x),), self.n_classes, dtype=torch.long, device=x.device)
        return self.base(x, sigma, cond=self.label_embedding(labels))


class WithLabels(nn.Module):
    """Fixes the labels of a conditional denoiser: D(x, sigma) = model(x, sigma, labels)."""

    def __init__(self, model: nn.Module, labels: Tensor | None):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.model(x, sigma, self.labels)


def drop_labels(labels: Tensor, p: float, n_classes: int, generator=None) -> Tensor:
    """Replace each label by the "no label" value n_classes with probability p."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, n_classes), labels)


def cfg_denoiser(model: nn.Module, labels: Tensor, w: float) -> nn.Module:
    """Classifier-free guidance: D_w = (1 + w) D(x, y) - w D(x), via module 09's GuidedDenoiser
    (D_bad + (1 + w)(D_good - D_bad) with good = conditional, bad = unconditional)."""
    conditional = WithLabels(model, labels)
    if w == 0:
        return conditional
    return nine.GuidedDenoiser(conditional, WithLabels(model, None), 1 + w)


# %% [markdown]
# ## 3.2 A classifier of noisy images, and its gradient
# `NoisyClassifier` sees $c_\text{in}(\sigma)\,x$ (module 09's input scaling, so its input has
# unit variance at every level) and the noise level through module 09's `NoiseEmbedding`, and
# is built from module 09's residual blocks: a U-Net's left half with a classification head.

# %%
class NoisyClassifier(nn.Module):
    """p_phi(y | x, sigma): (N, C, H, W), (N,) -> logits (N, K)."""

    def __init__(self, in_channels: int, n_classes: int, sigma_data: float = 0.5,
                 channels: tuple = (32, 64), emb_dim: int = 64):
        super().__init__()
        self.sigma_data = sigma_data
        self.embed = nine.NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(4 * in_channels, channels[0], 3, padding=1)  # after 2x2 unshuffle
        self.block1 = nine.ResidualBlock(channels[0], channels[0], emb_dim)
        self.down = nn.Conv2d(channels[0], channels[1], 3, 2, padding=1)
        self.block2 = nine.ResidualBlock(channels[1], channels[1], emb_dim)
        self.norm = nine.group_norm(channels[1])
        self.head = nn.Linear(channels[1], n_classes)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(len(x))
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        emb = self.embed(sigma.log() / 4)  # module 09's c_noise
        h = self.stem(F.pixel_unshuffle(c_in[:, None, None, None] * x.float(), 2))
        h = self.down(self.block1(h, emb))
        h = F.silu(self.norm(self.block2(h, emb)))
        return self.head(h.mean((2, 3)))


def classifier_log_prob_grad(classifier: nn.Module, x: Tensor, sigma: Tensor,
                             labels: Tensor) -> Tensor:
    """grad_x log p_phi(labels | x, sigma), shape of x. Works under torch.no_grad() too."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        log_p = classifier(x, sigma).log_softmax(1).gather(1, labels[:, None]).sum()
        return torch.autograd.grad(log_p, x)[0]


class ClassifierGuidedDenoiser(nn.Module):
    """D + scale sigma^2 grad log p_phi(y | x, sigma): the denoiser of the guided score
    s + scale grad log p_phi (Section 2.2)."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, labels: Tensor, scale: float):
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier
        self.labels, self.scale = labels, float(scale)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        d = self.denoiser(x, sigma)
        if self.scale == 0:
            return d
        grad = classifier_log_prob_grad(self.classifier, x, sigma, self.labels)
        s2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x)) ** 2
        return d + self.scale * s2[:, None, None, None] * grad.to(d.dtype)


# %% [markdown]
# ## 3.3 Training what module 09 did not: a short loop with safe checkpoints
# Both new networks train with the same loop: Adam with a linear warm-up, gradient clipping,
# an EMA of the weights (sampled from), bf16 autocast where the CPU has it (module 09's rule).
# The state is saved atomically every few hundred steps and at the end (module 09's
# `read_checkpoint` loads it with `weights_only=True`); an interrupted run resumes from it.

# %%
def train_network(model: nn.Module, batch_loss: Callable, images: Tensor, labels: Tensor,
                  steps: int, batch: int, lr: float, cfg: AppConfig, seed: int, path: Path,
                  settings: dict, desc: str, save_every: int = 250,
                  lr_boost: dict | None = None) -> tuple[nn.Module, list]:
    """Train ``model`` on ``batch_loss(model, x0, y, generator) -> scalar`` and return its EMA
    copy (frozen) and the losses. Loads ``path`` if it holds this run, resumes it if partial.

    ``lr_boost``: {parameter-name prefix: factor}; those parameters learn ``factor`` times
    faster (a new layer inside a pretrained network)."""
    device = next(model.parameters()).device
    boost = lr_boost or {}
    groups = {}
    for name, p in model.named_parameters():
        factor = next((f for prefix, f in boost.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(factor, []).append(p)
    optimizer = torch.optim.Adam([{"params": ps, "boost": f} for f, ps in groups.items()], lr=lr)
    ema = EMA(model, decay=cfg.ema_decay, warmup=True)
    generator = torch.Generator(device).manual_seed(seed)
    step, losses = 0, []
    if path.exists():
        payload = nine.read_checkpoint(path)
        if payload.get("settings") != settings:
            raise nine.CheckpointError(
                f"{path} was trained with other settings ({payload.get('settings')} instead of "
                f"{settings}); delete it or use another --checkpoint-dir.")
        model.load_state_dict(payload["model"])
        ema.load_state_dict(payload["ema"])
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["rng"])
        step, losses = payload["step"], list(payload["losses"])
        print(f"Loaded {path} (step {step} of {steps}).")
    dtype = nine.autocast_dtype(device)
    schedule = SimpleNamespace(lr=lr, warmup_steps=cfg.warmup_steps, train_steps=steps,
                               lr_final=0.1)
    model.train()
    with progress(total=steps, initial=step, desc=desc, disable=step >= steps,
                  mininterval=1.0) as bar:
        while step < steps:
            idx = nine.batch_indices(step, len(images), batch, seed, nine.Distributed())
            x0 = nine.to_model_space(images[idx].to(device))
            for group in optimizer.param_groups:
                group["lr"] = nine.lr_at(step, schedule) * group["boost"]
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                loss = batch_loss(model, x0, labels[idx].to(device), generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {step}; "
                                         f"the last checkpoint is kept.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(model)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % save_every == 0 or step == steps:
                save_state(path, model, ema, optimizer, generator, step, losses, settings)
    model.eval()
    return ema.averaged(model), losses


def save_state(path: Path, model, ema, optimizer, generator, step, losses, settings) -> None:
    """Write a training state atomically: a temporary file, then a rename."""
    payload = {"version": CHECKPOINT_VERSION, "settings": settings, "step": step,
               "model": model.state_dict(), "ema": ema.state_dict(),
               "optimizer": optimizer.state_dict(), "rng": generator.get_state(),
               "losses": losses}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def conditional_loss(label_dropout: float, p_mean: float, p_std: float, sigma_data: float):
    """Module 09's weighted denoising loss, with labels dropped at rate ``label_dropout``."""

    def loss(model, x0, y, generator):
        sigma = (p_mean + p_std * torch.randn(len(x0), generator=generator,
                                              device=x0.device)).exp()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        y = drop_labels(y, label_dropout, model.n_classes, generator)
        return nine.denoiser_loss_per_sample(WithLabels(model, y), x0, sigma, noise,
                                             sigma_data).mean()

    return loss


def noisy_classifier_loss(sigma_min: float, sigma_max: float):
    """Cross-entropy on x0 + sigma z, ln sigma uniform on [ln sigma_min, ln sigma_max]: every
    level the samplers visit gets the same share of training."""

    def loss(model, x0, y, generator):
        u = torch.rand(len(x0), generator=generator, device=x0.device)
        sigma = (math.log(sigma_min) + u * math.log(sigma_max / sigma_min)).exp()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return F.cross_entropy(model(x0 + sigma[:, None, None, None] * noise, sigma), y)

    return loss


# %% [markdown]
# ## 3.4 Measurement operators
# Each operator has `A(x)` and the pseudo-inverse `pinv(y)` (Section 2.4); the blur also has
# its Tikhonov solution for the least-squares baseline. The blur is circular (via the FFT),
# which is harmless for MNIST, whose borders are blank, and makes $A^\top$ and every
# regularised inverse exact.

# %%
class Inpaint:
    """A x = mask * x (the measurement keeps the image's shape; unknown pixels are 0).
    A^+ = A: the projection replaces the known pixels. mask: (1 or N, 1, H, W) of 0/1."""

    def __init__(self, mask: Tensor):
        self.mask = mask.float()

    def A(self, x: Tensor) -> Tensor:
        return self.mask * x

    def pinv(self, y: Tensor) -> Tensor:
        return self.mask * y

    def repeat(self, k: int) -> Inpaint:
        """The operator for k stacked copies of the batch (a mask per image is repeated)."""
        return Inpaint(self.mask.repeat(k, 1, 1, 1) if len(self.mask) > 1 else self.mask)


class Downsample:
    """A x = the mean of each f x f block (N, C, H/f, W/f); A^+ y repeats each value f x f."""

    def __init__(self, factor: int):
        self.factor = factor

    def A(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def repeat(self, k: int) -> Downsample:
        return self


class GaussianBlur:
    """A x = k * x, circular convolution with a normalised Gaussian of ``sigma`` pixels."""

    def __init__(self, sigma: float, size: int, device=None):
        r = torch.arange(size, device=device, dtype=torch.float64)
        r = torch.minimum(r, size - r)  # circular distance to pixel 0
        k1 = torch.exp(-r**2 / (2 * sigma**2))
        kernel = torch.outer(k1, k1)
        self.K = torch.fft.rfft2(kernel / kernel.sum())  # transfer function, (H, W//2 + 1)

    def A(self, x: Tensor) -> Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x.double()) * self.K, s=x.shape[-2:]).to(x.dtype)

    def tikhonov(self, y: Tensor, lam: float, prior_mean: Tensor) -> Tensor:
        """argmin_x |A x - y|^2 + lam |x - m|^2 = m + (A^T A + lam)^{-1} A^T (y - A m)."""
        r = torch.fft.rfft2((y - self.A(prior_mean)).double())
        x = torch.fft.irfft2(self.K.conj() * r / (self.K.abs() ** 2 + lam), s=y.shape[-2:])
        return prior_mean + x.to(y.dtype)


def project_onto_measurement(op, x: Tensor, y: Tensor) -> Tensor:
    """x - A^+ (A x - y): the nearest point to x (in the Euclidean norm) with A x = y."""
    return x - op.pinv(op.A(x) - y)


def measurement_hook(op, y: Tensor, sde, generator) -> Callable:
    """Module 08's step_hook that imposes y = A x0 at every PC step: with x_t = alpha_t x0 +
    sigma_t z, the measurement of x_t is y_t = alpha_t y + sigma_t A z (a fresh z each step)."""

    def hook(x: Tensor, t_next: float, i: int) -> Tensor:
        t = torch.full((len(x),), t_next, device=x.device, dtype=x.dtype)
        alpha, sigma = sde.mean_coeff(t)[0], sde.std(t)[0]
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project_onto_measurement(op, x, alpha * y + sigma * op.A(z))

    return hook


def solve_by_projection(denoiser: nn.Module, op, y: Tensor, shape, cfg9, pc_steps: int, seed: int,
                        device, draws: int = 1) -> tuple[Tensor, int]:
    """PC sampling (module 08, via module 09's sde_sample) with the measurement imposed after
    every step, then Tweedie's final denoising step and one last exact projection onto A x = y.

    ``draws`` independent reconstructions of each measurement run as one batch. Returns images
    in [-1, 1], shape (draws, N, C, H, W), and the NFE per image."""
    counter = nine.CountingDenoiser(denoiser, nine.autocast_dtype(device))
    sde = nine.sde_for_denoiser("ve", cfg9)
    g = torch.Generator(device).manual_seed(seed)
    op_k, y_k = op.repeat(draws), y.repeat(draws, *([1] * (y.ndim - 1)))
    with torch.no_grad():
        x = nine.sde_sample(counter, sde, "pc", (draws * shape[0], *shape[1:]),
                            replace(cfg9, pc_steps=pc_steps), g, device,
                            step_hook=measurement_hook(op_k, y_k, sde, g))
    x = project_onto_measurement(op_k, x, y_k).clamp(-1, 1)
    return x.reshape(draws, *shape), counter.nfe


# %% [markdown]
# ## 3.5 Diffusion posterior sampling
# A stochastic Euler sampler on module 09's noise grid (the Heun sampler without its
# correction, which would double the backward passes) with the DPS step of Section 2.5 after
# each update. The last Euler step lands on $D(x, \hat\sigma)$, the Tweedie estimate, as in 09,
# and the last DPS step then moves it once more towards the measurement.

# %%
def dps_sample(denoiser: nn.Module, op, y: Tensor, shape, n_steps: int, zeta: float,
               cfg9, generator, device) -> tuple[Tensor, int]:
    """Diffusion posterior sampling (Chung et al. 2023) for y = A x0 + noise. Returns images in
    [-1, 1] (N, C, H, W) and the NFE (each a forward and a backward pass)."""
    counter = nine.CountingDenoiser(denoiser, nine.autocast_dtype(device))
    sigmas = nine.edm_sigmas(n_steps, cfg9.sigma_min, cfg9.sigma_max)
    x = sigmas[0].item() * torch.randn(shape, generator=generator, device=device)
    for i in range(n_steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        s_hat = (1 + cfg9.churn) * s
        x = x + math.sqrt(s_hat**2 - s**2) * torch.randn(x.shape, generator=generator,
                                                         device=device)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            d = counter(x, torch.full((len(x),), s_hat, device=device))
            residual = (y - op.A(d)).flatten(1).norm(dim=1)  # |y - A D(x)| per image
            grad = torch.autograd.grad(residual.square().sum(), x)[0]
        step = zeta / residual.detach().clamp_min(1e-8)
        x = x.detach() + (s_next - s_hat) * (x.detach() - d.detach()) / s_hat  # Euler step
        x = x - step[:, None, None, None] * grad
    return x.detach().clamp(-1, 1), counter.nfe


# %% [markdown]
# ## 3.6 Tweedie denoising and posterior samples
# Tweedie's estimate is one call of the denoiser; module 08's `denoised_estimate` computes the
# same $x + \sigma_t^2 s$ from any score (the test file checks that they agree). A posterior
# sample runs module 08's reverse-diffusion sampler from $\sigma$ down to 0, starting at the
# noisy image.

# %%
def tweedie_posterior_mean(denoiser: nn.Module, x_noisy: Tensor, sigma: float) -> Tensor:
    """E[x0 | x] by module 04's tweedie_denoise, x + sigma^2 s(x), with the score read off the
    denoiser (module 09's denoiser_score). Equals D(x, sigma): Tweedie's formula, read back."""
    score = lambda x: nine.denoiser_score(denoiser, x, torch.tensor(sigma))  # noqa: E731
    return four.tweedie_denoise(score, x_noisy, sigma)


def posterior_sample(denoiser: nn.Module, x_noisy: Tensor, sigma: float, generator,
                     n_steps: int = 100) -> Tensor:
    """A draw from p(x0 | x = x_noisy): module 08's reverse-diffusion sampler on a VE SDE whose
    largest noise level is sigma, started at the noisy image, then Tweedie's last step.

    The reverse SDE, not module 09's Heun sampler: any sampler that maps p_sigma to p_0 gives
    realistic images, but only the reverse SDE pairs each noisy image with a draw from its own
    posterior (the ODE, for one, is deterministic; the test file measures both)."""
    sde = sde_lib.VESDE(sigma_min=min(0.002, sigma / 10), sigma_max=sigma)
    score = nine.score_fn(denoiser, sde)
    *_, x = sde_lib.pc_sample(sde, score, x_noisy.shape, n_steps=n_steps, corrector_steps=0,
                              eps=1e-3, generator=generator, x_T=x_noisy)
    t_eps = torch.full((len(x),), 1e-3, device=x.device, dtype=x.dtype)
    return sde_lib.denoised_estimate(sde, score, x, t_eps)


# %% [markdown]
# ## 3.7 Image metrics

# %%
def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per image: (N,)."""
    mse = (x.double() - ref.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r**2 / (2 * sigma**2))
    return torch.outer(g, g) / g.sum() ** 2


def ssim(x: Tensor, ref: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity of images in [0, 1] (Wang et al. 2004), per image: (N,).

    Local statistics in a Gaussian window over the valid positions, averaged over positions and
    channels; C1 = 0.01^2, C2 = 0.03^2 for a data range of 1.
    """
    c1, c2 = 0.01**2, 0.03**2
    x, ref = x.double(), ref.double()
    ch = x.shape[1]
    w = gaussian_window(window, sigma).to(x.device)[None, None].expand(ch, 1, -1, -1)

    def local_mean(t):
        return F.conv2d(t, w, groups=ch)

    mu_x, mu_y = local_mean(x), local_mean(ref)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(ref * ref) - mu_y**2
    cov = local_mean(x * ref) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) *
                                                       (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def to_unit(y: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clipped."""
    return ((y.float() + 1) / 2).clamp(0, 1)


def image_scores(x: Tensor, truth: Tensor) -> dict:
    """Mean PSNR and SSIM (and their standard errors) of images in [-1, 1] against the truth."""
    p, s = psnr(to_unit(x), to_unit(truth)), ssim(to_unit(x), to_unit(truth))
    n = math.sqrt(len(p))
    return {"psnr": p.mean().item(), "psnr_se": (p.std() / n).item() if len(p) > 1 else 0.0,
            "ssim": s.mean().item(), "ssim_se": (s.std() / n).item() if len(s) > 1 else 0.0}


def save_conditional_npz(path: Path, images_uint8: Tensor, labels: Tensor) -> Path:
    """Samples with the labels they were asked for: arr_0 (N, H, W, C) uint8, arr_1 (N,)."""
    return nine.save_samples_npz(path, images_uint8, labels)


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 What we need: module 09's model, and two new networks
# Module 09's checkpoint is loaded (and trained first, with its own progress bar, when it is
# missing). The label-conditional denoiser and the noisy-image classifier are trained here and
# cached beside it.

# %%
def load_base_model(run, profile: str, images: Tensor) -> tuple[nn.Module, object, dict]:
    """Module 09's EMA denoiser, its configuration, and {"path", "step"} of its checkpoint;
    trains module 09's model first (module 09's recipe and progress bar) if it is missing."""
    trained, cfg9 = load_or_train_09(run, profile, images)
    return trained["good"], cfg9, {"path": trained["path"], "step": trained["state"].step}


def load_or_train_09(run, profile: str, images: Tensor) -> tuple[dict, object]:
    """Module 09's ``train_or_load`` result (EMA denoisers "good" and "bad", "path", "state",
    ...) and configuration: the checkpoint as it is in ``run.args.checkpoint_dir``, or module
    09's default training run when there is none. ``run.args`` needs dataset, checkpoint_dir
    and seed."""
    args = run.args
    cfg9 = nine.Config.quick() if profile == "quick" else nine.Config.cpu()
    cfg9.model.in_channels, cfg9.model.image_size = images.shape[1], images.shape[-1]
    # the flags of module 09 that its train_or_load reads (train_steps None: its default)
    args9 = SimpleNamespace(dataset=args.dataset, checkpoint_dir=args.checkpoint_dir,
                            seed=args.seed, train_steps=None, resume=False)
    run9 = SimpleNamespace(args=args9, device=run.device)
    path = nine.checkpoint_file(args9, profile)
    if not path.exists():
        print(f"Module 09's model is not at {path}: training it now with module 09's recipe "
              f"({cfg9.train_steps} steps); it is cached for next time.")
    else:  # module 09's "sample only" mode: take the checkpoint as it is, whatever its length
        args9.train_steps = 0
        payload = nine.read_checkpoint(path)
        if payload["step"] < payload["training"]["train_steps"]:
            print(f"Warning: {path} holds an interrupted run (step {payload['step']} of "
                  f"{payload['training']['train_steps']}); finish it with "
                  f"'python 09_image_generation.py --resume' for better samples.")
    return nine.train_or_load(run9, cfg9, images, nine.Distributed(), profile), cfg9


def load_or_train_conditional(run, base: nn.Module, base_info: dict, cfg9, cfg: AppConfig, images,
                              labels, profile: str) -> tuple[nn.Module, list]:
    """The label-conditional denoiser, fine-tuned from a copy of module 09's EMA weights."""
    n_classes = int(labels.max()) + 1
    start = copy.deepcopy(base).to(run.device).train().requires_grad_(True)
    model = LabelConditionalDenoiser(start, n_classes).to(run.device)
    settings = {"base": base_info["path"].name, "base_step": base_info["step"],
                "steps": cfg.cond_steps, "batch": cfg.cond_batch, "lr": cfg.cond_lr,
                "label_dropout": cfg.label_dropout, "label_lr_boost": cfg.label_lr_boost,
                "p_mean": cfg.cond_p_mean, "n_classes": n_classes}
    path = Path(run.args.checkpoint_dir) / f"10_{run.args.dataset}_conditional_{profile}.pt"
    loss = conditional_loss(cfg.label_dropout, cfg.cond_p_mean, cfg9.p_std,
                            cfg9.model.sigma_data)
    return train_network(model, loss, images, labels, cfg.cond_steps, cfg.cond_batch,
                         cfg.cond_lr, cfg, run.args.seed + 11, path, settings,
                         "label-conditional denoiser",
                         lr_boost={"label_embedding": cfg.label_lr_boost})


def load_or_train_noisy_classifier(run, cfg9, cfg: AppConfig, images, labels,
                                   profile: str) -> tuple[nn.Module, list]:
    n_classes = int(labels.max()) + 1
    torch.manual_seed(run.args.seed + 12)
    model = NoisyClassifier(images.shape[1], n_classes, cfg9.model.sigma_data).to(run.device)
    settings = {"steps": cfg.clf_steps, "batch": cfg.clf_batch, "lr": cfg.clf_lr,
                "n_classes": n_classes, "sigma": [cfg9.sigma_min, cfg9.sigma_max]}
    path = Path(run.args.checkpoint_dir) / f"10_{run.args.dataset}_noisy_classifier_{profile}.pt"
    loss = noisy_classifier_loss(cfg9.sigma_min, cfg9.sigma_max)
    return train_network(model, loss, images, labels, cfg.clf_steps, cfg.clf_batch, cfg.clf_lr,
                         cfg, run.args.seed + 12, path, settings, "noisy-image classifier")


def print_network_note(name: str, losses: list) -> None:
    k = max(1, len(losses) // 10)
    print(f"{name}: {len(losses)} steps, final loss (mean of last {k}) "
          f"{np.mean(losses[-k:]):.4f}")


# %% [markdown]
# ## 4.2 Guided generation: does the sample show the digit we asked for?
# For each guidance scale we ask for every digit `per_class` times, sample with module 09's
# stochastic Heun sampler (18 steps), and let module 09's **evaluation classifier** (trained on
# clean digits, never used for guidance) say which digit it sees. "Unguided" is module 09's
# unconditional model with the same requests: it hits the requested digit by chance, about 10%
# of the time. The Frechet distance in the evaluation classifier's feature space (against test
# digits, beside the value real training digits reach) shows what guidance costs in diversity:
# if every "3" comes out the same, the distance grows.

# %%
def requested_labels(n_classes: int, per_class: int, device) -> Tensor:
    """0, 1, ..., K-1, 0, 1, ... : per_class requests of every class, (K * per_class,)."""
    return torch.arange(n_classes, device=device).repeat(per_class)


def sample_with(denoiser: nn.Module, n: int, shape, cfg9, seed: int, device) -> tuple[Tensor, int]:
    """Module 09's stochastic Heun sampler: uint8 images, and the network evaluations per
    sample (classifier-free guidance: two per step; classifier guidance: one, plus a backward
    pass through the small classifier)."""
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        *_, (_, x, _) = nine.heun_sample(denoiser, (n, *shape), cfg9.heun_steps, cfg9.sigma_min,
                                         cfg9.sigma_max, cfg9.churn, g, device)
    return nine.to_uint8(x), network_evaluations(denoiser)


def network_evaluations(denoiser: nn.Module) -> int:
    """The sum of the ``nfe`` counters of the (distinct) counting modules inside ``denoiser``."""
    return sum(m.nfe for m in denoiser.modules() if hasattr(m, "nfe"))


@torch.no_grad()
def label_agreement(clf: nn.Module, images_uint8: Tensor, requested: Tensor) -> dict:
    """How often the evaluation classifier sees the requested class: overall and per class."""
    preds = clf(nine.to_model_space(images_uint8)).argmax(1)
    hits = (preds.cpu() == requested.cpu()).double()
    k = int(requested.max()) + 1
    per_class = torch.stack([hits[requested.cpu() == c].mean() for c in range(k)])
    return {"overall": hits.mean().item(), "per_class": per_class.tolist()}


def guidance_sweep(method: str, make_denoiser: Callable[[Tensor, float], nn.Module],
                   scales, clf, ref_feats, n_classes: int, cfg: AppConfig, cfg9, shape, seed: int,
                   device, outdir: Path) -> dict:
    """Sample at every scale; agreement with the requested labels, quality, npz files."""
    labels = requested_labels(n_classes, cfg.per_class, device)
    results = {}
    for scale in progress(scales, desc=f"{method} guidance sweep", leave=False):
        start = time.perf_counter()
        images, nfe = sample_with(make_denoiser(labels, scale), len(labels), shape, cfg9, seed,
                                  device)
        r = {"images": images, "labels": labels.cpu(), "nfe": nfe,
             "seconds": time.perf_counter() - start,
             **label_agreement(clf, images, labels),
             "quality": nine.sample_quality(clf, images, ref_feats)}
        save_conditional_npz(outdir / f"guided_{method}_{scale:g}.npz", images, labels.cpu())
        results[scale] = r
        per_class = " ".join(f"{100 * a:3.0f}" for a in r["per_class"])
        symbol = "w" if method == "cfg" else "gamma"
        write(f"  {method:10s} {symbol} = {scale:4g}: as requested {100 * r['overall']:5.1f}% "
                   f"(per class: {per_class}), FD {r['quality']['frechet']:6.1f}, NFE {nfe}, "
                   f"{r['seconds']:.0f} s")
    return results


# %% [markdown]
# ## 4.3 Inverse problems on held-out test digits
# Every method sees only the measurement; the ground truth is used to score. The baselines are
# what one would do without a generative model: fill the missing pixels with the training
# mean, upsample bicubically, or solve a regularised least-squares problem.

# %%
MASK_FILES = {"top half known": "inpainting_top_half",
              "centre box missing": "inpainting_centre_box",
              "random 25% known": "inpainting_random_pixels"}


def make_masks(n: int, size: int, generator) -> dict:
    """Three masks (1 = known pixel): the top half, all but a centre box of 36% of the side
    (10 x 10 of 28 x 28), and a random 25% of the pixels (a fresh draw per image)."""
    half = torch.zeros(1, 1, size, size)
    half[..., : size // 2, :] = 1
    box = torch.ones(1, 1, size, size)
    a = (size - round(0.36 * size)) // 2
    box[..., a:size - a, a:size - a] = 0
    random = (torch.rand(n, 1, size, size, generator=generator) < 0.25).float()
    return {"top half known": half, "centre box missing": box, "random 25% known": random}


def inpainting_experiment(denoiser, truth: Tensor, mean_image: Tensor, cfg: AppConfig, cfg9,
                          seed: int, device) -> dict:
    """Replacement inside PC sampling, against mean fill, for each mask."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in make_masks(len(truth), truth.shape[-1], g).items():
        op = Inpaint(mask.to(device))
        y = op.A(truth)
        baseline = y + (1 - op.mask) * mean_image
        draws, nfe = solve_by_projection(denoiser, op, y, truth.shape, cfg9, cfg.pc_steps,
                                         seed, device, cfg.posterior_draws)
        out[name] = {"measurement": torch.where(op.mask > 0, y, 0.0),  # unknown: mid-grey
                     "baseline": baseline, **score_draws(draws, truth, baseline, nfe)}
    return out


def score_draws(draws: Tensor, truth: Tensor, baseline: Tensor, nfe: int) -> dict:
    """One reconstruction ("sample") and the mean of all draws ("reconstruction": an estimate of
    the posterior mean, the PSNR-optimal answer, Section 2.6), each scored, beside the
    baseline's scores. (For DPS and Tweedie, "reconstruction" is their single answer.)"""
    mean = draws.mean(0)
    return {"sample": draws[0], "reconstruction": mean, "nfe": nfe,
            "sample_scores": image_scores(draws[0], truth), "scores": image_scores(mean, truth),
            "baseline_scores": image_scores(baseline, truth)}


def superres_experiment(denoiser, truth: Tensor, cfg: AppConfig, cfg9, seed: int,
                        device) -> dict:
    """Measurement-consistent PC sampling from f x f block means, against bicubic upsampling."""
    op = Downsample(cfg.superres_factor)
    y = op.A(truth)
    bicubic = F.interpolate(y, size=truth.shape[-2:], mode="bicubic",
                            align_corners=False).clamp(-1, 1)
    draws, nfe = solve_by_projection(denoiser, op, y, truth.shape, cfg9, cfg.pc_steps, seed,
                                     device, cfg.posterior_draws)
    return {"measurement": op.pinv(y), "baseline": bicubic,
            **score_draws(draws, truth, bicubic, nfe)}


def best_tikhonov(op: GaussianBlur, y: Tensor, truth: Tensor, mean_image: Tensor) -> float:
    """The regularisation weight with the best mean PSNR on (training) images: an oracle-tuned
    baseline, so that the comparison does not flatter the score model."""
    lams = 10.0 ** torch.arange(-4.0, 0.5, 0.25)
    best = max(lams.tolist(), key=lambda lam: psnr(to_unit(op.tikhonov(y, lam, mean_image)),
                                                   to_unit(truth)).mean().item())
    return best


def deblur_experiment(denoiser, truth: Tensor, tune_images: Tensor, mean_image: Tensor,
                      cfg: AppConfig, cfg9, seed: int, device) -> dict:
    """DPS on y = blur(x) + sigma_y n, against Tikhonov least squares tuned on training digits."""
    op = GaussianBlur(cfg.blur_sigma, truth.shape[-1], device)
    g = torch.Generator(device).manual_seed(seed)

    def measure(x):
        return op.A(x) + cfg.measurement_noise * torch.randn(x.shape, generator=g, device=device)

    lam = best_tikhonov(op, measure(tune_images), tune_images, mean_image)
    y = measure(truth)
    baseline = op.tikhonov(y, lam, mean_image).clamp(-1, 1)
    recon, nfe = dps_sample(denoiser, op, y, truth.shape, cfg.dps_steps, cfg.dps_zeta, cfg9, g,
                            device)
    residual = (op.A(recon) - y).flatten(1).norm(dim=1) / math.sqrt(truth[0].numel())
    return {"measurement": y.clamp(-1, 1), "baseline": baseline, "reconstruction": recon,
            "nfe": nfe, "lambda": lam, "scores": image_scores(recon, truth),
            "baseline_scores": image_scores(baseline, truth),
            "residual_rms": residual.mean().item()}


def tweedie_experiment(denoiser, truth: Tensor, cfg: AppConfig, cfg9, seed: int, device) -> dict:
    """Tweedie's posterior mean and a posterior sample, against the noisy image, per sigma."""
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    counter = nine.CountingDenoiser(denoiser, nine.autocast_dtype(device))
    for sigma in cfg.tweedie_sigmas:
        noisy = truth + sigma * torch.randn(truth.shape, generator=g, device=device)
        with torch.no_grad():
            mean = tweedie_posterior_mean(counter, noisy, sigma).clamp(-1, 1)
            sample = posterior_sample(counter, noisy, sigma, g).clamp(-1, 1)
        mse_mean = (mean - truth).square().mean().item()
        mse_sample = (sample - truth).square().mean().item()
        out[sigma] = {"measurement": noisy.clamp(-1, 1), "baseline": noisy.clamp(-1, 1),
                      "reconstruction": mean, "sample": sample,
                      "scores": image_scores(mean, truth),
                      "sample_scores": image_scores(sample, truth),
                      "baseline_scores": image_scores(noisy, truth),
                      "mse_ratio": mse_sample / mse_mean}
    return out


# %% [markdown]
# ## 4.4 Figures

# %%
def plot_guided_grids(run, method: str, results: dict, n_classes: int, title: str) -> None:
    """One panel per scale: row c holds the samples requested as class c."""
    scales = list(results)
    fig, axes = plt.subplots(1, len(scales), figsize=(max(8.0, 2.9 * len(scales)), 4.0),
                             squeeze=False)
    for ax, scale in zip(axes[0], scales):
        r = results[scale]
        per = min(8, len(r["labels"]) // n_classes)
        order = torch.cat([torch.nonzero(r["labels"] == c).flatten()[:per]
                           for c in range(n_classes)])
        image_grid(ax, r["images"][order].float() / 255, nrow=per,
                   title=f"{'w' if method == 'cfg' else 'gamma'} = {scale:g}: "
                         f"{100 * r['overall']:.0f}% as asked\n"
                         f"FD {r['quality']['frechet']:.0f}")
    fig.suptitle(f"{title}\nrow c: samples requested as class c", fontsize=10)
    run.save(fig, f"guided_{method}")


def plot_guidance_sweep(run, sweeps: dict, unguided: dict, floor: dict) -> None:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, results in sweeps.items():
        scales = list(results)
        power = [likelihood_power(method, s) for s in scales]  # CFG at w: gamma = 1 + w
        label = f"{method} ({'w' if method == 'classifier-free' else 'gamma'} = " \
                f"{', '.join(f'{s:g}' for s in scales)})"
        ax1.plot(power, [100 * results[s]["overall"] for s in scales], "o-", label=label)
        ax2.plot(power, [100 * min(results[s]["per_class"]) for s in scales], "o-",
                 label=label)
        ax3.plot(power, [results[s]["quality"]["frechet"] for s in scales], "o-", label=label)
    for ax in (ax1, ax2):
        ax.axhline(100 * unguided["overall"], color="gray", ls=":",
                   label=f"unconditional model ({100 * unguided['overall']:.0f}%)")
        ax.axhline(10, color="black", ls="--", lw=0.8, label="chance (10%)")
        ax.set_ylim(0, 102)
        ax.set_ylabel("% classified as the requested digit")
    ax3.axhline(floor["frechet"], color="gray", ls="--", label="real training digits")
    ax3.axhspan(floor["frechet"] - floor["frechet_sd"], floor["frechet"] + floor["frechet_sd"],
                color="gray", alpha=0.2, label="real digits +- 1 sd")
    ax3.axhline(unguided["quality"]["frechet"], color="gray", ls=":",
                label="unconditional model")
    ax3.set_ylabel("Frechet distance to test digits (classifier features)")
    ax1.set_title("all requests (more is better)")
    ax2.set_title("the worst digit (more is better)")
    ax3.set_title("distance to real digits: quality and diversity (less is better)",
                  fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("power of the likelihood p(y | x): gamma, or 1 + w for classifier-free")
        ax.legend(fontsize=7)
    fig.suptitle("What guidance buys and what it costs (judged by module 09's evaluation "
                 "classifier)")
    run.save(fig, "guidance_sweep")


def likelihood_power(method: str, scale: float) -> float:
    """The power of p(y | x) a guidance scale amounts to: gamma, or 1 + w (Section 2.3)."""
    return 1 + scale if method == "classifier-free" else scale


def plot_per_class(run, sweeps: dict) -> None:
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 3.6), squeeze=False)
    for ax, (method, results) in zip(axes[0], sweeps.items()):
        scales = list(results)
        table = np.array([results[s]["per_class"] for s in scales]) * 100
        im = ax.imshow(table, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
        ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set_xticks(range(table.shape[1]))
        ax.set_xlabel("requested digit")
        ax.set_ylabel("guidance scale w" if method == "classifier-free" else "guidance scale gamma")
        ax.set_title(f"{method}: % classified as requested")
        fig.colorbar(im, ax=ax, fraction=0.04)
    run.save(fig, "guidance_per_class")


def plot_reconstructions(run, name: str, rows: dict, truth: Tensor, title: str,
                         n_show: int = 8) -> None:
    """Columns: images; rows: what each method produced, the truth last."""
    rows = {**rows, "ground truth": truth}
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 * n_show + 2.5, 1.15 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        image_grid(ax, to_unit(images[:n_show]), nrow=n_show)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    run.save(fig, name)


def scores_label(s: dict) -> str:
    return f"{s['psnr']:.1f} dB, SSIM {s['ssim']:.2f}"


def plot_inverse_problems(run, cfg: AppConfig, truth: Tensor, inpaint: dict, superres: dict,
                          deblur: dict, tweedie: dict) -> None:
    k = cfg.posterior_draws
    for name, r in inpaint.items():
        plot_reconstructions(run, MASK_FILES[name], {
            "measurement (grey = unknown)": r["measurement"],
            f"mean fill: {scores_label(r['baseline_scores'])}": r["baseline"],
            f"one replacement-PC draw: {scores_label(r['sample_scores'])}": r["sample"],
            f"mean of {k} draws: {scores_label(r['scores'])}": r["reconstruction"]},
            truth, f"Inpainting, {name}")
    side = truth.shape[-1] // cfg.superres_factor
    plot_reconstructions(run, "super_resolution", {
        f"measurement ({side}x{side} block means)": superres["measurement"],
        f"bicubic: {scores_label(superres['baseline_scores'])}": superres["baseline"],
        f"one consistent-PC draw: {scores_label(superres['sample_scores'])}": superres["sample"],
        f"mean of {k} draws: {scores_label(superres['scores'])}": superres["reconstruction"]},
        truth, f"Super-resolution x{cfg.superres_factor}")
    plot_reconstructions(run, "deblurring", {
        f"measurement (blur {cfg.blur_sigma:g} px, noise {cfg.measurement_noise:g})":
            deblur["measurement"],
        f"Tikhonov: {scores_label(deblur['baseline_scores'])}": deblur["baseline"],
        f"DPS: {scores_label(deblur['scores'])}": deblur["reconstruction"]},
        truth, "Deblurring a noisy measurement")
    rows = {}
    for sigma, r in tweedie.items():
        rows[f"noisy, sigma {sigma:g}: {scores_label(r['baseline_scores'])}"] = r["measurement"]
        rows[f"sigma {sigma:g}, Tweedie mean: {scores_label(r['scores'])}"] = r["reconstruction"]
        rows[f"sigma {sigma:g}, posterior sample: {scores_label(r['sample_scores'])}"] = \
            r["sample"]
    plot_reconstructions(run, "tweedie_denoising", rows, truth,
                         "Denoising: Tweedie's posterior mean (one network call) and a "
                         "posterior sample")


def halfway_level(sigmas: np.ndarray, acc: np.ndarray, level: float) -> float | None:
    """The first sigma (log-linear interpolation) where the accuracy drops below ``level``."""
    below = np.nonzero(acc < level)[0]
    if len(below) == 0 or below[0] == 0:
        return None
    i = below[0]
    f = (acc[i - 1] - level) / (acc[i - 1] - acc[i])
    return float(np.exp(np.log(sigmas[i - 1]) + f * np.log(sigmas[i] / sigmas[i - 1])))


def plot_noisy_classifier(run, clf: nn.Module, images: Tensor, labels: Tensor, cfg9,
                          device) -> None:
    """Accuracy of the guiding classifier against the noise level: where guidance can help."""
    sigmas = np.geomspace(cfg9.sigma_min, cfg9.sigma_max, 13)
    g = torch.Generator(device).manual_seed(0)
    x0 = nine.to_model_space(images[:500].to(device))
    acc = []
    with torch.no_grad():
        for s in sigmas:
            x = x0 + float(s) * torch.randn(x0.shape, generator=g, device=device)
            acc.append((clf(x, torch.tensor(float(s))).argmax(1).cpu() == labels[:500])
                       .float().mean().item() * 100)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.semilogx(sigmas, acc, "o-", label="noisy-image classifier (guides sampling)")
    ax.axhline(10, color="black", ls="--", lw=0.8, label="chance")
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    half = halfway_level(sigmas, np.asarray(acc), 50.0)
    ax.set_title("Accuracy of the guiding classifier on noisy test digits" +
                 (f": below 50% from sigma = {half:.2g}" if half else ""))
    ax.legend(fontsize=8)
    run.save(fig, "noisy_classifier_accuracy")


# %% [markdown]
# ## 4.5 The whole demonstration
# `demonstrate` runs everything in order and returns what it measured. The summary printed at
# the end of every run holds the numbers of *your* run; ours (2 CPU cores, module 09's default
# 5,000-step model, default settings: 12 minutes including both trainings) were:
#
# * **Classifier-free guidance** puts 91.5% of the samples on the requested digit with no
#   guidance at all ($w = 0$), 95.5% at $w = 0.5$ and 98.5% at $w = 1$, while the Frechet
#   distance to test digits goes from 32 (real training digits: 38 +- 4) to 41 and 62: $w = 0.5$,
#   the smallest scale that clears 90% everywhere we measured, is the recommended one. Beyond
#   it every "3" starts to look like every other (`guided_cfg.png`).
# * **Classifier guidance** with the noisy-image classifier needs $\gamma = 8$ for 91%
#   (30% at $\gamma = 1$, Bayes' rule itself): the classifier no longer knows the digit at the
#   noise levels where the sampler decides it (`noisy_classifier_accuracy.png`), while the
#   conditional denoiser learned exactly there. Its distance is not monotone in $\gamma$
#   (62, 46, 38, 49): with 200 samples it moves by several units from draw to draw.
# * **Inverse problems**: the mean of 4 reconstructions beats its baseline in PSNR in every
#   task (top half known: 15.0 against mean fill's 14.7 dB, the narrowest margin; centre box:
#   18.7 against 16.4; random 25% of the pixels: 16.1 against 13.2; super-resolution from 7x7:
#   17.1 against bicubic's 14.6), and one reconstruction is 2.1-2.4 dB below the mean of 4, as
#   Section 2.6 predicts for exact posterior draws (10 log10(2 / 1.25) = 2.0 dB). One draw
#   loses to mean fill when the top half is known (12.9 dB): it completes a *different* but
#   plausible digit, which PSNR punishes twice. DPS deblurs a noisy measurement to 21.5 dB
#   against 17.9 for Tikhonov least squares with its weight tuned on training digits.
# * **DPS's step size** was chosen by a sweep on 16 training digits with noise 0.05 (PSNR,
#   Tikhonov: 17.9 dB): with 100 steps, zeta = 0.3 / 1 / 2 / 4 / 8 gave 11.1 / 15.3 / 18.6 /
#   19.8 / 17.1 dB; with 200 steps, zeta = 1 / 1.5 / 2 / 3 / 4 gave 18.1 / 20.5 / 22.1 / 21.8 /
#   21.4 dB. Too small a step ignores the measurement, too large a step overshoots it (the rms
#   residual, 0.06 at zeta = 2 against the noise level 0.05, grows to 0.18 at zeta = 8). 200
#   steps with zeta = 2 also beat Tikhonov at
#   noise 0, 0.1 and 0.2 (22.6 / 20.2 / 17.0 against 21.4 / 16.7 / 15.5 dB).
# * **Tweedie** removes noise of std 0.2-2 in one network call (+8 to +12 dB), and a posterior
#   sample's squared error is 1.84-1.90 times the posterior mean's, against 2 for exact
#   posterior draws: the model's posterior is slightly too narrow. At sigma = 2 the mean is
#   visibly a blur of several digits, the sample a single sharp one (`tweedie_denoising.png`).

# %%
def demonstrate(run, cfg: AppConfig, profile: str) -> dict:
    args, device = run.args, run.device
    images, labels = load_labelled_images(run)
    n_classes = int(labels.max()) + 1
    shape = tuple(images.shape[1:])
    base, cfg9, base_info = load_base_model(run, profile, images)
    print(f"Module 09's model: {base_info['path']} (step {base_info['step']})")
    cond, cond_losses = load_or_train_conditional(run, base, base_info, cfg9, cfg, images, labels,
                                                  profile)
    print_network_note("label-conditional denoiser", cond_losses)
    noisy_clf, clf_losses = load_or_train_noisy_classifier(run, cfg9, cfg, images, labels,
                                                           profile)
    print_network_note("noisy-image classifier", clf_losses)

    # Module 09's evaluation classifier, the test digits and what real digits score
    test_images, test_labels = load_test_split(run, images, labels)
    clf = nine.load_or_train_classifier(
        Path(args.checkpoint_dir) / f"09_{args.dataset}_classifier_{profile}.pt", images, labels,
        cfg9.classifier_steps, args.seed)
    with torch.no_grad():
        ref_feats = clf.features(nine.to_model_space(test_images[:2000]))
    n_eval = n_classes * cfg.per_class
    floor = nine.real_data_floor(clf, images, ref_feats, n_eval,
                                 torch.Generator().manual_seed(args.seed + 7))
    real = label_agreement(clf, test_images[:n_eval], test_labels[:n_eval])
    print(f"Evaluation classifier on {n_eval} test digits: {100 * real['overall']:.1f}% correct; "
          f"real training digits: FD {floor['frechet']:.1f} +- {floor['frechet_sd']:.1f}")

    # Guided generation
    fast = nine.autocast_dtype(device)
    unguided_images, _ = sample_with(nine.CountingDenoiser(base, fast), n_eval, shape, cfg9,
                                     args.seed + 1, device)
    requests = requested_labels(n_classes, cfg.per_class, device).cpu()
    unguided = {**label_agreement(clf, unguided_images, requests),
                "quality": nine.sample_quality(clf, unguided_images, ref_feats)}
    print(f"  unconditional model: requested digit {100 * unguided['overall']:.1f}% (chance)")

    def cfg_make(lab, w):
        return cfg_denoiser(nine.CountingDenoiser(cond, fast), lab, w)

    def cg_make(lab, s):
        return ClassifierGuidedDenoiser(nine.CountingDenoiser(base, fast), noisy_clf, lab, s)

    sweeps = {"classifier-free": guidance_sweep("cfg", cfg_make, cfg.cfg_scales, clf, ref_feats,
                                                n_classes, cfg, cfg9, shape, args.seed + 1,
                                                device, run.outdir),
              "classifier": guidance_sweep("classifier", cg_make, cfg.cg_scales, clf, ref_feats,
                                           n_classes, cfg, cfg9, shape, args.seed + 1, device,
                                           run.outdir)}
    plot_guided_grids(run, "cfg", sweeps["classifier-free"], n_classes,
                      "Classifier-free guidance")
    plot_guided_grids(run, "classifier", sweeps["classifier"], n_classes, "Classifier guidance")
    plot_guidance_sweep(run, sweeps, unguided, floor)
    plot_per_class(run, sweeps)
    plot_noisy_classifier(run, noisy_clf, test_images, test_labels, cfg9, device)

    # Inverse problems on held-out test digits
    g = torch.Generator().manual_seed(args.seed + 20)
    pick = torch.randperm(len(test_images), generator=g)[:cfg.n_test]
    truth = nine.to_model_space(test_images[pick]).to(device)
    mean_image = nine.to_model_space(images[:10_000]).mean(0, keepdim=True).to(device)
    tune = nine.to_model_space(images[torch.randperm(len(images), generator=g)[:256]]).to(device)
    start = time.perf_counter()
    inpaint = inpainting_experiment(base, truth, mean_image, cfg, cfg9, args.seed + 21, device)
    superres = superres_experiment(base, truth, cfg, cfg9, args.seed + 22, device)
    deblur = deblur_experiment(base, truth, tune, mean_image, cfg, cfg9, args.seed + 23, device)
    tweedie = tweedie_experiment(base, truth, cfg, cfg9, args.seed + 24, device)
    print(f"Inverse problems on {len(truth)} test digits: {time.perf_counter() - start:.0f} s")
    plot_inverse_problems(run, cfg, truth, inpaint, superres, deblur, tweedie)
    results = {"sweeps": sweeps, "unguided": unguided, "floor": floor, "real": real,
               "inpainting": inpaint, "super_resolution": superres, "deblurring": deblur,
               "tweedie": tweedie}
    if run.quick:
        print("\n--quick: tiny networks trained for seconds; the numbers below only show that "
              "everything runs.")
    run.finish(summary_rows(results, cfg), globals(), "10")
    return results


def summary_rows(r: dict, cfg: AppConfig) -> list:
    rows = [("evaluation classifier on test digits", f"{100 * r['real']['overall']:.1f}%",
             "MNIST: about 99%"),
            ("real training digits: Frechet distance (FD) to test digits",
             f"{r['floor']['frechet']:.1f} +- {r['floor']['frechet_sd']:.1f}",
             "the floor for samples (5 draws); FD mixes quality and diversity"),
            ("unconditional model: as requested / FD",
             f"{100 * r['unguided']['overall']:.1f}% / {r['unguided']['quality']['frechet']:.1f}",
             "chance: 10%")]
    for method, results in r["sweeps"].items():
        name = "w" if method == "classifier-free" else "gamma"
        for scale, q in results.items():
            rows.append((f"{method} guidance, {name} = {scale:g}: as requested / worst digit / "
                         f"FD", f"{100 * q['overall']:.1f}% / {100 * min(q['per_class']):.0f}% / "
                         f"{q['quality']['frechet']:.1f}",
                         f"NFE {q['nfe']}" + (", the recommended w" if name == "w" and scale
                                              == cfg.cfg_recommended else "")))
    w = cfg.cfg_recommended
    rec = r["sweeps"]["classifier-free"][w]
    rows.append((f"recommended: classifier-free guidance at w = {w:g}, as requested",
                 f"{100 * rec['overall']:.1f}% (worst digit {100 * min(rec['per_class']):.0f}%)",
                 "goal: >= 90%; unguided: chance"))
    k = cfg.posterior_draws
    problems = [(f"inpainting, {name}", t, "mean fill") for name, t in r["inpainting"].items()]
    problems.append((f"super-resolution x{cfg.superres_factor}", r["super_resolution"], "bicubic"))
    for label, t, baseline in problems:
        rows.append((f"{label}: PSNR / SSIM, mean of {k} draws (one draw)",
                     f"{_pair(t['scores'])} ({_pair(t['sample_scores'])})",
                     f"{baseline}: {_pair(t['baseline_scores'])}"))
    d = r["deblurring"]
    rows.append((f"deblurring (blur {cfg.blur_sigma:g} px, noise {cfg.measurement_noise:g}), "
                 f"DPS: PSNR / SSIM", _pair(d["scores"]),
                 f"Tikhonov (lambda {d['lambda']:.2g}): {_pair(d['baseline_scores'])}"))
    rows.append(("deblurring: rms residual |A x - y| / sqrt(n) of DPS",
                 f"{d['residual_rms']:.3f}", f"noise level {cfg.measurement_noise:g}: as close as "
                 f"a fit should get without fitting the noise"))
    for sigma, t in r["tweedie"].items():
        rows.append((f"denoising sigma {sigma:g}, Tweedie: PSNR / SSIM", _pair(t["scores"]),
                     f"noisy input: {_pair(t['baseline_scores'])}"))
        rows.append((f"denoising sigma {sigma:g}: MSE posterior sample / MSE Tweedie",
                     f"{t['mse_ratio']:.2f}", "2 for the exact posterior"))
    return rows


def _pair(s: dict) -> str:
    return f"{s['psnr']:.1f} +- {s['psnr_se']:.1f} dB / {s['ssim']:.2f}"


def load_labelled_images(run) -> tuple[Tensor, Tensor]:
    args = run.args
    try:
        images, labels = nine.load_image_data(args.dataset, args.data_dir, train=True,
                                              image_size=args.image_size)
    except DataNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    if labels is None:
        raise SystemExit("error: this module needs class labels (for guidance): a folder data "
                         "set needs one sub-folder per class")
    return images, labels


def load_test_split(run, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The test split, or (a folder has none) the last 2,000 training images."""
    args = run.args
    if args.dataset != "folder":
        try:
            return nine.load_image_data(args.dataset, args.data_dir, train=False,
                                        image_size=args.image_size)
        except (DataNotFoundError, RuntimeError):
            pass
    print("No test split: the last 2,000 training images stand in for it.")
    return images[-2000:], labels[-2000:]


# %% [markdown]
# # Section 5: Exercises
# Each function below is a stub: replace `raise NotImplementedError` with your answer and run
# `pytest tests/test_10_exercises.py -k your_answer`. The checks compare with autograd, closed
# forms and module code; reference answers are in `solutions/10_advanced_applications.py`.

# %%
def exercise_cfg_combination(d_cond: Tensor, d_uncond: Tensor, w: float) -> Tensor:
    """Exercise 10.1: the classifier-free guided denoiser output.

    Given the conditional D(x, sigma, y) and unconditional D(x, sigma) outputs (same shape),
    return the denoiser of the guided score s_w = (1 + w) s(x, y) - w s(x) (Section 2.3).
    w = 0 must give d_cond back.
    Hint: D = x + sigma^2 s; what happens to x in the combination?
    """
    raise NotImplementedError


def exercise_classifier_gradient(logits_fn: Callable[[Tensor], Tensor], x: Tensor,
                                 labels: Tensor) -> Tensor:
    """Exercise 10.2: the classifier-guidance term grad_x log p(y | x) for each image.

    logits_fn maps x (N, C, H, W) to class logits (N, K); labels (N,) are the requested classes.
    Return grad_x log softmax(logits_fn(x))[n, labels[n]] for every n, shape (N, C, H, W).
    Hint: torch.autograd.grad of a sum over the batch gives each image its own gradient,
    because image n's term depends on x[n] only. The logit alone is not log p(y | x).
    """
    raise NotImplementedError


def exercise_replacement_step(x: Tensor, mask: Tensor, y: Tensor, sigma: float,
                              z: Tensor) -> Tensor:
    """Exercise 10.3: impose the known pixels on the sampler's state at noise level sigma.

    x: the state (N, C, H, W) at level sigma (VE: x = x0 + sigma z); mask: 1 where the pixel
    is known, 0 elsewhere; y: the clean known pixels (image-shaped, any value where mask = 0);
    z: standard normal noise of x's shape. Return x with every known pixel replaced by its
    forward-noised observation, unknown pixels unchanged (Section 2.4).
    Hint: the known pixels of a state at level sigma carry noise of std sigma, too.
    """
    raise NotImplementedError


def exercise_psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Exercise 10.4: PSNR in dB of each image of x against ref, images in [0, 1].

    x, ref: (N, C, H, W). Return (N,): 10 log10(1 / MSE_n), MSE_n the mean squared error of
    image n over its pixels.
    Hint: average inside each image, then take the logarithm (not the other way round).
    """
    raise NotImplementedError


def exercise_tweedie_denoise(x_noisy: Tensor, score: Callable[[Tensor, float], Tensor],
                             sigma: float) -> Tensor:
    """Exercise 10.5: the posterior mean E[x0 | x] of x = x0 + sigma z from the score.

    score(x, sigma) returns grad log p_sigma(x) (shape of x). Return E[x0 | x_noisy]
    (Tweedie's formula, Section 2.6), shape of x_noisy.
    Hint: check your answer on data that are all zero: p_sigma = N(0, sigma^2 I).
    """
    raise NotImplementedError


# %% [markdown]
# # Running the module

# %%
def config_from_flags(run) -> tuple[AppConfig, str]:
    args = run.args
    cfg, profile = (AppConfig.quick(), "quick") if run.quick else (AppConfig.cpu(), "cpu")
    overrides = {"measurement_noise": args.measurement_noise, "cfg_recommended": args.cfg_scale,
                 "n_test": args.n_test}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.cfg_recommended not in cfg.cfg_scales:
        cfg = replace(cfg, cfg_scales=tuple(sorted({*cfg.cfg_scales, cfg.cfg_recommended})))
    return cfg, profile


def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg, profile = config_from_flags(run)
    print(f"Threads: {torch.get_num_threads()}; autocast: "
          f"{nine.autocast_dtype(run.device) or 'off (fp32)'}; profile: {profile}")
    changed = {k: v for k, v in vars(cfg).items() if v != getattr(AppConfig(), k)}
    print(f"Configuration: {'defaults' if not changed else changed} (see AppConfig)")
    try:
        return demonstrate(run, cfg, profile)
    except nine.CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("Interrupted; cached networks are kept and the next run resumes them.") \
            from None


# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this): QUICK = True uses module 09's
# # --quick model (trained here first if missing) and tiny networks of its own;
# # False is the script's default run (about 15 minutes given 09's model).
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg, profile = config_from_flags(run)


# %% tags=["active-ipynb"]
# results = demonstrate(run, cfg, profile)  # Section 4.5


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
