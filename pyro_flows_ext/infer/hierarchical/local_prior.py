"""The model's prior of each local latent given the globals, as
:class:`~pyro_flows_ext.infer.AutoHierarchicalFlow`'s local flows use it.

A local whose prior is a location-scale family on its unconstrained scale with parameters
that depend on the globals (``theta_g ~ Normal(mu, tau)``, ``Normal(x_g @ beta, sigma)``,
``LogNormal(m, s)``) has, as a function of the unconstrained globals :math:`g`, a prior
location :math:`m(g)` and log-scale :math:`s(g)`. The model is run once with the globals as
differentiable functions of :math:`g` at the start :math:`g_0`, and both are read off with
their Jacobians; the flows use the first-order expansion

.. math:: m(g) \\approx m(g_0) + J_m (g - g_0), \\qquad s(g) \\approx s(g_0) + J_s (g - g_0),

which is exact for the usual hierarchical priors (a location linear in the globals, a scale
that is one of them). A local whose prior does not depend on the globals, or is not such a
family, gets no prior (``mask`` false).

The same runs give each element's start of the flow's learned Gaussian pseudo-likelihood
:math:`\\mathcal N(\\hat y_i, e^{-\\lambda_i})`: one Newton step on the rest of the log joint
(the likelihood of the element's data, its children's terms), i.e. its gradient and diagonal
curvature in the element's unconstrained locals (exact for a normal likelihood), taken at
the element's conditional mode given :math:`g_0`. That mode is found first by damped Newton
steps on each group's conditional (``F x F``, at most :data:`MODE_STEPS` runs, each step at
most :data:`~pyro_flows_ext.infer.hierarchical.newton.MAX_STEP` of its own sds): from the
``init_loc_fn`` values, which for a prior ``Normal(0, 10)`` of the locals' mean lie many
posterior sds away, a single clamped step left radon's best-measured counties 57 sds short,
and the guide's Newton conditionals, bounded by the same rule, stayed there.
Plates are run whole, or, when the model subsamples a plate, in chunks of its subsample
size, so that every element gets its own start.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch import Tensor
from torch.distributions import Distribution, Independent

from pyro_flows_ext.infer.hierarchical.newton import (
    gradient_and_precision,
    model_run,
    newton_gaussian,
    unscaled_log_prob,
)
from pyro_flows_ext.infer.hierarchical.plates import PlateGroup, PlateStructure, index_chunks

__all__ = ["LocalPrior", "local_priors"]

_WRAPPERS = (Independent, ExpandedDistribution, MaskedDistribution)
_LOCATION_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace, dist.LogNormal)


@dataclass
class LocalPrior:
    """A group's linearised prior and pseudo-likelihood start over the full grid.

    ``loc`` and ``log_scale`` ``(*grid, F)``: the prior at ``g0`` (``(D,)``); ``coef``
    ``(*grid, 2 F, D)``: their Jacobian (rows: locations, then log-scales); ``mask`` ``(F,)``:
    true for the features that have a prior (a grid dim of these is 1 where they are the
    same for every element). ``pseudo_loc`` and ``pseudo_log_prec`` ``(*grid, F)``: the start
    of the pseudo-likelihood."""

    loc: Tensor
    log_scale: Tensor
    coef: Tensor
    mask: Tensor
    g0: Tensor
    pseudo_loc: Tensor
    pseudo_log_prec: Tensor

    def pooled(self) -> LocalPrior:
        """The mean over the grid, for groups whose flow is shared by every element."""

        def mean(t: Tensor, event: int = 1) -> Tensor:
            return t.reshape((-1,) + t.shape[t.dim() - event :]).mean(0)

        return LocalPrior(
            mean(self.loc), mean(self.log_scale), mean(self.coef, 2), self.mask, self.g0,
            mean(self.pseudo_loc), mean(self.pseudo_log_prec),
        )  # fmt: skip


MAX_RUNS = 10_000
"""Most model runs to read the starts of subsampled plates; beyond it, the point start."""

MODE_STEPS = 20
"""Most damped Newton steps (model runs) towards the locals' conditional mode at the start."""

MIN_LOG_PREC = -20.0
"""Floor of a pseudo-likelihood's log-precision relative to its prior's (no data: the prior)."""


def _location_scale(fn: Distribution) -> tuple[Tensor, Tensor] | None:
    """The location and scale of ``fn`` on its unconstrained scale, if it is a location-scale
    family there (a LogNormal's are those of the log)."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    if isinstance(fn, _LOCATION_SCALE):
        return fn.loc, fn.scale
    return None


def _jacobian(out: Tensor, x: Tensor) -> Tensor:
    """``d out / d x`` for a short vector ``x`` as ``(*out.shape, D)``, by one
    vector-Jacobian product and ``D`` derivatives of it."""
    v = torch.zeros_like(out, requires_grad=True)
    (jt_v,) = torch.autograd.grad(out, x, v, create_graph=True, allow_unused=True)
    cols = []
    for d in range(x.shape[0]):
        col = None
        if jt_v is not None and jt_v[d].requires_grad:
            (col,) = torch.autograd.grad(jt_v[d], v, retain_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(out) if col is None else col)
    return torch.stack(cols, dim=-1)


def local_priors(
    model: Callable[..., Any],
    trace: Any,
    structure: PlateStructure,
    g0: Tensor,
    init_scale: float,
    args: tuple,
    kwargs: dict,
    read: bool = True,
) -> list[LocalPrior]:
    """Every group's :class:`LocalPrior`, from runs of ``model`` (hidden from enclosing
    handlers, the random state restored) at the prototype ``trace``'s values (``g0``: its
    unconstrained globals, :meth:`PlateStructure.initial_globals`); with ``read``
    false (or too many runs), the point start: no prior, the pseudo-likelihood at
    ``init_loc_fn``'s values with precision ``init_scale ** -2``."""
    inits = [group.initial_values(trace).to(g0) for group in structure.groups]
    groups = structure.groups
    out = [_point_start(group, u, g0, init_scale) for group, u in zip(groups, inits, strict=True)]
    plates = list(structure.plates.values())
    chunks = index_chunks(plates)
    if not read or math.prod(len(c) for c in chunks) > MAX_RUNS:
        return out
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for combo in itertools.product(*chunks):
            idx = {p.name: ids.to(g0.device) for p, ids in zip(plates, combo, strict=True)}
            _read_chunk(model, structure, g0, inits, idx, out, args, kwargs)
    for group, start in zip(structure.groups, out, strict=True):
        for name in ("loc", "log_scale", "coef"):
            setattr(start, name, _shared(getattr(start, name), group, 2 if name == "coef" else 1))
    return out


def _point_start(group: PlateGroup, init: Tensor, g0: Tensor, init_scale: float) -> LocalPrior:
    f, d = group.dim, g0.shape[0]
    coef = init.new_zeros(init.shape[:-1] + (2 * f, d))
    return LocalPrior(
        torch.zeros_like(init), torch.zeros_like(init), coef,
        torch.zeros(f, dtype=torch.bool, device=init.device), g0.detach(), init.detach().clone(),
        torch.full_like(init, -2 * math.log(init_scale)),
    )  # fmt: skip


def _read_chunk(
    model: Callable[..., Any],
    structure: PlateStructure,
    g0: Tensor,
    inits: list[Tensor],
    idx: dict[str, Tensor],
    out: list[LocalPrior],
    args: tuple,
    kwargs: dict,
) -> None:
    """The runs at the elements ``idx`` (plate name -> indices); fills ``out`` there."""
    g = g0.detach().clone().requires_grad_(True)
    wheres = [group.grid_index(idx) for group in structure.groups]
    modes = _conditional_modes(
        model, structure, g, [init[w] for init, w in zip(inits, wheres, strict=True)], idx,
        args, kwargs,
    )  # fmt: skip
    us = [(u.requires_grad_(True), w) for u, w in zip(modes, wheres, strict=True)]
    run, log_dets = model_run(model, structure, g, [u for u, _ in us], idx, args, kwargs)
    log_probs = {
        n: unscaled_log_prob(site)
        for n, site in run.nodes.items()
        if site["type"] == "sample" and n not in idx
    }
    total = sum(log_probs.values(), g.new_zeros(()))
    for group, (u, where), lds, start in zip(structure.groups, us, log_dets, out, strict=True):
        rest = total
        for site in group.sites:
            prior = _site_prior(group, site, run, g, where, start)
            rest = rest - (log_probs[site.name] if prior else lds[site.name])
        _newton(u, rest, where, start)


def _conditional_modes(
    model: Callable[..., Any],
    structure: PlateStructure,
    g: Tensor,
    inits: list[Tensor],
    idx: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
) -> list[Tensor]:
    """Every group's locals moved from ``inits`` towards their conditional mode given ``g``
    (the groups step together) by damped Newton steps
    (:func:`~pyro_flows_ext.infer.hierarchical.newton.newton_gaussian`: an element whose
    conditional is not log-concave there stays), until no element moves by more than a
    thousandth of its sd or after :data:`MODE_STEPS` runs."""
    us = [u.detach().clone() for u in inits]
    for _ in range(MODE_STEPS):
        us = [u.requires_grad_(True) for u in us]
        run, log_dets = model_run(model, structure, g, us, idx, args, kwargs)
        total = sum(
            (unscaled_log_prob(site) for n, site in run.nodes.items()
             if site["type"] == "sample" and n not in idx),
            g.new_zeros(()),
        )  # fmt: skip
        total = total - sum((ld for lds in log_dets for ld in lds.values()), g.new_zeros(()))
        moved = False
        for k, u in enumerate(us):
            found = gradient_and_precision(total, u, create_graph=False)
            if found is None:
                continue
            still = torch.full_like(u, -30.0)  # the bound: MAX_STEP of the step's own sds
            mean, chol = newton_gaussian(u.detach(), *found, u.detach(), still)
            sd = torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1).sqrt()
            moved = moved or bool(((mean - u.detach()).abs() > 1e-3 * sd).any())
            us[k] = mean.detach()
        if not moved:
            break
    return [u.detach() for u in us]


def _site_prior(
    group: PlateGroup, site: Any, run: Any, g: Tensor, where: tuple[Tensor, ...], start: LocalPrior
) -> bool:
    """Write the site's linearised prior into ``start`` at ``where``; whether it has one."""
    params = _location_scale(run.nodes[site.name]["fn"]) if g.shape[0] else None
    if params is None or not any(t.requires_grad for t in params):
        return False
    grid = start.loc[where].shape[:-1]
    shape = grid + site.u_event
    m, s = (torch.broadcast_to(t, shape).reshape(grid + (site.size,)) for t in params)
    jac = _jacobian(torch.cat([m, s.log()], dim=-1), g).detach()
    if not bool(jac.ne(0).any()):
        return False
    f, a, b = group.dim, site.start, site.stop
    for name, t in (("loc", m), ("log_scale", s.log())):
        full = getattr(start, name)
        part = full[where].clone()
        part[..., a:b] = t.detach()
        full[where] = part
    part = start.coef[where].clone()
    part[..., a:b, :], part[..., f + a : f + b, :] = jac[..., : b - a, :], jac[..., b - a :, :]
    start.coef[where] = part
    start.mask[a:b] = True
    return True


def _newton(u: Tensor, rest: Tensor, where: tuple[Tensor, ...], start: LocalPrior) -> None:
    """The pseudo-likelihood start from the gradient and diagonal curvature of ``rest`` (the
    log joint less the group's priors) in ``u`` (the elements are independent given the rest,
    so one Hessian-vector product per feature gives the diagonal)."""
    found = gradient_and_precision(rest, u, create_graph=False, diagonal=True)
    if found is None:
        return
    grad, curv = found
    prior_log_prec = -2 * start.log_scale[where]
    floor = torch.where(start.mask, prior_log_prec + MIN_LOG_PREC, start.pseudo_log_prec[where])
    good = torch.isfinite(curv) & (curv > 0) & torch.isfinite(grad)
    log_prec = torch.where(good, curv.clamp_min(1e-30).log(), floor).maximum(floor)
    step = torch.where(good, grad / curv.clamp_min(1e-30), torch.zeros_like(grad))
    limit = 10 * (-0.5 * log_prec).exp()  # at most ten of its own sds
    start.pseudo_loc[where] = u.detach() + step.clamp(-limit, limit)
    start.pseudo_log_prec[where] = log_prec


def _shared(t: Tensor, group: PlateGroup, lead: int) -> Tensor:
    """Collapse to size 1 every plate dim along which ``t`` is constant."""
    for p in group.plates:
        dim = p.dim - lead
        if bool((t == t.narrow(dim, 0, 1)).all()):
            t = t.narrow(dim, 0, 1)
    return t
