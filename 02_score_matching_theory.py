"""
FILE: 02_score_matching_theory.py
DIFFICULTY: Beginner
ESTIMATED TIME: 2-2.5 hours
PREREQUISITES: 01_score_functions_basics.py (scores, E_p[s] = 0, Fisher information),
               integration by parts, PyTorch autograd

LEARNING OBJECTIVES:
- Measure how far a model score is from the data score with the Fisher divergence.
- Derive Hyvarinen's implicit score matching (ISM) from explicit score matching (ESM) by
  integration by parts, and see that the two differ by a constant that does not depend on the
  model.
- Compute the Jacobian trace tr(grad_x s) exactly with autograd, and see why it costs D
  backward passes.
- State and check Stein's identity, the lemma behind both ISM and score-based goodness-of-fit.
- Derive denoising score matching (DSM) and show that it equals ESM on the noise-perturbed
  density up to a constant, which we compute in closed form.
- Fit a Gaussian and an unnormalised quartic density by score matching, never touching Z.

MATHEMATICAL BACKGROUND:
  Notation: data density p on R^D, its score s_p(x) = grad_x log p(x); a model score
  s_theta: R^D -> R^D; |v|^2 = v^T v; tr(grad_x s) = sum_i d s_i / d x_i.

- Fisher divergence:   F(p, p_theta) = 1/2 E_{x~p} | grad log p(x) - grad log p_theta(x) |^2
                       (>= 0; = 0 iff the scores agree wherever p > 0)
- Explicit SM:         J_ESM(theta) = 1/2 E_p | s_theta(x) - s_p(x) |^2    (needs s_p: unknown)
- Implicit SM:         J_ISM(theta) = E_p [ tr(grad_x s_theta(x)) + 1/2 |s_theta(x)|^2 ]
  Integration by parts, if p(x) s_theta(x) -> 0 as |x| -> infinity:
                       E_p[ s_theta^T s_p ] = int s_theta^T grad p dx = -E_p[ tr(grad_x s_theta) ]
                   =>  J_ESM(theta) = J_ISM(theta) + C,   C = 1/2 E_p |s_p(x)|^2
- Stein's identity:    E_p[ s_p(x) f(x) + grad f(x) ] = 0   for smooth f with p f -> 0,
  vector form:         E_p[ s_p(x)^T g(x) + tr(grad g(x)) ] = 0  (g = s_theta gives ISM)
- Gaussian model s(x) = -P (x - mu):  J_ISM = -tr P + 1/2 mean_n |P (x_n - mu)|^2,
  minimised by mu = sample mean, P = S^{-1} (S = sample covariance with 1/N), min = -1/2 tr S^{-1}
  (gradient in P: -I + 1/2 (P S + S P) = 0; in S's eigenbasis (l_i + l_j) P_ij = 2 delta_ij)
- Exponential family log p_theta = -theta^T psi(x) - log Z(theta) in 1D: s = -theta^T psi'(x),
  J_ISM = -theta^T E[psi''] + 1/2 theta^T E[psi' psi'^T] theta
                   =>  theta* = E[psi' psi'^T]^{-1} E[psi'']
- Denoising SM:        x~ = x + sigma z,  q(x~|x) = N(x~; x, sigma^2 I),
                       p_sigma = p * N(0, sigma^2 I)  (the density of x~)
                       J_DSM(theta) = 1/2 E_{x, z} | s_theta(x~) + z / sigma |^2
                       (since grad_{x~} log q(x~|x) = -(x~ - x)/sigma^2 = -z/sigma)
                   =>  J_DSM(theta) = J_ESM,sigma(theta) + C_sigma,
                       J_ESM,sigma(theta) = 1/2 E_{p_sigma} | s_theta(x~) - grad log p_sigma(x~) |^2
                       C_sigma = D / (2 sigma^2) - 1/2 E_{p_sigma} |grad log p_sigma|^2
                               = 1/2 E tr Cov(z / sigma | x~)  >= 0
  Posterior form:      grad log p_sigma(x~) = E[ -z / sigma | x~ ]  (average over p(x | x~))

IMPLEMENTATION NOTES:
- `jacobian_trace(score_fn, x)` works for any score function R^D -> R^D that treats the rows of
  a batch independently (no batch norm): one backward pass per input dimension. Module 05
  (sliced score matching) reuses it through `load_module("02")` and replaces it by random
  projections.
- The losses take `reduction="none"` to return one value per sample. The same per-sample values
  give Monte Carlo averages with standard errors on samples, and exact expectations (to ~1e-12)
  as weighted sums on a fine 1D grid. That is how we show the ISM-ESM and DSM-ESM offsets are
  constant to round-off, not just "within noise".
- This module computes on the CPU, whatever --device says: its problems are tiny. Everything
  is float64 (we compare with closed forms to many digits), except the timing demonstration of
  Section 4.6, which uses float32 like real training. The shared --threads flag (default 1)
  sets the CPU threads. A default run takes about 10 s on a laptop CPU, most of it importing
  torch, scipy and matplotlib.
- The gradient-based fits use scipy's BFGS with autograd gradients (torch.optim is not needed
  for five parameters), and the Gaussian fit ends with one Newton step (its loss is quadratic).

Run:
    python 02_score_matching_theory.py           # figures go to outputs/02_score_matching_theory/
    python 02_score_matching_theory.py --quick   # smaller samples and sweeps, about 7 s
    python 02_score_matching_theory.py --sigma 0.2 --n-mc 50000
    pytest tests/test_02_score_matching_theory.py   # the equations of this module, checked
    pytest tests/test_02_exercises.py -k your_answer  # check your answers

References:
- A. Hyvarinen (2005), Estimation of non-normalized statistical models by score matching. JMLR 6.
- P. Vincent (2011), A connection between score matching and denoising autoencoders.
  Neural Computation 23(7).
- C. Stein (1972), A bound for the error in the normal approximation to the distribution of a
  sum of dependent random variables. Proc. 6th Berkeley Symposium.
- Q. Liu, J. Lee, M. Jordan (2016), A kernelized Stein discrepancy for goodness-of-fit tests. ICML.
- Y. Song, S. Garg, J. Shi, S. Ermon (2019), Sliced score matching. UAI.
- Y. Song and S. Ermon (2019), Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (And Y. Song's blog post of the same name, 2021.)
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# `torch` computes the losses and, through autograd, the Jacobian traces that implicit score
# matching needs; `matplotlib` draws; `common` holds the shared command line, the Gaussian
# mixture with exact (and exactly perturbed) scores, and the exercise machinery.

# %%
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.cli import Count, Real, start_run, timing_row
from common.cli import make_parser as shared_parser
from common.datasets import GaussianMixture
from common.progress import progress

MODULE = "02_score_matching_theory"
Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]  # x: (N, D) -> s(x): (N, D)

# Closed forms are compared to many digits: everything here is double precision.
DTYPE = torch.float64


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    n_mc: int = 20_000  # Monte Carlo samples for the loss sweeps and Stein's identity
    n_sweep: int = 41  # parameter values in the ISM/ESM and DSM/ESM sweeps
    n_grid: int = 1201  # points of the 1D quadrature grid (exact expectations)
    sigma: float = 0.5  # noise level of the denoising score matching demonstration
    n_gauss: int = 2000  # samples for the Gaussian fit
    n_quartic: int = 5000  # samples for the quartic-energy fit
    bfgs_iters: int = 100  # at most this many BFGS iterations in the gradient-based fits
    cost_dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)  # dimensions of the cost measurement
    n_sigmas: int = 9  # noise levels in the C_sigma-against-sigma panel

    @classmethod
    def quick(cls) -> Config:
        return cls(n_mc=4000, n_sweep=17, n_grid=801, n_gauss=1000, n_quartic=2000,
                   cost_dims=(2, 4, 8, 16, 32), n_sigmas=5)


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 02: score matching theory (Fisher divergence, ESM, ISM, "
                           "Stein's identity, DSM), every identity checked numerically.")
    # Below 0.05 the exact double-sum quadrature of Section 3.5 would need a grid too fine for a
    # laptop (its spacing must resolve sigma).
    parser.add_argument("--sigma", type=Real(0.05, 20), default=0.5,
                        help="noise level sigma of the denoising score matching demonstration, "
                             "in [0.05, 20] (default: 0.5)")
    # Standard errors need a few hundred samples to be trustworthy (with N = 1 they are NaN).
    # Cost per sample, measured with --quick (17-point sweeps): 2.9 kB held (autograd graphs of
    # the sweeps and of Stein's test functions) and 18 us; the default 41-point sweeps about
    # 2.4 times that.
    parser.add_argument("--n-mc", type=Count(100, bytes_each=7e3, seconds_each=45e-6,
                                             unit="sample"), default=None,
                        help="Monte Carlo sample size for the sweeps and Stein's identity, "
                             "at least 100 (default: 20000, or 4000 with --quick)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 The task, and why maximum likelihood is awkward
# We have samples $x_1, \dots, x_N$ from an unknown density $p$ on $\mathbb{R}^D$ and want a
# model of its **score** $s_p(x) = \nabla_x \log p(x)$ (module 01). A model
# $p_\theta(x) = e^{-E_\theta(x)} / Z(\theta)$ is easy to write down, but maximum likelihood
# needs $\log Z(\theta) = \log \int e^{-E_\theta(x)} dx$ and its gradient, an integral over the
# whole space. The score $s_\theta = -\nabla_x E_\theta$ does not contain $Z$. Score matching
# fits $s_\theta$ directly, so $Z$ never has to be computed.
#
# ## 2.2 The Fisher divergence and explicit score matching
# The natural distance between two scores is the **Fisher divergence**. For the data density
# $p$ and a model density $p_\theta$ with score $s_\theta = \nabla_x \log p_\theta$,
# $$ F(p, p_\theta) = \tfrac12\, \mathbb{E}_{x\sim p}\,
#    \big| \nabla_x \log p(x) - \nabla_x \log p_\theta(x) \big|^2 . $$
# It is $\ge 0$, and it is $0$ exactly when the scores agree wherever $p > 0$. If $p$ is positive
# everywhere, that means $\log p - \log p_\theta$ is a constant, and since both densities
# integrate to 1, $p = p_\theta$. (Some papers leave out the factor $\tfrac12$. We keep it so
# that $F$ *is* the loss below.)
# **Explicit score matching** (ESM) minimises the Fisher divergence between the data and the model:
# $$ J_{\mathrm{ESM}}(\theta) = \tfrac12\, \mathbb{E}_{p}\, \big| s_\theta(x) - s_p(x) \big|^2 . $$
# It needs $s_p$, the very thing we do not know. In this module we use ESM only as a
# ground truth, on toy densities whose scores are known in closed form.
#
# ## 2.3 Implicit score matching: integration by parts removes $s_p$
# Expand the square:
# $$ J_{\mathrm{ESM}}(\theta) = \mathbb{E}_p\big[\tfrac12 |s_\theta|^2\big]
#      - \mathbb{E}_p\big[s_\theta^\top s_p\big] + \tfrac12\,\mathbb{E}_p |s_p|^2 . $$
# The last term does not depend on $\theta$. The first is an average over samples. Only the cross
# term involves the unknown $s_p$. We remove it with the same integration by parts as module 01
# (Section 2.8, where it turned $\mathbb{E}_p[s s^\top]$ into the Fisher information). Write the
# cross term as an integral and use $p\, \nabla \log p = \nabla p$:
# $$ \mathbb{E}_p[s_\theta^\top s_p] = \int s_\theta(x)^\top \nabla p(x)\, dx
#    = \sum_{i=1}^D \int s_{\theta,i}(x)\, \partial_i p(x)\, dx . $$
# For each $i$ integrate by parts in the variable $x_i$, with the other coordinates held fixed:
# $$ \int_{-\infty}^{\infty} s_{\theta,i}\, \partial_i p \, dx_i
#    = \Big[ s_{\theta,i}\, p \Big]_{x_i=-\infty}^{x_i=+\infty}
#      - \int_{-\infty}^{\infty} p\, \partial_i s_{\theta,i}\, dx_i . $$
# The boundary term vanishes if $p(x)\, s_\theta(x) \to 0$ as $|x| \to \infty$: the density decays
# faster than the model score grows. Summing over $i$,
# $$ \mathbb{E}_p[s_\theta^\top s_p]
#    = -\,\mathbb{E}_p\big[\operatorname{tr} \nabla_x s_\theta(x)\big],
#    \qquad \operatorname{tr} \nabla_x s_\theta
#    = \sum_i \frac{\partial s_{\theta,i}}{\partial x_i}. $$
# Substituting gives **Hyvarinen's implicit score matching** (2005):
# $$ J_{\mathrm{ESM}}(\theta) = J_{\mathrm{ISM}}(\theta) + C, \qquad
#    J_{\mathrm{ISM}}(\theta) = \mathbb{E}_p\Big[\operatorname{tr}\nabla_x s_\theta(x)
#    + \tfrac12 |s_\theta(x)|^2\Big], \qquad C = \tfrac12\, \mathbb{E}_p |s_p(x)|^2 . $$
# $J_{\mathrm{ISM}}$ needs only samples of $p$ and the model. It has the same minimiser as ESM,
# and its minimum is $-C$, not $0$. The constant $C$ is half the trace of the Fisher information
# of module 01: for $\mathcal{N}(\mu, \Sigma)$, $C = \tfrac12 \operatorname{tr} \Sigma^{-1}$.
# The assumptions: $p$ differentiable, $\mathbb{E}_p|s_p|^2 < \infty$,
# $\mathbb{E}_p|s_\theta|^2 < \infty$, and the vanishing boundary term.
#
# **Why the trace is expensive.** Reverse-mode autograd computes a vector-Jacobian product
# $v^\top \nabla_x s$ in one backward pass. With $v = e_i$ that is row $i$ of the Jacobian, and
# we keep only its diagonal entry $\partial_i s_i$. The trace therefore costs $D$ backward
# passes, and the training gradient of ISM differentiates through all of them.
# For images ($D = 784$ for MNIST, $3072$ for CIFAR-10) this is prohibitive. Module 05 (sliced
# score matching) replaces the trace by random projections, and denoising score matching
# (2.6) avoids it altogether.
#
# ## 2.4 Stein's identity
# The lemma behind the derivation deserves its own name. For a smooth scalar **test function**
# $f$ with $p(x) f(x) \to 0$ at infinity,
# $$ \mathbb{E}_p\big[ s_p(x)\, f(x) + \nabla f(x) \big] = 0 , $$
# because $p\, s_p f + p \nabla f = f \nabla p + p \nabla f = \nabla (p f)$, which integrates to 0.
# The vector form, for $g: \mathbb{R}^D \to \mathbb{R}^D$, is
# $$ \mathbb{E}_p\big[ s_p(x)^\top g(x) + \operatorname{tr}\nabla g(x) \big] = 0 . $$
# With $g = s_\theta$ this is exactly the identity of 2.3, so
# $J_{\mathrm{ESM}} - J_{\mathrm{ISM}} - C
#  = -\mathbb{E}_p[s_p^\top s_\theta + \operatorname{tr}\nabla s_\theta] = 0$.
#
# Read the other way, Stein's identity *tests* a score: a candidate $s$ that is not $s_p$ leaves
# a non-zero residual $\mathbb{E}_p[s f + \nabla f]$ for some $f$. (The kernelised Stein
# discrepancy turns this into a goodness-of-fit test.) Which $f$ expose which mistakes? Take the
# Gaussian $G$ with the same mean $\mu = \mathbb{E}_p[x]$ and covariance
# $\Sigma = \mathrm{Cov}_p[x]$ as $p$, and its score $s_G(x) = -P(x - \mu)$, $P = \Sigma^{-1}$.
# With $f = 1$ its residual is $\mathbb{E}_p[-P(x - \mu)] = -P(\mathbb{E}_p[x] - \mu) = 0$.
# With $f = x_j$ (all $j$ at once, as a matrix) it is
# $\mathbb{E}_p[-P(x - \mu)x^\top] + I = -P\Sigma + I = 0$, because
# $\mathbb{E}_p[(x-\mu)x^\top] = \mathbb{E}_p[(x-\mu)(x-\mu)^\top] = \Sigma$.
# Test functions of degree at most 1 only probe the mean and the covariance, and those match.
# A quadratic one does not: since $G$ passes every test under its own law,
# $\mathbb{E}_p[s_G f + \nabla f]
#  = \mathbb{E}_p[s_G f + \nabla f] - \mathbb{E}_G[s_G f + \nabla f]$,
# and for $f = x_1 x_2$ this is $-P\,(\mathbb{E}_p - \mathbb{E}_G)[(x - \mu)\, x_1 x_2]$
# (the $\nabla f = (x_2, x_1)$ terms cancel, the means agree). That is a difference of **third
# moments**: zero for a symmetric $p$, non-zero for the skewed mixture of Section 4.4. Smooth
# nonlinear $f$ such as $\sin$ or $e^{-|x|^2/4}$ involve moments of every order.
#
# ## 2.5 Two cases solvable in closed form
# **Gaussian model.** With $s(x) = -P(x - \mu)$ ($P$ a symmetric precision matrix),
# $\nabla_x s = -P$, and on samples
# $$ J_{\mathrm{ISM}}(\mu, P) = -\operatorname{tr} P
#    + \tfrac12\, \frac1N \sum_n |P(x_n - \mu)|^2 . $$
# Setting the gradient in $\mu$ to zero gives $\mu = \bar x$. What remains is
# $-\operatorname{tr}P + \tfrac12 \operatorname{tr}(P S P)$, with
# $S = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top$. Its gradient in $P$ is
# $-I + \tfrac12(PS + SP)$, which vanishes when $PS + SP = 2I$. This equation has one solution:
# in the eigenbasis of $S = U \Lambda U^\top$ (eigenvalues $\lambda_i > 0$ when the samples span
# $\mathbb{R}^D$), $P' = U^\top P U$ must satisfy $(\lambda_i + \lambda_j) P'_{ij} = 2\delta_{ij}$,
# so $P' = \Lambda^{-1}$ and $P = S^{-1}$. Score matching therefore returns the sample mean
# and the inverse of the (biased) sample covariance, which are the maximum-likelihood estimates,
# and the minimum value is $-\operatorname{tr}S^{-1} + \tfrac12\operatorname{tr}S^{-1}
# = -\tfrac12 \operatorname{tr} S^{-1}$. In the parameters $(P, h = P\mu)$ the score $-Px + h$ is
# linear, and $J_{\mathrm{ISM}}$ is a convex quadratic.
#
# **Exponential families.** If $\log p_\theta(x) = -\theta^\top \psi(x) - \log Z(\theta)$ with
# features $\psi$ (1D here), then $s_\theta = -\theta^\top \psi'(x)$ and
# $\partial_x s_\theta = -\theta^\top \psi''(x)$. The objective is a quadratic in $\theta$:
# $$ J_{\mathrm{ISM}}(\theta) = -\theta^\top \mathbb{E}[\psi''] + \tfrac12\, \theta^\top
#    \mathbb{E}[\psi' \psi'^\top]\, \theta
#    \quad\Longrightarrow\quad
#    \hat\theta = \mathbb{E}[\psi'\psi'^\top]^{-1}\, \mathbb{E}[\psi''] . $$
# One linear solve fits an unnormalised density such as the quartic energy
# $E_\theta(x) = \theta_1 x^4 + \theta_2 x^2 + \theta_3 x$, and no normalising constant is
# computed at any point. The price: nothing in the objective knows that $e^{-E_\theta}$ must be
# integrable. A fit with $\hat\theta_1 < 0$ is not a density at all, and it happens, for
# example on Gaussian data, whose true $\theta_1$ is $0$ (Section 4.3).
#
# ## 2.6 Denoising score matching (Vincent 2011)
# Add Gaussian noise to each data point: $\tilde x = x + \sigma z$, $z \sim \mathcal{N}(0, I)$, so
# $q_\sigma(\tilde x \mid x) = \mathcal{N}(\tilde x; x, \sigma^2 I)$ (the noise **kernel**) and the
# noisy data have density $p_\sigma(\tilde x) = \int p(x)\, q_\sigma(\tilde x\mid x)\, dx$. The
# score of the kernel is known:
# $\nabla_{\tilde x} \log q_\sigma(\tilde x\mid x) = -(\tilde x - x)/\sigma^2 = -z/\sigma$.
# DSM regresses the model onto it:
# $$ J_{\mathrm{DSM}}(\theta) = \tfrac12\, \mathbb{E}_{x\sim p,\ \tilde x\sim q_\sigma(\cdot\mid x)}
#    \big| s_\theta(\tilde x) - \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x) \big|^2
#    = \tfrac12\, \mathbb{E}_{x, z} \big| s_\theta(x + \sigma z) + z/\sigma \big|^2 . $$
# Compare it with ESM on the perturbed density,
# $J_{\mathrm{ESM},\sigma}(\theta)
#  = \tfrac12 \mathbb{E}_{p_\sigma}|s_\theta(\tilde x) - \nabla \log p_\sigma(\tilde x)|^2$.
# Expanding both squares, the $\tfrac12|s_\theta|^2$ terms agree (both average over
# $\tilde x \sim p_\sigma$). For the cross terms, write $q_\sigma \nabla \log q_\sigma
# = \nabla q_\sigma$ (as $p \nabla \log p = \nabla p$ in 2.3), then move the gradient in
# $\tilde x$ outside the integral over $x$, which it does not touch:
# $$ \mathbb{E}_{x,\tilde x}\big[s_\theta(\tilde x)^\top
#    \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x)\big]
#    = \int s_\theta(\tilde x)^\top \Big[\int p(x)\,
#    \nabla_{\tilde x} q_\sigma(\tilde x\mid x)\, dx\Big] d\tilde x
#    = \int s_\theta(\tilde x)^\top \nabla_{\tilde x}\Big[\int p(x)\,
#    q_\sigma(\tilde x\mid x)\, dx\Big] d\tilde x
#    = \mathbb{E}_{p_\sigma}\big[s_\theta^\top \nabla\log p_\sigma\big]. $$
# (The last step is $\nabla p_\sigma = p_\sigma \nabla \log p_\sigma$.) Only the $\theta$-free
# squares of the targets differ, and $\mathbb{E}|z/\sigma|^2 = D/\sigma^2$:
# $$ J_{\mathrm{DSM}}(\theta) = J_{\mathrm{ESM},\sigma}(\theta) + C_\sigma, \qquad
#    C_\sigma = \frac{D}{2\sigma^2} - \tfrac12\, \mathbb{E}_{p_\sigma} |\nabla \log p_\sigma|^2 . $$
#
# **The posterior view.** The bracket above says
# $\nabla p_\sigma(\tilde x) = \int p(x)\, q_\sigma(\tilde x\mid x)\,
# \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x)\, dx$. Divide by $p_\sigma(\tilde x)$:
# $$ \nabla \log p_\sigma(\tilde x) = \int p(x\mid\tilde x)\,
#    \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x)\, dx
#    = \mathbb{E}\big[-z/\sigma \,\big|\, \tilde x\big], \qquad
#    p(x\mid \tilde x) = \frac{p(x)\, q_\sigma(\tilde x\mid x)}{p_\sigma(\tilde x)} . $$
# $p(x \mid \tilde x)$ is the **posterior** (Bayes' rule): the distribution of the clean points
# that could have produced the noisy point $\tilde x$. The **conditional expectation**
# $\mathbb{E}[\,\cdot \mid \tilde x]$ averages over it, with $\tilde x$ held fixed. So the noisy
# target $t = -z/\sigma$ averages, at every $\tilde x$, to the score of $p_\sigma$. Now split the
# mean square of $t$ at each $\tilde x$ into the square of its mean plus its variance
# ($\mathbb{E}[|t|^2 \mid \tilde x] = |\mathbb{E}[t\mid\tilde x]|^2
# + \operatorname{tr}\operatorname{Cov}(t \mid \tilde x)$) and average over $\tilde x$ (the law of
# total variance):
# $$ C_\sigma = \tfrac12\,\mathbb{E}|t|^2
#    - \tfrac12\,\mathbb{E}\big|\mathbb{E}[t\mid\tilde x]\big|^2
#    = \tfrac12\, \mathbb{E}\,\operatorname{tr}\operatorname{Cov}(z/\sigma\mid\tilde x) \ge 0 . $$
# $C_\sigma$ is the part of the target that no function of $\tilde x$ can predict.
# Three consequences are used throughout the tutorial:
# - DSM needs no Jacobian: one forward pass per sample (and one backward pass to train), so it
#   scales to images;
# - its minimiser is $\nabla \log p_\sigma$, the score of the *noisy* data: small $\sigma$ means
#   little bias;
# - but $C_\sigma \approx D/(2\sigma^2)$ is a floor under the loss that explodes as
#   $\sigma \to 0$, along with the variance of the loss estimate. Modules 04, 06 and 07 deal with
#   this by using several noise levels and weighting the loss by $\sigma^2$.

# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Averages with error bars
# Every Monte Carlo number in this module comes with its standard error, so a claim like "the
# residual is zero" can be checked against the noise it should have.

# %%
def mean_and_se(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and its standard error std / sqrt(N) along the first axis.

    values: (N, ...) -> (mean (...), se (...)).
    """
    n = values.shape[0]
    return values.mean(0), values.std(0) / math.sqrt(n)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    """'mean' -> the average (a scalar); 'none' -> the per-sample values (N,)."""
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# %% [markdown]
# ## 3.2 The Jacobian trace, exactly, with autograd
# One backward pass of $\sum_n s_i(x_n)$ gives $\partial s_i(x_n)/\partial x_n$ for every sample
# at once, because sample $n$'s score depends only on $x_n$. We keep the $i$-th entry and repeat
# for $i = 1, \dots, D$, so the cost is $D$ backward passes. Pass `create_graph=True` when the
# trace is part of a loss to be differentiated with respect to parameters (training). Without
# it autograd returns the derivatives $\partial s_i / \partial x_i$ as plain numbers, cut off
# from the parameters: `loss.backward()` then sees only the $\tfrac12|s_\theta|^2$ term, and
# training silently pushes the score towards zero instead of towards $s_p$ (a test checks this).

# %%
def score_and_jacobian_trace(score_fn: ScoreFn, x: Tensor,
                             create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """s(x) and tr(grad_x s(x)) = sum_i d s_i / d x_i, exactly, with D backward passes.

    x: (N, D) or (N, *shape) (flattened to D = prod(shape) features); ``score_fn`` maps x to
    the same shape and must treat the N rows independently (no batch norm).
    Returns s: like x, and the trace: (N,). With ``create_graph`` both stay differentiable
    with respect to the parameters of ``score_fn`` (needed to train on the ISM loss).
    """
    with torch.enable_grad():  # also works when called under torch.no_grad()
        x = x.detach().requires_grad_(True)  # we differentiate in x, never through the data
        s = score_fn(x)
        if s.shape != x.shape:
            raise ValueError(f"score_fn must return the shape of its input {tuple(x.shape)}, "
                             f"got {tuple(s.shape)}")
        flat_s = s.reshape(len(x), -1)  # (N, D)
        trace = torch.zeros(len(x), dtype=s.dtype, device=s.device)
        if not s.requires_grad:  # s does not depend on x at all: its Jacobian is zero
            return s, trace
        for i in range(flat_s.shape[1]):
            # Backward pass i: v = e_i gives row i of every sample's Jacobian, d s_i / d x.
            (row,) = torch.autograd.grad(flat_s[:, i].sum(), x, create_graph=create_graph,
                                         retain_graph=True, allow_unused=True)
            if row is not None:  # None: s_i is constant in x
                trace = trace + row.reshape(len(x), -1)[:, i]  # keep the diagonal d s_i / d x_i
    return s, trace


def jacobian_trace(score_fn: ScoreFn, x: Tensor, create_graph: bool = False) -> Tensor:
    """tr(grad_x s(x)) for every sample, shape (N,). Costs D backward passes (see above)."""
    return score_and_jacobian_trace(score_fn, x, create_graph)[1]


# %% [markdown]
# ## 3.3 The three score-matching losses and the Fisher divergence
# Each loss returns one value per sample with `reduction="none"`. A Monte Carlo estimate is
# their mean. An exact expectation is their weighted sum on a quadrature grid (3.5).

# %%
def fisher_divergence(score_p: ScoreFn, score_model: ScoreFn, x: Tensor,
                      reduction: str = "mean") -> Tensor:
    """F(p, p_theta) = 1/2 E_{x~p} |score_p(x) - score_model(x)|^2, estimated on samples x ~ p.

    x: (N, D) (or (N, *shape)); returns a scalar, or (N,) per-sample values with 'none'.
    (Any two scores can be compared; the expectation is always under p, the first argument.)
    """
    diff = (score_p(x) - score_model(x)).reshape(len(x), -1)
    return _reduce(0.5 * diff.square().sum(1), reduction)


def esm_loss(score_fn: ScoreFn, x: Tensor, true_score: ScoreFn, reduction: str = "mean"):
    """J_ESM = 1/2 E_p |s_theta(x) - s_p(x)|^2: the Fisher divergence from the data to the model.

    x: (N, D) samples of p; ``true_score`` is s_p, known only for toy problems.
    """
    return fisher_divergence(true_score, score_fn, x, reduction)


def ism_loss(score_fn: ScoreFn, x: Tensor, reduction: str = "mean",
             create_graph: bool = True) -> Tensor:
    """J_ISM = E_p[ tr(grad_x s_theta(x)) + 1/2 |s_theta(x)|^2 ] (Hyvarinen 2005).

    x: (N, D) samples of p. No s_p needed. J_ISM = J_ESM - 1/2 E_p|s_p|^2.
    ``create_graph=True`` (default) keeps the trace differentiable in the parameters; pass
    False when only the value is wanted.
    """
    s, trace = score_and_jacobian_trace(score_fn, x, create_graph)
    per_sample = trace + 0.5 * s.reshape(len(x), -1).square().sum(1)
    return _reduce(per_sample, reduction)


def dsm_loss_unweighted(score_fn: ScoreFn, x: Tensor, sigma: float, noise: Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """J_DSM = 1/2 E_{x,z} | s_theta(x + sigma z) + z / sigma |^2 (Vincent 2011).

    x: (N, D) clean samples of p. ``noise`` z (same shape) is drawn from N(0, I) unless given
    (pass the same z to compare models on identical noise). The target -z/sigma is
    grad_{x~} log N(x~; x, sigma^2 I) at x~ = x + sigma z. Returns a scalar or (N,).
    """
    z = noise if noise is not None else torch.randn(
        x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_tilde = x + sigma * z  # a sample of p_sigma
    target = -z / sigma  # grad log q_sigma(x~ | x) = -(x~ - x) / sigma^2
    diff = (score_fn(x_tilde) - target).reshape(len(x), -1)
    return _reduce(0.5 * diff.square().sum(1), reduction)


def esm_minus_ism(score_p: ScoreFn, x: Tensor) -> Tensor:
    """C = 1/2 |s_p(x)|^2 per sample (N,): its mean is J_ESM - J_ISM for every model."""
    return 0.5 * score_p(x).reshape(len(x), -1).square().sum(1)


def dsm_minus_esm(perturbed_score: ScoreFn, x_tilde: Tensor, sigma: float) -> Tensor:
    """C_sigma = D / (2 sigma^2) - 1/2 |grad log p_sigma(x~)|^2 per sample (N,), x~ ~ p_sigma.

    Its mean is J_DSM - J_ESM,sigma for every model.
    """
    D = x_tilde[0].numel()
    return D / (2 * sigma**2) - 0.5 * perturbed_score(x_tilde).reshape(len(x_tilde), -1) \
        .square().sum(1)


# %% [markdown]
# ## 3.4 Stein's identity as a computation
# For a scalar test function $f$ the residual $s(x) f(x) + \nabla f(x)$ has mean zero under $p$
# when $s = s_p$. We get $\nabla f$ from autograd, so any differentiable $f$ can be tested.

# %%
def stein_residual(score_fn: ScoreFn, f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-sample s(x) f(x) + grad f(x), shape (N, D); its mean under p is 0 iff s passes f.

    x: (N, D) samples of p; f maps (N, D) -> (N,).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x)
        if fx.requires_grad:
            (grad_f,) = torch.autograd.grad(fx.sum(), x)  # rows independent: grad of f(x_n)
        else:
            grad_f = torch.zeros_like(x)  # f does not depend on x (e.g. f = 1)
    return score_fn(x.detach()) * fx.detach()[:, None] + grad_f


def stein_vector_residual(score_fn: ScoreFn, g: ScoreFn, x: Tensor) -> Tensor:
    """Per-sample s(x)^T g(x) + tr(grad g(x)), shape (N,), for g: R^D -> R^D.

    With g = s_theta its mean is E_p[s_p^T s_theta] + E_p[tr grad s_theta] = 0: the step that
    turns ESM into ISM.
    """
    g_x, div_g = score_and_jacobian_trace(g, x)
    return (score_fn(x) * g_x.detach()).sum(1) + div_g


# %% [markdown]
# ## 3.5 Exact expectations on a 1D grid
# In one dimension an expectation $\mathbb{E}_p[h] = \int p(x) h(x)\,dx$ can be computed on a fine
# uniform grid. For smooth integrands that decay like Gaussians, the plain Riemann sum is
# accurate to round-off. Why so good: when the integrand is negligible at both ends of the
# grid, the Riemann sum equals the trapezoid rule, and the Euler-Maclaurin formula writes the
# trapezoid rule's error as a series of derivatives of the integrand *at the two ends*, all of
# them negligible too. The error then falls faster than any power of the spacing (it is not the
# $O(\Delta^2)$ of a generic integrand). This lets us check "ISM - ESM is constant" without
# Monte Carlo noise.
# DSM averages over pairs $(x, \tilde x)$, so its exact value is a double sum with weights
# $p(x_i)\, q_\sigma(\tilde x_j \mid x_i)\, \Delta^2$. We evaluate this directly from the
# definition, without using $p_\sigma$.

# %%
def grid_1d(dist: GaussianMixture, sigma: float, n: int) -> tuple[Tensor, float]:
    """A uniform grid (n', 1) that covers p_sigma = p * N(0, sigma^2) to 12 standard deviations.

    n' = max(n, points needed for a spacing <= sigma / 3, so the noise kernel is resolved).
    """
    tau = math.sqrt(dist.covs.max().item() + sigma**2)
    lo, hi = dist.means.min().item() - 12 * tau, dist.means.max().item() + 12 * tau
    if sigma > 0:
        n = max(n, math.ceil(3 * (hi - lo) / sigma) + 1)
    x = torch.linspace(lo, hi, n, dtype=DTYPE)[:, None]
    return x, (hi - lo) / (n - 1)


def grid_weights(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Quadrature weights w_j proportional to p(x_j), summing to 1, so E_p[h] = sum_j w_j h(x_j).

    x: (n, 1) uniform grid. Normalising by the sum also lets p be unnormalised.
    """
    log_w = log_prob(x)
    return torch.softmax(log_w, dim=0)  # exp(log p_j) / sum_k exp(log p_k)


def dsm_grid_moments(dist: GaussianMixture, x: Tensor,
                     sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """The law of (x, x~) on the grid, summarised for J_DSM: (c0 (n,), c1 (n,), c2 scalar).

    x: (n, 1) uniform grid, used for both x and x~. With weights W_ij proportional to
    p(x_i) N(x~_j; x_i, sigma^2) (summing to 1) and the target t_ij = -(x~_j - x_i) / sigma^2,
    expanding 1/2 (s_j - t_ij)^2 = 1/2 s_j^2 - s_j t_ij + 1/2 t_ij^2 gives
        J_DSM = sum_j [ 1/2 s_j^2 c0_j - s_j c1_j ] + c2,
        c0_j = sum_i W_ij,   c1_j = sum_i W_ij t_ij,   c2 = 1/2 sum_ij W_ij t_ij^2.
    The n x n sums are done once; each model then costs O(n).
    """
    log_p = dist.log_prob(x)  # (n,): log p(x_i)
    log_q = -0.5 * ((x.T - x) / sigma) ** 2  # (n, n): log N(x~_j; x_i, sigma^2) + const
    W = torch.softmax((log_p[:, None] + log_q).flatten(), dim=0).reshape(log_q.shape)
    target = -(x.T - x) / sigma**2  # (n, n): grad_{x~} log q(x~_j | x_i)
    return W.sum(0), (W * target).sum(0), 0.5 * (W * target**2).sum()


def dsm_loss_on_grid(score_fn: ScoreFn, x: Tensor,
                     moments: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """J_DSM = E_{x, x~}[ 1/2 (s(x~) - grad log q(x~ | x))^2 ], exactly on the grid (1D).

    x: (n, 1) grid; ``moments`` from ``dsm_grid_moments``. Returns a scalar.
    """
    c0, c1, c2 = moments
    s = score_fn(x)[:, 0].detach()  # s_theta at the noisy grid points x~_j, (n,)
    return (0.5 * s**2 * c0 - s * c1).sum() + c2


# %% [markdown]
# ## 3.6 The toy densities and models
# The 1D target of the sweeps is a two-component mixture, so its score is not linear.
# The sweep's model is the same mixture with the second mean $m_2$ free, so ESM is zero exactly
# at $m_2 = 2$. For DSM both mixtures are widened by $\sigma^2$, which makes the model family
# contain the perturbed data density $p_\sigma$.

# %%
def target_1d(m2: float = 2.0, extra_var: float = 0.0) -> GaussianMixture:
    """0.7 N(-1, 0.6^2 + v) + 0.3 N(m2, 0.8^2 + v) in 1D (v = ``extra_var``)."""
    covs = [[[0.36 + extra_var]], [[0.64 + extra_var]]]
    return GaussianMixture([0.7, 0.3], [[-1.0], [m2]], covs)


def target_2d() -> GaussianMixture:
    """A skewed three-component 2D mixture: the target of the Stein's-identity demonstration."""
    means = [[-1.5, 0.0], [1.0, 1.0], [1.5, -1.5]]
    covs = [[[0.6, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.5]], [[0.5, 0.0], [0.0, 0.2]]]
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)


def gaussian_score_precision(x: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """s(x) = -P (x - mu).  x: (N, D), mean: (D,), precision P: (D, D) symmetric -> (N, D)."""
    return -(x - mean) @ precision  # row form of -P (x - mu); P = P^T


def gaussian_ism_solution(x: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form ISM minimiser for s = -P(x - mu): mu = x_bar, P = S^{-1}.

    S = 1/N sum_n (x_n - x_bar)(x_n - x_bar)^T is the biased sample covariance.

    x: (N, D) -> (mu (D,), P (D, D)).
    """
    mu = x.mean(0)
    centred = x - mu
    S = centred.T @ centred / len(x)  # biased (1/N) sample covariance: the ML estimate
    return mu, torch.linalg.inv(S)


# %% [markdown]
# ## 3.7 An unnormalised quartic energy (an exponential family)
# $E_\theta(x) = \theta_1 x^4 + \theta_2 x^2 + \theta_3 x$ has features
# $\psi = (x^4, x^2, x)$, so $\psi' = (4x^3, 2x, 1)$ and $\psi'' = (12x^2, 2, 0)$. With
# $\theta_1 > 0$, $\theta_2 < 0$ it is a double well, tilted by $\theta_3$. We draw exact samples
# by inverting its numerically integrated CDF (in 1D that is easy). The score-matching fit itself
# never uses a normalising constant.
#
# **How precise is $\hat\theta$?** It solves $\frac1N \sum_n g_n(\hat\theta) = 0$, where
# $g_n(\theta) = \psi'_n \psi_n'^\top \theta - \psi''_n$ is sample $n$'s gradient of
# $J_{\mathrm{ISM}}$. Linearise around the true $\theta$: $\hat\theta - \theta \approx
# -A^{-1} \frac1N \sum_n g_n(\theta)$ with $A = \mathbb{E}[\psi'\psi'^\top]$. The average of
# $N$ independent $g_n$ has covariance $B/N$ with $B = \mathrm{Cov}(g_n)$, so
# $$ \mathrm{Cov}(\hat\theta) \approx A^{-1} B A^{-1} / N , $$
# the **sandwich formula** (the "bread" $A^{-1}$ on both sides of the "meat" $B$). It holds for
# any estimator defined by setting an average of per-sample gradients to zero. For maximum
# likelihood $B = A$ and it collapses to the inverse Fisher information over $N$; for score
# matching it does not. The Fisher divergence of the fit is exactly quadratic,
# $F(p, p_{\hat\theta}) = \tfrac12 (\hat\theta - \theta)^\top A\, (\hat\theta - \theta)$,
# so its typical size is $\tfrac12 \operatorname{tr}(A\,\mathrm{Cov}(\hat\theta))
# = \tfrac12 \operatorname{tr}(A^{-1} B)/N$.

# %%
QUARTIC_THETA = (0.5, -2.0, 0.5)  # the true (theta_1, theta_2, theta_3)


def quartic_energy(x: Tensor, theta) -> Tensor:
    """E_theta(x) = theta_1 x^4 + theta_2 x^2 + theta_3 x, elementwise."""
    t1, t2, t3 = theta
    return t1 * x**4 + t2 * x**2 + t3 * x


def quartic_score(x: Tensor, theta) -> Tensor:
    """s_theta(x) = -E_theta'(x) = -(4 theta_1 x^3 + 2 theta_2 x + theta_3), elementwise."""
    t1, t2, t3 = theta
    return -(4 * t1 * x**3 + 2 * t2 * x + t3)


def quartic_features(x: Tensor) -> tuple[Tensor, Tensor]:
    """psi'(x) and psi''(x) for psi = (x^4, x^2, x).  x: (N,) -> two (N, 3) tensors."""
    dpsi = torch.stack([4 * x**3, 2 * x, torch.ones_like(x)], dim=1)
    d2psi = torch.stack([12 * x**2, 2 * torch.ones_like(x), torch.zeros_like(x)], dim=1)
    return dpsi, d2psi


def exp_family_ism_solution(dpsi: Tensor, d2psi: Tensor) -> Tensor:
    """theta_hat = E[psi' psi'^T]^{-1} E[psi'']: the exact ISM minimiser for s = -theta^T psi'.

    dpsi, d2psi: (N, K) feature derivatives at the samples -> theta_hat (K,).
    """
    A = dpsi.T @ dpsi / len(dpsi)  # E[psi' psi'^T], (K, K)
    b = d2psi.mean(0)  # E[psi''], (K,)
    return torch.linalg.solve(A, b)


def exp_family_ism_se(dpsi: Tensor, d2psi: Tensor, theta: Tensor) -> Tensor:
    """Standard errors of theta_hat by the sandwich formula Cov = A^{-1} B A^{-1} / N.

    theta_hat solves mean_n g_n(theta) = 0 with g_n = psi'_n psi'_n^T theta - psi''_n
    (the per-sample ISM gradient); A = E[psi' psi'^T] is its Jacobian, B = Cov(g_n).
    """
    A = dpsi.T @ dpsi / len(dpsi)
    g = dpsi * (dpsi @ theta)[:, None] - d2psi  # (N, K) per-sample gradients
    B = torch.cov(g.T, correction=1)
    A_inv = torch.linalg.inv(A)
    return (A_inv @ B @ A_inv / len(dpsi)).diagonal().sqrt()


def sample_by_inverse_cdf(log_density: Callable[[Tensor], Tensor], lo: float, hi: float,
                          n: int, generator: torch.Generator, n_grid: int = 20_001) -> Tensor:
    """n exact-up-to-discretisation samples (n,) of an unnormalised 1D density on [lo, hi].

    The density is taken piecewise constant on n_grid - 1 cells (cell mass = trapezoid rule);
    u ~ U(0, 1) is mapped through the inverse of the resulting piecewise-linear CDF.
    """
    grid = torch.linspace(lo, hi, n_grid, dtype=DTYPE)
    dens = torch.exp(log_density(grid) - log_density(grid).max())  # rescaled, no overflow
    mass = 0.5 * (dens[1:] + dens[:-1])  # cell masses (the common factor dx cancels)
    cdf = torch.cat([torch.zeros(1, dtype=DTYPE), mass.cumsum(0)]) / mass.sum()
    u = torch.rand(n, generator=generator, dtype=DTYPE)
    j = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, n_grid - 2)  # cell of each u
    frac = (u - cdf[j]) / (cdf[j + 1] - cdf[j])  # position inside the cell
    return grid[j] + frac * (grid[1] - grid[0])


# %% [markdown]
# ## 3.8 Fitting by gradient descent on the generic ISM loss
# The closed forms above are special. To show that the generic, autograd-based `ism_loss` finds
# the same answer, we also minimise it numerically. BFGS is a quasi-Newton method: it builds a
# curvature estimate from successive gradients, and on these smooth convex problems it
# converges in a few dozen iterations. Autograd supplies the gradient (through the Jacobian
# trace), and `scipy.optimize.minimize` runs the iterations. We record the parameters after every
# iteration.
#
# BFGS stops short of full double precision. Its line search compares loss values, and near a
# minimum the loss changes only quadratically: moving the parameters by $10^{-8}$ changes a loss
# of size 1 by about $10^{-16}$, which double precision cannot resolve. So BFGS pins the
# parameters down to roughly 8 to 11 digits, depending on the sample. When the loss is exactly
# quadratic, as $J_{\mathrm{ISM}}$ is for the Gaussian model in $(P, h)$, one **Newton step**
# $\theta - H^{-1}\nabla_\theta J$ (gradient and Hessian $H$ by autograd, through the Jacobian
# trace) lands on the minimiser up to round-off.

# %%
def fit_by_bfgs(loss_fn: Callable[[Tensor], Tensor], theta0: Tensor,
                max_iter: int) -> list[Tensor]:
    """Minimise ``loss_fn(theta)`` over a flat float64 vector theta (K,) with BFGS.

    The gradient comes from autograd. Returns the iterates [theta_0, theta_1, ...], each (K,).
    """
    from scipy.optimize import minimize

    def value_and_grad(t: np.ndarray):
        theta = torch.tensor(t, dtype=DTYPE, requires_grad=True)
        loss = loss_fn(theta)
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.item(), grad.numpy()

    iterates = [theta0.clone()]
    minimize(value_and_grad, theta0.numpy(), jac=True, method="BFGS",
             callback=lambda t: iterates.append(torch.tensor(t, dtype=DTYPE)),
             options={"gtol": 1e-13, "maxiter": max_iter})
    return iterates


def newton_step(loss_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """theta - H^{-1} grad J(theta) for a flat float64 vector theta (K,) -> (K,).

    grad J and the Hessian H (K, K) come from autograd (for ISM, through the Jacobian trace,
    which ``ism_loss`` keeps differentiable). For a quadratic J this is its exact minimiser.
    """
    theta = theta.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(theta), theta, create_graph=True)
    # Row k of H is the gradient of the k-th entry of grad J: K extra backward passes.
    hessian = torch.stack([torch.autograd.grad(grad[k], theta, retain_graph=True)[0]
                           for k in range(len(theta))])
    return (theta - torch.linalg.solve(hessian, grad)).detach()


# %% [markdown]
# # Section 4: Examples and visualization
#
# Each demo draws one figure into `outputs/02_score_matching_theory/` and returns the numbers
# it measured; `main` collects them into the closing summary.
#
# ## 4.1 ISM and ESM differ by a constant
# We sweep the model's second mean $m_2$ from $-3$ to $5$ (the truth is $2$) and compute both
# losses twice. The exact version uses expectations on the grid of 3.5. The Monte Carlo version
# uses the same `n_mc` samples for every $m_2$. Left: the ISM curve shifted up by
# $C = \tfrac12\mathbb{E}_p|s_p|^2$ lies on top of the ESM curve. Right: the exact difference
# ESM − ISM is flat to round-off. The Monte Carlo difference lies around $C$ within its
# error bars. On a finite sample ISM is an unbiased estimate of ESM − C, but its noise depends
# on $m_2$. That noise is ordinary estimation error, and it shrinks like $1/\sqrt{N}$.
#
# Two things to keep in mind when reading the Monte Carlo points. They are strongly
# correlated: every $m_2$ reuses the same sample, so the points rise and fall together (they
# all share that sample's estimate of $C$) instead of scattering independently. And each error
# bar is the standard error of its own point, from the per-sample differences
# ESM$_n$ − ISM$_n$. The summary reports the largest $|\text{point} - C|$ / s.e. over the sweep
# and expects it below 4: a single standard-normal $|z|$ exceeds 4 with probability
# $6 \times 10^{-5}$, so even the largest of 41 should stay below 4 (while the largest of 41
# can well exceed 3, the threshold we use for a handful of numbers in 4.4).

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
def plot_constant_offset(ax, sweep, mc: dict, offset_exact, C_exact: float, name: str,
                         mc_label: str, c_label: str) -> None:
    """The right-hand panel of 4.1 and 4.5: the Monte Carlo difference of two objectives
    (``name``, e.g. "ESM − ISM") over the sweep, its exact value, and the constant C."""
    ax.errorbar(sweep, mc["diff"], yerr=2 * mc["diff_se"], fmt="o", ms=3.5, capsize=2,
                color="tab:green", label=f"{name}, {mc_label} (± 2 s.e. per point)")
    ax.plot(sweep, offset_exact, color="k", lw=2, label=f"{name}, exact (grid)")
    ax.axhline(C_exact, color="tab:red", ls="--", lw=1.2, label=f"{c_label} = {C_exact:.4f}")
    ax.set_xlabel("model parameter $m_2$")
    ax.set_ylabel(name)
    ax.set_title(f"The offset is constant: exact spread {np.ptp(offset_exact):.1e}")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.4 * (hi - lo))  # headroom so the legend clears the error bars
    ax.legend(fontsize=8, loc="upper center")


# %%
def demo_ism_vs_esm(run, cfg: Config) -> dict:
    p = target_1d()
    x_grid, _ = grid_1d(p, 0.0, cfg.n_grid)
    w = grid_weights(p.log_prob, x_grid)  # E_p[h] = sum_j w_j h(x_j)
    x_mc = p.sample(cfg.n_mc, run.generator, dtype=DTYPE)
    m2s = torch.linspace(-3.0, 5.0, cfg.n_sweep, dtype=DTYPE)
    C_exact = (w * esm_minus_ism(p.score, x_grid)).sum().item()  # 1/2 E_p |s_p|^2
    C_mc, C_mc_se = mean_and_se(esm_minus_ism(p.score, x_mc))

    exact = {"ism": [], "esm": []}
    mc = {"ism": [], "esm": [], "diff": [], "diff_se": []}
    for m2 in progress(m2s.tolist(), desc="ISM vs ESM sweep", leave=False):
        model = target_1d(m2).score
        exact["ism"].append((w * ism_loss(model, x_grid, "none", create_graph=False)).sum())
        exact["esm"].append((w * esm_loss(model, x_grid, p.score, "none")).sum())
        ism_n = ism_loss(model, x_mc, "none", create_graph=False)
        esm_n = esm_loss(model, x_mc, p.score, "none")
        mc["ism"].append(ism_n.mean())
        mc["esm"].append(esm_n.mean())
        diff, diff_se = mean_and_se(esm_n - ism_n)  # same samples: paired differences
        mc["diff"].append(diff)
        mc["diff_se"].append(diff_se)
    exact = {k: torch.stack(v).detach().numpy() for k, v in exact.items()}
    mc = {k: torch.stack(v).detach().numpy() for k, v in mc.items()}
    offset_exact = exact["esm"] - exact["ism"]
    sweep = m2s.numpy()

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_l.plot(sweep, exact["esm"], color="tab:blue", lw=2.5, label="ESM (exact)")
    ax_l.plot(sweep, exact["ism"], color="tab:orange", lw=2.5, label="ISM (exact)")
    ax_l.plot(sweep, exact["ism"] + C_exact, "k--", lw=1.2, label="ISM + C")
    ax_l.plot(sweep, mc["esm"], "o", ms=3.5, color="tab:blue", label=f"ESM (MC, N={cfg.n_mc})")
    ax_l.plot(sweep, mc["ism"], "s", ms=3.5, color="tab:orange",
              label=f"ISM (MC, N={cfg.n_mc})")
    ax_l.axvline(2.0, color="gray", ls=":", lw=1)
    ax_l.set_xlabel("model parameter $m_2$ (true value 2)")
    ax_l.set_ylabel("loss")
    ax_l.set_title("ISM and ESM over a parameter sweep: same shape, shifted by C")
    ax_l.legend(fontsize=8)

    plot_constant_offset(ax_r, sweep, mc, offset_exact, C_exact, "ESM − ISM",
                         "Monte Carlo on one shared sample", "C = ½ E|∇log p|²")
    run.save(fig, "ism_vs_esm_sweep")

    return {
        "ism_C": C_exact, "ism_C_mc": C_mc.item(), "ism_C_mc_se": C_mc_se.item(),
        "ism_offset_mean": offset_exact.mean(), "ism_offset_spread": np.ptp(offset_exact),
        "ism_esm_range": np.ptp(exact["esm"]),
        "ism_mc_offset_spread": np.ptp(mc["diff"]), "ism_mc_se": mc["diff_se"].mean(),
        "ism_mc_max_z": np.max(np.abs(mc["diff"] - C_exact) / mc["diff_se"]),
        "ism_argmin": sweep[np.argmin(exact["ism"])],
    }


# %% tags=["active-ipynb"]
# r.update(demo_ism_vs_esm(run, cfg))


# %% [markdown]
# ## 4.2 Fitting a Gaussian's mean and precision by implicit score matching
# We draw `n_gauss` points from a correlated 2D Gaussian and minimise the generic
# autograd-based $J_{\mathrm{ISM}}$ over $(P, h)$, with model score $s(x) = -Px + h$ and
# $\mu = P^{-1} h$. By 2.5 the minimiser is $\mu = \bar x$, $P = S^{-1}$, the moment
# (= maximum-likelihood) estimates. BFGS reaches them to about 8 digits or better (3.8 explains
# the limit), and one final Newton step to round-off. Left: the ellipses of Mahalanobis radius 1
# and 2 ($(x-\mu)^\top\Sigma^{-1}(x-\mu) = 1$ and $4$; in 2D they hold 39% and 86% of the
# mass) of the fit and of the moment estimate coincide. Both differ a little from the truth,
# because a finite sample carries sampling error. Right: the distance to the closed form after
# each BFGS iteration, and after the Newton step.

# %%
GAUSS_MEAN = torch.tensor([1.0, -0.5], dtype=DTYPE)
GAUSS_COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=DTYPE)


def ellipse(mean: Tensor, cov: Tensor, radius: float, n: int = 200) -> np.ndarray:
    """Points (n, 2) of the Mahalanobis ellipse {x : (x-mu)^T cov^{-1} (x-mu) = radius^2}."""
    t = torch.linspace(0, 2 * math.pi, n, dtype=DTYPE)
    circle = torch.stack([t.cos(), t.sin()], dim=1)
    return (mean + radius * circle @ torch.linalg.cholesky(cov).T).numpy()


def demo_gaussian_fit(run, cfg: Config) -> dict:
    L = torch.linalg.cholesky(GAUSS_COV)
    x = GAUSS_MEAN + torch.randn(cfg.n_gauss, 2, generator=run.generator, dtype=DTYPE) @ L.T
    mu_cf, P_cf = gaussian_ism_solution(x)  # closed form = moment estimates
    # theta = (P_11, P_12, P_22, h_1, h_2): a symmetric P and h = P mu.
    theta_cf = torch.stack([P_cf[0, 0], P_cf[0, 1], P_cf[1, 1], *(P_cf @ mu_cf)])

    def unpack(theta):
        P = torch.stack([theta[:2], theta[1:3]])  # [[P_11, P_12], [P_12, P_22]]
        return P, theta[3:]

    def loss_fn(theta):
        P, h = unpack(theta)
        return ism_loss(lambda z: -z @ P + h, x)  # s(x) = -P x + h

    start = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=DTYPE)  # P = I, mu = 0
    iterates = fit_by_bfgs(loss_fn, start, cfg.bfgs_iters)
    bfgs_err = (iterates[-1] - theta_cf).abs().max().item()
    iterates.append(newton_step(loss_fn, iterates[-1]))  # J_ISM is quadratic in (P, h)
    errors = [(t - theta_cf).abs().max().item() for t in iterates]
    losses = [loss_fn(t).item() for t in iterates]
    P_fit, h_fit = unpack(iterates[-1])
    mu_fit = torch.linalg.solve(P_fit, h_fit)
    ism_min_cf = -0.5 * torch.trace(P_cf).item()  # min J_ISM = -1/2 tr S^{-1}
    ism_at_fit = losses[-1]

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(13, 5))
    pts = x.numpy()
    ax_l.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.3, color="gray", label="samples")
    for r in (1.0, 2.0):
        extra = r == 1.0  # label each ellipse family once
        e = ellipse(GAUSS_MEAN, GAUSS_COV, r)
        ax_l.plot(e[:, 0], e[:, 1], "k--", lw=1.5, label="true N(m, Σ)" if extra else None)
        e = ellipse(mu_fit, torch.linalg.inv(P_fit), r)
        ax_l.plot(e[:, 0], e[:, 1], color="tab:red", lw=3, alpha=0.6,
                  label="ISM fit (BFGS on autograd loss)" if extra else None)
        e = ellipse(mu_cf, torch.linalg.inv(P_cf), r)
        ax_l.plot(e[:, 0], e[:, 1], ":", color="tab:blue", lw=2,
                  label="moment estimate (x̄, S)" if extra else None)
    ax_l.set_aspect("equal")
    ax_l.set_xlabel("$x_1$")
    ax_l.set_ylabel("$x_2$")
    ax_l.set_title("Ellipses of Mahalanobis radius 1 and 2: ISM fit = moment estimate")
    ax_l.legend(loc="lower right", fontsize=8)

    steps = np.arange(len(iterates))
    gaps = np.maximum(np.array(losses) - ism_min_cf, 1e-17)  # 0 to round-off: floor for log
    ax_r.semilogy(steps[:-1], np.maximum(errors[:-1], 1e-17), "o-", color="tab:blue",
                  label="max |(P, h) − closed form|")
    ax_r.semilogy(steps[:-1], gaps[:-1], "s-", color="tab:orange", label="J_ISM − (−½ tr S⁻¹)")
    ax_r.semilogy(steps[-2:], np.maximum(errors[-2:], 1e-17), "--", color="tab:blue")
    ax_r.semilogy(steps[-2:], gaps[-2:], "--", color="tab:orange")
    ax_r.semilogy(steps[-1], max(errors[-1], 1e-17), "*", color="tab:blue", ms=14,
                  label="after one Newton step")
    ax_r.semilogy(steps[-1], gaps[-1], "*", color="tab:orange", ms=14)
    ax_r.set_xlabel("BFGS iteration (last point: + one Newton step)")
    ax_r.set_ylabel("error (log scale)")
    ax_r.set_title("Autograd ISM converges to the closed-form solution")
    ax_r.legend()
    run.save(fig, "gaussian_ism_fit")

    return {
        "gauss_bfgs_err": bfgs_err,
        "gauss_mu_err": (mu_fit - mu_cf).abs().max().item(),
        "gauss_P_err": (P_fit - P_cf).abs().max().item(),
        "gauss_ism_min": ism_at_fit, "gauss_ism_min_cf": ism_min_cf,
        "gauss_mu_fit": mu_fit, "gauss_P_fit": P_fit,
        "gauss_mu_vs_truth": (mu_fit - GAUSS_MEAN).abs().max().item(),
        "gauss_mu_se": (GAUSS_COV.diagonal() / cfg.n_gauss).sqrt().max().item(),
    }


# %% tags=["active-ipynb"]
# r.update(demo_gaussian_fit(run, cfg))


# %% [markdown]
# ## 4.3 Fitting an unnormalised quartic density
# Samples come from $p(x) \propto e^{-E(x)}$ with $E = 0.5 x^4 - 2 x^2 + 0.5 x$, a tilted double
# well. Score matching estimates $\theta$ with one linear solve (2.5), and BFGS on the generic
# autograd loss gives the same $\theta$. The standard errors come from the sandwich formula
# (3.7). Only to *draw* the fitted density do we normalise $e^{-E_{\hat\theta}}$ numerically on
# a grid. The fit has no normalising constant in it.
#
# Right panel: the fitted score against the true one, over the range where $p$ is not
# negligible (grey: $p$ itself). The scores agree closely, and the Fisher divergence of the fit
# is of the size the sandwich formula predicts, $\tfrac12\operatorname{tr}(A^{-1}B)/N$. That
# prediction is the mean of a quantity like a chi-square with 3 degrees of freedom, so one
# sample's value lies within a factor of a few of it, either way.
#
# Left panel: look at the right mode. Its mass (the probability beyond the valley between the
# wells) is often visibly off in the fit, by far more than the fraction of samples that fell
# there would be. The Fisher divergence weighs score errors by $p$, and the valley, where $p$ is
# small, gets little weight. But the log-density is the integral of the score, so small score
# errors across the valley add up to an error in the log-ratio of the two modes' masses. Score
# matching pins down the shape of each well well and the relative weight of well-separated
# modes poorly; the summary prints the masses, and a test measures across many samples how
# much more the fitted mass scatters than the sample fraction. Langevin sampling has a related
# blind spot even with the exact score (module 03), and adding noise at several levels fixes
# both (module 07).
#
# Finally, nothing forced $\hat\theta_1 > 0$. Here the data demand a quartic term, but on data
# without one (a Gaussian, true $\theta_1 = 0$) the fit returns $\hat\theta_1 < 0$ about half
# the time, and $e^{-E_{\hat\theta}}$ then has no normalising constant at all (a test checks
# this).

# %%
def quartic_valley(theta) -> float:
    """The local maximum of E_theta between the two wells (solves E' = 0 with E'' < 0)."""
    t1, t2, t3 = (float(v) for v in theta)
    roots = np.roots([4 * t1, 0.0, 2 * t2, t3])  # E'(x) = 4 t1 x^3 + 2 t2 x + t3
    real = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
    if len(real) != 3:
        raise ValueError(f"E_theta with theta = {theta} is not a double well")
    return float(real[1])


def mass_above(log_density: Callable[[Tensor], Tensor], grid: Tensor, x0: float) -> float:
    """P(x > x0) for the density proportional to exp(log_density) on a uniform 1D grid (n,)."""
    w = grid_weights(log_density, grid)
    return w[grid > x0].sum().item()


def demo_quartic_fit(run, cfg: Config) -> dict:
    theta_true = torch.tensor(QUARTIC_THETA, dtype=DTYPE)
    x = sample_by_inverse_cdf(lambda z: -quartic_energy(z, theta_true), -5.0, 5.0,
                              cfg.n_quartic, run.generator)
    dpsi, d2psi = quartic_features(x)
    theta_cf = exp_family_ism_solution(dpsi, d2psi)
    theta_se = exp_family_ism_se(dpsi, d2psi, theta_cf)

    start = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)  # E = x^4
    theta_gd = fit_by_bfgs(lambda t: ism_loss(lambda z: quartic_score(z, t), x[:, None]),
                           start, cfg.bfgs_iters)[-1]

    # Exact expectations under p on a grid, for the Fisher divergence of the fit.
    grid = torch.linspace(-4.0, 4.0, 4001, dtype=DTYPE)
    w = grid_weights(lambda z: -quartic_energy(z, theta_true), grid)
    fisher = (w * 0.5 * (quartic_score(grid, theta_cf)
                         - quartic_score(grid, theta_true)) ** 2).sum().item()
    # Its expected size from the sandwich covariance: E[F] ~ 1/2 tr(A Cov) = 1/2 tr(A^-1 B) / N.
    dpsi_g, _ = quartic_features(grid)
    A_pop = (w[:, None] * dpsi_g).T @ dpsi_g  # E_p[psi' psi'^T] exactly
    g = dpsi * (dpsi @ theta_cf)[:, None] - d2psi  # per-sample gradients, B = Cov(g)
    fisher_expected = 0.5 * torch.trace(torch.linalg.solve(A_pop, torch.cov(g.T))).item() / len(x)

    # Mass of the right mode: beyond the true valley, under the truth, the fit and the samples.
    valley = quartic_valley(QUARTIC_THETA)
    mass_true = mass_above(lambda z: -quartic_energy(z, theta_true), grid, valley)
    mass_fit = mass_above(lambda z: -quartic_energy(z, theta_cf), grid, valley)
    frac = (x > valley).double().mean().item()
    frac_se = math.sqrt(frac * (1 - frac) / len(x))  # binomial standard error

    dx = (grid[1] - grid[0]).item()
    p_true = w / dx  # normalised densities on the grid, for drawing only
    p_fit = grid_weights(lambda z: -quartic_energy(z, theta_cf), grid) / dx

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_l.hist(x.numpy(), bins=80, range=(-3, 3), density=True, color="lightgray",
              label=f"{len(x)} samples")
    ax_l.plot(grid, p_true, "k", lw=2, label="true density")
    ax_l.plot(grid, p_fit, "--", color="tab:red", lw=2, label="ISM fit (normalised on a grid)")
    ax_l.axvline(valley, color="gray", ls=":", lw=1, label="valley between the modes")
    ax_l.set_xlim(-3, 3)
    ax_l.set_xlabel("x")
    ax_l.set_ylabel("density")
    ax_l.set_title("p(x) ∝ exp(−θ₁x⁴ − θ₂x² − θ₃x): truth vs score-matching fit")
    est = ", ".join(f"{v:.3f}" for v in theta_cf.tolist())
    ses = ", ".join(f"{v:.3f}" for v in theta_se.tolist())
    ax_l.text(0.98, 0.70, f"θ true = {QUARTIC_THETA}\nθ̂ = ({est})\ns.e. = ({ses})\n\n"
              f"right-mode mass (x > valley):\n  true {mass_true:.3f}, fit {mass_fit:.3f}\n"
              f"  sample fraction {frac:.3f} ± {frac_se:.3f}", transform=ax_l.transAxes,
              ha="right", va="top", multialignment="left", fontsize=8,
              bbox=dict(facecolor="white", alpha=0.9, lw=0))
    ax_l.legend(loc="upper right", fontsize=8)

    # Scores where p is not negligible (p > 0.005); beyond, both cubics only run off to +-inf.
    shown = grid[p_true > 0.005]
    xs = torch.linspace(shown.min().item(), shown.max().item(), 400, dtype=DTYPE)
    ax_p = ax_r.twinx()  # p(x) in the background, on its own axis
    ax_p.fill_between(grid, p_true, color="lightgray", alpha=0.6, lw=0)
    ax_p.set_ylim(0, 2.2 * p_true.max().item())
    ax_p.set_ylabel("true density p(x) (grey)")
    ax_r.set_zorder(ax_p.get_zorder() + 1)  # draw the scores on top of the grey area
    ax_r.patch.set_visible(False)
    ax_r.plot(xs, quartic_score(xs, theta_true), "k", lw=2, label="true score −E'(x)")
    ax_r.plot(xs, quartic_score(xs, theta_cf), "--", color="tab:red", lw=2, label="fitted score")
    ax_r.axhline(0, color="gray", lw=0.8, ls=":")
    ax_r.set_xlim(xs[0].item(), xs[-1].item())
    ax_r.set_xlabel("x")
    ax_r.set_ylabel("score d/dx log p(x)")
    ax_r.set_title(f"Scores where p > 0.005; Fisher divergence of the fit = {fisher:.1e}")
    ax_r.legend(loc="upper right")
    run.save(fig, "quartic_energy_fit")

    return {
        "quartic_theta": theta_cf, "quartic_se": theta_se, "quartic_true": theta_true,
        "quartic_max_z": ((theta_cf - theta_true).abs() / theta_se).max().item(),
        "quartic_gd_vs_cf": (theta_gd - theta_cf).abs().max().item(),
        "quartic_fisher": fisher, "quartic_fisher_expected": fisher_expected,
        "quartic_mass_true": mass_true, "quartic_mass_fit": mass_fit,
        "quartic_mass_samples": frac, "quartic_mass_samples_se": frac_se,
    }


# %% tags=["active-ipynb"]
# r.update(demo_quartic_fit(run, cfg))


# %% [markdown]
# ## 4.4 Stein's identity, and how it exposes a wrong score
# We take samples of a skewed 2D mixture and average the Stein residual
# $s(x) f(x) + \nabla f(x)$, a vector with an $x_1$-entry and an $x_2$-entry, for five test
# functions, once with the true score $s_p$ and once with the score $s_G$ of the Gaussian that
# has the same mean and covariance. With the true score every residual is zero within its
# Monte Carlo error. The moment-matched Gaussian passes the linear test functions $1$ and $x_1$
# (2.4 explains why) and fails the nonlinear ones. The right panel shows the residuals in units
# of their standard error, $|z|$. For pure noise each $z$ is close to a standard normal, which
# exceeds 3 in size with probability 0.003; among the 10 values of the true score (5 test
# functions, 2 entries) one above 3 turns up in about 3% of runs, hence "below about 3".
#
# The summary also checks the vector form with $g$ = the score of a wrong model: the same
# mixture with all three means shifted by $(0.7, 0.7)$.
# $\mathbb{E}_p[s_p^\top g + \operatorname{tr}\nabla g]$ is zero within its error, as it must be
# for *any* model score: this is the step that turns ESM into ISM.

# %%
TEST_FUNCTIONS = {
    "1": lambda x: torch.ones_like(x[:, 0]),
    "x₁": lambda x: x[:, 0],
    "x₁x₂": lambda x: x[:, 0] * x[:, 1],
    "sin(x₁+2x₂)": lambda x: torch.sin(x[:, 0] + 2 * x[:, 1]),
    "exp(−|x|²/4)": lambda x: torch.exp(-x.square().sum(1) / 4),
}


def demo_stein_identity(run, cfg: Config) -> dict:
    p = target_2d()
    x = p.sample(cfg.n_mc, run.generator, dtype=DTYPE)
    prec_gauss = torch.linalg.inv(p.covariance())  # moment-matched Gaussian N(E[x], Cov[x])

    def score_gauss(z):
        return gaussian_score_precision(z, p.mean(), prec_gauss)

    results = {}
    for name, f in TEST_FUNCTIONS.items():
        for who, score in (("true", p.score), ("gauss", score_gauss)):
            mean, se = mean_and_se(stein_residual(score, f, x))
            results[(name, who)] = (mean.numpy(), se.numpy())
    # Vector form with g = a wrong model's score: all three means shifted by (0.7, 0.7).
    g = GaussianMixture(p.weights, p.means + 0.7, p.covs).score
    vec_mean, vec_se = mean_and_se(stein_vector_residual(p.score, g, x))

    names = list(TEST_FUNCTIONS)
    pos = np.arange(len(names))
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(14, 4.8))
    styles = {"true": ("tab:blue", "true score $s_p$"),
              "gauss": ("tab:orange", "moment-matched Gaussian score")}
    for k, (who, (color, label)) in enumerate(styles.items()):
        for comp, marker in ((0, "o"), (1, "s")):
            shift = -0.21 + 0.14 * (2 * k + comp)
            means = [results[(n, who)][0][comp] for n in names]
            ses = [results[(n, who)][1][comp] for n in names]
            ax_l.errorbar(pos + shift, means, yerr=2 * np.array(ses), fmt=marker, color=color,
                          capsize=2, ms=5, label=f"{label}, x{'₁₂'[comp]}-entry")
            ax_r.plot(pos + shift, np.abs(means) / np.array(ses), marker, color=color, ms=6,
                      label=f"{label}, x{'₁₂'[comp]}-entry")
    ax_l.axhline(0, color="gray", lw=0.8)
    ax_l.set_xticks(pos, names)
    ax_l.set_xlabel("test function f")
    ax_l.set_ylabel("E[s f + ∇f]  (± 2 s.e.)")
    ax_l.set_title(f"Stein residuals on N = {cfg.n_mc} samples of a 2D mixture")
    ax_l.legend(fontsize=7)
    ax_r.axhline(3, color="tab:red", ls="--", lw=1, label="3 standard errors")
    ax_r.set_yscale("log")
    ax_r.set_xticks(pos, names)
    ax_r.set_xlabel("test function f")
    ax_r.set_ylabel("|z| = |residual| / standard error (log scale)")
    ax_r.set_title("True score: noise only. Gaussian: caught by nonlinear f")
    ax_r.legend(fontsize=7)
    run.save(fig, "stein_identity")

    def max_z(who, subset):
        return max(np.max(np.abs(results[(n, who)][0]) / results[(n, who)][1]) for n in subset)

    return {
        "stein": results, "stein_true_max_z": max_z("true", names),
        "stein_gauss_linear_max_z": max_z("gauss", names[:2]),
        "stein_gauss_nonlinear_min_z": min(max_z("gauss", [n]) for n in names[2:]),
        "stein_vector": (vec_mean.item(), vec_se.item()),
    }


# %% tags=["active-ipynb"]
# r.update(demo_stein_identity(run, cfg))


# %% [markdown]
# ## 4.5 DSM and ESM on the perturbed density differ by a constant
# The same sweep as 4.1, now with noise level $\sigma$ (flag `--sigma`). The model family is
# the mixture widened by $\sigma^2$, so at $m_2 = 2$ it *is* $p_\sigma$ and
# $J_{\mathrm{ESM},\sigma} = 0$. The exact DSM is the double sum of 3.5, computed from the
# definition without $p_\sigma$. It sits above ESM by
# $C_\sigma = D/(2\sigma^2) - \tfrac12\mathbb{E}_{p_\sigma}|\nabla\log p_\sigma|^2$ at every
# $m_2$. The DSM loss never reaches zero: $C_\sigma$ is its floor. Middle: the difference, as in
# 4.1. The Monte Carlo points reuse one sample *and one draw of the noise* $z$ at every $m_2$,
# so again they move together, and the same "below 4" reading of the largest $|z|$ applies.
# Right: $C_\sigma$ as a function of $\sigma$. The offsets measured by quadrature fall on the
# formula, which grows like $1/(2\sigma^2)$ as $\sigma \to 0$.

# %%
def demo_dsm_vs_esm(run, cfg: Config) -> dict:
    sigma = cfg.sigma
    p = target_1d()
    p_sigma = p.perturbed(sigma)  # 0.7 N(-1, 0.36 + s^2) + 0.3 N(2, 0.64 + s^2)
    x_grid, _ = grid_1d(p, sigma, cfg.n_grid)
    moments = dsm_grid_moments(p, x_grid, sigma)  # law of (x, x~) on the grid
    w_sigma = grid_weights(p_sigma.log_prob, x_grid)  # law of x~ alone
    C_exact = (w_sigma * dsm_minus_esm(p_sigma.score, x_grid, sigma)).sum().item()
    # Its two parts: D / (2 sigma^2) from the noisy target, 1/2 E|grad log p_sigma|^2 from p_sigma.
    kernel_term = 1 / (2 * sigma**2)  # D = 1
    score_term = (w_sigma * 0.5 * p_sigma.score(x_grid)[:, 0] ** 2).sum().item()

    x0 = p.sample(cfg.n_mc, run.generator, dtype=DTYPE)
    z = torch.randn(x0.shape, generator=run.generator, dtype=DTYPE)  # shared by every model
    x_tilde = x0 + sigma * z  # samples of p_sigma

    m2s = torch.linspace(-3.0, 5.0, cfg.n_sweep, dtype=DTYPE)
    exact = {"dsm": [], "esm": []}
    mc = {"dsm": [], "esm": [], "diff": [], "diff_se": []}
    for m2 in progress(m2s.tolist(), desc="DSM vs ESM sweep", leave=False):
        model = target_1d(m2, extra_var=sigma**2).score
        exact["dsm"].append(dsm_loss_on_grid(model, x_grid, moments))
        exact["esm"].append((w_sigma * esm_loss(model, x_grid, p_sigma.score, "none")).sum())
        dsm_n = dsm_loss_unweighted(model, x0, sigma, noise=z, reduction="none")
        esm_n = esm_loss(model, x_tilde, p_sigma.score, "none")
        mc["dsm"].append(dsm_n.mean())
        mc["esm"].append(esm_n.mean())
        diff, diff_se = mean_and_se(dsm_n - esm_n)
        mc["diff"].append(diff)
        mc["diff_se"].append(diff_se)
    exact = {k: torch.stack(v).numpy() for k, v in exact.items()}
    mc = {k: torch.stack(v).numpy() for k, v in mc.items()}
    offset_exact = exact["dsm"] - exact["esm"]
    sweep = m2s.numpy()

    # C_sigma against sigma: the quadrature offset at one (wrong) model vs the formula.
    sigmas = np.geomspace(0.1, 2.0, cfg.n_sigmas)
    c_measured, c_formula = [], []
    for s in sigmas:
        xg, _ = grid_1d(p, s, cfg.n_grid)
        ps = p.perturbed(s)
        model = target_1d(0.0, extra_var=s**2).score
        dsm = dsm_loss_on_grid(model, xg, dsm_grid_moments(p, xg, s))
        esm = (grid_weights(ps.log_prob, xg) * esm_loss(model, xg, ps.score, "none")).sum()
        c_measured.append((dsm - esm).item())
        c_formula.append((grid_weights(ps.log_prob, xg) * dsm_minus_esm(ps.score, xg, s))
                         .sum().item())
    c_measured, c_formula = np.array(c_measured), np.array(c_formula)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    ax.plot(sweep, exact["dsm"], color="tab:purple", lw=2.5, label="DSM (exact)")
    ax.plot(sweep, exact["esm"], color="tab:blue", lw=2.5, label="ESM on $p_\\sigma$ (exact)")
    ax.plot(sweep, exact["esm"] + C_exact, "k--", lw=1.2, label="ESM + $C_\\sigma$")
    ax.plot(sweep, mc["dsm"], "o", ms=3.5, color="tab:purple", label=f"DSM (MC, N={cfg.n_mc})")
    ax.plot(sweep, mc["esm"], "s", ms=3.5, color="tab:blue", label=f"ESM (MC, N={cfg.n_mc})")
    ax.axvline(2.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("model parameter $m_2$ (true value 2)")
    ax.set_ylabel("loss")
    ax.set_title(f"DSM vs ESM on the perturbed density, σ = {sigma:g}")
    ax.legend(fontsize=8)

    plot_constant_offset(axes[1], sweep, mc, offset_exact, C_exact, "DSM − ESM",
                         "MC on one shared sample and noise",
                         "$C_\\sigma$ = D/(2σ²) − ½E|∇log p_σ|²")

    ax = axes[2]
    ax.loglog(sigmas, c_formula, "k-", lw=2,
              label="formula $C_\\sigma$ (quadrature of E|∇log p_σ|²)")
    ax.loglog(sigmas, c_measured, "o", color="tab:red", ms=7,
              label="DSM − ESM (double quadrature)")
    ax.loglog(sigmas, 1 / (2 * sigmas**2), ":", color="gray", label="D/(2σ²) alone")
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("$C_\\sigma$ (log scale)")
    ax.set_title("The DSM loss floor explodes as σ → 0")
    ax.legend(fontsize=8, loc="lower left")
    run.save(fig, "dsm_vs_esm_sweep")

    return {
        "dsm_C": C_exact, "dsm_kernel_term": kernel_term, "dsm_score_term": score_term,
        "dsm_offset_mean": offset_exact.mean(),
        "dsm_offset_spread": np.ptp(offset_exact), "dsm_range": np.ptp(exact["dsm"]),
        "dsm_mc_offset_mean": mc["diff"].mean(), "dsm_mc_offset_spread": np.ptp(mc["diff"]),
        "dsm_mc_se": mc["diff_se"].mean(),
        "dsm_mc_max_z": np.max(np.abs(mc["diff"] - C_exact) / mc["diff_se"]),
        "dsm_sigma_rel_err": np.max(np.abs(c_measured - c_formula) / c_formula),
        "dsm_min": exact["dsm"].min(), "dsm_argmin": sweep[np.argmin(exact["dsm"])],
    }


# %% tags=["active-ipynb"]
# r.update(demo_dsm_vs_esm(run, cfg))


# %% [markdown]
# ## 4.6 What the exact trace costs
# We time one loss-and-gradient evaluation for a small MLP score network
# $s_\theta: \mathbb{R}^D \to \mathbb{R}^D$ (hidden width 64, batch 128, float32) as the
# dimension grows. ISM with the exact trace needs $D$ backward passes, and the parameter gradient
# goes through all of them. Each pass is itself not free: the first and last layers of an MLP
# of width $H$ hold $D H$ weights each, so one pass costs $O(D H + H^2)$ per sample and the
# exact trace $O(D^2 H + D H^2)$. For a network of fixed width that is $O(D^2)$: close to
# linear while $D$ is small next to $H$ (and next to the fixed cost of launching a pass),
# quadratic once $D$ is well above $H$. The summary prints the fitted exponent $a$ of
# $t_{ISM} \propto D^a$ over $D = 8 \dots 128$; with $H = 64$ this range sits in the transition,
# so $a$ comes out between 1 and 2 (nearer 1), and the dotted $\propto D^2$ line shows where
# the curve is heading. DSM needs one forward and one backward pass at every $D$ (its cost
# also grows like $D H$, but with a single pass that stays small next to the fixed costs).
# Module 05 adds sliced score matching to this picture. (Timings vary with the machine and its
# load: read the trend from the printed exponent, not the milliseconds.)

# %%
def mlp_score_net(dim: int, hidden: int = 64) -> torch.nn.Module:
    """A plain MLP s_theta: R^D -> R^D (SiLU activations), rows processed independently."""
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.SiLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                               torch.nn.Linear(hidden, dim))


def time_loss_and_grad(loss_fn: Callable[[], Tensor], repeats: int = 2) -> float:
    """Best-of-``repeats`` wall time (seconds) of ``loss_fn().backward()``, after one warm-up."""
    loss_fn().backward()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn().backward()
        best = min(best, time.perf_counter() - start)
    return best


def demo_trace_cost(run, cfg: Config) -> dict:
    torch.manual_seed(run.args.seed)  # network initialisation only
    t_ism, t_dsm = [], []
    for D in progress(cfg.cost_dims, desc="timing ISM vs DSM", leave=False):
        net = mlp_score_net(D)
        x = torch.randn(128, D, generator=run.generator)
        t_ism.append(time_loss_and_grad(lambda: ism_loss(net, x)))
        t_dsm.append(time_loss_and_grad(  # cheap: more repeats tame timer noise
            lambda: dsm_loss_unweighted(net, x, 0.5, generator=run.generator), repeats=5))
    dims, t_ism, t_dsm = np.array(cfg.cost_dims), np.array(t_ism), np.array(t_dsm)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.loglog(dims, 1e3 * t_ism, "o-", label="ISM, exact trace (D backward passes)")
    ax.loglog(dims, 1e3 * t_dsm, "s-", label="DSM (one backward pass)")
    ax.loglog(dims, 1e3 * t_ism[-1] * dims / dims[-1], "k--", lw=0.8, label="∝ D (reference)")
    ax.loglog(dims, 1e3 * t_ism[-1] * (dims / dims[-1]) ** 2, "k:",
              label="∝ D² (reference: D passes, each ∝ D)")
    ax.set_xlabel("dimension D")
    ax.set_ylabel("time per loss + gradient (ms, log scale)")
    ax.set_title("The Jacobian trace makes ISM cost grow with D")
    ax.legend()
    run.save(fig, "jacobian_trace_cost")
    # Growth exponent a in t_ISM ~ D^a, by least squares on log-log over D >= 8 (at small D fixed
    # overheads dominate).
    big = dims >= 8
    slope = np.polyfit(np.log(dims[big]), np.log(t_ism[big]), 1)[0]
    return {"cost_dims": dims, "cost_ratio": t_ism / t_dsm, "cost_slope": slope,
            "cost_dsm_ms": 1e3 * t_dsm}


# %% tags=["active-ipynb"]
# r.update(demo_trace_cost(run, cfg))


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_02_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/02_score_matching_theory.py`: try first, then compare.

# %%
def exercise_cubic_ism_objective(x: Tensor, a: float, b: Tensor) -> Tensor:
    """Exercise 2.1: the ISM objective of a cubic score model, in closed form (no autograd).

    The model score is s(x) = -a (x - b)^3, cubed entry by entry: s_i(x) = -a (x_i - b_i)^3.
    (It is the score of the unnormalised density exp(-a/4 sum_i (x_i - b_i)^4).) Write
    J_ISM(a, b) = (1/N) sum_n [ tr(grad_x s(x_n)) + 1/2 |s(x_n)|^2 ] as tensor arithmetic on x,
    without calling autograd.

    Args:
        x: (N, D) samples.
        a: a positive number.
        b: (D,) centre of the model.
    Returns:
        a scalar tensor.

    Example: x = [[0.], [2.]], a = 1, b = [1.]  ->  -2.5.
    Hint: the trace needs only the diagonal of the Jacobian, d s_i / d x_i: each s_i depends
    on x_i alone. Then, for the curious: for fixed b, which a minimises your J_ISM?
    """
    # TODO: the mean over samples of (trace term + half the squared norm of s).
    raise NotImplementedError("Exercise 2.1: write the ISM objective of the cubic score model")


def exercise_fit_polynomial_energy(x: Tensor, powers: tuple[int, ...]) -> Tensor:
    """Exercise 2.2: fit E_theta(x) = sum_k theta_k x^(n_k) by score matching (n_k = powers[k]).

    The model log p_theta(x) = -E_theta(x) - log Z(theta) is an exponential family with
    features psi_k(x) = x^(n_k). Return the exact ISM minimiser of Section 2.5,
    theta_hat = M^{-1} v,  M = avg_n psi'(x_n) psi'(x_n)^T  (K, K),  v = avg_n psi''(x_n)  (K,),
    where avg_n is the average over the N samples and psi' = (psi_1', ..., psi_K').

    Args:
        x:      (N,) 1D samples.
        powers: exponents n_k >= 1, e.g. (4, 2, 1) for the quartic of Section 4.3.
    Returns:
        theta_hat: (K,) with K = len(powers).

    Example: powers = (2,) models N(0, v): E_theta = theta x^2, so theta = 1 / (2 avg_n x_n^2);
    for x = [-1., 1.] the answer is [0.5].
    Hint: psi_k' = n_k x^(n_k - 1) and psi_k'' = n_k (n_k - 1) x^(n_k - 2); for n_k = 1 the
    second derivative is 0 (avoid computing x^(-1)).
    """
    # TODO: build psi' and psi'' as (N, K) matrices, then one linear solve.
    raise NotImplementedError("Exercise 2.2: fit the polynomial energy by score matching")


def exercise_dsm_constant_gaussian(sigma: float, cov: Tensor) -> float:
    """Exercise 2.3: the DSM constant C_sigma for Gaussian data with any covariance.

    Data x ~ N(m, Sigma) in R^D are perturbed to x~ = x + sigma z, z ~ N(0, I). Find
    C_sigma = J_DSM - J_ESM,sigma (Section 2.6) in closed form. It does not depend on m.

    Args:
        sigma: noise level > 0.
        cov:   (D, D) symmetric positive-definite covariance Sigma of the data.
    Returns:
        C_sigma as a Python float.

    Example: D = 1, Sigma = [[1.]], sigma = 1  ->  0.25.
    Hints, one at a time:
      1. Section 2.6 splits C_sigma into a part from the noisy target and a part from p_sigma.
         Only the second needs work.
      2. x and sigma z are independent Gaussians. What is the law of x~ = x + sigma z?
      3. Module 01, Section 2.8: the mean squared score is the trace of the Fisher information.
    Check yourself: C_sigma >= 0 for every Sigma and sigma (why?); how does it behave as
    sigma -> 0?
    """
    # TODO: a few lines once you know p_sigma.
    raise NotImplementedError("Exercise 2.3: derive the DSM constant for Gaussian data")


def exercise_gaussian_moments_by_stein(k: int, mu: float, std: float) -> Tensor:
    """Exercise 2.4: the moments E[x^j], j = 0..k, of N(mu, std^2), from Stein's identity alone.

    In 1D, Stein's identity (Section 2.4) reads E_p[ s_p(x) f(x) + f'(x) ] = 0 for smooth f
    that grow at most polynomially. Use it, and no integral, to compute every raw moment of a
    Gaussian, starting from E[x^0] = 1.

    Args:
        k:   highest moment (>= 0).
        mu:  mean.
        std: standard deviation > 0.
    Returns:
        (k + 1,) float64 tensor [E[x^0], E[x^1], ..., E[x^k]].

    Example: k = 4, mu = 0, std = 1  ->  [1, 0, 1, 0, 3].
    Hints, one at a time:
      1. Put the score of N(mu, std^2) into the identity. What does E[(x - mu) f(x)] equal?
      2. Choose f(x) = x^(j-1).
      3. Write x^j = (x - mu) x^(j-1) + mu x^(j-1) and take expectations of both sides.
    """
    # TODO: a loop over j, each moment from the two before it.
    raise NotImplementedError("Exercise 2.4: compute Gaussian moments with Stein's identity")


def exercise_divergence_finite_differences(score_fn: ScoreFn, x: Tensor,
                                           h: float = 1e-4) -> Tensor:
    """Exercise 2.5: tr(grad_x s(x)) by central finite differences, without autograd.

    tr(grad s)(x) ~= sum_i [ s_i(x + h e_i) - s_i(x - h e_i) ] / (2 h), error O(h^2).
    Like the autograd version it needs work proportional to D (here 2 D evaluations of s).

    Args:
        score_fn: maps (N, D) -> (N, D), rows independent.
        x:        (N, D) points.
        h:        step size (use the one given: the check tries several).
    Returns:
        (N,) the divergence at each point.

    Example: s(x) = -x in D = 3 gives -3 at every point.
    Hint: build e_i with torch.zeros_like(x) and set column i to h; keep only component i of
    the difference of the two score evaluations. Why central and not forward differences
    [s_i(x + h e_i) - s_i(x)] / h? Expand s_i to second order in h.
    """
    # TODO: loop over the D coordinates.
    raise NotImplementedError("Exercise 2.5: the Jacobian trace by finite differences")


# %% [markdown]
# ## Summary
# - The **Fisher divergence** $\tfrac12\mathbb{E}_p|s_p - s_\theta|^2$ compares scores. Explicit
#   score matching minimises it, but needs the unknown $s_p$.
# - **Integration by parts** (equivalently, Stein's identity with $g = s_\theta$) replaces the
#   cross term $\mathbb{E}_p[s_\theta^\top s_p]$ by
#   $-\mathbb{E}_p[\operatorname{tr}\nabla s_\theta]$: ISM = ESM − ½E|s_p|². The two
#   objectives have the same minimiser, and their offset is exactly constant (checked to
#   round-off over a sweep).
# - The exact trace costs $D$ backward passes (`jacobian_trace`), each through a network whose
#   own cost grows with $D$: $O(D^2)$ for an MLP of fixed width. Fine for toys, too expensive
#   for images.
# - For Gaussians and exponential families ISM is a quadratic. For a Gaussian it returns the
#   moment estimates. An unnormalised quartic is fitted with one linear solve, without ever
#   computing $Z$; but score matching weighs low-density regions lightly, so the relative mass
#   of separated modes is poorly determined, and nothing keeps the fit normalisable.
# - **Stein's identity** $\mathbb{E}_p[s_p f + \nabla f] = 0$ holds for the true score. Linear
#   test functions see only the mean and covariance; nonlinear ones detect wrong scores.
# - **Denoising score matching** equals ESM on $p_\sigma$ plus
#   $C_\sigma = D/(2\sigma^2) - \tfrac12\mathbb{E}|\nabla\log p_\sigma|^2 \ge 0$, the
#   unpredictable part of the target $-z/\sigma$, whose posterior mean is
#   $\nabla\log p_\sigma$. DSM needs no Jacobian and learns the *noisy* score, and its loss has
#   a floor that grows like $1/\sigma^2$. Modules 04-08 build on it.


# %%
def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    cfg.sigma = run.args.sigma
    if run.args.n_mc is not None:
        cfg.n_mc = run.args.n_mc
    if run.device.type != "cpu":
        print("(Module 02 computes on the CPU whatever the device: its problems are tiny.)")

    r = {}
    r.update(demo_ism_vs_esm(run, cfg))
    r.update(demo_gaussian_fit(run, cfg))
    r.update(demo_quartic_fit(run, cfg))
    r.update(demo_stein_identity(run, cfg))
    r.update(demo_dsm_vs_esm(run, cfg))
    r.update(demo_trace_cost(run, cfg))

    def vec(t, fmt="{:.4f}"):
        return "(" + ", ".join(fmt.format(v) for v in t.flatten().tolist()) + ")"

    prec_true = torch.linalg.inv(GAUSS_COV)
    n_sweep = cfg.n_sweep
    rows = [
        ("ESM - ISM: C = 1/2 E_p|s_p|^2 (grid / MC)",
         f"{r['ism_C']:.5f} / {r['ism_C_mc']:.4f} ± {r['ism_C_mc_se']:.4f}",
         "equal within ~2 s.e."),
        ("ESM - ISM over the sweep, exact: mean, spread",
         f"{r['ism_offset_mean']:.6f}, {r['ism_offset_spread']:.1e}",
         f"C, < 1e-9 (ESM range {r['ism_esm_range']:.2f})"),
        ("ESM - ISM over the sweep, MC: spread, mean s.e.",
         f"{r['ism_mc_offset_spread']:.4f}, {r['ism_mc_se']:.4f}",
         f"max |dev from C| / s.e. = {r['ism_mc_max_z']:.2f} (< 4: max of {n_sweep})"),
        ("Gaussian ISM fit: max error of (P, h), BFGS alone", f"{r['gauss_bfgs_err']:.1e}",
         "~ 1e-8 or less (line-search limit, 3.8)"),
        ("Gaussian ISM fit + Newton step: mu vs sample mean", f"{r['gauss_mu_err']:.1e}",
         "< 1e-11 (closed-form minimiser, round-off)"),
        ("Gaussian ISM fit + Newton step: P vs inverse sample cov", f"{r['gauss_P_err']:.1e}",
         "< 1e-11"),
        ("Gaussian ISM fit: mu, P (11, 12, 22)",
         f"{vec(r['gauss_mu_fit'], '{:.3f}')}, "
         f"{vec(r['gauss_P_fit'].flatten()[[0, 1, 3]], '{:.3f}')}",
         f"truth {vec(GAUSS_MEAN, '{:.3f}')}, {vec(prec_true.flatten()[[0, 1, 3]], '{:.3f}')}"),
        ("Gaussian: min J_ISM vs -1/2 tr S^-1",
         f"{r['gauss_ism_min']:.10f}", f"{r['gauss_ism_min_cf']:.10f}"),
        ("Quartic: theta_hat ± s.e. (sandwich)",
         ", ".join(f"{v:.3f}±{s:.3f}" for v, s in zip(r["quartic_theta"].tolist(),
                                                      r["quartic_se"].tolist())),
         f"{QUARTIC_THETA}; max |z| = {r['quartic_max_z']:.2f}"),
        ("Quartic: BFGS on autograd ISM vs closed form", f"{r['quartic_gd_vs_cf']:.1e}",
         "< 1e-8"),
        ("Quartic: Fisher divergence of the fit to the truth", f"{r['quartic_fisher']:.2e}",
         f"~ 1/2 tr(A^-1 B)/N = {r['quartic_fisher_expected']:.1e}, within a factor of a few "
         "(chi-square-like)"),
        ("Quartic: right-mode mass, fit / truth",
         f"{r['quartic_mass_fit']:.3f} / {r['quartic_mass_true']:.3f}",
         f"sample fraction {r['quartic_mass_samples']:.3f} ± "
         f"{r['quartic_mass_samples_se']:.3f} (mode weights: a weak spot of SM)"),
    ]
    for name in TEST_FUNCTIONS:
        mean, se = r["stein"][(name, "true")]
        rows.append((f"Stein E[s_p f + grad f], f = {name}", vec(mean, "{:+.4f}"),
                     f"0 ± 2 s.e. {vec(2 * se, '{:.4f}')}"))
    rows += [
        ("Stein, true score: max |residual| / s.e.", f"{r['stein_true_max_z']:.2f}",
         "< ~3 (noise; max of 10 values)"),
        ("Stein, moment-matched Gaussian, f = 1, x1: max z", f"{r['stein_gauss_linear_max_z']:.2f}",
         "< ~3 (same mean and covariance)"),
        ("Stein, moment-matched Gaussian, nonlinear f: min z",
         f"{r['stein_gauss_nonlinear_min_z']:.1f}", ">> 3 (wrong score detected)"),
        ("Stein vector form E[s_p^T g + div g], g wrong",
         f"{r['stein_vector'][0]:+.4f} ± {r['stein_vector'][1]:.4f}", "0 (within ~2 s.e.)"),
        (f"DSM - ESM: C_sigma at sigma = {cfg.sigma:g} (grid)", f"{r['dsm_C']:.6g}",
         f"D/(2 sigma^2) - 1/2 E|grad log p_sigma|^2 = {r['dsm_kernel_term']:#.4g} - "
         f"{r['dsm_score_term']:#.4g}"),
        ("DSM - ESM over the sweep, exact: mean, spread",
         f"{r['dsm_offset_mean']:.6g}, {r['dsm_offset_spread']:.1e}",
         f"C_sigma, < 1e-9 (DSM range {r['dsm_range']:.4g})"),
        ("DSM - ESM over the sweep, MC: mean, spread, s.e.",
         f"{r['dsm_mc_offset_mean']:.4g}, {r['dsm_mc_offset_spread']:.4g}, "
         f"{r['dsm_mc_se']:.4g}",
         f"max |dev from C| / s.e. = {r['dsm_mc_max_z']:.2f} (< 4: max of {n_sweep})"),
        ("DSM minimum over the sweep (at m2)",
         f"{r['dsm_min']:.6g} (m2 = {r['dsm_argmin']:.2f})", "C_sigma (m2 = 2)"),
        ("C_sigma, sigma in [0.1, 2]: max rel. err of offset", f"{r['dsm_sigma_rel_err']:.1e}",
         "< 1e-9"),
        timing_row(f"ISM time ~ D^a over D = 8 .. {r['cost_dims'][-1]}: exponent a",
                   f"{r['cost_slope']:.2f}",
                   "between 1 and 2: D passes, each O(D H + H^2), H = 64"),
        timing_row(f"time ISM / DSM at D = {r['cost_dims'][0]} and {r['cost_dims'][-1]}",
                   " and ".join(f"{v:.0f}x" for v in r["cost_ratio"][[0, -1]]),
                   f"DSM flat: {r['cost_dsm_ms'].min():.2f} .. {r['cost_dsm_ms'].max():.2f} ms"),
    ]
    run.finish(rows, globals(), "02")
    return r


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
