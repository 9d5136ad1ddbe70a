"""Figures of flows and their training, written straight to PNG files.

Figures are made with matplotlib's object-oriented API on the Agg canvas: nothing opens a
window, and ``pyplot``'s global state is left alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pyro_flows_ext.train.fit import History

__all__ = ["image_grid", "save_curve", "save_samples"]

DPI = 100
GRID_PIXELS = 480
"""Target size in screen pixels of the longer side of a sample grid (an integer number of
screen pixels per image pixel, so that every image pixel is drawn as the same square)."""
TITLE_PIXELS, LABEL_PIXELS, MIN_WIDTH = 30, 24, 400


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def image_grid(
    images: Tensor, nrow: int | None = None, pad: int = 1, pad_value: float = 0.5
) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images with values in ``[0, 1]`` into one ``(rows, cols)``
    (``C = 1``) or ``(rows, cols, C)`` array, ``nrow`` images per row (default about
    ``sqrt(N)``), separated by ``pad`` pixels of ``pad_value``.

    Example:
        >>> image_grid(torch.zeros(6, 1, 4, 4), nrow=3).shape
        (9, 14)
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((c, rows * (h + pad) - pad, cols * (w + pad) - pad), pad_value, np.float32)
    data = images.detach().float().clamp(0, 1).cpu().numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = data[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _grid_figure(
    grid: np.ndarray, title: str | None, row_labels: Sequence[str] | None, pad: int
) -> Figure:
    """The figure of an image grid, every image pixel an ``s x s`` square of screen pixels
    (``s`` an integer), with room for the title above and the row labels on the left."""
    rows, cols = grid.shape[:2]
    scale = max(1, GRID_PIXELS // max(rows, cols))
    left = LABEL_PIXELS if row_labels else 0
    width = max(cols * scale + left, MIN_WIDTH)
    lines = textwrap.wrap(title, width // 8) if title else []  # 9 pt: < 8 pixels a character
    height = rows * scale + (TITLE_PIXELS + 16 * (len(lines) - 1) if lines else 0)
    fig = _figure(width / DPI, height / DPI)
    if lines:
        fig.text(0.5, 1 - 6 / height, "\n".join(lines), ha="center", va="top")
    x0 = (width - cols * scale - left) // 2 + left  # centred, whole screen pixels
    ax = fig.add_axes((x0 / width, 0, cols * scale / width, rows * scale / height))
    cmap = "gray_r" if grid.ndim == 2 else None
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    ax.set_axis_off()
    if row_labels:
        cell = (rows + pad) / len(row_labels)  # image rows of one grid row, padding included
        for i, label in enumerate(row_labels):
            ax.text(-1, (i + 0.5) * cell - 0.5 * pad - 0.5, label, ha="right", va="center")
    return fig


def save_samples(
    samples: Tensor,
    path: str | os.PathLike[str],
    reference: Tensor | None = None,
    title: str | None = None,
    nrow: int | None = None,
    row_labels: Sequence[str] | None = None,
) -> None:
    """Write samples to a PNG: a grid for images ``(N, C, H, W)`` in ``[0, 1]``, a scatter
    plot (the first two coordinates, over ``reference`` data in grey) for vectors ``(N, D)``.

    A grid has ``nrow`` images per row (default about ``sqrt(N)``) and square pixels: every
    image pixel is drawn as the same square of screen pixels. ``row_labels`` (images only,
    one per grid row) are written left of the rows, e.g. the class of each row of a
    class-conditional model's samples.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp) / "grid.png"
        ...     save_samples(torch.rand(6, 1, 8, 8), path, nrow=3, row_labels=["a", "b"])
        ...     path.stat().st_size > 0
        True
    """
    samples = samples.detach().cpu()
    if samples.dim() == 4:
        grid = image_grid(samples, nrow)
        rows = math.ceil(len(samples) / (nrow or max(1, math.ceil(math.sqrt(len(samples))))))
        if row_labels is not None and len(row_labels) != rows:
            raise ValueError(f"row_labels must hold one label per grid row ({rows}), got "
                             f"{len(row_labels)}")  # fmt: skip
        fig = _grid_figure(grid, title, row_labels, pad=1)
        title = None  # drawn, wrapped to the figure's width
    elif row_labels is not None:
        raise ValueError("row_labels apply to image grids, not to scatter plots of vectors")
    elif samples.dim() == 2:
        fig = _figure(5, 5)
        ax = fig.add_subplot()
        y = samples[:, 1] if samples.shape[1] > 1 else torch.zeros(len(samples))
        if reference is not None:
            ref = reference.detach().cpu().float()
            ref_y = ref[:, 1] if ref.shape[1] > 1 else torch.zeros(len(ref))
            ax.scatter(ref[:, 0], ref_y, s=3, c="0.7", label="data")
        ax.scatter(samples[:, 0], y, s=3, c="C0", label="flow samples")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$" if samples.shape[1] > 1 else "")
        ax.legend(loc="upper right", markerscale=3)
    else:
        raise ValueError(
            f"samples must be images (N, C, H, W) or vectors (N, D), got {tuple(samples.shape)}"
        )
    if title:
        fig.suptitle(title)
    fig.savefig(os.fspath(path))


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window or window < 2:
        return v
    kernel = np.ones(window) / window
    return np.convolve(v, kernel, mode="valid")


def save_curve(history: History, path: str | os.PathLike[str], title: str | None = None) -> None:
    """Write the training curve to a PNG: train bits/dim (moving average over about 2 % of
    the steps) and validation bits/dim, with the best validation step marked."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    if history.step:
        window = max(1, len(history.step) // 50)
        smooth = _smooth(history.loss, window)
        ax.plot(history.step[len(history.step) - len(smooth) :], smooth, label="train")
    if history.valid_step:
        ax.plot(history.valid_step, history.valid_loss, "o-", ms=3, label="validation")
    if history.best_step is not None and history.best_valid is not None:
        ax.axvline(history.best_step, color="0.5", ls="--", lw=1)
        ax.annotate(
            f"best {history.best_valid:.3f}",
            (history.best_step, history.best_valid),
            textcoords="offset points",
            xytext=(4, 8),
        )
    lows = [*history.valid_loss, *history.loss[len(history.loss) // 10 :]]
    if lows:  # the first steps are far above the rest: keep the interesting range visible
        lo, hi = min(lows), max(lows)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
