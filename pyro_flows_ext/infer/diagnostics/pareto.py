"""Pareto :math:`\\hat k` of log importance weights: the estimate, its Monte Carlo spread, the
sample-size dependent threshold of Vehtari et al. (2024) and the reading (Yao et al. 2018).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyro_flows_ext.checks import positive_int

__all__ = [
    "FLAT_LOG_WEIGHTS",
    "KHAT_BOOTSTRAP",
    "ParetoK",
    "khat_threshold",
    "khat_verdict",
    "pareto_smooth",
    "resample_index",
]


def _arviz() -> Any:
    """Import ArviZ, silencing the FutureWarning that 0.2x prints about its 1.0 refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


FLAT_LOG_WEIGHTS = 1e-2
"""Log weights spanning less than this many nats are treated as equal: the weights are bounded
(the true :math:`k` is negative) and a Pareto fit to their tail would be fitting roundoff."""

KHAT_BOOTSTRAP = 20
"""Bootstrap resamples of the log weights behind :attr:`ParetoK.interval`."""


def khat_threshold(num_samples: int) -> float:
    """Vehtari et al. (2024)'s sample-size dependent threshold
    :math:`\\min(1 - 1/\\log_{10} S, 0.7)`: below it PSIS estimates from ``S`` draws are
    reliable (0.5 for ``S = 100``, 0.7 from ``S = 2155`` on).

    Example:
        >>> khat_threshold(100), khat_threshold(4000)
        (0.5, 0.7)
    """
    positive_int("num_samples", num_samples, minimum=2)
    return min(1 - 1 / math.log10(num_samples), 0.7)


def khat_verdict(
    khat: float, num_samples: int | None = None, interval: tuple[float, float] | None = None
) -> str:
    """The reading of a Pareto :math:`\\hat k` from ``num_samples`` draws (Yao et al. 2018;
    Vehtari et al. 2024): ``"good"`` below 0.5, ``"usable with PSIS"`` below the threshold
    :func:`khat_threshold` (0.7 when ``num_samples`` is ``None``), ``"do not trust"`` above
    it, and ``"uncertain"`` when the Monte Carlo ``interval`` of :math:`\\hat k` straddles the
    threshold (more draws would tell).

    Example:
        >>> khat_verdict(0.3), khat_verdict(0.6), khat_verdict(0.9)
        ('good', 'usable with PSIS', 'do not trust')
        >>> khat_verdict(0.6, 100), khat_verdict(0.6, 4000, interval=(0.5, 0.8))
        ('do not trust', 'uncertain')
    """
    if isinstance(khat, bool) or not isinstance(khat, int | float):
        raise TypeError(f"khat must be a real number, got {khat!r}")
    threshold = 0.7 if num_samples is None else khat_threshold(num_samples)
    if interval is not None and interval[0] < threshold <= interval[1]:
        return "uncertain"
    if not khat < threshold:  # also catches NaN
        return "do not trust"
    return "good" if khat < 0.5 else "usable with PSIS"


_DETAILS = {
    "good": "the guide is close to the posterior",
    "usable with PSIS": "use PSIS-reweighted estimates (importance_resample)",
    "do not trust": "the guide is far from the posterior; do not use its draws",
    "uncertain": "k-hat is not estimated precisely enough to tell; use more draws",
}


@dataclass(frozen=True)
class ParetoK:
    """A Pareto :math:`\\hat k` with its reading; ``float(k)`` gives the number.

    Attributes:
        khat: the estimate from all draws (``-inf`` when the log weights span less than
            :data:`FLAT_LOG_WEIGHTS` nats, as for an exact guide; ``inf`` when none is
            finite or one is ``+inf``: the weights are unbounded).
        num_samples: draws ``S``.
        interval: the quartiles (25% and 75%) of :math:`\\hat k` over
            :data:`KHAT_BOOTSTRAP` bootstrap resamples of the ``S`` log weights (its Monte
            Carlo spread; equal to ``khat`` twice when there is nothing to fit).
        ess: the PSIS effective sample size :math:`1 / \\sum_s \\tilde w_s^2` of the
            smoothed normalised weights: how many posterior draws the ``S`` guide draws are
            worth for importance-weighted estimates.
    """

    khat: float
    num_samples: int
    interval: tuple[float, float] = (math.nan, math.nan)
    ess: float = math.nan

    @property
    def threshold(self) -> float:
        """:func:`khat_threshold` of :attr:`num_samples`."""
        return khat_threshold(self.num_samples)

    @property
    def flat(self) -> bool:
        """Whether the weights were (nearly) equal, so that there was no tail to fit."""
        return self.khat == -math.inf

    @property
    def verdict(self) -> str:
        """:func:`khat_verdict` of the estimate, its sample size and its interval."""
        interval = None if math.isnan(self.interval[0]) else self.interval
        return khat_verdict(self.khat, self.num_samples, interval)

    def __float__(self) -> float:
        return self.khat

    def __str__(self) -> str:
        if self.flat:
            return (
                f"Pareto k-hat: the {self.num_samples} log weights are nearly equal (range < "
                f"{FLAT_LOG_WEIGHTS} nats): good (the guide matches the posterior where it "
                f"samples)"
            )
        low, high = self.interval
        return (
            f"Pareto k-hat = {self.khat:.3f} (bootstrap quartiles {low:.2f}-{high:.2f}) from "
            f"{self.num_samples} draws, threshold {self.threshold:.2f}, PSIS ESS "
            f"{self.ess:.0f}: {self.verdict} ({_DETAILS[self.verdict]})"
        )


def _bootstrap_interval(lw: np.ndarray, repeats: int) -> tuple[float, float]:
    """Quartiles of k-hat over bootstrap resamples of the log weights (the generator is
    seeded from torch's, so ``pyro.set_rng_seed`` fixes it). Their spread is close to that
    of k-hat over independent draw sets (checked on Gaussian and Student-t targets)."""
    rng = np.random.default_rng(int(torch.randint(2**31, ())))
    az = _arviz()
    khats = [float(az.psislw(rng.choice(lw, size=len(lw)))[1]) for _ in range(repeats)]
    # order statistics, not interpolation: k-hat is infinite for weights of a guide far off
    low, high = np.quantile(khats, [0.25, 0.75], method="nearest")
    return float(low), float(high)


def pareto_smooth(log_weights: Tensor, repeats: int = KHAT_BOOTSTRAP) -> tuple[np.ndarray, ParetoK]:
    """PSIS-smoothed normalised log weights (numpy) and :class:`ParetoK` (ArviZ ``psislw``,
    which takes the log weights as they are).

    Infinite log weights are read as what they say: a ``+inf`` (the guide drew a point where
    its density vanishes and the model's does not) makes the weights unbounded, so
    :math:`\\hat k` is ``inf`` ("do not trust") and the normalised weights sit on those draws;
    a ``-inf`` or NaN (a draw the model rules out) is a zero weight, and the tail is fitted
    to the others.

    Example:
        >>> import math, torch
        >>> float(pareto_smooth(torch.tensor([0.0, 1.0, math.inf, -0.5]))[1])
        inf
    """
    lw = log_weights.detach().cpu().double().numpy()
    lw = np.where(np.isnan(lw), -np.inf, lw)
    num = len(lw)
    unbounded = np.isposinf(lw)
    if unbounded.any():
        count = int(unbounded.sum())
        smoothed = np.where(unbounded, -np.log(count), -np.inf)
        return smoothed, ParetoK(math.inf, num, (math.inf, math.inf), float(count))
    finite = np.isfinite(lw)
    if not finite.any():
        uniform = np.full_like(lw, -np.log(num))
        return uniform, ParetoK(math.inf, num, (math.inf, math.inf), 0.0)
    smoothed = np.full_like(lw, -np.inf)
    kept = lw[finite]
    if np.ptp(kept) < FLAT_LOG_WEIGHTS:
        smoothed[finite] = -np.log(len(kept))
        flat = (-math.inf, -math.inf)
        return smoothed, ParetoK(-math.inf, num, flat, float(len(kept)))
    with np.errstate(over="ignore"):  # the Pareto fit of a very heavy tail overflows
        fitted, khat = _arviz().psislw(kept)
        interval = _bootstrap_interval(kept, repeats)
    smoothed[finite] = np.asarray(fitted)
    ess = float(1 / np.exp(2 * smoothed[finite]).sum())
    return smoothed, ParetoK(float(khat), num, interval, ess)


def resample_index(smoothed: np.ndarray, num: int) -> Tensor:
    """``num`` draw indices sampled with replacement in proportion to the weights whose
    smoothed normalised logs are ``smoothed`` (:func:`pareto_smooth`'s first output).

    Example:
        >>> import numpy as np
        >>> resample_index(np.array([-np.inf, 0.0, -np.inf]), 4).tolist()
        [1, 1, 1, 1]
    """
    probs = torch.as_tensor(np.exp(smoothed - smoothed.max()), dtype=torch.float64)
    return torch.multinomial(probs, num, replacement=True)
