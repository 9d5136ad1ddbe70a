"""Where a guide over the unconstrained latent vector starts: the model's log joint in that
space, and a choice among Gaussian starts by their ELBO.

A guide that starts far from the posterior, or at the wrong scale, may never get there with a
stochastic optimiser (regression coefficients of ``-6e4`` next to residual scales of ``1e-3``).
:func:`gaussian_start` compares a few Gaussian candidates :math:`q_c` by a Monte Carlo
estimate of

.. math:: \\mathrm{ELBO}(q_c) = \\mathbb E_{q_c}[\\log p(x, u) - \\log q_c(u)],

where :math:`\\log p(x, u)` includes the log-Jacobian of the constraining transforms:

* the Laplace approximation :math:`\\mathcal N(\\hat u, H^{-1})` at the mode and the same with
  half the scale (a mode in the tail of a skewed posterior makes :math:`H^{-1}` too wide),
  when the mode search converged;
* :math:`\\mathcal N(u_0, s^2 I)` at the ``init_loc_fn`` point :math:`u_0` with
  :math:`s` = ``init_scale`` and :math:`s = 1`.

All of this runs in float64 whatever the guide's dtype: a float32 model is evaluated on float64
latents under :class:`~pyro_flows_ext.infer.traces.PromoteToFloat64` (its float32 data and
parameters are promoted where they meet the latents), and the chosen start is cast back to the
guide's dtype. In float32 the mode search cannot resolve a badly scaled posterior (regression
coefficients with sd ``1e-3``: the Newton decrement never falls below the tolerance, and the
ELBO estimates lose digits), so a float32 guide would otherwise start far worse than a float64
one. When the float64 evaluation fails or disagrees with the model's own at the initial point
(a model whose arithmetic depends on its dtype), the start is computed in the model's dtype,
with the mode search's tolerance floored at that dtype's resolution.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import biject_to

from pyro_flows_ext.infer.traces import (
    VECTORISE_ERRORS,
    PromoteToFloat64,
    check_vectorised,
    max_plate_nesting,
    particle_dim,
    per_particle_log_prob,
    vectorised_or_looped,
)
from pyro_flows_ext.infer.vector.laplace import LaplaceResult, laplace_approximation

__all__ = ["GaussianStart", "LogJoint", "gaussian_start"]

logger = logging.getLogger(__name__)


class LogJoint:
    """:math:`\\log p(x, z(u)) + \\log|\\partial z / \\partial u|` of ``model`` at packed
    unconstrained latents ``u``, laid out as in the ``AutoContinuous`` guide ``guide``.

    Calling it on ``(D,)`` gives a scalar; :meth:`batch` evaluates ``(N, D)`` at once under a
    particle plate when the model vectorises (checked on the first row), else row by row.
    Evaluations that fail inside the model (e.g. a Cholesky factorisation) give ``-inf``.
    With ``promote=True`` the model runs under :class:`PromoteToFloat64` (for float64 latents
    and a float32 model; see :meth:`in_float64`).
    """

    def __init__(
        self,
        guide: Any,
        model: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        promote: bool = False,
    ) -> None:
        self.guide = guide
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.promote = promote
        self.nesting = max_plate_nesting(guide.prototype_trace)

    def in_float64(self) -> LogJoint:
        """The same log joint, evaluated in float64 at float64 latents."""
        return LogJoint(self.guide, self.model, self.args, self.kwargs, promote=True)

    def _precision(self) -> Any:
        return PromoteToFloat64() if self.promote else nullcontext()

    def _values(self, latent: Tensor, num: int) -> tuple[dict[str, Tensor], Tensor]:
        values = {}
        log_det: Tensor = latent.new_zeros((num,) if num else ())
        for site, u in self.guide._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(u)
            values[site["name"]] = value
            ld = transform.log_abs_det_jacobian(u, value)
            log_det = log_det + (ld.reshape(num, -1).sum(-1) if num else ld.sum())
        return values, log_det

    def exact(self, latent: Tensor) -> Tensor:
        """At one ``(D,)`` latent; errors inside the model propagate."""
        values, log_det = self._values(latent, 0)
        with poutine.block(), self._precision():
            conditioned = poutine.condition(self.model, data=values)
            trace = poutine.trace(conditioned).get_trace(*self.args, **self.kwargs)
        return trace.log_prob_sum() + log_det

    def __call__(self, latent: Tensor) -> Tensor:
        try:
            return self.exact(latent)
        except (RuntimeError, ValueError):
            return latent.new_tensor(-math.inf)

    def _vectorised(self, latents: Tensor) -> Tensor:
        """All rows under a particle plate, checked against :meth:`exact` on the first."""
        num = latents.shape[0]
        shaped = latents.reshape((num,) + (1,) * self.nesting + latents.shape[-1:])
        values, log_det = self._values(shaped, num)
        dim = particle_dim(self.guide.prototype_trace)
        with poutine.block(), self._precision(), pyro.plate("_start_particles", num, dim=dim):
            conditioned = poutine.condition(self.model, data=values)
            trace = poutine.trace(conditioned).get_trace(*self.args, **self.kwargs)
        out = per_particle_log_prob(trace, num, dim) + log_det
        check_vectorised(float(out[0]), float(self.exact(latents[0])))
        return out

    @torch.no_grad()
    def batch(self, latents: Tensor) -> Tensor:
        """At ``(N, D)`` latents: ``(N,)``."""
        out, _ = vectorised_or_looped(
            lambda: self._vectorised(latents),
            lambda: torch.stack([self(u) for u in latents]),
            label="LogJoint.batch",
        )
        return out


@dataclass(frozen=True)
class GaussianStart:
    """A start ``N(center, (P B_0)(P B_0)^T)`` with ``P`` = ``preconditioner`` (``None``: the
    identity) and ``B_0 = scale * I``, and the report :attr:`info`."""

    center: Tensor
    preconditioner: Tensor | None
    scale: float
    info: dict[str, Any]


def _float64_twin(log_joint: LogJoint, init_loc: Tensor) -> tuple[LogJoint, Tensor, str]:
    """``(log joint, initial point, note)`` to compute the start with: the float64 twin when
    it evaluates and agrees with the model's own evaluation at ``init_loc``, else the original.
    """
    if init_loc.dtype == torch.float64:
        return log_joint, init_loc, "float64"
    twin, loc64 = log_joint.in_float64(), init_loc.to(torch.float64)
    try:
        with torch.no_grad():
            native, promoted = float(log_joint.exact(init_loc)), float(twin.exact(loc64))
    except (*VECTORISE_ERRORS, TypeError) as err:
        note = f"{init_loc.dtype} (the float64 evaluation failed: {err})"
        logger.info("gaussian_start: %s", note)
        return log_joint, init_loc, note
    if math.isfinite(promoted) and math.isclose(native, promoted, rel_tol=1e-3, abs_tol=0.1):
        return twin, loc64, "float64"
    note = f"{init_loc.dtype} (float64 log density {promoted} differs from {native})"
    logger.info("gaussian_start: %s", note)
    return log_joint, init_loc, note


Candidates = dict[str, tuple[Tensor, Tensor | None, float]]


def _candidates(
    log_joint: LogJoint, init_loc: Tensor, init_scale: float, laplace_options: dict | None
) -> tuple[Candidates, dict[str, Any]]:
    """The candidate starts ``name -> (center, preconditioner, scale)`` and the report."""
    candidates: Candidates = {
        "loc": (init_loc, None, init_scale),
        "loc/unit": (init_loc, None, 1.0),
    }
    info: dict[str, Any] = {}
    try:
        with torch.enable_grad():
            result = laplace_approximation(log_joint, init_loc, **(laplace_options or {}))
        info["laplace"] = result
        if result.converged:
            candidates["laplace"] = (result.loc, result.scale_tril, 1.0)
            candidates["laplace/2"] = (result.loc, result.scale_tril, 0.5)
        else:
            info["reason"] = "the mode search did not converge to a positive definite mode"
    except (ValueError, RuntimeError) as err:
        info["reason"] = f"Laplace approximation failed: {err}"
    return candidates, info


def _elbo(log_joint: LogJoint, q: dist.MultivariateNormal, num_samples: int) -> float:
    draws = q.sample((num_samples,))
    diff = log_joint.batch(draws) - q.log_prob(draws)
    return float(diff.nan_to_num(nan=-math.inf).mean())


def gaussian_start(
    log_joint: LogJoint,
    init_loc: Tensor,
    init_scale: float,
    *,
    laplace: bool = True,
    laplace_options: dict[str, Any] | None = None,
    num_samples: int = 256,
) -> GaussianStart:
    """The candidate Gaussian (see the module docstring) with the highest estimated ELBO, each
    estimated from ``num_samples`` draws; with ``laplace=False`` simply
    :math:`\\mathcal N(u_0, s^2 I)` with :math:`s` = ``init_scale``.

    ``info`` holds ``method`` (``"laplace"``, ``"laplace/2"``, ``"loc"`` or ``"loc/unit"``),
    ``elbo`` (every candidate's estimate), the
    :class:`~pyro_flows_ext.infer.vector.laplace.LaplaceResult` as ``laplace`` (in
    ``init_loc``'s dtype), a ``reason`` when the Laplace approximation was not a candidate,
    and ``dtype``: ``"float64"``, or why the start was computed in the model's own dtype
    (see the module docstring). The start has ``init_loc``'s dtype.
    """
    if not laplace:
        return GaussianStart(init_loc, None, init_scale, {"method": "loc", "reason": "init='loc'"})
    work, loc, note = _float64_twin(log_joint, init_loc)
    candidates, info = _candidates(work, loc, init_scale, laplace_options)
    eye = torch.eye(len(loc), dtype=loc.dtype, device=loc.device)
    elbos = {}
    for name, (center, precond, scale) in candidates.items():
        factor = scale * (eye if precond is None else precond)
        elbos[name] = _elbo(work, dist.MultivariateNormal(center, scale_tril=factor), num_samples)
    best = max(elbos, key=lambda k: (elbos[k], k.startswith("laplace")))
    info.update(method=best, elbo=elbos, dtype=note)
    if not best.startswith("laplace"):
        logger.info("gaussian_start: %s start has the highest ELBO (%s)", best, elbos)
    dtype = init_loc.dtype
    if isinstance(info.get("laplace"), LaplaceResult):
        result = info["laplace"]
        info["laplace"] = dataclasses.replace(
            result, loc=result.loc.to(dtype), scale_tril=result.scale_tril.to(dtype)
        )
    center, precond, scale = candidates[best]
    return GaussianStart(
        center.to(dtype), None if precond is None else precond.to(dtype), scale, info
    )
