"""The coupling layer (NICE, RealNVP, Glow, neural spline flows) for vectors and images.

A coupling splits ``x`` into an identity part ``x_A`` and a transformed part ``x_B`` (see
:mod:`pyro_flows_ext.transforms.masks`) and maps

.. math:: y_A = x_A, \\qquad y_B = f(x_B;\\ \\theta(x_A)),

with ``f`` an elementwise bijection (:mod:`pyro_flows_ext.transforms.maps`), so the Jacobian is
triangular with ``log|det| = sum log f'(x_B)`` and both directions take one network pass:
``x_B = f^{-1}(y_B; theta(y_A))``. One class does the split, the network call, the merge and
the caching for every kind of map; the conditional twin is
:class:`~pyro_flows_ext.transforms.ConditionalCoupling`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pyro_flows_ext.checks import EventShape, as_event_shape, check_input
from pyro_flows_ext.transforms._base import CachedTransformModule
from pyro_flows_ext.transforms.maps import ElementwiseMap
from pyro_flows_ext.transforms.masks import Partition, make_partition
from pyro_flows_ext.transforms.networks import Network, build_network

__all__ = ["Coupling", "coupling_parts"]


def coupling_parts(
    event_shape: EventShape,
    transformer: ElementwiseMap,
    network: Network | None,
    mask: str | Partition | None,
    parity: int,
    context_dim: int = 0,
) -> tuple[Partition, nn.Module]:
    """The partition and the network of a coupling (plain or conditional): ``mask`` itself when
    it is a :class:`~pyro_flows_ext.transforms.Partition` of ``event_shape``, else
    :func:`~pyro_flows_ext.transforms.masks.make_partition`'s; the network built for it
    (:func:`~pyro_flows_ext.transforms.networks.build_network`), with the map checked.

    Example:
        >>> from pyro_flows_ext.transforms import AffineMap
        >>> part, net = coupling_parts((4,), AffineMap(), None, "half", 1)
        >>> part.conditioner_shape, type(net).__name__
        ((2,), 'DenseNN')
    """
    if not isinstance(transformer, ElementwiseMap):
        raise TypeError(f"transformer must be an ElementwiseMap, got {type(transformer).__name__}")
    if isinstance(mask, Partition):
        if mask.event_shape != event_shape:
            raise ValueError(f"partition of shape {mask.event_shape} given for {event_shape}")
        partition = mask
    else:
        partition = make_partition(event_shape, mask, parity)
    return partition, build_network(network, partition, transformer.num_params, context_dim)


class Coupling(CachedTransformModule):
    """A coupling layer: ``y_A = x_A``, ``y_B = transformer(x_B; network(x_A))``.

    Args:
        event_shape: ``D`` for vectors or ``(C, H, W)`` for images.
        transformer: the elementwise map
            (:class:`~pyro_flows_ext.transforms.AffineMap`,
            :class:`~pyro_flows_ext.transforms.SplineMap`,
            :class:`~pyro_flows_ext.transforms.AdditiveMap` or one of your own).
        network: the network from ``x_A`` to the map's parameters: a module returning a tuple of
            ``transformer.num_params`` tensors, or one tensor holding them stacked along the
            feature/channel axis, each of the transformed part's shape (see
            :attr:`Partition.transformed_shape`); or a factory
            ``(partition, num_params, context_dim) -> module``
            (:mod:`pyro_flows_ext.transforms.networks`; default
            :func:`~pyro_flows_ext.transforms.networks.density_network`).
        mask: ``"half"``/``"alternating"`` for vectors, ``"channel"``/``"checkerboard"`` for
            images (default: the first of each), or a ready :class:`Partition`.
        parity: 0 or 1; which part is the identity.
        cache_size: 1 (default) keeps the last result so that the log-det is free.

    With a zero-initialised network the layer starts as the identity.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_flows_ext.transforms import AdditiveMap, AffineMap
        >>> t = Coupling(4, AdditiveMap(), torch.nn.Linear(2, 2), mask="half")  # your own net
        >>> x = torch.randn(3, 4)
        >>> torch.equal(t(x)[:, :2], x[:, :2])
        True
        >>> t = Coupling((2, 4, 4), AffineMap(), mask="checkerboard")  # the default CNN
        >>> base = dist.Normal(torch.zeros(2, 4, 4), 1).to_event(3)
        >>> dist.TransformedDistribution(base, [t]).rsample((5,)).shape
        torch.Size([5, 2, 4, 4])
    """

    sign = +1  # every map is increasing: the Jacobian determinant is positive

    def __init__(
        self,
        event_shape: int | EventShape,
        transformer: ElementwiseMap,
        network: Network | None = None,
        mask: str | Partition | None = None,
        parity: int = 0,
        cache_size: int = 1,
    ) -> None:
        shape = as_event_shape(event_shape)
        super().__init__(event_dim=len(shape), cache_size=cache_size)
        self.event_shape = shape
        self.transformer = transformer
        self.partition, self.conditioner = coupling_parts(shape, transformer, network, mask, parity)

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, self.event_shape, name)

    def _params(self, a: Tensor) -> Sequence[Tensor]:
        out = self.conditioner(a)
        if isinstance(out, Tensor):
            out = out.chunk(self.transformer.num_params, dim=self.partition.feature_dim)
        return (out,) if isinstance(out, Tensor) else out

    def _log_det(self, x: Tensor, elementwise: Tensor | None) -> Tensor:
        if elementwise is None:
            return x.new_zeros(x.shape[: x.dim() - self._event_dim])
        return self.partition.sum_log_det(elementwise)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.partition.split(x)
        y_b, ld = self.transformer.forward(b, self._params(a))
        return self.partition.merge(x, a, y_b), self._log_det(x, ld)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.partition.split(y)
        x_b, ld = self.transformer.inverse(b, self._params(a))
        return self.partition.merge(y, a, x_b), self._log_det(y, ld)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, transformer={self.transformer!r}"

    def __repr__(self) -> str:  # torch's Transform.__repr__ would drop the map
        return f"{type(self).__name__}({self.extra_repr()})"
