"""
FILE: 05_sliced_score_matching.py
DIFFICULTY: Intermediate
ESTIMATED TIME: 1.5 hours
PREREQUISITES: 02_score_matching_theory.py (Fisher divergence, implicit and denoising score
               matching, the Jacobian trace), PyTorch autograd, basic linear algebra
               (trace, Frobenius norm)

LEARNING OBJECTIVES:
- Replace the Jacobian trace of implicit score matching by random projections: sliced score
  matching (SSM) and its variance-reduced form (SSM-VR), and show that both are unbiased.
- Derive Hutchinson's trace estimator and its variance for Gaussian and Rademacher probes, and
  see why Rademacher probes are never worse.
- Compute v^T (grad_x s) v with ONE vector-Jacobian product, where the exact trace needs D
  backward passes, and measure what that does to the cost of a training step as D grows.
- Train a score model in D = 100 with ISM, SSM, SSM-VR and DSM and compare how close each gets
  to the true score (Fisher divergence, computed exactly).
- Predict, in closed form, how the noise of each estimator falls with the number of projections.

MATHEMATICAL BACKGROUND:
  Notation: data density p on R^D with score s_p; model score s_theta: R^D -> R^D with Jacobian
  K(x) = grad_x s_theta(x), K_ij = d s_i / d x_j (J_... always names an objective, as in module
  02); |a|^2 = a^T a; ||A||_F^2 = sum_ij A_ij^2 (subscript F: Frobenius; the Fisher divergence
  is F(p, p_theta)). Projections v in R^D are random with E[v v^T] = I (Gaussian N(0, I), or
  Rademacher: each entry +1 or -1 with probability 1/2).

- Implicit SM (module 02):  J_ISM(theta) = E_p[ tr K(x) + 1/2 |s_theta(x)|^2 ]
                            = F(p, p_theta) - 1/2 E_p|s_p|^2,  F = 1/2 E_p |s_theta - s_p|^2
- Hutchinson:               tr A = E_v[ v^T A v ]   (any fixed A, any v with E[v v^T] = I)
  Only S = (A + A^T)/2 matters (v^T A v = v^T S v), and for one probe
                            Var_Gauss      = 2 ||S||_F^2
                            Var_Rademacher = 2 ( ||S||_F^2 - sum_i S_ii^2 )   (<= Var_Gauss)
                            (mean of M probes: divide by M)
- Sliced SM:                J_SSM(theta)    = E_p E_v[ v^T K v + 1/2 (v^T s_theta)^2 ]
- Variance-reduced SSM:     J_SSM-VR(theta) = E_p E_v[ v^T K v + 1/2 |s_theta|^2 ]
  Both equal J_ISM, because E_v[v^T K v] = tr K and E_v[(v^T s)^2] = s^T E[v v^T] s = |s|^2.
- SSM is Hutchinson in disguise:  v^T K v + 1/2 (v^T s)^2 = v^T B v,  B = K + 1/2 s s^T,
  so at fixed x its projection variance is the Hutchinson variance of B (of K for SSM-VR).
  With |s|^2 ~ D, ||1/2 s s^T||_F^2 = |s|^4 / 4 grows like D^2: VR removes that term.
- One backward pass:        grad_x (v^T s_theta(x)) = K^T v   =>   v^T K v = v^T (K^T v)
- Gaussian test bed:        p = N(mu, Sigma), s_p(x) = -Sigma^{-1}(x - mu);  linear model
  s(x) = W x + b:           F = 1/2 [ tr(G Sigma G^T) + |W mu + b|^2 ],  G = W + Sigma^{-1}
  DSM's minimiser is the score of N(mu, Sigma + sigma^2 I), a floor under its Fisher divergence:
                            F_floor(sigma) = 1/2 tr(Sigma Delta^2),
                            Delta = (Sigma + sigma^2 I)^{-1} - Sigma^{-1}

IMPLEMENTATION NOTES:
- The exact-trace ISM loss, the DSM loss, the Fisher divergence and the MLP score network come
  from module 02 (`load_module("02")`: ism_loss, dsm_loss_unweighted, fisher_divergence,
  mlp_score_net);
  this module adds the sliced losses beside them.
- Sliced losses replicate each data point once per projection, so M projections still cost one
  backward pass (over an M times larger batch: the work grows like M), as in the SSM authors'
  code.
- The fitting experiment uses a linear score model s(x) = W x + b on a 100-dimensional Gaussian:
  the truth lies in the model class, the Fisher divergence of every fit is exact (a closed form,
  no sampling), and DSM's bias has a closed form too.
- Everything runs on the CPU in float32 (training) or float64 (checks against closed forms),
  whatever --device says: the models are tiny, and the timing benchmark is about CPU cost.
- Timings are best-of-k wall times (the minimum is the least disturbed by other processes),
  after a warm-up call; k is set from the time of a second call, so the slowest cases (exact ISM
  at D >= 500) are timed once or twice. They depend on the machine and its load and are
  printed, never asserted.
- A default run takes about 1-1.5 minutes on a 2-core laptop CPU; --quick about 10 seconds.

Run:
    python 05_sliced_score_matching.py             # figures go to outputs/05_sliced_score_matching/
    python 05_sliced_score_matching.py --quick     # a smaller sweep and fit, about 10 seconds
    python 05_sliced_score_matching.py --projection rademacher --steps 3000
    pytest tests/test_05_sliced_score_matching.py  # the equations of this module, checked
    pytest tests/test_05_exercises.py -k your_answer   # check your answers to the exercises

References:
- Y. Song, S. Garg, J. Shi, S. Ermon (2019), Sliced score matching: a scalable approach to
  density and score estimation. UAI.
- M. F. Hutchinson (1989), A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines. Communications in Statistics - Simulation and Computation 18(3).
- H. Avron, S. Toledo (2011), Randomized algorithms for estimating the trace of an implicit
  symmetric positive semi-definite matrix. Journal of the ACM 58(2).
- A. Hyvarinen (2005), Estimation of non-normalized statistical models by score matching. JMLR 6.
- P. Vincent (2011), A connection between score matching and denoising autoencoders.
  Neural Computation 23(7).
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# `torch` computes the losses and, through autograd, the Jacobian-vector products that sliced
# score matching is built on; `matplotlib` draws; `tqdm` (via `common.progress`) shows progress of
# the training runs and the timing sweep. From `common` come the shared command line, the
# Gaussian mixture class (here with one component: our high-dimensional target) and the exercise
# machinery. Module 02 supplies
# the exact implicit score matching loss, the denoising loss and the MLP score network.

# %%
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.cli import Count, start_run, timing_row
from common.cli import make_parser as shared_parser
from common.datasets import GaussianMixture
from common.modules import load_module
from common.progress import progress

MODULE = "05_sliced_score_matching"
Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]  # x: (N, D) -> s(x): (N, D)
LossFn = Callable[[torch.nn.Module, Tensor], Tensor]  # (model, batch (N, D)) -> scalar loss

sm02 = load_module("02")  # ism_loss, dsm_loss_unweighted, fisher_divergence, mlp_score_net

PROJECTIONS = ("gaussian", "rademacher")
F64 = torch.float64  # for every comparison with a closed form
MAX_FIT_DIM = 1000  # exact ISM on a D x D linear model: memory and time grow like D^2 and more


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    # Hutchinson's estimator (4.1)
    hutchinson_draws: int = 40_000  # single-probe estimates per matrix
    # projection noise against the number of projections M (4.2)
    var_points: int = 16  # data points x at which the projection variance is measured
    var_repeats: int = 48  # independent M-projection estimates per point
    var_projections: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    # fitting a 100-dimensional Gaussian (4.3)
    fit_dim: int = 100
    fit_batch: int = 128
    fit_steps: int = 1500
    fit_lr: float = 1e-2  # Adam, cosine-decayed to 0
    dsm_sigmas: tuple[float, ...] = (0.5, 0.2)
    eval_every: int = 10  # steps between exact Fisher-divergence evaluations
    projection: str = "gaussian"  # projections of SSM / SSM-VR in the fit
    # cost of one training step against D (4.4)
    timing_dims: tuple[int, ...] = (2, 10, 50, 100, 250, 500, 1000)
    timing_batch: int = 64
    timing_hidden: int = 128
    timing_repeats: int = 7  # best of at most this many timed steps...
    timing_budget: float = 0.5  # ...and of at most this many seconds per (method, D)

    @classmethod
    def quick(cls) -> Config:
        return cls(hutchinson_draws=10_000, var_points=8, var_repeats=32,
                   var_projections=(1, 4, 16), fit_dim=20, fit_steps=150, eval_every=5,
                   timing_dims=(2, 10, 50, 100), timing_batch=32, timing_hidden=64,
                   timing_repeats=3, timing_budget=0.1)


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 05: sliced score matching, Hutchinson's trace estimator, and "
                           "the cost of each score-matching objective as the dimension grows.")
    parser.add_argument("--projection", choices=PROJECTIONS, default="gaussian",
                        help="distribution of the projections v used by SSM and SSM-VR in the "
                             "fitting experiment")
    # One step of each of the five fits at the default D = 100 costs about 60 ms, most of it exact
    # ISM's D backward passes.
    parser.add_argument("--steps", type=Count(1, seconds_each=60e-3, unit="step"), default=None,
                        help="training steps of each fit (default: 1500, or 150 with --quick)")
    parser.add_argument("--fit-dim", type=Count(1, MAX_FIT_DIM, unit="dimension",
                                                why="the fit's cost grows like D^2 or faster"),
                        default=None,
                        help="dimension D of the Gaussian target of the fitting experiment, at "
                             f"most {MAX_FIT_DIM} (default: 100, or 20 with --quick); the linear "
                             "model has D^2 + D parameters and exact ISM takes D backward passes "
                             "per step, so its cost grows like D^2 or faster")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 Where module 02 left us
# Implicit score matching (Hyvarinen 2005) fits a model score $s_\theta$ to samples of $p$ with
# $$ J_{\mathrm{ISM}}(\theta) = \mathbb{E}_p\Big[\operatorname{tr} K(x)
#    + \tfrac12 |s_\theta(x)|^2\Big], \qquad K(x) = \nabla_x s_\theta(x),
#    \quad K_{ij} = \partial s_i / \partial x_j , $$
# which equals the Fisher divergence
# $F(p, p_\theta) = \tfrac12 \mathbb{E}_p |s_\theta - s_p|^2$ minus the constant
# $\tfrac12 \mathbb{E}_p |s_p|^2$. (Letters: $J_{\dots}$ always names an objective, as in
# module 02, and $K$ is the model's Jacobian; the subscript in $\|\cdot\|_F$ means Frobenius.)
# The trouble is the trace. Reverse-mode autograd (what `.backward()` and
# `torch.autograd.grad` do) computes a **vector-Jacobian product**: given the outputs $s$ and a
# vector $u$ of the same shape, `torch.autograd.grad((u * s).sum(), x)` returns the row vector
# $u^\top K$, the gradient of the scalar $u^\top s$, for the price of one backward pass. It
# never returns $K$ itself. The trace needs every diagonal entry $\partial s_i / \partial x_i$,
# hence $D$ backward passes ($u = e_1, \dots, e_D$, row $i$ of $K$ each time), and training
# then differentiates through all of them. For a $28 \times 28$ image that is 784 backward
# passes per step. Denoising score matching avoids derivatives of $s_\theta$ altogether, but
# learns the score of the *noisy* density. Sliced score matching keeps the exact objective and
# makes the trace cheap.
#
# ## 2.2 Hutchinson's trace estimator
# Let $v$ be a random vector with $\mathbb{E}[v v^\top] = I$. For any fixed matrix $A$,
# $$ \mathbb{E}_v\big[v^\top A v\big] = \mathbb{E}\Big[\sum_{ij} A_{ij} v_i v_j\Big]
#    = \sum_{ij} A_{ij}\, \mathbb{E}[v_i v_j] = \sum_i A_{ii} = \operatorname{tr} A . $$
# So $v^\top A v$ is an unbiased estimate of the trace from a single quadratic form, and the mean
# of $M$ independent probes has $1/M$ of its variance. Two probe distributions are common:
# **Gaussian** $v \sim \mathcal{N}(0, I)$ and **Rademacher** ($v_i = \pm 1$ independently with
# probability $\tfrac12$).
#
# **Only the symmetric part counts.** $v^\top A v$ is a number, so it equals its transpose
# $v^\top A^\top v$, and hence $v^\top A v = v^\top S v$ with $S = \tfrac12 (A + A^\top)$. The
# Jacobian of a score *network* is not symmetric in general, so this matters below.
#
# **The variances.** Gaussian: $S$ is symmetric, so $S = Q \Gamma Q^\top$ with $Q$ orthogonal
# and $\Gamma = \operatorname{diag}(\gamma_1, \dots, \gamma_D)$ its eigenvalues. Then
# $w = Q^\top v$ is Gaussian with mean 0 and covariance $Q^\top \mathbb{E}[v v^\top] Q =
# Q^\top Q = I$: again $\mathcal{N}(0, I)$, so its entries are independent standard normals.
# In these coordinates $v^\top S v = w^\top \Gamma w = \sum_k \gamma_k w_k^2$. A standard
# normal has $\mathbb{E} w_k^2 = 1$ and $\mathbb{E} w_k^4 = 3$, so
# $\operatorname{Var} w_k^2 = 3 - 1 = 2$, and variances of independent terms add:
# $$ \operatorname{Var}_{\mathrm{Gauss}}(v^\top A v) = \sum_k \gamma_k^2 \cdot 2
#    = 2\, \|S\|_F^2 \qquad (\textstyle\sum_k \gamma_k^2 = \operatorname{tr} S^2
#    = \|S\|_F^2). $$
# Rademacher: $v_i^2 = 1$ always, so the diagonal contributes the constant $\sum_i S_{ii}$ and
# only the off-diagonal terms fluctuate: $v^\top S v = \sum_i S_{ii} + 2 \sum_{i<j} S_{ij} v_i v_j$.
# Each product $v_i v_j$ ($i<j$) is $\pm 1$ with mean 0 and variance 1. Two different products
# are uncorrelated: $\mathbb{E}[v_i v_j\, v_k v_l] = 0$ unless the pairs are equal, because a
# distinct pair shares at most one index, so some $v$ appears exactly once and its mean 0
# factors out by independence. Uncorrelated variances add, so
# $$ \operatorname{Var}_{\mathrm{Rademacher}}(v^\top A v) = 4 \sum_{i<j} S_{ij}^2
#    = 2\Big(\|S\|_F^2 - \sum_i S_{ii}^2\Big) . $$
# Rademacher probes are therefore never worse than Gaussian ones, and much better when the
# diagonal carries much of $S$'s weight (for a diagonal matrix they are exact). More generally,
# for independent entries with mean 0, variance 1 and fourth moment $\kappa = \mathbb{E} v_i^4$
# the same bookkeeping gives $2 \sum_{i \ne j} S_{ij}^2 + (\kappa - 1) \sum_i S_{ii}^2$:
# $\kappa = 3$ for the Gaussian, and $\kappa = 1$, the smallest possible
# ($\mathbb{E} v^4 \ge (\mathbb{E} v^2)^2$), for Rademacher (Hutchinson 1989).
#
# ## 2.3 Sliced score matching
# Apply Hutchinson to the Jacobian inside ISM, and also to $|s|^2 = \operatorname{tr}(s s^\top)$:
# $$ J_{\mathrm{SSM}}(\theta) = \mathbb{E}_{p}\, \mathbb{E}_{v}\Big[v^\top K(x)\, v
#    + \tfrac12 \big(v^\top s_\theta(x)\big)^2\Big] . $$
# Because $\mathbb{E}_v[v^\top K v] = \operatorname{tr} K$ and
# $\mathbb{E}_v[(v^\top s)^2] = s^\top \mathbb{E}[v v^\top] s = |s|^2$, this is *exactly*
# $J_{\mathrm{ISM}}$: same value, same minimiser, same gradient in expectation. Song et al.
# (2019) derived it differently, as the Fisher divergence of one-dimensional projections
# $v^\top s_\theta$ and $v^\top s_p$ (the *sliced* Fisher divergence), integrated by parts as in
# module 02; the result is the same expression.
#
# **Variance reduction.** The second term does not need a projection: $|s_\theta|^2$ is known
# exactly. Replacing $\tfrac12 (v^\top s)^2$ by its expectation gives
# $$ J_{\mathrm{SSM\text{-}VR}}(\theta) = \mathbb{E}_{p}\, \mathbb{E}_{v}\Big[v^\top K(x)\, v
#    + \tfrac12 |s_\theta(x)|^2\Big], $$
# again equal to $J_{\mathrm{ISM}}$, with the main source of noise in high dimension removed
# (2.4 says how much). Any projections with $\mathbb{E}[v v^\top] = I$ will do; the paper states
# the VR form for Gaussian $v$, and Rademacher $v$ works the same way.
#
# ## 2.4 How noisy are they? SSM is Hutchinson in disguise
# At a fixed data point $x$ the SSM integrand is one quadratic form,
# $$ v^\top K v + \tfrac12 (v^\top s)^2 = v^\top B\, v, \qquad B = K + \tfrac12\, s s^\top, $$
# whose trace is $\operatorname{tr} K + \tfrac12 |s|^2$, the ISM integrand. So its variance over
# $v$ is the Hutchinson variance of $B$ from 2.2, and that of SSM-VR is the Hutchinson variance of
# $K$. Both depend only on symmetric parts: $K_S = \tfrac12 (K + K^\top)$ for $K$, and
# $K_S + \tfrac12 s s^\top$ for $B$ ($s s^\top$ is already symmetric). For Gaussian $v$, expand
# the squared Frobenius norm with $\|X + Y\|_F^2 = \|X\|_F^2 + 2 \operatorname{tr}(X Y)
# + \|Y\|_F^2$ (for symmetric $X$, $Y$), using $\operatorname{tr}(K_S\, s s^\top)
# = s^\top K_S s = s^\top K s$ and $\|s s^\top\|_F^2 = |s|^4$:
# $$ \operatorname{Var}_{\mathrm{SSM}} - \operatorname{Var}_{\mathrm{SSM\text{-}VR}}
#    = 2\big(\|K_S + \tfrac12 s s^\top\|_F^2 - \|K_S\|_F^2\big)
#    = 2\, s^\top K s + \tfrac12 |s|^4 . $$
# For a model close to the truth $\mathbb{E}_p|s|^2 \approx \mathbb{E}_p|s_p|^2$, about $D$ for
# data of unit scale, so the $\tfrac12 |s|^4$ term grows like $D^2$ while $\|K\|_F^2$ grows like
# $D$: in high dimension plain SSM is far noisier than SSM-VR. Not at every point, though: near a
# mode $|s|$ is small and $s^\top K s < 0$, and there plain SSM can be the quieter one. Averaged
# over $x$ at the optimum of a Gaussian target ($s = s_p$, $K = -P$ with $P = \Sigma^{-1}$),
# $s_p(x) = -P(x - \mu)$ is $\mathcal{N}(0, P)$, so $\mathbb{E}\, s^\top K s = -\operatorname{tr}
# (P \cdot P) = -\operatorname{tr} P^2$ and, by the Gaussian fourth moment,
# $\mathbb{E}|s|^4 = (\operatorname{tr} P)^2 + 2 \operatorname{tr} P^2$. The difference is
# $$ -2 \operatorname{tr} P^2 + \tfrac12 (\operatorname{tr} P)^2 + \operatorname{tr} P^2
#    = \tfrac12 (\operatorname{tr}\Sigma^{-1})^2 - \operatorname{tr}\Sigma^{-2} . $$
# It is about $D^2/2$ in many dimensions, but negative in one ($-\tfrac12 P^2$), and in two,
# with eigenvalues $a, b$ of $P$, it is $\tfrac12 (a+b)^2 - a^2 - b^2 = -\tfrac12 (a - b)^2
# \le 0$: in low dimension VR does not help. Even exact ISM is noisy: a minibatch of data points
# varies. Once the projection noise is below that data noise, more projections buy little.
#
# ## 2.5 The cost: one vector-Jacobian product
# Here is the trick that makes SSM cheap. The scalar $v^\top s_\theta(x)$ has gradient
# $$ \nabla_x \big(v^\top s_\theta(x)\big) = K(x)^\top v
#    \quad\Longrightarrow\quad v^\top K(x)\, v = v^\top \big(K(x)^\top v\big), $$
# so **one** vector-Jacobian product (`torch.autograd.grad` of $v^\top s$ with respect to $x$,
# one backward pass) followed by a dot product gives $v^\top K v$, whatever $D$ is. For a batch,
# differentiate $\sum_n v_n^\top s_\theta(x_n)$: sample $n$'s score depends only on $x_n$, so the
# gradient's row $n$ is $K(x_n)^\top v_n$. Forward-mode autograd works equally well: it pushes a
# tangent direction $v$ through the network alongside $x$ and returns the **Jacobian-vector
# product** $K v$ (the directional derivative of $s$ along $v$) in one forward sweep, with no
# backward pass (Exercise 5.3). Training then differentiates the result once more, with respect
# to $\theta$: autograd must record the first backward pass as a graph of its own
# (`create_graph=True`) and then backpropagate through it, a **double backward**. That costs a
# small constant number of passes. Exact ISM needs $D$ such passes; DSM needs none (one forward,
# one backward for the parameters).
#
# ## 2.6 A high-dimensional test bed with exact answers
# The target is $p = \mathcal{N}(\mu, \Sigma)$ in $D = 100$ dimensions with a random rotation and
# eigenvalues $\lambda_k$ between 0.5 and 2, so $s_p(x) = -\Sigma^{-1}(x - \mu)$. The model is
# linear, $s(x) = W x + b$ ($D^2 + D = 10{,}100$ parameters), which contains the truth. Its
# Jacobian is $K = W$ everywhere, and with the error matrix $G = W + \Sigma^{-1}$ the score error
# is $s - s_p = G (x - \mu) + (W\mu + b)$, so
# $$ F(p, p_\theta) = \tfrac12\Big[\operatorname{tr}(G \Sigma G^\top) + |W \mu + b|^2\Big], $$
# exactly, with no sampling. At the start of training ($W = 0$, $b = 0$: $G = \Sigma^{-1}$) this
# is $\tfrac12 \operatorname{tr}\Sigma^{-1}$. ISM, SSM and SSM-VR all have the truth ($F = 0$)
# as their minimiser. DSM with noise $\sigma$ has the score of $\mathcal{N}(\mu, \Sigma +
# \sigma^2 I)$ as its minimiser, $W = -(\Sigma + \sigma^2 I)^{-1}$, $b = -W \mu$, so however long
# it trains it cannot get below
# $$ F_{\mathrm{floor}}(\sigma) = \tfrac12 \operatorname{tr}\big(\Sigma\, \Delta^2\big),
#    \qquad \Delta = (\Sigma + \sigma^2 I)^{-1} - \Sigma^{-1} . $$
# It grows with $\sigma$, from 0 towards $\tfrac12 \operatorname{tr}\Sigma^{-1}$ (for huge
# $\sigma$ DSM learns $s \approx 0$, the starting point). Exercise 5.4 turns it around: which
# $\sigma$ keeps the floor below a given accuracy?

# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Projections
# Both distributions have mean 0 and $\mathbb{E}[v v^\top] = I$. Random numbers come from the
# generator passed in, so every run is reproducible.

# %%
def sample_projections(shape: tuple[int, ...], kind: str = "gaussian",
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Random projection vectors with E[v v^T] = I along the last axis.

    kind: "gaussian" (v ~ N(0, I)) or "rademacher" (entries +1 or -1, probability 1/2 each).
    Returns a tensor of the given ``shape``, e.g. (M, N, D) for M projections of N points.
    """
    if kind == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=dtype or torch.get_default_dtype())
    elif kind == "rademacher":
        # 2 * Bernoulli(1/2) - 1 in {-1, +1}
        bits = torch.randint(0, 2, shape, generator=generator)
        v = (2 * bits - 1).to(dtype or torch.get_default_dtype())
    else:
        raise ValueError(f"kind must be one of {PROJECTIONS}, got {kind!r}")
    return v.to(device) if device is not None else v


# %% [markdown]
# ## 3.2 Hutchinson's estimator and its closed-form variance (Section 2.2)

# %%
def hutchinson_samples(A: Tensor, n: int, kind: str = "gaussian",
                       generator: torch.Generator | None = None) -> Tensor:
    """n independent single-probe estimates v^T A v of tr A.   A: (D, D) -> (n,)."""
    v = sample_projections((n, A.shape[-1]), kind, generator, dtype=A.dtype)
    return torch.einsum("nd,de,ne->n", v, A, v)


def hutchinson_trace(A: Tensor, n_probes: int, kind: str = "gaussian",
                     generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson's estimate of tr A: the mean of ``n_probes`` values v^T A v (a scalar).

    Unbiased; its variance is hutchinson_variance(A, kind) / n_probes.
    """
    return hutchinson_samples(A, n_probes, kind, generator).mean()


def hutchinson_variance(A: Tensor, kind: str = "gaussian") -> Tensor:
    """Variance of one probe's v^T A v, in closed form.   A: (..., D, D) -> (...).

    With S = (A + A^T)/2 (v^T A v = v^T S v, so only S matters):
        gaussian:   2 ||S||_F^2
        rademacher: 2 (||S||_F^2 - sum_i S_ii^2)     (the diagonal is estimated exactly)
    """
    S = 0.5 * (A + A.transpose(-1, -2))
    frob2 = S.square().sum((-2, -1))  # ||S||_F^2
    if kind == "gaussian":
        return 2 * frob2
    if kind == "rademacher":
        return 2 * (frob2 - S.diagonal(dim1=-2, dim2=-1).square().sum(-1))
    raise ValueError(f"kind must be one of {PROJECTIONS}, got {kind!r}")


# %% [markdown]
# ## 3.3 $v^\top K v$ with one vector-Jacobian product (Section 2.5)
# `score_and_vjv` is the heart of the module: one forward pass for $s$, one backward pass for
# $K^\top v$, one dot product. `jacobian` builds the full $D \times D$ Jacobian of every sample
# (with $D$ backward passes, vectorised by `torch.autograd.functional.jacobian`); we use it only
# to check $v^\top K v$ and to evaluate closed-form variances, never to train.

# %%
def score_and_vjv(score_fn: ScoreFn, x: Tensor, v: Tensor,
                  create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """s(x) and v^T K(x) v for every row, with ONE backward pass.   x, v: (N, D) -> (N, D), (N,).

    grad_x sum_n v_n^T s(x_n) has row n equal to K(x_n)^T v_n (rows are independent), and
    v_n^T (K(x_n)^T v_n) = v_n^T K(x_n) v_n, K = grad_x s. ``create_graph=True`` keeps the result
    differentiable in the parameters of ``score_fn`` (training).
    """
    with torch.enable_grad():  # also works when called under torch.no_grad()
        x = x.detach().requires_grad_(True)  # differentiate in x, never through the data
        s = score_fn(x)
        if s.shape != x.shape:
            raise ValueError(f"score_fn must map (N, D) to (N, D); got {tuple(x.shape)} -> "
                             f"{tuple(s.shape)}")
        # The one vector-Jacobian product: grad_x (sum_n v_n^T s_n) = (K_n^T v_n)_n
        (jtv,) = torch.autograd.grad((v * s).sum(), x, create_graph=create_graph)
    return s, (v * jtv).sum(1)  # v^T (K^T v) = v^T K v


def jacobian(score_fn: ScoreFn, x: Tensor) -> Tensor:
    """The full Jacobian K[n, i, j] = d s_i(x_n) / d x_j of every sample.   (N, D) -> (N, D, D).

    Differentiates sum_n s(x_n) (D outputs): since rows are independent, d/dx_n of it is K(x_n).
    Costs D (vectorised) backward passes: for checks and closed forms only.
    """
    jac = torch.autograd.functional.jacobian(lambda z: score_fn(z).sum(0), x.detach(),
                                             vectorize=True)  # (D, N, D): [i, n, j]
    return jac.permute(1, 0, 2)


# %% [markdown]
# ## 3.4 The sliced losses (Section 2.3)
# `ssm_objective` returns one value per (projection, data point), which is what the tests and the
# variance measurement need; `ssm_loss` draws the projections and averages, with the same
# `reduction` convention as module 02's `ism_loss` and `dsm_loss_unweighted`. Several
# projections per point are handled by repeating each point once per projection, so the cost
# is still one backward pass (over an M times larger batch: the work grows like M, but in one
# vectorised call).

# %%
def ssm_objective(score_fn: ScoreFn, x: Tensor, v: Tensor, variance_reduced: bool = False,
                  create_graph: bool = False) -> Tensor:
    """Per-sample SSM integrand for given projections.

        SSM:    v^T K(x) v + 1/2 (v^T s(x))^2
        SSM-VR: v^T K(x) v + 1/2 |s(x)|^2

    x: (N, D); v: (N, D), or (M, N, D) for M projections of every point.
    Returns v.shape[:-1], i.e. (N,) or (M, N). Its mean over v is the ISM integrand
    tr K(x) + 1/2 |s(x)|^2 (unbiased), K = grad_x s.
    """
    D = x.shape[-1]
    x_rep = x.expand(v.shape).reshape(-1, D)  # point n repeated once per projection
    v_flat = v.reshape(-1, D)
    s, vjv = score_and_vjv(score_fn, x_rep, v_flat, create_graph)
    if variance_reduced:
        half_sq = 0.5 * s.square().sum(1)  # 1/2 |s|^2: the exact E_v[1/2 (v^T s)^2]
    else:
        half_sq = 0.5 * (v_flat * s).sum(1).square()  # 1/2 (v^T s)^2
    return (vjv + half_sq).reshape(v.shape[:-1])


def ssm_loss(score_fn: ScoreFn, x: Tensor, n_projections: int = 1, kind: str = "gaussian",
             variance_reduced: bool = False, generator: torch.Generator | None = None,
             reduction: str = "mean", create_graph: bool = True) -> Tensor:
    """Sliced score matching loss on a batch x: (N, D), with fresh projections.

    Averages ssm_objective over ``n_projections`` projections of each point; returns a scalar
    ('mean') or (N,) ('none'). Unbiased for module 02's ism_loss at the cost of one backward
    pass. ``create_graph=True`` (default) makes it trainable.
    """
    v = sample_projections((n_projections, *x.shape), kind, generator, x.dtype, x.device)
    per_sample = ssm_objective(score_fn, x, v, variance_reduced, create_graph).mean(0)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def ssm_vr_loss(score_fn: ScoreFn, x: Tensor, **kwargs) -> Tensor:
    """Variance-reduced SSM: ssm_loss with 1/2 |s|^2 in place of 1/2 (v^T s)^2."""
    return ssm_loss(score_fn, x, variance_reduced=True, **kwargs)


def ssm_projection_variance(K: Tensor, s: Tensor, kind: str = "gaussian",
                            variance_reduced: bool = False) -> Tensor:
    """Closed-form variance over v of one projection's SSM integrand at fixed x (Section 2.4).

    K: (N, D, D) Jacobians grad_x s, s: (N, D) scores -> (N,). SSM is Hutchinson's estimator
    for B = K + 1/2 s s^T; SSM-VR for B = K (the 1/2 |s|^2 term is exact). The mean of M
    projections has 1/M of this variance.
    """
    B = K if variance_reduced else K + 0.5 * s[:, :, None] * s[:, None, :]
    return hutchinson_variance(B, kind)


# %% [markdown]
# ## 3.5 The Gaussian test bed (Section 2.6)
# The target is a one-component `GaussianMixture` from `common/datasets.py`, which provides its
# score and the noise-perturbed score. We sample it directly as $\mu + L z$ with its Cholesky
# factor $L$ (cheaper in a training loop than the mixture's general sampler).

# %%
def gaussian_target(dim: int, generator: torch.Generator | None = None,
                    eig_range: tuple[float, float] = (0.5, 2.0)) -> GaussianMixture:
    """N(mu, Sigma) in ``dim`` dimensions: Sigma = Q diag(lambda) Q^T with a random rotation Q and
    eigenvalues lambda log-spaced over ``eig_range``; mu ~ N(0, 0.25 I). Float64."""
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=F64))
    lam = torch.logspace(math.log10(eig_range[0]), math.log10(eig_range[1]), dim, dtype=F64)
    cov = Q @ torch.diag(lam) @ Q.T
    cov = 0.5 * (cov + cov.T)  # exactly symmetric despite round-off
    mean = 0.5 * torch.randn(dim, generator=generator, dtype=F64)
    return GaussianMixture([1.0], mean[None], cov[None])


def sample_gaussian(target: GaussianMixture, n: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """n draws x = mu + L z from a one-component target, shape (n, D)."""
    z = torch.randn(n, target.dim, generator=generator, dtype=F64)
    return (target.means[0] + z @ target.chol[0].T).to(dtype)


def linear_score_model(W: Tensor, b: Tensor) -> torch.nn.Linear:
    """The model s(x) = W x + b as a torch module (dtype of W). W: (D, D), b: (D,)."""
    D = W.shape[0]
    model = torch.nn.Linear(D, D, dtype=W.dtype)
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    return model


def linear_fisher_divergence(W: Tensor, b: Tensor, mean: Tensor, cov: Tensor) -> float:
    """F = 1/2 E_p |W x + b - s_p(x)|^2 for p = N(mean, cov), exactly (Section 2.6).

    With G = W + Sigma^{-1}:  F = 1/2 [ tr(G Sigma G^T) + |W mu + b|^2 ]
    (G Sigma G^T: error covariance; W mu + b: the model's score at the mean, where s_p = 0).
    """
    W, b = W.detach().to(F64), b.detach().to(F64)
    G = W + torch.linalg.inv(cov)
    return 0.5 * (torch.trace(G @ cov @ G.T) + (W @ mean + b).square().sum()).item()


def dsm_optimal_linear_model(target: GaussianMixture, sigma: float) -> tuple[Tensor, Tensor]:
    """DSM's minimiser: the score of N(mu, Sigma + sigma^2 I), as (W, b) with b = -W mu."""
    noisy = target.perturbed(sigma)
    W = -noisy.precisions[0]
    return W, -W @ noisy.means[0]


# %% [markdown]
# ## 3.6 A training loop you can look inside
# A generator: it yields after every Adam step, with the loss and the wall time of that step,
# so the caller decides what to record (losses, Fisher divergences, time) without callbacks.
# The learning rate decays to zero on a cosine, so the final iterate settles where the gradient
# noise lets it. Later modules can reuse it through `load_module("05")`.

# %%
def timed_training_steps(model: torch.nn.Module, loss_fn: LossFn,
                         sample_batch: Callable[[], Tensor], steps: int, lr: float,
                   desc: str = "training") -> Iterator[tuple[int, float, float]]:
    """Adam on ``loss_fn(model, sample_batch())`` for ``steps`` steps.

    Yields (step, loss, seconds) after each update; seconds is the wall time of that step
    (batch, loss, backward, update), so set-up costs are not charged to training.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = progress(range(steps), desc=desc, leave=False)
    for step in bar:
        start = time.perf_counter()
        loss = loss_fn(model, sample_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        seconds = time.perf_counter() - start
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        yield step, loss.item(), seconds


# %% [markdown]
# ## 3.7 Timing one training step
# The first call of a step is slow (memory allocation, first-call overheads), so it is only a
# warm-up. The second call is timed and tells how many more calls fit in the time budget: a step
# that already takes longer than the budget (exact ISM at large $D$) is not repeated. We report
# the **minimum** over the timed calls, as module 02 does: other processes on the machine can
# only make a call slower, never faster, so the minimum is the least disturbed measurement and
# varies far less from run to run than a median of a few calls.

# %%
def seconds_per_step(step: Callable[[], None], max_repeats: int, budget: float) -> float:
    """Best-of-k wall time (s) of ``step()``: one warm-up call, then k timed calls, where
    1 <= k <= max_repeats and k is chosen from the second call so that they fit in ``budget``."""
    def timed() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    step()  # warm-up: allocations, first-call overheads (not representative, not timed)
    best = timed()  # a representative call: it decides how many more fit in the budget
    extra = int(min(max_repeats - 1, budget // best)) if best > 0 else max_repeats - 1
    for _ in range(max(0, extra)):
        best = min(best, timed())
    return best


# %% [markdown]
# # Section 4: Examples and visualization
#
# Each demo draws one or two figures into `outputs/05_sliced_score_matching/` and returns the
# numbers it measured; `main` collects them into the closing summary.
#
# ## 4.1 Hutchinson's estimator: unbiased, and Rademacher is quieter
# The matrix is the precision $\Sigma^{-1}$ of our target: up to sign it is the Jacobian of the
# true score, the matrix whose trace SSM-VR estimates once training has converged. Left: many
# single-probe estimates scatter around $\operatorname{tr} A$, the Rademacher ones much more
# tightly. Right: we keep the diagonal and scale the off-diagonal part by $\alpha$. Gaussian
# variance $2(\sum_i A_{ii}^2 + \alpha^2 \sum_{i \ne j} A_{ij}^2)$ never drops below the diagonal's
# share; Rademacher variance $2\alpha^2 \sum_{i \ne j} A_{ij}^2$ vanishes for a diagonal matrix.
# Markers are measured, lines are the closed forms of 2.2.

# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this): QUICK = True runs the demos below at
# # --quick sizes, in seconds; False at the script's full size. Each demo's cell follows the
# # cell that defines it.
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg = Config.quick() if run.quick else Config()
# target = gaussian_target(cfg.fit_dim, run.generator)
# r = {}  # every demo's numbers, which main() prints as its summary


# %%
def demo_hutchinson(run, cfg: Config, target: GaussianMixture) -> dict:
    A = target.precisions[0]
    n = cfg.hutchinson_draws
    trace = torch.trace(A).item()
    est = {kind: hutchinson_samples(A, n, kind, run.generator) for kind in PROJECTIONS}
    out = {"hutch_trace": trace}
    for kind, values in est.items():
        out[f"hutch_mean_{kind}"] = values.mean().item()
        out[f"hutch_se_{kind}"] = values.std().item() / math.sqrt(n)
        out[f"hutch_var_{kind}"] = values.var().item()
        out[f"hutch_var_cf_{kind}"] = hutchinson_variance(A, kind).item()

    diag = torch.diag(torch.diagonal(A))
    alphas = np.linspace(0.0, 2.0, 9)
    swept = {kind: ([], []) for kind in PROJECTIONS}
    for alpha in alphas:
        A_alpha = diag + alpha * (A - diag)  # same diagonal, off-diagonal scaled by alpha
        for kind in PROJECTIONS:
            samples = hutchinson_samples(A_alpha, n // 4, kind, run.generator)
            swept[kind][0].append(samples.var().item())
            swept[kind][1].append(hutchinson_variance(A_alpha, kind).item())

    colors = {"gaussian": "tab:blue", "rademacher": "tab:orange"}
    fig, (ax_h, ax_v) = plt.subplots(1, 2, figsize=(12, 4.6))
    lo = min(v.min().item() for v in est.values())
    hi = max(v.max().item() for v in est.values())
    bins = np.linspace(lo, hi, 80)
    for kind, values in est.items():
        ax_h.hist(values.numpy(), bins=bins, density=True, alpha=0.55, color=colors[kind],
                  label=f"{kind}: mean {values.mean():.2f}, std {values.std():.2f}")
    ax_h.axvline(trace, color="k", ls="--", label=f"tr A = {trace:.2f}")
    ax_h.set_xlabel("single-probe estimate $v^T A v$")
    ax_h.set_ylabel("density")
    ax_h.set_title(f"Hutchinson estimates of tr A, A = $\\Sigma^{{-1}}$ (D = {A.shape[0]}), "
                   f"{n} probes each")
    ax_h.legend()
    for kind in PROJECTIONS:
        ax_v.plot(alphas, swept[kind][1], "-", color=colors[kind], label=f"{kind}: closed form")
        ax_v.plot(alphas, swept[kind][0], "o", color=colors[kind], label=f"{kind}: measured")
    ax_v.set_xlabel("scale $\\alpha$ of the off-diagonal part of A (1 = $\\Sigma^{-1}$ itself)")
    ax_v.set_ylabel("variance of one probe $v^T A v$")
    ax_v.set_title("Rademacher probes estimate the diagonal exactly")
    ax_v.legend()
    run.save(fig, "hutchinson_estimator")
    rel = [abs(m - c) / c for kind in PROJECTIONS for m, c in zip(*swept[kind]) if c > 0]
    out["hutch_sweep_max_rel_err"] = max(rel)
    return out


# %% tags=["active-ipynb"]
# r.update(demo_hutchinson(run, cfg, target))


# %% [markdown]
# ## 4.2 Projection noise against the number of projections
# How noisy is each sliced loss, and how much do extra projections help? We evaluate the four
# estimators (SSM and SSM-VR, Gaussian and Rademacher) for the model *at its optimum*,
# $s_\theta = s_p$ (the regime training ends in), at a few data points $x$. For each number of
# projections $M$ we draw many independent $M$-projection estimates and measure their variance
# over $v$, averaged over the points. Markers are measured; lines are the closed forms of
# Section 2.4 divided by $M$. The dotted line is the variance that exact ISM has too, from the
# data point alone: for the optimum, $\operatorname{Var}_x\big[\operatorname{tr}(-\Sigma^{-1})
# + \tfrac12 |s_p(x)|^2\big] = \tfrac12 \|\Sigma^{-1}\|_F^2$ (because
# $s_p(x) \sim \mathcal{N}(0, \Sigma^{-1})$ and $\operatorname{Var}|z|^2 = 2\|C\|_F^2$ for
# $z \sim \mathcal{N}(0, C)$). At $D = 100$, plain SSM needs of the order of a hundred
# projections to get down to it (the sweep runs to $M = 128$ so you can see where it crosses);
# Gaussian SSM-VR starts a factor of about 4 above it, and Rademacher SSM-VR starts below it.
#
# Why does Rademacher help SSM-VR so much and plain SSM hardly at all? Rademacher probes remove
# only the diagonal part $\sum_i B_{ii}^2$ of the Gaussian variance $2\|B_S\|_F^2$ (2.2). For
# SSM-VR, $B = K = -\Sigma^{-1}$, whose diagonal carries much of its weight (its eigenvalues lie
# in a narrow range, so it is not far from a multiple of $I$). For plain SSM the variance is
# dominated by $\tfrac12 s s^\top$: $\|\tfrac12 s s^\top\|_F^2 = \tfrac14 |s|^4$ is a sum of
# $D^2$ terms, about $D^2/4$, while its diagonal $\tfrac14 \sum_i s_i^4$ has only $D$ terms,
# about $3D/4$. Removing a fraction of order $1/D$ changes nothing visible.
#
# The same draws also check unbiasedness: at every point, the mean over all projections must
# match the exact ISM integrand within its standard error.

# %%
VARIANTS = [(kind, vr) for vr in (False, True) for kind in PROJECTIONS]


def variant_name(kind: str, variance_reduced: bool) -> str:
    return f"{'SSM-VR' if variance_reduced else 'SSM'}, {kind}"


def demo_projection_variance(run, cfg: Config, target: GaussianMixture) -> dict:
    P = target.precisions[0]
    optimum = linear_score_model(-P, P @ target.means[0])  # s_theta = s_p, float64
    x = sample_gaussian(target, cfg.var_points, run.generator, dtype=F64)  # (X, D)
    X, D = x.shape
    K, s = jacobian(optimum, x), optimum(x).detach()
    ism = sm02.ism_loss(optimum, x, reduction="none", create_graph=False).detach()  # (X,)
    R = cfg.var_repeats
    measured, closed, max_z, var_max_z = {}, {}, 0.0, 0.0
    for kind, vr in progress(VARIANTS, desc="projection variance", leave=False):
        name = variant_name(kind, vr)
        var1 = ssm_projection_variance(K, s, kind, vr).mean().item()  # E_x Var_v, one projection
        closed[name] = [var1 / M for M in cfg.var_projections]
        measured[name] = []
        for M, var_M in zip(cfg.var_projections, closed[name]):
            chunk = max(1, 8192 // (M * X))  # repeats per batch: bounded memory at large M
            parts = []
            for r0 in range(0, R, chunk):
                v = sample_projections((min(chunk, R - r0) * M, X, D), kind, run.generator, F64)
                with torch.no_grad():
                    parts.append(ssm_objective(optimum, x, v, vr))
            values = torch.cat(parts).reshape(R, M, X)
            estimates = values.mean(1)  # (R, X): R independent M-projection estimates per point
            var_x = estimates.var(0)  # (X,) variance over v at each point
            measured[name].append(var_x.mean().item())
            # Standard error of a sample variance: sqrt((m4 - var^2) / R), m4 the 4th central
            # moment; averaging over the X points divides the squared errors by X^2.
            m4 = (estimates - estimates.mean(0)).pow(4).mean(0)
            se = ((m4 - var_x.square()).clamp_min(0) / R).sum().sqrt().item() / X
            var_max_z = max(var_max_z, abs(measured[name][-1] - var_M) / se)
        # Unbiasedness: all R * M single-projection values at each point vs the exact integrand.
        flat = values.reshape(R * M, X)
        z = (flat.mean(0) - ism) / (flat.std(0) / math.sqrt(R * M))
        max_z = max(max_z, z.abs().max().item())

    data_var_cf = 0.5 * P.square().sum().item()  # 1/2 ||Sigma^-1||_F^2
    x_many = sample_gaussian(target, 4000, run.generator, dtype=F64)
    data_var = sm02.ism_loss(optimum, x_many, reduction="none", create_graph=False).var().item()

    fig, ax = plt.subplots(figsize=(10.5, 5.2))
    Ms = np.array(cfg.var_projections)
    colors = {"gaussian": "tab:blue", "rademacher": "tab:orange"}
    for kind, vr in VARIANTS:
        name = variant_name(kind, vr)
        style = "-" if vr else "--"
        ax.loglog(Ms, closed[name], style, color=colors[kind], alpha=0.8,
                  label=f"{name}: closed form / M")
        ax.loglog(Ms, measured[name], "o" if vr else "s", color=colors[kind], mfc="none",
                  label=f"{name}: measured")
    ax.axhline(data_var_cf, color="k", ls=":", label="exact ISM: data noise only")
    ax.set_xticks(Ms, [str(M) for M in Ms])
    ax.minorticks_off()
    ax.set_xlabel("number of projections M per data point")
    ax.set_ylabel("variance of the per-point estimate (log scale)")
    ax.set_title(f"Projection noise at the optimum, D = {D}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    run.save(fig, "variance_vs_projections")
    return {"var_closed": closed, "var_measured": measured, "var_max_z": var_max_z,
            "unbiased_max_z": max_z, "data_var": data_var, "data_var_cf": data_var_cf,
            "var_dim": D, "var_samples": R * cfg.var_projections[-1]}


# %% tags=["active-ipynb"]
# r.update(demo_projection_variance(run, cfg, target))


# %% [markdown]
# ## 4.3 Fitting a 100-dimensional Gaussian: ISM, SSM, SSM-VR and DSM
# Each method trains the linear model from $W = 0$, $b = 0$ on fresh batches of 128 samples, with
# the same optimiser and schedule; every few steps we compute its Fisher divergence to the truth
# exactly (2.6). DSM runs at two noise levels, with its bias floor $F_{\mathrm{floor}}(\sigma)$
# drawn dashed. SSM and SSM-VR use the projections chosen with `--projection` (Gaussian by
# default; the figures say which). What to look for:
# - **per step** (left), exact ISM and SSM-VR go down together. One-projection SSM lags far
#   behind. 2.4 computed the noise of the loss *value*; its gradient inherits the same
#   $\tfrac12 (v^\top s)^2$ term, so each SSM step is far noisier, and with the same step
#   sizes and number of steps that ends in a genuinely worse model: the curve is the exact
#   Fisher divergence of the parameters, not a noisy reading of a good fit. DSM with
#   $\sigma = 0.5$ stalls just above its high floor. $\sigma = 0.2$ has a much lower floor, but
#   its gradients are far noisier (the $-z/\sigma$ target), and after this run it is still far
#   above that floor, still falling when the learning rate runs out.
# - **per second** (right), exact ISM pays $D$ backward passes per step: SSM-VR reaches the same
#   fit many times sooner.
#
# Why does no curve reach 0, although the truth is in the model? Each step sees 128 fresh
# samples for 10,100 parameters, so the gradient is noisy even for exact ISM. Adam normalises
# each step, so every coordinate moves by about the learning rate, and where the noise dominates
# the signal it moves in a mostly random direction. What is left at the end is
# set by the finite number of steps and this minibatch noise, not by a bias: ISM and SSM-VR end
# around 0.1-0.3 (out of about 54 at the start), and more steps or larger batches push them
# lower. The learning rate decays to 0 on a cosine (3.6); once it has fallen well below its
# starting value, in the last third of the run, the noise is averaged out instead of followed,
# and the curves drop. That ISM's final value lands close to DSM's $\sigma = 0.2$ floor line is
# a coincidence of this run length: DSM's floor is a bias that no amount of training removes,
# ISM's value is noise that more training does.
#
# The second figure shows the training losses themselves, each shifted by its smallest possible
# value so that it reads as a (noisy) Fisher divergence. ISM, SSM and SSM-VR all estimate the same
# $J_{\mathrm{ISM}} = F - \tfrac12 \operatorname{tr}\Sigma^{-1}$ (for a Gaussian,
# $\mathbb{E}_p|s_p|^2 = \operatorname{tr}\Sigma^{-1}$), so they share one panel; SSM's curve is
# the same objective seen through far more noise. DSM's loss is
# $F_\sigma + C_\sigma$, with $F_\sigma$ the Fisher divergence to the score of the *noisy*
# density and $C_\sigma = D/(2\sigma^2) - \tfrac12\operatorname{tr}(\Sigma+\sigma^2 I)^{-1}$
# (module 02): its loss goes to its minimum while its fit to the true score stalls. Each point
# is a minibatch estimate: unbiased (once the constant is subtracted) but noisy, so it can dip
# below 0 although the divergence it estimates cannot. DSM at $\sigma = 0.2$ shows it best: its
# $-z/\sigma$ target makes the minibatch values swing by several units around their mean.

# %%
def fit_methods(cfg: Config, generator: torch.Generator) -> dict[str, LossFn]:
    """The losses compared in the fit, as (model, batch) -> scalar."""
    methods = {
        "ISM (exact trace)": lambda m, x: sm02.ism_loss(m, x),
        "SSM": lambda m, x: ssm_loss(m, x, kind=cfg.projection, generator=generator),
        "SSM-VR": lambda m, x: ssm_vr_loss(m, x, kind=cfg.projection, generator=generator),
    }
    for sigma in cfg.dsm_sigmas:
        methods[f"DSM, sigma = {sigma:g}"] = (
            lambda m, x, sigma=sigma: sm02.dsm_loss_unweighted(m, x, sigma, generator=generator))
    return methods


def fit_label(name: str, cfg: Config) -> str:
    """A method's name for legends and the summary: the projection kind for the sliced losses,
    mathtext sigma for DSM."""
    if name.startswith("SSM"):
        return f"{name} ({cfg.projection} v)"
    return name.replace("sigma", "$\\sigma$")


def demo_fit_quality(run, cfg: Config, target: GaussianMixture) -> dict:
    D = target.dim
    mean, cov = target.means[0], target.covs[0]
    zero = torch.zeros(D, dtype=torch.float32)
    fisher_init = linear_fisher_divergence(torch.zeros(D, D), zero, mean, cov)
    floors = {sigma: linear_fisher_divergence(*dsm_optimal_linear_model(target, sigma), mean, cov)
              for sigma in cfg.dsm_sigmas}
    history = {}
    for name, loss_fn in fit_methods(cfg, run.generator).items():
        model = linear_score_model(torch.zeros(D, D), zero)  # s = 0: every method starts here
        steps, fishers, seconds, losses = [0], [fisher_init], [0.0], []
        elapsed = 0.0  # training time only, not the evaluations
        batches = lambda: sample_gaussian(target, cfg.fit_batch, run.generator)
        for step, loss, seconds_step in timed_training_steps(model, loss_fn, batches,
                                                             cfg.fit_steps, cfg.fit_lr, desc=name):
            elapsed += seconds_step
            losses.append(loss)
            if step == 0 or (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.fit_steps:
                steps.append(step + 1)
                seconds.append(elapsed)
                fishers.append(linear_fisher_divergence(model.weight, model.bias, mean, cov))
        history[name] = dict(steps=steps, fisher=fishers, seconds=seconds, losses=losses)

    colors = dict(zip(history, ["k", "tab:red", "tab:green", "tab:purple", "tab:blue"]))
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for name, h in history.items():
        ax_s.semilogy(h["steps"], h["fisher"], color=colors[name], label=fit_label(name, cfg))
        # From the first step on: the start (0 s) has no place on a log axis.
        ax_t.semilogy(h["seconds"][1:], h["fisher"][1:], color=colors[name],
                      label=fit_label(name, cfg))
    for sigma, floor in floors.items():
        color = colors[f"DSM, sigma = {sigma:g}"]
        for ax in (ax_s, ax_t):
            ax.axhline(floor, color=color, ls="--", lw=1, label=f"DSM floor, $\\sigma$ = {sigma:g}")
    ax_s.set_xlabel("training step")
    ax_s.set_ylabel("Fisher divergence to the true score (exact)")
    ax_s.set_title(f"Fit of $\\mathcal{{N}}(\\mu, \\Sigma)$ in D = {D} "
                   f"({cfg.projection} projections): per step")
    ax_s.legend(fontsize=8)
    ax_t.set_xscale("log")
    ax_t.set_xlabel("training wall time (s, log scale)")
    ax_t.set_title("...and per second of training")
    ax_t.legend(fontsize=8)
    run.save(fig, "fit_quality")

    # Each loss minus its smallest possible value: a noisy estimate of the Fisher divergence to
    # the score that method is aiming at (the true score for ISM, SSM and SSM-VR; the score of
    # the noisy density for DSM). The offsets are module 02's constants.
    min_ism = -0.5 * torch.trace(target.precisions[0]).item()  # -1/2 tr Sigma^{-1}
    offsets = {"ISM (exact trace)": min_ism, "SSM": min_ism, "SSM-VR": min_ism}
    for sigma in cfg.dsm_sigmas:  # C_sigma = D / (2 sigma^2) - 1/2 tr (Sigma + sigma^2 I)^{-1}
        c_sigma = D / (2 * sigma**2) - 0.5 * torch.trace(target.perturbed(sigma).precisions[0])
        offsets[f"DSM, sigma = {sigma:g}"] = c_sigma.item()
    fig, (ax_i, ax_d) = plt.subplots(1, 2, figsize=(13, 4.6))
    window = max(1, cfg.fit_steps // 60)
    for name, h in history.items():
        ax = ax_d if name.startswith("DSM") else ax_i
        excess = np.array(h["losses"]) - offsets[name]
        smooth = np.convolve(excess, np.ones(window) / window, mode="valid")
        ax.plot(excess, color=colors[name], alpha=0.15, lw=0.5)
        ax.plot(np.arange(window - 1, len(excess)), smooth, color=colors[name],
                label=f"{fit_label(name, cfg)} (running mean of {window})")
    for ax, what, offset in (
            (ax_i, "ISM, SSM, SSM-VR: loss $+ \\frac{1}{2}\\,\\mathrm{tr}\\,\\Sigma^{-1}$"
                   "\n(minibatch estimates of $F$ to the true score)",
             "loss $- \\min\\, J_{\\mathrm{ISM}}$"),
            (ax_d, "DSM: loss $- C_\\sigma$\n(minibatch estimates of $F$ to the NOISY score: "
                   "noisy, can go below 0)",
             "loss $- C_\\sigma$")):
        ax.axhline(0.0, color="gray", ls="--", lw=1)
        ax.set_ylim(-0.1 * fisher_init, 1.2 * fisher_init)  # from the start down; clip spikes
        ax.set_xlabel("training step")
        ax.set_ylabel(f"minibatch {offset}")
        ax.set_title(what)
        ax.legend(fontsize=8)
    run.save(fig, "training_losses")

    out = {"fit_dim": D, "fisher_init": fisher_init, "dsm_floors": floors, "min_ism": min_ism}
    for name, h in history.items():
        out[f"fisher_final/{name}"] = h["fisher"][-1]
        out[f"seconds/{name}"] = h["seconds"][-1]
        tail = h["losses"][-max(1, cfg.fit_steps // 10):]  # last 10% of the run
        out[f"final_loss/{name}"] = float(np.mean(tail))
    return out


# %% tags=["active-ipynb"]
# r.update(demo_fit_quality(run, cfg, target))


# %% [markdown]
# ## 4.4 The cost of a training step as the dimension grows
# The model is module 02's MLP $s_\theta: \mathbb{R}^D \to \mathbb{R}^D$ (two hidden layers of
# 128 SiLU units), the batch 64 points. A training step is loss, backward and one Adam update.
# While $D$ is below the hidden width, one pass through the network costs about the same at
# every $D$; beyond it, the first and last layers ($D \times 128$ matrices) dominate and a pass
# costs $\propto D$, for every method. SSM and SSM-VR take one vector-Jacobian product and DSM
# one plain backward pass at every $D$, so their curves follow that single-pass cost: nearly
# flat up to $D \approx 128$, then rising (several-fold from $D = 100$ to $1000$). Exact ISM
# takes $D$ backward passes (and a double backward through all of them): its time grows like
# $D$ while a pass is cheap, and faster beyond the hidden width, towards $D^2$ when the
# per-pass cost has fully taken over (the single, noisy timings at the largest $D$ show the
# trend only roughly). The number to read is the ratio ISM / SSM, which the summary prints at
# several $D$, together with $D$ divided by it. The ratio grows in proportion to $D$ but is not
# $D$ itself: an SSM step is a few passes too (the forward pass, the vector-Jacobian product with
# its graph kept, and the parameter gradient back through both), so the ratio is $D$ divided by
# a small number, about 2-3 here (the printed $D$ / ratio; an ISM pass and an SSM pass are not
# of exactly equal cost either, and timer noise at small $D$ moves it). Timings are
# the best of a few steps after a warm-up (3.7; a single step for the slowest cases) and depend
# on the machine and its load; the trend, not the numbers, is the lesson.

# %%
TIMED = ("ISM (exact trace)", "SSM", "SSM-VR", "DSM")


def demo_cost_per_step(run, cfg: Config) -> dict:
    torch.manual_seed(run.args.seed)  # network initialisation only
    times = {name: [] for name in TIMED}
    for D in progress(cfg.timing_dims, desc="timing one step vs D", leave=False):
        net = sm02.mlp_score_net(D, hidden=cfg.timing_hidden)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x = torch.randn(cfg.timing_batch, D, generator=run.generator)
        losses = {
            "ISM (exact trace)": lambda: sm02.ism_loss(net, x),
            "SSM": lambda: ssm_loss(net, x, generator=run.generator),
            "SSM-VR": lambda: ssm_vr_loss(net, x, generator=run.generator),
            "DSM": lambda: sm02.dsm_loss_unweighted(net, x, 0.5, generator=run.generator),
        }
        for name, loss_fn in losses.items():
            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()
            times[name].append(seconds_per_step(step, cfg.timing_repeats, cfg.timing_budget))

    dims = np.array(cfg.timing_dims)
    styles = {"ISM (exact trace)": ("o-", "k"), "SSM": ("s-", "tab:red"),
              "SSM-VR": ("^--", "tab:green"), "DSM": ("d-", "tab:blue")}
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for name in TIMED:
        marker, color = styles[name]
        ax.loglog(dims, 1e3 * np.array(times[name]), marker, color=color, label=name)
    # Reference slopes through ISM's time: D at the largest D <= 100, D^2 (for D >= that one)
    # at the largest D <= 250, a middle point, so single noisy timings at the ends matter less.
    t_ism = 1e3 * np.array(times["ISM (exact trace)"])
    k = int(np.nonzero(dims <= 100)[0][-1])
    ax.loglog(dims, t_ism[k] * dims / dims[k], ":", color="gray", label="$\\propto D$")
    big, k2 = dims >= dims[k], int(np.nonzero(dims <= 250)[0][-1])
    ax.loglog(dims[big], t_ism[k2] * (dims[big] / dims[k2]) ** 2, "-.", color="gray",
              label="$\\propto D^2$")
    ax.set_xlabel("dimension D")
    ax.set_ylabel("wall time per training step (ms, log scale)")
    ax.set_title(f"Cost of one training step (MLP, hidden {cfg.timing_hidden}, "
                 f"batch {cfg.timing_batch})")
    ax.legend()
    run.save(fig, "time_per_step_vs_dimension")
    return {"timing_dims": list(cfg.timing_dims), "times": times}


# %% tags=["active-ipynb"]
# r.update(demo_cost_per_step(run, cfg))


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_05_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/05_sliced_score_matching.py`: try first, then compare.

# %%
def exercise_sphere_projections(n: int, dim: int, generator: torch.Generator) -> Tensor:
    """Exercise 5.1: projections uniform on the sphere of radius sqrt(D).

    The SSM paper also uses v uniform on the sphere |v| = sqrt(D). The radius makes
    E[v v^T] = I, so these too give unbiased sliced losses.

    Args:
        n: number of projections; dim: D; generator: pass it to every random call.
    Returns:
        (n, dim), each row of norm exactly sqrt(dim), uniformly distributed on that sphere.

    Example: for dim = 4 every row has norm 2, and the average of v v^T over many rows is
    close to the 4 x 4 identity.

    Hint: a standard Gaussian vector divided by its norm is uniform on the unit sphere (its
    density depends only on |z|). Then check yourself with Hutchinson: for symmetric S the
    variance of v^T S v with sphere probes is 2 D/(D+2) (||S||_F^2 - (tr S)^2 / D), lower
    than Gaussian probes' 2 ||S||_F^2. (Normalising a uniform draw from the cube [-1, 1]^D
    is NOT uniform on the sphere: the check notices.)
    """
    # TODO: Gaussian draws, normalised to norm 1, scaled to norm sqrt(dim).
    raise NotImplementedError("Exercise 5.1: implement exercise_sphere_projections")


def exercise_frobenius_norm_estimate(matvec: Callable[[Tensor], Tensor], dim: int,
                                     n_probes: int, generator: torch.Generator) -> Tensor:
    """Exercise 5.2: estimate ||A||_F^2 from matrix-vector products only (matrix-free).

    The closed-form variances of Hutchinson's estimator need ||S||_F^2, but for a network's
    Jacobian we can only afford products with random vectors. Use E_v |A v|^2 = tr(A^T A) =
    ||A||_F^2: Hutchinson's estimator applied to A^T A. This estimates the norm of whatever
    matrix ``matvec`` multiplies by; for the variance of v^T A v you want the symmetric part
    S = (A + A^T)/2, so pass the matvec S v = (A v + A^T v)/2 (for a Jacobian: half the sum of
    a Jacobian-vector and a vector-Jacobian product).

    Args:
        matvec: maps a batch of vectors V: (k, D) to the products (k, D), row i = A v_i
                (that is, V @ A.T). You never see A itself.
        dim: D; n_probes: number of Rademacher probes; generator: for the probes.
    Returns:
        a scalar tensor: the mean over the probes of |A v|^2.

    Example: for A = 3 I in D = 2 every Rademacher probe gives |A v|^2 = 18 = ||A||_F^2 exactly.

    Hint: draw V of shape (n_probes, dim) with entries +-1 (sample_projections in Section 3.1
    does it), call matvec once, square, sum over D, average over the probes.
    """
    # TODO: Rademacher probes, one call to matvec, mean of |A v|^2.
    raise NotImplementedError("Exercise 5.2: implement exercise_frobenius_norm_estimate")


def exercise_ssm_forward_mode(score_fn: ScoreFn, x: Tensor, v: Tensor) -> Tensor:
    """Exercise 5.3: the SSM integrand with a forward-mode Jacobian-vector product.

    Section 3.3 gets v^T K v (K = grad_x s) from a vector-Jacobian product (reverse mode,
    K^T v). Forward mode gives the Jacobian-vector product K v directly, by pushing the
    tangent v through the network alongside x (Section 2.5).

    Args:
        score_fn: maps (N, D) -> (N, D), rows independent; x, v: (N, D).
    Returns:
        (N,) the SSM integrand v^T K(x) v + 1/2 (v^T s(x))^2 (not the variance-reduced form).

    Example: for s(x) = -x (so K = -I) and v = (1, 1) at x = (1, 0): v^T K v = -2,
    v^T s = -1, so the answer is -2 + 0.5 = -1.5.

    Hint: ``s, jv = torch.func.jvp(score_fn, (x,), (v,))`` returns s(x) and the row-wise K v
    (the tangent of the whole batch is v, and rows are independent). Then take row-wise dot
    products with v.
    """
    # TODO: one torch.func.jvp call, then two row-wise dot products.
    raise NotImplementedError("Exercise 5.3: implement exercise_ssm_forward_mode")


def exercise_sigma_for_floor(cov: Tensor, floor: float) -> float:
    """Exercise 5.4: the DSM noise level sigma whose bias floor equals a target accuracy.

    DSM with noise sigma can get no closer to the true score of N(mu, Sigma) than
        F_floor(sigma) = 1/2 tr(Sigma Delta^2),  Delta = (Sigma + sigma^2 I)^{-1} - Sigma^{-1}
    (Section 2.6). If you need a Fisher divergence below some ``floor``, how large may sigma be?
    Find the sigma > 0 with F_floor(sigma) = floor, to a relative accuracy of 1e-9 or better.

    Args:
        cov: (D, D) symmetric positive definite Sigma; floor: the target, with
             0 < floor < 1/2 tr Sigma^{-1} (you may assume it).
    Returns:
        sigma as a Python float.

    Example: Sigma = I in D = 1 has F_floor(sigma) = 1/2 (1/(1 + sigma^2) - 1)^2, which is
    1/8 at sigma = 1; so floor = 0.125 gives sigma = 1.

    Hint: F_floor(sigma) grows monotonically with sigma, from 0 to 1/2 tr Sigma^{-1}, so a
    bisection (on log sigma) converges; work out F_floor cheaply from the eigenvalues of Sigma,
    in whose eigenbasis Delta is diagonal. For small sigma, F_floor is about a constant times
    sigma^4: which constant? Is that a good starting bracket, or a good answer? Try the
    fit_quality figure's floors: which sigma would put DSM's floor at 0.01 in D = 100? The
    run's Sigma (default seed 0) is
    ``gaussian_target(100, torch.Generator().manual_seed(0)).covs[0]``.
    """
    # TODO: F_floor from the eigenvalues, then solve F_floor(sigma) = floor.
    raise NotImplementedError("Exercise 5.4: implement exercise_sigma_for_floor")


# %% [markdown]
# ## Summary
# - Hutchinson: $\operatorname{tr} A = \mathbb{E}_v[v^\top A v]$ for any $v$ with
#   $\mathbb{E}[vv^\top] = I$; one probe has variance $2\|S\|_F^2$ (Gaussian) or
#   $2(\|S\|_F^2 - \sum_i S_{ii}^2)$ (Rademacher), $S$ the symmetric part of $A$.
# - Sliced score matching replaces $\operatorname{tr}\nabla_x s_\theta$ by $v^\top (\nabla_x
#   s_\theta) v$, computed with one vector-Jacobian product; SSM and SSM-VR are unbiased for
#   the ISM objective, and their cost per step is a few network passes at every $D$, while
#   exact ISM makes $D$ of them: the ratio of the two grows like $D$ (about $D/3$ to $D/2$).
# - SSM is Hutchinson's estimator for $\nabla s + \tfrac12 s s^\top$: the $s s^\top$ part makes
#   its noise grow like $D^2$. SSM-VR computes $\tfrac12|s|^2$ exactly and, in $D = 100$, fits
#   within a factor of 2 of exact ISM per step, at a fraction of its cost per step.
# - DSM is the cheapest of all but learns the noisy score: its fit can get no closer than a
#   floor set by $\sigma$ (about $\sigma^4$ for small $\sigma$). Large $\sigma$ stalls just above
#   its high floor; small $\sigma$ has a low floor but noisy gradients, and in this run ends
#   far above it.

# %%
def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    cfg.projection = run.args.projection
    if run.args.steps is not None:
        cfg.fit_steps = run.args.steps
    if run.args.fit_dim is not None:
        cfg.fit_dim = run.args.fit_dim
    if run.device.type != "cpu":
        print("Note: this module runs on the CPU (tiny models; the timings are about CPU cost).")

    target = gaussian_target(cfg.fit_dim, run.generator)
    r = {}
    r.update(demo_hutchinson(run, cfg, target))
    r.update(demo_projection_variance(run, cfg, target))
    r.update(demo_fit_quality(run, cfg, target))
    r.update(demo_cost_per_step(run, cfg))

    D = r["fit_dim"]
    rows = []
    for kind in PROJECTIONS:
        rows += [
            (f"Hutchinson, {kind}: mean of {cfg.hutchinson_draws} probes ± std. error (D = {D})",
             f"{r[f'hutch_mean_{kind}']:.3f} ± {r[f'hutch_se_{kind}']:.3f}",
             f"tr A = {r['hutch_trace']:.3f}"),
            (f"Hutchinson, {kind}: z = (mean - tr A) / std. error",
             f"{(r[f'hutch_mean_{kind}'] - r['hutch_trace']) / r[f'hutch_se_{kind}']:.2f}",
             "|z| < 4 (unbiased)"),
            (f"Hutchinson, {kind}: variance of one probe",
             f"{r[f'hutch_var_{kind}']:.2f}",
             f"{r[f'hutch_var_cf_{kind}']:.2f} (closed form)"),
        ]
    rows.append(("Hutchinson: max rel. error of variance, alpha sweep",
                 f"{r['hutch_sweep_max_rel_err']:.3f}",
                 f"sampling noise of {cfg.hutchinson_draws // 4} probes: a few % "
                 f"(up to ~10% with --quick)"))
    M_list = cfg.var_projections
    for name in r["var_closed"]:
        rows.append((f"projection variance, {name}, M = {M_list[0]} / {M_list[-1]}",
                     f"{r['var_measured'][name][0]:.1f} / {r['var_measured'][name][-1]:.2f}",
                     f"{r['var_closed'][name][0]:.1f} / {r['var_closed'][name][-1]:.2f} "
                     f"(closed form / M)"))
    rows += [
        (f"projection variance vs closed form: max |z| over {4 * len(M_list)} cases",
         f"{r['var_max_z']:.2f}", "< 4 (within sampling noise)"),
        ("exact ISM: variance from the data alone", f"{r['data_var']:.1f}",
         f"{r['data_var_cf']:.1f} = 1/2 ||Sigma^-1||_F^2"),
        (f"SSM/SSM-VR mean over {r['var_samples']} projections vs exact ISM: max |z|",
         f"{r['unbiased_max_z']:.2f}",
         f"< 4 (unbiased; {cfg.var_points} points x 4 estimators)"),
        (f"fit, D = {D}: Fisher divergence at the start (s = 0)", f"{r['fisher_init']:.2f}",
         f"1/2 tr Sigma^-1 = {-r['min_ism']:.2f}"),
    ]
    methods = list(fit_methods(cfg, run.generator))
    for name in methods:
        if name.startswith("DSM"):
            sigma = float(name.split("=")[1])
            near = r[f"fisher_final/{name}"] < 1.5 * r["dsm_floors"][sigma]
            floor = (f"floor {r['dsm_floors'][sigma]:.3f} (a bias; "
                     + ("stalls just above it)" if near else "not reached in this run)"))
        elif name == "SSM":
            floor = "above ISM (projection noise ~ D^2)"
        else:
            floor = "small; limited by steps and minibatch noise"
        label = f"{name} ({cfg.projection} v)" if name.startswith("SSM") else name
        rows.append((f"fit: Fisher divergence after {cfg.fit_steps} steps, {label}",
                     f"{r[f'fisher_final/{name}']:.3f}", floor))
    short = [n.replace(" (exact trace)", "").replace(", sigma = ", " ") for n in methods]
    rows.append(timing_row(f"fit: seconds for {cfg.fit_steps} steps, " + " | ".join(short),
                           " | ".join(f"{r[f'seconds/{name}']:.1f}" for name in methods),
                           "ISM slowest: D backward passes per step"))
    rows.append(("fit: final loss of ISM / SSM / SSM-VR (last 10%)",
                 " / ".join(f"{r[f'final_loss/{n}']:.2f}"
                            for n in ("ISM (exact trace)", "SSM", "SSM-VR")),
                 f"min J_ISM = -1/2 tr Sigma^-1 = {r['min_ism']:.2f}"))
    for i, D_t in enumerate(r["timing_dims"]):
        rows.append(timing_row(
            f"time per step, D = {D_t}: ISM | SSM | SSM-VR | DSM",
            " | ".join(f"{1e3 * r['times'][name][i]:.1f}" for name in TIMED) + " ms",
            "all grow once D > hidden width; ISM makes D passes"))
    ratios = [ism / ssm for ism, ssm in zip(r["times"]["ISM (exact trace)"], r["times"]["SSM"])]
    rows.append(timing_row(f"time ratio ISM / SSM at D = {', '.join(map(str, r['timing_dims']))}",
                           ", ".join(f"{q:.0f}x" for q in ratios), "grows like D (ISM: D passes)"))
    rows.append(timing_row("D / (time ratio ISM / SSM), same D",
                           ", ".join(f"{D_t / q:.1f}"
                                     for D_t, q in zip(r["timing_dims"], ratios)),
                           "a small constant, ~2-3: an SSM step costs a few passes"))
    run.finish(rows, globals(), "05")
    return r


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
