"""
FILE: 07_noise_conditional_scores.py
DIFFICULTY: Advanced
ESTIMATED TIME: 2-3 hours
PREREQUISITES: 03_langevin_dynamics.py (Langevin steps, the 0.8/0.2 mode-weight failure),
               04_denoising_score_matching.py (Tweedie's formula),
               06_score_networks.py (NoiseConditionalScoreNet, GeometricNoise, EMA, training loop)

LEARNING OBJECTIVES:
- Build a geometric noise ladder sigma_1 > ... > sigma_L and choose its three numbers with
  NCSNv2's techniques: sigma_max from the largest pairwise data distance, the ratio gamma from
  a Gaussian overlap criterion, L from gamma and sigma_min.
- Derive why the Langevin step must scale like sigma^2, and choose the base step from the
  variance a chain reaches after T steps (NCSNv2's Technique 4, in closed form).
- Implement annealed Langevin dynamics (Song and Ermon 2019, Algorithm 1) as a generator that
  yields the samples at every noise level, with the final denoising step x + sigma_L^2 s.
- See annealing recover the 0.8/0.2 mode weights that plain Langevin (module 03) gets wrong,
  first with the exact perturbed scores, then with a trained noise-conditional network.
- Optionally (--images) train a small convolutional NCSN on MNIST and sample digits.

MATHEMATICAL BACKGROUND:
- Perturbed densities:  p_sigma = p_data * N(0, sigma^2 I); for a Gaussian mixture
      p_sigma(x) = sum_k w_k N(x; mu_k, C_k + sigma^2 I)          (exact scores at every sigma)
- Geometric ladder:  sigma_i = sigma_max gamma^-(i-1),  i = 1..L,  gamma = sigma_{i-1}/sigma_i
      L = 1 + log(sigma_max / sigma_min) / log(gamma)
- sigma_max (NCSNv2 Technique 1):  sigma_max ~ max_{i,j} |x_i - x_j| over the training data,
  so that p_{sigma_max} is nearly N(0, sigma_max^2 I) and chains started there can reach
  every mode.
- gamma (Technique 2): for x ~ N(0, sigma^2 I) in D dimensions |x| ~ N(sigma sqrt(D),
  sigma^2 / 2) approximately. Level i should put about half its mass inside the 3-std shell
  of level i-1, |x| in [gamma sigma_i (sqrt(D) - 3/sqrt(2)), gamma sigma_i (sqrt(D) + 3/sqrt(2))]:
      C(gamma, D) = Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~ 0.5
  (solvable only for sqrt(2D) > 3, i.e. D >= 5; for D <= 4 every gamma gives C > 0.5).
- Annealed Langevin dynamics, step alpha_i = eps sigma_i^2 / sigma_L^2 (eps = step at sigma_L):
      for i = 1..L, T times:  x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z
      final denoising step:   x <- x + sigma_L^2 s(x, sigma_L) = E[x_0 | x]     (Tweedie)
- Why sigma^2: near a mode p_sigma is about N(mu, sigma^2 I) (sigma above the data's detail),
  so with r = alpha_i / sigma_i^2 the chain x <- (1 - r/2) x + sqrt(r) sigma_i z is the same
  at every level in units of sigma_i: equal mixing per step, equal relative bias.
- Technique 4 (our step convention): start at N(0, gamma^2 sigma_i^2 I) (the previous level),
  target N(0, sigma_i^2 I), a = 1 - r/2. After T steps the variance ratio is
      v_T / sigma_i^2 = a^(2T) (gamma^2 - s_inf) + s_inf,   s_inf = 1 / (1 - r/4)
  (s_inf is module 03's ULA bias v / (1 - eps/(4v))). NCSNv2 picks r to bring this close to 1.

IMPLEMENTATION NOTES:
- Reused, not copied: module 03's `langevin_step`, `langevin` and `mode_fractions`; module 06's
  `NoiseConditionalScoreNet`, `GeometricNoise`, `EMA`, `warmup_lr_lambda`, `training_loop`,
  `noise_conditional_loss`, `exact_score_fn` and `GaussianFourierFeatures` (all through
  common.modules.load_module).
- Module 06's `annealed_langevin` is a sketch that returns only the end point, with the step
  written as step_ratio * sigma_i^2. Here `annealed_langevin_states` is the teaching version:
  the step is parametrised as in the paper (eps at sigma_L), it yields the state after every
  level and after the denoising step, and it works for any x shape (2D points and images).
  The two agree exactly when step_ratio = eps / sigma_L^2 (a test checks it).
- 2D work is float64 with exact scores; the network runs in float32.
- The default run (exact-score sampling, a sigma_max sweep, one network trained for 2,500 steps)
  takes about 1 minute on one CPU core. `--images` adds a small MNIST U-Net: about 4 minutes
  on one core for 1,500 steps and 64 samples (needs MNIST under the data root).

Run:
    python 07_noise_conditional_scores.py            # figures in outputs/07_noise_.../
    python 07_noise_conditional_scores.py --quick    # smoke run, a few seconds
    SBGM_DATA_DIR=/path/to/data python 07_noise_conditional_scores.py --images   # + MNIST
    pytest tests/test_07_noise_conditional_scores.py tests/test_07_exercises.py

References:
- Y. Song and S. Ermon (2019). Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (NCSN, annealed Langevin dynamics, Algorithm 1.)
- Y. Song and S. Ermon (2020). Improved techniques for training score-based generative models.
  NeurIPS. (NCSNv2: Techniques 1-5, the choice of sigma_max, gamma, T and eps.)
- A. Jolicoeur-Martineau et al. (2021). Adversarial score matching and improved sampling for
  image generation. ICLR. (The final denoising step.)
- Y. Song (2021). Generative modeling by estimating gradients of the data distribution
  (blog post, yang-song.net/blog/2021/score/): the 0.8/0.2 mixture.
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# Module 03 gives us the Langevin step and the mode-counting helper, module 06 the network,
# the noise ladder and the training machinery. scipy's normal CDF and root finder compute
# NCSNv2's overlap criterion.

# %%
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import optimize, stats
from torch import nn
from tqdm.auto import tqdm

from common.cli import make_parser as shared_parser
from common.cli import positive_float, positive_int, start_run
from common.datasets import DataNotFoundError, GaussianMixture, load_mnist, resolve_data_root
from common.metrics import mmd_rbf, sliced_wasserstein
from common.modules import load_module
from common.plotting import image_grid, plot_samples_over_density

langevin03 = load_module("03")  # langevin_step, langevin, mode_fractions
nets06 = load_module("06")  # NoiseConditionalScoreNet, GeometricNoise, EMA, training_loop, ...

MODULE = "07_noise_conditional_scores"
Tensor = torch.Tensor
NoiseScoreFn = Callable[[Tensor, Tensor], Tensor]  # (x: (N, ...), sigma: (N,)) -> (N, ...)
F64 = torch.float64


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    # the noise ladder (sigma_max is measured from the data unless set)
    sigma_min: float = 0.01
    n_levels: int = 10
    n_maxdist: int = 2000  # data points used to measure the largest pairwise distance
    # annealed Langevin dynamics
    n_samples: int = 2000  # chains per sampler, and the size of the reference data set
    steps_per_level: int = 100  # T
    step_ratio: float = 0.3  # r = alpha_i / sigma_i^2 = eps / sigma_L^2
    plain_step: float = 0.1  # module 03's step size for plain Langevin
    sweep_sigma_max: tuple = (1.0, 3.0, 6.0)  # too-small sigma_max, beside the rule's value
    # the noise-conditional network (module 06's NoiseConditionalScoreNet)
    hidden: int = 128
    n_layers: int = 3
    embed_dim: int = 64
    train_steps: int = 2500
    batch_size: int = 512
    lr: float = 2e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    # MNIST (--images)
    image_train_steps: int = 1500
    image_batch: int = 64
    image_samples: int = 64
    image_steps_per_level: int = 5
    image_sigma_min: float = 0.01

    @classmethod
    def quick(cls) -> Config:
        return cls(n_maxdist=300, n_samples=400, steps_per_level=20, sweep_sigma_max=(1.0,),
                   hidden=64, train_steps=100, batch_size=256, warmup_steps=20, ema_decay=0.9,
                   image_train_steps=20, image_batch=16, image_samples=16,
                   image_steps_per_level=1)


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 07: noise schedules, annealed Langevin dynamics, NCSN.")
    group = parser.add_argument_group("module 07")
    group.add_argument("--steps-per-level", type=positive_int, default=None,
                       help="annealed Langevin steps T per noise level (default 100, quick 20)")
    group.add_argument("--step-ratio", type=positive_float, default=None,
                       help="r = alpha_i / sigma_i^2, below 4 (default 0.3)")
    group.add_argument("--train-steps", type=positive_int, default=None,
                       help="training steps of the 2D network (default 2500, quick 100)")
    group.add_argument("--images", action="store_true",
                       help="also train a small conv NCSN on MNIST and sample digits "
                            "(needs MNIST under the data root; several minutes on a CPU)")
    group.add_argument("--download", action="store_true",
                       help="with --images: try to download MNIST if it is missing")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 What went wrong in module 03
# Module 03 ran Langevin dynamics with the *exact* score of
# $p = 0.8\,\mathcal{N}((-5,-5), I) + 0.2\,\mathcal{N}((5,5), I)$ and got the weights wrong. Inside
# mode $k$ the responsibilities are 1 up to $e^{-50}$, so the score there is
# $-(x - \mu_k)$ whatever the weights are; the weights only matter in the empty region between
# the modes, which chains cross once in an astronomically long time. Each chain stays in the
# basin it started in.
#
# ## 2.2 Noise fills the gap
# Convolve with $\mathcal{N}(0, \sigma^2 I)$:
# $$ p_\sigma(x) = \sum_k w_k\, \mathcal{N}(x;\ \mu_k,\ (1 + \sigma^2) I). $$
# For $\sigma$ comparable to the distance between the modes the two bumps merge into one, and
# its shape (lopsided towards the heavy mode) carries the weights. Chains equilibrate there
# quickly; as $\sigma$ shrinks the bumps separate, each chain falls into one of them, and the
# fraction that falls each way is the mass of $p_\sigma$ on each side, which tends to
# $0.8 / 0.2$. **Annealing**: run Langevin at $\sigma_1 > \sigma_2 > \dots > \sigma_L$, each
# level starting from where the previous one ended.
#
# ## 2.3 How large must $\sigma_\max$ be? (NCSNv2, Technique 1)
# If $\sigma_1$ is small next to the distance between two data points, $p_{\sigma_1}$ still has
# separated modes, and the mass each chain reaches is decided by where it starts: the failure
# of 2.1 again. NCSNv2's rule is
# $$ \sigma_\max \approx \max_{i \ne j} |x_i - x_j| $$
# over the training set: then $p_{\sigma_\max}$ is close to $\mathcal{N}(0, \sigma_\max^2 I)$, the
# chains can start there, and every pair of points is linked. Section 4 measures the rule
# and shows what smaller values do.
#
# ## 2.4 How close must the levels be? (Technique 2)
# In $D$ dimensions $|x|$ for $x \sim \mathcal{N}(0, \sigma^2 I)$ concentrates at
# $\sigma\sqrt{D}$ with standard deviation about $\sigma/\sqrt{2}$: the mass lives in a thin
# shell. Chains leaving level $i-1$ (radius $\gamma\sigma_i\sqrt D$) must land where level $i$
# has mass. Asking that level $i$ puts about half its mass inside the 3-standard-deviation
# shell of level $i-1$, $|x| \in \gamma\sigma_i[\sqrt D - 3/\sqrt2,\ \sqrt D + 3/\sqrt2]$, and
# standardising with $|x| \approx \mathcal{N}(\sigma_i\sqrt D, \sigma_i^2/2)$ gives
# $$ C(\gamma, D) = \Phi\big(\sqrt{2D}(\gamma - 1) + 3\gamma\big)
#                 - \Phi\big(\sqrt{2D}(\gamma - 1) - 3\gamma\big) \approx 0.5 . $$
# For MNIST ($D = 784$) this gives $\gamma \approx 1.08$; for CIFAR-10 ($D = 3072$)
# $\gamma \approx 1.04$ (NCSNv2 used 232 levels from 50 to 0.01, ratio 1.037). In **2D the
# criterion cannot bind**: the lower argument $\gamma(\sqrt{2D} - 3) - \sqrt{2D}$ never rises
# to 0 when $\sqrt{2D} < 3$, so $C > 0.5$ for every ratio. Low-dimensional Gaussians are not
# thin shells, and consecutive levels overlap whatever $\gamma$ is. There the ratio is
# limited by mixing instead (2.6), and we use $L = 10$ as NCSN did for its 2D toy.
# Once $\gamma$ is fixed, $L = 1 + \log(\sigma_\max/\sigma_\min)/\log\gamma$.
#
# ## 2.5 Why the step scales with $\sigma^2$
# At level $i$ the score has size about $1/\sigma_i$ and the density varies on the scale
# $\sigma_i$. With $\alpha_i = r\sigma_i^2$ and
# $p_{\sigma_i} \approx \mathcal{N}(\mu, \sigma_i^2 I)$ near a mode, the Langevin step
# (module 03) is
# $$ x - \mu \leftarrow (1 - r/2)(x - \mu) + \sqrt{r}\,\sigma_i z, $$
# identical at every level once lengths are measured in units of $\sigma_i$: the same mixing
# per step and the same relative bias everywhere. Song and Ermon write
# $\alpha_i = \epsilon\,\sigma_i^2/\sigma_L^2$, so $\epsilon$ is the step at the last level and
# $r = \epsilon/\sigma_L^2$; we use both names.
#
# ## 2.6 How large a step, how many steps? (Technique 4)
# Take the same picture one step further: a chain arrives from level $i-1$ with variance
# $\gamma^2\sigma_i^2$ and runs $T$ steps towards $\mathcal{N}(0, \sigma_i^2 I)$. With
# $a = 1 - r/2$ the variance obeys $v \leftarrow a^2 v + r\sigma_i^2$, hence
# $$ \frac{v_T}{\sigma_i^2} = a^{2T}\big(\gamma^2 - s_\infty\big) + s_\infty, \qquad
#    s_\infty = \frac{r}{1 - a^2} = \frac{1}{1 - r/4}, $$
# where $s_\infty$ is module 03's ULA bias $v/(1 - \epsilon/(4v))$. NCSNv2 fixes $T$ by the
# budget and chooses $r$ to bring this ratio close to 1. That criterion only asks each chain to
# forget the previous level's *width*. Moving *mass between modes* (2.2) needs chains to
# cross a growing barrier while the modes separate, which takes more steps than relaxing a
# width: with $T = 100$ Technique 4 suggests $r \approx 0.07$, and Section 4 shows that a
# larger step, $r = 0.3$ (stationary variance 8% too large at each level, an error that
# vanishes at the small levels, where $\sigma_i^2$ is tiny next to the data's own variance),
# recovers the weights better.
#
# ## 2.7 The final denoising step
# The last level samples $p_{\sigma_L}$, i.e. data plus $\mathcal{N}(0, \sigma_L^2 I)$ noise.
# Tweedie's formula (module 04) removes it in one step:
# $$ x \leftarrow x + \sigma_L^2\, s(x, \sigma_L) = \mathbb{E}[x_0 \mid x]. $$
# In 2D with $\sigma_L = 0.01$ this changes nothing visible; on images, where $\sigma_L\sqrt{D}$
# is a noticeable grain, it removes the residual noise (Jolicoeur-Martineau et al. 2021).


# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Choosing the ladder (Sections 2.3 and 2.4)

# %%
def max_pairwise_distance(x: Tensor) -> float:
    """max_{i,j} |x_i - x_j| over x: (N, ...) flattened to (N, D) -> a number (Technique 1)."""
    flat = x.reshape(len(x), -1).double()
    return torch.cdist(flat, flat).max().item()


def overlap_criterion(gamma, dim: int):
    """C(gamma, D) = Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma).

    gamma: a number or an array; returns the same shape (Technique 2 of NCSNv2).
    """
    gamma = np.asarray(gamma, dtype=float)
    centre = math.sqrt(2 * dim) * (gamma - 1)  # shell of level i-1, in units of sigma_i / sqrt 2
    return stats.norm.cdf(centre + 3 * gamma) - stats.norm.cdf(centre - 3 * gamma)


def ratio_from_overlap(dim: int, target: float = 0.5) -> float | None:
    """The ratio gamma > 1 with C(gamma, D) = target, or None when no gamma reaches it.

    For sqrt(2D) <= 3 (D <= 4) C stays above 1/2 for every gamma: the criterion does not bind.
    """
    if math.sqrt(2 * dim) <= 3:
        return None
    # C(1) = Phi(3) - Phi(-3) = 0.997 > target, and C -> 0 as gamma grows: one root in between
    return optimize.brentq(lambda g: overlap_criterion(g, dim) - target, 1.0, 1e4, xtol=1e-12)


def overlap_monte_carlo(gamma: float, dim: int, n: int, generator: torch.Generator) -> float:
    """Fraction of x ~ N(0, I_D) (level i, sigma_i = 1) inside the 3-std shell of level i-1."""
    radius = torch.randn(n, dim, generator=generator, dtype=F64).norm(dim=1)
    lo = gamma * (math.sqrt(dim) - 3 / math.sqrt(2))
    hi = gamma * (math.sqrt(dim) + 3 / math.sqrt(2))
    return ((radius > lo) & (radius < hi)).double().mean().item()


def n_levels_for(sigma_max: float, sigma_min: float, gamma: float) -> int:
    """L = 1 + ceil(log(sigma_max / sigma_min) / log gamma): enough levels at ratio <= gamma."""
    return 1 + math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)


# %% [markdown]
# ## 3.2 Step sizes (Sections 2.5 and 2.6)

# %%
def step_sizes(sigmas: Tensor, eps: float) -> Tensor:
    """alpha_i = eps sigma_i^2 / sigma_L^2 for sigmas: (L,) decreasing -> (L,)."""
    return eps * (sigmas / sigmas[-1]) ** 2


def variance_ratio_after(r, n_steps: int, gamma: float):
    """v_T / sigma_i^2 = a^(2T) (gamma^2 - s_inf) + s_inf, a = 1 - r/2, s_inf = 1/(1 - r/4).

    The variance of a chain started at N(0, gamma^2 sigma_i^2) after T Langevin steps of size
    r sigma_i^2 on N(0, sigma_i^2) (Technique 4 in our step convention). r: number or array.
    """
    r = np.asarray(r, dtype=float)
    a = 1 - r / 2  # the contraction of one step
    s_inf = 1 / (1 - r / 4)  # stationary variance ratio: module 03's ULA bias
    return a ** (2 * n_steps) * (gamma**2 - s_inf) + s_inf


def technique4_step_ratio(n_steps: int, gamma: float) -> float:
    """The r in (0, 1] whose variance ratio after T steps is closest to 1 (fine log grid)."""
    r = np.geomspace(1e-5, 1.0, 20001)
    return float(r[np.abs(variance_ratio_after(r, n_steps, gamma) - 1).argmin()])


# %% [markdown]
# ## 3.3 Annealed Langevin dynamics as a generator
# The sampler yields the state after each level and, last, the denoised state, so
# `*levels, x = annealed_langevin_states(...)` gives both the trajectory over levels and the
# result. Each update is module 03's `langevin_step` with the step $\alpha_i$ of level $i$.
# Module 06's `annealed_langevin(score, x, sigmas, T, step_ratio)` is the same algorithm
# returning only the end point, with `step_ratio` $= \epsilon/\sigma_L^2$.

# %%
@torch.no_grad()
def annealed_langevin_states(score_fn: NoiseScoreFn, x: Tensor, sigmas: Tensor, eps: float,
                             n_steps: int, generator: torch.Generator | None = None,
                             denoise: bool = True, progress: bool = False) -> Iterator[Tensor]:
    """Song and Ermon (2019), Algorithm 1, plus the final denoising step.

    For i = 1..L, n_steps times: x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z with
    alpha_i = eps sigma_i^2 / sigma_L^2; yields x after each level (L states), then, if
    ``denoise``, x + sigma_L^2 s(x, sigma_L) (one more state).
    score_fn(x: (N, ...), sigma: (N,)) -> (N, ...); x: (N, ...) the start, e.g.
    sigma_1 * N(0, I); sigmas: (L,) decreasing; eps: the step at sigma_L.
    """
    alphas = step_sizes(sigmas.double(), eps).tolist()
    levels = list(zip(sigmas.tolist(), alphas))
    for sigma, alpha in tqdm(levels, desc="annealed Langevin", disable=not progress,
                             mininterval=0.5):
        level = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(n_steps):
            # x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z  (module 03's step)
            x = langevin03.langevin_step(x, score_fn(x, level), alpha, generator)
        yield x
    if denoise:
        # Tweedie: E[x0 | x] = x + sigma_L^2 s(x, sigma_L)
        yield x + sigma**2 * score_fn(x, level)


def annealed_langevin(score_fn: NoiseScoreFn, x: Tensor, sigmas: Tensor, eps: float,
                      n_steps: int, generator: torch.Generator | None = None,
                      denoise: bool = True) -> Tensor:
    """The last state of annealed_langevin_states: (N, ...) samples."""
    *_, x = annealed_langevin_states(score_fn, x, sigmas, eps, n_steps, generator, denoise)
    return x


def prior_sample(n: int, shape: tuple, sigma_max: float, generator: torch.Generator,
                 dtype=F64) -> Tensor:
    """x ~ N(0, sigma_max^2 I) of shape (n, *shape): approximately p_{sigma_max} (2.3)."""
    return sigma_max * torch.randn(n, *shape, generator=generator, dtype=dtype)


# %% [markdown]
# ## 3.4 A small convolutional NCSN for images
# A two-scale U-Net: $28 \to 14 \to 7$ and back with skip connections, group norm and SiLU.
# The level enters as module 06's Gaussian Fourier features of $\log\sigma$, projected to a
# per-channel bias in every block, and the output is divided by $\sigma$ (NCSNv2's trick,
# module 06). About 0.2 M parameters: a demonstration that runs on a CPU, not a model for
# good digits (module 09 builds that).

# %%
class ConvBlock(nn.Module):
    """conv 3x3 -> GroupNorm -> + Linear(emb) per channel -> SiLU.

    (N, C_in, H, W), emb (N, E) -> (N, C_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, c_out)
        self.cond = nn.Linear(emb_dim, c_out)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.norm(self.conv(h))
        return nn.functional.silu(h + self.cond(emb)[:, :, None, None])


class SmallConvScoreNet(nn.Module):
    """s(x, sigma) = UNet(x, Fourier(log sigma)) / sigma for images x: (N, C, H, W), H, W % 4 == 0.

    forward(x: (N, C, H, W), sigma: (N,) or a number) -> (N, C, H, W).
    """

    def __init__(self, channels: int = 1, width: int = 32, emb_dim: int = 64,
                 generator: torch.Generator | int | None = 0):
        super().__init__()
        w = width
        self.embed = nn.Sequential(nets06.GaussianFourierFeatures(emb_dim, 16.0, generator),
                                   nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = ConvBlock(channels, w, emb_dim)  # H
        self.down1 = ConvBlock(w, 2 * w, emb_dim, stride=2)  # H/2
        self.down2 = ConvBlock(2 * w, 2 * w, emb_dim, stride=2)  # H/4
        self.mid = ConvBlock(2 * w, 2 * w, emb_dim)
        self.up2 = nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1)  # H/4 -> H/2
        self.dec2 = ConvBlock(4 * w, w, emb_dim)  # [up, skip from down1]
        self.up1 = nn.ConvTranspose2d(w, w, 4, stride=2, padding=1)  # H/2 -> H
        self.dec1 = ConvBlock(2 * w, w, emb_dim)  # [up, skip from inp]
        self.out = nn.Conv2d(w, channels, 3, padding=1)

    def unscaled(self, x: Tensor, sigma) -> Tensor:
        """f(x, sigma), the network before the division by sigma: (N, C, H, W)."""
        sigma = nets06.as_batch(sigma, x)
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"height and width must be multiples of 4, got {tuple(x.shape)}")
        e = self.embed(sigma.log())
        h0 = self.inp(x, e)
        h1 = self.down1(h0, e)
        h = self.mid(self.down2(h1, e), e)
        h = self.dec2(torch.cat([self.up2(h), h1], dim=1), e)
        h = self.dec1(torch.cat([self.up1(h), h0], dim=1), e)
        return self.out(h)

    def forward(self, x: Tensor, sigma) -> Tensor:
        sigma = nets06.as_batch(sigma, x)
        return self.unscaled(x, sigma) / nets06.expand_to(sigma, x)  # s = f / sigma


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 The ladder for the 0.8/0.2 mixture, and NCSNv2's numbers
# Left: the overlap criterion $C(\gamma, D)$ for several dimensions, with the ratio where it
# crosses 0.5; for $D = 784$ a Monte Carlo check of the radius argument (dots). Middle: the 2D
# ladder, from the measured $\sigma_\max$ down to $\sigma_\min = 0.01$, with the steps
# $\alpha_i = r\sigma_i^2$. Right: Technique 4's variance ratio after $T$ steps against $r$.

# %%
def mixture_data() -> GaussianMixture:
    """0.8 N((-5,-5), I) + 0.2 N((5,5), I): module 03's failure case."""
    return GaussianMixture.separated_modes()


def make_ladder(sigma_max: float, cfg: Config) -> Tensor:
    """sigma_1 > ... > sigma_L, float64 (module 06's GeometricNoise)."""
    return nets06.GeometricNoise(cfg.sigma_min, sigma_max, cfg.n_levels).levels(F64)


def demo_schedule(run, cfg: Config, data: GaussianMixture) -> dict:
    seed = run.args.seed
    x = data.sample(cfg.n_maxdist, torch.Generator().manual_seed(seed + 1), dtype=F64)
    sigma_max = max_pairwise_distance(x)
    sigmas = make_ladder(sigma_max, cfg)
    gamma = (sigmas[0] / sigmas[1]).item()
    dims = (2, 10, 100, 784, 3072)
    gammas = {d: ratio_from_overlap(d) for d in dims}
    g784 = gammas[784]
    mc784 = overlap_monte_carlo(g784, 784, 20_000, torch.Generator().manual_seed(seed + 2))
    r4 = technique4_step_ratio(cfg.steps_per_level, gamma)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    grid = np.linspace(1.0, 3.0, 400)
    for d in dims:
        (line,) = ax.plot(grid, overlap_criterion(grid, d), label=f"D = {d}")
        if gammas[d] is not None:
            ax.plot([gammas[d]], [0.5], "o", color=line.get_color())
    check = np.array([1.02, 1.05, g784, 1.12, 1.2])
    mc = [overlap_monte_carlo(g, 784, 4000, torch.Generator().manual_seed(seed + 3))
          for g in check]
    ax.plot(check, mc, "kx", ms=7, label="Monte Carlo, D = 784")
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set(xscale="log", xlabel=r"ratio $\gamma = \sigma_{i-1}/\sigma_i$",
           ylabel=r"overlap $C(\gamma, D)$", title="Technique 2: choosing the ratio")
    ax.legend(fontsize=8)

    ax = axes[1]
    i = np.arange(1, cfg.n_levels + 1)
    alphas = step_sizes(sigmas, cfg.step_ratio * sigmas[-1].item() ** 2)
    ax.semilogy(i, sigmas.numpy(), "o-", label=r"$\sigma_i$")
    ax.semilogy(i, alphas.numpy(), "s-", label=r"step $\alpha_i = r\,\sigma_i^2$")
    ax.axhline(1.0, color="gray", ls=":", label="std of each mode (1)")
    ax.set(xlabel="level i", ylabel="value",
           title=f"2D ladder: $\\sigma_{{max}}$ = {sigma_max:.1f}, $\\gamma$ = {gamma:.2f}, "
                 f"L = {cfg.n_levels}")
    ax.legend(fontsize=8)

    ax = axes[2]
    r = np.geomspace(1e-3, 2.0, 400)
    ax.semilogx(r, variance_ratio_after(r, cfg.steps_per_level, gamma),
                label=f"T = {cfg.steps_per_level}, $\\gamma$ = {gamma:.2f}")
    ax.semilogx(r, 1 / (1 - r / 4), "k:", label=r"stationary $1/(1 - r/4)$")
    ax.axvline(r4, color="tab:green", ls="--", label=f"Technique 4: r = {r4:.3f}")
    ax.axvline(cfg.step_ratio, color="tab:red", ls="--", label=f"used: r = {cfg.step_ratio:g}")
    ax.set(ylim=(0.9, 1.6), xlabel=r"$r = \alpha_i / \sigma_i^2 = \epsilon / \sigma_L^2$",
           ylabel=r"$v_T / \sigma_i^2$", title="Technique 4: variance after T steps")
    ax.legend(fontsize=8)
    run.save(fig, "noise_schedule")
    return {"sigma_max": sigma_max, "sigmas": sigmas, "gamma": gamma, "gammas": gammas,
            "overlap_mc_784": mc784, "technique4_r": r4,
            "variance_ratio_used": float(variance_ratio_after(cfg.step_ratio,
                                                              cfg.steps_per_level, gamma))}


# %% [markdown]
# ## 4.2 Plain Langevin against annealed Langevin, with the exact scores
# All three samplers start from the same $N$ points of $\mathcal{N}(0, \sigma_\max^2 I)$ and run
# $L \cdot T$ steps: plain Langevin (module 03's `langevin`, step 0.1, the data score),
# annealed Langevin with the exact $\nabla\log p_{\sigma_i}$, and a sweep of too-small
# $\sigma_\max$. The recovered weight is the fraction of samples whose most responsible
# component is the heavy one (module 03's `mode_fractions`).

# %%
def sample_quality(x: Tensor, reference: Tensor, seed: int) -> dict:
    """SW_2 (256 fixed directions) and MMD^2 (bandwidth 1) of x against reference, both (N, 2)."""
    sw = sliced_wasserstein(x, reference, 256, generator=torch.Generator().manual_seed(seed))
    return {"sw": sw, "mmd": mmd_rbf(x, reference, bandwidth=1.0)}


def demo_exact_annealing(run, cfg: Config, data: GaussianMixture, sched: dict) -> dict:
    seed = run.args.seed
    sigmas, sigma_max = sched["sigmas"], sched["sigma_max"]
    eps = cfg.step_ratio * sigmas[-1].item() ** 2
    start = prior_sample(cfg.n_samples, (2,), sigma_max, torch.Generator().manual_seed(seed + 4))
    n_total = cfg.n_levels * cfg.steps_per_level

    *_, plain = langevin03.langevin(data.score, start, cfg.plain_step, n_total,
                                    torch.Generator().manual_seed(seed + 5))
    states = list(annealed_langevin_states(nets06.exact_score_fn(data), start, sigmas, eps,
                                           cfg.steps_per_level,
                                           torch.Generator().manual_seed(seed + 5),
                                           progress=True))
    sweep = {}
    for s_max in tqdm(cfg.sweep_sigma_max, desc="sigma_max sweep", mininterval=0.5):
        lad = make_ladder(s_max, cfg)
        x0 = prior_sample(cfg.n_samples, (2,), s_max, torch.Generator().manual_seed(seed + 4))
        x = annealed_langevin(nets06.exact_score_fn(data), x0, lad,
                              cfg.step_ratio * lad[-1].item() ** 2, cfg.steps_per_level,
                              torch.Generator().manual_seed(seed + 5))
        sweep[s_max] = langevin03.mode_fractions(x, data)[0].item()
    sweep[sigma_max] = langevin03.mode_fractions(states[-1], data)[0].item()
    return {"start": start, "plain": plain, "exact_states": states, "sweep": sweep,
            "w_plain": langevin03.mode_fractions(plain, data).tolist(),
            "w_exact": langevin03.mode_fractions(states[-1], data).tolist(),
            "w_exact_levels": [langevin03.mode_fractions(s, data)[0].item() for s in states],
            "w_start": langevin03.mode_fractions(start, data)[0].item(),
            "denoise_shift": (states[-1] - states[-2]).norm(dim=1).mean().item()}


# %% [markdown]
# ## 4.3 A trained noise-conditional network
# Module 06's `NoiseConditionalScoreNet` (Fourier features of $\log\sigma$, output divided by
# $\sigma$), trained with its `training_loop` on the $\sigma^2$-weighted loss over our ten levels,
# with warm-up, clipping and an EMA of the weights; the EMA weights sample.

# %%
def train_ncsn(run, cfg: Config, data: GaussianMixture, sigmas: Tensor) -> dict:
    seed = run.args.seed
    torch.manual_seed(seed)
    model = nets06.NoiseConditionalScoreNet(dim=2, hidden=cfg.hidden, embed_dim=cfg.embed_dim,
                                            n_layers=cfg.n_layers, generator=seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, nets06.warmup_lr_lambda(cfg.warmup_steps))
    ema = nets06.EMA(model, cfg.ema_decay)
    gen = torch.Generator().manual_seed(seed + 6)
    levels = sigmas.float()
    loop = nets06.training_loop(
        model, opt, lambda mdl, x0: nets06.noise_conditional_loss(mdl, x0, levels, gen),
        lambda: data.sample(cfg.batch_size, gen, dtype=torch.float32), cfg.train_steps,
        scheduler=sched, ema=ema, grad_clip=cfg.grad_clip)
    losses = []
    bar = tqdm(loop, total=cfg.train_steps, desc="training NCSN", mininterval=0.5)
    for out in bar:
        losses.append(out["loss"])
        if out["step"] % 50 == 0:
            bar.set_postfix(loss=f"{out['loss']:.3f}")
    return {"model": ema.averaged(model), "losses": np.array(losses)}


def learned_score_fn(model: nn.Module) -> NoiseScoreFn:
    """The float32 network as a float64 score function (x: (N, D), sigma: (N,))."""
    return lambda x, sigma: model(x.float(), sigma.float()).to(x.dtype)


def demo_learned(run, cfg: Config, data: GaussianMixture, sched: dict, exact: dict) -> dict:
    seed = run.args.seed
    sigmas = sched["sigmas"]
    trained = train_ncsn(run, cfg, data, sigmas)
    eps = cfg.step_ratio * sigmas[-1].item() ** 2
    states = list(annealed_langevin_states(learned_score_fn(trained["model"]), exact["start"],
                                           sigmas, eps, cfg.steps_per_level,
                                           torch.Generator().manual_seed(seed + 5)))
    reference = data.sample(cfg.n_samples, torch.Generator().manual_seed(seed + 7), dtype=F64)
    floor_set = data.sample(cfg.n_samples, torch.Generator().manual_seed(seed + 8), dtype=F64)
    quality = {name: sample_quality(x, reference, seed) for name, x in
               [("data (floor)", floor_set), ("plain Langevin", exact["plain"]),
                ("annealed, exact", exact["exact_states"][-1]),
                ("annealed, learned", states[-1])]}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = np.arange(1, len(trained["losses"]) + 1)
    ax.plot(steps, trained["losses"], lw=0.5, alpha=0.4, label="per step")
    k = max(1, len(steps) // 50)
    smooth = np.convolve(trained["losses"], np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, lw=2, label=f"running mean ({k} steps)")
    ax.set(xlabel="training step", ylabel=r"loss $\frac{1}{2}E|\sigma s_\theta + z|^2$",
           title="NCSN training on the 0.8/0.2 mixture (10 levels)", yscale="log")
    ax.legend()
    run.save(fig, "training_loss")
    return {"learned_states": states, "quality": quality,
            "w_learned": langevin03.mode_fractions(states[-1], data).tolist(),
            "w_learned_levels": [langevin03.mode_fractions(s, data)[0].item() for s in states],
            "final_loss": float(trained["losses"][-max(1, len(steps) // 10):].mean())}


# %% [markdown]
# ## 4.4 The weights, side by side
# Left three panels: the samples of each sampler over the data density, with the recovered
# weights in the titles. Right: the weight of the heavy mode after each level of annealing. At
# $\sigma_1$ it is the mass of $p_{\sigma_1}$ on the heavy side of the basin boundary (about
# 0.6); it rises while the bumps separate and freezes once the barrier between them is too high
# to cross in $T$ steps, a little below 0.8 (the residual error of a finite $T$). The crosses
# show where each $\sigma_\max$ of the sweep ends: too small, and the chains are stuck in their
# starting basins as in module 03.

# %%
def basin_mass(data: GaussianMixture, sigma: float) -> float:
    """Mass of p_sigma on the heavy mode's side of the data's basin boundary (2D, 2 modes).

    Along u = (1, 1)/sqrt 2 the modes sit at -/+ 5 sqrt 2 with std sqrt(1 + sigma^2); the
    boundary is x_1 + x_2 = ln(w_1/w_2)/10, i.e. u = ln(w_1/w_2)/(10 sqrt 2).
    """
    w1, w2 = data.weights.tolist()
    c = math.log(w1 / w2) / (10 * math.sqrt(2))
    std = math.sqrt(1 + sigma**2)
    m = 5 * math.sqrt(2)
    return w1 * stats.norm.cdf((c + m) / std) + w2 * stats.norm.cdf((c - m) / std)


def demo_mode_weights(run, cfg: Config, data: GaussianMixture, sched: dict, exact: dict,
                      learned: dict) -> dict:
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    lim = (-12.0, 12.0)
    panels = [("plain Langevin (module 03)", exact["plain"], exact["w_plain"]),
              ("annealed, exact scores", exact["exact_states"][-1], exact["w_exact"]),
              ("annealed, learned NCSN", learned["learned_states"][-1], learned["w_learned"])]
    for ax, (name, x, w) in zip(axes, panels):
        plot_samples_over_density(ax, x[:1000], data.log_prob, xlim=lim, ylim=lim, size=4,
                                  alpha=0.5, label=f"samples ({min(1000, len(x))} shown)",
                                  title=f"{name}\nweights {w[0]:.3f} / {w[1]:.3f} "
                                        f"(true 0.8 / 0.2)")
        ax.legend(loc="upper left", markerscale=3, fontsize=8)
    ax = axes[3]
    sig = sched["sigmas"].numpy()
    ax.semilogx(sig, exact["w_exact_levels"][:-1], "o-", label="annealed, exact scores")
    ax.semilogx(sig, learned["w_learned_levels"][:-1], "s-", label="annealed, learned NCSN")
    ax.semilogx(sig, [basin_mass(data, s) for s in sig], "k:",
                label=r"equilibrium: mass of $p_{\sigma}$ on the heavy side")
    ax.axhline(0.8, color="k", ls="--", lw=1, label="true weight 0.8")
    ax.axhline(exact["w_plain"][0], color="tab:red", ls="-.", label="plain Langevin")
    for s_max, w in exact["sweep"].items():
        ax.plot([s_max], [w], "x", color="tab:purple", ms=9)
    ax.plot([], [], "x", color="tab:purple", label=r"end weight for that $\sigma_{max}$")
    ax.invert_xaxis()
    ax.set(ylim=(0.4, 0.9), xlabel=r"noise level $\sigma_i$ (annealing runs right to left)",
           ylabel="fraction in the heavy mode (-5, -5)", title="Weights during annealing")
    ax.legend(fontsize=8, loc="lower left")
    run.save(fig, "mode_weights")
    return {}


# %% [markdown]
# ## 4.5 Samples at each noise level
# Top row: the exact-score chains after levels 1, 3, 5, 7 and 10 and after the denoising step,
# over the density $p_{\sigma_i}$ they are meant to sample; bottom row: the learned network.
# The cloud starts wide and centred, turns lopsided, splits, and contracts onto the modes.

# %%
def demo_levels(run, cfg: Config, data: GaussianMixture, sched: dict, exact: dict,
                learned: dict) -> dict:
    sigmas = sched["sigmas"].tolist()
    L = len(sigmas)
    show = sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
    fig, axes = plt.subplots(2, len(show) + 1, figsize=(3.4 * (len(show) + 1), 7.4))
    lim = (-30.0, 30.0)
    for row, (name, states) in enumerate([("exact", exact["exact_states"]),
                                          ("learned", learned["learned_states"])]):
        for col, i in enumerate(show + [L]):
            ax = axes[row, col]
            sigma = sigmas[min(i, L - 1)]
            box = lim if i < L // 2 else (-10.0, 10.0)
            density = data.perturbed(sigma) if i < L else data
            title = (f"{name}: level {i + 1}, $\\sigma$ = {sigma:.3g}" if i < L
                     else f"{name}: after denoising")
            plot_samples_over_density(ax, states[i][:800], density.log_prob, xlim=box,
                                      ylim=box, size=2, alpha=0.5, label=None, title=title,
                                      n_grid=120)
    fig.suptitle("Annealed Langevin: samples after each noise level, over $p_{\\sigma_i}$")
    run.save(fig, "samples_per_level")
    return {}


# %% [markdown]
# ## 4.6 Optional: MNIST with a small conv NCSN (`--images`)
# The same recipe on $28\times28$ images in $[0, 1]$: $\sigma_\max$ from the largest pairwise
# distance of 2,000 training digits, $\gamma$ from the overlap criterion at $D = 784$, $L$ from
# both, $T = 5$ steps per level, step ratio from Technique 4. The figure shows the samples at a
# few levels and after the denoising step, which removes the last level's grain. A CPU and a
# few minutes give blurry but digit-like strokes; module 09 does this properly.

# %%
def load_images_or_exit(args):
    """MNIST's training set, or exit with the data-root message (never a traceback)."""
    try:
        return load_mnist(args.data_dir, train=True, download=args.download)
    except DataNotFoundError as err:
        sys.exit(f"error: --images needs MNIST.\n{err}\n(data root: "
                 f"{resolve_data_root(args.data_dir)}; add --download to try fetching it)")


def demo_images(run, cfg: Config, train) -> dict:
    seed = run.args.seed
    images = torch.stack([train[i][0] for i in range(min(len(train), 10_000))])  # (n, 1, 28, 28)
    gen = torch.Generator().manual_seed(seed + 10)
    subset = images[torch.randperm(len(images), generator=gen)[:2000]]
    sigma_max = max_pairwise_distance(subset)
    gamma = ratio_from_overlap(images[0].numel())
    L = n_levels_for(sigma_max, cfg.image_sigma_min, gamma)
    sigmas = nets06.GeometricNoise(cfg.image_sigma_min, sigma_max, L).levels(torch.float32)
    gamma = (sigmas[0] / sigmas[1]).item()
    r = technique4_step_ratio(cfg.image_steps_per_level, gamma)
    print(f"MNIST: sigma_max = {sigma_max:.2f}, gamma = {gamma:.4f}, L = {L}, "
          f"T = {cfg.image_steps_per_level}, r = {r:.3f}")

    torch.manual_seed(seed)
    model = SmallConvScoreNet(generator=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, nets06.warmup_lr_lambda(100))
    ema = nets06.EMA(model, 0.99)

    def batch():
        return images[torch.randint(len(images), (cfg.image_batch,), generator=gen)]

    loop = nets06.training_loop(
        model, opt, lambda mdl, x0: nets06.noise_conditional_loss(mdl, x0, sigmas, gen),
        batch, cfg.image_train_steps, scheduler=lr, ema=ema, grad_clip=1.0)
    losses = []
    bar = tqdm(loop, total=cfg.image_train_steps, desc="training MNIST NCSN", mininterval=1)
    for out in bar:
        losses.append(out["loss"])
        if out["step"] % 20 == 0:
            bar.set_postfix(loss=f"{out['loss']:.1f}")
    net = ema.averaged(model)
    x0 = prior_sample(cfg.image_samples, (1, 28, 28), sigma_max, gen, dtype=torch.float32)
    states = list(annealed_langevin_states(net, x0, sigmas, r * sigmas[-1].item() ** 2,
                                           cfg.image_steps_per_level, gen, progress=True))
    show = sorted({0, L // 2, (3 * L) // 4, L - 1, L})
    fig, axes = plt.subplots(1, len(show) + 1, figsize=(4 * (len(show) + 1), 4.6))
    for ax, i in zip(axes, show):
        title = f"level {i + 1}, $\\sigma$ = {sigmas[i]:.3g}" if i < L else "after denoising"
        lo, hi = (states[i].min().item(), states[i].max().item()) if i < L // 2 else (0, 1)
        image_grid(ax, states[i][:16], nrow=4, title=title, value_range=(lo, hi))
    axes[-1].plot(losses, lw=0.5)
    axes[-1].set(xlabel="training step", ylabel="loss", yscale="log", title="training loss")
    fig.suptitle(f"MNIST NCSN: L = {L}, $\\gamma$ = {gamma:.3f}, T = "
                 f"{cfg.image_steps_per_level}, {cfg.image_train_steps} training steps")
    run.save(fig, "mnist_samples")
    return {"mnist": {"sigma_max": sigma_max, "gamma": gamma, "L": L, "r": r,
                      "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
                      "residual_noise": (states[-1] - states[-2]).flatten(1).norm(dim=1).mean()
                      .item()}}


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_07_exercises.py`. A skipped test means "not attempted yet"; a failure
# says what was expected and what came back. Reference answers:
# `solutions/07_noise_conditional_scores.py`.

# %%
def exercise_overlap_criterion(gamma: float, dim: int) -> float:
    """Exercise 7.1: NCSNv2's overlap criterion C(gamma, D).

    Level i has x ~ N(0, sigma_i^2 I_D), with |x| approximately N(sigma_i sqrt(D), sigma_i^2/2).
    Return the probability that |x| falls inside the 3-standard-deviation shell of level
    i-1 (sigma_{i-1} = gamma sigma_i), i.e. inside
        [gamma sigma_i (sqrt(D) - 3/sqrt(2)),  gamma sigma_i (sqrt(D) + 3/sqrt(2))],
    computed with the normal approximation (not by sampling).

    Args: gamma > 1 (float), dim = D (int). Returns a float in [0, 1].
    Example: gamma = 1 gives Phi(3) - Phi(-3) = 0.9973 for every D.
    Hint: standardise the two ends with (r - sigma_i sqrt(D)) / (sigma_i / sqrt(2)); sigma_i
    cancels. scipy.stats.norm.cdf is Phi.
    """
    # TODO: the two standardised ends, then Phi(upper) - Phi(lower).
    raise NotImplementedError("Exercise 7.1: implement exercise_overlap_criterion")


def exercise_annealed_step_sizes(sigmas: Tensor, eps: float) -> Tensor:
    """Exercise 7.2: the step size of every level of annealed Langevin dynamics.

    Args: sigmas (L,) decreasing noise levels; eps the step size at the last level sigma_L.
    Returns: (L,) alpha_i with alpha_i / sigma_i^2 the same at every level and alpha_L = eps.
    Example: sigmas = [4, 2, 1], eps = 0.1 -> [1.6, 0.4, 0.1].
    Hint: why sigma^2 and not sigma? Section 2.5.
    """
    # TODO: one line.
    raise NotImplementedError("Exercise 7.2: implement exercise_annealed_step_sizes")


def exercise_variance_ratio(r: float, n_steps: int, gamma: float) -> float:
    """Exercise 7.3: Technique 4, the variance of a chain after T steps at one level.

    A chain starts at x ~ N(0, gamma^2 sigma^2 I) and takes T steps
    x <- x + (alpha/2) (-x / sigma^2) + sqrt(alpha) z with alpha = r sigma^2 (the exact score
    of N(0, sigma^2 I)). Return Var(x_T) / sigma^2 in closed form.

    Args: r in (0, 4), n_steps = T >= 0, gamma >= 1. Returns a float.
    Example: T = 0 gives gamma^2; T -> infinity gives module 03's 1 / (1 - r/4).
    Hint: v <- a^2 v + r sigma^2 with a = 1 - r/2; sum the geometric series.
    """
    # TODO: a, the fixed point, and the geometric decay towards it.
    raise NotImplementedError("Exercise 7.3: implement exercise_variance_ratio")


def exercise_denoise(x: Tensor, score: Tensor, sigma: float) -> Tensor:
    """Exercise 7.4: the final denoising step of annealed Langevin dynamics.

    Args: x (N, ...) samples of p_sigma; score (N, ...) the score s(x, sigma) at x; sigma the
    last noise level. Returns (N, ...) E[x_0 | x] by Tweedie's formula.
    Example: data N(0, 1) in 1D, sigma = 1: s(x) = -x / 2, so x = 2 becomes 1.
    Hint: module 04.
    """
    # TODO: one line.
    raise NotImplementedError("Exercise 7.4: implement exercise_denoise")


def exercise_num_levels(sigma_max: float, sigma_min: float, gamma: float) -> int:
    """Exercise 7.5: how many levels a geometric ladder needs.

    Return the smallest L such that sigma_max * gamma^-(L-1) <= sigma_min (the ladder reaches
    sigma_min with ratio at most gamma between neighbours).
    Example: sigma_max = 8, sigma_min = 1, gamma = 2 -> 4 (8, 4, 2, 1); gamma = 1.9 -> 5.
    Hint: logarithms; beware of round-off when the ratio is an exact power (add -1e-9 before
    rounding up).
    """
    # TODO: L - 1 = ceil(log(sigma_max / sigma_min) / log(gamma)).
    raise NotImplementedError("Exercise 7.5: implement exercise_num_levels")


# %% [markdown]
# ## Summary
# - Plain Langevin cannot weigh separated modes: the score inside a mode ignores the weights.
#   Noise merges the modes, and annealing from $\sigma_\max$ down carries the right masses into
#   them: 0.8/0.2 recovered within a few hundredths, with exact and with learned scores.
# - Choose $\sigma_\max$ about the largest pairwise data distance; too small a $\sigma_\max$
#   leaves the chains in their starting basins.
# - Choose $\gamma$ from the overlap criterion $C(\gamma, D) \approx 0.5$: about 1.08 for MNIST,
#   1.04 for CIFAR-10; in 2D it does not bind. Then
#   $L = 1 + \log(\sigma_\max/\sigma_\min)/\log\gamma$.
# - Scale the step like $\sigma_i^2$: every level then mixes alike. Technique 4 picks the step
#   from the variance after $T$ steps; moving mass between modes needs somewhat larger steps.
# - Finish with $x + \sigma_L^2 s(x, \sigma_L)$ (Tweedie) to remove the last level's noise.


# %%
def fmt_weights(w) -> str:
    return f"{w[0]:.3f} / {w[1]:.3f}"


def main(argv=None):
    parser = make_parser()
    run = start_run(parser, MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    for flag in ("steps_per_level", "step_ratio", "train_steps"):
        if getattr(run.args, flag) is not None:
            setattr(cfg, flag, getattr(run.args, flag))
    if cfg.step_ratio >= 4:
        parser.error(f"argument --step-ratio: must be below 4 (the Langevin step is unstable "
                     f"for r >= 4), got {cfg.step_ratio:g}")
    # check for MNIST first: a missing data set should stop the run before any work
    mnist = load_images_or_exit(run.args) if run.args.images else None
    data = mixture_data()

    r = demo_schedule(run, cfg, data)
    exact = demo_exact_annealing(run, cfg, data, r)
    learned = demo_learned(run, cfg, data, r, exact)
    demo_mode_weights(run, cfg, data, r, exact, learned)
    demo_levels(run, cfg, data, r, exact, learned)
    if mnist is not None:
        r.update(demo_images(run, cfg, mnist))

    q = learned["quality"]
    ex, le = q["annealed, exact"], q["annealed, learned"]
    rows = [
        ("sigma_max = max pairwise distance", f"{r['sigma_max']:.2f}",
         f"about |mu_1 - mu_2| + spread = {10 * math.sqrt(2):.1f} + a few"),
        ("ratio gamma used (2D), L, sigma_min", f"{r['gamma']:.3f}, {cfg.n_levels}, "
         f"{cfg.sigma_min:g}", "C(gamma, 2) > 0.5 for every gamma: does not bind"),
        ("gamma from C(gamma, D) = 0.5, D = 784 / 3072",
         f"{r['gammas'][784]:.4f} / {r['gammas'][3072]:.4f}",
         "NCSNv2 CIFAR-10: (50/0.01)^(1/231) = 1.037"),
        ("Monte Carlo overlap at that gamma, D = 784", f"{r['overlap_mc_784']:.3f}",
         "0.5 (normal approximation of |x|)"),
        ("step ratio r used / Technique 4's r", f"{cfg.step_ratio:g} / {r['technique4_r']:.3f}",
         f"variance ratio after T steps {r['variance_ratio_used']:.3f} (Technique 4: ~1)"),
        ("weights: plain Langevin (03), exact score", fmt_weights(exact["w_plain"]),
         f"stuck near the start split {exact['w_start']:.2f}; true 0.8 / 0.2"),
        ("weights: annealed, exact scores", fmt_weights(exact["w_exact"]),
         "0.8 / 0.2 within 0.05 (T = 100; --quick's T = 20 is short)"),
        ("weights: annealed, learned NCSN", fmt_weights(learned["w_learned"]),
         "0.8 / 0.2 within 0.05"),
    ]
    for s_max, w in exact["sweep"].items():
        rows.append((f"weight of heavy mode, sigma_max = {s_max:.3g}", f"{w:.3f}",
                     "0.8 needs sigma_max ~ max distance"))
    for name, v in q.items():
        rows.append((f"SW2 / MMD^2 to data: {name}", f"{v['sw']:.3f} / {v['mmd']:.1e}",
                     {"data (floor)": "the floor (two data draws)",
                      "annealed, learned": "within 2x of the exact sampler's SW2"}.get(name, "")))
    rows += [
        ("SW2 ratio learned / exact sampler", f"{le['sw'] / ex['sw']:.2f}", "< 2"),
        ("mean shift of the denoising step (2D)", f"{exact['denoise_shift']:.1e}",
         f"about sigma_L^2 |s| ~ {cfg.sigma_min**2:g} x a few"),
        ("final training loss (weighted)", f"{learned['final_loss']:.3f}", "<= D/2 = 1"),
    ]
    if "mnist" in r:
        mn = r["mnist"]
        rows.append(("MNIST: sigma_max, gamma, L, r", f"{mn['sigma_max']:.2f}, "
                     f"{mn['gamma']:.4f}, {mn['L']}, {mn['r']:.3f}", "gamma ~ 1.08 (D = 784)"))
        rows.append(("MNIST: |denoising shift| per image", f"{mn['residual_noise']:.3f}",
                     "the last level's grain, ~ sigma_L sqrt(D) = 0.28"))
    run.finish(rows, globals(), "07")
    return {"schedule": r, "exact": exact, "learned": learned}


if __name__ == "__main__":
    main()
