"""Glow (Kingma & Dhariwal, 2018) for images and vectors."""

from __future__ import annotations

from collections.abc import Sequence

from pyro_flows_ext.checks import (
    EventShape,
    as_event_shape,
    check_bool,
    hidden_sizes,
    one_of,
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
from pyro_flows_ext.transforms import SplitPrior, glow_step, top_prior
from pyro_flows_ext.transforms.kinds import coupling_kind
from pyro_flows_ext.transforms.maps import SCALES

__all__ = ["glow"]


def glow(
    event_shape: int | EventShape,
    levels: int | None = None,
    depth: int | None = None,
    hidden_channels: int = HIDDEN_CHANNELS,
    hidden_dims: Sequence[int] | None = None,
    learn_top: bool = True,
    lu: bool = True,
    scale: str = "sigmoid",
    coupling: str = "affine",
    context_dim: int = 0,
) -> Flow:
    """A Glow density model.

    **Images** ``(C, H, W)``: ``levels`` levels; each squeezes ``(C, H, W) -> (4C, H/2, W/2)``
    and applies ``depth`` flow steps (:func:`~pyro_flows_ext.transforms.glow_step`: ActNorm,
    LU-parameterised invertible 1x1 convolution, affine coupling with ``sigmoid`` scale whose
    conv conditioner has ``hidden_channels`` channels and a zero-initialised last layer);
    every level but the last then factors out half of the channels with a learned conditional
    Gaussian prior (:class:`~pyro_flows_ext.transforms.SplitPrior`). With ``learn_top`` the
    top level's prior is a learned diagonal Gaussian too (an
    :class:`~pyro_flows_ext.transforms.ElementwiseAffine` at the identity). In the density
    direction, for ``L = 2``:

    .. math:: x \\to \\text{squeeze} \\to K \\text{ steps} \\to \\text{split}
              \\to [\\text{squeeze} \\to K \\text{ steps} \\to \\text{top}]
              \\to \\text{unsqueeze} \\to z \\sim N(0, I).

    The default ``levels`` is the most squeezes (up to 3) that keep ``H, W >= 2``: 2 for
    8x8 and 28x28 images, 3 for 32x32. Default ``depth``: 8.

    **Vectors** ``D``: ``depth`` (default 8) steps of ActNorm, an LU-parameterised
    :class:`~pyro_flows_ext.transforms.InvertibleLinear` and an affine coupling with an MLP
    conditioner (``hidden_dims``, default :func:`~pyro_flows_ext.nn.default_hidden_dims`:
    two layers of ``max(64, 2D)``); ``levels`` must be ``None`` or 1.

    ``coupling="spline"`` puts a rational-quadratic spline
    (:class:`~pyro_flows_ext.transforms.SplineMap`: 8 bins on ``[-3, 3]``, identity tails) in
    every step's coupling instead of the affine map (``scale`` is then unused); any kind of
    :data:`~pyro_flows_ext.transforms.COUPLINGS` may be named.

    ``context_dim=K`` makes a conditional model ``p(x | c)``: every coupling's network also
    sees a context ``c`` of size ``K`` (see :class:`~pyro_flows_ext.flows.Flow`).

    Every coupling starts at the identity, so the model starts at its base (after ActNorm's
    data-dependent initialisation on the first ``log_prob`` batch).

    Example:
        >>> import torch
        >>> flow = glow((1, 8, 8), depth=2, hidden_channels=8)
        >>> x = torch.randn(5, 1, 8, 8)
        >>> flow.log_prob(x).shape, flow.sample((3,)).shape
        (torch.Size([5]), torch.Size([3, 1, 8, 8]))

    Reference: Kingma & Dhariwal (2018), Glow: generative flow with invertible 1x1
    convolutions.
    """
    shape = as_event_shape(event_shape)
    dims = hidden_sizes("hidden_dims", hidden_dims)
    config = {
        "builder": "glow",
        "event_shape": list(shape),
        "hidden_channels": positive_int("hidden_channels", hidden_channels),
        "hidden_dims": None if dims is None else list(dims),
        "learn_top": check_bool("learn_top", learn_top),
        "lu": check_bool("lu", lu),
        "scale": one_of("scale", scale, SCALES),
        "coupling": coupling_kind(coupling),
        "context_dim": positive_int("context_dim", context_dim, minimum=0),
    }

    def steps(s: EventShape) -> list[Layer]:
        return [
            glow_step(
                s,
                hidden_dims=dims,
                hidden_channels=hidden_channels,
                lu=lu,
                scale=scale,
                parity=i % 2,
                coupling=coupling,
                context_dim=context_dim,
            )  # fmt: skip
            for i in range(k)
        ]

    k = positive_int("depth", 8 if depth is None else depth)
    if len(shape) == 1:
        if levels not in (None, 1):
            raise ValueError(f"a vector Glow has one level, got levels={levels!r}")
        density = steps(shape) + ([top_prior(shape)] if learn_top else [])
        return Flow(shape, forward_order(density), {**config, "levels": 1, "depth": k}, context_dim)

    n = max_levels(shape) if levels is None else positive_int("levels", levels)
    if n < 1:
        raise ValueError(f"Glow needs H and W divisible by 2, got event shape {shape}")
    check_levels(shape, n, n)

    def level(sq: EventShape, is_last: bool) -> list[Layer]:
        density = steps(sq)
        if not is_last:
            density.append(SplitPrior(sq))
        elif learn_top:
            density.append(top_prior(sq))
        return forward_order(density)

    transforms = multiscale(shape, n, level)
    return Flow(shape, transforms, {**config, "levels": n, "depth": k}, context_dim)
