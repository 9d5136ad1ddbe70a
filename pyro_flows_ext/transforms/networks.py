"""The networks of couplings: how a coupling gets the network that computes its parameters.

A coupling needs a network from its identity part ``x_A`` (and a context, when conditional) to
``num_params`` values per transformed element. Builders hand a coupling a *factory*
``factory(partition, num_params, context_dim) -> network`` and the coupling calls it with its
own partition and its map's parameter count, so that the sizes are decided in one place:
density models pass :func:`density_network` (an MLP for vectors, a CNN for images), the guides
their damped MLP. A ready ``nn.Module`` is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pyro_flows_ext.checks import hidden_sizes, positive_int
from pyro_flows_ext.nn import HIDDEN_CHANNELS, ConvNet, mlp
from pyro_flows_ext.transforms.masks import Partition

__all__ = ["Network", "NetworkFactory", "build_network", "density_network"]

NetworkFactory = Callable[[Partition, int, int], nn.Module]
"""``factory(partition, num_params, context_dim)``: a network from ``x_A`` of
``partition.conditioner_shape`` (and a context of ``context_dim`` features when it is positive)
to ``num_params`` tensors of ``partition.transformed_shape``, as a tuple or stacked along the
feature/channel axis."""
Network = nn.Module | NetworkFactory


def density_network(
    hidden_dims: Sequence[int] | None = None,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
) -> NetworkFactory:
    """The factory of the density models' networks, zero-initialised: an MLP (Pyro's
    ``DenseNN``, ``ConditionalDenseNN`` with a context; ``hidden_dims``, default
    :func:`~pyro_flows_ext.nn.default_hidden_dims`) for vectors, a
    :class:`~pyro_flows_ext.nn.ConvNet` (``hidden_channels`` wide, ``num_blocks`` residual
    blocks) for images.

    Example:
        >>> from pyro_flows_ext.transforms.masks import make_partition
        >>> net = density_network([8])(make_partition((4,), "half"), 2, 0)
        >>> [tuple(t.shape) for t in net(__import__("torch").zeros(3, 2))]
        [(3, 2), (3, 2)]
    """
    dims = hidden_sizes("hidden_dims", hidden_dims)
    hidden_channels = positive_int("hidden_channels", hidden_channels)
    num_blocks = positive_int("num_blocks", num_blocks, minimum=0)

    def build(partition: Partition, num_params: int, context_dim: int) -> nn.Module:
        a_shape, b_shape = partition.conditioner_shape, partition.transformed_shape
        if partition.event_dim == 1:
            return mlp(a_shape[0], [b_shape[0]] * num_params, dims, context_dim)
        out = num_params * b_shape[0]
        return ConvNet(a_shape[0], out, hidden_channels, num_blocks, context_dim)

    return build


def build_network(
    network: Network | None, partition: Partition, num_params: int, context_dim: int = 0
) -> nn.Module:
    """``network`` itself when it is a module, else the factory's network for ``partition``
    (:func:`density_network`'s defaults for ``None``).

    Example:
        >>> from torch import nn
        >>> from pyro_flows_ext.transforms.masks import make_partition
        >>> lin = nn.Linear(2, 2)
        >>> build_network(lin, make_partition((4,), "half"), 1) is lin
        True
    """
    if isinstance(network, nn.Module):
        return network
    if network is None:
        network = density_network()
    if not callable(network):
        raise TypeError(
            "network must be an nn.Module or a factory (partition, num_params, context_dim) "
            f"-> nn.Module, got {type(network).__name__}"
        )
    net = network(partition, num_params, context_dim)
    if not isinstance(net, nn.Module):
        raise TypeError(f"the network factory must return an nn.Module, got {type(net).__name__}")
    return net
