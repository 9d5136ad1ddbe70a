"""Conditional couplings: the conditioner also sees a context vector ``c``.

``t.condition(c)`` returns the plain :class:`~pyro_flows_ext.transforms.Coupling` whose
network is the conditional one with ``c`` fixed, so conditional couplings work in Pyro's
``ConditionalTransformedDistribution`` and in conditional
:class:`~pyro_flows_ext.flows.Flow` s. Contexts broadcast against the batch shape of the input:
one context ``(K,)`` for a whole batch, or one per example ``(B, K)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyro.distributions.conditional import ConditionalTransform, ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform

from pyro_flows_ext.checks import EventShape, as_event_shape, check_input, positive_int
from pyro_flows_ext.transforms.coupling import Coupling, coupling_parts
from pyro_flows_ext.transforms.maps import ElementwiseMap
from pyro_flows_ext.transforms.masks import Partition
from pyro_flows_ext.transforms.networks import Network
from pyro_flows_ext.transforms.split import FactorOut
from pyro_flows_ext.transforms.stack import Stack

__all__ = ["ConditionalCoupling", "condition_all"]


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
    """A coupling whose network also sees a context vector ``c``:
    ``y_B = transformer(x_B; network(x_A, c))``.

    Arguments as :class:`~pyro_flows_ext.transforms.Coupling`, plus ``context_dim``, the size of
    the context; a network factory is called with it, a ready module is called as
    ``network(x_A, context)``. ``.condition(context)`` returns the plain
    :class:`~pyro_flows_ext.transforms.Coupling` whose network has ``context`` fixed (sharing
    every parameter), so conditional couplings work in Pyro's
    ``ConditionalTransformedDistribution`` and in conditional
    :class:`~pyro_flows_ext.flows.Flow` s.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_flows_ext.transforms import AffineMap
        >>> t = ConditionalCoupling(4, AffineMap(), context_dim=3)
        >>> base = dist.Normal(torch.zeros(4), 1).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [t]).condition(torch.ones(3))
        >>> d.sample((2,)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        event_shape: int | EventShape,
        transformer: ElementwiseMap,
        network: Network | None = None,
        mask: str | Partition | None = None,
        parity: int = 0,
        *,
        context_dim: int,
    ) -> None:
        super().__init__()
        self.event_shape = as_event_shape(event_shape)
        self.context_dim = positive_int("context_dim", context_dim)
        self.transformer = transformer
        self.partition, self.conditioner = coupling_parts(
            self.event_shape, transformer, network, mask, parity, self.context_dim
        )

    def condition(self, context: Tensor) -> Coupling:
        check_input(context, (self.context_dim,), "context")
        net = _Bound(self.conditioner, context)
        return Coupling(self.event_shape, self.transformer, net, self.partition)

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, transformer={self.transformer!r}, "
            f"context_dim={self.context_dim}"
        )

    def __repr__(self) -> str:  # torch's Transform.__repr__ would drop the map
        return f"{type(self).__name__}({self.extra_repr()})"


def condition_all(transform: Transform | ConditionalTransform, context: Tensor) -> Transform:
    """``transform`` with every conditional part conditioned on ``context``: conditional
    couplings anywhere in a stack, inside ``ComposeTransform`` s and the inner stacks of
    :class:`~pyro_flows_ext.transforms.FactorOut` (multi-scale flows); the other parts are
    returned as they are (no copy of any parameter).

    Example:
        >>> import torch
        >>> from pyro.distributions.torch_transform import ComposeTransformModule
        >>> from pyro_flows_ext.transforms import actnorm, conditional_spline_coupling
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
