"""
FILE: 03_langevin_dynamics.py
DIFFICULTY: Beginner
ESTIMATED TIME: 2 hours
PREREQUISITES: 01_score_functions_basics.py (scores of Gaussians and mixtures),
    02_score_matching_theory.py (why we can learn a score); Gaussian algebra (sums of
    independent Gaussians). Markov chains, Brownian motion and SDEs are introduced here.

LEARNING OBJECTIVES:
- Sample from a density with nothing but its score, using the unadjusted Langevin algorithm
  (ULA), on 1D and 2D targets.
- Derive ULA's stationary variance on a Gaussian in closed form and measure its O(eps) bias.
- Remove the bias with a Metropolis-Hastings correction (MALA) and check that the corrected
  chain leaves the target exactly invariant.
- Solve the Fokker-Planck equation of Langevin dynamics on a grid and watch it carry any start
  density to the target, side by side with a cloud of Langevin particles.
- Read "distance to the target against step size and number of steps" plots: the trade-off
  between speed and bias.
- See the pitfall that motivates everything after this module: with well-separated modes,
  even the exact score gets the mode weights wrong in any realistic number of steps.

MATHEMATICAL BACKGROUND:
- ULA, the update of Song & Ermon (2019): noisy gradient ascent on log p,
      x_{k+1} = x_k + (eps/2) s(x_k) + sqrt(eps) z_k,       z_k ~ N(0, I),  s = grad log p.
  On N(0, v) the drift shrinks the variance by about eps Var/v per step and the noise adds
  eps: the two balance at Var = v, which is why a drift eps/2 goes with a noise sqrt(eps).
- Its small-step limit is the Langevin diffusion, written
      dx = (1/2) s(x) dt + dW,
  shorthand for "over a short time dt, move by (1/2) s(x) dt and add an independent
  N(0, dt I) kick" (W is Brownian motion: the sum of those kicks). ULA is exactly this rule
  with dt = eps (the Euler-Maruyama scheme).
- The density p_t of x_t obeys the Fokker-Planck equation: the drift moves mass (continuity
  equation), the kicks spread it (N(0, t) solves d p/dt = (1/2) p''):
      d p_t / dt = - div( (1/2) s(x) p_t ) + (1/2) Laplacian p_t
                 = (1/2) div( p_t grad log(p_t / p) ),
  which is zero when p_t = p: the target is stationary (invariant).
- Discretisation bias on a Gaussian target N(m, v) (1D): s(x) = -(x - m)/v, so
      x_{k+1} - m = a (x_k - m) + sqrt(eps) z_k,            a = 1 - eps/(2v),
      Var_{k+1} = a^2 Var_k + eps  ->  v_eps = eps / (1 - a^2) = v / (1 - eps/(4v))
                                          = v + eps/4 + O(eps^2),   stable iff 0 < eps < 4v.
- MALA: propose x' = x + (eps/2) s(x) + sqrt(eps) z, i.e. from
      q(x' | x) = N(x'; x + (eps/2) s(x), eps I),
  and accept with probability
      alpha(x, x') = min(1, p(x') q(x | x') / (p(x) q(x' | x))).
  Detailed balance p(x) q(x'|x) alpha(x, x') = p(x') q(x|x') alpha(x', x), integrated over x
  and with the rejected mass r(x') added, gives int p(x) K(x, x') dx = p(x'): p is exactly
  invariant for every eps. Only the ratio p(x')/p(x) enters, so log p up to an additive
  constant suffices. Without the q-ratio the chain converges to the wrong law.
- Score-based models give a learned score s_theta and no log p: MALA is then unavailable, and
  ULA with its O(eps) bias (or its annealed version, module 07) is what is used in practice.
- Ornstein-Uhlenbeck check: for p = N(m, v) and x_0 ~ N(m_0, v_0) the diffusion stays Gaussian
  with mean m + (m_0 - m) exp(-t/(2v)) and variance v + (v_0 - v) exp(-t/v).
- Mixture pitfall: s(x) = sum_k r_k(x) s_k(x) with responsibilities r_k. Inside mode k,
  r_k(x) = 1 up to exp(-(distance between modes)^2 / 2), so the score there does not depend on
  the weights w_k at all; the weights only steer chains through the rare crossings between
  modes.

IMPLEMENTATION NOTES:
- The samplers are batched over independent chains: x has shape (N, ...) (for example (N, D)),
  and the step size may be a number or one value per chain, shape (N,), so one call runs a
  whole step-size sweep. `langevin` and `mala` are Python generators that yield every state:
  `*_, x = langevin(...)` keeps the last one, `list(langevin(...))` the trajectory. Modules 04
  and 07 reuse them through `common.modules.load_module("03")`.
- Every computation is float64 on the CPU: the problems are tiny, and the bias we measure
  (about eps/4) must not drown in float32 rounding. `--device` is accepted but not needed.
- The Fokker-Planck solver is a finite-volume scheme (central fluxes, zero flux at the ends)
  stepped with backward Euler: stable for any time step, it conserves the mass sum p h = 1
  exactly, and keeps p >= 0 as long as the cell Peclet number |s| h stays below 2 (checked).
- Distances to the target use the sliced Wasserstein distance of common/metrics (defined in
  Section 3.4) with fixed projection directions, against a fresh reference sample; the "floor"
  is the distance between two independent target samples of the same size.

Run:
    python 03_langevin_dynamics.py            # full demonstration (~20 s CPU time, 2 cores)
    python 03_langevin_dynamics.py --quick    # smoke run (~8 s CPU time, torch import included)
    pytest tests/test_03_langevin_dynamics.py   # tests of the equations
    pytest tests/test_03_exercises.py -k your_answer   # check your answers

References:
- G. O. Roberts and R. L. Tweedie (1996), Exponential convergence of Langevin distributions
  and their discrete approximations. Bernoulli 2(4). (ULA and MALA.)
- G. O. Roberts and J. S. Rosenthal (1998), Optimal scaling of discrete approximations to
  Langevin diffusions. JRSS B 60(1). (MALA's step size and acceptance rate 0.574 in high D.)
- A. Durmus and E. Moulines (2017), Nonasymptotic convergence analysis for the unadjusted
  Langevin algorithm. Annals of Applied Probability 27(3).
- H. Risken (1989), The Fokker-Planck Equation. Springer.
- Y. Song and S. Ermon (2019), Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (Section 3.2: low-density regions; Langevin dynamics cannot recover
  the relative weights of separated modes.)
- Y. Song (2021), Generative modeling by estimating gradients of the data distribution (blog
  post, yang-song.net/blog/2021/score/): the 0.8/0.2 mixture example.
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# The samplers need only torch. numpy and scipy solve the 1D Fokker-Planck equation on a grid
# (a banded linear system per time step) and give the normal CDF for histogram tests.
# `common` provides the shared command line, figure saving, the Gaussian mixtures with exact
# scores, the sample distances, and `expand_to`, which turns a step size given as a number or as
# one value per chain (N,) into a tensor that broadcasts against the chains x (N, ...).

# %%
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import torch
from scipy import stats
from scipy.linalg import eigh_tridiagonal, solve_banded

from common import plotting
from common.cli import Count, Real, start_run
from common.cli import make_parser as make_shared_parser
from common.datasets import GaussianMixture
from common.metrics import sliced_wasserstein
from common.progress import progress
from common.training import expand_to

MODULE = "03_langevin_dynamics"
DTYPE = torch.float64  # closed forms are compared at the 1e-3 level: float64 throughout
Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]  # x (N, ...) -> s(x) (N, ...)
LogProbFn = Callable[[Tensor], Tensor]  # x (N, ...) -> log p(x) + const, (N,)


@dataclass
class Config:
    """Sizes of one run: defaults ~20 s of CPU time (2 cores), `quick()` ~8 s incl. imports."""

    # 1D Gaussian N(0, variance): ULA's stationary variance against its closed form
    variance: float = 1.0
    bias_step_sizes: tuple = (0.05, 0.2, 0.5, 1.0, 1.5)
    bias_chains: int = 20_000  # per step size; standard error of a variance = v sqrt(2/N)
    bias_steps: int = 200  # a^(2k) < 1e-4 for every step size above
    # 2D mixture: samples, trajectories and the distance sweeps
    chains_2d: int = 2000
    step_size_2d: float = 0.4  # a "large" step, where ULA's bias shows and MALA still accepts
    small_step_2d: float = 0.05
    sweep_step_sizes: tuple = (0.01, 0.03, 0.1, 0.3, 0.6, 0.9)
    sweep_steps: int = 200
    max_steps_2d: int = 500
    trajectory_steps: int = 150
    # 1D Fokker-Planck equation on a grid, beside Langevin particles
    grid_cells: int = 400
    fp_dt: float = 0.02  # particle step size eps; the grid takes 10 sub-steps of fp_dt / 10
    fp_times: tuple = (0.2, 1.0, 4.0, 16.0)  # snapshot times t (step k = round(t / fp_dt))
    particles: int = 10_000
    # the separated-modes pitfall
    mode_chains: int = 1000
    mode_step_size: float = 0.1
    mode_steps: int = 500

    @classmethod
    def quick(cls) -> "Config":
        return cls(bias_chains=5000, bias_steps=150, chains_2d=500, sweep_steps=100,
                   max_steps_2d=100, trajectory_steps=100, grid_cells=200, fp_dt=0.04,
                   particles=3000, mode_chains=300, mode_steps=150)


def make_parser():
    """The shared flags plus two of this module's own (validated: bad values stop with a line)."""
    parser = make_shared_parser("Langevin dynamics: ULA, MALA, Fokker-Planck, mode weights.")
    group = parser.add_argument_group("module 03")
    # Cost per chain, measured with --quick: 19 kB held (Section 4.3 keeps every state of its
    # sweeps) and 1.4 ms; the default run's longer sweeps hold and take about twice that.
    group.add_argument("--chains", type=Count(10, bytes_each=40e3, seconds_each=3e-3,
                                              unit="chain"), default=None,
                       help="independent chains per sampler in the 2D mixture demonstrations "
                            "of Sections 4.2-4.3 (default: 2000, --quick: 500; at least 10); "
                            "Section 4.5 keeps its own size")
    group.add_argument("--step-size", type=Real(0, low_open=True), default=None,
                       help="the large step size eps for ULA vs MALA on the 2D mixture "
                            "(default 0.4; must stay below ULA's stability limit 1.2)")
    return parser


def _check_flags(args) -> str | None:
    """The flag check that needs the target: --step-size below ULA's stability limit."""
    limit = ula_stability_limit(mixture_2d())
    if args.step_size is not None and args.step_size >= limit:
        return (f"argument --step-size: ULA on the 2D mixture is stable only for eps < "
                f"{limit:.2f}, got {args.step_size}")
    return None


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 The update: noisy gradient ascent on log p
#
# Let s(x) = grad log p(x) be the score of a target density p. The unadjusted Langevin
# algorithm (ULA) repeats
#
# $$ x_{k+1} = x_k + \tfrac{\epsilon}{2} s(x_k) + \sqrt{\epsilon}\, z_k,\qquad z_k\sim N(0, I). $$
#
# The first term climbs log p (gradient ascent with step eps/2), the second is a random kick
# that keeps the chain from collapsing onto a mode. Why a drift eps/2 goes with a noise
# sqrt(eps): on p = N(0, v) the drift multiplies x by (1 - eps/(2v)), removing about eps Var/v of
# variance per step, and the kick adds eps; the two balance exactly when Var = v. (A noise
# sqrt(2 eps) would settle at 2v.) It needs only the score, never log p or its normaliser.
#
# **Markov-chain vocabulary.** A *Markov chain* draws x_{k+1} from a law K(x_k, .) that depends
# only on x_k (ULA: N(x_k + (eps/2) s(x_k), eps I)). A density p is *stationary* (= invariant)
# if x_k ~ p implies x_{k+1} ~ p: int p(x) K(x, x') dx = p(x'). *Detailed balance*,
# p(x) K(x, x') = p(x') K(x', x), says the flow of probability from x to x' equals the flow
# back; integrating it over x gives stationarity (Section 2.4).
#
# ## 2.2 The small-step limit: the Langevin diffusion and its Fokker-Planck equation
#
# Let the step become a short time dt. One writes the limit as
#
# $$ dx = \tfrac12 s(x)\,dt + dW, $$
#
# which is shorthand for "over a short time dt, move by (1/2) s(x) dt and add an independent
# N(0, dt I) kick". W, the running sum of the kicks, is Brownian motion; the variances of
# independent kicks add, so over a time t the kicks alone give N(0, t I). ULA is exactly this
# rule applied with dt = eps (the *Euler-Maruyama* scheme: freeze the drift over each step).
#
# How does the density p_t of x_t evolve? Two effects add up.
# - The drift moves mass with velocity b = s/2 and creates none, so p_t obeys the continuity
#   equation d p_t/dt = -div(b p_t) (in 1D: what flows in minus what flows out).
# - The kicks spread mass. The kicks alone turn a point into N(0, t), whose density
#   g = exp(-x^2/(2t)) / sqrt(2 pi t) satisfies dg/dt = (1/2) g'' (differentiate both sides to
#   check); by linearity every density spreads by the same rule, (1/2) Laplacian p_t.
#
# Together (the Fokker-Planck equation of the diffusion):
#
# $$ \partial_t p_t = -\nabla\cdot\big(\tfrac12 s\, p_t\big) + \tfrac12 \Delta p_t
#    = \tfrac12 \nabla\cdot\big(p_t \nabla \log \tfrac{p_t}{p}\big), $$
#
# where the second form uses grad p_t = p_t grad log p_t. The right-hand side vanishes at
# p_t = p, so p is stationary; it is also the only stationary density (for targets with
# reasonable tails), and p_t converges to it from any start (Section 4.4 watches this).
# Conventions differ by a time rescaling: many texts write dx = grad log p dt + sqrt(2) dW,
# which is our process run twice as fast. We keep the 1/2 so that the time step of ULA is exactly
# the eps of the familiar update. But a finite step is not the diffusion: ULA's stationary law
# p_eps differs from p.
#
# ## 2.3 ULA's bias, exactly, on a Gaussian
#
# For p = N(m, v) in 1D the score is -(x - m)/v and the update is linear:
#
# $$ x_{k+1} - m = a\,(x_k - m) + \sqrt{\epsilon}\, z_k,\qquad a = 1 - \frac{\epsilon}{2v}. $$
#
# The mean converges to m (no bias), and the variance follows Var_{k+1} = a^2 Var_k + eps, whose
# fixed point is
#
# $$ v_\epsilon = \frac{\epsilon}{1 - a^2} = \frac{v}{1 - \epsilon/(4v)}
#    = v + \frac{\epsilon}{4} + O(\epsilon^2), $$
#
# finite only while |a| < 1, i.e. 0 < eps < 4v. The bias is O(eps) (first order, like the
# Euler scheme it is). In D dimensions the same holds along each eigen-direction of the
# covariance (Exercise 3.2), so ULA on a target with smallest covariance eigenvalue lambda_min
# is stable only for eps < 4 lambda_min.
#
# ## 2.4 MALA: a Metropolis-Hastings correction removes the bias
#
# Treat the ULA update as a *proposal* x' ~ q(. | x) with
#
# $$ q(x' \mid x) = N\big(x';\ x + \tfrac{\epsilon}{2} s(x),\ \epsilon I\big), $$
#
# and accept it with probability
#
# $$ \alpha(x, x') = \min\Big(1, \frac{p(x')\, q(x \mid x')}{p(x)\, q(x' \mid x)}\Big), $$
#
# otherwise stay at x. The transition law K(x, .) is then: move to x' with density
# q(x'|x) alpha(x, x'), or stay at x with the rejected mass r(x) = 1 - int q(y|x) alpha(x, y) dy.
#
# *Detailed balance for the moves.* p(x) q(x'|x) alpha(x, x') = min(p(x) q(x'|x), p(x') q(x|x'))
# is symmetric in (x, x').
#
# *Invariance.* Start from x ~ p and ask for the density at x' after one step: chains that moved
# to x' plus chains that were at x' and stayed,
#
# $$ \int p(x)\, q(x'|x)\, \alpha(x, x')\, dx + p(x')\, r(x')
#    = p(x') \int q(x|x')\, \alpha(x', x)\, dx + p(x')\, r(x')
#    = p(x')\,(1 - r(x')) + p(x')\, r(x') = p(x'), $$
#
# using detailed balance in the first step. So p is exactly invariant, whatever eps is;
# rejections are not a nuisance but the term that makes the books balance. The price: MALA needs
# log p up to a constant (not just the score), and large steps get rejected.
#
# The q-ratio matters: the proposal is not symmetric, q(x'|x) != q(x|x'), and with the plain
# Metropolis test min(1, p(x')/p(x)) the symmetry above fails. Section 4.1 runs that broken
# sampler on N(0, 1) and measures a stationary variance visibly different from 1.
#
# **Why this matters for score-based models.** A score network gives s_theta(x) and nothing
# else: there is no log p to put in the acceptance ratio, so MALA is not available. What
# practitioners run is ULA (and, from module 07, its annealed version), accepting an O(eps)
# bias that they control through the step size. That is why this module measures that bias
# so carefully.
#
# ## 2.5 Fokker-Planck on a grid (optional: how the grid is solved)
#
# Beginners can skip to Section 2.6: all later sections need is that the grid gives the exact
# density p_t of the diffusion, up to small errors that Section 4.4 measures.
#
# In 1D write the equation as a conservation law: d p / dt = -dJ/dx with probability flux
# J = (1/2) s p - (1/2) dp/dx. Split [x_lo, x_hi] into cells of width h with cell densities
# p_i, and take at the face between cells i and i+1 (where the score is s_f)
#
# $$ J_{i+1/2} = \tfrac12 s_f\, \frac{p_i + p_{i+1}}{2} - \tfrac12\, \frac{p_{i+1} - p_i}{h},
#    \qquad \frac{dp_i}{dt} = \frac{J_{i-1/2} - J_{i+1/2}}{h}, $$
#
# with J = 0 at both ends (no mass leaves). This is a linear system dp/dt = L p, with L
# tridiagonal. Backward Euler, (I - dt L) p^{n+1} = p^n, is stable for any dt, conserves
# sum_i p_i h exactly, and keeps p >= 0 when the cell Peclet number (drift b = s/2 times h over
# the diffusion coefficient D = 1/2), Pe = |s_f| h, is below 2.
# Its stationary solution has zero flux through every face:
#
# $$ \frac{p_{i+1}}{p_i} = \frac{1 + s_f h/2}{1 - s_f h/2} = e^{s_f h + O(h^3)}, $$
#
# which matches log p(x_{i+1}) - log p(x_i) = integral of s to O(h^3) per cell: the grid's
# stationary density converges to p at rate O(h^2). The time stepping adds an O(dt) error.
#
# ## 2.6 Why well-separated modes break Langevin
#
# For a mixture p = sum_k w_k p_k the score is s(x) = sum_k r_k(x) s_k(x) with
# r_k = w_k p_k / p. For unit covariances (as here), deep inside mode k the responsibility r_k
# is 1 to within exp(-|mu_j - mu_k|^2 / 2) (about e^-100 for the modes at (-5,-5) and (5,5)),
# so the score there is the same whether the weights are 0.8/0.2 or 0.2/0.8. A chain that
# starts in the basin of a mode relaxes inside it and almost never crosses the low-density gap.
# Call the *barrier* the drop in log p from a mode to the saddle point between the modes (for
# unit covariances about |mu_1 - mu_2|^2 / 8 = 25 nats from the heavy mode, since the saddle is
# 5 sqrt(2) from each mode). The mean time to cross grows like exp(barrier) (Kramers' law):
# about e^25 ~ 1e11 time units, or ~1e12 ULA steps at eps = 0.1, against the 500 we run. The
# crossing that would fix the weights, light -> heavy, starts ln(0.8/0.2) = 1.4 nats lower and
# faces ~23.6 nats: e^23.6 ~ 2e10 time units, and the conclusion is the same. The fraction of
# chains in each mode therefore stays the fraction that *started* in its basin, not w_k.
# Annealing the noise level (module 07) fixes this: at large noise the modes overlap and the
# score does see the weights.

# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 The Langevin step and the ULA sampler

# %%
def _check_step_size(step_size, n_chains: int) -> None:
    eps = torch.as_tensor(step_size, dtype=torch.float64)  # float64: 1e-300 must not underflow
    if eps.ndim > 1 or (eps.ndim == 1 and len(eps) != n_chains):
        raise ValueError(f"step_size must be a number or one value per chain ({n_chains},), "
                         f"got shape {tuple(eps.shape)}")
    if not bool((eps > 0).all()) or not bool(torch.isfinite(eps).all()):
        raise ValueError(f"step_size must be positive and finite, got {step_size}")


def _normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """z ~ N(0, I) with the shape of x, drawn on the generator's device, then moved to x's."""
    where = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)


def langevin_step(x: Tensor, score: Tensor, step_size, generator: torch.Generator | None = None,
                  noise: Tensor | None = None) -> Tensor:
    """One Langevin update x' = x + (eps/2) s(x) + sqrt(eps) z,  z ~ N(0, I).

    Args:
        x: (N, ...) current states of N independent chains.
        score: (N, ...) the score s(x) already evaluated at x (so a caller can pass s(x, sigma)).
        step_size: eps, a number or a tensor (N,) with one value per chain.
        generator: torch.Generator for z (ignored when ``noise`` is given).
        noise: optional z (N, ...) to make the step deterministic (tests, exercises).
    Returns:
        x' with the shape of x.
    """
    eps = expand_to(step_size, x)  # a number or (N,) -> broadcasts against x (N, ...)
    z = _normal_like(x, generator) if noise is None else noise
    # drift (eps/2) s(x): half a gradient-ascent step on log p; then sqrt(eps) z of noise
    return x + 0.5 * eps * score + eps.sqrt() * z


def langevin(score_fn: ScoreFn, x0: Tensor, step_size, n_steps: int,
             generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """The unadjusted Langevin algorithm (ULA): yields x_1, ..., x_n (x0 itself is not yielded).

    x_{k+1} = x_k + (eps/2) score_fn(x_k) + sqrt(eps) z_k for N independent chains at once.
    Use ``*_, x = langevin(...)`` for the last state, ``torch.stack(list(langevin(...)))`` for
    the trajectory (n_steps, N, ...).

    Args:
        score_fn: x (N, ...) -> s(x) (N, ...).
        x0: (N, ...) initial states.
        step_size: eps, a number or (N,) (one step size per chain, e.g. for a sweep).
        n_steps: number of updates (>= 0).
    """
    _check_step_size(step_size, len(x0))
    x = x0
    for _ in range(n_steps):
        x = langevin_step(x, score_fn(x), step_size, generator)
        yield x


def ula_stationary_variance(variance: float, step_size: float) -> float:
    """v_eps = v / (1 - eps/(4v)): ULA's stationary variance on the 1D Gaussian N(m, v).

    The fixed point of Var_{k+1} = a^2 Var_k + eps with a = 1 - eps/(2v); it exists for
    0 < eps < 4v (|a| < 1). For small eps, v_eps = v + eps/4 + O(eps^2).
    """
    if not 0 < step_size < 4 * variance:
        raise ValueError(f"ULA on N(m, {variance}) is stable only for 0 < eps < {4 * variance}, "
                         f"got eps = {step_size}")
    return variance / (1.0 - step_size / (4.0 * variance))


def ula_stability_limit(target: GaussianMixture) -> float:
    """4 lambda_min, lambda_min the smallest eigenvalue of any component covariance C_k.

    The Hessian of log p of a mixture is sum_k r_k (-C_k^{-1}) plus a covariance of the
    component scores (positive semi-definite), so the curvature of -log p never exceeds
    1/lambda_min. Below 4 lambda_min no direction overshoots: the local factor a = 1 - eps c/2
    of Section 2.3 stays above -1 for every curvature c <= 1/lambda_min (between modes, where
    log p can be locally convex, a > 1 and the chain is pushed away, which is fine). Above it,
    chains in the stiffest component oscillate with growing amplitude and diverge.
    """
    return 4.0 * torch.linalg.eigvalsh(target.covs).min().item()


# %% [markdown]
# ## 3.2 MALA: the Langevin proposal with a Metropolis-Hastings test
#
# The proposal density and the acceptance probability are small functions of their own, so the
# tests can check detailed balance directly. MALA evaluates log p and s once per step, at the
# proposal; the values at the current state are carried over from the previous step.

# %%
def log_proposal(x_to: Tensor, x_from: Tensor, score_from: Tensor, step_size) -> Tensor:
    """log q(x_to | x_from) = log N(x_to; x_from + (eps/2) s(x_from), eps I), shape (N,).

    Args:
        x_to, x_from, score_from: (N, ...); score_from = s(x_from).
        step_size: eps, a number or (N,).
    """
    eps = expand_to(step_size, x_to)
    mean = x_from + 0.5 * eps * score_from  # the ULA drift from x_from
    d = x_to[0].numel()  # dimension of one state
    # -|x_to - mean|^2 / (2 eps) - (d/2) log(2 pi eps), summed over all but the chain axis
    sq = ((x_to - mean).square() / eps).flatten(1).sum(1)
    return -0.5 * sq - 0.5 * d * torch.log(2 * math.pi * eps).reshape(-1)


def mala_log_acceptance(x: Tensor, proposal: Tensor, log_p: Tensor, log_p_proposal: Tensor,
                        score: Tensor, score_proposal: Tensor, step_size,
                        q_ratio: bool = True) -> Tensor:
    """log alpha = min(0, log p(x') + log q(x | x') - log p(x) - log q(x' | x)), shape (N,).

    Args:
        x, proposal: (N, ...) current states and proposals x'.
        log_p, log_p_proposal: (N,) log p (any additive constant cancels) at x and x'.
        score, score_proposal: (N, ...) s(x) and s(x').
        step_size: eps, a number or (N,).
        q_ratio: False drops the proposal ratio (the plain Metropolis test min(1, p(x')/p(x)));
            this is WRONG for the asymmetric Langevin proposal and exists only to show that
            the resulting chain does not sample p (Section 4.1).
    """
    if not q_ratio:
        return (log_p_proposal - log_p).clamp(max=0.0)
    forward = log_p + log_proposal(proposal, x, score, step_size)  # log p(x) q(x'|x)
    backward = log_p_proposal + log_proposal(x, proposal, score_proposal, step_size)
    return (backward - forward).clamp(max=0.0)


def mala(log_prob_fn: LogProbFn, score_fn: ScoreFn, x0: Tensor, step_size, n_steps: int,
         generator: torch.Generator | None = None,
         q_ratio: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """Metropolis-adjusted Langevin: yields (x_k, accepted_k) for k = 1..n_steps.

    Each step proposes x' = x + (eps/2) s(x) + sqrt(eps) z and accepts it with probability
    alpha(x, x') (``mala_log_acceptance``); a rejected chain stays where it is.

    Args:
        log_prob_fn: x (N, ...) -> log p(x) up to a constant, (N,).
        score_fn: x (N, ...) -> grad log p(x), (N, ...).
        x0: (N, ...) initial states; step_size: a number or (N,).
        q_ratio: keep True; False is the broken sampler of Section 4.1 (no proposal ratio).
    Yields:
        x (N, ...) the states after the step, and accepted (N,) bool.
    """
    _check_step_size(step_size, len(x0))
    x = x0
    log_p, score = log_prob_fn(x), score_fn(x)
    for _ in range(n_steps):
        proposal = langevin_step(x, score, step_size, generator)  # x' ~ q(. | x)
        log_p_new, score_new = log_prob_fn(proposal), score_fn(proposal)
        log_alpha = mala_log_acceptance(x, proposal, log_p, log_p_new, score, score_new,
                                        step_size, q_ratio)
        u = torch.rand(len(x), generator=generator, dtype=x.dtype,
                       device=generator.device if generator is not None else x.device)
        accepted = u.to(x.device).log() < log_alpha  # accept with probability alpha
        keep = accepted.reshape((-1,) + (1,) * (x.ndim - 1))
        x = torch.where(keep, proposal, x)
        log_p = torch.where(accepted, log_p_new, log_p)
        score = torch.where(keep, score_new, score)
        yield x, accepted


def mala_sample(log_prob_fn: LogProbFn, score_fn: ScoreFn, x0: Tensor, step_size, n_steps: int,
                generator: torch.Generator | None = None,
                q_ratio: bool = True) -> tuple[Tensor, Tensor]:
    """Run MALA for n_steps >= 1; return the final states (N, ...) and each chain's acceptance
    rate (N,) (the fraction of its proposals that were accepted). q_ratio as in ``mala``."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    n_accepted = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    x = x0
    for state in mala(log_prob_fn, score_fn, x0, step_size, n_steps, generator, q_ratio):
        x, accepted = state
        n_accepted += accepted
    return x, n_accepted / n_steps


# %% [markdown]
# ## 3.3 The 1D Fokker-Planck equation on a grid (optional: how the grid is solved)
#
# Beginners can skip this section: `fokker_planck_1d` yields the density p_t on the grid, and
# that is all Section 4.4 uses. The operator L of Section 2.5 is tridiagonal; we store it in
# the banded layout of `scipy.linalg.solve_banded` (row 0: super-diagonal, row 1: diagonal,
# row 2: sub-diagonal). The solver is a generator like the samplers, yielding the grid density
# after every step.

# %%
@dataclass
class Grid1D:
    """A uniform grid of n cells on [lo, hi]: edges (n+1,), centres (n,), width h."""

    edges: np.ndarray
    centres: np.ndarray
    h: float

    @classmethod
    def uniform(cls, lo: float, hi: float, n: int) -> "Grid1D":
        edges = np.linspace(lo, hi, n + 1)
        return cls(edges, 0.5 * (edges[1:] + edges[:-1]), float(edges[1] - edges[0]))


def _score_numpy(score_fn: ScoreFn, x: np.ndarray) -> np.ndarray:
    """Evaluate a torch score function (N, 1) -> (N, 1) at 1D numpy points, as a numpy array."""
    with torch.no_grad():
        return score_fn(torch.as_tensor(x, dtype=DTYPE)[:, None])[:, 0].cpu().numpy()


def fokker_planck_operator(score_fn: ScoreFn, grid: Grid1D) -> np.ndarray:
    """L of dp/dt = L p for dp/dt = -d/dx((1/2) s p) + (1/2) d^2p/dx^2, banded (3, n).

    Central flux through the interior face f between cells i and i+1:
        J_f = (1/2) s_f (p_i + p_{i+1}) / 2 - (1/2) (p_{i+1} - p_i) / h,
    zero flux at both ends, and dp_i/dt = (J_{i-1/2} - J_{i+1/2}) / h.
    Raises if the cell Peclet number Pe = |b| h / D = |s_f| h reaches 2: beyond it the
    off-diagonal entries of L turn negative and p >= 0 would be lost.
    """
    h = grid.h
    s_face = _score_numpy(score_fn, grid.edges[1:-1])  # (n-1,) score at interior faces
    peclet = np.abs(s_face).max() * h
    if peclet >= 2:
        raise ValueError(f"grid too coarse: cell Peclet number |s| h = {peclet:.2f} >= 2; "
                         f"use more cells or a smaller interval")
    drift, diffusion = 0.5 * s_face, 0.5  # b = s/2 and D = 1/2 of the Langevin diffusion
    from_left = drift / 2 + diffusion / h  # J_f = from_left * p_i + from_right * p_{i+1}
    from_right = drift / 2 - diffusion / h
    n = len(grid.centres)
    banded = np.zeros((3, n))
    banded[0, 1:] = -from_right / h  # L[i, i+1]: cell i loses J_f through its right face
    banded[2, :-1] = from_left / h  # L[i+1, i]: cell i+1 gains J_f through its left face
    banded[1, :-1] -= from_left / h  # L[i, i]: p_i's own outflow to the right ...
    banded[1, 1:] += from_right / h  # ... and to the left (from_right < 0)
    return banded


def fokker_planck_1d(score_fn: ScoreFn, grid: Grid1D, p0: np.ndarray, dt: float,
                     n_steps: int) -> Iterator[np.ndarray]:
    """Backward-Euler steps (I - dt L) p^{n+1} = p^n of the Langevin Fokker-Planck equation.

    Args:
        score_fn: the target's score, x (N, 1) -> (N, 1).
        grid: the cells; p0: (n,) initial density at the cell centres (normalised here so that
            sum p h = 1).
        dt: time step (any dt > 0 is stable; the time error is O(dt)).
    Yields:
        p (n,) at times dt, 2 dt, ..., n_steps dt.
    """
    system = -dt * fokker_planck_operator(score_fn, grid)  # banded form of -dt L ...
    system[1] += 1.0  # ... plus the identity
    p = np.asarray(p0, dtype=np.float64) / (np.sum(p0) * grid.h)
    for _ in range(n_steps):
        p = solve_banded((1, 1), system, p)
        yield p


def spectral_gap(banded: np.ndarray) -> float:
    """-lambda_2, the slowest decay rate of dp/dt = L p (lambda_1 = 0 belongs to p itself).

    p_t - p = sum_{j>=2} c_j e^{lambda_j t} phi_j, so late in the run the distance to p decays
    like e^{-gap t}. (Optional detail, why a symmetric eigensolver is allowed: rescaling the
    cells by sqrt(p_i), D^{-1} L D with D = diag(sqrt(p_i)), gives the symmetric tridiagonal
    matrix with the same diagonal and off-diagonals sqrt(L[i, i+1] L[i+1, i]) (both are
    positive), so L's eigenvalues are real and eigh_tridiagonal finds them.)
    """
    off = np.sqrt(banded[0, 1:] * banded[2, :-1])
    top_two = eigh_tridiagonal(banded[1], off, eigvals_only=True, select="i",
                               select_range=(len(off) - 1, len(off)))
    return float(-top_two[0])


def ou_marginal(mean: float, variance: float, mean0: float, variance0: float, t: float):
    """(mean_t, variance_t) of dx = (1/2) s dt + dW for p = N(mean, variance), x_0 ~ N(mean0,
    variance0): mean + (mean0 - mean) e^{-t/(2v)} and v + (variance0 - v) e^{-t/v}."""
    return (mean + (mean0 - mean) * math.exp(-t / (2 * variance)),
            variance + (variance0 - variance) * math.exp(-t / variance))


def fokker_planck_ou_error(grid_cells: int, dt: float = 1e-3, t: float = 1.0) -> float:
    """L1 distance at time t between the grid solution and the exact Gaussian p_t.

    Target N(0.5, 0.8), start N(-2, 0.1), grid of ``grid_cells`` cells on [-7, 7]. The error is
    O(h^2 + dt); with the wrong diffusion coefficient (1 instead of 1/2) it would be O(1).
    """
    m, v, m0, v0 = 0.5, 0.8, -2.0, 0.1
    grid = Grid1D.uniform(-7.0, 7.0, grid_cells)
    p0 = stats.norm.pdf(grid.centres, m0, math.sqrt(v0))
    *_, p_t = fokker_planck_1d(lambda x: -(x - m) / v, grid, p0, dt, round(t / dt))
    mean_t, var_t = ou_marginal(m, v, m0, v0, t)
    return float(np.abs(p_t - stats.norm.pdf(grid.centres, mean_t, math.sqrt(var_t))).sum()
                 * grid.h)


# %% [markdown]
# ## 3.4 Measuring samples against the target
#
# In 1D we can compare a histogram with the exact bin probabilities (a chi-square test); in 2D
# we use the sliced Wasserstein distance from common/metrics and read mode weights from the
# responsibilities.
#
# *Sliced Wasserstein distance* (SW): project both samples onto a random unit direction, sort
# each set of 1D projections, and average the squared gaps between the i-th smallest of one and
# the i-th smallest of the other (the 1D optimal matching); average this over many directions
# and take the square root. It is in units of x (how far mass must move, roughly) and is 0 only
# for identical samples. Two independent samples of the same law are not at 0: with 2000
# samples each, this 2D target gives about 0.05 (the "floor" the module measures in 4.3).

# %%
def mixture_cdf_1d(target: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """F(x) = sum_k w_k Phi((x - mu_k) / sigma_k) for a 1D Gaussian mixture; x: any shape."""
    w = target.weights.numpy()
    mu = target.means[:, 0].numpy()
    sd = target.covs[:, 0, 0].sqrt().numpy()
    return (w * stats.norm.cdf((np.asarray(x)[..., None] - mu) / sd)).sum(-1)


def chi_square_test(samples: Tensor, cdf: Callable[[np.ndarray], np.ndarray],
                    edges: np.ndarray) -> tuple[float, int, float]:
    """Pearson's chi-square test of 1D samples (N,) against a CDF.

    Bins are the intervals between ``edges`` plus the two tails (-inf, e_0) and (e_last, inf);
    expected counts are N (F(b) - F(a)). Returns (statistic, degrees of freedom, p-value);
    a p-value below, say, 1e-3 says the samples do not come from the CDF's law.
    """
    x = samples.detach().cpu().double().numpy().ravel()
    full = np.concatenate([[-np.inf], edges, [np.inf]])
    observed = np.histogram(x, bins=full)[0]
    expected = len(x) * np.diff(cdf(full))
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1  # the counts sum to N: one constraint
    return statistic, dof, float(stats.chi2.sf(statistic, dof))


def mode_fractions(samples: Tensor, target: GaussianMixture) -> Tensor:
    """Fraction of samples (N, D) whose most responsible component is k, shape (K,)."""
    k = target.responsibilities(samples).argmax(dim=1)
    return torch.bincount(k, minlength=target.n_components).double() / len(samples)


def mode_spread(samples: Tensor, target: GaussianMixture) -> tuple[float, float]:
    """Mean squared distance per coordinate to the mean of the most responsible component.

    spread = mean_i |x_i - mu_{k(x_i)}|^2 / D with k(x) = argmax_k r_k(x), and its standard
    error (sd of the per-sample terms / sqrt(N)). For well-separated Gaussian components it is
    the average component variance; ULA at step eps widens it (roughly eps/4 per coordinate to
    first order, Section 2.3), a shift that the sliced Wasserstein distance, dominated by where
    the modes are, barely resolves. samples (N, D) -> (spread, standard error).
    """
    k = target.responsibilities(samples).argmax(dim=1)
    terms = (samples - target.means[k].to(samples)).square().mean(dim=1)  # (N,)
    return terms.mean().item(), (terms.std() / math.sqrt(len(terms))).item()


def distance_to(samples: Tensor, reference: Tensor) -> float:
    """Sliced Wasserstein-2 distance with 64 fixed directions (the same for every call).

    64 random directions resolve a 2D distribution well; keeping them fixed makes the numbers
    of different samplers differ only through the samples. samples (N, D), reference (M, D).
    """
    return sliced_wasserstein(samples, reference, 64, torch.Generator().manual_seed(0))


# %% [markdown]
# ## 3.5 The targets
#
# A 2D mixture of three Gaussians (one with correlated coordinates) that overlap enough for
# Langevin to move between them in a few time units, a 1D two-mode mixture for the
# Fokker-Planck picture, and the 0.8/0.2 separated modes from common.datasets.

# %%
def mixture_2d() -> GaussianMixture:
    """Three overlapping components, weights 0.5/0.3/0.2; ULA stability limit 4 * 0.30 = 1.2."""
    covs = [[[0.35, 0.0], [0.0, 0.35]], [[0.4, 0.12], [0.12, 0.45]], [[0.5, 0.0], [0.0, 0.3]]]
    return GaussianMixture([0.5, 0.3, 0.2], [[-1.2, -0.7], [1.2, -0.5], [0.2, 1.3]], covs)


def mixture_1d() -> GaussianMixture:
    """0.35 N(-1, 0.45^2) + 0.65 N(1, 0.6^2): two modes joined by a valley (28% of the peak)."""
    return GaussianMixture.isotropic([0.35, 0.65], [[-1.0], [1.0]], torch.tensor([0.45, 0.6]))


def _progress(iterable, total: int, desc: str):
    return progress(iterable, total=total, desc=desc, leave=False)


def _p_value(p: float) -> str:
    """A p-value for reading: 'p < 1e-12' rather than an underflowed 0.0e+00."""
    return "p < 1e-12" if p < 1e-12 else f"p = {p:.2g}"


# %% [markdown]
# # Section 4: Examples and visualization
#
# ## 4.1 ULA's bias on a 1D Gaussian, and MALA without it
#
# All chains start at x = 0 and run `bias_steps` steps, one block of chains per step size
# (a single batched call, since the step size may differ per chain). The start is forgotten
# geometrically, by a factor a^2 per step (how fast exactly is Exercise 3.1); after 200 steps
# the remainder is below 1e-4 for every step size here. We compare the measured variance with
# the closed form v / (1 - eps/(4v)) and with the true v, and run MALA with the same steps.
# At eps = 0.05 the bias (0.013) is about one standard error of a variance from 20,000 chains,
# so that point cannot tell ULA from the truth; from eps = 0.2 on the bias is resolved.
#
# Third sampler: "MALA" with the plain Metropolis test min(1, p(x')/p(x)), i.e. without the
# q-ratio (Section 2.4). It accepts and rejects like MALA, but its variance is about v/2, not
# v: for small eps a Metropolis test with a small random-walk proposal already acts like the
# drift (eps/2) s, so with the Langevin proposal the drift is counted twice and the chain
# samples roughly p^2 = N(0, v/2). Detailed balance, not just "having an accept/reject step",
# is what makes p invariant.

# %% tags=["active-ipynb"]
# # Notebook only (in the script, main() does this): QUICK = True runs the demos below at
# # --quick sizes, in seconds; False at the script's full size. Each demo's cell follows the
# # cell that defines it.
# from common.notebook import notebook_run
#
# QUICK = True
# run = notebook_run(make_parser(), MODULE, QUICK)
# cfg = Config.quick() if run.quick else Config()
# target = mixture_2d()


# %%
def demo_stationary_variance(run, cfg: Config) -> dict:
    v, n = cfg.variance, cfg.bias_chains
    steps = torch.tensor(cfg.bias_step_sizes, dtype=DTYPE)
    eps = steps.repeat_interleave(n)  # (len(steps) * n,): one step size per chain
    x0 = torch.zeros(len(eps), 1, dtype=DTYPE)

    def score(x):  # s(x) = -(x - m)/v with m = 0
        return -x / v

    def log_prob(x):  # log N(x; 0, v) up to a constant
        return -0.5 * x[:, 0].square() / v

    *_, x_ula = _progress(langevin(score, x0, eps, cfg.bias_steps, run.generator),
                          cfg.bias_steps, "ULA, 1D Gaussian")
    x_mala, acc = mala_sample(log_prob, score, x0, eps, cfg.bias_steps, run.generator)
    x_naive, _ = mala_sample(log_prob, score, x0, eps, cfg.bias_steps, run.generator,
                             q_ratio=False)  # the broken sampler: no proposal ratio

    rows = []
    for i, e in enumerate(cfg.bias_step_sizes):
        block = slice(i * n, (i + 1) * n)
        var_ula, var_mala = x_ula[block].var().item(), x_mala[block].var().item()
        var_naive = x_naive[block].var().item()
        rows.append(dict(step_size=e, ula=var_ula, mala=var_mala, naive=var_naive,
                         se_naive=var_naive * math.sqrt(2 / (n - 1)),
                         closed_form=ula_stationary_variance(v, e),
                         # standard error of a Gaussian sample variance: var * sqrt(2/(n-1))
                         se=var_ula * math.sqrt(2 / (n - 1)),
                         se_mala=var_mala * math.sqrt(2 / (n - 1)),
                         acceptance=acc[block].mean().item()))
    # Histogram test at the largest step: ULA's law is N(0, v_eps), MALA's is N(0, v).
    last = slice((len(steps) - 1) * n, len(steps) * n)
    edges = np.linspace(-3, 3, 25) * math.sqrt(v)
    cdf = stats.norm(scale=math.sqrt(v)).cdf
    p_ula = chi_square_test(x_ula[last], cdf, edges)[2]
    p_mala = chi_square_test(x_mala[last], cdf, edges)[2]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.linspace(0.0, max(cfg.bias_step_sizes) * 1.05, 200)
    ax1.plot(grid, v / (1 - grid / (4 * v)), color="tab:blue",
             label="closed form $v/(1-\\epsilon/4v)$")
    ax1.plot(grid, v + grid / 4, color="tab:blue", ls=":", label="first order $v + \\epsilon/4$")
    ax1.axhline(v, color="k", lw=1, ls="--", label="true variance $v$")
    ax1.errorbar([r["step_size"] for r in rows], [r["ula"] for r in rows],
                 yerr=[2 * r["se"] for r in rows], fmt="o", color="tab:red", capsize=3,
                 label="ULA measured (+-2 s.e.)")
    ax1.errorbar([r["step_size"] for r in rows], [r["mala"] for r in rows],
                 yerr=[2 * r["se_mala"] for r in rows], fmt="s", color="tab:green", capsize=3,
                 label="MALA measured (+-2 s.e.)")
    ax1.errorbar([r["step_size"] for r in rows], [r["naive"] for r in rows],
                 yerr=[2 * r["se_naive"] for r in rows], fmt="^", color="tab:purple", capsize=3,
                 label="MALA without q-ratio (wrong)")
    ax1.set(xlabel="step size $\\epsilon$", ylabel="stationary variance",
            title=f"ULA's O($\\epsilon$) bias on N(0, {v:g}) ({n:,} chains each)")
    ax1.legend(fontsize=8)
    e = cfg.bias_step_sizes[-1]
    xs = np.linspace(-4.5, 4.5, 300) * math.sqrt(v)
    bins = np.linspace(-4.5, 4.5, 61) * math.sqrt(v)
    ax2.hist(x_ula[last, 0].numpy(), bins=bins, density=True, histtype="step", lw=1.5,
             color="tab:red", label=f"ULA histogram (chi-square {_p_value(p_ula)})")
    ax2.hist(x_mala[last, 0].numpy(), bins=bins, density=True, histtype="step", lw=1.5,
             color="tab:green", label=f"MALA histogram (chi-square {_p_value(p_mala)})")
    ax2.plot(xs, stats.norm.pdf(xs, scale=math.sqrt(v)), "k--", label="target N(0, v)")
    ax2.plot(xs, stats.norm.pdf(xs, scale=math.sqrt(ula_stationary_variance(v, e))),
             color="tab:red", ls=":", lw=2, label="ULA's stationary law $N(0, v_\\epsilon)$")
    ax2.set(xlabel="x", ylabel="density", title=f"Histograms at $\\epsilon$ = {e:g}")
    ax2.legend(loc="upper left", fontsize=8)
    run.save(fig, "ula_bias_1d_gaussian")
    return dict(rows=rows, p_ula=p_ula, p_mala=p_mala)


# %% tags=["active-ipynb"]
# bias = demo_stationary_variance(run, cfg)


# %% [markdown]
# ## 4.2 Langevin on a 2D mixture: trajectories and samples
#
# Left: a few ULA chains with a small step, started far out, follow the score arrows (which
# point uphill in log p) into the modes; in 150 steps they mostly settle in one mode, and
# only occasionally wander to a neighbour. Middle and right: `chains_2d` chains started from a broad
# Gaussian N(0, 2^2 I) after `max_steps_2d` steps with the large step size, ULA against MALA.
# ULA's stationary law is p_eps, not p: each mode is wider. The first-order rule of Section 2.3
# suggests about +eps/4 = +0.10 per coordinate at eps = 0.4, but only as a rough guide: the
# component variances here are 0.3-0.55, so eps/(4v) is not small, and the exact formula
# v / (1 - eps/(4v)) - v, applied to each component on its own, gives +0.12 to +0.15; the
# components overlap, so the mixture has no closed form, and we simply measure. The
# sliced Wasserstein distance is dominated by where the modes sit and resolves this only
# weakly with a few thousand samples, so the titles report a statistic aimed at the bias: the
# *spread*, the mean squared distance per coordinate to the nearest component mean
# (`mode_spread`), against its exact value from 200,000 exact samples. Along the way we record
# the distance to the target at a few checkpoints (for ULA also at the small step size);
# Section 4.3 plots these curves. All distances of Sections 4.2-4.3 use one shared reference
# sample, so their sampling noise is correlated: compare curves with each other and with the
# floor band, which uses the same reference.

# %%
def demo_samples_2d(run, cfg: Config, target: GaussianMixture) -> dict:
    n, small, large = cfg.chains_2d, cfg.small_step_2d, cfg.step_size_2d
    lim = (-3.5, 3.5)
    starts = 3.0 * torch.tensor([[-1, 1], [1, 1], [1, -1], [-1, -1]], dtype=DTYPE)
    path = torch.stack([starts, *langevin(target.score, starts, small, cfg.trajectory_steps,
                                          run.generator)])  # (steps + 1, 4, 2)
    reference = target.sample(n, run.generator, dtype=DTYPE)
    checkpoints = [k for k in (1, 3, 10, 30, 100, 300, 1000, 3000) if k < cfg.max_steps_2d]
    checkpoints.append(cfg.max_steps_2d)
    curves = {"ula_small": [], "ula_large": [], "mala_large": []}
    x0 = 2.0 * torch.randn(n, 2, generator=run.generator, dtype=DTYPE)
    # ULA at the small and the large step size in one batch: the first n chains use `small`
    eps = torch.tensor([small, large], dtype=DTYPE).repeat_interleave(n)
    chains = langevin(target.score, x0.repeat(2, 1), eps, cfg.max_steps_2d, run.generator)
    for k, x in enumerate(_progress(chains, cfg.max_steps_2d, "ULA, 2D"), start=1):
        if k in checkpoints:
            curves["ula_small"].append(distance_to(x[:n], reference))
            curves["ula_large"].append(distance_to(x[n:], reference))
    x_ula = x[n:]
    n_accepted = torch.zeros(n, dtype=DTYPE)
    chains = mala(target.log_prob, target.score, x0, large, cfg.max_steps_2d, run.generator)
    for k, (x_mala, accepted) in enumerate(_progress(chains, cfg.max_steps_2d, "MALA, 2D"),
                                           start=1):
        n_accepted += accepted
        if k in checkpoints:
            curves["mala_large"].append(distance_to(x_mala, reference))
    acceptance = (n_accepted / cfg.max_steps_2d).mean().item()
    d_ula, d_mala = curves["ula_large"][-1], curves["mala_large"][-1]
    # the bias statistic: spread around the nearest component mean, vs its exact value
    big = torch.Generator().manual_seed(0)  # fixed: the exact value is a constant of the target
    spread_exact = mode_spread(target.sample(200_000, big, dtype=DTYPE), target)[0]
    spread_ula, se_ula = mode_spread(x_ula, target)
    spread_mala, se_mala = mode_spread(x_mala, target)
    verdict = "too wide" if spread_ula - spread_exact > 3 * se_ula else "not resolved"

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    plotting.plot_density(axes[0], target.log_prob, lim, lim)
    plotting.plot_score_field(axes[0], target.score, lim, lim, n_arrows=15, color="0.35")
    for i in range(len(starts)):
        c = f"C{i + 1}"
        axes[0].plot(path[:, i, 0], path[:, i, 1], color=c, lw=0.8, alpha=0.9)
        axes[0].plot(*path[0, i], "o", color=c, ms=6, mec="k", label="start" if i == 0 else None)
        axes[0].plot(*path[-1, i], "*", color=c, ms=12, mec="k", label="end" if i == 0 else None)
    axes[0].legend(loc="upper center", ncol=2, fontsize=9)
    axes[0].set_title(f"ULA trajectories, $\\epsilon$ = {small:g}, {cfg.trajectory_steps} steps")
    style = dict(xlim=lim, ylim=lim, size=3.0, alpha=0.5)
    plotting.plot_samples_over_density(
        axes[1], x_ula, target.log_prob, color="tab:red", label=f"{n:,} ULA samples",
        title=f"ULA, $\\epsilon$ = {large:g}: spread {spread_ula:.3f} $\\pm$ {se_ula:.3f} "
              f"({verdict})\nexact spread {spread_exact:.3f}; SW = {d_ula:.3f}", **style)
    plotting.plot_samples_over_density(
        axes[2], x_mala, target.log_prob, color="tab:green", label=f"{n:,} MALA samples",
        title=f"MALA, $\\epsilon$ = {large:g}: spread {spread_mala:.3f} $\\pm$ {se_mala:.3f}"
              f"\naccepts {acceptance:.2f}; SW = {d_mala:.3f}", **style)
    for ax in axes[1:]:
        ax.legend(loc="lower right", markerscale=4)
    run.save(fig, "samples_2d_mixture")
    return dict(checkpoints=checkpoints, acceptance=acceptance, reference=reference,
                spread_exact=spread_exact, spread_ula=(spread_ula, se_ula),
                spread_mala=(spread_mala, se_mala), **curves)


# %% tags=["active-ipynb"]
# samples = demo_samples_2d(run, cfg, target)


# %% [markdown]
# ## 4.3 Distance to the target against step size and number of steps
#
# Left: after a fixed number of steps from the broad start, small steps have not arrived yet
# (the chain has covered a time of only n eps), large steps arrive quickly but ULA settles on
# its biased p_eps: the best ULA step size is a compromise. MALA is unbiased, so once it has
# arrived (eps >= 0.1) it stays at or near the noise band over the rest of the sweep (up to
# eps = 0.9, where it still accepts about 60% of its proposals). The grey band is the spread
# of the distance between independent target samples and the shared reference: differences
# inside it are sampling noise.
# Middle (the curves recorded in 4.2):
# ULA with a small step converges slowly to almost the floor; with a large step it converges
# quickly to a plateau above it; MALA with the large step converges quickly to the floor.
# Right: MALA's acceptance rate falls as eps grows.

# %%
def demo_distance_sweeps(run, cfg: Config, target: GaussianMixture, curves: dict) -> dict:
    n, reference = cfg.chains_2d, curves["reference"]  # the reference of Section 4.2
    # The floor: distances between independent target samples of the same size. Its spread
    # is the sampling noise of every point in these plots.
    floors = [distance_to(target.sample(n, run.generator, dtype=DTYPE), reference)
              for _ in range(8)]
    floor, floor_sd = float(np.mean(floors)), float(np.std(floors, ddof=1))
    # one block of n chains per step size; one batched call per sampler
    sizes = torch.tensor(cfg.sweep_step_sizes, dtype=DTYPE)
    eps = sizes.repeat_interleave(n)
    x0 = 2.0 * torch.randn(len(eps), 2, generator=run.generator, dtype=DTYPE)
    *_, x_ula = _progress(langevin(target.score, x0, eps, cfg.sweep_steps, run.generator),
                          cfg.sweep_steps, "ULA step-size sweep")
    x_mala, acc = mala_sample(target.log_prob, target.score, x0, eps, cfg.sweep_steps,
                              run.generator)
    blocks = [slice(i * n, (i + 1) * n) for i in range(len(sizes))]
    sw_ula = [distance_to(x_ula[b], reference) for b in blocks]
    sw_mala = [distance_to(x_mala[b], reference) for b in blocks]
    acceptance = [acc[b].mean().item() for b in blocks]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), gridspec_kw=dict(width_ratios=[1, 1, 0.8]))
    ax = axes[0]
    ax.plot(cfg.sweep_step_sizes, sw_ula, "o-", color="tab:red", label="ULA")
    ax.plot(cfg.sweep_step_sizes, sw_mala, "s-", color="tab:green", label="MALA")
    _draw_floor(ax, floor, floor_sd)
    ax.set(xscale="log", yscale="log", xlabel="step size $\\epsilon$",
           ylabel="sliced Wasserstein distance to p",
           title=f"After {cfg.sweep_steps} steps ({n:,} chains per point)")
    ax.legend()
    ax = axes[1]
    small, large, ks = cfg.small_step_2d, cfg.step_size_2d, curves["checkpoints"]
    ax.plot(ks, curves["ula_small"], "o-", color="tab:orange", label=f"ULA $\\epsilon$={small:g}")
    ax.plot(ks, curves["ula_large"], "o-", color="tab:red", label=f"ULA $\\epsilon$={large:g}")
    ax.plot(ks, curves["mala_large"], "s-", color="tab:green",
            label=f"MALA $\\epsilon$={large:g}")
    _draw_floor(ax, floor, floor_sd)
    ax.set(xscale="log", yscale="log", xlabel="number of steps",
           ylabel="sliced Wasserstein distance to p", title="Against the number of steps")
    ax.legend()
    ax = axes[2]
    ax.plot(cfg.sweep_step_sizes, acceptance, "s-", color="tab:green")
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="step size $\\epsilon$",
           ylabel="fraction of proposals accepted", title="MALA acceptance rate")
    ax.grid(alpha=0.3)
    for ax in axes[:2]:  # plain numbers at 1, 2, 5 x 10^k on the log-scaled distance axes
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    run.save(fig, "distance_vs_step_size_and_steps")
    return dict(floor=floor, floor_sd=floor_sd, sw_ula=sw_ula, sw_mala=sw_mala,
                acceptance=acceptance)


def _draw_floor(ax, floor: float, sd: float) -> None:
    """Distance of independent target samples to the shared reference: mean and +-2 sd band."""
    ax.axhline(floor, color="k", ls="--", lw=1, label="floor: target sample vs reference")
    ax.axhspan(floor - 2 * sd, floor + 2 * sd, color="k", alpha=0.1, lw=0,
               label="floor +- 2 sd (sampling noise)")


# %% tags=["active-ipynb"]
# sweeps = demo_distance_sweeps(run, cfg, target, samples)


# %% [markdown]
# ## 4.4 The Fokker-Planck equation beside Langevin particles
#
# Start everything from p_0 = N(-3, 0.3^2), to the left of a two-mode 1D target. The grid
# density (backward Euler with 10 sub-steps of eps/10 per particle step) and the histogram of
# `particles` ULA chains with step size eps are drawn at the same times t = k eps. The
# sub-steps remove only the grid's time error: the particles keep their own O(eps) error (their
# law is not exactly p_t), and the "noise floor" (exact samples of p against p) is a guide
# to the sampling noise, not the exact noise of a histogram of p_t. So particles and grid agree
# up to a few hundredths in L1, not to the floor exactly (at t = 4 the gap is largest). Mass first
# slides into the nearer, lighter left mode within t ~ 1, then leaks over the valley into the
# heavier right mode on a slower time scale. Why a single exponential at late times: expand the
# start in the eigenvectors phi_j of the linear operator L (eigenvalues 0 = lambda_1 > lambda_2
# >= ...); each component evolves on its own,
#
# $$ p_t - p = \sum_{j\ge 2} c_j\, e^{\lambda_j t}\, \phi_j , $$
#
# and once the fast terms have died the slowest one, e^{lambda_2 t}, is all that is left. Its
# rate gap = -lambda_2 is the *spectral gap*: here the rate at which mass equilibrates between
# the two modes, so the L1 distance to p decays like exp(-gap t). This slow
# leak between modes is the mild 1D version of the pitfall of Section 4.5. First, though, the
# solver is checked against the one case with a closed form, a Gaussian target (the
# Ornstein-Uhlenbeck process of the header).

# %%
def demo_fokker_planck(run, cfg: Config) -> dict:
    ou_error = fokker_planck_ou_error(cfg.grid_cells)  # the solver against a closed form
    target = mixture_1d()
    grid = Grid1D.uniform(-6.0, 6.0, cfg.grid_cells)
    p_target = target.log_prob(torch.as_tensor(grid.centres)[:, None]).exp().numpy()
    gap = spectral_gap(fokker_planck_operator(target.score, grid))
    mu0, sd0, dt = -3.0, 0.3, cfg.fp_dt
    snap_steps = [round(t / dt) for t in cfg.fp_times]
    n_steps = snap_steps[-1]
    # grid solution from p_0, with its L1 distance to p after every step; 10 sub-steps of
    # dt/10 per particle step make the grid's own O(dt) time error negligible
    sub = 10
    p0 = stats.norm.pdf(grid.centres, mu0, sd0)
    grid_at, l1_curve = {0: p0 / (p0.sum() * grid.h)}, []
    for j, p in enumerate(fokker_planck_1d(target.score, grid, p0, dt / sub, n_steps * sub),
                          start=1):
        l1_curve.append(np.abs(p - p_target).sum() * grid.h)
        if j % sub == 0 and j // sub in snap_steps:
            grid_at[j // sub] = p
    # particles: ULA with step size eps = dt, started from samples of p_0
    x0 = mu0 + sd0 * torch.randn(cfg.particles, 1, generator=run.generator, dtype=DTYPE)
    particles_at = {0: x0[:, 0].numpy()}
    chains = langevin(target.score, x0, dt, n_steps, run.generator)
    for k, x in enumerate(_progress(chains, n_steps, "Langevin particles"), start=1):
        if k in snap_steps:
            particles_at[k] = x[:, 0].numpy()

    # Histograms use bins of 5 grid cells; the grid density is averaged over the same bins.
    bins, width = grid.edges[::5], 5 * grid.h

    def binned(p):  # (n,) cell densities -> (n/5,) bin densities
        return p.reshape(-1, 5).mean(1)

    def l1_hist(xs, p):  # L1 distance between the histogram density of xs and binned p
        return float(np.abs(np.histogram(xs, bins=bins)[0] / (len(xs) * width)
                            - binned(p)).sum() * width)

    l1_particles = {k: l1_hist(particles_at[k], grid_at[k]) for k in grid_at}
    exact = target.sample(cfg.particles, run.generator, dtype=DTYPE)[:, 0].numpy()
    noise_floor = l1_hist(exact, p_target)  # what exact samples of p score against p

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, k in zip(axes.flat, [0] + snap_steps):
        counts = np.histogram(particles_at[k], bins=bins)[0]
        ax.stairs(counts / (len(particles_at[k]) * width), bins, fill=True, color="tab:orange",
                  alpha=0.5, label=f"{cfg.particles:,} Langevin particles")
        ax.plot(grid.centres, grid_at[k], color="tab:blue", lw=2, label="Fokker-Planck grid")
        ax.plot(grid.centres, p_target, "k--", lw=1.2, label="target p")
        ax.set(xlim=(-5, 4), xlabel="x", ylabel="density",
               title=f"t = {k * dt:g}  (L1 particles vs grid: {l1_particles[k]:.3f})")
    axes[0, 0].legend(loc="upper right")
    ax = axes.flat[-1]
    times = (dt / sub) * np.arange(1, n_steps * sub + 1)
    ax.semilogy(times, l1_curve, color="tab:blue", lw=2, label="grid: $\\|p_t - p\\|_1$")
    middle = len(times) // 2 - 1  # times[middle] = t_final / 2 exactly (8 by default)
    ax.semilogy(times, l1_curve[middle] * np.exp(-gap * (times - times[middle])), "k:",
                label=f"$\\propto e^{{-\\lambda t}}$, spectral gap $\\lambda$ = {gap:.3f}")
    ax.semilogy([k * dt for k in snap_steps],
                [l1_hist(particles_at[k], p_target) for k in snap_steps], "o",
                color="tab:orange", label="particles: histogram vs p")
    ax.axhline(noise_floor, color="tab:orange", ls="--", lw=1,
               label="histogram noise floor (exact samples)")
    ax.set(xlabel="time t", ylabel="L1 distance to the target p",
           title="Convergence to the stationary density")
    ax.legend(fontsize=8)
    run.save(fig, "fokker_planck_vs_particles")
    # prediction for the last time from the middle one and the spectral gap alone
    l1_predicted = l1_curve[middle] * math.exp(-gap * (times[-1] - times[middle]))
    return dict(ou_error=ou_error, l1_final=l1_curve[-1], l1_particles=l1_particles,
                l1_predicted=l1_predicted, t_middle=float(times[middle]),
                noise_floor=noise_floor, times=[k * dt for k in snap_steps], gap=gap,
                grid_h=grid.h, dt=dt)


# %% tags=["active-ipynb"]
# fp = demo_fokker_planck(run, cfg)


# %% [markdown]
# ## 4.5 The pitfall: separated modes and the 0.8/0.2 weights
#
# Target: 0.8 N((-5,-5), I) + 0.2 N((5,5), I). Start chains uniformly on [-8, 8]^2, which
# covers both modes, and run Langevin with the *exact* score. The basins are split by the line
# x_1 + x_2 = ln(4)/10 (where the responsibilities are equal), so about half the chains start
# on each side, and that is the split they keep: the middle panel's Langevin samples are split
# about evenly between the modes, not 4:1 like the exact samples in the left panel. The right
# panel follows the fraction in the heavy mode over the run: its flat line, sitting on the
# fraction that started in that basin and nowhere near 0.8, IS the result. MALA does no
# better, so this is not discretisation bias: it is the diffusion's own time to cross between
# the modes, about e^25 ~ 1e11 time units (Section 2.6), i.e. ~1e12 steps at eps = 0.1.

# %%
def demo_mode_weights(run, cfg: Config) -> dict:
    target = GaussianMixture.separated_modes()  # weights 0.8 / 0.2
    flipped = GaussianMixture.separated_modes(weights=(0.2, 0.8))
    x0 = 16.0 * torch.rand(cfg.mode_chains, 2, generator=run.generator, dtype=DTYPE) - 8.0
    basin = mode_fractions(x0, target)  # fraction of starts in each basin of attraction
    eps, n = cfg.mode_step_size, cfg.mode_steps
    record = sorted({1, *np.unique(np.geomspace(1, n, 30).astype(int)).tolist(), n})
    frac_ula, frac_mala = [], []
    chains = langevin(target.score, x0, eps, n, run.generator)
    for k, x in enumerate(_progress(chains, n, "ULA, separated modes"), start=1):
        if k in record:
            frac_ula.append(mode_fractions(x, target)[0].item())
    x_ula = x
    chains = mala(target.log_prob, target.score, x0, eps, n, run.generator)
    for k, (x, _) in enumerate(_progress(chains, n, "MALA, separated modes"), start=1):
        if k in record:
            frac_mala.append(mode_fractions(x, target)[0].item())
    weights_ula, weights_mala = mode_fractions(x_ula, target), mode_fractions(x, target)
    # The score barely depends on the weights: compare 0.8/0.2 with 0.2/0.8 at the samples.
    diff = (target.score(x_ula) - flipped.score(x_ula)).norm(dim=1)
    same = (diff < 1e-6).double().mean().item()
    # barrier: drop in log p from the heavy mode to the lowest point on the segment to the other
    u = torch.linspace(0, 1, 2001, dtype=DTYPE)[:, None]
    line = target.means[0] + u * (target.means[1] - target.means[0])
    barrier = (target.log_prob(target.means[:1]) - target.log_prob(line).min()).item()
    print(f"\nSeparated modes: recovered weights ULA {weights_ula[0]:.3f} / {weights_ula[1]:.3f}"
          f", MALA {weights_mala[0]:.3f} / {weights_mala[1]:.3f}; true 0.8 / 0.2; "
          f"start basins {basin[0]:.3f} / {basin[1]:.3f}")

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(16, 5.2))
    lim = (-9.0, 9.0)
    exact = target.sample(cfg.mode_chains, run.generator, dtype=DTYPE)
    exact_w = mode_fractions(exact, target)
    plotting.plot_samples_over_density(
        ax0, exact, target.log_prob, xlim=lim, ylim=lim, size=4, alpha=0.6, color="k",
        label=f"{cfg.mode_chains:,} exact samples of p",
        title=f"Exact samples: {exact_w[0]:.3f} / {exact_w[1]:.3f}")
    plotting.plot_samples_over_density(
        ax1, x_ula, target.log_prob, xlim=lim, ylim=lim, size=4, alpha=0.6,
        label=f"ULA after {n} steps from $U([-8, 8]^2)$",
        title=f"Langevin, exact score: {weights_ula[0]:.3f} / {weights_ula[1]:.3f}")
    for ax in (ax0, ax1):
        # the basin boundary x_1 + x_2 = ln(4)/10, where both responsibilities are 1/2
        ax.plot(lim, [math.log(4) / 10 - lim[0], math.log(4) / 10 - lim[1]], "k:", lw=1,
                label="basin boundary")
        ax.legend(loc="upper left", markerscale=3)
    t = np.array(record)
    ax2.plot(t, frac_ula, "o-", ms=3, color="tab:red", label="ULA")
    ax2.plot(t, frac_mala, "s-", ms=3, color="tab:green", label="MALA")
    ax2.axhline(0.8, color="k", ls="--", label="true weight 0.8")
    ax2.axhline(basin[0].item(), color="tab:blue", ls=":",
                label=f"fraction starting in its basin ({basin[0]:.3f})")
    ax2.set(xscale="log", ylim=(0, 1), xlabel="number of steps",
            ylabel="fraction of chains in mode (-5, -5)",
            title=f"Weight of mode (-5,-5) over time ($\\epsilon$ = {eps:g})")
    ax2.legend(loc="lower right")
    run.save(fig, "mode_weights_pitfall")
    return dict(weights_ula=weights_ula.tolist(), weights_mala=weights_mala.tolist(),
                basin=basin.tolist(), same_score=same, barrier=barrier,
                max_diff=diff.max().item(),
                median_diff=diff.median().item())


# %% tags=["active-ipynb"]
# modes = demo_mode_weights(run, cfg)


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_03_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/03_langevin_dynamics.py`: try first, then compare.

# %%
def exercise_ula_variance_after_k_steps(variance0: float, variance: float, step_size: float,
                                        k: int) -> float:
    """Exercise 3.1: the variance of ULA's chain after k steps on the 1D Gaussian N(m, v).

    The chain starts from x_0 ~ N(m, variance0) (variance0 = 0: a fixed point) and runs
    x_{j+1} = x_j + (eps/2) s(x_j) + sqrt(eps) z_j with s(x) = -(x - m)/v. Return Var(x_k) in
    closed form (no loop), for any k >= 0.

    Signature: (float, float, float, int) -> float.
    Worked example: variance0 = 0, v = 1, eps = 0.5, k = 1 gives 0.5 (one step from a point
    adds only the noise eps); k -> infinity gives v / (1 - eps/(4v)) = 1.142857...
    Hint: Var_{j+1} = a^2 Var_j + eps with a = 1 - eps/(2v); write Var_j - v_eps and note that
    it shrinks by a^2 per step.
    """
    # TODO: find the fixed point of the recursion, then how the distance to it evolves
    raise NotImplementedError("Exercise 3.1: exercise_ula_variance_after_k_steps in "
                              "03_langevin_dynamics.py")


def exercise_ula_stationary_covariance(cov: Tensor, step_size: float) -> Tensor:
    """Exercise 3.2: ULA's stationary covariance on a D-dimensional Gaussian N(m, C).

    With s(x) = -C^{-1}(x - m), ULA is x' - m = A (x - m) + sqrt(eps) z with
    A = I - (eps/2) C^{-1}. Its stationary covariance S solves S = A S A^T + eps I. Return S.

    Signature: cov (D, D) symmetric positive definite, step_size < 4 lambda_min(C)
    -> (D, D).
    Worked example: C = diag(1, 4), eps = 0.5 gives diag(1/(1 - 0.125), 4/(1 - 0.03125))
    = diag(1.142857, 4.129032).
    Hint: C and A share eigenvectors; in the eigenbasis each direction is the 1D problem of
    Section 2.3 with v = lambda_i. torch.linalg.eigh gives C = U diag(lambda) U^T.
    """
    # TODO: solve the 1D problem along each eigen-direction, then rotate back
    raise NotImplementedError("Exercise 3.2: exercise_ula_stationary_covariance in "
                              "03_langevin_dynamics.py")


def exercise_preconditioned_langevin_step(x: Tensor, score: Tensor, step_size: float,
                                          chol: Tensor, noise: Tensor) -> Tensor:
    """Exercise 3.3: one preconditioned Langevin step with a constant matrix M = L L^T.

        x' = x + (eps/2) M s(x) + sqrt(eps) L z,     z ~ N(0, I),
    whose noise has covariance eps M and whose diffusion keeps p stationary for any symmetric
    positive definite M. With M = C on the target N(0, C), every direction contracts at the
    same rate: A = (1 - eps/2) I. Rows of x are states (row-vector convention).

    Signature: x (N, D), score (N, D) = s(x), step_size float, chol L (D, D) lower triangular,
    noise z (N, D) -> (N, D).
    Worked example: x = [[1, 0]], score = [[-1, 0]], eps = 0.5, L = [[2, 0], [1, 1]]
    (M = L L^T = [[4, 2], [2, 2]], so M s = (-4, -2)), z = [[0, 1]] (L z = (0, 1)) gives
    [[1 - 0.25*4, -0.25*2 + sqrt(0.5)]] = [[0, 0.2071]]. (noise @ L, i.e. z^T L = (1, 1),
    would give [[0.7071, 0.2071]]: a non-diagonal L tells L from L^T.)
    Hint: write the update for one state (a column vector) first, then transpose it to get
    the row of the output: (A v)^T = v^T A^T. Check that the noise term really has covariance
    eps M, not eps L or eps L^T L.
    """
    # TODO: batch the update over the rows of x without a Python loop
    raise NotImplementedError("Exercise 3.3: exercise_preconditioned_langevin_step in "
                              "03_langevin_dynamics.py")


def exercise_step_size_for_tolerance(cov: Tensor, tolerance: float) -> float:
    """Exercise 3.4: the largest ULA step size whose stationary variances are within tolerance.

    A learned score gives no log p, so no MALA (Section 2.4): the only control over ULA's bias
    is the step size. Target N(m, C) in D dimensions. Derive and return the largest eps such
    that along every eigen-direction of C the stationary variance of ULA exceeds the true one
    by at most a relative ``tolerance``:  v_eps / v - 1 <= tolerance for every eigenvalue v.
    Use the exact formula of Section 2.3, not its first-order form.

    Signature: cov (D, D) symmetric positive definite, tolerance > 0 -> float.
    Worked example: C = diag(1, 4), tolerance = 0.01 gives eps = 0.0396040 (the direction with
    variance 1 decides; the first-order answer 0.04 would give a 1.01% error there).
    Hint: the relative error v_eps / v - 1 grows with eps and falls with v; solve the equality
    for eps in the worst direction.
    """
    # TODO: which eigen-direction is worst? Solve v_eps / v - 1 = tolerance for eps there
    raise NotImplementedError("Exercise 3.4: exercise_step_size_for_tolerance in "
                              "03_langevin_dynamics.py")


# %% [markdown]
# ## Summary
#
# - ULA, x <- x + (eps/2) s(x) + sqrt(eps) z, samples with the score alone, but its stationary
#   law is p_eps, not p: on N(m, v) its variance is v / (1 - eps/(4v)) = v + eps/4 + O(eps^2),
#   exactly what the chains measure, and it diverges for eps >= 4v.
# - MALA treats the same update as a proposal q(x'|x) = N(x + (eps/2) s(x), eps I) and
#   accepts with min(1, p(x') q(x|x') / (p(x) q(x'|x))); detailed balance makes p exactly
#   invariant at every step size, at the cost of needing log p and of rejections at large eps.
# - The Fokker-Planck equation d p/dt = -d/dx((1/2) s p) + (1/2) d^2p/dx^2 is the law of
#   the Langevin particles; solved on a grid it matches their histograms up to sampling noise
#   and the particles' own O(eps) step error, and converges to p.
# - Distance to the target trades speed against bias: small steps are slow, large ULA steps
#   are biased, MALA keeps large steps honest until its acceptance rate falls.
# - Detailed balance, not merely an accept/reject step, is what makes p invariant: the same
#   test without the q-ratio settles on a wrong variance.
# - For score-based models this is the working reality: a learned score s_theta gives no log p,
#   so MALA is unavailable and practitioners run ULA, choosing eps to keep its O(eps) bias small
#   (Exercise 3.4).
# - With well-separated modes the score inside each mode ignores the weights, so even exact-
#   score Langevin returns the fraction of chains that started in each basin (about 0.5/0.5),
#   not 0.8/0.2: crossing a 25-nat barrier takes ~e^25 time units. Module 07 fixes this by
#   annealing the noise level.

# %%
def summary_rows(cfg: Config, bias: dict, samples: dict, sweeps: dict, fp: dict,
                 modes: dict) -> list[tuple]:
    """(quantity, measured, expected) rows for the closing table."""
    v, rows = cfg.variance, []
    for r in bias["rows"]:
        note = "; bias ~1 s.e.: unresolved" if r["closed_form"] - v < 2 * r["se"] else ""
        rows.append((f"ULA stationary variance, eps={r['step_size']:g}",
                     f"{r['ula']:.4f} +- {r['se']:.4f}",
                     f"closed form {r['closed_form']:.4f}; true {v:g}{note}"))
    for r in bias["rows"]:
        rows.append((f"MALA variance / acceptance, eps={r['step_size']:g}",
                     f"{r['mala']:.4f} +- {r['se_mala']:.4f} / {r['acceptance']:.3f}",
                     f"true {v:g} / falls from 1 as eps grows"))
    rows.append(("MALA without q-ratio (wrong): variance, eps=" +
                 ",".join(f"{r['step_size']:g}" for r in bias["rows"]),
                 ", ".join(f"{r['naive']:.3f}" for r in bias["rows"]),
                 f"not {v:g}; -> v/2 as eps -> 0 (s.e. ~{bias['rows'][-1]['se_naive']:.3f})"))
    rows.append((f"chi-square p-value vs N(0,{v:g}), eps={cfg.bias_step_sizes[-1]:g}",
                 f"ULA {_p_value(bias['p_ula'])}, MALA {_p_value(bias['p_mala'])}",
                 "ULA ~ 0 (biased); MALA > 1e-3"))
    small, large, floor = cfg.small_step_2d, cfg.step_size_2d, sweeps["floor"]
    rows.append((f"2D: SW after {samples['checkpoints'][-1]} steps, ULA eps={small:g} / "
                 f"ULA eps={large:g} / MALA eps={large:g}",
                 f"{samples['ula_small'][-1]:.3f} / {samples['ula_large'][-1]:.3f} / "
                 f"{samples['mala_large'][-1]:.3f}",
                 f"floor {floor:.3f} +- {sweeps['floor_sd']:.3f}; ULA eps={large:g} above"))
    (su, su_se), (sm, sm_se) = samples["spread_ula"], samples["spread_mala"]
    rows.append((f"2D: spread around nearest mode, ULA / MALA eps={large:g}",
                 f"{su:.3f} +- {su_se:.3f} / {sm:.3f} +- {sm_se:.3f}",
                 f"exact {samples['spread_exact']:.3f}; ULA wider: rough guide "
                 f"+eps/4 = +{large / 4:.2f}"))
    rows.append((f"2D: MALA acceptance, eps={large:g}", f"{samples['acceptance']:.3f}",
                 "high, below 1"))
    sizes = ",".join(f"{e:g}" for e in cfg.sweep_step_sizes)
    for name, key in [("ULA", "sw_ula"), ("MALA", "sw_mala")]:
        rows.append((f"2D: SW {name} after {cfg.sweep_steps} steps, eps={sizes}",
                     ", ".join(f"{d:.3f}" for d in sweeps[key]),
                     f"floor {floor:.3f} +- {sweeps['floor_sd']:.3f}"))
    rows.append(("2D: MALA acceptance at the same eps",
                 ", ".join(f"{a:.2f}" for a in sweeps["acceptance"]), "falls as eps grows"))
    rows.append(("Fokker-Planck grid vs OU closed form at t=1 (L1)", f"{fp['ou_error']:.4f}",
                 "O(h^2 + dt): about 1e-3"))
    rows.append((f"Fokker-Planck grid, L1 to p at t={fp['times'][-1]:g}", f"{fp['l1_final']:.4f}",
                 f"{fp['l1_predicted']:.4f} = L1(t={fp['t_middle']:.3g}) "
                 f"exp(-{fp['gap']:.3f} * ({fp['times'][-1]:g} - {fp['t_middle']:.3g}))"))
    times = ",".join(f"{t:g}" for t in fp["times"])
    rows.append((f"particles vs grid, L1 at t={times}",
                 ", ".join(f"{fp['l1_particles'][round(t / fp['dt'])]:.3f}"
                           for t in fp["times"]),
                 f"noise floor {fp['noise_floor']:.3f} (exact samples of p) + ULA's O(eps) "
                 "error"))
    w_ula, w_mala, basin = modes["weights_ula"], modes["weights_mala"], modes["basin"]
    rows.append(("mode weights recovered by ULA", f"{w_ula[0]:.3f} / {w_ula[1]:.3f}",
                 f"true 0.8 / 0.2; started in basin {basin[0]:.3f} / {basin[1]:.3f}"))
    rows.append(("mode weights recovered by MALA", f"{w_mala[0]:.3f} / {w_mala[1]:.3f}",
                 "true 0.8 / 0.2"))
    rows.append(("barrier: log p(heavy mode) - min log p on the segment between modes",
                 f"{modes['barrier']:.2f} nats",
                 "~25 nats (light mode: ~23.6): crossing time ~e^25 ~ 1e11"))
    rows.append(("samples where the scores of 0.8/0.2 and 0.2/0.8 differ < 1e-6",
                 f"{100 * modes['same_score']:.1f}%", "~100%: the score ignores the weights"))
    return rows


def main(argv=None):
    run = start_run(make_parser(), MODULE, argv, validate=_check_flags)
    cfg = Config.quick() if run.quick else Config()
    target = mixture_2d()
    if run.args.chains is not None:
        cfg.chains_2d = run.args.chains
    if run.args.step_size is not None:
        cfg.step_size_2d = run.args.step_size
    if run.device.type != "cpu":
        print("Note: module 03 runs in float64 on the CPU; its problems are too small to gain "
              "from an accelerator.")

    bias = demo_stationary_variance(run, cfg)
    samples = demo_samples_2d(run, cfg, target)
    sweeps = demo_distance_sweeps(run, cfg, target, samples)
    fp = demo_fokker_planck(run, cfg)
    modes = demo_mode_weights(run, cfg)
    run.finish(summary_rows(cfg, bias, samples, sweeps, fp, modes), globals(), "03")


# %% tags=["active-ipynb"]
# run.finish(summary_rows(cfg, bias, samples, sweeps, fp, modes), globals(), "03")


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
