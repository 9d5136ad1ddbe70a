"""One step of Glow: ActNorm, invertible 1x1 convolution, affine (or spline) coupling."""

from __future__ import annotations

from collections.abc import Sequence

from pyro_flows_ext.checks import EventShape, as_event_shape
from pyro_flows_ext.nn import HIDDEN_CHANNELS
from pyro_flows_ext.transforms.actnorm import ActNorm
from pyro_flows_ext.transforms.invertible import invertible_linear
from pyro_flows_ext.transforms.kinds import make_coupling
from pyro_flows_ext.transforms.maps import ElementwiseMap
from pyro_flows_ext.transforms.networks import density_network
from pyro_flows_ext.transforms.stack import Stack

__all__ = ["glow_step"]


def glow_step(
    shape: int | EventShape,
    *,
    hidden_dims: Sequence[int] | None = None,
    hidden_channels: int = HIDDEN_CHANNELS,
    lu: bool = True,
    scale: str = "sigmoid",
    parity: int = 0,
    data_init: bool = True,
    coupling: str | ElementwiseMap = "affine",
    context_dim: int = 0,
) -> Stack:
    """One Glow flow step as a :class:`~pyro_flows_ext.transforms.Stack`.

    In the density direction (data to noise, the inverse) it applies :class:`ActNorm`, then
    :class:`InvertibleConv1x1` (:class:`InvertibleLinear` for vectors), then an affine
    :class:`Coupling` over a channel (``half`` for vectors) split, as in Glow; the
    forward direction (noise to data) runs them in reverse order.

    Args:
        shape: ``D`` or ``(C, H, W)``.
        hidden_dims: MLP widths of the coupling (vectors).
        hidden_channels: CNN width of the coupling (images; the paper uses 512).
        lu: LU-parameterised mixing.
        scale: the coupling's scale (``"sigmoid"`` as in Glow, or ``"exp"``).
        parity: which half the coupling keeps.
        data_init: whether ActNorm initialises from the first batch of data.
        coupling: a kind of :data:`~pyro_flows_ext.transforms.COUPLINGS`: ``"affine"``
            (Glow's), ``"spline"`` (a rational-quadratic
            :class:`~pyro_flows_ext.transforms.SplineMap`; ``scale`` is then unused), ... or a
            ready :class:`~pyro_flows_ext.transforms.ElementwiseMap`.
        context_dim: with ``K > 0`` the coupling is conditional (its network also sees a
            context of size ``K``; condition the step with
            :func:`~pyro_flows_ext.transforms.condition_all`).

    Example:
        >>> import torch
        >>> step = glow_step((4, 8, 8), hidden_channels=16)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> step(x).shape, step.log_abs_det_jacobian(x, step(x)).shape
        (torch.Size([2, 4, 8, 8]), torch.Size([2]))
    """
    event_shape = as_event_shape(shape)
    network = density_network(hidden_dims=hidden_dims, hidden_channels=hidden_channels)
    layer = make_coupling(
        coupling, event_shape, parity=parity, network=network, context_dim=context_dim, scale=scale
    )
    mixing = invertible_linear(event_shape, lu=lu)
    return Stack([layer, mixing, ActNorm(event_shape, data_init=data_init)])
