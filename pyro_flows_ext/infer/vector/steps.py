"""The flow steps of the coupling-flow guides: couplings on a half split, each followed by a
mixing layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from pyro_flows_ext.nn import LR_SCALE, DampedMLP, default_hidden_dims
from pyro_flows_ext.transforms import LowerAffine, LowRankAffine, NetworkFactory, Partition
from pyro_flows_ext.transforms.masks import make_partition

__all__ = [
    "AFFINES",
    "FULL_RANK_MAX_DIM",
    "MAX_WIDTH",
    "coupling_steps",
    "damped_network",
    "final_affine",
    "resolve_affine",
]

MAX_WIDTH = 256
"""The widest hidden layer of a guide's default conditioner, whatever ``D``: the cap binds from
``D_A = 65`` on (``D > 128`` with a half split), so a guide's parameters grow linearly in ``D``,
not as ``D^2``."""

FULL_RANK_MAX_DIM = 1024
"""The largest ``D`` for which ``affine="auto"`` gives the full-rank final layer."""
AFFINES = ("auto", "full", "lowrank")


def damped_network(
    hidden_dims: Sequence[int] | None = None,
    lr_scale: float = LR_SCALE,
    max_width: int | None = MAX_WIDTH,
) -> NetworkFactory:
    """The network factory of the guides' couplings: a zero-initialised
    :class:`~pyro_flows_ext.nn.DampedMLP` that learns at ``lr_scale`` times the optimiser's
    step size, with ``hidden_dims`` (default :func:`~pyro_flows_ext.nn.default_hidden_dims` of
    its inputs, the context included, capped at ``max_width``).

    Example:
        >>> from pyro_flows_ext.transforms.masks import make_partition
        >>> net = damped_network()(make_partition((500,), "half"), 2, 0)
        >>> [tuple(p.shape) for p in net.parameters()]
        [(256, 251), (256, 257), (500, 257)]
    """

    def build(partition: Partition, num_params: int, context_dim: int) -> nn.Module:
        inputs = partition.conditioner_shape[0]
        hidden = hidden_dims or default_hidden_dims(inputs + context_dim, max_width)
        out = num_params * partition.transformed_shape[0]
        return DampedMLP(inputs, out, hidden, lr_scale, context_dim)

    return build


def resolve_affine(affine: str, dim: int) -> str:
    """``"full"`` or ``"lowrank"``: ``affine`` itself, or for ``"auto"`` full rank up to
    :data:`FULL_RANK_MAX_DIM` features and low rank above.

    Example:
        >>> resolve_affine("auto", 10), resolve_affine("auto", 5000), resolve_affine("full", 5000)
        ('full', 'lowrank', 'full')
    """
    if affine != "auto":
        return affine
    return "full" if dim <= FULL_RANK_MAX_DIM else "lowrank"


def final_affine(
    dim: int,
    kind: str,
    center: Tensor,
    preconditioner: Tensor | None,
    init_scale: float,
    rank: int | None = None,
) -> nn.Module:
    """The Gaussian end of a guide: a :class:`~pyro_flows_ext.transforms.LowerAffine` for
    ``kind="full"``, else a :class:`~pyro_flows_ext.transforms.LowRankAffine` of rank
    ``rank`` (default ``round(sqrt(D))``, as Pyro's ``AutoLowRankMultivariateNormal``) whose
    elementwise preconditioner holds the marginal standard deviations of the start
    ``preconditioner`` (the row norms of the factor, when given).

    Example:
        >>> import torch
        >>> type(final_affine(4, "lowrank", torch.zeros(4), None, 0.1)).__name__
        'LowRankAffine'
    """
    if kind == "full":
        return LowerAffine(
            dim, center, preconditioner, init_scale=init_scale, off_diag_scale=init_scale
        )
    rank = rank or max(1, round(math.sqrt(dim)))
    diag = None if preconditioner is None else preconditioner.norm(dim=-1)
    return LowRankAffine(dim, min(rank, dim), center, diag, init_scale=init_scale)


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
        >>> steps = coupling_steps(4, 2, lambda part, _: affine_coupling(4, [8], mask=part), list)
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
