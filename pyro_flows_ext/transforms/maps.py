"""Elementwise maps: what a coupling does to its transformed part.

A coupling (:class:`~pyro_flows_ext.transforms.Coupling`) leaves one part ``x_A`` of its input
unchanged and maps the other part elementwise, ``y_B = f(x_B; theta(x_A))``, with parameters
``theta`` from a network that sees ``x_A``. The map is the only thing that differs between
NICE's additive, RealNVP/Glow's affine and the neural-spline couplings, so each kind is one
small class here that says how many parameters per transformed feature it needs
(:attr:`ElementwiseMap.num_params`) and owns its options; the rational-quadratic spline is
:class:`~pyro_flows_ext.transforms.SplineMap`. The registry of names users pass
(``coupling="affine"``) is :data:`~pyro_flows_ext.transforms.COUPLINGS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_flows_ext.checks import one_of, positive_float

__all__ = ["CLAMP", "SCALES", "AdditiveMap", "AffineMap", "ElementwiseMap"]

SCALES = ("exp", "sigmoid")
CLAMP = 3.0
"""The default bound of an affine coupling's soft-clamped log-scale: one layer scales a feature
by at most ``e^3 ~ 20`` either way, enough for any one step of a deep flow, while a bad step
early in training cannot blow the data up."""
_LOG1P_EXP_MINUS_2 = math.log1p(math.exp(-2.0))  # -log(sigmoid(2))


class ElementwiseMap:
    """A monotone elementwise bijection ``y = f(x; theta)`` with ``num_params`` parameters per
    element, given as a sequence of ``num_params`` tensors of ``x``'s shape.

    Subclasses set :attr:`num_params` (per instance when it depends on options) and implement
    :meth:`forward` and :meth:`inverse`, which return the output and the elementwise
    ``log|dy/dx|`` of the forward map at the pair (``None`` for a volume-preserving map). With
    every parameter zero, the map must be the identity (a coupling with a zero-initialised
    network then starts as the identity). :meth:`options` lists the constructor's arguments,
    so a builder can store the map in a checkpoint's config.

    Example:
        A map of your own, registered by name (see
        :func:`~pyro_flows_ext.transforms.register_coupling`):

        >>> import torch
        >>> class Shift(ElementwiseMap):
        ...     num_params = 1
        ...     def forward(self, x, params):
        ...         return x + params[0], None
        ...     def inverse(self, y, params):
        ...         return y - params[0], None
        >>> Shift().forward(torch.zeros(2), [torch.ones(2)])[0].tolist()
        [1.0, 1.0]
    """

    num_params: int = 1

    def forward(self, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(y, elementwise log|dy/dx| or None)``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(x, elementwise log|dy/dx| of the forward map or None)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The constructor's arguments (none here)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ElementwiseMap)
            and type(self) is type(other)
            and self.options() == other.options()
        )

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))


class AdditiveMap(ElementwiseMap):
    """NICE's ``y = x + t``: volume preserving (log-det 0).

    Reference: Dinh, Krueger & Bengio (2015), NICE.
    """

    num_params = 1

    def forward(self, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, None]:
        return x + params[0], None

    def inverse(self, y: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, None]:
        return y - params[0], None


class AffineMap(ElementwiseMap):
    """RealNVP/Glow's ``y = x * s + t`` from parameters ``(t, h)``, with a smoothly bounded
    log-scale:

    * ``scale="exp"`` (RealNVP): ``log s = c * tanh(h / c)`` with ``c = clamp`` (soft clamp);
    * ``scale="sigmoid"`` (Glow): ``1 / s = sigmoid(h + 2) / sigmoid(2)``. The density
      direction (the inverse) multiplies by a factor in ``(0, 1.14)`` that is 1 when
      ``h = 0``: it can shrink but never blow up the data on its way to the base, which keeps
      maximum-likelihood training stable on images with near-constant pixels (MNIST's
      borders). ``clamp`` is unused.

    Example:
        >>> import torch
        >>> m = AffineMap(clamp=2.0)
        >>> y, log_s = m.forward(torch.ones(3), [torch.zeros(3), torch.full((3,), 100.0)])
        >>> [round(v, 3) for v in log_s.tolist()]  # bounded by the clamp
        [2.0, 2.0, 2.0]

    References: Dinh, Sohl-Dickstein & Bengio (2017), RealNVP; Kingma & Dhariwal (2018), Glow.
    """

    num_params = 2

    def __init__(self, scale: str = "exp", clamp: float = CLAMP) -> None:
        self.scale = one_of("scale", scale, SCALES)
        self.clamp = positive_float("clamp", clamp)

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale, "clamp": self.clamp}

    def log_scale(self, h: Tensor) -> Tensor:
        """``log s`` from the raw parameter ``h``."""
        if self.scale == "exp":
            return self.clamp * torch.tanh(h / self.clamp)
        return -(F.logsigmoid(h + 2.0) + _LOG1P_EXP_MINUS_2)  # log s = -log(inverse factor)

    def forward(self, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        shift, h = params
        log_s = self.log_scale(h)
        return x * log_s.exp() + shift, log_s

    def inverse(self, y: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        shift, h = params
        log_s = self.log_scale(h)
        return (y - shift) * (-log_s).exp(), log_s
