"""
FILE: 06_score_networks.py
DIFFICULTY: Intermediate
ESTIMATED TIME: 2 hours
PREREQUISITES: 02_score_matching_theory.py (DSM = ESM + constant),
               03_langevin_dynamics.py (Langevin sampling),
               04_denoising_score_matching.py (an MLP score trained at one noise level),
               PyTorch nn.Module and optimisers

LEARNING OBJECTIVES:
- Build score networks that take the noise level as an input: a plain MLP fed (x, log sigma),
  and MLPs conditioned through Gaussian Fourier features or a sinusoidal embedding.
- Derive why the score's magnitude falls like 1/sigma, and build that law into the network by
  dividing its output by sigma (NCSNv2's output scaling).
- Derive the sigma^2 loss weighting, the loss floor of each noise level, and see that weighting
  plus output scaling turn DSM into noise prediction with an O(1) target at every level.
- Train with the three standard stabilisers: learning-rate warm-up, gradient clipping and an
  exponential moving average (EMA) of the weights; measure what output scaling and EMA do to
  sample quality.
- Debug a score model the way practitioners do: plot |score| against sigma, monitor the loss
  of every noise level against its floor, and test on 2D data with exact scores first.

MATHEMATICAL BACKGROUND:
- Perturbation:  x = x0 + sigma z,  z ~ N(0, I),  x0 ~ p_data;  p_sigma = p_data * N(0, sigma^2 I)
- DSM target:    grad_x log p(x | x0) = -z / sigma,   E|z / sigma|^2 = D / sigma^2
- True score:    s*_sigma(x) = E[-z / sigma | x]   =>   E|s*_sigma|^2 <= D / sigma^2  (Jensen)
                 Gaussian data N(m, C):  E|s*_sigma|^2 = tr((C + sigma^2 I)^{-1})
- Gaussian Fourier features:  gamma(t) = [sin(2 pi W t), cos(2 pi W t)],  W_j ~ N(0, scale^2)
                 gamma(t) . gamma(t') / (E/2)  ->  exp(-2 pi^2 scale^2 (t - t')^2)
- Sinusoidal embedding:  e(t) = [sin(w_i t), cos(w_i t)],  w_i = max_period^(-i / (E/2 - 1))
- Output scaling:  s_theta(x, sigma) = f_theta(x, sigma) / sigma
- Per-level loss, weight lambda(sigma) = sigma^2:
                 l(sigma) = 1/2 E | sigma s_theta(x, sigma) + z |^2
                          = 1/2 (D - sigma^2 E|s*_sigma|^2)  +  1/2 sigma^2 E|s_theta - s*_sigma|^2
                            (floor, in [0, D/2])              (excess = weighted Fisher divergence)
- Warm-up:  lr_k = lr * min(1, (k + 1) / K_warmup);   clipping:  g <- g * min(1, c / |g|)
- EMA:      theta_bar <- d theta_bar + (1 - d) theta,  i.e.
            theta_bar_n = d^n theta_0 + (1 - d) sum_{k=1}^{n} d^(n-k) theta_k

IMPLEMENTATION NOTES:
- The building blocks (GaussianFourierFeatures, SinusoidalEmbedding, TimeConditionalScoreNet,
  NoiseConditionalScoreNet, warmup_lr_lambda, optimizer_step, training_iterator,
  conditional_dsm_loss) are what modules 07-09 reuse through load_module("06"). Networks
  take x: (N, D); the output scaling broadcasts over x.ndim. The EMA of weights taught here,
  and `expand_to`, live in common/training.py (modules 03-09 share them); this module imports them.
- Everything is measured on a 2D mixture of eight Gaussians whose perturbed score is known in
  closed form at every sigma (common.datasets.GaussianMixture.perturbed_score): per-level loss
  floors, exact |score| curves, score errors and exact-score samples are all ground truth.
- Five networks are trained with the same optimiser, steps and batch size; they differ in one
  design choice each. The default run trains all five and samples from each in about 2.5
  minutes of CPU time (measured, single thread: 142 s on a quiet 2-core machine, 172 s on a
  busy one); --quick (a smoke run with undertrained networks) about 15 seconds.
- Everything runs on the CPU, whatever --device says (the run prints a note): the 2D networks
  are too small to gain from a GPU.
- Samples for "sample quality" come from annealed Langevin dynamics (a short version here;
  module 07 treats it in depth), scored by the sliced Wasserstein distance and MMD to fresh
  data, next to the distance between two independent data draws (the floor).

Run:
    python 06_score_networks.py           # figures go to outputs/06_score_networks/
    python 06_score_networks.py --quick   # a smoke run (undertrained) of about 15 seconds
    pytest tests/test_06_exercises.py -k your_answer  # check your answers
    pytest tests/test_06_score_networks.py

References:
- Y. Song and S. Ermon (2019). Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (NCSN, annealed Langevin dynamics, the sigma^2 weighting.)
- Y. Song and S. Ermon (2020). Improved techniques for training score-based generative models.
  NeurIPS. (NCSNv2: output scaling by 1/sigma, EMA, the choice of sigma_max.)
- Y. Song et al. (2021). Score-based generative modeling through stochastic differential
  equations. ICLR. (Gaussian Fourier features of the noise level in NCSN++.)
- M. Tancik et al. (2020). Fourier features let networks learn high frequency functions in low
  dimensional domains. NeurIPS. (The kernel of random Fourier features.)
- A. Vaswani et al. (2017). Attention is all you need; J. Ho, A. Jain, P. Abbeel (2020).
  Denoising diffusion probabilistic models. (The sinusoidal embedding.)
- P. Vincent (2011). A connection between score matching and denoising autoencoders.
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# `torch.nn` builds the networks; `common` provides the command line, the Gaussian mixture with
# exact perturbed scores, the sample-quality metrics (and the data-vs-data floor), the exercise
# machinery, and the two training helpers of Sections 3.1 and 3.6, `expand_to` and `EMA`.

# %%
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from common.cli import Count, Real, start_run
from common.cli import make_parser as shared_parser
from common.datasets import GaussianMixture
from common.metrics import distance_floor, mmd_rbf, off_mode_fraction, sliced_wasserstein
from common.plotting import grid_points, plot_samples_over_density
from common.progress import progress
from common.training import EMA, expand_to

MODULE = "06_score_networks"
Tensor = torch.Tensor
# A noise-conditional score: (x: (N, D), sigma: (N,)) -> (N, D)
NoiseScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    # the noise ladder sigma_1 > ... > sigma_L (geometric)
    sigma_max: float = 4.0  # about the largest distance between two data points
    sigma_min: float = 0.02  # well below the mixture components' std 0.15
    n_levels: int = 10
    # networks and training (the same for every variant)
    hidden: int = 128
    n_layers: int = 3
    embed_dim: int = 64
    train_steps: int = 2500
    batch_size: int = 512
    lr: float = 2e-3
    warmup_steps: int = 200
    grad_clip: float = 0.5  # above the typical gradient norm (~0.3): clips only the spikes
    ema_decay: float = 0.995  # window 1/(1-d) = 200 steps, short next to the 2500-step run
    # A second EMA of the full recipe with the decay long image runs use: its window
    # 1/(1-d) = 1000 steps is too long for 2500 steps, which Section 4.5 shows.
    slow_ema_decay: float = 0.999
    eval_every: int = 100  # steps between evaluations of raw and EMA weights
    n_eval: int = 2000  # points per noise level when measuring score errors
    n_val: int = 400  # validation points per level, evaluated every eval_every steps
    # annealed Langevin sampling
    n_samples: int = 2000  # samples per sampler, and the size of the reference data set
    mmd_bandwidth: float = 0.3  # fixed RBF bandwidth, about twice the components' std
    langevin_steps: int = 50  # steps per noise level
    step_ratio: float = 0.3  # alpha_i / sigma_i^2, the same at every level
    n_mmd_pairs: int = 20  # pairs of fresh data sets that measure the noise of MMD^2

    @classmethod
    def quick(cls) -> Config:
        return cls(hidden=64, train_steps=100, batch_size=256, warmup_steps=20, ema_decay=0.95,
                   slow_ema_decay=0.99, eval_every=25, n_eval=300, n_val=50, n_samples=500,
                   langevin_steps=10, n_mmd_pairs=4)


# An EMA decay d lies in [0, 1): d = 1 would never move from the initial weights.
EMA_DECAY = Real(0, 1, high_open=True, why="d = 1 would freeze the average at the initial weights")


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 06: score networks, output scaling, sigma^2 weighting, EMA.")
    # CPU time per unit at the default sizes (five networks, 2000 samples, 10 levels), from
    # --quick runs scaled to the default widths and sizes: a training step of every network
    # ~50 ms (measured 30 ms at --quick's width 64, batch 256), one Langevin step per level of
    # every sampler ~0.3 s (measured 0.13 s with --quick's 500 samples).
    parser.add_argument("--train-steps", type=Count(1, seconds_each=50e-3, unit="step"),
                        default=None,
                        help="training steps of every network (default 2500, or 100 with --quick)")
    parser.add_argument("--langevin-steps", type=Count(1, seconds_each=0.3, unit="step"),
                        default=None,
                        help="annealed Langevin steps per noise level (default 50, or 10 "
                             "with --quick)")
    parser.add_argument("--ema-decay", type=EMA_DECAY, default=None,
                        help="EMA decay d in [0, 1) (default 0.995, or 0.95 with --quick)")
    parser.add_argument("--slow-ema-decay", type=EMA_DECAY, default=None,
                        help="decay of the second, slower EMA of the full recipe, in [0, 1) "
                             "(default 0.999, or 0.99 with --quick)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 One network for every noise level
# Module 04 trained one MLP $s_\theta(x)$ per noise level. Sampling with annealing (module 07)
# and with SDEs (module 08) needs the perturbed score at *many* levels,
# $$ s_\theta(x, \sigma) \approx \nabla_x \log p_\sigma(x), \qquad
#    p_\sigma = p_\text{data} * \mathcal{N}(0, \sigma^2 I), $$
# so the noise level becomes an input. **Notation change:** module 04 wrote $x$ for clean data
# and $\tilde x$ for noisy data; in this module (and in module 08) $x_0$ is the clean point and
# $x = x_0 + \sigma z$ the noisy one, the network's input. Three questions decide how well
# such a network trains: how $\sigma$ enters the network (2.2-2.4), how large its output must
# be (2.5), and how the levels are weighted in the loss (2.6).
#
# ## 2.2 Feeding the noise level in
# The plainest choice appends $\log\sigma$ to $x$ as one more input of an MLP. It works, but
# one scalar input must steer every hidden unit, through a single column of the first weight
# matrix. The standard alternative **embeds** the scalar in a vector of $E$ features, turns
# that into a learned code $e$ of the level (one shared layer), and adds a learned projection
# of the code to *every* hidden layer:
# $$ e = \mathrm{SiLU}\big(A\,\mathrm{emb}(t) + a\big), \qquad
#    h_{l+1} = \mathrm{SiLU}\big(W_l h_l + b_l + P_l\, e + p_l\big), \qquad
#    \text{output} = W_\text{out} h_M + b_\text{out}, $$
# with $h_0 = x$, $l = 0, \dots, M-1$ for $M$ hidden layers, and $(A, a)$, $(W_l, b_l)$,
# $(P_l, p_l)$, $(W_\text{out}, b_\text{out})$ the weights and biases of `nn.Linear` layers
# (`TimeConditionalScoreNet` in 3.3 is exactly this).
# Here $t$ is whatever the embedding receives: $\log\sigma$ for a noise-conditional net, the
# SDE time $t \in [0, 1]$ for a time-conditional one (module 08). In the code the level enters
# as `sigma` (`NoiseConditionalScoreNet.forward(x, sigma)`, which takes the log itself) or as
# the time `t` (`TimeConditionalScoreNet.forward(x, t)`); in 2.3-2.4 $t$ just names the input.
# Why $\log\sigma$ and not $\sigma$: our levels are geometric, so they are *evenly spaced in*
# $\log\sigma$ (0.59 apart) while in $\sigma$ they crowd together at the small end (0.020 and
# 0.036 differ by 0.016, 4.0 and 2.2 by 1.8). An embedding that must tell neighbours apart
# (2.3) would see the small levels as nearly the same input and the large ones as wildly
# different; on $\log\sigma$ every pair of neighbours is equally far apart.
#
# ## 2.3 Gaussian Fourier features
# Draw $E/2$ frequencies once, $W_j \sim \mathcal{N}(0, s^2)$, keep them fixed, and map
# $$ \gamma(t) = \big[\sin(2\pi W t),\ \cos(2\pi W t)\big] \in \mathbb{R}^{E}. $$
# The inner product of two embeddings depends only on $t - t'$
# ($\sin a \sin b + \cos a \cos b = \cos(a - b)$), and averages to the characteristic function
# of $\mathcal{N}(0, s^2)$:
# $$ \frac{\gamma(t)\cdot\gamma(t')}{E/2} = \frac{1}{E/2}\sum_j \cos\big(2\pi W_j (t - t')\big)
#    \;\xrightarrow{E\to\infty}\; e^{-2\pi^2 s^2 (t - t')^2}. $$
# So the network sees $t$ through a Gaussian kernel of width $1/(2\pi s)$: the **scale** $s$
# decides how far apart two levels must be before the network can treat them differently.
# With finitely many frequencies the kernel is only a Monte Carlo estimate of that Gaussian:
# once $|t - t'| \gg 1/(2\pi s)$ the $E/2$ cosines have scattered phases, each with mean
# $\approx 0$ and variance $1/2$, so their average leaves random **side lobes** of typical
# size $\sqrt{(1/2)/(E/2)} = 1/\sqrt{E}$: 0.125 for our $E = 64$, the largest of them
# typically $\pm$0.2-0.4.
# Song et al. use $s = 16$ on $\log\sigma$ (NCSN++) and $s = 30$ on $t \in [0, 1]$ (their Colab).
#
# ## 2.4 Sinusoidal embedding
# The transformer's position code, used by DDPM for its integer time step:
# $$ e(t) = \big[\sin(\omega_i t),\ \cos(\omega_i t)\big]_{i=0}^{E/2-1}, \qquad
#    \omega_i = T_\max^{-i/(E/2 - 1)}, $$
# deterministic frequencies spaced geometrically from $1$ down to $1/T_\max$ ($T_\max$ =
# `max_period` = 10000). It is built for inputs of size ~$1$ to ~$T_\max$, so a continuous
# $t \in [0, 1]$ is first multiplied by 1000 (DDPM's number of steps), as in score_sde's code.
#
# ## 2.5 The score falls like $1/\sigma$, so divide the output by $\sigma$
# The DSM target (module 04) for $x = x_0 + \sigma z$ is
# $\nabla_x \log p(x \mid x_0) = -z/\sigma$, whose size is exactly
# $$ \mathbb{E}\,|z/\sigma|^2 = D/\sigma^2. $$
# The true perturbed score is its conditional mean, $s^*_\sigma(x) = \mathbb{E}[-z/\sigma \mid x]$,
# so by Jensen, at every $x$,
# $|\mathbb{E}[-z/\sigma \mid x]|^2 \le \mathbb{E}[\,|z/\sigma|^2 \mid x]$, and averaging over
# $x$ gives $\mathbb{E}|s^*_\sigma|^2 \le D/\sigma^2$. Equality needs $z$ to be
# (nearly) determined by $x$, which happens only when $\sigma$ is *much larger* than the data's
# spread, so that $x = x_0 + \sigma z$ is mostly noise. For data of variance $v$ per coordinate,
# the Gaussian formula below gives about $D/(\sigma^2 + v)$, a ratio
# $\sigma/\sqrt{\sigma^2 + v}$ of the RMS $|s^*_\sigma|$ to $\sqrt{D}/\sigma$. Our mixture
# (radius 2, std 0.15) has $v = 2^2/2 + 0.15^2 \approx 2.02$, a spread of about 1.4 per
# coordinate, so the ratio is still 0.94 at $\sigma = 4$ (three spreads) and reaches 0.99 only
# near $\sigma = 10$. Measured on the mixture: the exact curve runs roughly *parallel* to
# $\sqrt{D}/\sigma$ above $\sigma \approx 0.15$ (log-log slope about $-0.94$) but a fifth to a
# third below it (ratio 0.66-0.84 for $0.2 \le \sigma \le 2.2$), and comes close (0.95) only at
# our largest level, $\sigma = 4$.
# For Gaussian data $\mathcal{N}(m, C)$ it is exactly
# $\mathbb{E}|s^*_\sigma|^2 = \operatorname{tr}\big((C + \sigma^2 I)^{-1}\big)$: this falls like
# $D/\sigma^2$ when $\sigma^2$ exceeds the eigenvalues of $C$ and saturates at
# $\operatorname{tr}(C^{-1})$ when it is below them. For our mixture (components of std 0.15,
# modes 1.5 apart) expect $|s| \propto 1/\sigma$ between those scales and a plateau below
# $\sigma \approx 0.15$.
#
# Over $\sigma \in [0.02, 4]$ the score's size changes by a factor of ~30; in image models, whose
# data hug a thin manifold, by up to $\sigma_\max/\sigma_\min \sim 10^3$-$10^4$. NCSNv2's remedy:
# let the network predict $f_\theta = \sigma s$, which is *at most* $O(1)$ at every level
# ($\mathbb{E}|\sigma s^*|^2 \le D$ is a bound, not an equality: for our mixture
# $\sigma\sqrt{\mathbb{E}|s^*|^2}$ ranges from 0.19 at $\sigma_\min$ to 1.34 at $\sigma_\max$), and
# return
# $$ s_\theta(x, \sigma) = f_\theta(x, \sigma)/\sigma . $$
# The $1/\sigma$ law is then built into the architecture instead of learned.
#
# ## 2.6 The $\sigma^2$ weighting and the loss floor of each level
# With weight $\lambda(\sigma)$ the loss of one level is
# $\ell(\sigma) = \tfrac12\lambda(\sigma)\,\mathbb{E}|s_\theta(x, \sigma) + z/\sigma|^2$. Write
# $\sigma s_\theta + z = \sigma(s_\theta - s^*) + (\sigma s^* + z)$ and expand; the cross term
# vanishes because $\mathbb{E}[\sigma s^* + z \mid x] = 0$ ($s^* = \mathbb{E}[-z/\sigma \mid x]$):
# $$ \tfrac12\mathbb{E}|\sigma s_\theta + z|^2
#    = \underbrace{\tfrac12\big(D - \sigma^2\,\mathbb{E}|s^*_\sigma|^2\big)}_{
#        \text{floor, in } [0, D/2]}
#    + \underbrace{\tfrac12\sigma^2\,\mathbb{E}|s_\theta - s^*_\sigma|^2}_{\text{excess}} . $$
# The floor is $\tfrac12\mathbb{E}|\sigma s^* + z|^2$, expanded:
# $\mathbb{E}|\sigma s^* + z|^2 = \sigma^2\mathbb{E}|s^*|^2 + 2\sigma\,\mathbb{E}[s^*\cdot z] + D$,
# and $\mathbb{E}[s^*\cdot z] = \mathbb{E}[s^*\cdot\mathbb{E}[z \mid x]]
# = -\sigma\,\mathbb{E}|s^*|^2$, so it equals $D - \sigma^2\mathbb{E}|s^*|^2$, which lies in
# $[0, D]$ by 2.5's bound.
# Without weighting ($\lambda = 1$) each level's loss is this divided by $\sigma^2$: the factor
# $1/\sigma^2$ alone spans $(\sigma_\max/\sigma_\min)^2 = 40000$, and the smallest levels own the
# gradient. With $\lambda = \sigma^2$ (Song and Ermon 2019) every level's *floor* lies in
# $[0, D/2]$, and a good network sits just above it. The loss itself (floor + excess) is not
# bounded: at initialisation the output $f = \sigma s_\theta$ is nearly unrelated to $z$, so the
# loss is about $\tfrac12(\mathbb{E}|f|^2 + D) \ge D/2$ at every level, and the curves of 4.4
# start at 1 or a little above (a fresh network's $f$ is small).
# Together with output scaling the loss becomes $\tfrac12\mathbb{E}|f_\theta + z|^2$:
# **predict the noise**, an $O(1)$ target at every level, which is DDPM's loss with
# $\epsilon_\theta = -f_\theta$. Since we know $s^*$, we can compute every level's floor and
# watch the training loss approach it from above (the excess is module 02's DSM = ESM + const).
#
# ## 2.7 Training strategies
# * **Warm-up.** Adam divides by a running second moment that is estimated from very few
#   gradients in the first steps; a learning rate ramped linearly,
#   $\eta_k = \eta \min(1, (k+1)/K)$, keeps those early steps small.
# * **Gradient clipping.** DSM gradients can be heavy-tailed (a rare $z$ far out, an unlucky
#   batch); rescaling $g \leftarrow g \min(1, c/|g|)$ bounds one step's damage.
# * **EMA of the weights.** Keep $\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta$ after every
#   step and sample with $\bar\theta$. Unrolled,
#   $\bar\theta_n = d^n\theta_0 + (1-d)\sum_{k=1}^n d^{\,n-k}\theta_k$: an average over the last
#   $\approx 1/(1-d)$ iterates, which cancels much of the noise of stochastic gradients at a
#   constant learning rate. The window must be short next to the run, or the average still
#   remembers the poor early weights: $d = 0.999$ (1000 steps) suits long image runs, our 2500
#   steps use $d = 0.995$ (200 steps).
#
# ## 2.8 Debugging tips this module turns into plots
# 1. **Check the score's magnitude against $\sigma$.** It must fall as $\sigma$ rises, about like
#    $1/\sigma$ (2.5), and never exceed $\sqrt{D}/\sigma$ on average.
# 2. **Monitor the loss per noise level**, not only the total: a level stuck far above its floor
#    is invisible in the average.
# 3. **Test on 2D first**, where exact scores, exact floors and exact-score samples exist.
#
# ## 2.9 Sampling to measure quality: annealed Langevin dynamics
# Run Langevin dynamics (module 03) at each level from $\sigma_1$ down to $\sigma_L$, starting from
# $\mathcal{N}(0, \sigma_1^2 I)$, with step $\alpha_i = r\,\sigma_i^2$ (Song and Ermon's
# $\alpha_i = \epsilon\,\sigma_i^2/\sigma_L^2$ written with $r = \epsilon/\sigma_L^2$):
# $x \leftarrow x + \tfrac{\alpha_i}{2} s_\theta(x, \sigma_i) + \sqrt{\alpha_i}\, z$, then one
# denoising step $x \leftarrow x + \sigma_L^2 s_\theta(x, \sigma_L)$ (Tweedie, module 04).
# We use $r = 0.3$ (`Config.step_ratio`) and 50 steps per level (`--langevin-steps`).
# Module 07 explains why this works and how to choose the ladder and $r$.


# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Broadcasting a per-sample scalar over x
# $\sigma$ and $t$ are one number per sample, shape $(N,)$; $x$ may be $(N, D)$ or
# $(N, C, H, W)$. Appending singleton axes serves both: `expand_to(v, x)` reshapes $v$ to
# $(N, 1, \dots, 1)$ with as many axes as $x$. Modules 03 to 09 all need it, so it lives in
# `common/training.py` (imported above); `as_batch` turns a number into one value per sample.

# %%
def as_batch(t, x: Tensor) -> Tensor:
    """A time or noise level given as a number, a 0-d or an (N,) tensor, returned as (N,)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected one value per sample, shape ({x.shape[0]},), "
                         f"got {tuple(t.shape)}")
    return t


# %% [markdown]
# ## 3.2 Embeddings of the noise level (Sections 2.3 and 2.4)
# The Fourier frequencies are drawn once and stored as a **buffer**: saved in `state_dict`,
# moved by `.to(device)`, but not a parameter, so the optimiser never changes them.

# %%
class GaussianFourierFeatures(nn.Module):
    """gamma(t) = [sin(2 pi W t), cos(2 pi W t)] with fixed W_j ~ N(0, scale^2).

    Args:
        embed_dim: E, even; there are E/2 frequencies.
        scale:     std of the frequencies; the kernel gamma(t).gamma(t')/(E/2) tends to
                   exp(-2 pi^2 scale^2 (t - t')^2), of width 1/(2 pi scale).
        generator: optional torch.Generator (or an int seed) for reproducible frequencies.
    forward(t: (N,)) -> (N, E): the E/2 sines first, then the E/2 cosines.
    """

    def __init__(self, embed_dim: int, scale: float = 16.0,
                 generator: torch.Generator | int | None = None):
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        # W ~ N(0, scale^2), shape (E/2,): fixed, hence a buffer and not a parameter
        self.register_buffer("W", torch.randn(embed_dim // 2, generator=generator) * scale)
        self.embed_dim, self.scale = embed_dim, scale

    def forward(self, t: Tensor) -> Tensor:
        # angle_nj = 2 pi W_j t_n, shape (N, E/2)
        angle = 2 * math.pi * t.reshape(-1, 1).to(self.W.dtype) * self.W
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """e(t) = [sin(w_i t), cos(w_i t)], w_i = max_period^(-i / (E/2 - 1)), i = 0 .. E/2 - 1.

    The transformer / DDPM embedding: frequencies spaced geometrically from 1 to
    1 / max_period. Made for inputs from ~1 to ~max_period (DDPM's integer steps); scale a
    continuous t in [0, 1] up first (e.g. by 1000).
    forward(t: (N,)) -> (N, E): the E/2 sines first, then the E/2 cosines.
    """

    def __init__(self, embed_dim: int, max_period: float = 10000.0):
        super().__init__()
        if embed_dim < 4 or embed_dim % 2:
            raise ValueError(f"embed_dim must be an even number >= 4, got {embed_dim}")
        half = embed_dim // 2
        # w_i = exp(-log(max_period) * i / (half - 1)): from 1 down to 1/max_period
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs)
        self.embed_dim, self.max_period = embed_dim, max_period

    def forward(self, t: Tensor) -> Tensor:
        angle = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs  # (N, E/2)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


def embedding_kernel(embed: nn.Module, t: Tensor, t0: float = 0.0) -> Tensor:
    """k(t - t0) = emb(t) . emb(t0) / (E/2), for t: (M,) -> (M,). Equals 1 at t = t0."""
    e, e0 = embed(t), embed(torch.tensor([t0], dtype=t.dtype))
    return (e @ e0.T)[:, 0] / (e.shape[1] / 2)


# %% [markdown]
# ## 3.3 Score networks
# `MLP` is the plain network of module 04. `ConcatScoreNet` feeds it $(x, \log\sigma)$ (the plain
# conditioning of 2.2). `TimeConditionalScoreNet` adds a projection of the embedding to every
# hidden layer; an optional `output_scale(t)` divides the output, which is how the $1/\sigma$ of
# 2.5 enters. `NoiseConditionalScoreNet` is that class conditioned on $\log\sigma$ and divided
# by $\sigma$.

# %%
class MLP(nn.Sequential):
    """in_dim -> [Linear, SiLU] x n_layers -> out_dim; the plain MLP of module 04.

    forward(h: (N, in_dim)) -> (N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, n_layers: int = 3):
        layers, width = [], in_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        super().__init__(*layers, nn.Linear(width, out_dim))


class ConcatScoreNet(nn.Module):
    """s(x, sigma) = MLP([x, log sigma]) / sigma (or without the division).

    The plain way to condition on the noise level: one more input. x: (N, D), sigma: (N,) or
    a number -> (N, D).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, n_layers: int = 3,
                 scale_output: bool = True):
        super().__init__()
        self.mlp = MLP(dim + 1, dim, hidden, n_layers)
        self.scale_output = scale_output

    def forward(self, x: Tensor, sigma) -> Tensor:
        sigma = as_batch(sigma, x)
        out = self.mlp(torch.cat([x, sigma.log()[:, None]], dim=1))
        return out / expand_to(sigma, out) if self.scale_output else out


class TimeConditionalScoreNet(nn.Module):
    """s(x, t): an MLP whose hidden layers are all conditioned on an embedding of t.

        e       = SiLU(A emb(time_transform(t)) + a)                    (N, hidden)
        h_0     = x,  h_{l+1} = SiLU(W_l h_l + b_l + P_l e + p_l),  l = 0 .. M-1
        out     = (W_out h_M + b_out) / output_scale(t)                 (N, D)

    (the notation of Section 2.2; M = n_layers, layers[l] is (W_l, b_l), cond[l] is (P_l, p_l)).

    Args:
        dim:            D, the data dimension.
        hidden:         width of the hidden layers.
        embed_dim:      E, size of the embedding of t.
        embedding:      "fourier" (GaussianFourierFeatures) or "sinusoidal".
        n_layers:       number of conditioned hidden layers.
        output_scale:   t (N,) -> (N,) positive divisor, e.g. sigma(t); None: no division.
        time_transform: t (N,) -> (N,) applied before the embedding, e.g. log (for sigma) or
                        1000 * t (for the sinusoidal embedding of t in [0, 1]); None: identity.
        fourier_scale:  std of the Fourier frequencies.
        max_period:     max_period of the sinusoidal embedding.
        generator:      generator or seed for the Fourier frequencies.
    forward(x: (N, D), t: (N,) or a number) -> (N, D).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, embed_dim: int = 64,
                 embedding: str = "fourier", n_layers: int = 3,
                 output_scale: Callable[[Tensor], Tensor] | None = None,
                 time_transform: Callable[[Tensor], Tensor] | None = None,
                 fourier_scale: float = 16.0, max_period: float = 10000.0,
                 generator: torch.Generator | int | None = None):
        super().__init__()
        if embedding == "fourier":
            embed = GaussianFourierFeatures(embed_dim, fourier_scale, generator)
        elif embedding == "sinusoidal":
            embed = SinusoidalEmbedding(embed_dim, max_period)
        else:
            raise ValueError(f"embedding must be 'fourier' or 'sinusoidal', got {embedding!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        # emb(t) -> a learned hidden-size code of the level, shared by all layers
        self.embed = nn.Sequential(embed, nn.Linear(embed_dim, hidden), nn.SiLU())
        self.layers = nn.ModuleList(
            [nn.Linear(dim, hidden)] + [nn.Linear(hidden, hidden) for _ in range(n_layers - 1)])
        # P_l: each hidden layer gets its own projection of the code (added before SiLU)
        self.cond = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()
        self.output_scale, self.time_transform = output_scale, time_transform

    def forward(self, x: Tensor, t) -> Tensor:
        t = as_batch(t, x)
        tt = t if self.time_transform is None else self.time_transform(t)
        if len(tt) > 1 and bool((tt == tt[0]).all()):
            tt = tt[:1]  # one level for the whole batch (sampling): its code once, (1, hidden),
        e = self.embed(tt).to(x.dtype)  # which broadcasts in P_l e below; else (N, hidden)
        h = x
        for layer, proj in zip(self.layers, self.cond):
            h = self.act(layer(h) + proj(e))  # h_{l+1} = SiLU(W_l h_l + b_l + P_l e + p_l)
        out = self.out(h)
        if self.output_scale is not None:
            out = out / expand_to(self.output_scale(t), out)  # s = f / sigma(t)
        return out


def _identity(sigma: Tensor) -> Tensor:
    return sigma


class NoiseConditionalScoreNet(TimeConditionalScoreNet):
    """s(x, sigma) = f(x, log sigma) / sigma: conditioned on log sigma, output divided by sigma.

    The same arguments as TimeConditionalScoreNet, except that the level is sigma itself
    and ``scale_output`` switches the division by sigma on or off. (The parent calls its level
    t; here that t is sigma, its time_transform is log, and the embedding sees log sigma.)
    forward(x: (N, D), sigma: (N,) or a number) -> (N, D).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, embed_dim: int = 64,
                 embedding: str = "fourier", n_layers: int = 3, scale_output: bool = True,
                 **kwargs):
        super().__init__(dim, hidden, embed_dim, embedding, n_layers,
                         output_scale=_identity if scale_output else None,
                         time_transform=torch.log, **kwargs)

    def forward(self, x: Tensor, sigma) -> Tensor:
        return super().forward(x, sigma)  # the parent's t is sigma here


# %% [markdown]
# ## 3.4 Noise levels
# A geometric ladder $\sigma_i = \sigma_\max (\sigma_\min/\sigma_\max)^{(i-1)/(L-1)}$ for
# discrete levels, and its continuous version $\sigma(t) = \sigma_\min(\sigma_\max/\sigma_\min)^t$,
# $t \in [0, 1]$ (the VE SDE's noise scale in module 08). Both are uniform in $\log\sigma$.

# %%
@dataclass
class GeometricNoise:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t on [0, 1], and its L-level ladder."""

    sigma_min: float
    sigma_max: float
    n_levels: int

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        if self.n_levels < 2:
            raise ValueError(f"need at least 2 levels, got {self.n_levels}")

    def levels(self, dtype=torch.float32) -> Tensor:
        """sigma_1 > ... > sigma_L, shape (L,)."""
        return torch.logspace(math.log10(self.sigma_max), math.log10(self.sigma_min),
                              self.n_levels, dtype=dtype)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t(self, sigma: Tensor) -> Tensor:
        """The inverse: t = log(sigma / sigma_min) / log(sigma_max / sigma_min)."""
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def nearest_level(self, sigma: Tensor) -> Tensor:
        """Index (0 = largest) of the ladder level nearest to sigma in log scale, (N,) long."""
        position = (1 - self.t(sigma)) * (self.n_levels - 1)  # 0 at sigma_max, L-1 at sigma_min
        return position.round().long().clamp(0, self.n_levels - 1)


# %% [markdown]
# ## 3.5 The loss: denoising score matching with weight $\lambda(\sigma)$ (Section 2.6)
# `conditional_dsm_loss` returns one loss per sample, so that the caller can average it per
# level. It takes the noise $z$ as an argument: evaluation can then reuse the same noise for two
# networks (a paired comparison).

# %%
def conditional_dsm_loss(score_fn, x0: Tensor, sigma: Tensor, z: Tensor, cond: Tensor | None = None,
             weighting: str = "sigma2") -> Tensor:
    """Per-sample DSM loss 1/2 lambda(sigma) |s(x0 + sigma z, c) + z / sigma|^2.

    x0, z: (N, D); sigma: (N,); the network is called as score_fn(x, cond) with cond = sigma
    unless ``cond`` (e.g. the SDE time t) is given. weighting "sigma2": lambda = sigma^2, i.e.
    1/2 |sigma s + z|^2; "none": lambda = 1. Returns (N,).
    """
    s_sigma = expand_to(sigma, x0)
    x = x0 + s_sigma * z  # x = x0 + sigma z
    s = score_fn(x, sigma if cond is None else cond)
    if weighting == "sigma2":
        return 0.5 * (s_sigma * s + z).flatten(1).square().sum(1)  # 1/2 |sigma s + z|^2
    if weighting == "none":
        return 0.5 * (s + z / s_sigma).flatten(1).square().sum(1)  # 1/2 |s + z / sigma|^2
    raise ValueError(f"weighting must be 'sigma2' or 'none', got {weighting!r}")


def per_level_mean(values: Tensor, level: Tensor, n_levels: int) -> Tensor:
    """Mean of values (N,) within each level index (N,) in [0, L): (L,), NaN where empty."""
    total = torch.zeros(n_levels, dtype=values.dtype).index_add_(0, level, values)
    count = torch.bincount(level, minlength=n_levels).to(values.dtype)
    return total / count  # 0 / 0 = NaN marks a level absent from the batch


def noise_conditional_loss(model, x0: Tensor, sigmas: Tensor,
                           generator: torch.Generator | None = None, weighting: str = "sigma2"):
    """NCSN training loss: a level i ~ U{1..L} and noise z per sample, then conditional_dsm_loss.

    x0: (N, D); sigmas: (L,). Returns (mean loss, {"level_loss": (L,) per-level means}).
    """
    n, L = x0.shape[0], len(sigmas)
    level = torch.randint(0, L, (n,), generator=generator)
    z = torch.randn(x0.shape, generator=generator).to(x0)
    losses = conditional_dsm_loss(model, x0, sigmas[level].to(x0), z, weighting=weighting)
    return losses.mean(), {"level_loss": per_level_mean(losses.detach().cpu(), level, L)}


def time_conditional_loss(model, x0: Tensor, noise: GeometricNoise,
                          generator: torch.Generator | None = None, weighting: str = "sigma2"):
    """Continuous-time version: t ~ U(0, 1), sigma = sigma(t), the network is called with t.

    x0: (N, D). Returns (mean loss, {"level_loss": (L,)}), levels binned to the nearest rung.
    """
    t = torch.rand(x0.shape[0], generator=generator).to(x0)
    z = torch.randn(x0.shape, generator=generator).to(x0)
    sigma = noise.sigma(t)
    losses = conditional_dsm_loss(model, x0, sigma, z, cond=t, weighting=weighting)
    level = noise.nearest_level(sigma.detach().cpu())
    return losses.mean(), {"level_loss": per_level_mean(losses.detach().cpu(), level,
                                                        noise.n_levels)}


# %% [markdown]
# ## 3.6 Training strategies (Section 2.7): warm-up, clipping, EMA, and a loop to look inside
# `training_iterator` is a generator: it yields a dictionary per step (loss, gradient norm,
# learning rate, and whatever the loss function reports), so a caller can draw progress bars,
# record per-level losses or evaluate the EMA weights without callbacks.

# %%
def warmup_lr_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Multiplier for torch.optim.lr_scheduler.LambdaLR: min(1, (k + 1) / warmup_steps).

    The first step (k = 0) uses lr / warmup_steps; from step warmup_steps - 1 on, the full lr.
    warmup_steps = 0 disables the warm-up.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return lambda k: 1.0 if warmup_steps == 0 else min(1.0, (k + 1) / warmup_steps)


# %% [markdown]
# **The EMA of the weights** (Section 2.7) is the class `EMA`, which lives in
# `common/training.py` (imported above) because modules 07, 08 and 09 train with it too. Its
# heart is two in-place lines per update, applied to all parameters at once after every
# optimiser step:
#
#     torch._foreach_mul_(shadow, d)                      # theta_bar <- d theta_bar
#     torch._foreach_add_(shadow, params, alpha=1 - d)    #              + (1 - d) theta
#
# `ema = EMA(model, decay=d)` keeps the copy $\bar\theta$ (`ema.shadow`, one tensor per
# parameter); `ema.update(model)` applies the two lines; `ema.averaged(model)` returns a frozen
# copy of the model carrying $\bar\theta$, for evaluation and sampling; `ema.copy_to(model)`
# writes $\bar\theta$ into a model; `state_dict()` goes into checkpoints. Buffers (the fixed
# Fourier frequencies) are copied as they are, not averaged. The decay must lie in $[0, 1)$:
# $d = 1$ would never move from the initial weights. With `EMA(model, d, warmup=True)` update
# $k = 0, 1, \dots$ uses $d_k = \min(d, (1+k)/(10+k))$ (0.1, 0.55 and 0.92 at $k$ = 0, 10,
# 100), so that a long run with $d = 0.999$ does not drag its random initial weights along for
# thousands of steps; the runs here choose a window short next to the run instead (2.7) and
# keep the plain form.

# %%
def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor,
               grad_clip: float | None = None) -> float:
    """Backpropagate ``loss``, clip the gradient's global norm to ``grad_clip``, step.

    Returns the gradient norm *before* clipping (worth logging: spikes show up there).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # g <- g * min(1, c / |g|); with no clipping, only measure |g|
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    return float(norm)


def training_iterator(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
                  sample_batch: Callable[[], Tensor], n_steps: int, scheduler=None,
                  ema: EMA | None = None, grad_clip: float | None = None) -> Iterator[dict]:
    """Generator: train for n_steps, yielding one dictionary per step.

    loss_fn(model, x0) -> (scalar loss, aux dict); sample_batch() -> x0 (N, D).
    Each step: loss, backward, clip, optimizer step, scheduler step, EMA update. Yields
    {"step", "loss", "grad_norm", "lr", **aux}.
    """
    model.train()
    for step in range(n_steps):
        loss, aux = loss_fn(model, sample_batch())
        lr = optimizer.param_groups[0]["lr"]  # the learning rate this step used
        grad_norm = optimizer_step(model, optimizer, loss, grad_clip)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        yield {"step": step, "loss": loss.item(), "grad_norm": grad_norm, "lr": lr, **aux}


# %% [markdown]
# ## 3.7 Measuring a score network against the exact perturbed score
# For each level we draw $x = x_0 + \sigma z$ from the mixture and compare the network with the
# exact $s^*_\sigma$ (closed form, float64): the root-mean-square size $\sqrt{\mathbb{E}|s|^2}$ of
# both (debugging tip 1), the relative error, and the level's floor and excess loss (2.6).

# %%
@torch.no_grad()
def score_report(score_fn: NoiseScoreFn | None, data: GaussianMixture, sigmas: Tensor, n: int,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """Per-level statistics at x = x0 + sigma z, x0 ~ data; all outputs have shape (L,).

    exact_rms  sqrt(E|s*|^2);   floor  1/2 (D - sigma^2 E|s*|^2)
    floor_se   the floor's Monte Carlo standard error, 1/2 sigma^2 std(|s*|^2) / sqrt(n)
    and, when score_fn(x, sigma) is given:
    rms        sqrt(E|s_theta|^2);   rel_error  sqrt(E|s_theta - s*|^2 / E|s*|^2)
    excess     1/2 sigma^2 E|s_theta - s*|^2   (the level's loss minus its floor)
    """
    out = {k: [] for k in ("exact_rms", "floor", "floor_se", "rms", "rel_error", "excess")}
    D = data.dim
    for sigma in sigmas.tolist():
        x0 = data.sample(n, generator, dtype=torch.float64)
        x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        exact = data.perturbed_score(x, sigma)
        exact_sq_n = exact.square().sum(1)  # |s*|^2 of every point, (n,)
        exact_sq = exact_sq_n.mean()
        out["exact_rms"].append(exact_sq.sqrt())
        out["floor"].append(0.5 * (D - sigma**2 * exact_sq))
        out["floor_se"].append(0.5 * sigma**2 * exact_sq_n.std() / math.sqrt(n))
        if score_fn is not None:
            s = score_fn(x.float(), torch.full((n,), sigma)).double()
            err_sq = (s - exact).square().sum(1).mean()
            out["rms"].append(s.square().sum(1).mean().sqrt())
            out["rel_error"].append((err_sq / exact_sq).sqrt())
            out["excess"].append(0.5 * sigma**2 * err_sq)
    return {k: torch.stack(v) for k, v in out.items() if v}


def loglog_slope(sigmas: Tensor, values: Tensor) -> float:
    """Least-squares slope of log(values) against log(sigmas): -1 for values = c / sigma."""
    return float(np.polyfit(np.log(sigmas.double().numpy()),
                            np.log(values.double().numpy()), 1)[0])


# %% [markdown]
# ## 3.8 Annealed Langevin dynamics (Section 2.9; module 07 in depth)

# %%
@torch.no_grad()
def annealed_langevin(score_fn: NoiseScoreFn, x: Tensor, sigmas: Tensor, n_steps: int,
                      step_ratio: float, generator: torch.Generator | None = None,
                      denoise: bool = True) -> Tensor:
    """Song and Ermon (2019), Algorithm 1, with step alpha_i = step_ratio * sigma_i^2.

    For each level i = 1..L, n_steps times: x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z.
    Then (``denoise``) one Tweedie step x <- x + sigma_L^2 s(x, sigma_L).
    x: (N, D) initial points, e.g. N(0, sigma_1^2 I); sigmas: (L,) decreasing. Returns (N, D).
    """
    n = x.shape[0]
    for sigma in sigmas.tolist():
        alpha = step_ratio * sigma**2
        sigma_n = torch.full((n,), sigma, dtype=x.dtype)  # the nets take one sigma per sample
        for _ in range(n_steps):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + 0.5 * alpha * score_fn(x, sigma_n) + math.sqrt(alpha) * z
    if denoise:
        sigma_last = sigmas[-1].item()
        sigma_n = torch.full((n,), sigma_last, dtype=x.dtype)
        x = x + sigma_last**2 * score_fn(x, sigma_n)  # E[x0 | x] by Tweedie
    return x


def exact_noise_score_fn(data: GaussianMixture) -> NoiseScoreFn:
    """(x, sigma) -> grad log p_sigma(x) of the mixture, exact (all sigma in a batch equal)."""
    return lambda x, sigma: data.perturbed_score(x, float(sigma[0]))


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 The test bed: eight Gaussians with exact perturbed scores
# Eight components of std 0.15 on a circle of radius 2 (modes 1.53 apart). Adding noise
# $\sigma$ gives again a mixture, with components of variance $0.15^2 + \sigma^2$, so the score
# of every $p_\sigma$ is exact. The ladder runs from $\sigma_\max = 4$ (about the largest distance
# between two data points, NCSNv2's rule) down to $\sigma_\min = 0.02$ in $L = 10$ steps.

# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this): QUICK = True runs the demos below at
# # --quick sizes, in seconds; False at the script's full size. Each demo's cell follows the
# # cell that defines it.
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg = Config.quick() if run.quick else Config()
# r = {}  # every demo's numbers, which main() prints as its summary


# %%
def mixture_data() -> GaussianMixture:
    """The data of this module: eight Gaussians, radius 2, std 0.15."""
    return GaussianMixture.eight_gaussians(radius=2.0, std=0.15)


def noise_ladder(cfg: Config) -> GeometricNoise:
    return GeometricNoise(cfg.sigma_min, cfg.sigma_max, cfg.n_levels)


def ddpm_time(t: Tensor) -> Tensor:
    """t in [0, 1] -> 1000 t: the input range the sinusoidal embedding was designed for."""
    return 1000.0 * t


FOURIER_SCALE = 16.0  # as NCSN++ (on log sigma); the Colab tutorial uses 30 on t in [0, 1]


# %% tags=["active-ipynb"]
# data, noise = mixture_data(), noise_ladder(cfg)


# %% [markdown]
# ## 4.2 What the embeddings look like
# Left and middle: the two embeddings of $t \in [0, 1]$ as the time-conditional networks below
# use them (Fourier features of $t$ with scale 16, frequencies sorted by size; sinusoidal of
# $1000\,t$). Right: their kernels $\mathrm{emb}(t)\cdot\mathrm{emb}(t')/(E/2)$ against
# $t - t'$. The Fourier kernel is the Gaussian $e^{-2\pi^2 s^2 \Delta^2}$ of Section 2.3 up to
# Monte Carlo error (it is exact in the limit of many frequencies, shown with $E = 4096$); the
# sinusoidal kernel has a sharp peak on a long shoulder, because its frequencies span four
# decades. The Fourier kernel falls to zero well inside one spacing of the noise levels
# (dotted): neighbouring levels get nearly unrelated codes. With $E = 64$, i.e. only 32
# frequencies, the kernel keeps random side lobes of typical size $1/\sqrt{E} = 0.125$ (the
# grey band; Section 2.3), the largest typically $\pm$0.2-0.4 (in the default run's figure
# $-0.42$, a negative one): two distant levels can look accidentally a little alike, or
# anti-alike, which the learned layers after the embedding easily undo. The summary prints the
# side lobes' measured RMS. The sinusoidal kernel's peak is as narrow, but its slow features
# keep distant levels ~40% alike: it encodes $t$ at many resolutions at once. Either way the
# network can tell the levels apart.
# (In the middle heat map the top rows, $\sin(\omega_i \cdot 1000\,t)$ with $\omega_i$ near 1,
# complete over a hundred periods across the panel, about as many as it has pixels: they are
# drawn as fine, partly blended stripes, computed at 4000 points (25 per period) so that they
# are not aliased into false slow patterns.)
#
# The figure embeds $t \in [0, 1]$, as the time-conditional nets do. The `full` net instead
# embeds $\log\sigma$ (Section 2.2), on which neighbouring levels lie $\log 1.8 = 0.59$ apart
# instead of $1/9 = 0.11$: relative to the kernel's width $1/(2\pi \cdot 16) = 0.01$ they are
# even more distinct. (Embedding $\sigma$ itself would put the two smallest levels only 0.016
# apart, within two kernel widths, and make them hard to tell apart.)

# %%
def demo_embeddings(run, cfg: Config) -> dict:
    seed = run.args.seed
    fourier = GaussianFourierFeatures(cfg.embed_dim, FOURIER_SCALE, generator=seed + 1)  # as in 4.3
    sinusoidal = SinusoidalEmbedding(cfg.embed_dim)
    wide = GaussianFourierFeatures(4096, FOURIER_SCALE, generator=seed + 2)
    # 25 samples per period of the fastest sinusoidal row, sin(1000 t); the "antialiased"
    # drawing then averages what the pixels cannot resolve instead of aliasing it
    t = torch.linspace(0, 1, 4000)
    order = fourier.W.abs().argsort()
    half = cfg.embed_dim // 2
    feats = fourier(t)[:, torch.cat([order, order + half])]  # sort by |W|, sines then cosines

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    rows = f"0-{half - 1}: sin, {half}-{cfg.embed_dim - 1}: cos"
    panels = ((axes[0], feats, f"Gaussian Fourier features of t (scale {FOURIER_SCALE:g})",
               f"feature, by |W| from small to large\n({rows})"),
              (axes[1], sinusoidal(ddpm_time(t)), "Sinusoidal embedding of 1000 t",
               f"feature index i, frequency falls with i\n({rows})"))
    for ax, emb, title, ylabel in panels:
        im = ax.imshow(emb.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                       extent=(0, 1, cfg.embed_dim - 0.5, -0.5), interpolation="antialiased")
        ax.axhline(half - 0.5, color="k", lw=0.8)
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.colorbar(im, ax=axes[:2], label="feature value", shrink=0.8)

    delta = torch.linspace(-0.3, 0.3, 1201)
    gauss = torch.exp(-2 * math.pi**2 * FOURIER_SCALE**2 * delta**2)
    k_wide = embedding_kernel(wide, delta)
    ax = axes[2]
    ax.plot(delta, embedding_kernel(fourier, delta), label=f"Fourier, E = {cfg.embed_dim}")
    ax.plot(delta, k_wide, label="Fourier, E = 4096")
    ax.plot(delta, gauss, "k--", lw=1, label=r"$\exp(-2\pi^2 s^2 \Delta^2)$")
    ax.plot(delta, embedding_kernel(lambda u: sinusoidal(ddpm_time(u)), delta),
            label=f"sinusoidal(1000 t), E = {cfg.embed_dim}")
    lobe = 1 / math.sqrt(cfg.embed_dim)  # typical side lobe (Section 2.3)
    ax.axhspan(-lobe, lobe, color="gray", alpha=0.2, lw=0,
               label=f"$\\pm 1/\\sqrt{{E}}$: typical side lobe, E = {cfg.embed_dim}")
    spacing = 1 / (cfg.n_levels - 1)
    for k in (-2, -1, 1, 2):
        ax.axvline(k * spacing, color="gray", ls=":", lw=1)
    ax.set_xlabel(r"$\Delta = t - t'$   (dotted: spacing of the noise levels)")
    ax.set_ylabel(r"emb(t) $\cdot$ emb(t') / (E/2)")
    ax.set_title("Embedding kernels")
    ax.set_ylim(-0.5, 1.6)  # headroom for the legend above the curves
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    run.save(fig, "embeddings")
    return {"fourier_w_std_ratio": (wide.W.std() / FOURIER_SCALE).item(),
            "fourier_kernel_error": (k_wide - gauss).abs().max().item(),
            "fourier_kernel_width": 1 / (2 * math.pi * FOURIER_SCALE),
            **side_lobe_rms(fourier, cfg.embed_dim, seed)}


def side_lobe_rms(fourier: GaussianFourierFeatures, embed_dim: int, seed: int,
                  n_draws: int = 200) -> dict:
    """RMS of the Fourier kernel at |Delta| >= 0.05 (five kernel widths out), in [-0.3, 0.3].

    For the drawn frequencies of ``fourier`` and averaged over ``n_draws`` fresh draws of W;
    Section 2.3 predicts 1/sqrt(E). One draw deviates from it by tens of percent.
    """
    delta = torch.linspace(-0.3, 0.3, 601)
    far = delta[delta.abs() >= 0.05]
    ms = [embedding_kernel(GaussianFourierFeatures(embed_dim, FOURIER_SCALE, 1000 * seed + j),
                           far).square().mean() for j in range(n_draws)]
    return {"side_lobe_rms": embedding_kernel(fourier, far).square().mean().sqrt().item(),
            "side_lobe_rms_avg": torch.stack(ms).mean().sqrt().item()}


# %% tags=["active-ipynb"]
# r.update(demo_embeddings(run, cfg))


# %% [markdown]
# ## 4.3 Five networks, one training recipe
# Every network is trained with the same data stream, noise, optimiser (Adam, learning rate
# $2\cdot 10^{-3}$ after a 200-step linear warm-up), gradient clipping at norm 0.5, $\sigma^2$
# weighting and an EMA; each differs from the full recipe in one choice:
#
# | name | network | conditioning | output |
# |---|---|---|---|
# | `full` | NoiseConditionalScoreNet | Fourier features of $\log\sigma$ | $f/\sigma$ |
# | `no_scaling` | NoiseConditionalScoreNet | Fourier features of $\log\sigma$ | $f$ |
# | `concat` | ConcatScoreNet (plain MLP) | $\log\sigma$ as a third input | $f/\sigma$ |
# | `time_fourier` | TimeConditionalScoreNet | Fourier features of $t \sim U(0,1)$ | $f/\sigma(t)$ |
# | `time_sinusoidal` | TimeConditionalScoreNet | sinusoidal embedding of $1000t$ | $f/\sigma(t)$ |
#
# The two time-conditional networks are trained on the continuous $\sigma(t)$ and queried at
# $t(\sigma_i)$; the others only ever see the ten levels. During training we record the loss of
# every level, and every `eval_every` steps the *excess* loss
# $\tfrac12\sigma^2\mathbb{E}|s_\theta - s^*_\sigma|^2$ of the raw and of the EMA weights on a
# fixed validation set, using the exact score.

# %%
VARIANTS = {
    "full": "NCSN: Fourier(log sigma), output / sigma",
    "no_scaling": "NCSN without the / sigma",
    "concat": "plain MLP on (x, log sigma), / sigma",
    "time_fourier": "time-conditional, Fourier(t), / sigma(t)",
    "time_sinusoidal": "time-conditional, sinusoidal(1000 t), / sigma(t)",
}


def build_variant(name: str, cfg: Config, noise: GeometricNoise, seed: int) -> nn.Module:
    """The network of one variant (Section 4.3), initialised from ``seed``."""
    torch.manual_seed(seed)  # the same initial-weight stream for every variant
    common = dict(dim=2, hidden=cfg.hidden, n_layers=cfg.n_layers)
    if name in ("full", "no_scaling"):
        return NoiseConditionalScoreNet(**common, embed_dim=cfg.embed_dim, embedding="fourier",
                                        scale_output=name == "full",
                                        fourier_scale=FOURIER_SCALE, generator=seed)
    if name == "concat":
        return ConcatScoreNet(**common, scale_output=True)
    if name == "time_fourier":
        return TimeConditionalScoreNet(**common, embed_dim=cfg.embed_dim, embedding="fourier",
                                       output_scale=noise.sigma, fourier_scale=FOURIER_SCALE,
                                       generator=seed)
    if name == "time_sinusoidal":
        return TimeConditionalScoreNet(**common, embed_dim=cfg.embed_dim, embedding="sinusoidal",
                                       output_scale=noise.sigma, time_transform=ddpm_time)
    raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")


def as_noise_score(name: str, model: nn.Module, noise: GeometricNoise) -> NoiseScoreFn:
    """The variant's network as a function (x, sigma) -> score (time nets get t(sigma))."""
    if name.startswith("time_"):
        return lambda x, sigma: model(x, noise.t(sigma))
    return model


def make_validation(data: GaussianMixture, sigmas: Tensor, n_per_level: int,
                    generator: torch.Generator) -> dict[str, Tensor]:
    """A fixed set x = x0 + sigma_i z, n_per_level points per level, with the exact scores."""
    L = len(sigmas)
    level = torch.arange(L).repeat_interleave(n_per_level)  # (L n,)
    sigma = sigmas.double()[level]
    x0 = data.sample(L * n_per_level, generator, dtype=torch.float64)
    x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    exact = torch.cat([data.perturbed_score(x[level == i], s) for i, s in
                       enumerate(sigmas.tolist())])
    return {"x": x.float(), "sigma": sigma.float(), "level": level, "exact": exact}


@torch.no_grad()
def validation_excess(score_fn: NoiseScoreFn, val: dict[str, Tensor]) -> Tensor:
    """Per-level excess loss 1/2 sigma^2 |s_theta - s*|^2 on the validation set, shape (L,)."""
    err = (score_fn(val["x"], val["sigma"]).double() - val["exact"]).square().sum(1)
    excess = 0.5 * val["sigma"].double() ** 2 * err
    return per_level_mean(excess, val["level"], int(val["level"].max()) + 1)


def train_variant(run, cfg: Config, name: str, data: GaussianMixture, noise: GeometricNoise,
                  val: dict[str, Tensor]) -> dict:
    """Train one variant; return the raw and EMA networks and what was recorded on the way."""
    seed = run.args.seed
    model = build_variant(name, cfg, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)  # the same data and noise for every variant
    sigmas = noise.levels()
    if name.startswith("time_"):
        def loss_fn(net, x0):
            return time_conditional_loss(net, x0, noise, gen)
    else:
        def loss_fn(net, x0):
            return noise_conditional_loss(net, x0, sigmas, gen)
    # foreach: one kernel per step for all parameters (faster for many small tensors)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lr_lambda(cfg.warmup_steps))
    emas = {"ema": EMA(model, cfg.ema_decay)}
    if name == "full":
        emas["slow_ema"] = EMA(model, cfg.slow_ema_decay)
    evaluator = copy.deepcopy(model).eval()  # receives the EMA weights for evaluation

    def evaluate():
        row = {"raw": validation_excess(as_noise_score(name, model.eval(), noise), val)}
        for key, ema in emas.items():
            ema.copy_to(evaluator)
            row[key] = validation_excess(as_noise_score(name, evaluator, noise), val)
        model.train()
        return row

    hist = {k: [] for k in ("loss", "grad_norm", "lr", "level_loss")}
    evals = {"step": [], **{k: [] for k in ["raw", *emas]}}
    loop = training_iterator(model, optimizer, loss_fn,
                         lambda: data.sample(cfg.batch_size, gen, dtype=torch.float32),
                         cfg.train_steps, scheduler, emas["ema"], cfg.grad_clip)
    bar = progress(loop, total=cfg.train_steps, desc=f"training {name:15s}", mininterval=0.5)
    for info in bar:
        for key, ema in emas.items():
            if key != "ema":  # the loop already updated emas["ema"]
                ema.update(model)
        for key in hist:
            hist[key].append(info[key])
        step = info["step"] + 1
        if step % cfg.eval_every == 0 or step == cfg.train_steps:
            evals["step"].append(step)
            for key, value in evaluate().items():
                evals[key].append(value)
            bar.set_postfix(loss=f"{np.mean(hist['loss'][-cfg.eval_every:]):.3f}")
    model.eval()
    out = {"model": model, "history": {k: np.array(v) if k != "level_loss" else
                                       torch.stack(v).numpy() for k, v in hist.items()},
           "evals": {k: np.array(v) if k == "step" else torch.stack(v).numpy()
                     for k, v in evals.items()}}
    for key, ema in emas.items():
        out[f"{key}_model"] = ema.averaged(model)
    return out


def train_all(run, cfg: Config, data: GaussianMixture, noise: GeometricNoise) -> dict:
    val_gen = torch.Generator().manual_seed(run.args.seed + 3)
    val = make_validation(data, noise.levels(), cfg.n_val, val_gen)
    return {name: train_variant(run, cfg, name, data, noise, val) for name in VARIANTS}


def moving_average(a: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` rows along axis 0, ignoring NaN (empty levels)."""
    a = np.asarray(a, dtype=float)
    ok = ~np.isnan(a)
    csum = np.cumsum(np.where(ok, a, 0.0), axis=0)
    ccount = np.cumsum(ok, axis=0)
    csum[window:] = csum[window:] - csum[:-window]
    ccount[window:] = ccount[window:] - ccount[:-window]
    return csum / np.maximum(ccount, 1)


# %% tags=["active-ipynb"]
# trained = train_all(run, cfg, data, noise)


# %% [markdown]
# ## 4.4 Debugging tip 2: the loss of every noise level, against its floor
# Left: the $\sigma^2$-weighted training loss of each level of the full recipe (a 100-step
# moving average), and dashed, its floor $\tfrac12(D - \sigma^2\mathbb{E}|s^*_\sigma|^2)$ computed
# from the exact score. Every floor lies in $[0, D/2] = [0, 1]$, but the losses do not: they
# start at 1 or a little above (at initialisation about $\tfrac12(\mathbb{E}|f|^2 + D)$,
# Section 2.6), and each curve comes down to just above its own floor: that is what "trained"
# looks like level by level. Small $\sigma$
# sits near $D/2$ (the noise cannot be predicted from $x$ when $\sigma \ll$ the data's spread),
# large $\sigma$ near 0 (then $x \approx \sigma z$ reveals $z$). The levels around
# $\sigma \approx 0.1$-$0.4$, where the eight modes separate, are learned last, some 1000 steps
# after the others: the total loss alone would hide that.
#
# **Why the floors are not ordered by $\sigma$.** A level's floor is the part of the noise $z$
# that no function of $x$ can predict: since $-\sigma s^*_\sigma(x) = \mathbb{E}[z \mid x]$,
# $$ \text{floor} = \tfrac12\mathbb{E}\,|z - \mathbb{E}[z \mid x]|^2
#    = \frac{\mathbb{E}\,|x_0 - \mathbb{E}[x_0 \mid x]|^2}{2\sigma^2}, $$
# the best denoiser's squared error in units of the noise variance. Read the dashed lines from
# small to large $\sigma$:
# * $\sigma \ll 0.15$ (the components' std): $x$ looks like clean data, nothing in it reveals
#   $z$, and the floor is near $D/2 = 1$.
# * $0.15 \lesssim \sigma \lesssim 0.3$: the noise is wider than a component but the mode it
#   came from is still obvious (modes are 1.53 apart), so denoising towards that mode recovers
#   most of $z$: the floor drops to ~0.37 at $\sigma = 0.21$.
# * $\sigma \approx 0.4$-$1.2$: the noise is comparable to the spacing of the modes, so $x$
#   may have come from two or three of them. Guessing between modes 1.53 apart leaves an error
#   of that size, and the floor climbs back to ~0.56 at $\sigma = 0.68$.
# * $\sigma \gg 2$ (the data's radius): $x \approx \sigma z$ reveals $z$ again, and the floor falls
#   like (data variance)$/(2\sigma^2)$, to 0.11 at $\sigma = 4$.
#
# A single Gaussian $\mathcal{N}(m, C)$ has no modes to confuse, and its floor
# $\tfrac12\sum_k \lambda_k/(\lambda_k + \sigma^2)$ ($\lambda_k$ the eigenvalues of $C$) falls
# monotonically; the bump is the mixture's mode structure.
#
# **Losses "below" their floors.** The summary prints each level's final training loss (the
# mean over the last 100 steps, about 5000 random $(x_0, z)$ pairs per level) with its Monte
# Carlo standard error, measured from the spread of the per-step means (about $\pm 0.01$ at the
# small levels, less at large $\sigma$); the floors (20000 exact scores each) carry their own,
# smaller standard error, also printed. The floor bounds the *expected* loss, not an average
# over finitely many noise draws, so a measured loss under its floor by one or two standard
# errors is noise, not a bug.
#
# Middle: the same losses without the weight, $\ell/\sigma^2$: more than five decades apart,
# so an unweighted sum would be the smallest levels' loss plus rounding error.
# Right: the excess over the floor, measured exactly on validation points (EMA weights): it
# shows which levels are still being learned.

# %%
def label_curve_ends(ax, x_end: float, ys, labels, colors, min_gap: float = 11.0) -> None:
    """Write each curve's label just right of its last point, in the curve's colour.

    Labels closer than ``min_gap`` pixels are pushed apart (keeping their order) and joined to
    their curve's end by a thin line, so ten curves stay readable without a legend to decode.
    """
    ax.figure.canvas.draw()  # constrained layout: the axes get their final position here
    to_px = ax.transData
    points = [(to_px.transform((x_end, y))[1], y, lab, c)
              for y, lab, c in zip(ys, labels, colors) if np.isfinite(y)]
    points.sort(key=lambda item: item[0])
    placed = []
    for py, *_ in points:
        placed.append(max(py, placed[-1] + min_gap) if placed else py)
    for (py, y, lab, c), qy in zip(points, placed):
        # the label 8 pixels right of the curve's end, shifted vertically by qy - py pixels
        ax.annotate(lab, xy=(x_end, y), xytext=(8, qy - py), textcoords="offset pixels",
                    color=c, fontsize=8, va="center", ha="left", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color=c, lw=0.5, shrinkA=0, shrinkB=0))


def demo_loss_per_level(run, cfg: Config, full: dict, data: GaussianMixture,
                        noise: GeometricNoise) -> dict:
    # floors 1/2 (D - sigma^2 E|s*|^2) from many exact scores: sigma^2 amplifies their noise
    report = score_report(None, data, noise.levels(), 10 * cfg.n_eval,
                          torch.Generator().manual_seed(run.args.seed + 8))
    floors = report["floor"]
    sigmas = noise.levels().numpy()
    hist, evals = full["history"], full["evals"]
    window = max(1, min(100, cfg.train_steps // 10))
    smooth = moving_average(hist["level_loss"], window)  # (steps, L)
    steps = np.arange(1, len(smooth) + 1)
    # Ten levels: distinct colours (not a smooth colour map, whose neighbours look alike), the
    # same colour for a level in every panel, and each curve labelled at its end.
    colors = [plt.cm.tab10(i % 10) for i in range(len(sigmas))]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for i, (sigma, c) in enumerate(zip(sigmas, colors)):
        label = f"$\\sigma$ = {sigma:.3g}"
        axes[0].plot(steps, smooth[:, i], color=c, label=label)
        # the floor as a dashed line over the last tenth of the run, where the curve ends
        axes[0].plot([0.9 * steps[-1], steps[-1]], [floors[i].item()] * 2, color=c, ls="--",
                     lw=1.2)
        axes[1].plot(steps, smooth[:, i] / sigma**2, color=c, label=label)
        axes[2].plot(evals["step"], evals["ema"][:, i], color=c, label=label)
    axes[0].set_ylim(0, max(1.05, 1.03 * float(np.nanmax(smooth))))  # the start is above D/2
    axes[0].set_title("$\\sigma^2$-weighted loss per level (dashes at the end: exact floor)")
    axes[0].set_ylabel(r"$\frac{1}{2}\,\mathbb{E}|\sigma s_\theta + z|^2$")
    axes[1].set_yscale("log")
    axes[1].set_title("The same without the weight: $\\ell / \\sigma^2$")
    axes[1].set_ylabel(r"$\frac{1}{2}\,\mathbb{E}|s_\theta + z/\sigma|^2$")
    axes[2].set_yscale("log")
    axes[2].set_title("Excess over the floor (validation, EMA weights)")
    axes[2].set_ylabel(r"$\frac{1}{2}\sigma^2\,\mathbb{E}|s_\theta - s^*_\sigma|^2$")
    labels = [f"{sigma:.3g}" for sigma in sigmas]
    for ax in axes:
        ax.set_xlabel("training step")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(sigmas), fontsize=8)
    for ax in axes:
        ax.margins(x=0.12)  # room for the end labels inside each panel
    label_curve_ends(axes[0], steps[-1], smooth[-1], labels, colors)
    label_curve_ends(axes[1], steps[-1], smooth[-1] / sigmas**2, labels, colors)
    label_curve_ends(axes[2], evals["step"][-1], evals["ema"][-1], labels, colors)
    run.save(fig, "loss_per_level")
    last = hist["level_loss"][-window:]  # (window, L) per-step means, NaN if a level was absent
    final = np.nanmean(last, axis=0)  # last-window training loss of each level
    # its Monte Carlo standard error: the spread of the per-step means over sqrt(#steps)
    count = (~np.isnan(last)).sum(0)
    final_se = (np.nanstd(last, axis=0, ddof=1) / np.sqrt(count) if count.min() > 1
                else np.full(len(sigmas), np.nan))  # too few steps to measure a spread
    unweighted = floors.numpy() / sigmas**2
    return {"level_loss_final": final, "level_loss_se": final_se, "level_floor": floors.numpy(),
            "level_floor_se": report["floor_se"].numpy(),
            "unweighted_floor_ratio": float(unweighted.max() / unweighted.min())}


# %% tags=["active-ipynb"]
# r.update(demo_loss_per_level(run, cfg, trained["full"], data, noise))


# %% [markdown]
# ## 4.5 Warm-up, clipping and the EMA during training
# Left: the learning rate ramps up over the warm-up and then stays constant. Middle: the
# gradient norm before clipping; the dotted line is the threshold $c = 0.5$, set above the
# typical norm so that only the rare spikes are shortened to norm $c$: clipping is a safety
# net, not a second learning rate. The norm *rises* after the first few hundred steps instead
# of shrinking towards 0: DSM's per-batch gradient never vanishes, because the floor is noise
# (the target $-z/\sigma$ is random given $x$), and as the network sharpens (steeper functions
# of $x$, larger weights) the same unpredictable residual $\sigma s_\theta + z$ back-propagates
# into larger parameter gradients. Right: the total excess loss on validation points for the
# raw weights and for their EMA (solid: `full`; dashed: `no_scaling`, which learns its small
# levels more slowly, see 4.6, and ends higher, raw and EMA alike). At a constant learning
# rate the raw weights keep jittering around the optimum; their average over the last ~200
# steps sits much closer to it. A decay of 0.999 (window ~1000 steps) still remembers the
# early, poor weights after 2500 steps: the
# window must be short next to the run (or the learning rate must decay).
#
# **Why the EMA is worse than the raw weights early on** (the first ~700 steps for
# $d = 0.995$, no better until ~1500, and the whole run for $d = 0.999$): an average of a
# trajectory that is still improving fast is *biased* towards where the weights were about
# $1/(1-d)$ steps ago, and those weights were worse. On top of that, the EMA starts at the
# random initial weights $\theta_0$, which keep the weight $d^n$ (Section 2.7): $0.995^{200}
# = 0.37$ after 200 steps, and $0.999^{1000} = 0.37$ after 1000. Averaging pays off only once
# the raw weights move less per window from genuine progress than from noise. This is why
# practitioners start the EMA late, or ramp the decay up (e.g. $d_n = \min(d, (1+n)/(10+n))$).

# %%
def demo_training_strategies(run, cfg: Config, trained: dict) -> dict:
    full = trained["full"]
    hist, evals = full["history"], full["evals"]
    steps = np.arange(1, len(hist["lr"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(steps, hist["lr"])
    axes[0].axvline(cfg.warmup_steps, color="gray", ls=":",
                    label=f"end of warm-up ({cfg.warmup_steps} steps)")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("learning rate")
    axes[0].set_title("Linear warm-up, then constant")
    axes[0].legend()
    axes[1].plot(steps, hist["grad_norm"], lw=0.5, alpha=0.6, label="|g| before clipping")
    axes[1].axhline(cfg.grad_clip, color="k", ls=":", label=f"clip threshold c = {cfg.grad_clip:g}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("global gradient norm")
    clipped = float(np.mean(hist["grad_norm"] > cfg.grad_clip))
    axes[1].set_title(f"Gradient norm (full recipe): {100 * clipped:.0f}% of steps clipped")
    axes[1].legend()
    ax = axes[2]
    for name, style in (("full", "-"), ("no_scaling", "--")):
        ev = trained[name]["evals"]
        ax.plot(ev["step"], ev["raw"].sum(1), style, color="tab:red", label=f"{name}: raw weights")
        ax.plot(ev["step"], ev["ema"].sum(1), style, color="tab:blue",
                label=f"{name}: EMA, d = {cfg.ema_decay:g}")
    ax.plot(evals["step"], evals["slow_ema"].sum(1), "-", color="tab:gray",
            label=f"full: EMA, d = {cfg.slow_ema_decay:g}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("excess loss, summed over levels")
    ax.set_title("Raw weights vs their moving average")
    ax.legend(fontsize=8)
    run.save(fig, "training_strategies")
    return {"clipped_fraction": clipped,
            "excess_raw": {n: float(t["evals"]["raw"][-1].sum()) for n, t in trained.items()},
            "excess_ema": {n: float(t["evals"]["ema"][-1].sum()) for n, t in trained.items()},
            "excess_slow_ema": float(evals["slow_ema"][-1].sum())}


# %% tags=["active-ipynb"]
# r.update(demo_training_strategies(run, cfg, trained))


# %% [markdown]
# ## 4.6 Debugging tip 1: |score| against sigma
# Left: the root-mean-square score $\sqrt{\mathbb{E}|s|^2}$ at $x \sim p_\sigma$ on log-log axes.
# The dotted line is the RMS size of the DSM target,
# $\sqrt{\mathbb{E}|z/\sigma|^2} = \sqrt{D}/\sigma$.
# The exact curve (black) stays below it (Jensen, Section 2.5): roughly parallel to it above
# $\sigma \approx 0.15$ (slope about $-0.94$) but a fifth to a third lower, and it approaches it
# only at the top level $\sigma = 4$, where the noise is about three times the data's spread
# (1.4 per coordinate): they meet only where $\sigma$ is much larger than the data's spread
# (Section 2.5); below $\sigma \approx 0.15$ it flattens, where
# the perturbed score is the data's own score. The networks with output scaling track it at
# every level; the one without it must learn a 30-fold range of output sizes, and its $|s|$
# comes out too small at the small levels.
#
# Why, when both nets minimise the same $\sigma^2$-weighted loss, identical as a function of
# $s$? The difference is the gradient that reaches the network's own output. With scaling the
# output is $f = \sigma s$ and $\partial\ell/\partial f = f + z = O(1)$ at every level. Without
# it the output is $s$ itself and $\partial\ell/\partial s = \sigma(\sigma s + z)$: at
# $\sigma = 0.02$ that is $0.02 \times O(1)$, fifty times weaker, so within the same training
# budget the small levels are learned much more slowly. The summary's "worst-case ratio" row is
# the learned-to-exact ratio of this panel at the level where it is farthest from 1.
#
# Right: the relative error $\sqrt{\mathbb{E}|s_\theta - s^*|^2 / \mathbb{E}|s^*|^2}$ of each
# network per level. Every net is worst at the smallest levels (25-40% at $\sigma = 0.02$),
# because the loss hardly sees errors there: a relative error $r$ costs
# $\tfrac12 r^2\sigma^2\mathbb{E}|s^*|^2$, about 0.002 for $r = 0.3$ at $\sigma = 0.02$, far below
# the loss's own noise. The relative error mixes a wrong size with a wrong direction: at
# $\sigma = 0.02$ `no_scaling`, whose fault is mainly its too-small size, can even come out
# below `concat` and `time_fourier`, whose sizes are right but whose directions are noisier.
# The two time-conditional nets also jump at $\sigma = 4$: they are trained on $t \sim U(0, 1)$,
# and $t = 1$ is the end of that interval, seen from one side only, while the discrete-level
# nets see $\sigma = 4$ itself in a tenth of every batch.

# %%
def demo_score_norms(run, cfg: Config, trained: dict, data: GaussianMixture,
                     noise: GeometricNoise) -> dict:
    sigmas = noise.levels()
    reports = {}
    for name, result in trained.items():
        gen = torch.Generator().manual_seed(run.args.seed + 4)  # the same points for every net
        reports[name] = score_report(as_noise_score(name, result["ema_model"], noise), data,
                                     sigmas, cfg.n_eval, gen)
    exact = reports["full"]["exact_rms"]
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(13, 5))
    s = sigmas.numpy()
    ax.plot(s, math.sqrt(data.dim) / s, "k:", label=r"RMS of the DSM target: $\sqrt{D}/\sigma$")
    ax.plot(s, exact, "ko-", lw=2, label="exact score")
    for name, marker in zip(VARIANTS, "sv^dx"):
        ax.plot(s, reports[name]["rms"], marker=marker, ls="--", ms=5, label=name)
        ax_err.plot(s, reports[name]["rel_error"], marker=marker, ls="-", ms=5, label=name)
    for a in (ax, ax_err):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(r"noise level $\sigma$")
    ax.set_ylabel(r"$\sqrt{\mathbb{E}\,|s(x, \sigma)|^2}$,  $x \sim p_\sigma$")
    ax.set_title("Score magnitude falls like 1/sigma (EMA weights)")
    ax.legend()
    ax_err.set_ylabel(r"relative error $\sqrt{\mathbb{E}|s_\theta - s^*|^2 / \mathbb{E}|s^*|^2}$")
    ax_err.set_title("Where each network is wrong")
    ax_err.legend()
    run.save(fig, "score_norm_vs_sigma")
    upper = sigmas >= 0.15  # where the 1/sigma law applies (sigma above the components' std)
    return {
        "exact_rms": exact,
        "jensen_ratio": float((sigmas.double() * exact / math.sqrt(data.dim)).max()),
        "slope_exact": loglog_slope(sigmas, exact),
        "slope_exact_upper": loglog_slope(sigmas[upper], exact[upper]),
        "slopes": {n: loglog_slope(sigmas, r["rms"]) for n, r in reports.items()},
        "rms_ratio_worst": {n: worst_ratio(r["rms"] / exact, sigmas) for n, r in reports.items()},
        "rel_error": {n: r["rel_error"] for n, r in reports.items()},
        "excess": {n: float(r["excess"].sum()) for n, r in reports.items()},
    }


def worst_ratio(ratio: Tensor, sigmas: Tensor) -> tuple[float, float]:
    """(ratio, sigma) at the level where ratio (L,) is farthest from 1 (0.5 and 2 count alike)."""
    i = int(ratio.log().abs().argmax())
    return float(ratio[i]), float(sigmas[i])


# %% tags=["active-ipynb"]
# r.update(demo_score_norms(run, cfg, trained, data, noise))


# %% [markdown]
# ## 4.7 What output scaling and EMA do to samples
# Every network samples by annealed Langevin dynamics from the same starting points with the
# same noise (a paired comparison), and so does the exact score. Each sample set is compared with
# a reference set of fresh data of the same size, by the sliced Wasserstein distance SW$_2$ and
# the squared MMD with an RBF kernel of bandwidth 0.3 (about twice the components' std, so it
# notices modes that are too wide). The **floor** is a second fresh data set: no sampler can be
# expected to beat it. A third, plainer number: the fraction of samples more than 3 standard
# deviations from every mode, which for the data itself is $P(\chi^2_2 > 9) = e^{-4.5} = 1.1\%$,
# give or take $\sqrt{p(1-p)/n} = 0.23\%$ with $n = 2000$ samples (a binomial count), so a
# data floor of 0.6% or 1.5% is nothing unusual.
#
# **What MMD$^2$ is, and why it can be negative.** The maximum mean discrepancy compares two
# distributions $P$ (samples) and $Q$ (data) through a kernel
# $k(x, y) = e^{-|x - y|^2 / (2h^2)}$, $h = 0.3$, which scores how close two points are:
# $$ \mathrm{MMD}^2 = \mathbb{E}\,k(x, x') + \mathbb{E}\,k(y, y') - 2\,\mathbb{E}\,k(x, y),
#    \qquad x, x' \sim P,\ y, y' \sim Q \text{ independent}. $$
# It is 0 when $P = Q$ (then the three averages are all the same number) and positive when they
# differ: samples then lie closer to other samples, and data to other data, than samples to
# data. `common.metrics.mmd_rbf` estimates each expectation by an average over pairs of
# *different* points (it leaves out $k(x_i, x_i) = 1$), which makes the estimate **unbiased**:
# its average over repeated draws is exactly MMD$^2$. The price is that for $P = Q$ it
# scatters around 0, on both sides, so small negative values are normal. How large is that
# scatter? We measure it directly on pairs of independent data sets of the same size (true
# MMD$^2$ = 0): with 2000 points its standard deviation is a few $10^{-4}$ (the summary prints
# this run's estimate from 20 pairs, itself uncertain by ~20%; the bar chart shades $\pm$2 of
# it). MMD$^2$ values within about two of those standard deviations of 0 are therefore
# indistinguishable from fresh data, and the data floor's own (often negative) value is just
# one draw of that noise.
#
# What the summary shows:
# * **EMA.** For every network the EMA weights sample closer to the data than the raw weights
#   (MMD$^2$ drops several-fold, SW$_2$ falls too): at a constant learning rate the raw weights
#   carry the noise of their last few steps (Section 4.5). The best EMA samplers reach MMD$^2$
#   within two or three noise standard deviations of 0 (compare the summary's noise row), so
#   MMD$^2$ cannot rank them against each other.
# * **Raw weights.** Which modes a raw sampler over- or under-fills depends on where the last
#   few steps happened to leave the weights: random jitter. So do not compare the raw samplers
#   with one another (`full, raw` can have the worst SW$_2$ of all, from an uneven split of its
#   samples between the modes, while `full, EMA` is among the best).
# * **Output scaling.** Without the division by $\sigma$ the network leaves two to three times
#   as many samples between the modes, and its MMD$^2$ is clearly higher: its score at the
#   small levels is too weak (its plateau in 4.6 sits low), so the last levels pull points
#   into the modes
#   too gently.
# * SW$_2$ is dominated by how the samples split between the eight modes; with 2000 samples its
#   noise (a few hundredths) hides the difference output scaling makes, which is why three
#   measures are shown.
# * Even the exact score leaves a little more than 1.1% off the modes: annealed Langevin with
#   50 steps per level is itself an approximation (module 07 studies it).

# %%
def demo_sample_quality(run, cfg: Config, trained: dict, data: GaussianMixture,
                        noise: GeometricNoise) -> dict:
    seed = run.args.seed
    sigmas = noise.levels()
    reference = data.sample(cfg.n_samples, torch.Generator().manual_seed(seed + 5))
    # The noise of MMD^2 itself: pairs of independent data sets, where the true MMD^2 is 0
    noise_gen = torch.Generator().manual_seed(seed + 9)
    mmd_null_mean, mmd_noise = distance_floor(
        lambda: data.sample(cfg.n_samples, noise_gen),
        lambda a, b: mmd_rbf(a, b, bandwidth=cfg.mmd_bandwidth), cfg.n_mmd_pairs)

    def quality(x: Tensor) -> tuple[float, float, float]:
        sw = sliced_wasserstein(x, reference, 512, generator=torch.Generator().manual_seed(seed))
        mmd = mmd_rbf(x, reference, bandwidth=cfg.mmd_bandwidth)
        return sw, mmd, off_mode_fraction(x, data.means, data.precisions)

    def sample(score_fn, dtype=torch.float32) -> Tensor:
        gen = torch.Generator().manual_seed(seed + 6)  # common random numbers for all samplers
        x = sigmas[0].item() * torch.randn(cfg.n_samples, data.dim, generator=gen, dtype=dtype)
        return annealed_langevin(score_fn, x, sigmas.to(dtype), cfg.langevin_steps,
                                 cfg.step_ratio, gen)

    samples = {"data (floor)": data.sample(cfg.n_samples, torch.Generator().manual_seed(seed + 7)),
               "exact score": sample(exact_noise_score_fn(data), torch.float64)}
    for name, result in progress(trained.items(), desc="annealed Langevin", mininterval=0.5):
        samples[f"{name}, EMA"] = sample(as_noise_score(name, result["ema_model"], noise))
        samples[f"{name}, raw"] = sample(as_noise_score(name, result["model"], noise))
    scores = {k: quality(v) for k, v in samples.items()}

    shown = ["data (floor)", "exact score", "full, EMA", "full, raw", "no_scaling, EMA",
             "concat, EMA", "time_fourier, EMA", "time_sinusoidal, EMA"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 10))
    if fig.get_layout_engine() is not None:  # room between the rows for two-line titles
        fig.get_layout_engine().set(h_pad=0.15)
    n_show, box = min(2000, cfg.n_samples), (-3.2, 3.2)
    X, _, grid = grid_points(box, box, 60 if run.quick else 120)
    density = data.log_prob(grid).exp().reshape(X.shape).numpy()  # drawn once, shown 8 times
    for ax, key in zip(axes.flat, shown):
        sw, mmd, off = scores[key]
        ax.imshow(density, origin="lower", extent=(*box, *box), cmap="Blues")
        plot_samples_over_density(ax, samples[key][:n_show], None, xlim=box, ylim=box,
                                  size=1.5, alpha=0.6, label=None,
                                  title=f"{key}\nSW2 {sw:.3f}, MMD$^2$ {mmd:.1e}, "
                                        f"off-mode {100 * off:.1f}%")
    fig.suptitle(f"Annealed Langevin samples ({n_show} shown) over the data density")
    run.save(fig, "samples")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    names = list(trained)
    pos = np.arange(len(names))
    what = ("sliced Wasserstein SW$_2$", "MMD$^2$ (bandwidth 0.3)", "off-mode fraction")
    for j, ax in enumerate(axes):
        ax.bar(pos - 0.2, [scores[f"{n}, raw"][j] for n in names], 0.4, label="raw weights",
               color="tab:red")
        ax.bar(pos + 0.2, [scores[f"{n}, EMA"][j] for n in names], 0.4, label="EMA weights",
               color="tab:blue")
        ax.axhline(scores["data (floor)"][j], color="k", ls="--", label="floor: fresh data")
        ax.axhline(scores["exact score"][j], color="tab:green", ls=":", label="exact score")
        if j == 1:  # MMD^2 is unbiased: values within its noise of 0 mean "as good as data"
            ax.axhspan(-2 * mmd_noise, 2 * mmd_noise, color="gray", alpha=0.3, lw=0, zorder=0,
                       label=r"noise of MMD$^2$ ($\pm$2 std)")
        ax.set_xticks(pos, names, rotation=20)
        ax.set_ylabel(what[j] + " (lower is better)")
        ax.set_title(f"Sample quality: {what[j]}")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top + 0.45 * (top - bottom))  # headroom: the legend above the bars
        ax.legend(fontsize=8, ncol=2, loc="upper right")
    run.save(fig, "sample_quality")
    return {"sample_scores": scores, "mmd_noise": mmd_noise, "mmd_null_mean": mmd_null_mean}


# %% tags=["active-ipynb"]
# r.update(demo_sample_quality(run, cfg, trained, data, noise))


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_06_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/06_score_networks.py`: try first, then compare.

# %%
def exercise_fourier_features(t: Tensor, W: Tensor) -> Tensor:
    """Exercise 6.1: Gaussian Fourier features, written out.

    Args:
        t: (N,) times or log noise levels.
        W: (K,) fixed frequencies.
    Returns:
        (N, 2K): [sin(2 pi W_j t_n) for j = 1..K, then cos(2 pi W_j t_n) for j = 1..K].

    Example: t = [0.25], W = [1.0] gives [[1.0, 0.0]] (up to round-off).

    Hint: an outer product t[:, None] * W[None, :] gives every angle at once; torch.cat along
    the last axis. Don't forget the 2 pi: W counts cycles per unit of t, not radians.
    """
    # TODO: angles (N, K), then sines and cosines side by side.
    raise NotImplementedError("Exercise 6.1: implement exercise_fourier_features")


def exercise_weighted_dsm_loss(score_fn: NoiseScoreFn, x0: Tensor, sigma: Tensor,
                               z: Tensor) -> Tensor:
    """Exercise 6.2: the sigma^2-weighted denoising score matching loss, per sample.

    Args:
        score_fn: (x: (N, D), sigma: (N,)) -> (N, D).
        x0:       (N, D) data points.
        sigma:    (N,) noise level of each sample.
        z:        (N, D) standard normal noise.
    Returns:
        (N,) the losses 1/2 sigma^2 |s(x0 + sigma z, sigma) + z / sigma|^2.

    Example: with the perfect "noise oracle" s = -z / sigma every loss is 0; with s = 0 the
    loss is 1/2 |z|^2, whatever sigma is.

    Hint: sigma must broadcast against (N, D): sigma[:, None]. Multiply out the weight:
    1/2 sigma^2 |s + z/sigma|^2 = 1/2 |sigma s + z|^2.
    """
    # TODO: perturb, evaluate the score, weight by sigma^2.
    raise NotImplementedError("Exercise 6.2: implement exercise_weighted_dsm_loss")


def exercise_gaussian_score_rms(cov: Tensor, sigma: Tensor) -> Tensor:
    """Exercise 6.3: the 1/sigma law, exactly, for Gaussian data.

    Data x0 ~ N(m, C) perturbed to x = x0 + sigma z has density N(m, C + sigma^2 I) and score
    s(x) = -(C + sigma^2 I)^{-1} (x - m). Compute sqrt(E|s(x)|^2) for each sigma.

    Args:
        cov:   (D, D) the data covariance C (symmetric positive definite).
        sigma: (M,) noise levels.
    Returns:
        (M,) the root-mean-square score sqrt(tr((C + sigma^2 I)^{-1})).

    Example: C = I in D = 2, sigma = 1: sqrt(2 / 2) = 1.0. For large sigma the answer tends
    to sqrt(D) / sigma; for sigma -> 0 to sqrt(tr(C^{-1})).

    Hint: E|P (x - m)|^2 = tr(P Sigma P) with Sigma = C + sigma^2 I and P = Sigma^{-1}; it
    simplifies. With the eigenvalues lambda_k of C:
    tr((C + sigma^2 I)^{-1}) = sum_k 1 / (lambda_k + sigma^2).
    """
    # TODO: eigenvalues of C (torch.linalg.eigvalsh), then the sum above for every sigma.
    raise NotImplementedError("Exercise 6.3: implement exercise_gaussian_score_rms")


def exercise_ema_closed_form(history: Tensor, decay: float) -> Tensor:
    """Exercise 6.4: the EMA after n updates, without a loop.

    The EMA starts at theta_0 and is updated with theta_1, ..., theta_n:
        theta_bar <- decay * theta_bar + (1 - decay) * theta_k.
    Unrolled: theta_bar_n = decay^n theta_0 + (1 - decay) sum_{k=1}^{n} decay^(n-k) theta_k.

    Args:
        history: (n + 1, P): row 0 is the initial weights theta_0, row k the weights after
                 step k.
        decay:   d in [0, 1].
    Returns:
        (P,) the EMA weights theta_bar_n, in history's dtype (the check uses float64).

    Example: history [[2.], [1.], [1.]], decay 0.5 (n = 2):
        0.5^2 * 2 + 0.5 * (0.5 * 1 + 1 * 1) = 0.5 + 0.75 = 1.25.

    Hint: build the (n + 1,) weight vector [d^n, (1-d) d^(n-1), ..., (1-d) d^0] (it sums to
    1; create it with dtype=history.dtype) and contract it with history.
    """
    # TODO: the weights, then weights @ history.
    raise NotImplementedError("Exercise 6.4: implement exercise_ema_closed_form")


def exercise_warmup_cosine_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Exercise 6.5: a learning-rate multiplier with linear warm-up and cosine decay.

    For use as LambdaLR(optimizer, lambda k: exercise_warmup_cosine_lambda(k, W, T)):
        k < W:       (k + 1) / W                                    (as warmup_lr_lambda)
        W <= k < T:  1/2 (1 + cos(pi (k - W) / (T - W)))            (1 at k = W, -> 0 at T)
        k >= T:      0
    Assume 0 < W < T.

    Example: W = 10, T = 110: k = 0 -> 0.1, k = 9 -> 1.0, k = 10 -> 1.0, k = 60 -> 0.5.

    Hint: math.cos and math.pi. A decaying learning rate is the other way (beside EMA) to
    remove the jitter of the final weights.
    """
    # TODO: three cases.
    raise NotImplementedError("Exercise 6.5: implement exercise_warmup_cosine_lambda")


# %% [markdown]
# ## Summary
# - A score network for all noise levels takes the level as an input: as one more input of a
#   plain MLP, or, better, through an embedding (Gaussian Fourier features with kernel
#   $e^{-2\pi^2 s^2 \Delta^2}$, or the sinusoidal embedding) projected into every hidden layer.
# - The score's size falls like $1/\sigma$: the DSM target $-z/\sigma$ has
#   $\mathbb{E}|z/\sigma|^2 = D/\sigma^2$ and the true score is bounded by it on average.
#   Dividing the network's output by $\sigma$ builds this law in; the network then predicts the
#   noise, an $O(1)$ target, receives an $O(1)$ gradient at every level, and its $|s|$ tracks
#   the exact curve at every level.
# - The $\sigma^2$ weighting puts every level's loss *floor*
#   $\tfrac12(D - \sigma^2\mathbb{E}|s^*|^2)$ in $[0, D/2]$; a good network sits just above it,
#   and the gap is the weighted score error.
# - Warm-up and clipping keep early and unlucky steps small; an EMA of the weights, with a
#   window short next to the run, removes most of the jitter of a constant learning rate and
#   gives far better samples than the raw weights.
# - Debug on 2D with exact scores: plot $|s|$ against $\sigma$, and the loss of every level
#   against its floor.


# %%
def device_note(device: torch.device) -> str:
    return (f"Note: module 06 runs on the CPU whatever --device says ({device} is not used): "
            f"its 2D networks are too small to gain from an accelerator.")


def quick_banner(cfg: Config) -> str:
    return "\n".join([
        "*** --quick: a SMOKE RUN that only checks that the code runs. The networks train for",
        f"*** {cfg.train_steps} steps (default run: {Config.train_steps}) and are far from "
        f"trained; the sample sets are small.",
        "*** The 'expected' column of the summary describes the DEFAULT run, so many rows will",
        "*** not match it here. Run without --quick for the numbers the text discusses.",
    ])


def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    for flag in ("train_steps", "langevin_steps", "ema_decay", "slow_ema_decay"):
        if getattr(run.args, flag) is not None:
            setattr(cfg, flag, getattr(run.args, flag))
    if run.device.type != "cpu":
        print(device_note(run.device))
    if run.quick:
        print(quick_banner(cfg))
    data, noise = mixture_data(), noise_ladder(cfg)
    sigmas = noise.levels()

    r = {}
    r.update(demo_embeddings(run, cfg))
    trained = train_all(run, cfg, data, noise)
    r.update(demo_score_norms(run, cfg, trained, data, noise))
    r.update(demo_loss_per_level(run, cfg, trained["full"], data, noise))
    r.update(demo_training_strategies(run, cfg, trained))
    r.update(demo_sample_quality(run, cfg, trained, data, noise))

    q = r["sample_scores"]
    rows = [
        ("Fourier W: std / scale (E = 4096)", f"{r['fourier_w_std_ratio']:.3f}", "1 (+- 0.03)"),
        ("Fourier kernel vs exp(-2 pi^2 s^2 D^2)", f"max error {r['fourier_kernel_error']:.3f}",
         "< 0.07 (Monte Carlo, 2048 frequencies)"),
        (f"Fourier side lobes (|D| >= 0.05), RMS, E = {cfg.embed_dim}",
         f"this W {r['side_lobe_rms']:.3f}; 200 draws {r['side_lobe_rms_avg']:.3f}",
         f"1/sqrt(E) = {1 / math.sqrt(cfg.embed_dim):.3f} (one draw: +- tens of %)"),
        ("exact RMS|s| at sigma_max .. sigma_min",
         f"{r['exact_rms'][0]:.3f} .. {r['exact_rms'][-1]:.2f}",
         f"<= sqrt(D)/sigma = {math.sqrt(2) / cfg.sigma_max:.3f} .. "
         f"{math.sqrt(2) / cfg.sigma_min:.1f}"),
        ("max sigma RMS|s*| / sqrt(D) over levels", f"{r['jensen_ratio']:.3f}", "<= 1 (Jensen)"),
        ("log-log slope of RMS|s| (all levels)",
         "exact " + f"{r['slope_exact']:.2f}; " + "; ".join(
             f"{n} {v:.2f}" for n, v in r["slopes"].items()), "learned = exact"),
        ("slope of exact RMS|s|, sigma >= 0.15", f"{r['slope_exact_upper']:.2f}",
         "about -1 (the 1/sigma law)"),
        ("worst-case ratio RMS|s| learned/exact (sigma)", "; ".join(
            f"{n} {v:.2f} ({s:.2g})" for n, (v, s) in r["rms_ratio_worst"].items()),
         "~0.85-1 with / sigma; ~0.75 without (too weak)"),
        ("unweighted floors floor/sigma^2: max / min", f"{r['unweighted_floor_ratio']:.1e}",
         "weighted floors all in [0, D/2] = [0, 1]"),
    ]
    for i, sigma in enumerate(sigmas.tolist()):
        rows.append((f"sigma^2-weighted loss, sigma = {sigma:.3g} (full)",
                     f"{r['level_loss_final'][i]:.3f} +- {r['level_loss_se'][i]:.3f}",
                     f"floor {r['level_floor'][i]:.3f} +- {r['level_floor_se'][i]:.2g}; "
                     f"loss >= floor up to MC noise"))
    rows += [
        ("excess loss summed over levels (EMA, fresh points)", "; ".join(
            f"{n} {v:.3f}" for n, v in r["excess"].items()), "0 = exact score"),
        ("excess, full: raw / EMA / slow EMA (validation set)",
         f"{r['excess_raw']['full']:.3f} / {r['excess_ema']['full']:.3f} / "
         f"{r['excess_slow_ema']:.3f}", f"EMA d={cfg.ema_decay:g} lowest"),
        ("steps clipped (full recipe)", f"{100 * r['clipped_fraction']:.0f}%", "some"),
    ]
    p_off = math.exp(-4.5)
    off_se = math.sqrt(p_off * (1 - p_off) / cfg.n_samples)  # binomial standard error
    rows.append((f"MMD^2 noise: 2 fresh data sets, {cfg.n_mmd_pairs} pairs",
                 f"std {r['mmd_noise']:.1e} (mean {r['mmd_null_mean']:.0e})",
                 "true MMD^2 = 0; |MMD^2| < 2 std ~ as good as data"))
    for key in ["data (floor)", "exact score"] + [f"{n}, {w}" for n in trained
                                                  for w in ("raw", "EMA")]:
        sw, mmd, off = q[key]
        expected = {"data (floor)": f"the floor; MMD^2 ~ 0; off-mode exp(-4.5) = "
                                    f"{100 * p_off:.1f}% +- {100 * off_se:.2f}%",
                    "exact score": "near the floor",
                    "no_scaling, EMA": "below raw; above full, EMA (no / sigma)"}.get(
            key, "above EMA" if key.endswith("raw") else "below raw weights")
        rows.append((f"samples: {key}", f"SW2 {sw:.3f}, MMD^2 {mmd:.1e}, off-mode "
                                        f"{100 * off:.1f}%", expected))
    title = "What this run measured"
    if run.quick:
        title += " (--quick SMOKE RUN: undertrained; 'expected' describes the default run)"
    run.finish(rows, globals(), "06", title)
    return r


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
