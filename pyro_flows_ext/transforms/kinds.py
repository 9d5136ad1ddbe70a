"""The coupling kinds by name, and the one function that builds a coupling.

:data:`COUPLINGS` maps the names users pass (``coupling="spline"``) to elementwise maps
(:mod:`pyro_flows_ext.transforms.maps`); :func:`make_coupling` builds a coupling of a kind for
an event shape, conditional or not, with a network factory. Every builder and guide of the
package goes through it, so adding a kind is one map class and one :func:`register_coupling`
line: ``glow``, ``realnvp``, ``AutoCouplingFlow`` and ``AutoHierarchicalFlow`` then accept its
name. The lower_snake factories (``affine_coupling``, ...) are Pyro-style shorthands for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

from pyro_flows_ext.checks import EventShape, as_event_shape, positive_int
from pyro_flows_ext.transforms.conditional import ConditionalCoupling
from pyro_flows_ext.transforms.coupling import Coupling
from pyro_flows_ext.transforms.maps import AdditiveMap, AffineMap, ElementwiseMap
from pyro_flows_ext.transforms.masks import Partition
from pyro_flows_ext.transforms.networks import Network, density_network
from pyro_flows_ext.transforms.spline import SplineMap

__all__ = [
    "COUPLINGS",
    "additive_coupling",
    "affine_coupling",
    "conditional_affine_coupling",
    "conditional_spline_coupling",
    "coupling_kind",
    "coupling_map",
    "make_coupling",
    "register_coupling",
    "spline_coupling",
]

COUPLINGS: dict[str, type[ElementwiseMap]] = {
    "affine": AffineMap,
    "spline": SplineMap,
    "additive": AdditiveMap,
}
"""The coupling kinds by the names users pass, each to its elementwise map class."""


def register_coupling(name: str, transformer: type[ElementwiseMap]) -> None:
    """Make ``name`` a coupling kind everywhere a ``coupling=`` is taken.

    Example:
        >>> class Shift(AdditiveMap): ...
        >>> register_coupling("shift", Shift)
        >>> type(make_coupling("shift", 4).transformer).__name__
        'Shift'
        >>> del COUPLINGS["shift"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a coupling kind's name must be a non-empty str, got {name!r}")
    if not (isinstance(transformer, type) and issubclass(transformer, ElementwiseMap)):
        raise TypeError(f"transformer must be an ElementwiseMap subclass, got {transformer!r}")
    COUPLINGS[name] = transformer


def coupling_kind(kind: Any) -> str:
    """``kind`` checked against the registry.

    Example:
        >>> coupling_kind("spline")
        'spline'
    """
    if not isinstance(kind, str):
        raise TypeError(
            f"coupling must be a name of {sorted(COUPLINGS)} or an ElementwiseMap instance, "
            f"got {kind!r}"
        )
    if kind not in COUPLINGS:
        raise ValueError(f"coupling must be one of {sorted(COUPLINGS)}, got {kind!r}")
    return kind


def coupling_map(kind: str | ElementwiseMap, **options: Any) -> ElementwiseMap:
    """The elementwise map of ``kind`` (a registered name, or a ready map, returned as it is)
    with ``options``; the options a kind does not take are ignored (``clamp`` for a spline), so
    that one set of settings serves every kind.

    Example:
        >>> coupling_map("affine", clamp=5.0, bins=4)
        AffineMap(scale='exp', clamp=5.0)
    """
    if isinstance(kind, ElementwiseMap):
        return kind
    cls = COUPLINGS[coupling_kind(kind)]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


def make_coupling(
    kind: str | ElementwiseMap,
    shape: int | EventShape,
    *,
    mask: str | Partition | None = None,
    parity: int = 0,
    network: Network | None = None,
    context_dim: int = 0,
    cache_size: int = 1,
    **options: Any,
) -> Coupling | ConditionalCoupling:
    """A coupling of ``kind`` over ``shape``: a
    :class:`~pyro_flows_ext.transforms.Coupling`, or with ``context_dim > 0`` a
    :class:`~pyro_flows_ext.transforms.ConditionalCoupling` whose network also sees a context.

    Args:
        kind: a name of :data:`COUPLINGS` (``"affine"``, ``"spline"``, ``"additive"``) or a
            ready map.
        shape: ``D`` or ``(C, H, W)``.
        mask, parity: see :class:`~pyro_flows_ext.transforms.Coupling`.
        network: a module or a network factory (default: :func:`density_network` with the
            ``hidden_dims``, ``hidden_channels`` and ``num_blocks`` given in ``options``).
        context_dim: size of the context (0: unconditional).
        cache_size: see :class:`~pyro_flows_ext.transforms.Coupling`.
        options: the map's (``scale``, ``clamp`` for affine; ``bins``, ``bound`` for spline;
            see :func:`coupling_map`) and, without ``network``, the network's.

    Example:
        >>> type(make_coupling("spline", 4)).__name__
        'Coupling'
        >>> make_coupling("affine", (2, 4, 4), context_dim=3, scale="sigmoid").transformer
        AffineMap(scale='sigmoid', clamp=3.0)
    """
    network_keys = ("hidden_dims", "hidden_channels", "num_blocks")
    net_options = {k: options.pop(k) for k in network_keys if k in options}
    transformer = coupling_map(kind, **options)
    unknown = set(options) - _map_options()
    if unknown:
        raise TypeError(f"make_coupling got unknown options {sorted(unknown)}")
    if network is None:
        network = density_network(**net_options)
    elif net_options:
        raise TypeError(f"{sorted(net_options)} apply to the default network, not to network=")
    shape = as_event_shape(shape)
    if positive_int("context_dim", context_dim, minimum=0):
        return ConditionalCoupling(
            shape, transformer, network, mask, parity, context_dim=context_dim
        )
    return Coupling(shape, transformer, network, mask, parity, cache_size=cache_size)


def _map_options() -> set[str]:
    """Every option some registered map takes."""
    return {p for cls in COUPLINGS.values() for p in inspect.signature(cls).parameters}


def affine_coupling(
    shape: int | EventShape, hidden_dims: Sequence[int] | None = None, **options: Any
) -> Coupling:
    """``make_coupling("affine", shape, ...)``: an affine coupling (RealNVP/Glow) with a
    zero-initialised MLP (vectors) or CNN (images).

    Example:
        >>> affine_coupling(6, hidden_dims=[16], clamp=2.0).transformer
        AffineMap(scale='exp', clamp=2.0)
    """
    return cast(Coupling, make_coupling("affine", shape, hidden_dims=hidden_dims, **options))


def additive_coupling(
    shape: int | EventShape, hidden_dims: Sequence[int] | None = None, **options: Any
) -> Coupling:
    """``make_coupling("additive", shape, ...)``: NICE's volume-preserving coupling.

    Example:
        >>> additive_coupling((4, 8, 8), mask="checkerboard", parity=1).event_shape
        (4, 8, 8)
    """
    return cast(Coupling, make_coupling("additive", shape, hidden_dims=hidden_dims, **options))


def spline_coupling(
    shape: int | EventShape, hidden_dims: Sequence[int] | None = None, **options: Any
) -> Coupling:
    """``make_coupling("spline", shape, ...)``: a rational-quadratic spline coupling (neural
    spline flows).

    Example:
        >>> spline_coupling((4, 8, 8), mask="checkerboard", hidden_channels=8).transformer
        SplineMap(bins=8, bound=3.0)
    """
    return cast(Coupling, make_coupling("spline", shape, hidden_dims=hidden_dims, **options))


def conditional_affine_coupling(
    shape: int | EventShape,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    **options: Any,
) -> ConditionalCoupling:
    """``make_coupling("affine", shape, context_dim=..., ...)``.

    Example:
        >>> conditional_affine_coupling(4, context_dim=2).context_dim
        2
    """
    return _conditional("affine", shape, context_dim, hidden_dims, options)


def conditional_spline_coupling(
    shape: int | EventShape,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    **options: Any,
) -> ConditionalCoupling:
    """``make_coupling("spline", shape, context_dim=..., ...)``.

    Example:
        >>> import torch
        >>> t = conditional_spline_coupling((2, 4, 4), context_dim=3, hidden_channels=8)
        >>> t.condition(torch.ones(5, 3))(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
    """
    return _conditional("spline", shape, context_dim, hidden_dims, options)


def _conditional(
    kind: str,
    shape: int | EventShape,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    options: dict[str, Any],
) -> ConditionalCoupling:
    context_dim = positive_int("context_dim", context_dim)
    layer = make_coupling(kind, shape, hidden_dims=hidden_dims, context_dim=context_dim, **options)
    return cast(ConditionalCoupling, layer)
