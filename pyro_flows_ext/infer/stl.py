"""Sticking the landing: the path-derivative gradient of the ELBO (Roeder, Wu & Duvenaud 2017).

For a reparameterised guide :math:`z = f_\\phi(\\epsilon)` the total derivative of
:math:`\\log q_\\phi(z)` has two parts,

.. math::

    \\frac{d}{d\\phi} \\log q_\\phi(f_\\phi(\\epsilon))
    = \\underbrace{\\partial_\\phi \\log q_\\phi(z)\\big|_{z}}_{\\text{score, mean } 0}
    + \\underbrace{\\nabla_z \\log q_\\phi(z)
      \\, \\partial_\\phi f_\\phi(\\epsilon)}_{\\text{path}}.

The score term has expectation zero, so dropping it keeps the ELBO gradient unbiased; when the
guide equals the posterior, the path term cancels the model's term exactly and the gradient has
zero variance. :class:`StickingTheLanding` wraps a reparameterised distribution so that its
``log_prob`` has the same value but only the path term in its gradient:

.. math:: \\log q_\\phi(z) - \\log q_\\phi(\\bar z) + \\overline{\\log q_\\phi(\\bar z)},

where a bar means "detached". It costs one extra density evaluation of a fresh tensor (for a
flow: one inverse pass without the cache). Any ELBO (``Trace_ELBO``, with or without
vectorised particles) then computes the sticking-the-landing gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Distribution

__all__ = ["StickingTheLanding"]

_Shape = torch.Size | list[int] | tuple[int, ...]


class StickingTheLanding(TorchDistribution):
    """A reparameterised distribution whose ``log_prob`` carries the path-derivative gradient.

    Sampling is delegated to ``base`` (``rsample`` keeps the gradient with respect to the
    parameters). ``log_prob(z)`` returns ``base.log_prob(z)`` in value; when gradients are
    enabled and ``z`` requires grad, its gradient with respect to ``base``'s parameters flows
    only through ``z``.

    Args:
        base: a distribution with ``has_rsample`` true.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> q = StickingTheLanding(dist.Normal(loc, 1.0).to_event(1))
        >>> p = dist.Normal(torch.zeros(2), 1.0).to_event(1)  # the target, equal to q here
        >>> z = q.rsample()
        >>> (g,) = torch.autograd.grad(p.log_prob(z) - q.log_prob(z), loc)
        >>> g.abs().max().item()  # zero for every draw (the plain estimator gives -z)
        0.0

    Reference: Roeder, Wu & Duvenaud (2017), Sticking the landing.
    """

    arg_constraints: dict[str, Any] = {}
    has_rsample = True

    def __init__(self, base: Distribution, validate_args: bool | None = None) -> None:
        if not isinstance(base, Distribution):
            raise TypeError(f"base must be a torch Distribution, got {type(base).__name__}")
        if not base.has_rsample:
            raise ValueError(
                f"sticking the landing needs a reparameterised distribution, "
                f"got {type(base).__name__} without rsample"
            )
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.base.support

    def expand(self, batch_shape: Any, _instance: Any = None) -> StickingTheLanding:
        return StickingTheLanding(self.base.expand(batch_shape))

    def rsample(self, sample_shape: _Shape = torch.Size()) -> Tensor:  # noqa: B008
        return self.base.rsample(sample_shape)

    def sample(self, sample_shape: _Shape = torch.Size()) -> Tensor:  # noqa: B008
        with torch.no_grad():
            return self.base.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        log_q = self.base.log_prob(value)
        if not (torch.is_grad_enabled() and value.requires_grad):
            return log_q
        score_part = self.base.log_prob(value.detach())
        return log_q - score_part + score_part.detach()

    @property
    def mean(self) -> Tensor:
        return self.base.mean

    @property
    def variance(self) -> Tensor:
        return self.base.variance
