"""Leaf groups that share likelihood terms (crossed or index-nested random effects), and the
order in which :class:`~pyro_flows_ext.infer.AutoHierarchicalFlow` conditions them.

Two leaf groups *share a term* when a sample site's log density depends on the values of
both: a respondent's vote on its state's and its age group's effects (crossed plates), or a
state effect's prior on its region's effect picked by an index (nested through an index, not
through plates). The Newton conditionals of
:mod:`~pyro_flows_ext.infer.hierarchical.newton` treat every group given the others held
fixed; computed for all groups from one model run with each at its anchor, two such groups
both move to explain the same residual (double counting), and the draw of one never sees the
draw of the other, so the guide has none of their (often strong, negative) correlation and
bends the globals instead.

Groups connected by shared terms are therefore conditioned in sequence (Gauss-Seidel): the
first group's Newton Gaussian at the others' anchors, its draw, then the second group's at
that draw, and so on, so that :math:`q(u_1, u_2 \\mid g) = q(u_1 \\mid g)\\, q(u_2 \\mid u_1, g)`
with the second factor the exact conditional for normal priors and likelihoods. A
*stage* is one model run: stage 0 conditions every independent group and the first group of
every connected set (one run, as without crossing), stage ``t`` the ``t``-th group of each
set. Within a set the groups go largest first (most plate elements, then the model's
order), so that the small, tightly determined groups (5 regions under 51 states) are the ones
drawn exactly given the others.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pyro_flows_ext.infer.hierarchical.newton import model_run, unscaled_log_prob
from pyro_flows_ext.infer.hierarchical.plates import PlateStructure, index_chunks

__all__ = ["condition_stages", "crossed_stages", "shared_terms"]


def shared_terms(
    model: Callable[..., Any],
    structure: PlateStructure,
    trace: Any,
    g0: Tensor,
    leaves: Sequence[int],
    args: tuple,
    kwargs: dict,
) -> list[frozenset[int]]:
    """The sets of ``leaves`` (indices of ``structure.groups``) whose log densities share a
    sample site, from autograd dependencies in one run of ``model`` (hidden from enclosing
    handlers, the random state restored) at the prototype ``trace``'s values (``g0``: its
    unconstrained globals), on the first chunk of each subsampled plate. One set per site
    that depends on two or more of them (the sets may overlap)."""
    plates = list(structure.plates.values())
    idx = {
        p.name: chunks[0].to(g0.device)
        for p, chunks in zip(plates, index_chunks(plates), strict=True)
    }
    blocks = []
    for group in structure.groups:
        u = group.initial_values(trace).to(g0)
        at: tuple[Any, ...] = (Ellipsis, *group.grid_index(idx), slice(None))
        blocks.append(u[at].requires_grad_(True))
    targets = [blocks[k] for k in leaves]
    out = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        run, _ = model_run(model, structure, g0.detach(), blocks, idx, args, kwargs)
        skip = set(idx) | {site.name for site in structure.global_sites}
        for name, site in run.nodes.items():
            if site["type"] != "sample" or name in skip:
                continue
            lp = unscaled_log_prob(site)
            if not lp.requires_grad:
                continue
            grads = torch.autograd.grad(lp, targets, allow_unused=True, retain_graph=True)
            found = frozenset(k for k, d in zip(leaves, grads, strict=True) if d is not None)
            if len(found) > 1:
                out.append(found)
    return out


def condition_stages(
    structure: PlateStructure,
    leaves: Sequence[int],
    shared: Sequence[frozenset[int]],
    order: str = "fewest",
) -> dict[int, int]:
    """Each leaf's stage (module docstring): 0 for a leaf that shares no term; within a
    connected set of leaves (``shared``: the sets that share a term), ``0, 1, ...`` by
    number of plate elements over the full plates, ``order`` ``"largest"`` or ``"fewest"``
    first, ties in the model's order."""
    if order not in ("largest", "fewest"):
        raise ValueError(f"order must be 'largest' or 'fewest', got {order!r}")
    parent = {k: k for k in leaves}

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for found in shared:
        first, *rest = sorted(found)
        for k in rest:
            parent[root(k)] = root(first)
    stages = {}
    sign = -1 if order == "largest" else 1

    def key(k: int) -> tuple[int, int]:
        return sign * math.prod(p.size for p in structure.groups[k].plates), k

    for _, members in itertools.groupby(sorted(leaves, key=root), key=root):
        for t, k in enumerate(sorted(members, key=key)):
            stages[k] = t
    return stages


def crossed_stages(
    model: Callable[..., Any],
    structure: PlateStructure,
    trace: Any,
    g0: Tensor,
    leaves: Sequence[int],
    order: str | None,
    args: tuple,
    kwargs: dict,
) -> dict[int, int]:
    """:func:`condition_stages` of the ``leaves`` from :func:`shared_terms` (no model run for
    one leaf); with ``order`` ``None``, stage 0 for every leaf (each at the others' anchors)."""
    if order is None or len(leaves) < 2:
        return dict.fromkeys(leaves, 0)
    shared = shared_terms(model, structure, trace, g0, leaves, args, kwargs)
    return condition_stages(structure, leaves, shared, order)
