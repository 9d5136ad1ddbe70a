"""Importance weights of a guide's draws against its model, and their PSIS :math:`\\hat k`.

For draws :math:`z_s \\sim q` (the guide, in the constrained space) the log importance weights
are

.. math:: \\log w_s = \\log p(x, z_s) - \\log q(z_s),

computed from Pyro traces: the guide is traced, the model replayed on its values, and every
site's ``log_prob`` (scales and masks included) summed per draw. The draws are vectorised over
a particle plate left of the model's plates when the model allows it (checked against one
unvectorised evaluation), else taken one at a time.

Pareto smoothed importance sampling (PSIS, Vehtari et al. 2024) fits a generalised Pareto
distribution to the largest weights; its shape :math:`\\hat k` says how far the guide is from
the posterior (Yao et al. 2018): below 0.5 the guide is good, between 0.5 and the threshold
:math:`\\min(1 - 1/\\log_{10} S, 0.7)` for ``S`` draws (Vehtari et al. 2024) it is usable with
PSIS-corrected estimates, above it do not trust it. :math:`\\hat k` is itself a Monte Carlo
estimate: :class:`~pyro_flows_ext.infer.diagnostics.pareto.ParetoK` carries its bootstrap
spread, and
reads ``"uncertain"`` when that spread straddles the threshold. A small :math:`\\hat k` can
still hide a guide that misses a region the posterior puts mass on (the weights only see where q
samples): compare with reference draws when you have them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_flows_ext.checks import check_bool, positive_int
from pyro_flows_ext.infer.diagnostics.pareto import ParetoK, pareto_smooth
from pyro_flows_ext.infer.traces import (
    check_vectorised,
    particle_dim,
    per_particle_log_prob,
    vectorised_or_looped,
)

__all__ = ["ImportanceDraws", "draw_elements", "importance_draws"]

_PARTICLES = "_diagnostic_particles"
DRAW_BUDGET = 2**25
"""Elements of the largest site of one vectorised evaluation that
:func:`importance_draws` aims at by default: the draws are evaluated in batches of at most
``DRAW_BUDGET // (elements of that site for one draw)``, which bounds its memory (a site of
the model's whole data, expanded per draw, otherwise grows with ``num_samples``)."""


def check_model_and_guide(model: Any, guide: Any) -> None:
    """``TypeError`` unless ``model`` and ``guide`` are callables (Pyro programs)."""
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")


@dataclass
class ImportanceDraws:
    """Guide draws with their log importance weights.

    Attributes:
        latents: constrained latent sites, ``name -> (S, *shape)``.
        deterministic: ``pyro.deterministic`` sites, ``name -> (S, *shape)``.
        log_p: :math:`\\log p(x, z_s)`, shape ``(S,)``.
        log_q: :math:`\\log q(z_s)`, shape ``(S,)``.
        observed: observed sites, ``name -> value``.
        dims: axis names of every site (plate names where a plate indexes the axis).
        vectorized: whether the draws were vectorised.
    """

    latents: dict[str, Tensor]
    deterministic: dict[str, Tensor]
    log_p: Tensor
    log_q: Tensor
    observed: dict[str, Tensor]
    dims: dict[str, list[str]] = field(default_factory=dict)
    vectorized: bool = True
    _replay: Callable[[Callable, dict[str, torch.Size]], dict[str, Tensor]] | None = field(
        default=None, repr=False
    )

    @property
    def log_weights(self) -> Tensor:
        """:math:`\\log p(x, z_s) - \\log q(z_s)` (NaN becomes ``-inf``; infinities stay:
        ``nan_to_num``'s default would turn them into the largest finite numbers)."""
        lw = self.log_p - self.log_q
        return lw.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)

    def psis(self) -> tuple[np.ndarray, ParetoK]:
        """PSIS-smoothed normalised log weights (numpy) and :class:`ParetoK`
        (:func:`pareto_smooth`)."""
        return pareto_smooth(self.log_weights)


# ------------------------------------------------------------------------------ traces ----
def _value(site: Any) -> Tensor:
    value: Tensor = site["value"]
    return value


def _is_latent(site: Any) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _is_deterministic(site: Any) -> bool:
    return site["type"] == "sample" and bool(site["infer"].get("_deterministic"))


def _is_observed(site: Any) -> bool:
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic")
        and not site["infer"].get("is_auxiliary")
    )


def _traces(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    with poutine.block():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return model_tr, guide_tr


def _site_dims(name: str, site: dict[str, Any]) -> list[str]:
    shape = site["value"].shape
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    batch_len = len(shape) - site["fn"].event_dim
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and 0 <= batch_len + frame.dim < len(dims):
            dims[batch_len + frame.dim] = frame.name
    return dims


def _as_draws(value: Tensor, num: int, shape: torch.Size) -> Tensor:
    size = math.prod(shape)
    if value.numel() == num * size:
        return value.reshape((num, *shape))
    if value.numel() == size:
        return value.reshape(shape).expand((num, *shape))
    raise ValueError(f"cannot read {num} draws of shape {tuple(shape)} from {tuple(value.shape)}")


def _check_structure(model_tr: Any, guide_tr: Any) -> None:
    latents = [n for n, s in model_tr.nodes.items() if _is_latent(s)]
    if not latents:
        raise ValueError("the model has no latent sample sites: there is nothing to diagnose")
    missing = [n for n in latents if n not in guide_tr.nodes]
    if missing:
        raise ValueError(f"the guide does not sample the model's latent sites {missing}")


def draw_batch(proto: Any, num: int, batch_size: int | None) -> int:
    """Draws per vectorised evaluation: ``batch_size``, or by default as many as keep every
    site of one evaluation under :data:`DRAW_BUDGET` elements (read from the prototype trace
    ``proto``), at least one and at most ``num``."""
    if batch_size is not None:
        return min(batch_size, num)
    return max(1, min(num, DRAW_BUDGET // draw_elements(proto)))


def draw_elements(trace: Any) -> int:
    """Elements of the largest sample site of ``trace`` (one draw of the model)."""
    return max(
        [
            max(site["value"].numel(), math.prod(site["fn"].batch_shape + site["fn"].event_shape))
            for site in trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site)
        ],
        default=1,
    )


def _vectorized(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num: int, proto: Any, batch: int
) -> ImportanceDraws:
    dim = particle_dim(proto)
    sizes = [min(batch, num - start) for start in range(0, num, batch)]

    def vec(fn: Callable, size: int) -> Callable:
        def wrapped(*a: Any, **k: Any) -> Any:
            with pyro.plate(_PARTICLES, size, dim=dim):
                return fn(*a, **k)

        return wrapped

    guide_trs: list[Any] = []
    log_p: list[Tensor] = []
    log_q: list[Tensor] = []
    found: dict[str, list[Tensor]] = {}
    for size in sizes:
        with poutine.block():
            guide_tr = poutine.trace(vec(guide, size)).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(vec(model, size), trace=guide_tr)).get_trace(
                *args, **kwargs
            )
        guide_trs.append(guide_tr)
        log_p.append(per_particle_log_prob(model_tr, size, dim))
        log_q.append(per_particle_log_prob(guide_tr, size, dim))
        for name, site in proto.nodes.items():
            if _is_latent(site) or _is_deterministic(site):
                value = _as_draws(_value(model_tr.nodes[name]), size, site["value"].shape)
                found.setdefault(name, []).append(value)
        if len(guide_trs) == 1:  # the model must vectorise: check a draw against one evaluation
            first = {k: v[0][0] for k, v in found.items() if _is_latent(proto.nodes[k])}
            with poutine.block():
                check = poutine.trace(poutine.condition(model, data=first))
                check_tr = check.get_trace(*args, **kwargs)
            check_vectorised(float(log_p[0][0]), float(check_tr.log_prob_sum()))
        del model_tr
    values = {k: torch.cat(v) for k, v in found.items()}
    latents = {k: v for k, v in values.items() if _is_latent(proto.nodes[k])}
    determ = {k: v for k, v in values.items() if k not in latents}

    def replay(fn: Callable, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {n: [] for n in shapes}
        for size, guide_tr in zip(sizes, guide_trs, strict=True):
            with poutine.block():
                tr = poutine.trace(poutine.replay(vec(fn, size), trace=guide_tr))
                trace = tr.get_trace(*args, **kwargs)
            for n, shape in shapes.items():
                out[n].append(_as_draws(_value(trace.nodes[n]), size, shape))
        return {n: torch.cat(v) for n, v in out.items()}

    return ImportanceDraws(latents, determ, torch.cat(log_p), torch.cat(log_q), {}, _replay=replay)


def _looped(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num: int, proto: Any
) -> ImportanceDraws:
    log_p, log_q = [], []
    values: dict[str, list[Tensor]] = {}
    for _ in range(num):
        model_tr, guide_tr = _traces(model, guide, args, kwargs)
        log_p.append(model_tr.log_prob_sum())
        log_q.append(guide_tr.log_prob_sum())
        for name, site in model_tr.nodes.items():
            if _is_latent(site) or _is_deterministic(site):
                values.setdefault(name, []).append(site["value"])
    latents = {k: torch.stack(v) for k, v in values.items() if _is_latent(proto.nodes[k])}
    determ = {k: torch.stack(v) for k, v in values.items() if k not in latents}
    return ImportanceDraws(
        latents, determ, torch.stack(log_p), torch.stack(log_q), {}, vectorized=False
    )


@torch.no_grad()
def importance_draws(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    vectorize: bool | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> ImportanceDraws:
    """Draw ``num_samples`` latents from ``guide`` with their log importance weights.

    Args:
        model, guide: a Pyro model and a guide for it, called with ``*args, **kwargs``.
        num_samples: draws ``S``.
        vectorize: ``True`` to require a vectorised evaluation, ``False`` to loop, ``None``
            (default) to try vectorising and loop if the model does not allow it.
        batch_size: draws per vectorised evaluation; ``None`` (default) chooses it so that
            the largest site of one evaluation holds about :data:`DRAW_BUDGET` elements
            (memory bounded whatever ``num_samples``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> d = importance_draws(model, guide, num_samples=10)
        >>> d.latents["x"].shape, float(d.log_weights.abs().max())
        (torch.Size([10]), 0.0)
    """
    check_model_and_guide(model, guide)
    positive_int("num_samples", num_samples, minimum=2)
    if vectorize is not None:
        check_bool("vectorize", vectorize)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    proto, proto_guide = _traces(model, guide, args, kwargs)
    _check_structure(proto, proto_guide)
    batch = draw_batch(proto, num_samples, batch_size)
    result, _ = vectorised_or_looped(
        lambda: _vectorized(model, guide, args, kwargs, num_samples, proto, batch),
        lambda: _looped(model, guide, args, kwargs, num_samples, proto),
        vectorize,
        label="importance_draws",
    )
    result.observed = {n: s["value"] for n, s in proto.nodes.items() if _is_observed(s)}
    result.dims = {
        n: _site_dims(n, s)
        for n, s in proto.nodes.items()
        if _is_latent(s) or _is_deterministic(s) or _is_observed(s)
    }
    return result
