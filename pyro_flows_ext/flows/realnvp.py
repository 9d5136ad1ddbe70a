"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017) for images and vectors."""

from __future__ import annotations

from collections.abc import Sequence

from pyro_flows_ext.checks import (
    EventShape,
    as_event_shape,
    check_bool,
    hidden_sizes,
    one_of,
    positive_float,
    positive_int,
)
from pyro_flows_ext.flows._common import (
    Layer,
    check_levels,
    forward_order,
    max_levels,
    multiscale,
)
from pyro_flows_ext.flows.flow import Flow
from pyro_flows_ext.nn import HIDDEN_CHANNELS
from pyro_flows_ext.transforms import ActNorm, SplitPrior
from pyro_flows_ext.transforms.kinds import coupling_kind, make_coupling
from pyro_flows_ext.transforms.maps import CLAMP
from pyro_flows_ext.transforms.masks import MASKS
from pyro_flows_ext.transforms.networks import density_network

__all__ = ["realnvp"]


def realnvp(
    event_shape: int | EventShape,
    levels: int | None = None,
    depth: int | None = None,
    hidden_channels: int = HIDDEN_CHANNELS,
    num_blocks: int = 1,
    hidden_dims: Sequence[int] | None = None,
    mask: str | None = None,
    actnorm: bool = True,
    split_prior: bool = False,
    clamp: float = CLAMP,
    coupling: str = "affine",
    context_dim: int = 0,
) -> Flow:
    """A RealNVP density model (affine couplings with soft-clamped ``exp`` scales).

    **Images** ``(C, H, W)``: ``levels`` scales. Every scale but the last applies
    ``depth`` (default 3) couplings with checkerboard masks, squeezes
    ``(C, H, W) -> (4C, H/2, W/2)``, applies ``depth`` couplings with channel masks and
    factors out half of the channels (to the standard normal base, or to a learned
    conditional Gaussian with ``split_prior=True``); the last scale applies
    ``depth + 1`` checkerboard couplings. Parities alternate so consecutive couplings
    transform complementary parts. Conditioners are residual CNNs (``hidden_channels``,
    ``num_blocks``) with a zero-initialised last layer. The default ``levels`` is one more
    than the most squeezes (up to 3) that keep ``H, W >= 2``: 3 for 8x8 and 28x28.

    **Vectors** ``D``: ``depth`` (default 8) couplings with ``mask`` (``"half"`` by
    default, or ``"alternating"``) and alternating parity, MLP conditioners
    (``hidden_dims``).

    ``coupling="spline"`` uses rational-quadratic
    :class:`~pyro_flows_ext.transforms.SplineMap` couplings (8 bins on ``[-3, 3]``, identity
    tails) instead of affine couplings (``clamp`` is then unused).

    ``context_dim=K`` makes a conditional model ``p(x | c)``: every coupling's network also
    sees a context ``c`` of size ``K`` (see :class:`~pyro_flows_ext.flows.Flow`).

    With ``actnorm`` (the default) an :class:`~pyro_flows_ext.transforms.ActNorm` precedes
    every coupling in the density direction, standing in for the paper's batch norm.

    Example:
        >>> import torch
        >>> flow = realnvp(2, depth=4, hidden_dims=[16])
        >>> flow.log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
        >>> realnvp((1, 8, 8), levels=2, depth=1, hidden_channels=8).sample((2,)).shape
        torch.Size([2, 1, 8, 8])

    Reference: Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP.
    """
    shape = as_event_shape(event_shape)
    dims = hidden_sizes("hidden_dims", hidden_dims)
    config = {
        "builder": "realnvp",
        "event_shape": list(shape),
        "hidden_channels": positive_int("hidden_channels", hidden_channels),
        "num_blocks": positive_int("num_blocks", num_blocks, minimum=0),
        "hidden_dims": None if dims is None else list(dims),
        "mask": mask,
        "actnorm": check_bool("actnorm", actnorm),
        "split_prior": check_bool("split_prior", split_prior),
        "clamp": positive_float("clamp", clamp),
        "coupling": coupling_kind(coupling),
        "context_dim": positive_int("context_dim", context_dim, minimum=0),
    }

    network = density_network(dims, hidden_channels, num_blocks)

    def units(s: EventShape, n: int, unit_mask: str | None) -> list[Layer]:
        """``n`` couplings on ``s`` (each after an ActNorm), in the density direction."""
        density: list[Layer] = []
        for i in range(n):
            density += [ActNorm(s)] if actnorm else []
            density.append(
                make_coupling(
                    coupling,
                    s,
                    mask=unit_mask,
                    parity=i % 2,
                    network=network,
                    context_dim=context_dim,
                    clamp=clamp,
                )  # fmt: skip
            )
        return density

    if len(shape) == 1:
        if levels not in (None, 1):
            raise ValueError(f"a vector RealNVP has one level, got levels={levels!r}")
        if mask is not None:
            one_of("mask", mask, MASKS[1])
        k = positive_int("depth", 8 if depth is None else depth)
        flow_config = {**config, "levels": 1, "depth": k}
        return Flow(shape, forward_order(units(shape, k, mask)), flow_config, context_dim)

    if mask is not None:
        raise ValueError(f"image RealNVP chooses its masks itself; got mask={mask!r}")
    n = max_levels(shape) + 1 if levels is None else positive_int("levels", levels)
    check_levels(shape, n, n - 1)
    k = positive_int("depth", 3 if depth is None else depth)

    def squeezed(sq: EventShape, is_last: bool) -> list[Layer]:
        density = units(sq, k, "channel")
        if split_prior:
            density.append(SplitPrior(sq))
        return forward_order(density)

    def unsqueezed(s: EventShape, is_last: bool) -> list[Layer]:
        return forward_order(units(s, k + 1 if is_last else k, "checkerboard"))

    transforms = multiscale(shape, n, squeezed, unsqueezed, squeeze_last=False)
    return Flow(shape, transforms, {**config, "levels": n, "depth": k}, context_dim)
