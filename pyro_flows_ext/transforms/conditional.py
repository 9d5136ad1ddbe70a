"""Conditional couplings: the conditioner also sees a context vector ``c``.

``t.condition(c)`` returns the plain coupling (:class:`~pyro_flows_ext.transforms.AffineCoupling`
or :class:`~pyro_flows_ext.transforms.SplineCoupling`) whose conditioner is the network with
``c`` fixed, so conditional couplings work in Pyro's ``ConditionalTransformedDistribution`` and
in conditional :class:`~pyro_flows_ext.flows.Flow` s. Contexts broadcast against the batch
shape of the input: one context ``(K,)`` for a whole batch, or one per example ``(B, K)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyro.distributions.conditional import ConditionalTransform, ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform

from pyro_flows_ext.checks import (
    EventShape,
    as_event_shape,
    check_input,
    one_of,
    positive_float,
    positive_int,
)
from pyro_flows_ext.nn import HIDDEN_CHANNELS
from pyro_flows_ext.transforms.coupling import (
    SCALES,
    AffineCoupling,
    Coupling,
    make_conditioner,
)
from pyro_flows_ext.transforms.masks import make_partition
from pyro_flows_ext.transforms.spline import SplineCoupling
from pyro_flows_ext.transforms.split import FactorOut
from pyro_flows_ext.transforms.stack import Stack

__all__ = [
    "ConditionalAffineCoupling",
    "condition_all",
    "ConditionalCoupling",
    "ConditionalSplineCoupling",
    "conditional_affine_coupling",
    "conditional_spline_coupling",
]


class _Bound(nn.Module):
    """A conditional network with its context fixed (keeps the network's parameters visible
    to the coupling's cache)."""

    def __init__(self, net: nn.Module, context: Tensor) -> None:
        super().__init__()
        self.net = net
        self.context = context

    def forward(self, a: Tensor) -> Tensor | Sequence[Tensor]:
        return self.net(a, self.context)


class ConditionalCoupling(ConditionalTransformModule):
    """Base of the conditional couplings: ``conditioner(x_A, context)`` returns the parameters
    of the elementwise map; :meth:`condition` binds a context. Subclasses say which coupling
    a bound network makes (:meth:`_bind`)."""

    def __init__(
        self,
        event_shape: int | EventShape,
        conditioner: nn.Module,
        context_dim: int,
        mask: str | None = None,
        parity: int = 0,
    ) -> None:
        super().__init__()
        self.event_shape = as_event_shape(event_shape)
        self.context_dim = positive_int("context_dim", context_dim)
        self.partition = make_partition(self.event_shape, mask, parity)
        self.conditioner = conditioner

    def _bind(self, net: nn.Module) -> Coupling:
        raise NotImplementedError

    def condition(self, context: Tensor) -> Coupling:
        check_input(context, (self.context_dim,), "context")
        return self._bind(_Bound(self.conditioner, context))


class ConditionalAffineCoupling(ConditionalCoupling):
    """An affine coupling whose conditioner also sees a context vector.

    ``conditioner(x_A, context)`` returns ``(t, h)`` as for :class:`AffineCoupling`;
    ``.condition(context)`` returns an :class:`AffineCoupling` for that context.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = conditional_affine_coupling(4, context_dim=3)
        >>> base = dist.Normal(torch.zeros(4), 1).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [t]).condition(torch.ones(3))
        >>> d.sample((2,)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        event_shape: int | EventShape,
        conditioner: nn.Module,
        context_dim: int,
        mask: str | None = None,
        parity: int = 0,
        scale: str = "exp",
        clamp: float = 3.0,
    ) -> None:
        super().__init__(event_shape, conditioner, context_dim, mask, parity)
        self.scale = one_of("scale", scale, SCALES)
        self.clamp = positive_float("clamp", clamp)

    def _bind(self, net: nn.Module) -> AffineCoupling:
        return AffineCoupling(self.event_shape, net, self.partition, 0, self.scale, self.clamp)


class ConditionalSplineCoupling(ConditionalCoupling):
    """A rational-quadratic spline coupling whose conditioner also sees a context vector;
    ``.condition(context)`` returns a :class:`SplineCoupling`.

    Example:
        >>> import torch
        >>> t = conditional_spline_coupling((2, 4, 4), context_dim=3, hidden_channels=8)
        >>> t.condition(torch.ones(5, 3))(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
    """

    def __init__(
        self,
        event_shape: int | EventShape,
        conditioner: nn.Module,
        context_dim: int,
        mask: str | None = None,
        parity: int = 0,
        bins: int = 8,
        bound: float = 3.0,
    ) -> None:
        super().__init__(event_shape, conditioner, context_dim, mask, parity)
        self.bins = positive_int("bins", bins)
        self.bound = positive_float("bound", bound)

    def _bind(self, net: nn.Module) -> SplineCoupling:
        return SplineCoupling(self.event_shape, net, self.partition, 0, self.bins, self.bound)


def conditional_affine_coupling(
    shape: int | EventShape,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    parity: int = 0,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
    scale: str = "exp",
    clamp: float = 3.0,
) -> ConditionalAffineCoupling:
    """A :class:`ConditionalAffineCoupling` with a zero-initialised conditioner that sees
    ``context`` of size ``context_dim`` (Pyro's ``ConditionalDenseNN`` for vectors, a
    :class:`~pyro_flows_ext.nn.ConvNet` with a context bias for images).

    Args:
        shape: ``D`` or ``(C, H, W)``.
        context_dim: size of the context vector.
        hidden_dims, mask, parity, hidden_channels, num_blocks: as
            :func:`~pyro_flows_ext.transforms.affine_coupling`.
        scale, clamp: see :class:`~pyro_flows_ext.transforms.AffineCoupling`.

    Example:
        >>> conditional_affine_coupling(4, context_dim=2).context_dim
        2
    """
    partition = make_partition(as_event_shape(shape), mask, parity)
    context_dim = positive_int("context_dim", context_dim)
    net = make_conditioner(partition, 2, hidden_dims, hidden_channels, num_blocks, context_dim)
    return ConditionalAffineCoupling(shape, net, context_dim, mask, parity, scale, clamp)


def conditional_spline_coupling(
    shape: int | EventShape,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    parity: int = 0,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
    bins: int = 8,
    bound: float = 3.0,
) -> ConditionalSplineCoupling:
    """A :class:`ConditionalSplineCoupling` with a zero-initialised conditioner that sees
    ``context`` of size ``context_dim``; arguments as :func:`conditional_affine_coupling`
    and :func:`~pyro_flows_ext.transforms.spline_coupling`.

    Example:
        >>> conditional_spline_coupling(4, context_dim=2, bins=4).bins
        4
    """
    partition = make_partition(as_event_shape(shape), mask, parity)
    context_dim = positive_int("context_dim", context_dim)
    num_params = 3 * positive_int("bins", bins) - 1
    net = make_conditioner(
        partition, num_params, hidden_dims, hidden_channels, num_blocks, context_dim
    )
    return ConditionalSplineCoupling(shape, net, context_dim, mask, parity, bins, bound)


def condition_all(transform: Transform | ConditionalTransform, context: Tensor) -> Transform:
    """``transform`` with every conditional part conditioned on ``context``: conditional
    couplings anywhere in a stack, inside ``ComposeTransform`` s and the inner stacks of
    :class:`~pyro_flows_ext.transforms.FactorOut` (multi-scale flows); the other parts are
    returned as they are (no copy of any parameter).

    Example:
        >>> import torch
        >>> from pyro.distributions.torch_transform import ComposeTransformModule
        >>> from pyro_flows_ext.transforms import actnorm
        >>> stack = ComposeTransformModule([conditional_spline_coupling(4, 2), actnorm(4)])
        >>> condition_all(stack, torch.zeros(2))(torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """
    if isinstance(transform, ConditionalTransform):
        return transform.condition(context)
    if isinstance(transform, ComposeTransform):
        parts = [condition_all(p, context) for p in transform.parts]
        if all(a is b for a, b in zip(parts, transform.parts, strict=True)):
            return transform
        return Stack(parts)
    if isinstance(transform, FactorOut):
        inner = condition_all(transform.inner, context)
        return transform if inner is transform.inner else FactorOut(inner, transform.event_shape)
    return transform
