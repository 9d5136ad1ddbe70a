"""Accuracy of approximate posterior draws against posteriordb reference draws (pure numpy).

All scalar components of all quantities in the reference are compared jointly, each
standardised by the reference mean and standard deviation:

* ``max_mean_error``: ``max_i |mean_q[i] - mean_ref[i]| / sd_ref[i]``;
* ``max_log_sd_ratio``: ``max_i |log(sd_q[i] / sd_ref[i])|``;
* ``sliced_wasserstein``: the sliced 1-Wasserstein distance between the standardised draw
  sets, averaged over random unit directions (fixed seed); each one-dimensional W1 is computed
  by sorting equal-size subsamples of the two projected sets (quantile matching).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["AccuracyMetrics", "accuracy", "component_names", "flatten_draws"]


@dataclass(frozen=True)
class AccuracyMetrics:
    """Summary of how well approximate draws match the reference draws.

    Attributes:
        max_mean_error: largest standardised error of a component mean.
        max_log_sd_ratio: largest absolute log ratio of component standard deviations.
        sliced_wasserstein: sliced W1 distance in reference-standardised coordinates.
        worst_mean_component: name of the component with the largest mean error.
        worst_sd_component: name of the component with the largest log sd ratio.
        num_components: number of scalar components compared.
        num_draws: number of draws per set used for the sliced Wasserstein distance.
    """

    max_mean_error: float
    max_log_sd_ratio: float
    sliced_wasserstein: float
    worst_mean_component: str
    worst_sd_component: str
    num_components: int
    num_draws: int

    def as_dict(self) -> dict[str, float | str | int]:
        """The fields as a plain dict."""
        return asdict(self)


def component_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the scalar components, ``"beta[1]"`` style (1-based, as in Stan)."""
    names: list[str] = []
    for key, value in reference.items():
        shape = np.shape(value)[1:]
        if not shape:
            names.append(key)
            continue
        for index in np.ndindex(*shape):
            names.append(f"{key}[{','.join(str(i + 1) for i in index)}]")
    return names


def flatten_draws(
    draws: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Stack ``draws`` into an array ``(S, num_components)`` in the order of ``reference``.

    Every key of ``reference`` must be in ``draws`` with the same per-draw shape; extra keys of
    ``draws`` are ignored.
    """
    columns = []
    size: int | None = None
    for key, ref in reference.items():
        if key not in draws:
            raise KeyError(f"draws lack the reference quantity {key!r}")
        value = np.asarray(draws[key], dtype=np.float64)
        ref_shape = np.shape(ref)[1:]
        if value.shape[1:] != ref_shape:
            raise ValueError(
                f"{key!r}: draws have per-draw shape {value.shape[1:]}, reference {ref_shape}"
            )
        if size is None:
            size = value.shape[0]
        elif value.shape[0] != size:
            raise ValueError(f"{key!r}: {value.shape[0]} draws, expected {size}")
        columns.append(value.reshape(value.shape[0], -1))
    if not columns:
        raise ValueError("empty reference")
    return np.concatenate(columns, axis=1)


def _sliced_w1(
    x: np.ndarray, y: np.ndarray, num_directions: int, rng: np.random.Generator
) -> tuple[float, int]:
    """Sliced W1 between the rows of ``x`` and ``y`` on equal-size random subsamples."""
    m = min(len(x), len(y))
    xs = x[rng.choice(len(x), size=m, replace=False)] if len(x) > m else x
    ys = y[rng.choice(len(y), size=m, replace=False)] if len(y) > m else y
    directions = rng.standard_normal((x.shape[1], num_directions))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    px = np.sort(xs @ directions, axis=0)
    py = np.sort(ys @ directions, axis=0)
    return float(np.mean(np.abs(px - py))), m


def accuracy(
    draws: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    num_directions: int = 200,
    seed: int = 0,
) -> AccuracyMetrics:
    """Compare approximate ``draws`` with ``reference`` draws.

    Args:
        draws: ``name -> array (S, *shape)``, e.g. from
            :func:`benchmarks.posteriors.models.sample_quantities`.
        reference: ``name -> array (R, *shape)``, e.g. ``Posterior.reference``.
        num_directions: number of random unit directions of the sliced Wasserstein distance.
        seed: seed of the directions and of the subsampling to equal sizes.

    Returns:
        :class:`AccuracyMetrics`. Non-finite draws give non-finite metrics.
    """
    names = component_names(reference)
    ref = flatten_draws(reference, reference)
    approx = flatten_draws(draws, reference)
    if len(approx) < 2:
        raise ValueError("need at least two draws")
    ref_mean = ref.mean(axis=0)
    ref_sd = ref.std(axis=0, ddof=1)
    if np.any(ref_sd <= 0):
        raise ValueError("reference has a constant component")
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_err = np.abs(approx.mean(axis=0) - ref_mean) / ref_sd
        log_sd = np.abs(np.log(approx.std(axis=0, ddof=1) / ref_sd))
    rng = np.random.default_rng(seed)
    sw, m = _sliced_w1((approx - ref_mean) / ref_sd, (ref - ref_mean) / ref_sd, num_directions, rng)
    i_mean = int(np.nanargmax(mean_err)) if np.isfinite(mean_err).any() else 0
    i_sd = int(np.nanargmax(log_sd)) if np.isfinite(log_sd).any() else 0
    return AccuracyMetrics(
        max_mean_error=float(np.max(mean_err)),
        max_log_sd_ratio=float(np.max(log_sd)),
        sliced_wasserstein=sw,
        worst_mean_component=names[i_mean],
        worst_sd_component=names[i_sd],
        num_components=len(names),
        num_draws=m,
    )
