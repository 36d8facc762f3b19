"""Distances between two sets of samples, for judging low-dimensional samplers.

Both work on point clouds ``x`` (N, D) and ``y`` (M, D), e.g. a sampler's output against fresh
draws from the data. Smaller is better; two independent draws from the same distribution give a
small but non-zero value, which is the floor any sampler should be compared with.

MMD (maximum mean discrepancy) with the Gaussian (RBF) kernel
    k(a, b) = exp(-|a - b|^2 / (2 h^2))
    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)
estimated without bias (the diagonal terms k(x_i, x_i) are left out), or with ``biased=True``
as the plug-in (V-statistic) estimate with the diagonals kept, |mean_i phi(x_i) - mean_j phi(y_j)|^2
in the kernel's feature space: never negative, so its square root is a distance between the two
point sets and ratios of it are defined; for two draws of one distribution it does not vanish but
is about (2 - E k(x, x') - E k(y, y')) / N for N = M. Bandwidth rule: unless
``bandwidth`` is given, h is the median of the pairwise distances in the pooled sample
(the "median heuristic"). Pass a fixed ``bandwidth`` when comparing numbers across runs.

Sliced Wasserstein-2 distance
    SW_2^2(p, q) = E_theta [ W_2^2(theta^T x, theta^T y) ],  theta uniform on the unit sphere,
estimated with ``n_projections`` random directions; each 1D W_2 compares sorted projections.

Frechet distance (``frechet_distance``), for feature vectors of images
    d_F^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})
between Gaussian fits (mean, covariance) of two sets of features (N, F) and (M, F); reported
as d_F^2 without the square root, as FID is. It sees only two moments: equal means and
covariances give 0 whatever else differs. Computed from a classifier's features it is *not* FID
(that name belongs to Inception-v3's features); modules 09 and 10 call it the Frechet distance
in the evaluation classifier's feature space.

Fraction off the modes (``off_mode_fraction``; ``off_mode_mask`` marks the points), for
samples of a Gaussian mixture
    off(x) = 1  if  min_k (x - mu_k)^T C_k^{-1} (x - mu_k) > r^2,  else 0,
the share of points farther than r "standard deviations" (Mahalanobis distance r) from every
component. Points of the mixture itself are off with probability at most P(chi2_D > r^2)
(exactly that when the components do not overlap within radius r), given by
``chi2_tail(D, r)``: with D = 2 and r = 3 it is exp(-9/2) = 1.1%. A sampler that smears mass
between the modes shows up here long before a sliced distance notices.

The floor (``distance_floor``)
    mean and sample standard deviation of distance(a, b) over independent pairs a, b of fresh
    data sets of the sampler's size: what a perfect sampler would score, and how much a single
    distance scatters. Differences between samplers smaller than that spread are noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Tensor = torch.Tensor


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected x (N, D) and y (M, D), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("need at least two points in each sample")


def median_bandwidth(x: Tensor, y: Tensor) -> float:
    """Median pairwise distance of the pooled sample (at most 2,000 points are used)."""
    z = torch.cat([x, y])[:2000].double()
    d = torch.cdist(z, z)
    return d[torch.triu_indices(len(z), len(z), offset=1).unbind()].median().item()


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None, biased: bool = False) -> float:
    """Unbiased estimate of MMD^2 between samples ``x`` (N, D) and ``y`` (M, D), RBF kernel.

    Can be slightly negative when the two samples come from the same distribution. With
    ``biased=True`` the plug-in estimate (diagonal terms kept), which is >= 0.
    """
    _check_pair(x, y)
    x, y = x.double(), y.double()
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if h <= 0:
        raise ValueError(f"bandwidth must be positive, got {h}")

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * h * h))

    n, m = len(x), len(y)
    kxy = k(x, y).mean()
    if biased:  # |mean phi(x) - mean phi(y)|^2, every pair including i = j
        return (k(x, x).mean() + k(y, y).mean() - 2 * kxy).clamp_min(0).item()
    kxx = (k(x, x).sum() - n) / (n * (n - 1))  # k(a, a) = 1 on the diagonal
    kyy = (k(y, y).sum() - m) / (m * (m - 1))
    return (kxx + kyy - 2 * kxy).item()


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Monte Carlo sliced Wasserstein-2 distance between ``x`` (N, D) and ``y`` (M, D).

    For N != M the 1D distances compare quantiles at max(N, M) evenly spaced levels.
    """
    _check_pair(x, y)
    x, y = x.double().cpu(), y.double().cpu()
    theta = torch.randn(n_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    px, py = x @ theta.T, y @ theta.T  # (N, P), (M, P)
    if len(x) == len(y):
        qx, qy = px.sort(dim=0).values, py.sort(dim=0).values
    else:
        n = max(len(x), len(y))
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        qx, qy = torch.quantile(px, levels, dim=0), torch.quantile(py, levels, dim=0)
    return (qx - qy).square().mean().sqrt().item()


def off_mode_mask(x: Tensor, means: Tensor, precisions: Tensor, radius: float = 3.0) -> Tensor:
    """Bool (N,): which points of ``x`` (N, D) lie farther than Mahalanobis distance ``radius``
    from every component of a mixture with ``means`` (K, D) and precisions C_k^{-1}
    ``precisions`` (K, D, D):

        off(x_i) = [ min_k (x_i - mu_k)^T C_k^{-1} (x_i - mu_k) > radius^2 ].

    For a ``common.datasets.GaussianMixture`` pass ``data.means, data.precisions``.
    """
    if x.ndim != 2 or means.ndim != 2 or x.shape[1] != means.shape[1]:
        raise ValueError(f"expected x (N, D) and means (K, D), got {tuple(x.shape)} and "
                         f"{tuple(means.shape)}")
    if precisions.shape != (*means.shape, means.shape[1]):
        raise ValueError(f"precisions must be (K, D, D), got {tuple(precisions.shape)}")
    x = x.detach().double().cpu()
    diff = x[:, None, :] - means.double().cpu()[None]  # (N, K, D)
    # squared Mahalanobis distance to each component: d_ik^2 = diff^T C_k^{-1} diff
    d2 = torch.einsum("nkd,kde,nke->nk", diff, precisions.double().cpu(), diff)
    return d2.min(dim=1).values > radius**2


def off_mode_fraction(x: Tensor, means: Tensor, precisions: Tensor, radius: float = 3.0) -> float:
    """Share of the points ``x`` (N, D) off the modes: the mean of ``off_mode_mask``."""
    return off_mode_mask(x, means, precisions, radius).double().mean().item()


def chi2_tail(dim: int, radius: float = 3.0) -> float:
    """P(chi2_dim > radius^2): the share of one Gaussian's draws farther than Mahalanobis distance
    ``radius`` from its mean, i.e. ``off_mode_fraction`` of well-separated mixture data.
    For dim = 2 it is exp(-radius^2 / 2)."""
    # P(chi2_D > r^2) = Q(D/2, r^2/2), the regularised upper incomplete gamma function
    a = torch.tensor(dim / 2, dtype=torch.float64)
    return torch.special.gammaincc(a, torch.tensor(radius**2 / 2, dtype=torch.float64)).item()


def distance_floor(draw: Callable[[], Tensor], distance: Callable[[Tensor, Tensor], float],
                   n_pairs: int) -> tuple[float, float]:
    """Mean and sample standard deviation of distance(draw(), draw()) over n_pairs pairs.

    ``draw()`` returns a fresh data set (e.g. ``lambda: data.sample(n, generator)``), drawn
    twice per pair, first a then b, before ``distance(a, b)`` is called; so with seeded
    generators the result is reproducible and equals the hand-written loop
    ``[distance(draw(), draw()) for _ in range(n_pairs)]``. The statistics are computed in
    float64 (numpy), the standard deviation with ddof=1 (needs n_pairs >= 2).
    """
    if not isinstance(n_pairs, int) or n_pairs < 2:
        raise ValueError(f"n_pairs must be an integer >= 2 (a standard deviation needs two "
                         f"values), got {n_pairs!r}")
    values = np.array([float(distance(draw(), draw())) for _ in range(n_pairs)])
    return float(values.mean()), float(values.std(ddof=1))


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """d_F^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of Gaussian fits to
    features ``feats_a`` (N, F) and ``feats_b`` (M, F), N, M >= 2 (unbiased covariances).

    tr((S_a S_b)^{1/2}) is computed as the sum of sqrt(eigenvalues) of S_a^{1/2} S_b S_a^{1/2}
    (symmetric PSD, so eigvalsh is stable), which equals the trace of the (non-symmetric)
    square root of S_a S_b.
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected features (N, F) and (M, F), got {tuple(feats_a.shape)} "
                         f"and {tuple(feats_b.shape)}")
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * middle).item()
