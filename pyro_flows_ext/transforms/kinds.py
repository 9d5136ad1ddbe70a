"""The coupling kinds the builders and guides choose between by name."""

from __future__ import annotations

from collections.abc import Sequence

from pyro_flows_ext.checks import EventShape, one_of, positive_int
from pyro_flows_ext.nn import HIDDEN_CHANNELS
from pyro_flows_ext.transforms.conditional import (
    ConditionalCoupling,
    conditional_affine_coupling,
    conditional_spline_coupling,
)
from pyro_flows_ext.transforms.coupling import Coupling, affine_coupling
from pyro_flows_ext.transforms.spline import spline_coupling

__all__ = ["COUPLINGS", "make_coupling"]

COUPLINGS = ("affine", "spline")


def make_coupling(
    kind: str,
    shape: int | EventShape,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    parity: int = 0,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 0,
    scale: str = "exp",
    clamp: float = 3.0,
    context_dim: int = 0,
) -> Coupling | ConditionalCoupling:
    """An :func:`~pyro_flows_ext.transforms.affine_coupling` (``kind="affine"``, with
    ``scale`` and ``clamp``) or a :func:`~pyro_flows_ext.transforms.spline_coupling`
    (``kind="spline"``: 8 bins on ``[-3, 3]``), with the same masks and networks; with
    ``context_dim > 0`` their conditional twins, whose networks also see a context.

    Example:
        >>> type(make_coupling("spline", 4)).__name__
        'SplineCoupling'
        >>> type(make_coupling("affine", (2, 4, 4), context_dim=3)).__name__
        'ConditionalAffineCoupling'
    """
    one_of("coupling", kind, COUPLINGS)
    net = (hidden_dims, mask, parity, hidden_channels, num_blocks)
    if positive_int("context_dim", context_dim, minimum=0):
        if kind == "spline":
            return conditional_spline_coupling(shape, context_dim, *net)
        return conditional_affine_coupling(shape, context_dim, *net, scale=scale, clamp=clamp)
    if kind == "spline":
        return spline_coupling(shape, *net)
    return affine_coupling(shape, *net, scale=scale, clamp=clamp)
