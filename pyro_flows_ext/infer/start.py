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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import biject_to

from pyro_flows_ext.infer._traces import (
    check_vectorised,
    max_plate_nesting,
    particle_dim,
    per_particle_log_prob,
    vectorised_or_looped,
)
from pyro_flows_ext.infer.laplace import laplace_approximation

__all__ = ["GaussianStart", "LogJoint", "gaussian_start"]

logger = logging.getLogger(__name__)


class LogJoint:
    """:math:`\\log p(x, z(u)) + \\log|\\partial z / \\partial u|` of ``model`` at packed
    unconstrained latents ``u``, laid out as in the ``AutoContinuous`` guide ``guide``.

    Calling it on ``(D,)`` gives a scalar; :meth:`batch` evaluates ``(N, D)`` at once under a
    particle plate when the model vectorises (checked on the first row), else row by row.
    Evaluations that fail inside the model (e.g. a Cholesky factorisation) give ``-inf``.
    """

    def __init__(self, guide: Any, model: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.guide = guide
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.nesting = max_plate_nesting(guide.prototype_trace)

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
        with poutine.block():
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
        with poutine.block(), pyro.plate("_start_particles", num, dim=dim):
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
    ``elbo`` (every candidate's estimate), the :class:`~pyro_flows_ext.infer.laplace.LaplaceResult`
    as ``laplace`` and a ``reason`` when the Laplace approximation was not a candidate.
    """
    if not laplace:
        return GaussianStart(init_loc, None, init_scale, {"method": "loc", "reason": "init='loc'"})
    eye = torch.eye(len(init_loc), dtype=init_loc.dtype, device=init_loc.device)
    candidates: dict[str, tuple[Tensor, Tensor | None, float]] = {
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
    elbos = {}
    for name, (center, precond, scale) in candidates.items():
        factor = scale * (eye if precond is None else precond)
        q = dist.MultivariateNormal(center, scale_tril=factor)
        draws = q.sample((num_samples,))
        diff = log_joint.batch(draws) - q.log_prob(draws)
        elbos[name] = float(diff.nan_to_num(nan=-math.inf).mean())
    best = max(elbos, key=lambda k: (elbos[k], k.startswith("laplace")))
    info.update(method=best, elbo=elbos)
    if not best.startswith("laplace"):
        logger.info("gaussian_start: %s start has the highest ELBO (%s)", best, elbos)
    center, precond, scale = candidates[best]
    return GaussianStart(center, precond, scale, info)
