"""Small helpers on Pyro traces shared by the guide and the diagnostics."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["max_plate_nesting", "per_particle_log_prob"]


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
