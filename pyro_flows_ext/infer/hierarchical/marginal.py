"""The globals' Laplace marginal of :class:`~pyro_flows_ext.infer.AutoHierarchicalFlow`, read
over the full plates also where the model subsamples them (its start).

With every group of locals at the centre :math:`\\bar u(g)` of its conditional (zero base
noise; the Newton mean, exact for normal models),

.. math:: M(g) = \\log p(g, \\bar u(g), y) - \\log q(\\bar u(g) \\mid g)

in the unconstrained space. Each of its terms belongs to one plate element (a local's density,
an observation's inside a plate) or to none (the globals' prior). Where a plate is subsampled
the model accepts no other size than its subsample's, so :math:`M` is read in chunks of that
size, the last chunk filled up from the start with the repeated elements weighted zero and
every term outside the plate divided by its number of chunks: every term counts once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import Distribution

from pyro_flows_ext.infer.hierarchical.newton import unscaled_log_prob
from pyro_flows_ext.infer.hierarchical.plates import PlateStructure, index_chunks

__all__ = ["GlobalMarginal", "Weights"]

Weights = dict[str, tuple[Tensor | float, float]]
"""Per plate name: the weight of each of its elements' terms (a scalar, or one per element of
the plates' indices) and the factor of every term outside it."""


def term_weight(plates: tuple[str, ...], weights: Weights, structure: PlateStructure) -> Any:
    """The weight of a term inside ``plates`` (names), broadcastable against its batch shape
    (a plate's per-element weights at the plate's dim)."""
    w: Any = 1.0
    for name, (inside, outside) in weights.items():
        if name not in plates:
            w = w * outside
        elif isinstance(inside, Tensor):
            w = w * inside.reshape((-1,) + (1,) * (-structure.plates[name].dim - 1))
        else:
            w = w * inside
    return w


def full_chunks(structure: PlateStructure, device: torch.device) -> list[tuple[dict, Weights]]:
    """The full plates in chunks of the subsample sizes: ``(indices, weights)`` per chunk, the
    elements repeated to fill the last chunk weighted zero, and every term outside a plate
    divided by that plate's number of chunks (so that a sum over the chunks counts every term
    once)."""
    plates = list(structure.plates.values())
    per_plate = []
    for p, chunks in zip(plates, index_chunks(plates), strict=True):
        options = []
        for j, ids in enumerate(chunks):
            start = j * len(ids)
            keep = (torch.arange(start, start + len(ids)) < p.size).to(device)
            inside: Tensor | float = 1.0 if bool(keep.all()) else keep
            options.append((ids.to(device), inside, 1.0 / len(chunks)))
        per_plate.append(options)
    out = []
    for combo in itertools.product(*per_plate):
        idx = {p.name: ids for p, (ids, _, _) in zip(plates, combo, strict=True)}
        weights: Weights = {
            p.name: (inside, share) for p, (_, inside, share) in zip(plates, combo, strict=True)
        }
        out.append((idx, weights))
    return out


class GlobalMarginal:
    """The marginal methods of the hierarchical guide, which provides ``structure``,
    ``_plain_model``, ``_aux``, ``_walk``, ``_features`` and ``_conditionals``."""

    structure: PlateStructure | None
    _plain_model: Callable[..., Any]
    _aux: Callable[[str], str]
    _walk: Callable[..., dict[str, Tensor]]
    _features: Callable[..., dict[str, Tensor]]
    _conditionals: Callable[..., dict[int, tuple[Tensor, Tensor]]]

    def _marginal(
        self, g: Tensor, indices: dict[str, Tensor], weights: Weights, args: tuple, kwargs: dict
    ) -> Tensor:
        """:math:`M` at the unconstrained globals ``g`` ``(D,)`` from the plate elements
        ``indices`` (name -> indices; the plates' subsample), every term weighted by
        ``weights``."""
        s = self.structure
        assert s is not None
        site_plates = s.site_plates()
        block_plates = {
            self._aux(group.name): tuple(p.name for p in group.plates) for group in s.groups
        }
        terms: list[Tensor] = []

        def weigh(log_density: Tensor, plates: tuple[str, ...]) -> Tensor:
            return (log_density * term_weight(plates, weights, s)).sum()

        def draw(name: str, d: Distribution, fresh: bool, score: Any) -> Tensor:
            if name == self._aux("globals"):
                return g
            u = d.base_dist.mean  # type: ignore[attr-defined]
            for t in d.transforms:  # type: ignore[attr-defined]
                u = t(u)
            terms.append(-weigh(d.log_prob(u), block_plates[name]))
            return u

        def emit(name: str, value: Tensor, log_det: Tensor) -> Tensor:
            terms.append(-weigh(log_det, site_plates[name]))
            return value

        def conditionals(at: Tensor, blocks: dict[int, Tensor], to: list[int]) -> dict[int, Any]:
            return self._conditionals(at, blocks, indices, args, kwargs, targets=to)

        feats = self._features(indices, args, kwargs)
        values = self._walk(indices, feats, draw, emit, lambda group: nullcontext(), conditionals)
        sizes = {n: len(i) for n, i in indices.items()}
        data: dict[str, Tensor] = {n: v.reshape(s.site_shape(n, sizes)) for n, v in values.items()}
        data.update(indices)
        run = poutine.trace(poutine.condition(self._plain_model, data=data))
        trace = poutine.block(run.get_trace)(*args, **kwargs)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or name in indices:
                continue
            plates = tuple(f.name for f in site["cond_indep_stack"] if f.name in s.plates)
            terms.append(unscaled_log_prob(site, term_weight(plates, weights, s)))
        return torch.stack(terms).sum() if terms else g.new_zeros(())

    def _log_marginal(self, g: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """:math:`M(g)` over the full plates (in chunks where the model subsamples)."""
        s = self.structure
        assert s is not None
        chunks = full_chunks(s, g.device)
        return torch.stack([self._marginal(g, *chunk, args, kwargs) for chunk in chunks]).sum()
