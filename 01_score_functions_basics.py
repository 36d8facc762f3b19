"""
FILE: 01_score_functions_basics.py
DIFFICULTY: Beginner
ESTIMATED TIME: 1-1.5 hours
PREREQUISITES: Python, NumPy/PyTorch basics (tensors, autograd), Gaussian distributions

LEARNING OBJECTIVES:
- Say what the score of a density is and draw it as a vector field.
- See why the score never needs the normalising constant Z of p(x) = exp(-E(x)) / Z.
- Derive the scores of 1D and full-covariance Gaussians, Gaussian mixtures and energy models,
  and check every derivation against automatic differentiation.
- Transform scores under an affine change of variables y = A x + b and under tempering p^beta.
- Verify the two moment identities E_p[score] = 0 and E_p[score score^T] = Fisher information.

MATHEMATICAL BACKGROUND:
- Score:                s(x) = grad_x log p(x)                               (a vector field)
- No normaliser:        p(x) = exp(-E(x)) / Z   =>   s(x) = -grad_x E(x)      (grad log Z = 0)
- Gaussian N(mu, Sigma): s(x) = -Sigma^{-1} (x - mu);   in 1D  s(x) = -(x - mu) / sigma^2
- Mixture sum_k w_k N_k: s(x) = sum_k r_k(x) s_k(x),  r_k(x) = w_k N_k(x) / p(x)
- Affine map y = A x + b:  s_Y(y) = A^{-T} s_X(A^{-1} (y - b))
- Tempering p^beta / Z_beta:  s_beta(x) = beta s(x)
- Moments under p:      E_p[s(x)] = 0,   E_p[s s^T] = -E_p[Hessian of log p] = I_F
                        (for N(mu, Sigma): I_F = Sigma^{-1})
- Notation: "score" here is the gradient in x, not in a parameter theta as in statistics.

IMPLEMENTATION NOTES:
- Every closed-form score is compared with autograd of the log-density in float64; they agree
  to about 1e-13 (round-off), and the errors are printed in the closing summary.
- Gaussian mixtures come from common/datasets.py (GaussianMixture), because every later module
  needs their exact scores; this module explains the formula and checks it.
- Score fields are drawn with arrow lengths clipped at the 90% quantile of |s| on the plotted
  grid: the score grows without bound away from the data and would otherwise swamp the picture.
- Nothing here trains a network; the whole run takes a few seconds on a laptop CPU.

Run:
    python 01_score_functions_basics.py          # figures go to outputs/01_score_functions_basics/
    python 01_score_functions_basics.py --quick  # a smaller Monte Carlo sample, a few seconds
    pytest tests/test_01_exercises.py -k your_answer  # check your answers

References:
- A. Hyvarinen (2005), Estimation of non-normalized statistical models by score matching. JMLR.
- Y. Song and S. Ermon (2019), Generative modeling by estimating gradients of the data
  distribution. NeurIPS. (And Y. Song's blog post of the same name, 2021.)
"""

# %% [markdown]
# # Section 1: Imports and configuration
#
# `torch` does the arithmetic (and the automatic differentiation we check every formula with);
# `matplotlib` draws; `common` holds the helpers every module of the tutorial shares: the
# command line, figure saving, the Gaussian mixture with exact scores, and the exercise machinery.

# %%
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.cli import Count, start_run
from common.cli import make_parser as shared_parser
from common.datasets import GaussianMixture
from common.plotting import grid_points, plot_density, plot_density_and_score_1d, plot_score_field

MODULE = "01_score_functions_basics"
Tensor = torch.Tensor
LogProbFn = Callable[[Tensor], Tensor]  # x: (N, D) -> log p(x): (N,)
ScoreFn = Callable[[Tensor], Tensor]  # x: (N, D) -> s(x): (N, D)

# Closed forms are checked against autograd in double precision: they agree to round-off (~1e-13).
DTYPE = torch.float64


@dataclass
class Config:
    """Sizes of one run. ``quick()`` is the smoke-test version used by ``--quick``."""

    mc_samples: int = 200_000  # samples for the Monte Carlo moment identities
    grid: int = 200  # density contours are drawn on a grid x grid lattice
    arrows: int = 21  # score arrows per axis

    @classmethod
    def quick(cls) -> Config:
        return cls(mc_samples=20_000, grid=100, arrows=15)


def make_parser():
    """The shared flags (common.cli) plus this module's own."""
    parser = shared_parser("Module 01: score functions, drawn and checked against autograd.")
    # Memory: the 2D float64 samples, their scores and the outer products s s^T held at once,
    # about 64 bytes a sample (measured: 76 MB more for 2e6 samples, 38 bytes each, plus room).
    parser.add_argument("--mc-samples", type=Count(100, bytes_each=64, unit="sample"),
                        default=None,
                        help="Monte Carlo sample size for the moment identities "
                             "(default: 200000, or 20000 with --quick)")
    return parser


# %% [markdown]
# # Section 2: Mathematical foundations
#
# ## 2.1 What a score is
# For a density $p(x)$ on $\mathbb{R}^D$ the **score** is the gradient of its logarithm,
# $$ s(x) = \nabla_x \log p(x) = \frac{\nabla_x p(x)}{p(x)}. $$
# It is a vector field: at each point it points in the direction in which the log-density rises
# fastest, and it vanishes at every mode (and at every saddle or trough) of $p$. Langevin
# dynamics (module 03) samples from $p$ using nothing but $s$, and every model in this tutorial
# learns $s$ instead of $p$.
#
# ## 2.2 The score does not see the normalising constant
# Most interesting densities are known only up to a constant: $p(x) = e^{-E(x)} / Z$ with an
# **energy** $E$ and $Z = \int e^{-E(x)}\,dx$ intractable. Taking the logarithm separates the
# two, and $Z$ does not depend on $x$:
# $$ \log p(x) = -E(x) - \log Z \quad\Longrightarrow\quad s(x) = -\nabla_x E(x). $$
# Why is $Z$ out of reach? It is an integral over all of $\mathbb{R}^D$; for images $D$ is in the
# thousands and no quadrature or naive Monte Carlo can compute it. This is the whole reason
# score-based models exist: a neural network $s_\theta(x)$ with parameters $\theta$, trained to
# approximate $s(x)$ (modules 02 and 04), never has to normalise anything.
#
# A word on names: in statistics, "score" and "Fisher information" usually mean gradients with
# respect to a *parameter* $\theta$ of a model. In this tutorial, following Hyvarinen and Song,
# the score is always the gradient with respect to the *data point* $x$.
#
# ## 2.3 Gaussians
# For $\mathcal{N}(\mu, \Sigma)$,
# $\log p(x) = -\tfrac12 (x-\mu)^\top \Sigma^{-1} (x-\mu) - \tfrac12 \log\det(2\pi\Sigma)$.
# The last term is a constant. For a symmetric matrix $A$, the gradient of the quadratic form
# $\tfrac12 u^\top A u$ is $A u$ (write it out in 2D to see it), so with $u = x - \mu$ and
# $A = \Sigma^{-1}$ (the **precision** matrix):
# $$ s(x) = -\Sigma^{-1}(x - \mu), \qquad \text{in 1D: } s(x) = -\frac{x-\mu}{\sigma^2}. $$
# The score points back towards the mean and grows linearly with the distance from it; it grows
# faster along the directions in which the Gaussian is narrow (large precision, small variance).
#
# ## 2.4 Gaussian mixtures
# For $p(x) = \sum_k w_k \mathcal{N}_k(x)$ with
# $\mathcal{N}_k(x) = \mathcal{N}(x; \mu_k, \Sigma_k)$, use $\nabla f = f\, \nabla \log f$ twice:
# once for each component, $\nabla \mathcal{N}_k = \mathcal{N}_k \nabla \log \mathcal{N}_k
# = \mathcal{N}_k s_k$, and once for $p$ itself, $s = \nabla p / p$:
# $$ s(x) = \frac{\sum_k w_k \nabla \mathcal{N}_k(x)}{p(x)} = \sum_k r_k(x)\, s_k(x), \qquad
#    r_k(x) = \frac{w_k \mathcal{N}(x; \mu_k, \Sigma_k)}{p(x)}, \qquad
#    s_k(x) = -\Sigma_k^{-1}(x - \mu_k). $$
# By Bayes' rule, $r_k(x)$ is the *posterior* probability that $x$ came from component $k$
# (prior $w_k$, likelihood $\mathcal{N}_k(x)$, evidence $p(x)$). So the mixture's score is the
# average of the component scores weighted by how responsible each component is for $x$: near a
# component, its own score rules.
#
# ## 2.5 An energy model: the banana
# $E(x) = \tfrac12 x_1^2 + \tfrac12 (x_2 - \kappa\,x_1^2)^2$ bends a Gaussian into a banana
# (the curvature $\kappa$ sets how much). Its score is
# $$ s(x) = -\nabla E(x) = \begin{pmatrix} -x_1 + 2 \kappa\, x_1 (x_2 - \kappa x_1^2) \\
#                                          -(x_2 - \kappa\, x_1^2) \end{pmatrix}. $$
# (Here we happen to know $Z = 2\pi$: $x_1 \sim \mathcal{N}(0,1)$ and
# $x_2 \mid x_1 \sim \mathcal{N}(\kappa x_1^2, 1)$. That lets us show the normalised and the
# unnormalised density have *the same* score, and sample it exactly.)
#
# ## 2.6 Affine change of variables
# If $y = A x + b$ with $A$ invertible, then $p_Y(y) = p_X(A^{-1}(y-b)) / |\det A|$: the map
# stretches volumes by the factor $|\det A|$, so the density (probability per volume) shrinks by
# the same factor. That factor is a constant, so it drops out of $\nabla \log p_Y$, and the chain
# rule through $x = A^{-1}(y - b)$ gives
# $$ s_Y(y) = A^{-\top} s_X\big(A^{-1}(y - b)\big). $$
# Note the transpose: a gradient transforms with $A^{-\top}$, while points transform with $A$.
#
# ## 2.7 Tempering
# Raising a density to a power and renormalising, $p_\beta = p^\beta / Z_\beta$, gives
# $\log p_\beta = \beta \log p - \log Z_\beta$, so its score is $s_\beta(x) = \beta\, s(x)$.
# $\beta > 1$ sharpens the modes, $\beta < 1$ flattens them. Tempering is the simplest way to
# trade diversity for fidelity when sampling. Module 10's guidance shares the idea of
# sharpening by raising a density to a power, but it raises a *different* density: classifier
# guidance samples $p(x)\, p(y \mid x)^w$, with score $s(x) + w \nabla_x \log p(y \mid x)$, and
# classifier-free guidance uses $(1 + w)\, s(x, y) - w\, s(x)$, the score of
# $p(x \mid y)^{1+w} / p(x)^w$. Tempering multiplies the whole score by $\beta$; guidance
# multiplies only the class-dependent part by $w$ and leaves the data density's own score at
# weight one, so it sharpens towards the class, not towards the modes of $p$.
#
# ## 2.8 Two identities: the score has mean zero, and its covariance is the Fisher information
# $$ \mathbb{E}_p[s(x)] = \int p \,\frac{\nabla p}{p}\, dx = \int \nabla p\, dx = 0, $$
# because $p$ vanishes at infinity. For the second moment, write one factor as
# $p\, \partial_i \log p = \partial_i p$ and integrate by parts in $x_i$ (the boundary term
# vanishes again):
# $$ \mathbb{E}_p[s_i s_j] = \int \partial_i p\; \partial_j \log p \, dx
#    = -\int p\; \partial_i \partial_j \log p \, dx = -\mathbb{E}_p[H_{ij}], $$
# where $H = \nabla^2 \log p$ is the **Hessian**, the matrix of second derivatives
# $\partial_i\partial_j \log p$. This matrix $I_F = \mathbb{E}_p[s s^\top]$ is the **Fisher
# information** of a location parameter: shifting $p$ by $\mu$, $\nabla_\mu \log p(x - \mu) =
# -\nabla_x \log p(x-\mu)$, so our $x$-score is the statistician's $\mu$-score up to sign.
# For a Gaussian the Hessian is $-\Sigma^{-1}$ everywhere, so $I_F = \Sigma^{-1}$. For the banana,
# differentiating $E$ twice and averaging ($\mathbb{E}[x_2 - \kappa x_1^2] = 0$,
# $\mathbb{E}[x_1] = 0$, $\mathbb{E}[x_1^2] = 1$) gives $I_F = \mathrm{diag}(1 + 4\kappa^2,\ 1)$:
# a non-Gaussian case we check by Monte Carlo too. Module 02 builds score matching on this same
# integration by parts.

# %% [markdown]
# # Section 3: Implementation
#
# ## 3.1 Autograd: the ground truth for every formula
# Automatic differentiation computes $\nabla_x \log p(x)$ from any differentiable `log_prob`.
# It is our oracle: each closed-form score below is compared with it.

# %%
def autograd_score(log_prob: LogProbFn, x: Tensor) -> Tensor:
    """grad_x log p(x) by automatic differentiation.

    x: (N, D); ``log_prob`` maps (N, D) -> (N,). Returns (N, D), detached.
    The points are independent, so the gradient of sum_i log p(x_i) with respect to x_i is
    exactly the score at x_i: one backward pass gives all N scores.
    """
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(x).sum(), x)
    return grad.detach()


# %% [markdown]
# ## 3.2 Gaussians with full covariance

# %%
def gaussian_log_prob(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mean, cov) = -1/2 (x-mu)^T Sigma^{-1} (x-mu) - 1/2 log det(2 pi Sigma).

    x: (N, D), mean: (D,), cov: (D, D) symmetric positive definite. Returns (N,).
    """
    D = x.shape[1]
    L = torch.linalg.cholesky(cov)
    # Solve L u = (x - mu): then |u|^2 = (x-mu)^T Sigma^{-1} (x-mu), without inverting Sigma.
    u = torch.linalg.solve_triangular(L, (x - mean).T, upper=False).T
    log_det = 2 * L.diagonal().log().sum()  # log det Sigma = 2 sum log diag(L)
    return -0.5 * (u.square().sum(1) + log_det + D * math.log(2 * math.pi))


def gaussian_score(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """s(x) = -Sigma^{-1} (x - mu).   x: (N, D), mean: (D,), cov: (D, D) -> (N, D).

    ``torch.linalg.solve`` applies Sigma^{-1} without forming the inverse (stabler and cheaper).
    """
    return -torch.linalg.solve(cov, (x - mean).T).T


# %% [markdown]
# ## 3.3 Gaussian mixtures
# `GaussianMixture` in `common/datasets.py` implements Section 2.4 and is used by every later
# module. Its `score` computes the responsibilities with a log-sum-exp (so far-away points do not
# underflow to 0/0) and then the weighted sum of component scores:
# ```python
# r = softmax_k(log w_k + log N(x; mu_k, Sigma_k))        # (N, K), rows sum to 1
# score = sum_k r[:, k] * (-Sigma_k^{-1} (x - mu_k))      # (N, D)
# ```
# The two mixtures below are the running examples of this module.

# %%
def example_mixture_2d() -> GaussianMixture:
    """Three components with unequal weights and full (tilted) covariances."""
    weights = [0.5, 0.3, 0.2]
    means = [[-1.5, -0.5], [1.5, 1.0], [0.5, -2.0]]
    covs = [[[0.6, 0.3], [0.3, 0.5]], [[0.4, -0.25], [-0.25, 0.7]], [[0.5, 0.0], [0.0, 0.2]]]
    return GaussianMixture(weights, means, covs)


def example_mixture_1d() -> GaussianMixture:
    """0.3 N(-2, 0.5^2) + 0.7 N(1.5, 0.8^2): two bumps of different width and height."""
    return GaussianMixture.isotropic([0.3, 0.7], [[-2.0], [1.5]], [0.5, 0.8])


# %% [markdown]
# ## 3.4 The banana energy model (Section 2.5)

# %%
def banana_energy(x: Tensor, kappa: float = 0.5) -> Tensor:
    """E(x) = x1^2 / 2 + (x2 - kappa x1^2)^2 / 2.   x: (N, 2) -> (N,)."""
    x1, x2 = x[:, 0], x[:, 1]
    return 0.5 * x1**2 + 0.5 * (x2 - kappa * x1**2) ** 2


def banana_log_prob(x: Tensor, kappa: float = 0.5) -> Tensor:
    """Normalised log-density -E(x) - log Z, Z = 2 pi  (x1 ~ N(0,1), x2 | x1 ~ N(kappa x1^2, 1))."""
    return -banana_energy(x, kappa) - math.log(2 * math.pi)


def banana_score(x: Tensor, kappa: float = 0.5) -> Tensor:
    """s(x) = -grad E = (-x1 + 2 kappa x1 (x2 - kappa x1^2), -(x2 - kappa x1^2)).

    x: (N, 2) -> (N, 2).
    """
    x1, x2 = x[:, 0], x[:, 1]
    r = x2 - kappa * x1**2  # the residual of x2 around the curved ridge x2 = kappa x1^2
    return torch.stack([-x1 + 2 * kappa * x1 * r, -r], dim=1)


def banana_sample(n: int, kappa: float = 0.5, generator=None) -> Tensor:
    """Exact samples: x1 ~ N(0, 1), then x2 | x1 ~ N(kappa x1^2, 1). Returns (n, 2), float64."""
    z = torch.randn(n, 2, generator=generator, dtype=DTYPE)
    return torch.stack([z[:, 0], kappa * z[:, 0] ** 2 + z[:, 1]], dim=1)


# %% [markdown]
# ## 3.5 Scores under an affine map and under tempering (Sections 2.6, 2.7)
# Both take a score function and return a new score function: the transformations act on
# scores directly, with no density in sight.

# %%
def affine_score(score_x: ScoreFn, A: Tensor, b: Tensor) -> ScoreFn:
    """Score of y = A x + b given the score of x:  s_Y(y) = A^{-T} s_X(A^{-1} (y - b)).

    A: (D, D) invertible, b: (D,). The returned function maps y: (N, D) -> (N, D).
    """

    def score_y(y: Tensor) -> Tensor:
        x = torch.linalg.solve(A, (y - b).T).T  # x = A^{-1} (y - b)
        return torch.linalg.solve(A.T, score_x(x).T).T  # A^{-T} s_X(x)

    return score_y


def affine_mixture(mix: GaussianMixture, A: Tensor, b: Tensor) -> GaussianMixture:
    """The law of y = A x + b for x ~ mix: components N(A mu_k + b, A Sigma_k A^T).

    A closed form for the transformed density, used to check ``affine_score``.
    """
    A, b = A.to(DTYPE), b.to(DTYPE)
    return GaussianMixture(mix.weights, mix.means @ A.T + b, A @ mix.covs @ A.T)


def tempered_score(score: ScoreFn, beta: float) -> ScoreFn:
    """Score of p^beta / Z_beta:  s_beta(x) = beta s(x)."""
    return lambda x: beta * score(x)


# %% [markdown]
# ## 3.6 Monte Carlo moments of the score (Section 2.8)

# %%
def score_moments(score: ScoreFn, samples: Tensor) -> dict[str, Tensor]:
    """Monte Carlo estimates of E_p[s] (D,) and E_p[s s^T] (D, D) from samples x ~ p, (N, D).

    Also returns their standard errors (std of the summands / sqrt(N)), so that a check can ask
    for agreement "within a few standard errors" instead of an arbitrary tolerance.
    """
    s = score(samples)
    n = s.shape[0]
    outer = s[:, :, None] * s[:, None, :]  # (N, D, D): s_i s_i^T
    return {
        "mean": s.mean(0),
        "mean_se": s.std(0) / math.sqrt(n),
        "second_moment": outer.mean(0),
        "second_moment_se": outer.std(0) / math.sqrt(n),
    }


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| over all entries, as a Python float."""
    return (a - b).abs().max().item()


# %% [markdown]
# # Section 4: Examples and visualization
#
# Each demo draws one figure into `outputs/01_score_functions_basics/` and returns the numbers
# it measured; `main` collects them into the closing summary.
#
# ## 4.1 One dimension: a density and its score
# Read the bottom panel against the top one: the score is positive left of each mode (uphill is
# to the right), crosses zero *at* each mode and at the trough between the mixture's bumps, and
# is steeper for the narrower Gaussian (its precision $1/\sigma^2$ is larger).

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
def demo_1d(run, cfg: Config) -> dict:
    x = torch.linspace(-5, 5, 801, dtype=DTYPE)[:, None]  # (801, 1)
    cases = {
        "N(0, 1)": GaussianMixture.isotropic([1.0], [[0.0]], 1.0),
        "N(1, 0.5^2)": GaussianMixture.isotropic([1.0], [[1.0]], 0.5),
        "0.3 N(-2, 0.5^2) + 0.7 N(1.5, 0.8^2)": example_mixture_1d(),
    }
    fig, (ax_p, ax_s) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    errors = {}
    for label, dist in cases.items():
        closed = dist.score(x)
        errors[label] = max_abs_diff(closed, autograd_score(dist.log_prob, x))
        plot_density_and_score_1d(ax_p, ax_s, x[:, 0], dist.log_prob(x).exp(), closed[:, 0],
                                  label=label)
    # The 1D Gaussian score in its textbook form, -(x - mu) / sigma^2, against the general one.
    errors["1D formula -(x-mu)/sigma^2"] = max_abs_diff(
        -(x - 1.0) / 0.5**2, gaussian_score(x, torch.tensor([1.0], dtype=DTYPE),
                                             torch.tensor([[0.25]], dtype=DTYPE)))
    ax_s.set_ylim(-6, 6)
    ax_p.set_title("1D densities (top) and their scores (bottom)")
    ax_p.legend()
    ax_s.legend(loc="upper right")
    run.save(fig, "densities_and_scores_1d")
    return {"1d_autograd_error": max(errors.values())}


# %% tags=["active-ipynb"]
# r.update(demo_1d(run, cfg))


# %% [markdown]
# ## 4.2 Two dimensions: score fields on top of densities
# Arrows point uphill in log-density, towards the modes, and they are short near each mode,
# where the score vanishes. For the full-covariance Gaussian they do *not* point straight at the
# mean: $-\Sigma^{-1}(x-\mu)$ bends them towards the narrow direction. In the mixture, each
# arrow follows the component that "owns" its region, and the field changes direction along the
# boundaries between those regions. The banana's arrows pull onto its curved ridge
# $x_2 = \kappa x_1^2$.

# %%
GAUSS_MEAN = torch.tensor([1.0, -1.0], dtype=DTYPE)
GAUSS_COV = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=DTYPE)


def demo_score_fields(run, cfg: Config) -> dict:
    mix = example_mixture_2d()
    panels = [
        ("Gaussian, full covariance",
         lambda x: gaussian_log_prob(x, GAUSS_MEAN, GAUSS_COV),
         lambda x: gaussian_score(x, GAUSS_MEAN, GAUSS_COV), (-3.5, 5.5), (-5, 3)),
        ("Gaussian mixture (3 components)", mix.log_prob, mix.score, (-4, 4), (-4, 4)),
        ("Banana energy model, kappa = 0.5", banana_log_prob, banana_score, (-3.5, 3.5),
         (-2.5, 4.5)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    errors = {}
    for ax, (title, log_prob, score, xlim, ylim) in zip(axes, panels):
        plot_density(ax, log_prob, xlim, ylim, n_grid=cfg.grid)
        plot_score_field(ax, score, xlim, ylim, n_arrows=cfg.arrows)
        ax.set_title(title)
        _, _, pts = grid_points(xlim, ylim, 50)
        errors[title] = max_abs_diff(score(pts), autograd_score(log_prob, pts))
    fig.suptitle("Density (shading) and score s(x) = grad log p(x) (arrows; the longest 10% "
                 "are clipped)")
    run.save(fig, "score_fields_2d")
    return {"gaussian_autograd_error": errors[panels[0][0]],
            "mixture_autograd_error": errors[panels[1][0]],
            "banana_autograd_error": errors[panels[2][0]]}


# %% tags=["active-ipynb"]
# r.update(demo_score_fields(run, cfg))


# %% [markdown]
# ## 4.3 The normalising constant is invisible to the score
# Left: along the line $x_2 = 1$, the normalised log-density $\log p = -E - \log 2\pi$ and the
# unnormalised $-E$ are the same curve shifted by $\log 2\pi \approx 1.84$. Right: their
# derivatives $\partial/\partial x_1$, computed by autograd from each, coincide exactly. We also
# integrate $e^{-E}$ on a grid to confirm $Z = 2\pi$.

# %%
def demo_normaliser_invariance(run, cfg: Config) -> dict:
    x1 = torch.linspace(-3, 3, 400, dtype=DTYPE)
    slice_pts = torch.stack([x1, torch.ones_like(x1)], dim=1)  # the line x2 = 1
    log_p = banana_log_prob(slice_pts)
    neg_e = -banana_energy(slice_pts)
    s_norm = autograd_score(banana_log_prob, slice_pts)
    s_unnorm = autograd_score(lambda x: -banana_energy(x), slice_pts)

    # Z = integral of exp(-E) over the plane, by the trapezoid rule on a generous box.
    X, Y, pts = grid_points((-8, 8), (-6, 40), 1201)
    density = torch.exp(-banana_energy(pts)).reshape(X.shape)
    xs, ys = torch.from_numpy(X[0]), torch.from_numpy(Y[:, 0])
    Z = torch.trapezoid(torch.trapezoid(density, xs, dim=1), ys).item()

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    ax_l.plot(x1, neg_e, label="unnormalised: -E(x)")
    ax_l.plot(x1, log_p, "--", label="normalised: -E(x) - log Z")
    ax_l.set_xlabel("$x_1$ (on the line $x_2 = 1$)")
    ax_l.set_ylabel("log density")
    ax_l.set_title(f"The two differ by the constant log Z = {math.log(Z):.4f}")
    ax_l.legend()
    ax_r.plot(x1, s_unnorm[:, 0], lw=4, alpha=0.4, label="from -E(x)")
    ax_r.plot(x1, s_norm[:, 0], "k--", label="from log p(x)")
    ax_r.axhline(0, color="gray", lw=0.8, ls=":")
    ax_r.set_xlabel("$x_1$ (on the line $x_2 = 1$)")
    ax_r.set_ylabel(r"score component $\partial \log p / \partial x_1$")
    ax_r.set_title("...but their scores are identical")
    ax_r.legend()
    run.save(fig, "normalised_vs_unnormalised")
    _, _, box = grid_points((-3, 3), (-2, 4), 60)
    invariance = max_abs_diff(autograd_score(banana_log_prob, box),
                              autograd_score(lambda x: -banana_energy(x), box))
    return {"Z_numerical": Z, "normaliser_score_diff": invariance}


# %% tags=["active-ipynb"]
# r.update(demo_normaliser_invariance(run, cfg))


# %% [markdown]
# ## 4.4 Where the score is large and where it vanishes
# $|s(x)|$ is zero wherever $\log p$ is flat: at each mode, at the saddle points between two
# modes, and at the density's minimum in the middle of the three components (the dark spots).
# In a mixture the modes sit slightly off the component means, because each neighbour pulls a
# little; so $|s|$ at a component mean is small but not exactly zero. The faint arc at the top
# left is a boundary far from the data where two components hand over. Away from the data
# $|s|$ keeps growing. Keep this map in mind for module 04: a *learned* score is accurate only
# where training samples are, i.e. where the density is high; the large-$|s|$ outskirts have
# no data, so there the learned field is unreliable.

# %%
def demo_score_magnitude(run, cfg: Config) -> dict:
    mix = example_mixture_2d()
    xlim = ylim = (-4, 4)
    X, Y, pts = grid_points(xlim, ylim, cfg.grid)
    magnitude = mix.score(pts).norm(dim=1).reshape(X.shape).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    mesh = ax.pcolormesh(X, Y, magnitude, shading="auto", cmap="magma",
                         norm=plt.matplotlib.colors.LogNorm(vmin=1e-2, vmax=magnitude.max()))
    fig.colorbar(mesh, ax=ax, label="|s(x)| (log scale)")
    density = mix.log_prob(pts).exp().reshape(X.shape).numpy()
    ax.contour(X, Y, density, levels=6, colors="w", linewidths=0.8)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("Score magnitude of the mixture (white: density contours)")
    run.save(fig, "score_magnitude")
    modes_score = mix.score(mix.means.clone()).norm(dim=1).max().item()
    return {"max_score_at_means": modes_score}


# %% tags=["active-ipynb"]
# r.update(demo_score_magnitude(run, cfg))


# %% [markdown]
# ## 4.5 Affine maps and tempering act on scores directly
# Left: we push the mixture through $y = A x + b$ with a shear-and-stretch $A$. The black arrows
# are $A^{-\top} s_X(A^{-1}(y-b))$, computed from the *original* score alone; the shading is the
# transformed density, known in closed form (each component becomes
# $\mathcal{N}(A\mu_k + b, A\Sigma_k A^\top)$), and the thick orange arrows underneath are its
# exact score: every black arrow sits exactly on its orange twin. Middle and right: tempering
# the 1D mixture. $p^\beta$ (renormalised on
# the grid) sharpens for $\beta > 1$ and flattens for $\beta < 1$, and its score is $\beta$ times
# the original: the zero crossings (modes and trough) stay put, the slopes scale. Note that
# tempering also moves *mass* between the modes: the summary prints the mass right of the
# trough, the heavier bump's share, for each $\beta$; it rises from the mixture weight 0.70
# at $\beta = 1$ to about 0.83 at $\beta = 3$ and falls towards one half at $\beta = 0.3$.
# Relative mode weights are fragile, a theme of modules 03 and 07.
#
# The arrows in the left panel have their lengths capped at the 25% quantile of $|s|$: these
# components are narrow, so $|s|$ changes a hundredfold across the panel, and with a higher
# cap the arrows near the modes would shrink below a pixel. Away from the modes every arrow
# then has the same length, and only its direction carries information.

# %%
AFFINE_A = torch.tensor([[1.2, 0.8], [-0.3, 0.6]], dtype=DTYPE)
AFFINE_B = torch.tensor([0.5, -0.5], dtype=DTYPE)
BETAS = (0.3, 1.0, 3.0)


def demo_affine_and_tempering(run, cfg: Config) -> dict:
    mix = example_mixture_2d()
    pushed = affine_mixture(mix, AFFINE_A, AFFINE_B)
    score_y = affine_score(mix.score, AFFINE_A, AFFINE_B)
    _, _, pts = grid_points((-5, 5), (-4, 4), 60)
    affine_error = max_abs_diff(score_y(pts), pushed.score(pts))

    fig, (ax_a, ax_p, ax_s) = plt.subplots(1, 3, figsize=(18, 5),
                                           gridspec_kw={"width_ratios": [1.4, 1, 1]})
    xlim, ylim = (-5, 5), (-3.5, 3.5)
    plot_density(ax_a, pushed.log_prob, xlim, ylim, n_grid=cfg.grid)
    # Thick orange under thin black: where they agree, each black arrow has an orange halo.
    # The pushed components are narrow, so |s| spans a factor of ~100 over the panel: capping the
    # lengths at the 25% quantile (not 90%) keeps the arrows near the modes visible; directions
    # stay exact everywhere.
    n_arrows = (cfg.arrows + 1) // 2 + 2
    for score, color, label, width in (
            (pushed.score, "tab:orange", "exact score of y", 0.012),
            (score_y, "k", "$A^{-T} s_X(A^{-1}(y - b))$", 0.004)):
        plot_score_field(ax_a, score, xlim, ylim, n_arrows=n_arrows, color=color, label=label,
                         width=width, clip_quantile=0.25)
    ax_a.set_xlabel("$y_1$")
    ax_a.set_ylabel("$y_2$")
    ax_a.set_title("y = A x + b: shading is the density of y")
    ax_a.legend(loc="upper right", framealpha=0.9)

    x = torch.linspace(-5, 5, 801, dtype=DTYPE)[:, None]
    mix1 = example_mixture_1d()
    dx = (x[1] - x[0]).item()
    tempering_error = 0.0
    # The trough between the bumps: the density's minimum between the two means. p^beta has its
    # minimum at the same point (a power is monotone), so one cut serves every beta.
    between = (x[:, 0] > mix1.means[0, 0]) & (x[:, 0] < mix1.means[1, 0])
    trough = x[between][mix1.log_prob(x[between]).argmin(), 0].item()
    heavy_mass = {}
    for beta in BETAS:
        log_unnorm = beta * mix1.log_prob(x)  # log p^beta, unnormalised
        density = log_unnorm.exp() / (log_unnorm.exp().sum() * dx)  # renormalise on the grid
        # mass of p^beta / Z_beta right of the trough: the heavier bump (weight 0.7 at beta = 1)
        heavy_mass[beta] = (density[x[:, 0] > trough].sum() * dx).item()
        ax_p.plot(x[:, 0], density, label=f"beta = {beta:g}")
        s_beta = tempered_score(mix1.score, beta)(x)
        ax_s.plot(x[:, 0], s_beta[:, 0], label=f"beta = {beta:g}")
        tempering_error = max(tempering_error, max_abs_diff(
            s_beta, autograd_score(lambda z, k=beta: k * mix1.log_prob(z), x)))
    ax_p.set_xlabel("x")
    ax_p.set_ylabel("density (renormalised)")
    ax_p.set_title("Tempered densities $p^\\beta / Z_\\beta$")
    ax_p.legend()
    ax_s.axhline(0, color="gray", lw=0.8, ls=":")
    ax_s.set_ylim(-15, 15)
    ax_s.set_xlabel("x")
    ax_s.set_ylabel("score")
    ax_s.set_title("Their scores: beta * s(x)")
    ax_s.legend()
    run.save(fig, "affine_and_tempering")
    return {"affine_error": affine_error, "tempering_error": tempering_error,
            "trough": trough, "heavy_mass": heavy_mass}


# %% tags=["active-ipynb"]
# r.update(demo_affine_and_tempering(run, cfg))


# %% [markdown]
# ## 4.6 Moments of the score: E[s] = 0 and E[s s^T] = Fisher information
# We draw samples from the full-covariance Gaussian of 4.2 and average $s$ and $s s^\top$ over
# growing subsets. The estimates settle on $0$ and on $\Sigma^{-1}$; the shaded bands are
# $\pm 2$ standard errors (standard deviation of the averaged terms divided by $\sqrt{N}$), which
# shrink like $1/\sqrt{N}$. The summary reports each final estimate's deviation from the exact
# value *in units of its standard error*: values below about 3 are what chance produces; a
# wrong formula would give tens or hundreds. The same check on exact samples of the banana
# tests the non-Gaussian case, $I_F = \mathrm{diag}(1 + 4\kappa^2, 1)$.

# %%
def demo_fisher_information(run, cfg: Config) -> dict:
    L = torch.linalg.cholesky(GAUSS_COV)
    z = torch.randn(cfg.mc_samples, 2, generator=run.generator, dtype=DTYPE)
    samples = GAUSS_MEAN + z @ L.T  # x = mu + L z ~ N(mu, Sigma)
    precision = torch.linalg.inv(GAUSS_COV)

    def score(x):
        return gaussian_score(x, GAUSS_MEAN, GAUSS_COV)

    sizes = np.unique(np.geomspace(min(100, cfg.mc_samples), cfg.mc_samples, 25).astype(int))
    entries = [("E[s_1]", ("mean", 0), 0.0), ("E[s_2]", ("mean", 1), 0.0),
               ("E[s_1 s_1]", ("second_moment", 0, 0), precision[0, 0].item()),
               ("E[s_1 s_2]", ("second_moment", 0, 1), precision[0, 1].item()),
               ("E[s_2 s_2]", ("second_moment", 1, 1), precision[1, 1].item())]
    traces = {name: ([], []) for name, *_ in entries}
    for n in sizes:
        mom = score_moments(score, samples[:n])
        for name, (key, *idx), _ in entries:
            traces[name][0].append(mom[key][tuple(idx)].item())
            traces[name][1].append(mom[key + "_se"][tuple(idx)].item())

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, _, exact in entries:
        est, se = np.array(traces[name][0]), np.array(traces[name][1])
        (line,) = ax.plot(sizes, est, label=f"{name} (exact {exact:.3f})")
        ax.fill_between(sizes, est - 2 * se, est + 2 * se, color=line.get_color(), alpha=0.2)
        ax.axhline(exact, color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("number of samples N")
    ax.set_ylabel("Monte Carlo estimate (band: $\\pm 2$ standard errors)")
    ax.set_title("Score moments converge to 0 and to the Fisher information $\\Sigma^{-1}$")
    ax.legend(ncol=2)
    run.save(fig, "score_moments")

    final = score_moments(score, samples)
    banana = score_moments(banana_score, banana_sample(cfg.mc_samples, 0.5, run.generator))
    banana_fisher = torch.diag(torch.tensor([1 + 4 * 0.5**2, 1.0], dtype=DTYPE))
    return {"mean_score": final["mean"].tolist(),
            "mean_dev": (final["mean"] / final["mean_se"]).abs().max().item(),
            "fisher": final["second_moment"], "precision": precision,
            "fisher_dev": ((final["second_moment"] - precision)
                           / final["second_moment_se"]).abs().max().item(),
            "banana_fisher": banana["second_moment"], "banana_fisher_exact": banana_fisher,
            "banana_dev": ((banana["second_moment"] - banana_fisher)
                           / banana["second_moment_se"]).abs().max().item()}


# %% tags=["active-ipynb"]
# r.update(demo_fisher_information(run, cfg))


# %% [markdown]
# # Section 5: Exercises
#
# Replace each `raise NotImplementedError` with your answer, then run
# `pytest tests/test_01_exercises.py -k your_answer`, which runs only the checks of your answers
# (without `-k` the file also tests the reference solutions and the checks themselves). A
# skipped test means "not attempted yet"; a failure says what is wrong and gives a hint, and
# where a check knows the formula, `SBGM_SHOW_SOLUTION=1 pytest ...` shows it too. Reference
# answers are in `solutions/01_score_functions_basics.py`: try first, then compare.

# %%
def exercise_student_t_score(x: Tensor, nu: float) -> Tensor:
    """Exercise 1.1: the score of the Student-t distribution (heavy tails).

    With ``nu`` degrees of freedom its density is known only up to a constant:
        p(x) proportional to (1 + x^2 / nu)^(-(nu + 1) / 2).

    Args:
        x:  (N,) points on the real line.
        nu: degrees of freedom, > 0.
    Returns:
        (N,) the score d/dx log p(x).

    Example: for nu = 4, the score at x = 2 is -1.25 (a Gaussian N(0, 1) would give -2).

    Hint: write log p(x) = -(nu + 1)/2 * log(1 + x^2/nu) + const and differentiate. Compare
    with the Gaussian score -x: what happens far from 0, and why do heavy tails cause that?
    """
    # TODO: return the closed-form score (no autograd).
    raise NotImplementedError("Exercise 1.1: implement exercise_student_t_score")


def exercise_ring_score(x: Tensor, radius: float, width: float) -> Tensor:
    """Exercise 1.2: the score of a ring-shaped energy model in 2D.

    p(x) is proportional to exp(-E(x)) with E(x) = (|x| - radius)^2 / (2 width^2).

    Args:
        x: (N, 2) points, none at the origin.
        radius, width: positive numbers.
    Returns:
        (N, 2) the score -grad E(x).

    Example: with radius 2 and width 0.5, the score at (3, 0) is (-4, 0): pulled back inwards.

    Hint: grad |x| = x / |x|. The arrows should point towards the circle from both sides.
    """
    # TODO: closed form, using the chain rule through r = |x|.
    raise NotImplementedError("Exercise 1.2: implement exercise_ring_score")


def exercise_mixture_score(x: Tensor, weights: Tensor, means: Tensor, std: float) -> Tensor:
    """Exercise 1.3: the score of an isotropic Gaussian mixture, written from scratch.

    p(x) = sum_k w_k N(x; mu_k, std^2 I).

    Args:
        x:       (N, D) points.
        weights: (K,) positive, summing to 1.
        means:   (K, D).
        std:     the common standard deviation of all components.
    Returns:
        (N, D) the score sum_k r_k(x) * (-(x - mu_k) / std^2).

    Example: with one component the answer is -(x - mu_1) / std^2.

    Hint: compute log(w_k) + log N(x; mu_k, std^2 I) as an (N, K) tensor, turn it into the
    responsibilities r_k(x) with torch.softmax(..., dim=1) (stable even 50 std away from every
    mean, where the densities themselves underflow to 0), then average the component scores.
    Do not use GaussianMixture: the point is to write it yourself.
    """
    # TODO: responsibilities (N, K), component scores (N, K, D), weighted sum over k.
    raise NotImplementedError("Exercise 1.3: implement exercise_mixture_score")


def exercise_density_from_score(score_values: Tensor, x_grid: Tensor) -> Tensor:
    """Exercise 1.4: recover a 1D density from its score alone.

    The score determines log p up to an additive constant; normalising fixes the constant.

    Args:
        score_values: (M,) the score s(x) at the points of ``x_grid``.
        x_grid:       (M,) equally spaced, increasing points covering essentially all the mass.
    Returns:
        (M,) the density p(x) on the grid, normalised so that its integral (trapezoid rule
        on the grid) is 1.

    Example: for s(x) = -x on a grid over [-8, 8] you should get the N(0, 1) density.

    Hint: log p(x_j) - log p(x_0) = integral of s from x_0 to x_j; a cumulative trapezoid sum
    (0.5 * (s[i] + s[i+1]) * dx, accumulated with torch.cumsum) computes it. Exponentiate
    (subtract the maximum first to avoid overflow) and divide by torch.trapezoid(p, x_grid).
    """
    # TODO: integrate the score, exponentiate, normalise.
    raise NotImplementedError("Exercise 1.4: implement exercise_density_from_score")


def exercise_product_of_gaussians(mean1: Tensor, cov1: Tensor, mean2: Tensor,
                                  cov2: Tensor) -> tuple[Tensor, Tensor]:
    """Exercise 1.5: scores add when densities multiply: the product of two Gaussians.

    The score of p1(x) p2(x) / Z is s1(x) + s2(x). For two Gaussians that sum is again linear
    in x; read off the mean and covariance of the normalised product from it.

    Args:
        mean1, mean2: (D,); cov1, cov2: (D, D) symmetric positive definite.
    Returns:
        (mean, cov) of the product density, shapes (D,) and (D, D).

    Example: N(0, 1) * N(2, 1) in 1D is proportional to N(1, 1/2).

    Hint: s1 + s2 = -(P1 + P2) x + (P1 mu1 + P2 mu2) with P = Sigma^{-1}; match this with
    -Sigma^{-1}(x - mu). (The same addition of scores gives classifier guidance in module 10:
    grad log p(x | y) = grad log p(x) + grad log p(y | x).)
    """
    # TODO: precisions add; the mean is the precision-weighted average of the means.
    raise NotImplementedError("Exercise 1.5: implement exercise_product_of_gaussians")


# %% [markdown]
# ## Summary
# - The score $\nabla_x \log p(x)$ is a vector field pointing uphill in log-density; it vanishes
#   at modes and grows away from the data.
# - It never involves the normalising constant: $\nabla \log (e^{-E}/Z) = -\nabla E$.
# - Gaussians have linear scores $-\Sigma^{-1}(x-\mu)$; mixtures average component scores with
#   posterior weights; energy models give $-\nabla E$. Autograd confirms each to round-off.
# - Scores transform as $A^{-\top} s(A^{-1}(y-b))$ under affine maps and scale by $\beta$ under
#   tempering.
# - $\mathbb{E}_p[s] = 0$ and $\mathbb{E}_p[s s^\top]$ is the Fisher information ($\Sigma^{-1}$
#   for a Gaussian): the integration-by-parts fact that module 02 turns into score matching.

# %%
def main(argv=None):
    run = start_run(make_parser(), MODULE, argv)
    cfg = Config.quick() if run.quick else Config()
    if run.args.mc_samples is not None:
        cfg.mc_samples = run.args.mc_samples

    r = {}
    r.update(demo_1d(run, cfg))
    r.update(demo_score_fields(run, cfg))
    r.update(demo_normaliser_invariance(run, cfg))
    r.update(demo_score_magnitude(run, cfg))
    r.update(demo_affine_and_tempering(run, cfg))
    r.update(demo_fisher_information(run, cfg))

    fisher, prec, bf = r["fisher"], r["precision"], r["banana_fisher"]
    rows = [
        ("closed form vs autograd, 1D Gaussians and mixture", f"{r['1d_autograd_error']:.1e}",
         "< 1e-12 (float64 round-off is ~1e-14)"),
        ("closed form vs autograd, full-covariance Gaussian",
         f"{r['gaussian_autograd_error']:.1e}", "< 1e-12"),
        ("closed form vs autograd, 3-component mixture", f"{r['mixture_autograd_error']:.1e}",
         "< 1e-12"),
        ("closed form vs autograd, banana energy", f"{r['banana_autograd_error']:.1e}",
         "< 1e-12"),
        ("banana: Z by numerical integration", f"{r['Z_numerical']:.6f}",
         f"2 pi = {2 * math.pi:.6f}"),
        ("banana: |score(log p) - score(-E)|", f"{r['normaliser_score_diff']:.1e}", "0"),
        ("|score| at the mixture's component means", f"{r['max_score_at_means']:.3f}",
         "small, not 0: modes sit slightly off the means"),
        ("affine map: A^-T s_X(A^-1(y-b)) vs exact", f"{r['affine_error']:.1e}", "< 1e-12"),
        ("tempering: beta s vs autograd of beta log p", f"{r['tempering_error']:.1e}", "< 1e-12"),
        (f"tempering: mass of p^beta right of the trough (x > {r['trough']:.2f}), "
         + ", ".join(f"beta={b:g}" for b in r["heavy_mass"]),
         ", ".join(f"{m:.2f}" for m in r["heavy_mass"].values()),
         "grows with beta; 0.70 (the mixture weight) at beta = 1"),
        (f"E_p[s], Gaussian (N = {cfg.mc_samples})",
         "[" + ", ".join(f"{v:+.4f}" for v in r["mean_score"]) + "]",
         f"[0, 0]; deviation {r['mean_dev']:.1f} std. errors (< 3 expected)"),
        ("E_p[s s^T] entries (11, 12, 22), Gaussian",
         f"{fisher[0, 0]:.3f}, {fisher[0, 1]:.3f}, {fisher[1, 1]:.3f}",
         f"Sigma^-1: {prec[0, 0]:.3f}, {prec[0, 1]:.3f}, {prec[1, 1]:.3f};"
         f" deviation {r['fisher_dev']:.1f} s.e."),
        ("E_p[s s^T] entries (11, 12, 22), banana",
         f"{bf[0, 0]:.3f}, {bf[0, 1]:.3f}, {bf[1, 1]:.3f}",
         f"diag(1 + 4 kappa^2, 1) = 2, 0, 1; deviation {r['banana_dev']:.1f} s.e."),
    ]
    run.finish(rows, globals(), "01")
    return r


# %% tags=["active-py"]
if __name__ == "__main__":
    main()
