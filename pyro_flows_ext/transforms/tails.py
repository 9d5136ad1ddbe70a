"""A learned elementwise map that gives each side of each coordinate an exponential tail.

Flows whose layers are affine far from the bulk keep their base's Gaussian tails. Many
posteriors have an exponential tail on one side: the log of a scale whose prior density is
finite and positive at zero (``HalfNormal``, ``HalfCauchy``, ``Exponential``) has
:math:`p(\\log \\sigma) \\propto \\sigma` as :math:`\\sigma \\to 0`, so its left tail decays
like :math:`e^{x}` (a hierarchical model's group scale, whose sd in the log is then mostly
tail: radon's :math:`\\log \\sigma_b` has its 1% quantile 3.5 below its median). A reverse-KL
fit with Gaussian tails cuts that tail and reports too small a spread.

The map, per coordinate, with :math:`x_+ = \\max(x, 0)` and :math:`x_- = \\max(-x, 0)`,

.. math::

    y = x + \\tfrac12 \\big(\\beta_+ x_+^2 - \\beta_- x_-^2\\big), \\qquad
    \\frac{dy}{dx} = 1 + \\beta_{\\pm} |x| \\ge 1,

is the identity near zero (continuous with its first derivative there) and, on a side with
:math:`\\beta > 0`, sends a standard normal's tail :math:`e^{-x^2/2}` to the exponential tail
:math:`P(y > t) \\approx e^{-t/\\beta}`; :math:`\\beta = 0` keeps the Gaussian tail. Its inverse
is closed form, :math:`x = 2y / (1 + \\sqrt{1 + 2 \\beta_{\\pm} |y|})`, with the side chosen by
the sign of :math:`y` (the map keeps signs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import check_input, positive_float, positive_int
from pyro_flows_ext.transforms._base import CachedTransformModule

__all__ = ["TAIL_INIT", "ExponentialTails"]

TAIL_INIT = 1e-2
"""The tail weights' start: close to the identity (Gaussian tails), ``log`` of it a moderate
number, so that Adam reaches a weight of 2 (radon's ``log sigma_b`` in the globals' base)
within some hundred steps."""


class ExponentialTails(CachedTransformModule):
    """The elementwise map of the module docstring over a ``(D,)`` event, with the tail weights
    :math:`\\beta_\\mp = e^{\\rho_\\mp}` learned per coordinate and side (``rho``, shape
    ``(2, D)``: left side first), all starting at ``init``.

    Args:
        dim: ``D``.
        init: the initial tail weight of every side, ``> 0`` (default :data:`TAIL_INIT`).

    Example:
        >>> import torch
        >>> t = ExponentialTails(2, init=1.0)
        >>> y = t(torch.tensor([[2.0, -2.0]]))
        >>> y.tolist(), t.inv(y).tolist()
        ([[4.0, -4.0]], [[2.0, -2.0]])
        >>> round(t.log_abs_det_jacobian(torch.tensor([[2.0, -2.0]]), y).item(), 4)  # 2 log 3
        2.1972
    """

    sign = +1  # its Jacobian determinant is positive

    def __init__(self, dim: int, init: float = TAIL_INIT, cache_size: int = 1) -> None:
        super().__init__(event_dim=1, cache_size=cache_size)
        self.dim = positive_int("dim", dim)
        self.rho = nn.Parameter(torch.full((2, dim), math.log(positive_float("init", init))))

    @property
    def weights(self) -> Tensor:
        """:math:`(\\beta_-, \\beta_+)` per coordinate, shape ``(2, D)``."""
        return self.rho.exp()

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.dim,), name)

    def _side(self, v: Tensor) -> Tensor:
        """The tail weight of the side each element of ``v`` lies on."""
        left, right = self.weights
        return torch.where(v >= 0, right, left)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        slope = self._side(x) * x.abs()
        return x * (1 + 0.5 * slope), torch.log1p(slope).sum(-1)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        beta = self._side(y)
        x = 2 * y / (1 + torch.sqrt(1 + 2 * beta * y.abs()))
        return x, torch.log1p(beta * x.abs()).sum(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
