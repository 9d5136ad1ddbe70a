"""A context-dependent shift: the amortised part of a conditional flow's Gaussian end."""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from pyro_flows_ext.checks import check_input, positive_int
from pyro_flows_ext.nn import LR_SCALE, DampedMLP
from pyro_flows_ext.transforms._base import CachedTransformModule

__all__ = ["ConditionalShift"]


class ConditionalShift(ConditionalTransformModule):
    """``y = x + W c + b`` for a context ``c``, with ``W, b`` the single layer of a
    zero-initialised :class:`~pyro_flows_ext.nn.DampedMLP` (``log|det| = 0``).

    ``.condition(c)`` returns the shift (``event_dim=1``) for ``x`` of shape ``(..., dim)``
    and ``c`` of shape ``(context_dim,)`` or ``(..., context_dim)``; it starts as the
    identity for every context. An amortised guide puts it before its final affine layer, so
    the location of the approximation moves with the data from the first step on.

    Args:
        dim: ``D``.
        context_dim: size of the context vector.
        lr_scale: ``W, b`` learn at this fraction of the optimiser's step size.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = ConditionalShift(3, context_dim=2)
        >>> t.condition(torch.ones(2))(torch.zeros(3)).tolist()  # zero at initialisation
        [0.0, 0.0, 0.0]
        >>> base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> q = dist.ConditionalTransformedDistribution(base, [t]).condition(torch.ones(2))
        >>> q.sample((4,)).shape
        torch.Size([4, 3])
    """

    def __init__(self, dim: int, context_dim: int, lr_scale: float = LR_SCALE) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.context_dim = positive_int("context_dim", context_dim)
        self.net = DampedMLP(context_dim, dim, [], lr_scale=lr_scale)

    def condition(self, context: Tensor) -> CachedTransformModule:
        check_input(context, (self.context_dim,), "context")
        return _Shift(self.net, context)


class _Shift(CachedTransformModule):
    """``y = x + net(context)``, evaluated at every call (so a conditioned shift reused
    across optimiser steps always sees the current weights)."""

    sign = +1  # its Jacobian determinant is positive

    def __init__(self, net: nn.Module, context: Tensor) -> None:
        super().__init__(event_dim=1)
        self.net = net
        self.context = context

    def _shift_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift = self.net(self.context)
        return shift, x.new_zeros(torch.broadcast_shapes(x.shape, shift.shape)[:-1])

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_det = self._shift_and_log_det(x)
        return x + shift, log_det

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_det = self._shift_and_log_det(y)
        return y - shift, log_det

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"
