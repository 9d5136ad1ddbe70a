"""Coupling layers (NICE, RealNVP, Glow) for vectors and images.

A coupling splits ``x`` into an identity part ``x_A`` and a transformed part ``x_B`` (see
:mod:`pyro_flows_ext.transforms.masks`) and maps

.. math:: y_A = x_A, \\qquad y_B = x_B \\odot s(x_A) + t(x_A),

so the Jacobian is triangular with ``log|det| = sum(log s(x_A))``, and both directions take one
conditioner pass: ``x_B = (y_B - t(y_A)) / s(y_A)``. One base class, :class:`Coupling`, does the
split, the conditioner call, the merge and the caching; the subclasses only say how ``x_B`` is
mapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_flows_ext.checks import (
    EventShape,
    as_event_shape,
    check_input,
    hidden_sizes,
    one_of,
    positive_float,
    positive_int,
)
from pyro_flows_ext.nn import HIDDEN_CHANNELS, ConvNet, default_hidden_dims, mlp
from pyro_flows_ext.transforms._base import CachedTransformModule
from pyro_flows_ext.transforms.masks import Partition, make_partition

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "make_conditioner",
]

SCALES = ("exp", "sigmoid")
_LOG1P_EXP_MINUS_2 = math.log1p(math.exp(-2.0))  # -log(sigmoid(2))
Conditioner = Callable[[Tensor], Tensor | Sequence[Tensor]]


class Coupling(CachedTransformModule):
    """Base of the coupling layers: split, conditioner call, merge, caching.

    Args:
        event_shape: ``D`` for vectors or ``(C, H, W)`` for images.
        conditioner: a callable (usually an ``nn.Module``) mapping the identity part to the
            parameters of the elementwise map: a tuple of ``num_params`` tensors, or one tensor
            holding them stacked along the feature/channel axis, each of the transformed part's
            shape (see :attr:`Partition.transformed_shape`).
        mask: ``"half"``/``"alternating"`` for vectors, ``"channel"``/``"checkerboard"`` for
            images (default: the first of each), or a ready :class:`Partition`.
        parity: 0 or 1; which part is the identity.
        cache_size: 1 (default) keeps the last result so that the log-det is free.

    Example:
        A coupling with a network of your own (here a linear map of ``x_A`` to ``t``):

        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> t = AdditiveCoupling(4, net, mask="half")
        >>> x = torch.randn(3, 4)
        >>> torch.equal(t(x)[:, :2], x[:, :2])
        True
    """

    sign = +1  # its Jacobian determinant is positive

    num_params = 1

    def __init__(
        self,
        event_shape: int | EventShape,
        conditioner: Conditioner,
        mask: str | Partition | None = None,
        parity: int = 0,
        cache_size: int = 1,
    ) -> None:
        shape = as_event_shape(event_shape)
        super().__init__(event_dim=len(shape), cache_size=cache_size)
        self.event_shape = shape
        if isinstance(mask, Partition):
            if mask.event_shape != shape:
                raise ValueError(f"partition of shape {mask.event_shape} given for {shape}")
            self.partition = mask
        else:
            self.partition = make_partition(shape, mask, parity)
        self.conditioner = conditioner

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, self.event_shape, name)

    def _params(self, a: Tensor) -> Sequence[Tensor]:
        out = self.conditioner(a)
        if isinstance(out, Tensor):
            out = out.chunk(self.num_params, dim=self.partition.feature_dim)
        return (out,) if isinstance(out, Tensor) else out

    def _map(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(y_B, elementwise log-det or None for volume-preserving maps)``."""
        raise NotImplementedError

    def _unmap(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(x_B, elementwise log-det of the forward map)``."""
        raise NotImplementedError

    def _log_det(self, x: Tensor, elementwise: Tensor | None) -> Tensor:
        if elementwise is None:
            return x.new_zeros(x.shape[: x.dim() - self._event_dim])
        return self.partition.sum_log_det(elementwise)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.partition.split(x)
        y_b, ld = self._map(b, self._params(a))
        return self.partition.merge(x, a, y_b), self._log_det(x, ld)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.partition.split(y)
        x_b, ld = self._unmap(b, self._params(a))
        return self.partition.merge(y, a, x_b), self._log_det(y, ld)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


class AdditiveCoupling(Coupling):
    """NICE's additive coupling ``y_B = x_B + t(x_A)``: volume preserving (log-det 0).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = additive_coupling(4)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1).to_event(1), [t])
        >>> d.log_prob(torch.randn(3, 4)).shape
        torch.Size([3])

    Reference: Dinh, Krueger & Bengio (2015), NICE.
    """

    def _map(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, None]:
        return b + params[0], None

    def _unmap(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, None]:
        return b - params[0], None


class AffineCoupling(Coupling):
    """RealNVP/Glow affine coupling ``y_B = x_B * s(x_A) + t(x_A)``.

    The conditioner outputs ``(t, h)``; the log-scale is bounded smoothly:

    * ``scale="exp"`` (RealNVP): ``log s = c * tanh(h / c)`` with ``c = clamp`` (soft clamp);
    * ``scale="sigmoid"`` (Glow): ``1 / s = sigmoid(h + 2) / sigmoid(2)``. As in Glow, the
      density direction (the inverse, ``x_B = (y_B - t) * sigmoid(h + 2) / sigmoid(2)``)
      multiplies by a factor in ``(0, 1.14)`` that is 1 when ``h = 0``: it can shrink but
      never blow up the data on its way to the base, which keeps maximum-likelihood training
      stable on images with near-constant pixels (MNIST's borders).

    With a zero-initialised conditioner head the layer starts as the identity. With
    ``cache_size=1`` the log-scale of the last call is kept, so
    ``log_abs_det_jacobian`` after either direction costs nothing.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = affine_coupling((2, 4, 4), mask="checkerboard", hidden_channels=8)
        >>> base = dist.Normal(torch.zeros(2, 4, 4), 1).to_event(3)
        >>> flow = dist.TransformedDistribution(base, [t])
        >>> flow.rsample((5,)).shape
        torch.Size([5, 2, 4, 4])

    References: Dinh, Sohl-Dickstein & Bengio (2017), RealNVP; Kingma & Dhariwal (2018), Glow.
    """

    num_params = 2

    def __init__(
        self,
        event_shape: int | EventShape,
        conditioner: Conditioner,
        mask: str | Partition | None = None,
        parity: int = 0,
        scale: str = "exp",
        clamp: float = 3.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(event_shape, conditioner, mask, parity, cache_size)
        self.scale = one_of("scale", scale, SCALES)
        self.clamp = positive_float("clamp", clamp)

    def _log_scale(self, h: Tensor) -> Tensor:
        if self.scale == "exp":
            return self.clamp * torch.tanh(h / self.clamp)
        return -(F.logsigmoid(h + 2.0) + _LOG1P_EXP_MINUS_2)  # log s = -log(inverse factor)

    def _map(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        shift, h = params
        log_s = self._log_scale(h)
        return b * log_s.exp() + shift, log_s

    def _unmap(self, b: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        shift, h = params
        log_s = self._log_scale(h)
        return (b - shift) * (-log_s).exp(), log_s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale!r}, clamp={self.clamp}"


def make_conditioner(
    partition: Partition,
    num_params: int,
    hidden_dims: Sequence[int] | None,
    hidden_channels: int,
    num_blocks: int,
    context_dim: int = 0,
) -> nn.Module:
    """The zero-initialised conditioner of a coupling on ``partition`` that outputs
    ``num_params`` values per transformed element: an MLP (Pyro's ``DenseNN``) for vectors, a
    :class:`~pyro_flows_ext.nn.ConvNet` for images, seeing a context when ``context_dim``."""
    a_shape, b_shape = partition.conditioner_shape, partition.transformed_shape
    dims = hidden_sizes("hidden_dims", hidden_dims)
    hidden_channels = positive_int("hidden_channels", hidden_channels)
    num_blocks = positive_int("num_blocks", num_blocks, minimum=0)
    if partition.event_dim == 1:
        dims = default_hidden_dims(a_shape[0]) if dims is None else dims
        return mlp(a_shape[0], [b_shape[0]] * num_params, dims, context_dim)
    return ConvNet(a_shape[0], num_params * b_shape[0], hidden_channels, num_blocks, context_dim)


def affine_coupling(
    shape: int | EventShape,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    parity: int = 0,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
    scale: str = "exp",
    clamp: float = 3.0,
    cache_size: int = 1,
) -> AffineCoupling:
    """An :class:`AffineCoupling` with a zero-initialised conditioner.

    Args:
        shape: ``D`` (an MLP conditioner, Pyro's ``DenseNN``) or ``(C, H, W)`` (a
            :class:`~pyro_flows_ext.nn.ConvNet`).
        hidden_dims: MLP hidden sizes (default
            :func:`~pyro_flows_ext.nn.default_hidden_dims`: two layers of ``max(64, 4 D_A)``).
        mask, parity: see :class:`Coupling`.
        hidden_channels, num_blocks: width and residual blocks of the CNN.
        scale, clamp: see :class:`AffineCoupling`.
        cache_size: see :class:`Coupling`.

    Example:
        >>> affine_coupling(6, hidden_dims=[16]).event_shape
        (6,)
    """
    event_shape = as_event_shape(shape)
    partition = make_partition(event_shape, mask, parity)
    net = make_conditioner(partition, 2, hidden_dims, hidden_channels, num_blocks)
    return AffineCoupling(
        event_shape, net, partition, scale=scale, clamp=clamp, cache_size=cache_size
    )


def additive_coupling(
    shape: int | EventShape,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    parity: int = 0,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
    cache_size: int = 1,
) -> AdditiveCoupling:
    """An :class:`AdditiveCoupling` with a zero-initialised conditioner.

    Args:
        shape: ``D`` (an MLP conditioner) or ``(C, H, W)`` (a CNN conditioner).
        hidden_dims: MLP hidden sizes (default
            :func:`~pyro_flows_ext.nn.default_hidden_dims`: two layers of ``max(64, 4 D_A)``).
        mask, parity: see :class:`Coupling`.
        hidden_channels, num_blocks: width and residual blocks of the CNN.
        cache_size: see :class:`Coupling`.

    Example:
        >>> additive_coupling((4, 8, 8), mask="checkerboard", parity=1).event_shape
        (4, 8, 8)
    """
    event_shape = as_event_shape(shape)
    partition = make_partition(event_shape, mask, parity)
    net = make_conditioner(partition, 1, hidden_dims, hidden_channels, num_blocks)
    return AdditiveCoupling(event_shape, net, partition, cache_size=cache_size)
