"""The flow steps of the coupling-flow guides: couplings on a half split, each followed by a
mixing layer."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pyro_flows_ext.transforms import Partition
from pyro_flows_ext.transforms.masks import make_partition

__all__ = ["coupling_steps"]


def coupling_steps(
    dim: int,
    depth: int,
    coupling: Callable[[Partition, int], nn.Module],
    mixing: Callable[[], list[nn.Module]],
    alternate: bool = False,
) -> list[nn.Module]:
    """``depth`` flow steps over vectors of ``dim`` features: each is
    ``coupling(partition, parity)`` on a ``half`` split followed by the layers ``mixing()``
    returns. With ``alternate`` the
    split's parity alternates between steps (needed when the mixing does not swap the halves
    itself, as :class:`~pyro_flows_ext.transforms.PermuteTransform` does). No steps for
    ``dim < 2`` (nothing to couple).

    Example:
        >>> from pyro_flows_ext.transforms import affine_coupling
        >>> steps = coupling_steps(
        ...     4, 2, lambda part, parity: affine_coupling(4, [8], parity=parity), lambda: []
        ... )
        >>> len(steps), coupling_steps(1, 2, None, None)
        (2, [])
    """
    layers: list[nn.Module] = []
    if dim < 2:
        return layers
    for k in range(depth):
        parity = k % 2 if alternate else 0
        layers.append(coupling(make_partition((dim,), "half", parity), parity))
        layers += mixing()
    return layers
