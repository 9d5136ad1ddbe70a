"""Each plate element's Gaussian conditional, recomputed from the model at the globals' draw.

For a plate group whose elements are conditionally independent given the globals (and the
draws of enclosing groups), the conditional log density of element :math:`i`'s unconstrained
locals :math:`u_i \\in \\mathbb{R}^F`,

.. math:: \\ell_i(u_i) = \\log p(u_i \\mid g) + \\log p(y_i \\mid u_i, g),

is read at a point :math:`u_i^0` by one run of the model (conditioned on the globals' draw, the
plates' subsample and :math:`u^0`), its gradient :math:`\\nabla \\ell_i` and its ``F x F``
Hessian, by ``F`` Hessian-vector products batched over the elements (they do not interact, so
the product with the ``k``-th unit vector of every element is every element's ``k``-th column).
One Newton step gives the Gaussian

.. math::

    P_i = -\\nabla^2 \\ell_i(u_i^0), \\qquad
    m_i = u_i^0 + P_i^{-1} \\nabla \\ell_i(u_i^0),

which *is* the conditional posterior when the prior is normal and the likelihood normal with
a location linear in :math:`u_i` (radon's county intercept and slope given the globals: the
precision :math:`\\operatorname{diag}(\\sigma_a^{-2}, \\sigma_b^{-2}) + X_i^\\top X_i /
\\sigma_y^2`, correlated, moving with every global), whatever :math:`u_i^0`, and the Laplace
approximation at :math:`u_i^0` otherwise (a GLM). Everything is differentiable in the globals'
draw, so the ELBO's gradient sees how the conditionals move with them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from pyro import poutine, validation_enabled
from torch import Tensor
from torch.distributions import Transform, constraints

from pyro_flows_ext.infer.hierarchical.plates import PlateStructure, index_chunks

__all__ = [
    "chunked_newton_conditionals",
    "group_conditionals",
    "MAX_STEP",
    "PrecisionAffine",
    "gradient_and_precision",
    "model_run",
    "newton_conditionals",
    "newton_gaussian",
    "unscaled_log_prob",
    "unscaled_terms",
]

MAX_STEP = 30.0
"""Largest Newton step, per feature, in sds of the learned Gaussian it starts from or of its
own Gaussian, whichever is wider (:func:`newton_gaussian`)."""


def unscaled_log_prob(site: Any, weight: Tensor | float = 1.0) -> Tensor:
    """A site's log density summed, without the subsampled plates' ``N / B`` factor (its mask
    and any other scale kept), each element's term times ``weight`` (broadcast against the
    site's batch shape) first."""
    return unscaled_terms(site, weight).sum()


def unscaled_terms(site: Any, weight: Tensor | float = 1.0) -> Tensor:
    """The terms of :func:`unscaled_log_prob`, not summed (the site's batch shape)."""
    lp = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:  # a where, as Pyro masks: no cast of the mask to a float
        lp = torch.where(torch.as_tensor(site["mask"]), lp, lp.new_zeros(()))
    plate_scale = math.prod(
        f.full_size / f.size for f in site["cond_indep_stack"] if f.full_size is not None
    )
    scale = site["scale"] / plate_scale
    if not isinstance(weight, float | int) or weight != 1:
        scale = scale * weight
    if not isinstance(scale, float | int) or scale != 1:  # each op here is differentiated
        lp = lp * scale  # three times by the Newton conditionals: none for a unit scale
    return lp


def model_run(
    model: Callable[..., Any],
    structure: PlateStructure,
    g: Tensor,
    blocks: list[Tensor],
    idx: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
) -> tuple[Any, list[dict[str, Tensor]]]:
    """One run of ``model`` (hidden from enclosing handlers) conditioned on the unconstrained
    globals ``g`` ``(*lead, D)``, every group's unconstrained values ``blocks[k]``
    ``(*lead, *grid, F)`` at the plates' indices ``idx`` (name -> indices, also the plates'
    subsample). Returns its trace and, per group, ``site -> log |d u / d value|`` summed
    (the change of variables to the unconstrained space)."""
    data: dict[str, Tensor] = {n: v for n, (v, _) in structure.split_globals(g).items()}
    data.update(idx)
    sizes = {n: len(i) for n, i in idx.items()}
    log_dets = []
    for group, u in zip(structure.groups, blocks, strict=True):
        values = group.split(u, sizes)
        data.update({n: v for n, (v, _) in values.items()})
        log_dets.append({n: ld.sum() for n, (_, ld) in values.items()})
    traced = poutine.trace(poutine.condition(model, data=data))
    return poutine.block(traced.get_trace)(*args, **kwargs), log_dets


def gradient_and_precision(
    total: Tensor, u: Tensor, create_graph: bool, diagonal: bool = False
) -> tuple[Tensor, Tensor] | None:
    """The gradient ``(*batch, F)`` of ``total`` in ``u`` and minus its Hessian per element,
    ``(*batch, F, F)`` (or its diagonal ``(*batch, F)`` with ``diagonal``), by ``F``
    Hessian-vector products; the elements of ``u`` (all but its last dim) must not interact
    in ``total``. ``None`` when ``total`` does not depend on ``u``."""
    if not total.requires_grad:
        return None
    (grad,) = torch.autograd.grad(total, u, create_graph=True, allow_unused=True)
    if grad is None or not grad.requires_grad:
        return None
    f = u.shape[-1]
    units = torch.eye(f, dtype=u.dtype, device=u.device).reshape((f,) + (1,) * (u.dim() - 1) + (f,))
    hv = _hessian_rows(grad, u, units.expand((f,) + u.shape), create_graph)
    if hv is None:
        hv = u.new_zeros((f,) + u.shape)
    prec = -hv.movedim(0, -1)  # [..., j, k] = d2 / du_j du_k
    if diagonal:
        prec = prec.diagonal(dim1=-2, dim2=-1)
    if not create_graph:
        grad, prec = grad.detach(), prec.detach()
    return grad, prec


def _hessian_rows(grad: Tensor, u: Tensor, units: Tensor, create_graph: bool) -> Tensor | None:
    """The ``F`` Hessian-vector products of ``grad`` (the gradient in ``u``) with ``units``
    ``(F, *u.shape)``, stacked: batched through one ``vmap``, or one at a time, each the
    gradient of a scalar, under ``torch.jit.trace`` (Pyro's ``JitTrace_ELBO``), which can trace
    neither a ``vmap`` nor the shape check of a tensor's ``grad_outputs``."""

    def hvp(out: Tensor, v: Tensor | None, batched: bool) -> Tensor | None:
        return torch.autograd.grad(
            out, u, v, retain_graph=True, create_graph=create_graph, allow_unused=True,
            is_grads_batched=batched,
        )[0]  # fmt: skip

    tracing = torch.jit.is_tracing()
    if len(units) > 1 and not tracing:
        return hvp(grad, units, True)
    # one product (F = 1) costs less without the vmap's batching rules
    rows = [hvp((grad * v).sum(), None, False) if tracing else hvp(grad, v, False) for v in units]
    present = [r for r in rows if r is not None]
    return torch.stack(present) if len(present) == len(rows) else None


def newton_gaussian(
    u0: Tensor, grad: Tensor, prec: Tensor, fallback_loc: Tensor, fallback_log_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """The Newton step's Gaussian: its mean and the lower Cholesky factor ``L`` of its
    precision (``P = L L^T``), ``(*batch, F)`` and ``(*batch, F, F)``. The step is bounded,
    per feature, to :data:`MAX_STEP` sds of the wider of two Gaussians: the fallback
    ``N(fallback_loc, diag(exp(2 fallback_log_scale)))`` (the learned one, where the step
    starts) and the step's own (its marginal sd, ``sqrt(diag(P^-1))``). The fallback replaces
    the step for an element whose precision is not positive definite (a likelihood that is
    not log-concave there) or whose gradient is not finite.

    Why the step's own sd: a start whose pseudo-likelihood is diagonal sits far, in its own
    sds, from the conditional of two features the data confound (radon's intercept and
    slope in a county measured on one floor only). Bounded by the start's sds alone, two of
    radon's 85 counties stopped short and the globals' Laplace marginal there was 68 nats
    off."""
    batch = torch.broadcast_shapes(grad.shape[:-1], prec.shape[:-2], fallback_loc.shape[:-1])
    f = grad.shape[-1]
    fallback_prec = (-2 * fallback_log_scale).exp()
    if f == 1:  # scalars: no symmetrising, no 1 x 1 LAPACK calls (each op here is per element)
        p = prec[..., 0]
        good = torch.isfinite(grad) & torch.isfinite(p) & (p > 0)
        chosen = torch.where(good, p, fallback_prec)
        step, chol = torch.where(good, grad, 0.0) / chosen, chosen.sqrt().unsqueeze(-1)
        own_var = chosen.reciprocal()
    else:
        prec = 0.5 * (prec + prec.transpose(-1, -2))
        finite = torch.isfinite(grad).all(-1) & torch.isfinite(prec).flatten(-2).all(-1)
        eye = torch.eye(f, dtype=prec.dtype, device=prec.device)
        safe = torch.where(finite[..., None, None], prec, eye)
        good = (finite & (torch.linalg.cholesky_ex(safe.detach())[1] == 0))[..., None]
        chosen = torch.where(good[..., None], safe, torch.diag_embed(fallback_prec))
        chol = torch.linalg.cholesky(chosen)
        step = torch.cholesky_solve(torch.where(good, grad, 0.0).unsqueeze(-1), chol)[..., 0]
        own_var = torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1)
    limit = MAX_STEP * torch.maximum(fallback_log_scale.exp(), own_var.sqrt())
    mean = torch.where(good, u0, fallback_loc) + step.clamp(-limit, limit)
    return mean.expand(batch + (f,)), chol.expand(batch + (f, f))


class PrecisionAffine(Transform):
    """``x -> loc + L^{-T} x`` for the lower Cholesky factor ``L`` ``(*batch, F, F)`` of a
    precision matrix ``P = L L^T``: it maps ``N(0, I)`` to ``N(loc, P^{-1})``.

    Example:
        >>> import torch
        >>> L = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        >>> t = PrecisionAffine(torch.zeros(2), L)
        >>> x = torch.tensor([1.0, -1.0])
        >>> torch.allclose(t.inv(t(x)), x), round(t.log_abs_det_jacobian(x, t(x)).item(), 4)
        (True, -0.6931)
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, loc: Tensor, chol: Tensor, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.loc, self.chol = loc, chol

    def _call(self, x: Tensor) -> Tensor:
        if x.shape[-1] == 1:
            return self.loc + x / self.chol[..., 0]
        upper = self.chol.transpose(-1, -2)
        batch = torch.broadcast_shapes(x.shape[:-1], upper.shape[:-2])
        f = x.shape[-1]
        y = torch.linalg.solve_triangular(
            upper.expand(batch + (f, f)), x.expand(batch + (f,)).unsqueeze(-1), upper=True
        )
        return self.loc + y.squeeze(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        if y.shape[-1] == 1:
            return (y - self.loc) * self.chol[..., 0]
        return ((y - self.loc).unsqueeze(-2) @ self.chol).squeeze(-2)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        log_diag = self.chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return (-log_diag).expand(torch.broadcast_shapes(x.shape[:-1], log_diag.shape))

    def with_cache(self, cache_size: int = 1) -> PrecisionAffine:
        if self._cache_size == cache_size:
            return self
        return PrecisionAffine(self.loc, self.chol, cache_size=cache_size)


def newton_conditionals(
    model: Callable[..., Any],
    structure: PlateStructure,
    g: Tensor,
    blocks: list[Tensor],
    anchors: dict[int, tuple[Tensor, Tensor]],
    idx: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Each target group's Newton-step Gaussian ``(mean, chol)`` (:func:`newton_gaussian`)
    from one run of ``model`` at the globals ``g``, the other groups at ``blocks`` and each
    target group ``k`` at ``anchors[k] = (loc, log_scale)`` (``(*lead, *grid, F)``; also the
    fallback Gaussian). Differentiable in everything when gradients are enabled, detached
    otherwise. The run skips Pyro's argument checks: the ELBO's own run of the model makes
    them, and those of the observations cost a pass over the data."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad(), validation_enabled(False):
        blocks = list(blocks)
        for k, (loc, _) in anchors.items():
            blocks[k] = loc if loc.requires_grad else loc.detach().requires_grad_(True)
        run, log_dets = model_run(model, structure, g, blocks, idx, args, kwargs)
        skip = set(idx) | {site.name for site in structure.global_sites}
        total = g.new_zeros(())
        for name, site in run.nodes.items():
            if site["type"] == "sample" and name not in skip:
                total = total + unscaled_log_prob(site)
        for k in anchors:
            total = total - sum(log_dets[k].values(), g.new_zeros(()))
        out = {}
        for k, (loc, log_scale) in anchors.items():
            found = gradient_and_precision(total, blocks[k], create_graph)
            if found is None:  # no term depends on the locals: the fallback
                found = (torch.full_like(loc, math.nan), loc.new_zeros(loc.shape + loc.shape[-1:]))
            mean, chol = newton_gaussian(blocks[k], *found, loc, log_scale)
            out[k] = (mean, chol) if create_graph else (mean.detach(), chol.detach())
    return out


def chunked_newton_conditionals(
    model: Callable[..., Any],
    structure: PlateStructure,
    g: Tensor,
    blocks: list[Tensor],
    anchors: dict[int, tuple[Tensor, Tensor]],
    args: tuple,
    kwargs: dict,
) -> dict[int, tuple[Tensor, Tensor]]:
    """:func:`newton_conditionals` over the full plates (every tensor over the full grid),
    run in chunks of each plate's subsample size where the model subsamples it (its plates
    then accept no other size), without gradients."""
    plates = list(structure.plates.values())
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for combo in itertools.product(*index_chunks(plates)):
        idx = {p.name: ids.to(g.device) for p, ids in zip(plates, combo, strict=True)}
        at = [_at(group.grid_index(idx), 1) for group in structure.groups]
        part = [b[at[k]] for k, b in enumerate(blocks)]
        local = {k: (loc[at[k]], log_scale[at[k]]) for k, (loc, log_scale) in anchors.items()}
        found = newton_conditionals(model, structure, g, part, local, idx, args, kwargs)
        for k, (mean, chol) in found.items():
            loc = anchors[k][0]
            if k not in out:
                out[k] = (loc.new_empty(loc.shape), loc.new_empty(loc.shape + loc.shape[-1:]))
            out[k][0][at[k]] = mean
            out[k][1][_at(structure.groups[k].grid_index(idx), 2)] = chol
    return out


def _at(grid_index: tuple[Tensor, ...], event_dims: int) -> tuple[Any, ...]:
    """An index of the elements ``grid_index`` in a tensor ``(*lead, *grid, *event)``."""
    return (Ellipsis, *grid_index) + (slice(None),) * event_dims


def group_conditionals(
    model: Callable[..., Any],
    structure: PlateStructure,
    flows: dict[int, Any],
    g: Tensor,
    blocks: dict[int, Tensor],
    indices: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    chunked: bool = False,
    targets: Collection[int] | None = None,
) -> dict[int, tuple[Tensor, Tensor]]:
    """The Newton Gaussians of the groups ``k`` of ``flows`` (their
    :class:`~pyro_flows_ext.infer.hierarchical.local_flow.LocalFlow`) at the globals ``g``
    and the other groups' draws ``blocks``, for the elements ``indices`` (the plates'
    subsample; with ``chunked``, the full plates, read in chunks of the model's subsample
    sizes). Each starts at, and falls back to, its flow's learned Gaussian at ``g``. With
    ``targets``, only those groups' (the other groups of ``flows`` sit at their learned
    Gaussians' means)."""
    sizes = {n: len(i) for n, i in indices.items()}
    anchors = {}
    for k, flow in flows.items():
        group = structure.groups[k]
        loc, log_scale = flow.gaussian(g, *flow.element_params(group.plates, indices))
        shape = torch.broadcast_shapes(loc.shape[:-1], g.shape[:-1], group.grid(sizes))
        shape += (group.dim,)
        anchors[k] = (loc.expand(shape), log_scale.expand(shape))
    every = [blocks[k] if k in blocks else anchors[k][0] for k in range(len(structure.groups))]
    if targets is not None:
        anchors = {k: anchors[k] for k in targets}
    if chunked and any(p.subsample_size < p.size for p in structure.plates.values()):
        return chunked_newton_conditionals(model, structure, g, every, anchors, args, kwargs)
    return newton_conditionals(model, structure, g, every, anchors, indices, args, kwargs)
