"""Data: 2D toy distributions made in code, and image data sets read from a data root.

2D toys
-------
``GaussianMixture`` is the workhorse of the tutorial because everything about it is known in
closed form: its density, its score, and the density of ``x_t = a * x_0 + sigma * z`` (noise
added to a mixture is again a mixture), hence the exact *perturbed* score and the exact
posterior mean ``E[x_0 | x_t]``. Learned scores and samplers are measured against these.

The Swiss roll (module 04, bench/bench_2d.py) and the checkerboard (bench/bench_2d.py) have no
simple density; they are for training and sampling.

Images
------
``load_mnist`` and ``load_cifar10`` read from the data root: ``--data-dir``, else the environment
variable ``SBGM_DATA_DIR``, else ``./data``. ``.gz`` / ``.tar.gz`` originals are unpacked offline.
Every failure (files missing, a download that failed, a truncated file) raises
``DataNotFoundError`` with its own message saying which file is wrong and what to put where.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tarfile
import tempfile
import zipfile
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


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the eight dark squares of a 4x4 checkerboard covering [-2, 2]^2."""
    x1 = 4 * _uniform(n, generator)[:, 0] - 2
    row = torch.randint(0, 2, (n,), generator=generator).double() * 2  # 0 or 2
    x2 = _uniform(n, generator)[:, 0] - row + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1)


# ----------------------------------------------------------------------------------------------
# Image data sets
# ----------------------------------------------------------------------------------------------
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The IDX format of MNIST: a big-endian int32 magic number (2051 images, 2049 labels), one int32
# per dimension (count, then rows and columns for images), then one byte per pixel or label.
IDX_MAGIC = {"images": 2051, "labels": 2049}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_SUBSET = Path("CIFAR10_subset") / "cifar10_train_first4000.npz"


class DataNotFoundError(FileNotFoundError):
    """An image data set is not usable under the data root; the message says what to place where.

    ``can_download`` is True when downloading was not tried (``download=False``) and might fetch
    the files, so a command line can point to its own flag for that; after a failed download it
    is False (repeating the flag would not help).
    """

    def __init__(self, message: str, can_download: bool = False):
        super().__init__(message)
        self.can_download = can_download


class DataCorruptError(DataNotFoundError):
    """A data file is there but damaged (truncated, not the expected format).

    A subclass of DataNotFoundError because it asks the same of the user (place a complete
    copy), so every ``except DataNotFoundError`` that turns data problems into a one-line exit
    covers it; its message names the file and what is wrong with it.
    """


def resolve_data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SBGM_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("SBGM_DATA_DIR")
    return Path(env).expanduser() if env else Path("data")


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (torchvision's download errors span several), shortened."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_mnist(data_dir: str | Path | None = None, train: bool = True, download: bool = True,
               transform=None):
    """torchvision's MNIST (60,000 train / 10,000 test images, 1x28x28 in [0, 1] by default).

    Reads the four IDX files in ``<root>/MNIST/raw/``. Files present only as their ``.gz``
    originals are decompressed beside them first (no network needed). Missing files are
    downloaded when ``download`` is true. Every file is checked against the size its header
    promises. Each failure raises ``DataNotFoundError`` (``DataCorruptError`` for a damaged
    file) with its own message: which files are missing, which download failed and why, or
    which file is truncated, and in every case what to place where.
    """
    from torchvision import datasets, transforms

    root = resolve_data_root(data_dir)
    raw = root / "MNIST" / "raw"
    _decompress_gz_originals(raw, MNIST_FILES)
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and not download:
        which = "" if len(missing) == len(MNIST_FILES) else \
            f" ({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing)"
        raise DataNotFoundError(f"MNIST is not under {raw}{which}.\n"
                                + _mnist_manual_route(raw, missing), can_download=True)
    if missing:
        _download_mnist(raw, missing)
    for name in MNIST_FILES:
        _check_idx_file(raw / name, IDX_MAGIC["images" if "images" in name else "labels"])
    return datasets.MNIST(str(root), train=train, download=False,
                          transform=transform or transforms.ToTensor())


def _mnist_manual_route(raw: Path, missing: list[str]) -> str:
    """What to place where: the four files, each marked when missing."""
    width = max(len(str(raw / name)) for name in MNIST_FILES)
    files = "\n".join(f"    {str(raw / name).ljust(width)}"
                      f"{'  (missing)' if name in missing else ''}".rstrip()
                      for name in MNIST_FILES)
    return (f"Place these four files there (uncompressed, or the .gz originals from the MNIST "
            f"site):\n{files}\nor point --data-dir (or the environment variable SBGM_DATA_DIR) "
            f"at a folder that contains MNIST/raw/.{_misplaced_mnist_hint(raw)}")


def _misplaced_mnist_hint(raw: Path) -> str:
    """A sentence for the likeliest slip, a data root that is itself the MNIST/raw folder (or
    MNIST/): the files are there, one or two levels too high; '' when they are not."""
    root = raw.parent.parent
    for folder in (root, root / "MNIST", root / "raw"):
        if any((folder / name).is_file() or (folder / f"{name}.gz").is_file()
               for name in MNIST_FILES):
            if folder == root and root.name == "raw" and root.parent.name == "MNIST":
                return (f"\nThe files are in {root} itself: --data-dir should name the folder "
                        f"that contains MNIST/raw/, here {root.parent.parent}.")
            if folder == root and root.name == "MNIST":
                return (f"\nThe files are in {root} itself: --data-dir should name the folder "
                        f"that contains MNIST/raw/, here {root.parent}.")
            return f"\nMNIST files were found in {folder}: move them to {raw}."
    return ""


def _download_mnist(raw: Path, missing: list[str]) -> None:
    """Fetch MNIST with torchvision into a temporary folder, then move the missing files to
    ``raw``: a failed download (no network) leaves nothing behind, not even empty folders."""
    from torchvision import datasets

    with tempfile.TemporaryDirectory(prefix="sbgm-mnist-") as tmp:
        try:
            datasets.MNIST(tmp, train=True, download=True)
        except Exception as err:  # network errors come in many types
            raise DataNotFoundError(f"MNIST is not under {raw} and downloading it failed "
                                    f"({_one_line(err)}).\n"
                                    + _mnist_manual_route(raw, missing)) from None
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            shutil.move(str(Path(tmp) / "MNIST" / "raw" / name), str(raw / name))


def _decompress_gz_originals(folder: Path, names) -> None:
    """For each of ``names`` present only as ``<name>.gz`` in ``folder``, write the
    decompressed file beside it (through a temporary name, so an interrupted run never leaves a
    truncated file that looks complete)."""
    for name in names:
        target, archive = folder / name, folder / f"{name}.gz"
        if target.exists() or not archive.is_file():
            continue
        partial = folder / f"{name}.part"
        try:
            out = open(partial, "wb")
        except OSError as err:
            raise DataNotFoundError(
                f"cannot decompress {archive} beside it ({_one_line(err)}); decompress it "
                f"yourself (gunzip -k {archive}) or copy {folder} to a writable place and point "
                f"--data-dir there.") from None
        try:
            with out, gzip.open(archive, "rb") as src:
                shutil.copyfileobj(src, out)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            partial.unlink(missing_ok=True)
            raise DataCorruptError(
                f"{archive} is not a complete gzip file ({_one_line(err)}). Delete it and place "
                f"a complete copy (or the uncompressed {name}) in {folder}.") from None
        partial.replace(target)


def _check_idx_file(path: Path, magic: int) -> None:
    """Raise ``DataCorruptError`` unless ``path`` is an IDX file with this magic number
    (2051 images, 2049 labels) whose size is what its header promises."""
    n_dims = magic % 256  # the magic number's last byte counts the dimensions
    header_size = 4 * (1 + n_dims)
    size = path.stat().st_size
    fix = (f"Delete it and place a complete copy of {path.name} (or its .gz original from the "
           f"MNIST site) in {path.parent}.")
    with open(path, "rb") as f:
        header = f.read(header_size)
    found = struct.unpack(">i", header[:4])[0] if size >= 4 else None
    if found is not None and found != magic:
        raise DataCorruptError(f"{path} is not an MNIST IDX file: magic number {found}, "
                               f"expected {magic}. {fix}")
    if size < header_size:
        raise DataCorruptError(f"{path} is truncated: {size} bytes, shorter than its "
                               f"{header_size}-byte header. {fix}")
    dims = struct.unpack(f">{n_dims}i", header[4:])
    expected = header_size + math.prod(dims)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataCorruptError(
            f"{path} is {what}: its header promises {' x '.join(map(str, dims))} bytes, "
            f"{expected:,} bytes with the header, but the file has {size:,}. {fix}")


class NpzImageDataset(torch.utils.data.Dataset):
    """Images stored as a uint8 array (N, H, W, C) with labels (N,), served as (C, H, W) tensors
    (the format of the CIFAR-10 subset)."""

    def __init__(self, path: str | Path, transform=None):
        try:
            with np.load(path) as data:
                self.images = data["images"]
                self.labels = data["labels"].astype(np.int64)
                self.classes = [str(c) for c in data["classes"]] if "classes" in data else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise DataCorruptError(f"{path} is not a readable image archive ({_one_line(err)}); "
                                   f"delete it and place a complete copy there.") from None
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataCorruptError(f"{path}: expected uint8 images (N, H, W, C), "
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

    The archive ``<root>/cifar-10-python.tar.gz`` alone is extracted first (no network needed).
    If the folder is missing but ``<root>/CIFAR10_subset/cifar10_train_first4000.npz`` exists,
    the training split is served from that 4,000-image subset (and a note says so). Otherwise
    it downloads when ``download`` is true. Failures raise ``DataNotFoundError`` (a damaged
    file: ``DataCorruptError`` naming it) saying what to place where. ``transform`` applies to
    tensors in [0, 1] in both cases.
    """
    from torchvision import datasets, transforms

    root = resolve_data_root(data_dir)
    to_tensor = transforms.ToTensor()
    full_transform = to_tensor if transform is None else transforms.Compose([to_tensor, transform])
    folder, archive = root / CIFAR10_FOLDER, root / CIFAR10_ARCHIVE
    if not folder.exists() and archive.is_file():
        _extract_cifar_archive(archive, root)
    if folder.exists():
        try:
            return datasets.CIFAR10(str(root), train=train, download=False,
                                    transform=full_transform)
        except RuntimeError:  # torchvision's "not found or corrupted": say which file and why
            raise _cifar_folder_error(folder) from None
    if train and (root / CIFAR10_SUBSET).exists():
        print(f"Note: full CIFAR-10 not found; using the 4,000-image subset "
              f"{root / CIFAR10_SUBSET}")
        return NpzImageDataset(root / CIFAR10_SUBSET, transform=transform)
    manual = (f"Place the python version of CIFAR-10 there: the folder\n"
              f"    {folder}  (data_batch_1..5, test_batch, batches.meta)\n"
              f"or the archive {archive}, or point --data-dir (or SBGM_DATA_DIR) at a folder "
              f"that contains one of them.")
    if not download:
        raise DataNotFoundError(f"CIFAR-10 is not under {root}.\n{manual}", can_download=True)
    with tempfile.TemporaryDirectory(prefix="sbgm-cifar-") as tmp:
        try:
            datasets.CIFAR10(tmp, train=train, download=True)
        except Exception as err:
            raise DataNotFoundError(f"CIFAR-10 is not under {root} and downloading it failed "
                                    f"({_one_line(err)}).\n{manual}") from None
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / CIFAR10_FOLDER), str(folder))
    return datasets.CIFAR10(str(root), train=train, download=False, transform=full_transform)


def _extract_cifar_archive(archive: Path, root: Path) -> None:
    from torchvision.datasets.utils import extract_archive

    try:
        extract_archive(str(archive), str(root))
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataCorruptError(f"{archive} is not a complete archive ({_one_line(err)}). Delete "
                               f"it and place a complete copy (or the extracted folder "
                               f"{CIFAR10_FOLDER}/) in {root}.") from None


def _cifar_folder_error(folder: Path) -> DataNotFoundError:
    """Why torchvision refused ``folder``: the missing files, else the first damaged one."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    expected = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"],
                                                          CIFAR10.meta["md5"]]]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    if missing:
        return DataNotFoundError(f"CIFAR-10 is incomplete: {', '.join(missing)} missing from "
                                 f"{folder}. Place the complete folder there (data_batch_1..5, "
                                 f"test_batch, batches.meta).")
    for name, md5 in expected:
        if not check_integrity(str(folder / name), md5):
            return DataCorruptError(f"{folder / name} is damaged: its MD5 sum is not the "
                                    f"published one ({(folder / name).stat().st_size:,} bytes). "
                                    f"Delete it and place a complete copy there.")
    return DataCorruptError(f"torchvision could not read CIFAR-10 from {folder}; replace the "
                            f"folder with a fresh copy.")
