"""Small helpers on Pyro traces shared by the guide and the diagnostics: plate nesting,
per-draw log densities, and "vectorise under a particle plate, else loop"."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor

__all__ = [
    "VECTORISE_ERRORS",
    "check_vectorised",
    "max_plate_nesting",
    "particle_dim",
    "per_particle_log_prob",
    "vectorised_or_looped",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

VECTORISE_ERRORS = (ValueError, RuntimeError, IndexError, NotImplementedError)
"""What a model that does not vectorise over a particle plate raises (shape errors)."""


def max_plate_nesting(trace: Any) -> int:
    """How many batch dims the vectorised plates of ``trace``'s sample sites use."""
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def particle_dim(trace: Any) -> int:
    """The (negative) dim of a particle plate left of every plate of ``trace``'s sites.

    Create the ``pyro.plate(name, num, dim=particle_dim(trace))`` inside ``poutine.block``:
    a plate records a subsample site where it is created."""
    return -(max_plate_nesting(trace) + 1)


def per_particle_log_prob(trace: Any, num: int, dim: int) -> Tensor:
    """Sum every sample site's ``log_prob`` (scales and masks applied) over all axes but the
    particle axis ``dim`` (negative, counted from the right of the batch shape): ``(num,)``."""
    trace.compute_log_prob()
    total: Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        lp = site["log_prob"]
        if lp.dim() >= -dim and lp.shape[lp.dim() + dim] == num:
            total = total + lp.movedim(lp.dim() + dim, 0).reshape(num, -1).sum(-1)
        else:
            total = total + lp.sum()
    if not isinstance(total, Tensor):
        raise ValueError("the trace has no sample site")
    return total.expand(num)


def check_vectorised(got: float, expected: float) -> None:
    """Raise ``ValueError`` unless the vectorised log density of a draw, ``got``, matches the
    unvectorised one, ``expected`` (a model that ignores the particle plate does not)."""
    if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-3 * (1 + abs(expected))):
        raise ValueError(
            f"vectorised log p(x, z) {got} differs from the unvectorised {expected}: the "
            f"model does not vectorise over a particle plate"
        )


def vectorised_or_looped(
    vectorised: Callable[[], T],
    looped: Callable[[], T],
    vectorize: bool | None = None,
    label: str = "",
) -> tuple[T, bool]:
    """``(vectorised(), True)``, or ``(looped(), False)`` when ``vectorised`` raises one of
    :data:`VECTORISE_ERRORS`; ``vectorize=True`` re-raises instead, ``False`` only loops.

    Example:
        >>> def fails():
        ...     raise ValueError("shape mismatch")
        >>> vectorised_or_looped(fails, lambda: "looped")
        ('looped', False)
    """
    if vectorize is not False:
        try:
            return vectorised(), True
        except VECTORISE_ERRORS as err:
            if vectorize:
                raise
            logger.info("%s: not vectorised (%s); looping over draws", label, err)
    return looped(), False
