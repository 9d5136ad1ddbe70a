"""Pair plot of guide draws, optionally over reference draws (e.g. long NUTS runs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pyro_flows_ext.checks import positive_float, positive_int

__all__ = ["flatten_components", "plot_pairs"]


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def flatten_components(
    draws: Any, var_names: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Scalar components of ``draws`` as ``(names, array (S, C))``.

    ``draws`` is ``name -> (S, *shape)`` (tensors or arrays) or an ArviZ ``InferenceData``
    (its ``posterior`` group, chains stacked). Components are named ``"beta[0]"`` (0-based).

    Example:
        >>> import numpy as np
        >>> names, x = flatten_components({"a": np.zeros(5), "b": np.zeros((5, 2))})
        >>> names, x.shape
        (['a', 'b[0]', 'b[1]'], (5, 3))
    """
    if hasattr(draws, "posterior"):
        post = draws.posterior
        draws = {k: post[k].values.reshape((-1,) + post[k].shape[2:]) for k in post.data_vars}
    if not isinstance(draws, Mapping):
        raise TypeError(
            f"draws must be a mapping name -> (S, *shape) or InferenceData, got "
            f"{type(draws).__name__}"
        )
    if var_names is not None and (
        isinstance(var_names, str) or not all(isinstance(k, str) for k in var_names)
    ):
        raise TypeError(f"var_names must be a sequence of names or None, got {var_names!r}")
    keys = list(draws) if var_names is None else list(var_names)
    missing = [k for k in keys if k not in draws]
    if missing:
        raise ValueError(f"variables {missing} not among the draws {list(draws)}")
    names: list[str] = []
    columns: list[np.ndarray] = []
    for key in keys:
        value = _as_array(draws[key])
        flat = value.reshape(value.shape[0], -1)
        if value.ndim == 1:
            names.append(key)
        else:
            names += [f"{key}[{','.join(map(str, i))}]" for i in np.ndindex(*value.shape[1:])]
        columns.append(flat)
    if not columns:
        raise ValueError("no variables to plot")
    return names, np.concatenate(columns, axis=1)


def plot_pairs(
    draws: Any,
    reference: Any = None,
    *,
    var_names: Sequence[str] | None = None,
    max_components: int = 6,
    num_points: int = 1000,
    labels: tuple[str, str] = ("guide", "reference"),
    seed: int = 0,
    figsize: tuple[float, float] | None = None,
) -> Any:
    """Pair plot (histograms on the diagonal, scatter plots below it) of the first
    ``max_components`` scalar components of ``draws``, with ``reference`` draws of the same
    variables underneath when given.

    Args:
        draws: ``name -> (S, *shape)`` or ``InferenceData`` (see :func:`flatten_components`).
        reference: the same for reference draws, or ``None``.
        var_names: variables to show (default: all of ``draws``).
        max_components: at most this many scalar components (the plot is C x C panels).
        num_points: at most this many points per scatter plot and set (random subset).
        labels: legend labels of the two sets.
        seed: seed of the random subsets.
        figsize: the figure's ``(width, height)`` in inches (default: 2.2 per panel).

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fig = plot_pairs({"x": rng.normal(size=(200, 2))}, {"x": rng.normal(size=(300, 2))})
        >>> len(fig.axes)
        4
    """
    _check_plot_arguments(max_components, num_points, labels, seed, figsize)
    import matplotlib.pyplot as plt

    names, x = flatten_components(draws, var_names)
    names, x = names[:max_components], x[:, :max_components]
    ref = None
    if reference is not None:
        keys = var_names if var_names is not None else list(_keys(draws))
        ref_names, ref = flatten_components(reference, keys)
        if ref_names[: len(names)] != names:
            raise ValueError(f"reference components {ref_names[: len(names)]} differ from {names}")
        ref = ref[:, : len(names)]
    rng = np.random.default_rng(seed)

    def subset(a: np.ndarray) -> np.ndarray:
        return a[rng.choice(len(a), num_points, replace=False)] if len(a) > num_points else a

    c = len(names)
    size = figsize or (2.2 * c + 0.5, 2.2 * c + 0.5)
    fig, axes = plt.subplots(c, c, figsize=size, squeeze=False)
    xs, rs = subset(x), None if ref is None else subset(ref)
    for i in range(c):
        for j in range(c):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
            elif i == j:
                _histogram(ax, x[:, i], None if ref is None else ref[:, i], labels)
            else:
                if rs is not None:
                    ax.scatter(rs[:, j], rs[:, i], s=3, color="0.6", alpha=0.4, lw=0)
                ax.scatter(xs[:, j], xs[:, i], s=3, color="C0", alpha=0.5, lw=0)
            if i == c - 1 and j <= i:
                ax.set_xlabel(names[j])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i])
    if ref is not None:
        axes[0, 0].legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    return fig


def _check_plot_arguments(
    max_components: Any, num_points: Any, labels: Any, seed: Any, figsize: Any
) -> None:
    positive_int("max_components", max_components)
    positive_int("num_points", num_points)
    if not (isinstance(labels, tuple | list) and len(labels) == 2):
        raise TypeError(f"labels must be a pair of strings, got {labels!r}")
    if not all(isinstance(label, str) for label in labels):
        raise TypeError(f"labels must be a pair of strings, got {labels!r}")
    positive_int("seed", seed, minimum=0)
    if figsize is not None:
        if not (isinstance(figsize, tuple | list) and len(figsize) == 2):
            raise TypeError(f"figsize must be a pair (width, height) or None, got {figsize!r}")
        for size in figsize:
            positive_float("figsize", size)


def _histogram(ax: Any, x: np.ndarray, ref: np.ndarray | None, labels: Sequence[str]) -> None:
    """A diagonal panel: histograms of ``x`` (and ``ref`` behind it) on shared bins."""
    both = x if ref is None else np.concatenate([x, ref])
    bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=40)
    if ref is not None:
        ax.hist(ref, bins=bins, density=True, color="0.6", alpha=0.6, label=labels[1])
    ax.hist(x, bins=bins, density=True, histtype="step", color="C0", label=labels[0])
    ax.set_yticks([])


def _keys(draws: Any) -> list[str]:
    if hasattr(draws, "posterior"):
        return list(draws.posterior.data_vars)
    return list(draws)
