"""
FILE: 04_denoising_score_matching.py
DIFFICULTY: Intermediate
ESTIMATED TIME: 2 hours
PREREQUISITES: 02_score_matching_theory.py (explicit and denoising score matching, the DSM-ESM
    constant), 03_langevin_dynamics.py (sampling with a score), PyTorch training loops (Adam).

LEARNING OBJECTIVES:
- Train a neural score network s_theta(x) by denoising score matching (DSM) on 2D data, with
  nothing but samples of the data.
- Check that DSM learns the score of the *noise-perturbed* density p_sigma, by comparing the
  trained network with the exact perturbed score of a Gaussian mixture.
- See the role of the noise level sigma: a small sigma gives an accurate score where the data
  are and a poor one where they are not (low density); a large sigma gives a smooth score that
  is easier to learn but describes a blurred version of the data.
- Train on a Swiss roll and draw samples with Langevin dynamics using the learned score.
- Denoise with Tweedie's formula E[x | x~] = x~ + sigma^2 grad log p_sigma(x~), and see that the
  sigma^2-weighted DSM loss L_sigma = 1/2 E|sigma s_theta(x~) + z|^2 is exactly the mean squared
  error of the denoiser x~ + sigma^2 s_theta(x~) divided by 2 sigma^2 (module 02's unweighted
  loss is that error divided by 2 sigma^4).

MATHEMATICAL BACKGROUND:
  Notation: data x ~ p on R^D (D is the dimension; D = 2 in every example here), noise
  z ~ N(0, I), noisy point x~ = x + sigma z; |v|^2 = v^T v; s_sigma = grad log p_sigma.

- Perturbation kernel:  q_sigma(x~ | x) = N(x~; x, sigma^2 I),
                        grad_{x~} log q_sigma(x~ | x) = -(x~ - x) / sigma^2 = -z / sigma.
- Perturbed density:    p_sigma(x~) = int p(x) q_sigma(x~ | x) dx = (p * N(0, sigma^2 I))(x~);
  for a mixture sum_k w_k N(mu_k, C_k) it is sum_k w_k N(mu_k, C_k + sigma^2 I).
- The DSM target's conditional mean (Bayes: p(x | x~) = p(x) q_sigma(x~ | x) / p_sigma(x~)):
      E[-z/sigma | x~] = int grad_{x~} q_sigma(x~ | x) p(x) dx / p_sigma(x~) = s_sigma(x~).
- DSM loss (Vincent 2011) and its decomposition (module 02): expand the square, use
  E[s_theta(x~) . z/sigma] = -E[s_theta . s_sigma] (condition on x~) and E|z|^2 = D:
      J_DSM(theta) = 1/2 E_{x, z} | s_theta(x~) + z/sigma |^2
                   = 1/2 E|s_theta|^2 - E[s_theta . s_sigma] + D / (2 sigma^2)
                   = 1/2 E_{p_sigma} |s_theta - s_sigma|^2 + C_sigma,
      C_sigma = D / (2 sigma^2) - 1/2 E_{p_sigma} |s_sigma|^2.
- Weighted by lambda(sigma) = sigma^2 so that it is O(1) at every sigma:
      L_sigma(theta) = sigma^2 J_DSM = 1/2 E | sigma s_theta(x + sigma z) + z |^2
                     = sigma^2/2 E_{p_sigma} | s_theta - s_sigma |^2 + L*_sigma,
      L*_sigma = sigma^2 C_sigma = D/2 - sigma^2/2 E_{p_sigma} |s_sigma|^2   (the loss floor).
  Since sigma s_sigma(x~) = -E[z | x~] (the conditional mean above), the floor is also
      L*_sigma = 1/2 E | z - E[z | x~] |^2,   the part of z that x~ cannot predict.
- Density-weighted relative error (the accuracy measure of this module):
      R_sigma = E_{x~ ~ p_sigma} |s_theta - s_sigma|^2 / E_{x~ ~ p_sigma} |s_sigma|^2,
  so L_sigma(theta) - L*_sigma = sigma^2/2 R_sigma E|s_sigma|^2 (the excess loss).
- High- and low-density regions: c_sigma = the 1% quantile of p_sigma(X) for X ~ p_sigma, so the
  region {p_sigma >= c_sigma} holds 99% of the mass (a highest-density region); the low-density
  region is the rest of the plotting box [-4, 4]^2.
- Tweedie's formula (Bayes again: grad_{x~} q_sigma(x~ | x) = q_sigma(x~ | x) (x - x~) / sigma^2,
  so grad log p_sigma(x~) = E[(x - x~) / sigma^2 | x~]):
      E[x | x~] = x~ + sigma^2 s_sigma(x~).
- DSM is denoising: with the learned denoiser xhat_theta(x~) = x~ + sigma^2 s_theta(x~),
      sigma s_theta(x~) + z = (xhat_theta(x~) - x) / sigma,
      so L_sigma(theta) = E|xhat_theta(x~) - x|^2 / (2 sigma^2);
  the minimum mean squared error is E|E[x|x~] - x|^2 = 2 sigma^2 L*_sigma
                                                   = sigma^2 (D - sigma^2 E|s_sigma|^2),
  and any denoiser's excess over it is E|xhat_theta - E[x|x~]|^2 = sigma^4 E|s_theta - s_sigma|^2
  (the cross term E[(xhat_theta - E[x|x~]) . (E[x|x~] - x)] is 0: condition on x~).

IMPLEMENTATION NOTES:
- One plain MLP 2 -> 128 -> 128 -> 2 (SiLU), the `mlp_score_net` of module 02, is trained per
  noise level; conditioning one network on sigma is module 06's subject. Training draws a fresh
  batch of 512 data points every step (so the minimiser is exactly the perturbed score of the
  data distribution, not of a finite training set) and uses Adam with a cosine-decayed
  learning rate. `dsm_loss_sigma2`, `tweedie_denoise` and the `training_steps` loop are building
  blocks that later modules can reuse through `load_module("04")`.
- Networks train in float32; every comparison with a closed form is computed in float64.
- Langevin sampling reuses `langevin` from module 03 (`load_module("03")`). Every Swiss-roll
  chain runs for the same total Langevin time T = steps x step size (default 30), with step size
  0.5 sigma^2, so a smaller sigma takes more steps.
- Stated pass threshold for the accuracy: R_sigma < 0.05. The default run (4,000 steps per
  network) passes it at every default sigma (measured: 0.018 at sigma = 0.05, 0.0055 at
  sigma = 0.2, under 0.002 from sigma = 0.5 up); the tests train sigma = 0.5 for the 300 steps
  of --quick, seed 0, and require the same threshold.
- --sigmas accepts noise levels in [0.01, 1.5]. Above 1.5 the 99% region covers the whole
  plotting box, so no low-density region is left to measure. At the low end the learnable part
  of the loss, sigma^2/2 E|s_sigma|^2, shrinks like sigma^2 while the loss itself stays near
  D/2 = 1: it is 0.012 at sigma = 0.05 and about 5e-4 at sigma = 0.01, a signal the minibatch
  noise almost buries. The lower edge is there for exploring, not for passing: at sigma = 0.01
  the 4,000 default steps reach only R_sigma of about 0.1 (0.08 to 0.11 measured over seeds),
  above the 0.05 threshold.
- A default run trains six small networks and runs the Langevin chains in about 1.5-2 min of
  CPU time on one core (user + sys: 80-90 s on a quiet machine, up to 125 s measured on a busy
  shared one, whose wall time can reach 3.5 min; the 2D networks are too small to gain from a
  second thread); --quick trains three, for 300 steps each (about 15 s of CPU), and its
  numbers are a smoke test, not the ones the text discusses.

Run:
    python 04_denoising_score_matching.py           # figures: outputs/04_denoising_score_matching/
    python 04_denoising_score_matching.py --quick   # smoke run, about 15 s
    pytest tests/test_04_denoising_score_matching.py   # tests of the equations
    pytest tests/test_04_exercises.py -k your_answer   # check your answers

References:
- P. Vincent (2011), A connection between score matching and denoising autoencoders. Neural
  Computation 23(7).
- Y. Song and S. Ermon (2019), Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (Section 3: the manifold hypothesis and low-density regions.)
- B. Efron (2011), Tweedie's formula and selection bias. JASA 106(496).
- M. Raphan and E. P. Simoncelli (2011), Least squares estimation without priors or supervision.
  Neural Computation 23(2). (Denoisers from scores.)
- K. Miyasawa (1961), An empirical Bayes estimator of the mean of a normal population. Bull.
  Inst. Internat. Statist. 38. (The first statement of the formula for Gaussian noise.)
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# `torch` trains the networks, `matplotlib` draws, `tqdm` shows training progress (through
# `common.progress`, which keeps bars out of logs). From `common` we take the shared command
# line, the Gaussian mixture with exact perturbed scores and posterior means, the Swiss roll, the
# sliced Wasserstein distance, and `expand_to`, which reshapes a noise level given as a number or
# one per sample (N,) to broadcast against x (N, ...). Two earlier modules lend building blocks:
# module 02 its plain MLP score network, module 03 its Langevin sampler.

# %%
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D

from common.cli import Count, Real, start_run
from common.cli import make_parser as shared_parser
from common.datasets import GaussianMixture, swiss_roll
from common.metrics import sliced_wasserstein
from common.modules import load_module
from common.plotting import grid_points, plot_density, plot_score_field
from common.progress import progress
from common.training import expand_to

MODULE = "04_denoising_score_matching"
Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]  # x (N, D) -> s(x) (N, D)

F64 = torch.float64  # closed-form comparisons
F32 = torch.float32  # network training
BOX = (-4.0, 4.0)  # the square [-4, 4]^2 where fields and error maps are drawn


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    sigmas: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0)  # noise levels for the mixture
    steps: int = 4000  # Adam steps per network
    batch: int = 512  # data points per step (fresh draws every step)
    lr: float = 5e-3  # initial Adam learning rate (cosine decay to 0)
    hidden: int = 128  # width of the two hidden layers
    monitor_every: int = 100  # steps between exact-error evaluations during training
    n_monitor: int = 4096  # p_sigma samples for the error curve during training
    n_eval: int = 20_000  # p_sigma samples for the final errors and the Tweedie check
    n_floor: int = 1_000_000  # p_sigma samples for the loss floor (exact scores: cheap)
    grid: int = 101  # grid x grid points for the error maps
    arrows: int = 17  # score arrows per axis
    tweedie_sigma: float = 0.5  # the noise level of the denoising figure
    roll_sigmas: tuple[float, ...] = (0.1, 0.25)  # noise levels for the Swiss roll
    chains: int = 2000  # Langevin chains = number of Swiss-roll samples
    langevin_time: float = 30.0  # total Langevin time T = steps x eps, the same for every sigma
    langevin_factor: float = 0.5  # step size eps = langevin_factor * sigma^2
    sw_repeats: int = 6  # independent data draws for the sliced Wasserstein mean and spread

    @classmethod
    def quick(cls) -> Config:
        return cls(sigmas=(0.2, 0.5), steps=300, monitor_every=50, n_monitor=2048, n_eval=4000,
                   n_floor=4000, grid=41, arrows=11, roll_sigmas=(0.25,), chains=500,
                   langevin_time=6.0)


SIGMA_RANGE = (0.01, 1.5)  # allowed --sigmas (module docstring: why)


# argparse type for --sigmas: below 0.01 too little signal, above 1.5 the 99% region of p_sigma
# fills the plotting box.
mixture_sigma = Real(*SIGMA_RANGE, why="the 99% region fills the plotting box")


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 04: denoising score matching with an MLP on 2D data.")
    # CPU time at the default sizes: a step of the six networks (four mixture levels, two Swiss
    # roll levels) ~24 ms (measured with --quick's three: 12 ms); a unit of Langevin time T
    # ~1 s (232 steps of 2000 chains at sigma = 0.1 and 0.25).
    parser.add_argument("--steps", type=Count(1, seconds_each=24e-3, unit="step"), default=None,
                        help="Adam steps per network (default: 4000, or 300 with --quick)")
    parser.add_argument("--sigmas", type=mixture_sigma, nargs="+", default=None,
                        metavar="SIGMA",
                        help="noise levels for the mixture, each in [0.01, 1.5] "
                             "(default: 0.05 0.2 0.5 1.0)")
    parser.add_argument("--langevin-time", type=Real(0, low_open=True, seconds_each=1.0,
                                                     unit="time unit"),
                        default=None, metavar="T",
                        help="total Langevin time steps x step size of every Swiss-roll chain; "
                             "a chain at sigma takes T / (0.5 sigma^2) steps (default: 30, or "
                             "6 with --quick)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 Perturbing the data with Gaussian noise
# The data live in $\mathbb R^D$: **$D$ is the dimension** (here always $D = 2$), and
# $|v|^2 = v^\top v$. Take a data point $x \sim p$ and add Gaussian noise of standard deviation
# $\sigma$: $\tilde x = x + \sigma z$, $z \sim \mathcal N(0, I_D)$. The **perturbation kernel**
# and its score (in $\tilde x$, for fixed $x$) are
# $$ q_\sigma(\tilde x \mid x) = \mathcal N(\tilde x; x, \sigma^2 I), \qquad
#    \nabla_{\tilde x} \log q_\sigma(\tilde x \mid x) = -\frac{\tilde x - x}{\sigma^2}
#    = -\frac{z}{\sigma}. $$
# The noisy points have the **perturbed density** $p_\sigma = p * \mathcal N(0, \sigma^2 I)$,
# a blurred copy of $p$. For a Gaussian mixture the blur is exact: each component
# $\mathcal N(\mu_k, C_k)$ becomes $\mathcal N(\mu_k, C_k + \sigma^2 I)$
# (`GaussianMixture.perturbed(sigma)`), so we know $s_\sigma = \nabla \log p_\sigma$ exactly.
#
# ## 2.2 Denoising score matching
# We cannot regress a network on $s_\sigma$, which we do not know for real data. DSM regresses it
# on the kernel's score instead, which we *do* know for every training pair $(x, z)$:
# $$ J_{\mathrm{DSM}}(\theta) = \tfrac12\, \mathbb E_{x, z}
#    \big| s_\theta(x + \sigma z) + z/\sigma \big|^2 . $$
# **Step 1, the target's conditional mean.** By Bayes, the clean point given the noisy one has
# density $p(x \mid \tilde x) = q_\sigma(\tilde x \mid x)\, p(x) / p_\sigma(\tilde x)$, and
# $q \nabla \log q = \nabla q$, so
# $$ \mathbb E\!\left[-\frac{z}{\sigma} \,\middle|\, \tilde x\right]
#    = \int \nabla_{\tilde x} \log q_\sigma(\tilde x \mid x)\,
#      \frac{q_\sigma(\tilde x \mid x)\, p(x)}{p_\sigma(\tilde x)}\, dx
#    = \frac{\nabla_{\tilde x} \int q_\sigma(\tilde x \mid x)\, p(x)\, dx}{p_\sigma(\tilde x)}
#    = \nabla \log p_\sigma(\tilde x) = s_\sigma(\tilde x). $$
# **Step 2, expand the square.** Write $s_\theta$ for $s_\theta(\tilde x)$:
# $$ J_{\mathrm{DSM}}(\theta) = \tfrac12 \mathbb E|s_\theta|^2
#    + \mathbb E\big[s_\theta \cdot z/\sigma\big] + \frac{\mathbb E|z|^2}{2\sigma^2}. $$
# The last term is $D/(2\sigma^2)$, since $\mathbb E|z|^2 = D$. In the middle term $s_\theta$
# depends on $\tilde x$ only, so by the **law of total expectation**
# ($\mathbb E[Y] = \mathbb E[\mathbb E[Y \mid \tilde x]]$) we may first average $z$ given
# $\tilde x$ (step 1):
# $\mathbb E[s_\theta \cdot z/\sigma] = \mathbb E[s_\theta \cdot \mathbb E[z/\sigma \mid \tilde x]]
# = -\mathbb E[s_\theta \cdot s_\sigma]$.
# **Step 3, complete the square** with $\tfrac12 \mathbb E|s_\sigma|^2$:
# $$ J_{\mathrm{DSM}}(\theta)
#    = \tfrac12 \mathbb E|s_\theta|^2 - \mathbb E[s_\theta \cdot s_\sigma] + \frac{D}{2\sigma^2}
#    = \underbrace{\tfrac12\, \mathbb E_{p_\sigma} |s_\theta - s_\sigma|^2}
#        _{J_{\mathrm{ESM},\sigma}(\theta)}
#    + \underbrace{\frac{D}{2\sigma^2} - \tfrac12\, \mathbb E_{p_\sigma} |s_\sigma|^2}
#        _{C_\sigma}. $$
# This is module 02's identity $J_{\mathrm{DSM}} = J_{\mathrm{ESM},\sigma} + C_\sigma$, with the
# same constant $C_\sigma$ (`dsm_minus_esm` there). The constant does not depend on $\theta$,
# so DSM and explicit score matching on $p_\sigma$ have the same minimiser, $s_\sigma$: the
# network learns the score of the *perturbed* density, not of $p$ itself.
#
# ## 2.3 The weighting, and the loss floor
# The target $-z/\sigma$ has size $1/\sigma$, so $J_{\mathrm{DSM}}$ is huge for small $\sigma$.
# We multiply by $\lambda(\sigma) = \sigma^2$ (the weighting of Song and Ermon 2019), which does
# not move the minimiser and gives a loss of order one at every noise level. Multiplying the
# last line of 2.2 by $\sigma^2$:
# $$ L_\sigma(\theta) = \sigma^2 J_{\mathrm{DSM}}(\theta)
#    = \tfrac12\, \mathbb E_{x, z} \big| \sigma\, s_\theta(x + \sigma z) + z \big|^2
#    = \frac{\sigma^2}{2}\, \mathbb E_{p_\sigma} |s_\theta - s_\sigma|^2 + L^*_\sigma, $$
# $$ L^*_\sigma = \sigma^2 C_\sigma
#    = \frac{D}{2} - \frac{\sigma^2}{2}\, \mathbb E_{p_\sigma} |s_\sigma|^2 . $$
# The **floor** $L^*_\sigma$ is what the perfect network scores: the part of the noise $z$ that
# cannot be predicted from $\tilde x$. Indeed, step 1 says $\sigma s_\sigma(\tilde x)
# = -\mathbb E[z \mid \tilde x]$, so the perfect network's residual is
# $\sigma s_\sigma + z = z - \mathbb E[z \mid \tilde x]$ and
# $L^*_\sigma = \tfrac12 \mathbb E|z - \mathbb E[z \mid \tilde x]|^2$, the mean squared error of
# the best guess of $z$ from $\tilde x$. It is close to $D/2$ when $\sigma$ is small, because then
# almost all of $z$ is unpredictable; the learnable part,
# $\tfrac{\sigma^2}{2} \mathbb E |s_\sigma|^2$, is a small signal under a large noise (0.012 out
# of $D/2 = 1$ at $\sigma = 0.05$). That is why small noise levels train slowly: every gradient
# is mostly noise.
#
# ## 2.4 How we measure a learned score
# The **density-weighted relative error** compares the network with the exact perturbed score
# where the noisy data actually are:
# $$ R_\sigma = \frac{\mathbb E_{\tilde x \sim p_\sigma}
#                      |s_\theta(\tilde x) - s_\sigma(\tilde x)|^2}
#                    {\mathbb E_{\tilde x \sim p_\sigma} |s_\sigma(\tilde x)|^2}, $$
# estimated on fresh samples of $p_\sigma$. By 2.3, the **excess loss**
# $L_\sigma(\theta) - L^*_\sigma$ is exactly $\tfrac{\sigma^2}{2} R_\sigma \mathbb E|s_\sigma|^2$:
# the loss measures this density-weighted error and nothing else, so it barely notices errors
# where $p_\sigma$ is small.
# **Our pass threshold: $R_\sigma < 0.05$.** The first rows of the summary print $R_\sigma$ for
# every trained $\sigma$ (the default run passes at every level, and the smallest $\sigma$ is the
# hardest), and `tests/test_04_denoising_score_matching.py` checks the threshold after the 300
# steps of a `--quick` run at $\sigma = 0.5$ with seed 0.
#
# To look *where* the network is wrong, we split the plotting box $[-4, 4]^2$ in two. Let
# $c_\sigma$ be the 1% quantile of $p_\sigma(X)$ for $X \sim p_\sigma$; the **high-density
# region** $\{p_\sigma \ge c_\sigma\}$ holds 99% of the mass, and the **low-density region** is
# the rest of the box. On a regular grid, each region's relative error is
# $\sum |s_\theta - s_\sigma|^2 / \sum |s_\sigma|^2$ over the grid points in it (a squared
# error, like $R_\sigma$): every point of the region counts the same, whatever its density.
#
# ## 2.5 Tweedie's formula: the score is a denoiser
# **The formula, by Bayes.** Differentiate the kernel:
# $\nabla_{\tilde x}\, q_\sigma(\tilde x \mid x) = q_\sigma(\tilde x \mid x)\,
# (x - \tilde x)/\sigma^2$. Differentiating $p_\sigma(\tilde x) = \int p(x)\,
# q_\sigma(\tilde x \mid x)\, dx$ under the integral and dividing by $p_\sigma(\tilde x)$ turns
# $p(x)\, q_\sigma(\tilde x \mid x) / p_\sigma(\tilde x)$ into the posterior $p(x \mid \tilde x)$:
# $$ \nabla \log p_\sigma(\tilde x)
#    = \int \frac{x - \tilde x}{\sigma^2}\, \frac{p(x)\, q_\sigma(\tilde x \mid x)}
#      {p_\sigma(\tilde x)}\, dx
#    = \frac{\mathbb E[x \mid \tilde x] - \tilde x}{\sigma^2}
#    \quad\Longrightarrow\quad
#    \mathbb E[x \mid \tilde x] = \tilde x + \sigma^2\, \nabla \log p_\sigma(\tilde x). $$
# The posterior mean is the best denoiser in mean squared error, and this says that the score
# *is* that denoiser, up to a shift and a factor.
#
# **DSM trains a denoiser.** Call $\hat x_\theta(\tilde x) = \tilde x + \sigma^2 s_\theta(\tilde x)$
# the *learned denoiser*. Since $\tilde x - x = \sigma z$,
# $$ \sigma s_\theta(\tilde x) + z = \frac{\hat x_\theta(\tilde x) - x}{\sigma}
#    \quad\Longrightarrow\quad
#    L_\sigma(\theta) = \frac{1}{2\sigma^2}\, \mathbb E\, |\hat x_\theta(\tilde x) - x|^2 . $$
# So the loss floor is the minimum denoising error:
# $\mathbb E|\mathbb E[x|\tilde x] - x|^2 = 2\sigma^2 L^*_\sigma
# = \sigma^2 (D - \sigma^2 \mathbb E|s_\sigma|^2)$.
#
# **The excess error, by the cross-term argument.** Write $m = \mathbb E[x \mid \tilde x]$ and
# split $\hat x_\theta - x = (\hat x_\theta - m) + (m - x)$:
# $$ \mathbb E|\hat x_\theta - x|^2 = \mathbb E|\hat x_\theta - m|^2
#    + 2\, \mathbb E\big[(\hat x_\theta - m) \cdot (m - x)\big] + \mathbb E|m - x|^2 . $$
# The cross term is zero: given $\tilde x$, the factor $\hat x_\theta - m$ is a fixed vector and
# $\mathbb E[m - x \mid \tilde x] = m - m = 0$. And $\hat x_\theta - m
# = \sigma^2 (s_\theta - s_\sigma)$ by Tweedie, so a learned denoiser's error exceeds the
# minimum by exactly $\mathbb E|\hat x_\theta - m|^2 = \sigma^4\, \mathbb E|s_\theta - s_\sigma|^2$,
# which is $2\sigma^2$ times the excess loss of 2.3.
#
# **A check without scores.** For a Gaussian mixture $m$ is also available by Gaussian
# conditioning (`GaussianMixture.posterior_mean`). Within component $k$, $x$ and
# $\tilde x = x + \sigma z$ are jointly Gaussian, so
# $\mathbb E[x \mid \tilde x, k] = \mu_k + C_k (C_k + \sigma^2 I)^{-1} (\tilde x - \mu_k)$, and
# $m = \sum_k p(k \mid \tilde x)\, \mathbb E[x \mid \tilde x, k]$, averaged with the
# responsibilities $p(k \mid \tilde x) \propto w_k \mathcal N(\tilde x; \mu_k, C_k + \sigma^2 I)$.
# No score appears, so comparing it with Tweedie's formula checks the formula to round-off.
#
# ## 2.6 Which sigma? The trade-off
# A small $\sigma$ makes $p_\sigma$ close to $p$, so the learned score describes the data we
# want, but training points $x + \sigma z$ stay within a few $\sigma$ of the data: in the gaps
# between modes and far away, the loss never looks, and the network's output there is an
# extrapolation. Langevin chains that start there (and they all do, from noise) are steered by
# that extrapolation. A large $\sigma$ fills the gaps with training points and gives a smooth
# field that is easy to learn, but it is the score of a blurred density: its bias
# $\mathbb E_p|s_\sigma - s|^2 / \mathbb E_p |s|^2$ against the clean score $s = \nabla\log p$
# grows with $\sigma$. Module 07 resolves the trade-off by using many noise levels at once.

# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 The DSM loss and the Tweedie denoiser
# Both take `sigma` as a number or as one value per sample, shape `(N,)`, broadcast against
# `x` of any shape `(N, ...)`, so the same code serves 2D points here and image batches
# `(N, C, H, W)` in image models later on. (A per-sample `sigma` only makes sense with a score
# function that knows each sample's noise level, i.e. a noise-conditional network that takes
# $\sigma$ as a second input; module 06 builds one. This module's networks take $x$ alone, one
# network per $\sigma$.)

# %%
sm02 = load_module("02")  # mlp_score_net, and dsm_loss_unweighted (lambda = 1)
langevin03 = load_module("03")  # langevin: the unadjusted Langevin algorithm


def dsm_target(x_noisy: Tensor, x0: Tensor, sigma) -> Tensor:
    """grad_{x~} log q_sigma(x~ | x0) = -(x~ - x0) / sigma^2 (= -z / sigma).   Shapes (N, ...)."""
    return -(x_noisy - x0) / expand_to(sigma, x0) ** 2


def dsm_loss_sigma2(score_fn: ScoreFn, x0: Tensor, sigma, noise: Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """sigma^2-weighted DSM loss L_sigma = 1/2 E | sigma s(x0 + sigma z) + z |^2.

    x0: (N, ...) clean data; sigma: a number or (N,); ``noise`` z (N, ...) is drawn from N(0, I)
    on ``generator`` unless given. Returns the batch mean (a scalar), or (N,) with
    reduction="none". Equal to sigma^2 times module 02's unweighted J_DSM on the same noise.
    """
    z = noise if noise is not None else torch.randn(
        x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    sig = expand_to(sigma, x0)
    x_noisy = x0 + sig * z  # x~ = x0 + sigma z, a sample of p_sigma
    # sigma s(x~) + z = sigma (s(x~) - target), target = -z / sigma: the weighted residual
    residual = sig * score_fn(x_noisy) + z
    per_sample = 0.5 * residual.reshape(len(x0), -1).square().sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def tweedie_denoise(score_fn: ScoreFn, x_noisy: Tensor, sigma) -> Tensor:
    """Tweedie's formula E[x0 | x~] = x~ + sigma^2 grad log p_sigma(x~).   (N, ...) -> (N, ...).

    With the exact perturbed score this is the posterior mean (the best denoiser in mean
    squared error); with a learned score it is the learned denoiser xhat_theta.
    """
    return x_noisy + expand_to(sigma, x_noisy) ** 2 * score_fn(x_noisy)


# %% [markdown]
# ## 3.2 The score network and the training loop
# The network is module 02's plain MLP (two hidden layers of SiLU units). We seed its
# initialisation from the run's generator, so a run is reproducible without touching the
# global random state. The training loop is a Python generator that yields after each Adam
# step: the caller decides what to record (the loss, an exact error now and then) without
# callbacks.

# %%
def seeded_mlp_score_net(dim: int = 2, hidden: int = 128,
                   generator: torch.Generator | None = None) -> torch.nn.Module:
    """An MLP s_theta: R^dim -> R^dim (dim -> hidden -> hidden -> dim, SiLU), seeded init."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # leave the global generator untouched
        torch.manual_seed(seed)
        return sm02.mlp_score_net(dim, hidden)


def training_steps(net: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], Tensor],
                   steps: int, lr: float, desc: str = "training") -> Iterator[tuple[int, float]]:
    """Adam on ``loss_fn(net)`` (which draws its own batch) for ``steps`` steps; yields (step, loss)

    The learning rate decays from ``lr`` to 0 on a cosine: the gradient of a DSM loss is noisy
    (Section 2.3), and a decaying step lets the final iterate settle instead of rattling around
    the minimum at the size of the last step.
    """
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = progress(range(steps), desc=desc, leave=False)
    for step in bar:
        loss = loss_fn(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        yield step, loss.item()


def cosine_lr(lr: float, step, steps: int):
    """The learning rate of ``training_steps`` at ``step``: lr (1 + cos(pi step / steps)) / 2."""
    return lr * 0.5 * (1 + np.cos(np.pi * np.asarray(step) / steps))


def train_dsm(net: torch.nn.Module, sample_data: Callable[[int], Tensor], sigma: float,
              cfg: Config, generator: torch.Generator, desc: str,
              monitor: Callable[[torch.nn.Module], float] | None = None) -> dict:
    """Train ``net`` by DSM at noise level ``sigma`` on fresh batches ``sample_data(cfg.batch)``.

    Returns {"loss": (steps,) per-step losses, "monitor_steps", "monitor": values of
    ``monitor(net)`` every ``cfg.monitor_every`` steps (e.g. the exact relative error)}.
    """
    def loss_fn(model):
        return dsm_loss_sigma2(model, sample_data(cfg.batch), sigma, generator=generator)

    losses, when, values = [], [], []
    for step, loss in training_steps(net, loss_fn, cfg.steps, cfg.lr, desc):
        losses.append(loss)
        if monitor is not None and ((step + 1) % cfg.monitor_every == 0 or step == 0):
            with torch.no_grad():
                when.append(step + 1)
                values.append(monitor(net))
    return {"loss": np.array(losses), "monitor_steps": np.array(when),
            "monitor": np.array(values)}


def as_score_fn_no_grad(net: torch.nn.Module) -> ScoreFn:
    """The network as a score function of any-dtype input, without autograd: (N, D) -> (N, D)."""
    dtype = next(net.parameters()).dtype
    device = next(net.parameters()).device

    def score(x: Tensor) -> Tensor:
        with torch.no_grad():
            return net(x.to(dtype=dtype, device=device)).to(dtype=x.dtype, device=x.device)

    return score


# %% [markdown]
# ## 3.3 Measuring a learned score against the exact one
# `relative_error` is $R$ of Section 2.4 for whatever points it is given: fresh samples of
# $p_\sigma$ give the density-weighted $R_\sigma$, grid points of a region give that region's
# error. `hdr_log_threshold` finds $\log c_\sigma$, the level of the 99% highest-density region.

# %%
def relative_error(score_fn: ScoreFn, exact_score: ScoreFn, x: Tensor) -> float:
    """sum_i |s_theta(x_i) - s(x_i)|^2 / sum_i |s(x_i)|^2 over the points x (N, D), in float64."""
    x = x.to(F64)
    exact = exact_score(x)
    err = (score_fn(x).to(F64) - exact).square().sum()
    return (err / exact.square().sum()).item()


def hdr_log_threshold(log_p_samples: Tensor, mass: float = 0.99) -> float:
    """log c with P(p(X) >= c) = mass for X ~ p: the (1 - mass) quantile of log p(X).

    log_p_samples: (N,) values log p(X_i) at samples X_i ~ p. {x: log p(x) >= log c} is then the
    smallest region holding ``mass`` of the probability (a highest-density region).
    """
    return torch.quantile(log_p_samples.to(F64), 1.0 - mass).item()


def mean_and_se_float(values: Tensor) -> tuple[float, float]:
    """The mean of per-sample values (N,) and its Monte Carlo standard error std / sqrt(N)."""
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def dsm_loss_floor(perturbed: GaussianMixture, sigma: float, x_noisy: Tensor) -> float:
    """L*_sigma = D/2 - sigma^2/2 E_{p_sigma} |s_sigma|^2, estimated on x_noisy (N, D) ~ p_sigma."""
    D = x_noisy.shape[1]
    return D / 2 - sigma**2 / 2 * perturbed.score(x_noisy.to(F64)).square().sum(1).mean().item()


def dsm_loss_floor_mc(perturbed: GaussianMixture, sigma: float, n: int,
                      generator: torch.Generator, chunk: int = 250_000) -> tuple[float, float]:
    """L*_sigma and its Monte Carlo standard error from n fresh samples of p_sigma (in chunks).

    The floor is a plain average of exact-score terms, so a million samples cost about a
    second and pin it down to about 1e-3 (the loss curves it is compared with are 50-step means
    of 512-point minibatches, whose own noise is several times larger).
    """
    D = perturbed.dim
    terms = []
    for start in range(0, n, chunk):
        x = perturbed.sample(min(chunk, n - start), generator, dtype=F64)
        terms.append(D / 2 - sigma**2 / 2 * perturbed.score(x).square().sum(1))
    return mean_and_se_float(torch.cat(terms))


def score_errors(net: torch.nn.Module, mix: GaussianMixture, sigma: float, n: int,
                 grid: Tensor, generator: torch.Generator, n_floor: int | None = None) -> dict:
    """All the accuracy numbers of one trained network at noise level sigma.

    Returns the density-weighted R_sigma (on n fresh samples of p_sigma), the relative errors on
    the grid points (M, 2) inside and outside the 99% highest-density region, log c_sigma, and
    the loss floor L*_sigma with its standard error (on n_floor further samples, default n).
    """
    perturbed = mix.perturbed(sigma)
    score = as_score_fn_no_grad(net)
    x = perturbed.sample(n, generator, dtype=F64)
    log_c = hdr_log_threshold(perturbed.log_prob(x))
    high = perturbed.log_prob(grid) >= log_c  # grid points inside the 99% region
    floor, floor_se = dsm_loss_floor_mc(perturbed, sigma, n_floor or n, generator)
    return {
        "R": relative_error(score, perturbed.score, x),
        "R_high": relative_error(score, perturbed.score, grid[high]),
        "R_low": relative_error(score, perturbed.score, grid[~high]),
        "log_c": log_c,
        "floor": floor,
        "floor_se": floor_se,
    }


# %% [markdown]
# ## 3.4 The data
# A three-component mixture with unequal weights and tilted covariances, narrow enough that
# the space between the components is empty (that is where we expect the learned score to be
# wrong), and the Swiss roll of `common.datasets`, a curve with no closed-form density.

# %%
def triangle_mixture_2d() -> GaussianMixture:
    """0.45 / 0.35 / 0.2 mixture of tilted Gaussians around a triangle of side about 3.6."""
    weights = [0.45, 0.35, 0.2]
    means = [[-1.8, -1.0], [1.8, -1.0], [0.0, 1.8]]
    covs = [[[0.30, 0.12], [0.12, 0.20]],
            [[0.25, -0.10], [-0.10, 0.25]],
            [[0.15, 0.00], [0.00, 0.35]]]
    return GaussianMixture(weights, means, covs)


def mixture_sampler(mix: GaussianMixture, generator: torch.Generator,
                    device=None) -> Callable[[int], Tensor]:
    """n -> n fresh float32 draws (n, 2) of the mixture, on the run's generator."""
    return lambda n: mix.sample(n, generator, dtype=F32, device=device)


def roll_sampler(generator: torch.Generator, device=None) -> Callable[[int], Tensor]:
    """n -> n fresh float32 Swiss-roll points (n, 2), on the run's generator."""
    return lambda n: swiss_roll(n, generator).to(dtype=F32, device=device)


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 Training one network per noise level
# For each $\sigma$ we train a fresh network and, every 100 steps, compute its exact relative
# error $R_\sigma$ on 4,096 fixed samples of $p_\sigma$. The left panel shows the loss itself,
# averaged over blocks of 50 steps, with the floor $L^*_\sigma$ of Section 2.3 dashed: the losses
# settle just above their floors, and for small $\sigma$ the floor is nearly $D/2 = 1$, the
# "mostly noise" regime. The floors use the exact score on a million samples of $p_\sigma$, so
# their own Monte Carlo error (under 0.001) is negligible. The left panel's wiggle is
# **minibatch noise**: each step's loss is an average over only 512 fresh points, and the
# shaded band around each floor is $\pm 2$ standard errors of a 50-step mean (estimated from
# the spread of the last 500 per-step losses, combined with the floor's standard error); the
# curves stay inside it.
#
# The middle panel shows what the loss hides. By 2.4 the **excess loss** $L_\sigma - L^*_\sigma$,
# divided by $\tfrac{\sigma^2}{2}\mathbb E|s_\sigma|^2$, is the relative error $R_\sigma$; but at
# the end of training the excess loss is a fraction of the standard error of a 50-step loss mean
# (the half-width of the shaded bands in the left panel), so the loss is far too noisy to resolve
# it. We therefore plot $R_\sigma$ computed directly, from the learned and the exact score on 4,096
# held-out samples of $p_\sigma$. It falls by orders of magnitude while the loss barely moves. It
# wiggles too, although its evaluation points are fixed: this time the *parameters* jitter, because
# every Adam step follows the gradient of a different random minibatch. The steady drop after about
# step 2,500 is the **cosine learning-rate decay** (dotted grey, right axis): as the steps shrink,
# the jitter shrinks and the network settles. (With a constant learning rate $R_\sigma$ keeps
# wiggling to the end, at a level set by the size of the last steps; try it by replacing the
# scheduler in `training_steps`.) Note also that small $\sigma$ trains to a *worse* $R_\sigma$: its
# gradients carry the least signal. The right panel shows the losses of the two Swiss-roll networks
# of Section 4.5 (trained here too), whose floors we cannot know.

# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this): QUICK = True runs the demos below at
# # --quick sizes, in seconds; False at the script's full size. Each demo's cell follows the
# # cell that defines it.
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg = Config.quick() if run.quick else Config()
# mix = triangle_mixture_2d()


# %%
def block_mean(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of consecutive blocks of ``block`` values, and the step at each block's centre."""
    n = len(values) // block * block
    if n == 0:
        return np.arange(1, len(values) + 1), values
    means = values[:n].reshape(-1, block).mean(1)
    return np.arange(n // block) * block + block / 2, means


def demo_training(run, cfg: Config, mix: GaussianMixture) -> dict:
    nets, histories, errors = {}, {}, {}
    sample = mixture_sampler(mix, run.generator, run.device)  # fresh data every step
    _, _, grid = grid_points(BOX, BOX, cfg.grid)  # where the regional errors are measured
    for sigma in cfg.sigmas:
        perturbed = mix.perturbed(sigma)  # p_sigma, exact: components N(mu_k, C_k + sigma^2 I)
        x_monitor = perturbed.sample(cfg.n_monitor, run.generator, dtype=F64)  # fixed, held out

        def monitor(net, perturbed=perturbed, x_monitor=x_monitor):
            return relative_error(as_score_fn_no_grad(net), perturbed.score, x_monitor)

        net = seeded_mlp_score_net(2, cfg.hidden, run.generator).to(run.device)
        histories[sigma] = train_dsm(net, sample, sigma, cfg, run.generator,
                                     f"DSM on the mixture, sigma={sigma:g}", monitor)
        nets[sigma] = net
        errors[sigma] = score_errors(net, mix, sigma, cfg.n_eval, grid, run.generator,
                                     cfg.n_floor)

    roll_nets, roll_histories = {}, {}
    for sigma in cfg.roll_sigmas:
        net = seeded_mlp_score_net(2, cfg.hidden, run.generator).to(run.device)
        roll_histories[sigma] = train_dsm(net, roll_sampler(run.generator, run.device), sigma,
                                          cfg, run.generator, f"DSM on the roll, sigma={sigma:g}")
        roll_nets[sigma] = net

    fig, (ax_l, ax_r, ax_s) = plt.subplots(1, 3, figsize=(17, 4.8))
    block = max(1, min(50, cfg.steps // 20))  # minibatch losses are noisy: average blocks
    for sigma in cfg.sigmas:
        h, e = histories[sigma], errors[sigma]
        (line,) = ax_l.plot(*block_mean(h["loss"], block), label=f"$\\sigma$ = {sigma:g}")
        ax_l.axhline(e["floor"], color=line.get_color(), ls="--", lw=1)  # L*_sigma
        # +-2 standard errors of a block mean (the size of pure minibatch noise), combined with
        # the floor's own Monte Carlo standard error (tiny with the default million samples)
        block_se = h["loss"][-min(500, len(h["loss"])):].std() / math.sqrt(block)
        half = 2 * math.hypot(block_se, e["floor_se"])
        ax_l.axhspan(e["floor"] - half, e["floor"] + half, color=line.get_color(), alpha=0.15,
                     lw=0)
        ax_r.plot(h["monitor_steps"], h["monitor"], color=line.get_color(), marker=".",
                  label=f"$\\sigma$ = {sigma:g} (final {e['R']:.2g})")
    ax_l.plot([], [], "k--", lw=1, label="floor $L^*_\\sigma$ (exact score)")
    ax_l.fill_between([], [], [], color="k", alpha=0.15, lw=0,
                      label="floor $\\pm$ 2 s.e. (minibatch noise\nand the floor's own estimate)")
    ax_l.set_xlabel("Adam step")
    ax_l.set_ylabel(f"$L_\\sigma = \\sigma^2 J_{{DSM}}$ (mean of {block} steps)")
    ax_l.set_title("Mixture: DSM loss and its floor")
    ax_l.legend(fontsize=8)
    ax_r.set_yscale("log")
    ax_r.set_xlabel("Adam step")
    ax_r.set_ylabel(f"$R_\\sigma$ (learned vs exact score, {cfg.n_monitor} held-out points)")
    ax_r.set_title("Mixture: relative error $R_\\sigma$ of $s_\\theta$\n"
                   "(= rescaled excess loss, too small to see in the loss)", fontsize=11)
    ax_lr = ax_r.twinx()  # the learning-rate schedule explains the late drop
    steps = np.arange(cfg.steps)
    ax_lr.plot(steps, cosine_lr(cfg.lr, steps, cfg.steps), ":", color="0.5",
               label="learning rate (cosine decay)")
    ax_lr.set_ylabel("learning rate", color="0.4")
    ax_lr.set_ylim(0, 1.05 * cfg.lr)
    handles = ax_r.get_legend_handles_labels()
    lr_handles = ax_lr.get_legend_handles_labels()
    ax_r.legend(handles[0] + lr_handles[0], handles[1] + lr_handles[1], fontsize=8,
                loc="lower left")
    for sigma in cfg.roll_sigmas:
        ax_s.plot(*block_mean(roll_histories[sigma]["loss"], block),
                  label=f"$\\sigma$ = {sigma:g}")
    ax_s.set_xlabel("Adam step")
    ax_s.set_ylabel(f"$L_\\sigma$ (mean of {block} steps)")
    ax_s.set_title("Swiss roll: DSM loss (no exact floor known)")
    ax_s.legend()
    run.save(fig, "dsm_training")
    return {"nets": nets, "errors": errors, "roll_nets": roll_nets,
            "roll_histories": roll_histories}


# %% tags=["active-ipynb"]
# trained = demo_training(run, cfg, mix)


# %% [markdown]
# ## 4.2 The learned score beside the exact perturbed score, and where it is wrong
# Each row is one noise level. Left: the exact score $\nabla\log p_\sigma$ over the perturbed
# density; middle: the network's *error* $s_\theta - s_\sigma$ as arrows on the same length scale as
# the left panel (the learned field itself is indistinguishable from the exact one by eye where it
# matters, so we draw what differs: a short arrow is a small error, one as long as its neighbour on
# the left is an error as large as the score); right: the pointwise **squared** relative error
# $|s_\theta - s_\sigma|^2 / |s_\sigma|^2$ on a log scale (the summand of the grid errors of Section
# 2.4, whose inside and outside values are in the titles), with the boundary of the 99%
# highest-density region dashed. (Arrow lengths are clipped at the 80% quantile of the exact field's
# lengths in both panels, and isolated bright pixels mark points where the exact score itself is
# zero, at the modes and saddles, so any error is infinitely "relative".) The clearest feature at
# every $\sigma$ is the bright **ridges between components**, where the exact field flips from
# pointing at one component to pointing at another; at small $\sigma$ no training point goes there.
# From $\sigma = 0.2$ up the map also shows the inside/outside split: mostly dark inside the dashed
# line, bright outside, with grid errors several times lower inside (each panel's title and the
# summary's first rows print both averages). At $\sigma = 0.05$ the map alone does not show it: the
# components are narrow, much of the dashed region is their sparse rim, and the error there is about
# as large as outside; only the grid averages show the difference. At larger $\sigma$ the dashed
# region grows, the field becomes smooth, and the error falls almost everywhere.

# %%
def plot_error_field(ax, learned: ScoreFn, exact: ScoreFn, n_arrows: int) -> None:
    """Arrows of learned - exact on the grid of ``plot_score_field``, with its length scale.

    Both fields are scaled as the exact field is in the left panel: the 80% quantile of |exact|
    spans 0.9 grid cells, and every arrow is capped at that length.
    """
    X, Y, points = grid_points(BOX, BOX, n_arrows)
    exact_s = exact(points)
    err = (learned(points) - exact_s).numpy()
    cap = np.quantile(exact_s.norm(dim=1).numpy(), 0.8)
    norm = np.linalg.norm(err, axis=1, keepdims=True)
    err = err * np.minimum(1.0, cap / np.maximum(norm, 1e-12))
    cell = (BOX[1] - BOX[0]) / (n_arrows - 1)
    ax.quiver(X, Y, err[:, 0].reshape(X.shape), err[:, 1].reshape(X.shape), color="tab:red",
              angles="xy", scale_units="xy", scale=cap / (0.9 * cell), width=0.004)


def demo_score_fields(run, cfg: Config, mix: GaussianMixture, nets: dict, errors: dict) -> dict:
    n_rows = len(cfg.sigmas)
    fig, axes = plt.subplots(n_rows, 3, figsize=(13.5, 4.3 * n_rows), squeeze=False)
    X, Y, grid = grid_points(BOX, BOX, cfg.grid)
    for row, sigma in zip(axes, cfg.sigmas):
        perturbed = mix.perturbed(sigma)
        learned = as_score_fn_no_grad(nets[sigma])
        for ax in row[:2]:
            plot_density(ax, perturbed.log_prob, BOX, BOX, n_grid=cfg.grid)
        plot_score_field(row[0], perturbed.score, BOX, BOX, n_arrows=cfg.arrows,
                         clip_quantile=0.8)
        row[0].set_title(f"$\\sigma$ = {sigma:g}: exact $\\nabla \\log p_\\sigma$\n"
                         "(shading: density $p_\\sigma$)")
        plot_error_field(row[1], learned, perturbed.score, cfg.arrows)
        row[1].set_title(f"$\\sigma$ = {sigma:g}: error $s_\\theta - \\nabla \\log p_\\sigma$\n"
                         "(same arrow scale as the left panel)")
        exact = perturbed.score(grid)
        # pointwise squared relative error |s_theta - s_sigma|^2 / |s_sigma|^2 (the summand of
        # the regional errors in the title), clamped to the colour range
        rel2 = ((learned(grid) - exact).square().sum(1) / exact.square().sum(1)).reshape(X.shape)
        mesh = row[2].pcolormesh(X, Y, rel2.clamp(1e-6, 1e2).numpy(), shading="auto",
                                 cmap="magma", norm=LogNorm(vmin=1e-6, vmax=1e2))
        fig.colorbar(mesh, ax=row[2], label="$|s_\\theta - s_\\sigma|^2 / |s_\\sigma|^2$")
        log_p = perturbed.log_prob(grid).reshape(X.shape).numpy()
        # the boundary {log p_sigma = log c_sigma} of the 99% highest-density region
        row[2].contour(X, Y, log_p, levels=[errors[sigma]["log_c"]], colors="c",
                       linestyles="--", linewidths=1.5)
        row[2].legend(handles=[Line2D([], [], color="c", ls="--",
                                      label="99% highest-density region")], loc="lower right")
        e = errors[sigma]
        row[2].set_title(f"squared relative error on the grid:\ninside {e['R_high']:.2g}, "
                         f"outside {e['R_low']:.2g}")
        row[2].set_aspect("equal")
        row[2].set_xlabel("$x_1$")
        row[2].set_ylabel("$x_2$")
    fig.suptitle("DSM learns the perturbed score; it is least accurate where $p_\\sigma$ is "
                 "small", size=13)
    run.save(fig, "learned_vs_exact_scores")
    return {}


# %% tags=["active-ipynb"]
# demo_score_fields(run, cfg, mix, trained["nets"], trained["errors"])


# %% [markdown]
# ## 4.3 Error against noise level: accuracy versus bias
# One picture for Section 2.6. The learned score's errors against its own target $s_\sigma$
# (density-weighted, and on the grid inside and outside the 99% region) fall as $\sigma$ grows.
# The dashed curve is the price: the relative distance between the *exact* perturbed score and
# the clean score $s = \nabla \log p$, measured on clean data,
# $B_\sigma = \mathbb E_p|s_\sigma - s|^2/\mathbb E_p|s|^2$, rises towards 1 (at large
# $\sigma$, $s_\sigma$ no longer resembles $s$ at all).
#
# The red curve is what a sampler for the *clean* data would care about: the learned score
# against the clean score, $\mathbb E_p|s_\theta - s|^2 / \mathbb E_p|s|^2$ on clean data. At
# large $\sigma$ it lies on the dashed curve: the network has learned $s_\sigma$ well, but
# $s_\sigma$ itself is biased, so training longer cannot help. At small $\sigma$ the bias
# vanishes and the red curve follows the learning error $R_\sigma$ instead (compare the
# summary's row "learned s_theta vs clean s" with $R_\sigma$ at the smallest $\sigma$, where the
# two curves meet). On the
# data, then, the smallest $\sigma$ wins; but away from the data (green triangles) the
# small-$\sigma$ network is the worst, and that is where Langevin chains start. No single
# $\sigma$ is good in both places, which is the case for the many noise levels of module 07.

# %%
def score_bias(mix: GaussianMixture, sigma: float, x: Tensor) -> float:
    """B_sigma = E_p |s_sigma - s|^2 / E_p |s|^2 on data x (N, D) ~ p (exact scores, float64)."""
    return relative_error(mix.perturbed(sigma).score, mix.score, x)


def demo_error_vs_sigma(run, cfg: Config, mix: GaussianMixture, nets: dict,
                        errors: dict) -> dict:
    data = mix.sample(cfg.n_eval, run.generator, dtype=F64)  # the bias is measured on clean data
    sigmas = np.array(cfg.sigmas)
    dense = np.geomspace(min(sigmas) / 2, max(sigmas) * 2, 40)  # exact scores are cheap
    bias = [score_bias(mix, sigma, data) for sigma in dense]
    # E_p|s_theta - s|^2 / E_p|s|^2: the learned score against the CLEAN score, on clean data
    vs_clean = {sigma: relative_error(as_score_fn_no_grad(nets[sigma]), mix.score, data)
                for sigma in cfg.sigmas}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, style, label in (
            ("R", "o-", "learned vs $s_\\sigma$: density-weighted $R_\\sigma$"),
            ("R_high", "s-", "learned vs $s_\\sigma$: grid, inside 99% region"),
            ("R_low", "^-", "learned vs $s_\\sigma$: grid, outside (low density)")):
        ax.plot(sigmas, [errors[sigma][key] for sigma in cfg.sigmas], style, label=label)
    ax.plot(dense, bias, "k--", label="exact $s_\\sigma$ vs clean score $s$ (on data)")
    ax.plot(sigmas, [vs_clean[sigma] for sigma in cfg.sigmas], "D-", color="tab:red", lw=2,
            label="learned $s_\\theta$ vs clean score $s$ (on data)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise level $\\sigma$")
    ax.set_ylabel("relative squared error $E|a - b|^2 / E|b|^2$ (legend: $a$ vs $b$)")
    ax.set_title("Larger $\\sigma$: an easier, more accurate score of a more blurred density")
    ax.legend(fontsize=8)
    run.save(fig, "error_vs_sigma")
    return {"bias": {sigma: score_bias(mix, sigma, data) for sigma in cfg.sigmas},
            "vs_clean": vs_clean}


# %% tags=["active-ipynb"]
# vs_sigma = demo_error_vs_sigma(run, cfg, mix, trained["nets"], trained["errors"])


# %% [markdown]
# ## 4.4 Denoising with Tweedie's formula
# We add noise of standard deviation $\sigma$ to mixture samples and denoise them three ways:
# not at all, with the posterior mean $\mathbb E[x \mid \tilde x]$ computed by Gaussian
# conditioning (the score-free formula at the end of Section 2.5), and with the learned
# denoiser $\hat x_\theta(\tilde x) = \tilde x + \sigma^2 s_\theta(\tilde x)$. Tweedie's
# formula with the *exact* perturbed score reproduces the posterior mean to round-off; the
# network's version lands almost on top of it.
#
# In the second and third panels, each **arrow** starts at a noisy point $\tilde x$ and ends at
# its denoised point (drawn for the first 40 points): the arrow is the denoising step
# $\sigma^2 s(\tilde x)$, the score scaled by $\sigma^2$. The posterior mean does not return the
# clean points (nobody can), it pulls each noisy point towards the components that could have
# produced it, weighted by their posterior probabilities: the arrows point inwards and the
# clouds shrink. A point in a gap between
# components, whose origin is uncertain, lands in between: the posterior mean averages over
# the candidate components. The arrows of the two panels agree. The last
# panel compares mean squared errors against the clean points at every trained $\sigma$, as a
# fraction of what doing nothing costs ($D\sigma^2$): the posterior mean reaches the minimum
# $2\sigma^2 L^*_\sigma$ of Section 2.5, and the learned denoiser sits on top of it. The
# fraction of the noise that *can* be removed grows with $\sigma$: small noise on a blob of
# width 0.5 is mostly indistinguishable from the blob itself.

# %%
def tweedie_numbers(mix: GaussianMixture, net: torch.nn.Module, sigma: float, n: int,
                    generator: torch.Generator) -> dict:
    """Tweedie's formula with exact and learned scores against the exact posterior mean.

    Mean squared errors come with their Monte Carlo standard errors (keys ending in ``_se``).
    """
    perturbed = mix.perturbed(sigma)
    x0 = mix.sample(n, generator, dtype=F64)
    x_noisy = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=F64)
    posterior = mix.posterior_mean(x_noisy, sigma)  # Gaussian conditioning, no score involved
    exact = tweedie_denoise(perturbed.score, x_noisy, sigma)
    learned = tweedie_denoise(as_score_fn_no_grad(net), x_noisy, sigma)  # xhat_theta(x~)
    D = x0.shape[1]
    sq_noisy = (x_noisy - x0).square().sum(1)  # |x~ - x0|^2 per sample
    sq_learned = (learned - x0).square().sum(1)  # |xhat_theta(x~) - x0|^2 per sample
    sq_posterior = (posterior - x0).square().sum(1)  # |E[x0|x~] - x0|^2 per sample
    # its mean is E|xhat_theta - E[x0|x~]|^2: the cross term has mean 0 (Section 2.5)
    diff = sq_learned - sq_posterior
    # 2 sigma^2 L*_sigma = sigma^2 (D - sigma^2 E|s_sigma|^2): the MMSE from the score alone
    mmse_terms = sigma**2 * (D - sigma**2 * perturbed.score(x_noisy).square().sum(1))
    out = {
        "x0": x0, "x_noisy": x_noisy, "posterior": posterior, "learned": learned,
        "exact_max_err": (exact - posterior).abs().max().item(),
        "learned_rms": (learned - posterior).square().sum(1).mean().sqrt().item(),
        # E|xhat_theta - E[x0|x~]|^2, what MSE(learned) - MSE(posterior) should equal
        "sq_dist_to_posterior": (learned - posterior).square().sum(1).mean().item(),
    }
    for key, values in (("mse_noisy", sq_noisy), ("mse_posterior", sq_posterior),
                        ("mse_learned", sq_learned), ("mse_diff", diff),
                        ("mmse_formula", mmse_terms)):
        out[key], out[key + "_se"] = mean_and_se_float(values)
    return out


def demo_tweedie(run, cfg: Config, mix: GaussianMixture, nets: dict) -> dict:
    results = {sig: tweedie_numbers(mix, nets[sig], sig, cfg.n_eval, run.generator)
               for sig in cfg.sigmas}
    sigma = min(cfg.sigmas, key=lambda sig: abs(sig - cfg.tweedie_sigma))  # the one we draw
    r = results[sigma]  # the first points of its samples are drawn
    show, lines = 400, 40  # points drawn, of which this many with a noisy->denoised arrow
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    panels = ((axes[0], r["x_noisy"], "noisy $\\tilde x = x + \\sigma z$", "tab:gray"),
              (axes[1], r["posterior"], "posterior mean $E[x \\mid \\tilde x]$ (exact)",
               "tab:blue"),
              (axes[2], r["learned"], "learned $\\hat x_\\theta = \\tilde x + \\sigma^2 s_\\theta$",
               "tab:red"))
    for ax, pts, title, color in panels:
        plot_density(ax, mix.log_prob, BOX, BOX, n_grid=cfg.grid, cmap="Greys")
        ax.scatter(*pts[:show].T.numpy(), s=5, color=color, label=title)
        ax.scatter(*r["x0"][:show].T.numpy(), s=3, color="tab:green", alpha=0.5,
                   label="clean $x$")
        if ax is not axes[0]:
            # an arrow from each noisy point to where the denoiser sends it (true lengths)
            start, step = r["x_noisy"][:lines].numpy(), (pts - r["x_noisy"])[:lines].numpy()
            ax.quiver(start[:, 0], start[:, 1], step[:, 0], step[:, 1], angles="xy",
                      scale_units="xy", scale=1, width=0.004, color="k", zorder=3)
        ax.set_title(f"$\\sigma$ = {sigma:g}: {title}")
        handles = ax.get_legend_handles_labels()[0]
        if ax is not axes[0]:  # a quiver's own legend entry is a black box: draw an arrow
            handles.append(Line2D([], [], color="k", lw=0, marker="$\\longrightarrow$",
                                  markersize=6, label="$\\tilde x \\to$ denoised"))
        ax.legend(handles=handles, loc="lower right", markerscale=3, fontsize=8)
    sigmas, D = np.array(cfg.sigmas), r["x0"].shape[1]
    ax = axes[3]
    # Errors as a fraction of the noisy input's D sigma^2: the share of the noise left over.
    for key, style, color, label in (("mse_noisy", "o-", "tab:gray", "noisy input $\\tilde x$"),
                                     ("mse_learned", "s-", "tab:red",
                                      "learned $\\hat x_\\theta$ (Tweedie)"),
                                     ("mse_posterior", "^--", "tab:blue",
                                      "posterior mean (the minimum)")):
        ax.plot(sigmas, [results[sig][key] / (D * sig**2) for sig in cfg.sigmas], style,
                color=color, label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("noise level $\\sigma$")
    ax.set_ylabel("$E|\\mathrm{denoised} - x|^2 \\,/\\, (D \\sigma^2)$")
    ax.set_title("Denoising error, relative to doing nothing")
    ax.legend()
    run.save(fig, "tweedie_denoising")
    return {"tweedie": results, "tweedie_sigma": sigma}


# %% tags=["active-ipynb"]
# tw = demo_tweedie(run, cfg, mix, trained["nets"])


# %% [markdown]
# ## 4.5 A Swiss roll, learned and sampled with Langevin dynamics
# No closed form here: we train on samples only, then run the Langevin sampler we built in
# module 03, $x \leftarrow x + \tfrac{\epsilon}{2} s_\theta(x) + \sqrt{\epsilon}\, z$, with the
# learned score, from 2,000 chains started uniformly in the square $[-3, 3]^2$ around the
# data. The step size is $\epsilon = 0.5\,\sigma^2$: the width of $p_\sigma$ across the roll is
# about $\sqrt{0.1^2 + \sigma^2}$, and ULA's bias grows with $\epsilon$ over the squared width
# (module 03), so this keeps that ratio, and with it the discretisation error, of the same
# order at both noise levels (0.25 at $\sigma = 0.1$, 0.43 at $\sigma = 0.25$). To compare
# the two noise levels fairly, every chain runs for the **same total Langevin time**
# $T = \text{steps} \times \epsilon = 30$: the continuous Langevin diffusion, which the chain
# approximates, mixes on a time scale, not a step count. So the $\sigma = 0.1$ chains take
# 6,000 steps and the $\sigma = 0.25$ chains 960. (Starting much farther out, e.g. from
# $\mathcal N(0, 2^2 I)$, puts chains where no training point ever was. With the briefly
# trained network of `--quick` an occasional chain is then thrown off to infinity: out there
# the extrapolated field is steeper than anything the network was trained on, and a step size
# that is stable near the roll is not stable there (module 03's stability limit). It is the
# low-density failure of Section 2.6 in its most drastic form.)
#
# The chains sample $p_\sigma$, a blurred roll, so we finish with one Tweedie step $x \mapsto x +
# \sigma^2 s_\theta(x)$, which moves each sample to the posterior mean $\mathbb E[x \mid \tilde x]$:
# the average of the clean points that could have produced it, weighted by how likely each is to
# have done so (not the single most likely clean point, which would be the posterior *mode*). The
# first column shows the learned score's *direction* (unit grey arrows, drawn under the data):
# everywhere it points back to the nearest arm.
#
# We compare the samples with fresh data by the sliced Wasserstein distance (SW,
# common/metrics), against 6 independent data draws of the same size: the titles give the mean
# and the standard deviation over those draws. The **floor** is the SW between two independent
# data draws, the best any sampler can do, which is not zero because both are finite samples;
# we report its mean over 6 pairs (the floor) and its standard deviation (the spread, how much
# one SW value moves from draw to draw) as separate numbers. A sampler is indistinguishable
# from the data when its SW is within about one spread of the floor.
#
# The last column is a histogram of the radius $|x|$ of the data (green bars) and of the
# denoised samples (red outline). Along this Swiss roll the radius grows steadily with the
# angle ($|x| = t/5$ for $t$ uniform in $[1.5\pi, 4.5\pi]$, i.e. from 0.94 to 2.83, before the
# noise of 0.1), so the radius says *where along the curve* a point lies, and the histogram
# shows how the mass is spread along the roll, which a scatter plot hides. The data's
# histogram is flat between those radii; look for red bars that stand above or below the
# green ones, i.e. stretches of the arm with too much or too little mass.
#
# What the default run shows (same $T$ at both noise levels; the summary's "Swiss roll" rows
# print every number, SW before and after the Tweedie step beside the floor and its spread):
# at $\sigma = 0.1$ the samples lie on the roll, but their SW stays several spreads above the
# floor even after 6,000 steps, and the radius histogram shows why: the mass along the roll is
# wrong, typically too little on the inner turn and too much in the middle of the roll. A
# chain that lands on an arm stays there, because the empty gap between arms is a low-density
# region the chains cannot cross (and where the learned score is unreliable anyway). The final
# Tweedie step does not help here (the two SW columns of that row barely differ): it moves
# each sample by $\sigma^2 s_\theta$, whose RMS length the summary prints, a small fraction of
# the 1.26 between arms, so it sharpens the arm a sample sits on but cannot carry mass to
# another arm, nor along the roll. At $\sigma = 0.25$ the blurred arms touch, chains move
# between them, and after the Tweedie step the SW comes within about one spread of the floor.
# (Before the Tweedie step it is higher: the chains sample the blurred $p_\sigma$, not the
# data.) Module 07 gets the best of both with a sequence of noise levels.

# %%
def radius_histogram(ax, samples: Tensor, data: Tensor, label: str) -> None:
    """Histograms of |x| for samples and data: the Swiss roll's radius grows along the curve."""
    bins = np.linspace(0, 3.6, 25)
    ax.hist(data.norm(dim=1).numpy(), bins=bins, density=True, color="tab:green", alpha=0.4,
            label="data")
    ax.hist(samples.norm(dim=1).numpy(), bins=bins, density=True, histtype="step", lw=2,
            color="tab:red", label=label)
    ax.set_xlabel("radius $|x|$ (position along the roll)")
    ax.set_ylabel("density")
    ax.legend()


def plot_directions(ax, score_fn: ScoreFn, lim: tuple[float, float], n_arrows: int) -> None:
    """Unit arrows s/|s| on an n_arrows x n_arrows grid, light grey, under the data."""
    X, Y, points = grid_points(lim, lim, n_arrows)
    s = score_fn(points.to(F32)).double()
    u = (s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()  # direction only
    cell = (lim[1] - lim[0]) / (n_arrows - 1)
    ax.quiver(X, Y, u[:, 0].reshape(X.shape), u[:, 1].reshape(X.shape), angles="xy",
              scale_units="xy", scale=1 / (0.7 * cell), width=0.004, color="0.55", zorder=1)
    # a quiver's own legend entry is a box: an arrow glyph as a stand-in
    ax.plot([], [], color="0.55", lw=0, marker="$\\longrightarrow$", markersize=4,
            label="direction of $s_\\theta$ (unit arrows)")


def langevin_steps_for(sigma: float, cfg: Config) -> tuple[float, int]:
    """Step size eps = langevin_factor sigma^2 and the steps that make steps x eps = T."""
    step_size = cfg.langevin_factor * sigma**2
    return step_size, max(1, round(cfg.langevin_time / step_size))


def langevin_samples(net: torch.nn.Module, sigma: float, cfg: Config,
                     generator: torch.Generator) -> Tensor:
    """ULA with the learned score from U([-3, 3]^2) for a total time T: (chains, 2)."""
    x_init = 6.0 * torch.rand(cfg.chains, 2, generator=generator) - 3.0  # uniform on [-3, 3]^2
    step_size, n_steps = langevin_steps_for(sigma, cfg)
    chain = langevin03.langevin(as_score_fn_no_grad(net), x_init, step_size, n_steps, generator)
    x = x_init
    for state in progress(chain, total=n_steps, desc=f"Langevin, sigma={sigma:g}", leave=False):
        x = state  # keep only the last state
    return x


def sw_mean_sd(x: Tensor, references: list[Tensor]) -> tuple[float, float]:
    """Mean and standard deviation of SW(x, reference) over independent reference draws."""
    proj = torch.Generator()  # the same 256 projections for every distance
    values = np.array([sliced_wasserstein(x, ref, 256, proj.manual_seed(0))
                       for ref in references])
    return values.mean(), values.std(ddof=1)


def demo_swiss_roll(run, cfg: Config, roll_nets: dict) -> dict:
    lim = (-3.2, 3.6)
    n_rows = len(cfg.roll_sigmas)
    fig, axes = plt.subplots(n_rows, 4, figsize=(19, 4.6 * n_rows), squeeze=False)
    k = max(2, cfg.sw_repeats)
    refs = [swiss_roll(cfg.chains, run.generator).to(F32) for _ in range(k)]  # references
    others = [swiss_roll(cfg.chains, run.generator).to(F32) for _ in range(k)]  # floor pairs
    proj = torch.Generator()  # the projections of sw_mean_sd
    floor = np.array([sliced_wasserstein(a, b, 256, proj.manual_seed(0))
                      for a, b in zip(refs, others)])
    out = {"floor": floor.mean(), "floor_sd": floor.std(ddof=1), "repeats": k, "roll": {}}
    data = refs[0]  # the data drawn in the figure
    for row, sigma in zip(axes, cfg.roll_sigmas):
        net = roll_nets[sigma]
        samples = langevin_samples(net, sigma, cfg, run.generator)  # approximately p_sigma
        # x + sigma^2 s_theta(x)
        denoised = tweedie_denoise(as_score_fn_no_grad(net), samples, sigma)
        sw_raw, sd_raw = sw_mean_sd(samples, refs)
        sw_den, sd_den = sw_mean_sd(denoised, refs)
        out["roll"][sigma] = {"sw_langevin": sw_raw, "sw_langevin_sd": sd_raw,
                              "sw_denoised": sw_den, "sw_denoised_sd": sd_den,
                              "steps": langevin_steps_for(sigma, cfg)[1],
                              # RMS |sigma^2 s_theta(x)|: how far the Tweedie step moves a sample
                              "tweedie_step": (denoised - samples).square().sum(1).mean()
                              .sqrt().item()}
        ax = row[0]
        ax.scatter(*data[:1000].T.numpy(), s=3, color="tab:green", alpha=0.9, label="data",
                   zorder=3)  # on top of the arrows
        plot_directions(ax, as_score_fn_no_grad(net), lim, cfg.arrows + 4)
        ax.set_title(f"$\\sigma$ = {sigma:g}: learned score $s_\\theta$ over data")
        step_size, n_steps = langevin_steps_for(sigma, cfg)
        for ax, pts, what, sw, sd in (
                (row[1], samples, f"Langevin, {n_steps} steps of {step_size:.3g} "
                 f"(T = {cfg.langevin_time:g})", sw_raw, sd_raw),
                (row[2], denoised, "after one Tweedie step", sw_den, sd_den)):
            ax.scatter(*data[:1000].T.numpy(), s=2, color="tab:green", alpha=0.3,
                       label="data")
            ax.scatter(*pts.T.numpy(), s=2, color="tab:red", alpha=0.6, label="samples")
            ax.set_title(f"$\\sigma$ = {sigma:g}: {what}\nSW to data {sw:.3f} $\\pm$ {sd:.3f} "
                         f"(floor {out['floor']:.3f}, spread {out['floor_sd']:.3f})",
                         fontsize=10)
        for ax in row[:3]:
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
            ax.set_aspect("equal")
            ax.set_xlabel("$x_1$")
            ax.set_ylabel("$x_2$")
            ax.legend(loc="lower right", markerscale=4, fontsize=8)
        radius_histogram(row[3], denoised, data, "denoised samples")
        row[3].set_title(f"$\\sigma$ = {sigma:g}: mass along the roll")
    run.save(fig, "swiss_roll")
    return out


# %% tags=["active-ipynb"]
# roll = demo_swiss_roll(run, cfg, trained["roll_nets"])


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_04_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/04_denoising_score_matching.py`: try first, then compare.

# %%
def exercise_perturbed_gaussian_score(x: Tensor, mean: Tensor, cov: Tensor,
                                      sigma: float) -> Tensor:
    """Exercise 4.1: the exact perturbed score of one Gaussian.

    If x ~ N(mean, cov) and x~ = x + sigma z, then x~ ~ N(mean, cov + sigma^2 I). Return the
    score of that perturbed density (the DSM target a network should learn).

    Args:
        x:     (N, D) points x~.
        mean:  (D,); cov: (D, D) symmetric positive definite.
        sigma: noise level > 0.
    Returns:
        (N, D) grad log p_sigma(x~).

    Example: mean 0, cov = I in 2D, sigma = 1: at x~ = (2, 0) the score is (-1, 0).

    Hint: the score of N(m, C) is -C^{-1}(x - m). Use torch.linalg.solve rather than forming
    an inverse. Mind the layout: x - mean holds one point per ROW (N, D), while solve(A, B)
    solves for the COLUMNS of B (D, N). Transpose in and out: solve(C, (x - mean).T).T
    (without it you get a shape error, or, when N = D, a silently wrong answer).
    """
    # TODO: one line, once you have the covariance of x~.
    raise NotImplementedError("Exercise 4.1: implement exercise_perturbed_gaussian_score")


def exercise_scaled_dsm_loss(score_fn: ScoreFn, x0: Tensor, scale: float, sigma: float,
                             noise: Tensor) -> Tensor:
    """Exercise 4.2: the DSM loss for a kernel that also shrinks the data.

    The diffusion models of module 08 (VP SDE, DDPM) perturb with x~ = scale * x0 + sigma * z
    instead of x0 + sigma z. Write the sigma^2-weighted DSM loss for that kernel,
        L = 1/2 mean_i sigma^2 | s(x~_i) - grad_{x~} log q(x~_i | x0_i) |^2,
    where q(x~ | x0) = N(x~; scale * x0, sigma^2 I) and x~_i = scale * x0_i + sigma * z_i.

    Args:
        score_fn: (N, D) -> (N, D).
        x0:       (N, D) clean data.
        scale, sigma: numbers (scale > 0, sigma > 0).
        noise:    (N, D) the z to use.
    Returns:
        a scalar tensor.

    Example: for scale = 1 it equals dsm_loss_sigma2(score_fn, x0, sigma, noise=noise) (3.1).

    Hint: compute the kernel's score -(x~ - scale x0) / sigma^2 and simplify; the answer does
    not depend on scale except through the point where the network is evaluated.
    """
    # TODO: x~, then the weighted residual, then 1/2 the mean squared norm.
    raise NotImplementedError("Exercise 4.2: implement exercise_scaled_dsm_loss")


def exercise_scaled_tweedie(score_fn: ScoreFn, x_noisy: Tensor, scale: float,
                            sigma: float) -> Tensor:
    """Exercise 4.3: Tweedie's formula when the data are also scaled.

    For x~ = scale * x0 + sigma * z, derive E[x0 | x~] from the score of p(x~) (the density
    of x~). Differentiate p(x~) = int p(x0) N(x~; scale x0, sigma^2 I) dx0 as in Section 2.5.

    Args:
        score_fn: (N, D) -> (N, D), the score of the density of x~.
        x_noisy:  (N, D) noisy points x~.
        scale, sigma: numbers > 0.
    Returns:
        (N, D) the posterior mean E[x0 | x~].

    Example: data x0 = m = (1, 2) always (a point mass), scale = 0.5, sigma = 1: then
    x~ ~ N(scale m, I) = N((0.5, 1), I), its score is -(x~ - scale m) / sigma^2, and
    E[x0 | x~] must be m = (1, 2) for every x~ (use this to test your answer by hand).

    Hint: in Section 2.5's derivation, which quantity plays the role of the "clean" point
    when x~ = scale * x0 + sigma * z?
    """
    # TODO: Tweedie's formula first, then get back to x0.
    raise NotImplementedError("Exercise 4.3: implement exercise_scaled_tweedie")


def exercise_noise_prediction(score_fn: ScoreFn, x_noisy: Tensor, sigma: float) -> Tensor:
    """Exercise 4.4: predicting the noise from the score (the "epsilon" view of DDPM).

    Many diffusion models train a network eps_theta(x~) to predict the noise z in
    x~ = x0 + sigma z. The best such prediction is E[z | x~]. Express it with the score of
    p_sigma.

    Args:
        score_fn: (N, D) -> (N, D), grad log p_sigma.
        x_noisy:  (N, D); sigma > 0.
    Returns:
        (N, D) E[z | x~].

    Example: data x0 = 0 always, sigma = 2: p_sigma = N(0, 4 I), score -x~/4, and z = x~/2
    exactly, so the answer is x~ / 2.

    Hint: z = (x~ - x0) / sigma; take E[. | x~] and use Tweedie's formula for E[x0 | x~].
    """
    # TODO: one line.
    raise NotImplementedError("Exercise 4.4: implement exercise_noise_prediction")


def exercise_hdr_mass(log_p_grid: Tensor, cell_area: float, log_c: float) -> float:
    """Exercise 4.5: how much probability does a highest-density region hold?

    Section 2.4 defines the 99% region {x : log p(x) >= log c} through a quantile of samples.
    Check it by integration: given log p on a fine regular grid, return the probability mass
    of the region, int_{log p >= log c} p(x) dx, by the midpoint rule (sum of p times the
    area of one grid cell).

    Args:
        log_p_grid: (M,) log p at the points of a regular grid covering almost all the mass.
        cell_area:  the area (volume) of one grid cell, dx * dy.
        log_c:      the log-density level of the region.
    Returns:
        the mass as a Python float in [0, 1].

    Example: for the standard 2D Gaussian the region {|x| <= r} has mass 1 - exp(-r^2 / 2),
    and on it log p >= -log(2 pi) - r^2 / 2.

    Hint: a boolean mask selects the grid points inside; exponentiate only those.
    """
    # TODO: mask, exponentiate, sum, multiply by the cell area.
    raise NotImplementedError("Exercise 4.5: implement exercise_hdr_mass")


# %% [markdown]
# ## Summary
# - Denoising score matching trains a score network from samples alone: regress
#   $s_\theta(x + \sigma z)$ on $-z/\sigma$. Its minimiser is the score of the *perturbed*
#   density $p_\sigma$, and our networks match the exact perturbed score of a Gaussian mixture
#   to a density-weighted relative error of a few percent or less.
# - With the $\sigma^2$ weighting, $L_\sigma = \tfrac12 \mathbb E|\sigma s_\theta + z|^2$ sits on
#   a floor $L^*_\sigma = \sigma^2 C_\sigma = D/2 - \tfrac{\sigma^2}{2}\mathbb E|s_\sigma|^2$
#   ($C_\sigma$ is module 02's DSM-ESM constant); the loss curve hides the progress that the
#   exact error (the rescaled excess loss) shows, and small $\sigma$ is the hardest to learn.
# - The learned score is least accurate where $p_\sigma$ is small: in the gaps between modes
#   and far away, where no training point goes. Larger $\sigma$ fills those regions but blurs
#   the data: the learned score then matches $s_\sigma$ well and the clean score badly.
# - Tweedie: $\mathbb E[x \mid \tilde x] = \tilde x + \sigma^2 \nabla\log p_\sigma(\tilde x)$.
#   The $\sigma^2$-weighted DSM loss $L_\sigma$ is the mean squared error of this denoiser
#   divided by $2\sigma^2$ (the unweighted one of module 02: divided by $2\sigma^4$), and a
#   learned denoiser's excess error is $\sigma^4 \mathbb E|s_\theta - s_\sigma|^2$.
# - Langevin dynamics with a learned score samples the Swiss roll; for the same total Langevin
#   time, a single small $\sigma$ puts the wrong mass on the arms, and a larger one comes within
#   about one spread of the sliced Wasserstein floor after a final Tweedie step. Annealing
#   through many noise levels (module 07) does both.

# %%
def summary_rows(cfg: Config, errors: dict, vs_sigma: dict, tweedie: dict, tweedie_sigma: float,
                 roll: dict) -> list[tuple[str, str, str]]:
    """The numbers the prose relies on, as (quantity, measured, expected) rows."""
    rows = []
    for sigma in cfg.sigmas:
        e = errors[sigma]
        rows.append((f"sigma={sigma:g}: R_sigma | grid inside 99% | outside",
                     f"{e['R']:.4f} | {e['R_high']:.4f} | {e['R_low']:.4f}",
                     "R < 0.05 (the pass threshold); outside > inside"))
    rows.append(("bias of exact s_sigma vs clean s, per sigma",
                 ", ".join(f"{vs_sigma['bias'][sigma]:.2g}" for sigma in cfg.sigmas),
                 "grows with sigma"))
    rows.append(("learned s_theta vs clean s (on data), per sigma",
                 ", ".join(f"{vs_sigma['vs_clean'][sigma]:.2g}" for sigma in cfg.sigmas),
                 "~ bias at large sigma, ~ R_sigma at the smallest"))
    rows.append(("Tweedie (exact score) - posterior mean, max abs",
                 f"{max(t['exact_max_err'] for t in tweedie.values()):.1e}",
                 "< 1e-12 (round-off)"))
    rows.append(("Tweedie (learned) - posterior mean, RMS, per sigma",
                 ", ".join(f"{tweedie[sigma]['learned_rms']:.3g}" for sigma in cfg.sigmas),
                 "small vs noise RMS sigma sqrt(2): "
                 + ", ".join(f"{sigma * math.sqrt(2):.3g}" for sigma in cfg.sigmas)))
    t = tweedie[tweedie_sigma]
    for key, what, expected in (
            ("mse_noisy", "noisy input x~", f"D sigma^2 = {2 * tweedie_sigma**2:.4g}"),
            ("mse_posterior", "posterior mean E[x|x~]",
             f"sigma^2 (D - sigma^2 E|s|^2) = {t['mmse_formula']:.4g} "
             f"+- {t['mmse_formula_se']:.2g}"),
            ("mse_learned", "learned xhat_theta", ">= the posterior mean's (gap: next row)")):
        rows.append((f"sigma={tweedie_sigma:g}: MSE of {what} (+- s.e.)",
                     f"{t[key]:.4g} +- {t[key + '_se']:.2g}", expected))
    rows.append((f"sigma={tweedie_sigma:g}: MSE(learned) - MSE(posterior mean)",
                 f"{t['mse_diff']:.3g} +- {t['mse_diff_se']:.2g}",
                 f"E|xhat_theta - E[x|x~]|^2 = {t['sq_dist_to_posterior']:.3g}"))
    rows.append((f"Swiss roll: SW floor (two data draws) | spread, {roll['repeats']} pairs",
                 f"{roll['floor']:.4f} | {roll['floor_sd']:.4f}",
                 "the best any sampler can do | sd of one SW value"))
    for sigma, r in roll["roll"].items():
        rows.append((f"Swiss roll sigma={sigma:g} ({r['steps']} steps, T={cfg.langevin_time:g}): "
                     "SW, Langevin | + Tweedie",
                     f"{r['sw_langevin']:.4f} +- {r['sw_langevin_sd']:.4f} | "
                     f"{r['sw_denoised']:.4f} +- {r['sw_denoised_sd']:.4f}",
                     f"floor {roll['floor']:.4f} (spread {roll['floor_sd']:.4f})"))
        rows.append((f"Swiss roll sigma={sigma:g}: RMS length of the Tweedie step",
                     f"{r['tweedie_step']:.3g}",
                     f"< sigma sqrt(D) = {sigma * math.sqrt(2):.3g}; arms 2 pi/5 = 1.26 apart"))
    return rows


def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    if run.args.steps is not None:
        cfg.steps = run.args.steps
    if run.args.sigmas is not None:
        cfg.sigmas = tuple(sorted(set(run.args.sigmas)))
    if run.args.langevin_time is not None:
        cfg.langevin_time = run.args.langevin_time

    mix = triangle_mixture_2d()
    trained = demo_training(run, cfg, mix)
    demo_score_fields(run, cfg, mix, trained["nets"], trained["errors"])
    vs_sigma = demo_error_vs_sigma(run, cfg, mix, trained["nets"], trained["errors"])
    tw = demo_tweedie(run, cfg, mix, trained["nets"])
    roll = demo_swiss_roll(run, cfg, trained["roll_nets"])
    rows = summary_rows(cfg, trained["errors"], vs_sigma, tw["tweedie"], tw["tweedie_sigma"],
                        roll)
    if run.quick:
        print(f"\n--quick is a smoke test ({cfg.steps} training steps instead of "
              f"{Config.steps}, small samples): its numbers and figures are unrepresentative."
              "\nThe default run is what the text discusses.")
    run.finish(rows, globals(), "04")
    return {"errors": trained["errors"], "bias": vs_sigma["bias"],
            "vs_clean": vs_sigma["vs_clean"], "tweedie": tw["tweedie"], "roll": roll}


# %% tags=["active-ipynb"]
# rows = summary_rows(cfg, trained["errors"], vs_sigma, tw["tweedie"],
#                     tw["tweedie_sigma"], roll)
# run.finish(rows, globals(), "04")


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
