"""A learned elementwise affine map: Glow's learned top prior.

Put next to a standard-normal base, ``y = x * exp(log_scale) + loc`` with one ``loc`` and one
``log_scale`` per element turns the base into a learned diagonal Gaussian
``N(loc, exp(log_scale)^2)``, which is how Glow's optional learned prior of the top level
(``learntop``) is written as a bijection on the full tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import EventShape, as_event_shape, check_input
from pyro_flows_ext.transforms._base import CachedTransformModule

__all__ = ["ElementwiseAffine", "top_prior"]


class ElementwiseAffine(CachedTransformModule):
    """``y = x * exp(log_scale) + loc`` with a parameter per element of the event.

    Both parameters start at zero, so the layer starts as the identity (the base stays
    ``N(0, I)``). ``log|det| = sum(log_scale)`` over the event.

    Args:
        shape: ``D`` or ``(C, H, W)``; the parameters have exactly this shape.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = ElementwiseAffine((2, 3, 3))
        >>> base = dist.Normal(torch.zeros(2, 3, 3), 1).to_event(3)
        >>> dist.TransformedDistribution(base, [t]).log_prob(torch.zeros(4, 2, 3, 3)).shape
        torch.Size([4])

    Reference: Kingma & Dhariwal (2018), Glow (learned prior of the top level).
    """

    sign = +1  # its Jacobian determinant is positive

    def __init__(self, shape: int | EventShape, cache_size: int = 1) -> None:
        event_shape = as_event_shape(shape)
        super().__init__(event_dim=len(event_shape), cache_size=cache_size)
        self.event_shape = event_shape
        self.loc = nn.Parameter(torch.zeros(event_shape))
        self.log_scale = nn.Parameter(torch.zeros(event_shape))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, self.event_shape, name)

    def _log_det(self, x: Tensor) -> Tensor:
        return self.log_scale.sum().expand(x.shape[: x.dim() - self._event_dim])

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.loc, self._log_det(x)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return (y - self.loc) * (-self.log_scale).exp(), self._log_det(y)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


def top_prior(shape: int | EventShape) -> ElementwiseAffine:
    """An :class:`ElementwiseAffine` at the identity, to make a standard-normal base learned.

    Example:
        >>> top_prior((8, 2, 2)).loc.shape
        torch.Size([8, 2, 2])
    """
    return ElementwiseAffine(shape)
