"""Figures: headless by default, saved to ``outputs/<module>/<name>.png``.

Shared helpers draw the pictures several modules need: a 2D density with its score field, samples
over a density, a 1D density beside its score, and a grid of images. Each takes a matplotlib
``Axes`` and returns it, so a module composes them into the panels it wants.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch

from common.cli import in_notebook

Tensor = torch.Tensor
LogProbFn = Callable[[Tensor], Tensor]  # (N, 2) -> (N,)
ScoreFn = Callable[[Tensor], Tensor]  # (N, 2) -> (N, 2)


def setup_matplotlib(show: bool = False, draft: bool = False) -> None:
    """Use the non-interactive Agg backend unless figures are to be shown or we run inside a
    Jupyter kernel (whose inline backend must stay); set readable defaults.

    ``draft`` (used by --quick) saves at a lower resolution, without cropping to the tight
    bounding box and without constrained layout (each of which draws every figure once more to
    measure its labels): rendering large multi-panel figures is a good part of a smoke run's
    time (about a sixth of 08 --quick went into the layout alone), and a smoke run's figures only
    show that the code runs, so labels may crowd.
    """
    if not show and not in_notebook():
        matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 60 if draft else 120,
            "savefig.bbox": "standard" if draft else "tight",
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            # Constrained layout keeps labels from overlapping.
            "figure.constrained_layout.use": not draft,
        }
    )


def save_figure(fig, outdir: str | Path, name: str, show: bool = False) -> Path:
    """Save ``fig`` as ``outdir/name.png`` and close it (or show it first with ``show``).

    In a notebook the saved PNG is also shown as the cell's output: exactly the file written, and
    at no extra rendering cost.
    """
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{name}.png"
    fig.savefig(path)
    if in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    elif show:
        plt.show()
    plt.close(fig)
    return path


def grid_points(xlim, ylim, n: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """A regular ``n x n`` grid: returns meshgrid arrays ``X, Y`` and the points as ``(n*n, 2)``."""
    xs = np.linspace(*xlim, n)
    ys = np.linspace(*ylim, n)
    X, Y = np.meshgrid(xs, ys)
    points = torch.from_numpy(np.stack([X.ravel(), Y.ravel()], axis=1))
    return X, Y, points


def _evaluate(fn: Callable[[Tensor], Tensor], points: Tensor, dtype: torch.dtype) -> np.ndarray:
    with torch.no_grad():
        return fn(points.to(dtype)).detach().cpu().double().numpy()


def plot_density(ax, log_prob: LogProbFn, xlim=(-4, 4), ylim=(-4, 4), n_grid: int = 200,
                 dtype=torch.float64, cmap: str = "Blues", levels: int = 12):
    """Filled contours of ``exp(log_prob)`` on a grid. Returns the contour set (for a colorbar)."""
    X, Y, points = grid_points(xlim, ylim, n_grid)
    density = np.exp(_evaluate(log_prob, points, dtype)).reshape(X.shape)
    cs = ax.contourf(X, Y, density, levels=levels, cmap=cmap)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return cs


def plot_score_field(ax, score: ScoreFn, xlim=(-4, 4), ylim=(-4, 4), n_arrows: int = 20,
                     dtype=torch.float64, color: str = "k", clip_quantile: float = 0.9,
                     label: str | None = None, width: float = 0.004):
    """Arrows of the score on an ``n_arrows x n_arrows`` grid.

    Far from the data a score grows without bound (linearly for a Gaussian), so raw arrows would
    be dominated by the corners. Arrow lengths are therefore clipped at the ``clip_quantile``
    quantile of the magnitudes: directions are exact everywhere, lengths are faithful up to the
    clip. Returns the quiver object.
    """
    X, Y, points = grid_points(xlim, ylim, n_arrows)
    s = _evaluate(score, points, dtype)
    norm = np.linalg.norm(s, axis=1, keepdims=True)
    cap = np.quantile(norm, clip_quantile) if clip_quantile < 1 else norm.max()
    s = s * np.minimum(1.0, cap / np.maximum(norm, 1e-12))
    # The longest arrow spans about one grid cell (the smaller of its width and height).
    cell = min(xlim[1] - xlim[0], ylim[1] - ylim[0]) / (n_arrows - 1)
    scale = max(cap, 1e-12) / (0.9 * cell)
    return ax.quiver(X, Y, s[:, 0].reshape(X.shape), s[:, 1].reshape(X.shape), color=color,
                     angles="xy", scale_units="xy", scale=scale, width=width, label=label)


def plot_samples_over_density(ax, samples: Tensor, log_prob: LogProbFn | None = None,
                              xlim=(-4, 4), ylim=(-4, 4), title: str | None = None,
                              color: str = "tab:red", size: float = 2.0, alpha: float = 0.5,
                              label: str | None = "samples", dtype=torch.float64,
                              n_grid: int = 200):
    """Scatter ``samples`` (N, 2) over the contours of ``log_prob`` (if given)."""
    if log_prob is not None:
        plot_density(ax, log_prob, xlim, ylim, n_grid=n_grid, dtype=dtype)
    pts = samples.detach().cpu().double().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=size, c=color, alpha=alpha, label=label, linewidths=0)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    return ax


def plot_density_and_score_1d(ax_density, ax_score, x: Tensor, density: Tensor, score: Tensor,
                              label: str | None = None, color: str | None = None):
    """A 1D density on one axes and its score on the other, sharing the x axis.

    ``x``, ``density`` and ``score`` are 1D tensors of the same length. The score panel gets a
    zero line, because where the score crosses zero the density has a mode or a trough.
    """
    xs = x.detach().cpu().numpy()
    (line,) = ax_density.plot(xs, density.detach().cpu().numpy(), label=label, color=color)
    ax_score.plot(xs, score.detach().cpu().numpy(), label=label, color=line.get_color())
    ax_score.axhline(0.0, color="gray", lw=0.8, ls=":")
    ax_density.set_ylabel("density p(x)")
    ax_score.set_ylabel("score d/dx log p(x)")
    ax_score.set_xlabel("x")
    return ax_density, ax_score


def image_grid(ax, images: Tensor, nrow: int = 8, title: str | None = None,
               value_range: tuple[float, float] = (0.0, 1.0)):
    """Show a batch of images ``(N, C, H, W)`` as one grid, ``nrow`` images per row.

    Values are clipped to ``value_range`` and mapped to [0, 1]; one channel is drawn in gray.
    """
    from torchvision.utils import make_grid

    if images.ndim != 4:
        raise ValueError(f"image_grid expects (N, C, H, W), got shape {tuple(images.shape)}")
    lo, hi = value_range
    imgs = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    grid = make_grid(imgs, nrow=nrow, padding=2, pad_value=1.0)
    if imgs.shape[1] == 1:
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
