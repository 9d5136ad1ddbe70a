"""Helpers shared by the builders: level counts and the multi-scale skeleton."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyro.distributions.conditional import ConditionalTransform
from torch.distributions import Transform

from pyro_flows_ext.checks import EventShape, as_event_shape
from pyro_flows_ext.transforms import FactorOut, SqueezeTransform, Stack

__all__ = [
    "Layer",
    "check_levels",
    "forward_order",
    "max_levels",
    "multiscale",
    "squeeze_shape",
]

# a part of a flow: a transform, or a conditional one (conditional flows)
Layer = Transform | ConditionalTransform
# f(shape, is_last) -> transforms in forward (noise-to-data) order
LevelBody = Callable[[EventShape, bool], list[Layer]]


def _no_body(shape: EventShape, is_last: bool) -> list[Layer]:
    return []


def squeeze_shape(shape: EventShape) -> EventShape:
    """``(C, H, W) -> (4C, H/2, W/2)``."""
    c, h, w = shape
    return (4 * c, h // 2, w // 2)


def max_levels(shape: EventShape, cap: int = 3) -> int:
    """The most squeezes (at most ``cap``) that keep ``H, W`` integers of at least 2."""
    _, h, w = shape
    n = 0
    while n < cap and h % 2 == 0 and w % 2 == 0 and h >= 4 and w >= 4:
        h, w, n = h // 2, w // 2, n + 1
    return n


def check_levels(shape: EventShape, levels: int, squeezes: int) -> None:
    """Raise a ``ValueError`` unless ``shape`` can be squeezed ``squeezes`` times."""
    _, h, w = shape
    if h % 2**squeezes or w % 2**squeezes:
        raise ValueError(
            f"{levels} levels squeeze {squeezes} times and need H and W divisible by "
            f"{2**squeezes}, got event shape {shape}"
        )


def multiscale(
    shape: EventShape,
    levels: int,
    squeezed: LevelBody,
    unsqueezed: LevelBody = _no_body,
    squeeze_last: bool = True,
) -> list[Layer]:
    """The forward (noise-to-data) list of a multi-scale stack on ``shape = (C, H, W)``.

    A level that is not the last is, in forward order,
    ``[Squeeze, FactorOut(next levels), *squeezed(S, False), Squeeze.inv, *unsqueezed(shape,
    False)]`` with ``S = (4C, H/2, W/2)``. In the density direction it runs ``unsqueezed``
    backwards on ``(C, H, W)``, squeezes, runs ``squeezed`` backwards (Glow's steps, ending
    with the split prior of the last ``2C`` channels), hands the first ``2C`` channels to the
    next levels (on ``(2C, H/2, W/2)``) and unsqueezes, so the stack keeps the shape ``shape``
    and a standard normal base of that shape is the prior of everything factored out. The
    last level is ``[Squeeze, *squeezed(S, True), Squeeze.inv, *unsqueezed(shape, True)]``,
    or ``unsqueezed(shape, True)`` alone when ``squeeze_last`` is false.
    """
    shape = as_event_shape(shape)
    sq = squeeze_shape(shape)
    outer = unsqueezed(shape, levels == 1)
    if levels == 1:
        if not squeeze_last:
            return outer
        return [SqueezeTransform(cache_size=1), *squeezed(sq, True), _unsqueeze(), *outer]
    kept = (sq[0] - sq[0] // 2, sq[1], sq[2])
    inner = multiscale(kept, levels - 1, squeezed, unsqueezed, squeeze_last)
    return [
        SqueezeTransform(cache_size=1),
        FactorOut(Stack(inner), sq),
        *squeezed(sq, False),
        _unsqueeze(),
        *outer,
    ]


def _unsqueeze() -> Transform:
    return SqueezeTransform(cache_size=1).inv


def forward_order(density_order: Sequence[Layer]) -> list[Layer]:
    """Transforms listed in the density direction (data to noise), put in forward order."""
    return list(reversed(density_order))
