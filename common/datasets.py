"""Data: 2D toy distributions made in code, and image data sets read from a data root.

2D toys
-------
``GaussianMixture`` is the workhorse of the tutorial because everything about it is known in
closed form: its density, its score, and the density of ``x_t = a * x_0 + sigma * z`` (noise
added to a mixture is again a mixture), hence the exact *perturbed* score and the exact
posterior mean ``E[x_0 | x_t]``. Learned scores and samplers are measured against these.

The other toys (Swiss roll, two moons, checkerboard, two spirals) have no simple density; they
are for training and sampling. ``sample_toy(name, n)`` draws any of them by name.

Images
------
``load_mnist`` and ``load_cifar10`` read from the data root: ``--data-dir``, else the environment
variable ``SBGM_DATA_DIR``, else ``./data``. When the files are missing and cannot be
downloaded, the error says which files to put where.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Gaussian mixtures with exact scores
# ----------------------------------------------------------------------------------------------
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, C_k) in D dimensions, with everything in closed form.

    Args:
        weights: (K,) positive, summing to 1.
        means:   (K, D).
        covs:    (K, D, D) symmetric positive definite.

    Parameters are stored in float64; every method computes in the dtype and on the device of
    its input ``x`` (so it serves float32 networks and float64 gradient checks alike).

    Key formulas (r_k(x) are the posterior responsibilities of the components):

        log p(x)   = logsumexp_k [ log w_k + log N(x; mu_k, C_k) ]
        r_k(x)     = w_k N(x; mu_k, C_k) / p(x)
        score(x)   = grad_x log p(x) = sum_k r_k(x) * ( -C_k^{-1} (x - mu_k) )

    Perturbation: if x_0 ~ p and x_t = a x_0 + sigma z with z ~ N(0, I), then

        x_t ~ sum_k w_k N(a mu_k, a^2 C_k + sigma^2 I)       (``perturbed(sigma, a)``)
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must be (K, D) with K={w.shape[0]}, got {tuple(mu.shape)}")
        K, D = mu.shape
        if cov.shape != (K, D, D):
            raise ValueError(f"covs must be (K, D, D) = ({K}, {D}, {D}), got {tuple(cov.shape)}")
        if (w <= 0).any() or abs(w.sum().item() - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if not torch.allclose(cov, cov.transpose(1, 2)):
            raise ValueError("covariances must be symmetric")
        chol, info = torch.linalg.cholesky_ex(cov)
        if (info != 0).any():
            raise ValueError("covariances must be positive definite")
        self.weights, self.means, self.covs = w, mu, cov
        self.chol = chol  # C_k = L_k L_k^T, used to sample
        self.precisions = torch.cholesky_inverse(chol)  # C_k^{-1}
        # log det(2 pi C_k) = D log(2 pi) + 2 sum log diag(L_k)
        self.log_norm = D * math.log(2 * math.pi) + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, weights, means, std) -> GaussianMixture:
        """Components N(mu_k, std_k^2 I); ``std`` is a number or one per component."""
        mu = torch.as_tensor(means, dtype=torch.float64)
        K, D = mu.shape
        std = torch.as_tensor(std, dtype=torch.float64).expand(K)
        covs = std[:, None, None] ** 2 * torch.eye(D, dtype=torch.float64)
        return cls(weights, mu, covs)

    @classmethod
    def eight_gaussians(cls, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
        """Eight equal-weight Gaussians on a circle of ``radius`` (a classic 2D test set)."""
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls.isotropic(torch.full((8,), 1 / 8), means, std)

    @classmethod
    def separated_modes(cls, weights=(0.8, 0.2), offset: float = 5.0) -> GaussianMixture:
        """w_1 N((-5,-5), I) + w_2 N((5,5), I): two far-apart modes of unequal weight.

        With the default 0.8/0.2 this is the example of Song's blog post where plain Langevin
        dynamics, even with the exact score, fails to recover the relative weights.
        """
        means = [[-offset, -offset], [offset, offset]]
        return cls.isotropic(weights, means, 1.0)

    # -- shape facts ----------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k, shape (D,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (C_k + mu_k mu_k^T) - E[x] E[x]^T, shape (D, D)."""
        m = self.mean()
        second = (self.weights[:, None, None]
                  * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(m, m)

    # -- density and score ----------------------------------------------------------------------
    def _params(self, x: Tensor):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        kw = dict(dtype=x.dtype, device=x.device)
        return (self.weights.to(**kw), self.means.to(**kw), self.precisions.to(**kw),
                self.log_norm.to(**kw))

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; mu_k, C_k) for every point and component, shape (N, K)."""
        w, mu, prec, log_norm = self._params(x)
        diff = x[:, None, :] - mu[None]  # (N, K, D)
        maha = torch.einsum("nkd,kde,nke->nk", diff, prec, diff)
        return w.log() - 0.5 * (maha + log_norm)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x), shape (N,)."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """r_k(x) = P(component k | x), shape (N, K); rows sum to 1."""
        return torch.softmax(self.component_log_probs(x), dim=1)

    def component_scores(self, x: Tensor) -> Tensor:
        """-C_k^{-1} (x - mu_k) for every point and component, shape (N, K, D)."""
        _, mu, prec, _ = self._params(x)
        return -torch.einsum("kde,nke->nkd", prec, x[:, None, :] - mu[None])

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) = sum_k r_k(x) (-C_k^{-1} (x - mu_k)), shape (N, D)."""
        r = self.responsibilities(x)
        return (r[:, :, None] * self.component_scores(x)).sum(1)

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device=None) -> Tensor:
        """n independent draws, shape (n, D): pick k ~ w, then x = mu_k + L_k z."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nde,ne->nd", self.chol[k], z)
        return x.to(dtype=dtype or torch.get_default_dtype(), device=device)

    # -- noise perturbation ---------------------------------------------------------------------
    def perturbed(self, sigma: float, scale: float = 1.0) -> GaussianMixture:
        """Law of x_t = scale x_0 + sigma z: components N(scale mu_k, scale^2 C_k + sigma^2 I)."""
        sigma, scale = float(sigma), float(scale)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, scale * self.means,
                               scale**2 * self.covs + sigma**2 * eye)

    def perturbed_score(self, x: Tensor, sigma: float, scale: float = 1.0) -> Tensor:
        """grad log p_sigma(x) for x = scale * x_0 + sigma * z (the target of denoising SM)."""
        return self.perturbed(sigma, scale).score(x)

    def posterior_mean(self, x_noisy: Tensor, sigma: float, scale: float = 1.0) -> Tensor:
        """E[x_0 | x_t] for x_t = scale * x_0 + sigma * z, by Gaussian conditioning (no scores).

        Within component k, (x_0, x_t) are jointly Gaussian, so
            E[x_0 | x_t, k] = mu_k + a C_k (a^2 C_k + sigma^2 I)^{-1} (x_t - a mu_k),
        and the answer averages these with the responsibilities of the perturbed mixture.
        Tweedie's formula gives the same thing from the score alone (module 04 checks that).
        """
        a = float(scale)
        noisy = self.perturbed(sigma, a)
        r = noisy.responsibilities(x_noisy)  # (N, K)
        kw = dict(dtype=x_noisy.dtype, device=x_noisy.device)
        gain = a * self.covs @ noisy.precisions  # (K, D, D): a C_k (a^2 C_k + sigma^2 I)^{-1}
        resid = x_noisy[:, None, :] - a * self.means.to(**kw)[None]  # (N, K, D)
        cond = self.means.to(**kw)[None] + torch.einsum("kde,nke->nkd", gain.to(**kw), resid)
        return (r[:, :, None] * cond).sum(1)


# ----------------------------------------------------------------------------------------------
# Other 2D toys (samples only)
# ----------------------------------------------------------------------------------------------
def _uniform(n: int, generator) -> Tensor:
    """U(0, 1) draws as a float64 column, shape (n, 1)."""
    return torch.rand(n, 1, generator=generator, dtype=torch.float64)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    """A 2D Swiss roll: angle t ~ U(1.5 pi, 4.5 pi), point (t cos t, t sin t) / 5, plus noise."""
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    x = torch.cat([t * t.cos(), t * t.sin()], dim=1) / 5.0
    return x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> Tensor:
    """Two interleaved half circles, centred and scaled to about [-2, 2]^2."""
    upper = torch.rand(n, generator=generator) < 0.5
    theta = math.pi * _uniform(n, generator)[:, 0]
    x = torch.stack([theta.cos(), theta.sin()], dim=1)
    x[~upper] = torch.stack([1 - theta[~upper].cos(), 0.5 - theta[~upper].sin()], dim=1)
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.6
    return x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the eight dark squares of a 4x4 checkerboard covering [-2, 2]^2."""
    x1 = 4 * _uniform(n, generator)[:, 0] - 2
    row = torch.randint(0, 2, (n,), generator=generator).double() * 2  # 0 or 2
    x2 = _uniform(n, generator)[:, 0] - row + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1)


def two_spirals(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """Two interleaved spiral arms (opposite signs), scaled to about [-3, 3]^2."""
    r = _uniform(n, generator)[:, 0].sqrt() * 3 * math.pi  # sqrt: uniform density along the arm
    arm = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0).double()
    x = arm[:, None] * torch.stack([-r * r.cos(), r * r.sin()], dim=1) / math.pi
    return x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def _eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    return GaussianMixture.eight_gaussians().sample(n, generator, dtype=torch.float64)


TOY_DATASETS = {
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
    "eight_gaussians": _eight_gaussians,
    "checkerboard": checkerboard,
    "two_spirals": two_spirals,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """``n`` points (n, 2) from the 2D toy ``name`` (one of ``TOY_DATASETS``)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return TOY_DATASETS[name](n, generator).to(dtype or torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------
# Image data sets
# ----------------------------------------------------------------------------------------------
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_SUBSET = Path("CIFAR10_subset") / "cifar10_train_first4000.npz"


class DataNotFoundError(FileNotFoundError):
    """An image data set is not under the data root and could not be downloaded."""


def resolve_data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SBGM_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("SBGM_DATA_DIR")
    return Path(env).expanduser() if env else Path("data")


def mnist_available(data_dir: str | Path | None = None) -> bool:
    """True when the four MNIST files (raw or .gz) are under ``<root>/MNIST/raw/``."""
    raw = resolve_data_root(data_dir) / "MNIST" / "raw"
    return all((raw / f).exists() or (raw / f"{f}.gz").exists() for f in MNIST_FILES)


def load_mnist(data_dir: str | Path | None = None, train: bool = True, download: bool = True,
               transform=None):
    """torchvision's MNIST (60,000 train / 10,000 test images, 1x28x28 in [0, 1] by default).

    Looks in ``<root>/MNIST/raw/``. If the files are not there it tries to download them (when
    ``download``); if that fails too, raises ``DataNotFoundError`` naming the files and folder.
    """
    from torchvision import datasets, transforms

    root = resolve_data_root(data_dir)
    transform = transform or transforms.ToTensor()
    try:
        return datasets.MNIST(str(root), train=train, download=False, transform=transform)
    except RuntimeError:
        pass  # not found: torchvision raises RuntimeError("Dataset not found ...")
    reason = "download=False"
    if download:
        try:
            # With only the .gz originals present this extracts them offline (md5 sums match).
            return datasets.MNIST(str(root), train=train, download=True, transform=transform)
        except Exception as err:  # network errors come in many types
            reason = f"download failed: {type(err).__name__}: {err}"
    files = "\n".join(f"    {root / 'MNIST' / 'raw' / f}" for f in MNIST_FILES)
    raise DataNotFoundError(
        f"MNIST was not found under {root / 'MNIST' / 'raw'} ({reason}).\n"
        f"Place these four files there (the .gz originals from the MNIST site also work):\n"
        f"{files}\n"
        f"or point --data-dir (or the environment variable SBGM_DATA_DIR) at a folder that "
        f"contains MNIST/raw/."
    )


class NpzImageDataset(torch.utils.data.Dataset):
    """Images stored as a uint8 array (N, H, W, C) with labels (N,), served as (C, H, W) tensors."""

    def __init__(self, path: str | Path, transform=None):
        with np.load(path) as data:
            self.images = data["images"]
            self.labels = data["labels"].astype(np.int64)
            self.classes = [str(c) for c in data["classes"]] if "classes" in data else None
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{path}: expected uint8 images (N, H, W, C), "
                             f"got {self.images.dtype} {self.images.shape}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255.0
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def load_cifar10(data_dir: str | Path | None = None, train: bool = True, download: bool = True,
                 transform=None):
    """CIFAR-10 (3x32x32 in [0, 1]) from ``<root>/cifar-10-batches-py/`` (torchvision's format).

    If that is missing but ``<root>/CIFAR10_subset/cifar10_train_first4000.npz`` exists, the
    training split is served from that 4,000-image subset (and a note says so). Otherwise it
    tries to download, and failing that raises ``DataNotFoundError`` saying what to place where.
    ``transform`` applies to tensors in [0, 1] in both cases.
    """
    from torchvision import datasets, transforms

    root = resolve_data_root(data_dir)
    to_tensor = transforms.ToTensor()
    full_transform = to_tensor if transform is None else transforms.Compose([to_tensor, transform])
    try:
        return datasets.CIFAR10(str(root), train=train, download=False, transform=full_transform)
    except RuntimeError:
        pass
    if train and (root / CIFAR10_SUBSET).exists():
        print(f"Note: full CIFAR-10 not found; using the 4,000-image subset "
              f"{root / CIFAR10_SUBSET}")
        return NpzImageDataset(root / CIFAR10_SUBSET, transform=transform)
    reason = "download=False"
    if download:
        try:
            return datasets.CIFAR10(str(root), train=train, download=True, transform=full_transform)
        except Exception as err:
            reason = f"download failed: {type(err).__name__}: {err}"
    raise DataNotFoundError(
        f"CIFAR-10 was not found under {root} ({reason}).\n"
        f"Place the python version of CIFAR-10 there, i.e. the folder\n"
        f"    {root / 'cifar-10-batches-py'}  (data_batch_1..5, test_batch, batches.meta)\n"
        f"or the archive {root / 'cifar-10-python.tar.gz'}, or point --data-dir (or "
        f"SBGM_DATA_DIR) at a folder that contains it."
    )
