"""Figures written by :mod:`pyro_flows_ext.plots`: sample grids draw square pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pyro_flows_ext.plots import image_grid, save_samples


def _checkerboards(n: int, h: int, w: int) -> torch.Tensor:
    """Images whose pixels alternate between 1.0 and 0.25 (neither matches the white page
    nor the grey padding), so that every image pixel is visible in the PNG."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = torch.where((rows + cols) % 2 == 0, 1.0, 0.25)
    return board.expand(n, 1, h, w).clone()


@pytest.mark.parametrize(
    ("n", "nrow", "h", "w", "labels"),
    [(80, 8, 8, 8, True), (12, 6, 8, 8, False), (6, 3, 4, 7, False), (64, None, 8, 8, False)],
    ids=["10x8-classes", "2x6-wide", "non-square-images", "default-8x8"],
)
def test_sample_grids_draw_square_pixels(
    n: int, nrow: int | None, h: int, w: int, labels: bool, tmp_path: Path
) -> None:
    images = _checkerboards(n, h, w)
    grid = image_grid(images, nrow)
    rows = grid.shape[0] // (h + 1) + 1
    path = tmp_path / "grid.png"
    save_samples(images, path, title="a title", nrow=nrow,
                 row_labels=[str(i) for i in range(rows)] if labels else None)  # fmt: skip
    png = imread(path)[..., :3].mean(-1)
    # the grid is the block of the page whose columns and rows hold any grid colour
    # (black, light grey, padding grey); the title and the labels lie outside it
    is_grid = (np.abs(png[..., None] - np.array([0.0, 0.5, 0.75])) < 0.02).any(-1)
    ys = np.nonzero(is_grid.mean(1) > 0.5)[0]
    xs = np.nonzero(is_grid.mean(0) > 0.5)[0]
    drawn = png[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    s_y, s_x = drawn.shape[0] / grid.shape[0], drawn.shape[1] / grid.shape[1]
    assert s_y == s_x and s_x == int(s_x) and s_x >= 2, (drawn.shape, grid.shape)
    # every image pixel is one s x s square of its grey level (gray_r: value v -> 1 - v)
    expected = np.kron(1.0 - grid, np.ones((int(s_x), int(s_x))))
    np.testing.assert_allclose(drawn, expected, atol=0.02)


def test_row_labels_must_match_the_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one label per grid row"):
        save_samples(torch.rand(6, 1, 4, 4), tmp_path / "g.png", nrow=3, row_labels=["a"])
    with pytest.raises(ValueError, match="image grids"):
        save_samples(torch.rand(6, 2), tmp_path / "s.png", row_labels=["a"])
