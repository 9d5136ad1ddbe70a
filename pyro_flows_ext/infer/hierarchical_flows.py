"""The flows of :class:`~pyro_flows_ext.infer.AutoHierarchicalFlow`: the globals' coupling
flow and the per-element conditional flow of a plate group (:class:`LocalFlow`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform
from torch.distributions.transforms import AffineTransform

from pyro_flows_ext.checks import positive_int
from pyro_flows_ext.infer.guide import SPLINE_BINS
from pyro_flows_ext.infer.plates import PlateInfo
from pyro_flows_ext.infer.stack import coupling_steps
from pyro_flows_ext.infer.stl import StickingTheLanding
from pyro_flows_ext.nn import DampedMLP, default_hidden_dims
from pyro_flows_ext.transforms import (
    AffineCoupling,
    ConditionalAffineCoupling,
    LowerAffine,
    Partition,
    PermuteTransform,
    SplineCoupling,
    condition_all,
)

__all__ = [
    "LOCAL_HIDDEN",
    "ConditionalSTL",
    "LocalFlow",
    "cat_features",
    "check_encoders",
    "encode",
    "global_flow",
]

LOCAL_HIDDEN = (32, 32)
"""Default hidden sizes of the local flows' networks (they run once per plate element)."""


def cat_features(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate feature vectors ``(*batch_k, F_k)`` whose batch shapes broadcast."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in parts], dim=-1)


class LocalFlow(nn.Module):
    """The conditional flow :math:`q(u_i \\mid c_i)` of one plate group's unconstrained
    locals :math:`u_i \\in \\mathbb{R}^F` given a context :math:`c_i` (the globals' draw
    :math:`g`, the element's embedding or encoded data, the draws of enclosing groups):

    .. math::

        u_i = m_i + A_i \\bar g + t(c_i)
        + \\exp\\big(s_i + B_i \\bar g + C \\tanh(h(c_i) / C)\\big)
        \\odot g_K \\circ \\dots \\circ g_1(\\epsilon; c_i),
        \\qquad \\epsilon \\sim \\mathcal N(0, I_F),

    where :math:`\\bar g` is the globals' draw centred at the globals' current location
    (``(D,)``, empty without globals), ``(t, h)`` a zero-initialised
    :class:`~pyro_flows_ext.nn.DampedMLP` of the context, :math:`m_i, s_i` (``(*grid, F)``) and
    :math:`A_i, B_i` (``(*grid, F, D)``, zero at first) per-element parameters (one shared
    set when ``grid`` is ``None``, for amortised groups), and the :math:`g_k`
    :class:`~pyro_flows_ext.transforms.ConditionalAffineCoupling` s with permutations (only
    for ``F > 1``). In the density direction the first layer is the conditional affine map:
    a local that is Gaussian given the globals, with a mean linear in them and a log-scale
    linear in the unconstrained globals (a hierarchical normal model's
    :math:`\\theta_g \\mid \\mu, \\log\\tau` near the funnel's neck) is represented by
    the per-element linear part alone, and the network adds what is nonlinear. It starts at
    :math:`\\mathcal N(m, \\text{init\\_scale}^2)` for every context.

    Example:
        >>> import torch
        >>> flow = LocalFlow(2, 3, torch.Size([5]), torch.zeros(2), 0.5, global_dim=1, depth=2)
        >>> params = flow.element_params((), {})
        >>> ts = flow.transforms(torch.zeros(5, 3), torch.zeros(1), *params)
        >>> len(ts), ts[-1](torch.ones(5, 2))[0].tolist()
        (5, [0.5, 0.5])
    """

    def __init__(
        self,
        features: int,
        context_dim: int,
        grid: torch.Size | None,
        init_loc: Tensor,
        init_scale: float,
        global_dim: int = 0,
        depth: int = 2,
        hidden_dims: Sequence[int] = LOCAL_HIDDEN,
        lr_scale: float = 0.1,
        clamp: float = 5.0,
    ) -> None:
        super().__init__()
        self.features = positive_int("features", features)
        self.context_dim = positive_int("context_dim", context_dim)
        self.hidden_dims = tuple(hidden_dims)
        self.lr_scale, self.clamp = lr_scale, clamp
        self.net = DampedMLP(context_dim, 2 * features, self.hidden_dims, lr_scale)

        def mixing() -> list[nn.Module]:
            return [PermuteTransform(features)]

        self.couplings = nn.ModuleList(coupling_steps(features, depth, self._coupling, mixing))
        shape = (grid or torch.Size()) + (features,)
        self.per_element = grid is not None
        self.loc = nn.Parameter(init_loc.detach().expand(shape).clone())
        self.log_scale = nn.Parameter(torch.full(shape, math.log(init_scale)).to(init_loc))
        self.coef = nn.Parameter(torch.zeros(shape[:-1] + (2 * features, global_dim)))

    def _coupling(self, part: Partition, parity: int) -> nn.Module:
        k = self.context_dim
        out = 2 * part.transformed_shape[0]
        net = DampedMLP(part.conditioner_shape[0], out, self.hidden_dims, self.lr_scale, k)
        return ConditionalAffineCoupling(part.event_shape, net, k, "half", parity, clamp=self.clamp)

    def element_params(
        self, plates: Sequence[PlateInfo], indices: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(m, s, [A; B])`` at the plates' (subsample) ``indices``: only those rows are
        used, so only they get a gradient."""
        params: list[Tensor] = [self.loc, self.log_scale, self.coef]
        if self.per_element:
            for p in plates:
                index = indices[p.name].to(self.loc.device)
                params[:2] = [t.index_select(p.dim - 1, index) for t in params[:2]]
                params[2] = params[2].index_select(p.dim - 2, index)
        loc, log_scale, coef = params
        return loc, log_scale, coef

    def transforms(
        self, context: Tensor, centred: Tensor, loc: Tensor, log_scale: Tensor, coef: Tensor
    ) -> list[Transform]:
        """Base-to-latent transforms for contexts ``(*batch, C)`` and centred globals
        ``(*batch, D)``."""
        shift, h = self.net(context).chunk(2, dim=-1)
        if coef.shape[-1]:
            linear = (coef @ centred.unsqueeze(-1)).squeeze(-1)
            shift, h = shift + linear[..., : self.features], h + linear[..., self.features :]
        scale = (log_scale + self.clamp * torch.tanh(h / self.clamp)).exp()
        couplings = [condition_all(cast(Transform, t), context) for t in self.couplings]
        return [*couplings, AffineTransform(loc + shift, scale, event_dim=1)]


def global_flow(
    center: Tensor,
    depth: int,
    coupling: str = "spline",
    hidden_dims: Sequence[int] | None = None,
    init_scale: float = 0.1,
    clamp: float = 5.0,
    lr_scale: float = 0.1,
) -> list[nn.Module]:
    """The globals' flow from the base to :math:`g \\in \\mathbb{R}^D`: ``depth`` spline
    (or affine) couplings with :class:`~pyro_flows_ext.nn.DampedMLP` conditioners, each
    followed by a :class:`~pyro_flows_ext.transforms.PermuteTransform` (none for ``D = 1``),
    then a :class:`~pyro_flows_ext.transforms.LowerAffine` at
    :math:`\\mathcal N(\\text{center}, \\text{init\\_scale}^2 I)`; empty for ``D = 0``.

    Example:
        >>> [type(t).__name__ for t in global_flow(torch.zeros(2), depth=1)]
        ['SplineCoupling', 'PermuteTransform', 'LowerAffine']
    """
    dim = center.shape[0]
    if dim == 0:
        return []
    spline = coupling == "spline"

    def step(part: Partition, parity: int) -> nn.Module:
        a, b = part.conditioner_shape[0], part.transformed_shape[0]
        width = (3 * SPLINE_BINS - 1 if spline else 2) * b
        net = DampedMLP(a, width, hidden_dims or default_hidden_dims(a), lr_scale)
        if spline:
            return SplineCoupling(part.event_shape, net, part, bins=SPLINE_BINS)
        return AffineCoupling(part.event_shape, net, part, clamp=clamp)

    steps = coupling_steps(dim, depth, step, lambda: [PermuteTransform(dim)])
    return [*steps, LowerAffine(dim, center.cpu(), init_scale=init_scale)]


def check_encoders(encoders: Any) -> dict[str, Callable[..., Tensor]]:
    """``encoders`` as a dict plate name -> callable (``{}`` for ``None``), else ``TypeError``.

    Example:
        >>> check_encoders(None)
        {}
    """
    if encoders is None:
        return {}
    if not isinstance(encoders, dict) or not all(
        isinstance(k, str) and callable(v) for k, v in encoders.items()
    ):
        raise TypeError(f"encoders must be a dict plate name -> callable, got {encoders!r}")
    return dict(encoders)


def encode(fn: Callable[..., Tensor], name: str, size: int, args: tuple, kwargs: dict) -> Tensor:
    """The per-element features ``(size, K)`` that the encoder ``fn`` of plate ``name``
    returns for the model's arguments, checked.

    Example:
        >>> encode(lambda y: y[:, None], "g", 3, (torch.zeros(3),), {}).shape
        torch.Size([3, 1])
    """
    out = fn(*args, **kwargs)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != size:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the encoder of plate {name!r} must return a tensor (N={size}, features), got {got}"
        )
    return out


class ConditionalSTL(StickingTheLanding):
    """Sticking the landing for a conditional density :math:`q_\\phi(u \\mid c)` whose context
    :math:`c` is itself a reparameterised draw (the globals): ``score`` is the same density
    with the context detached, so that ``log_prob`` drops only
    :math:`\\partial_\\phi \\log q_\\phi(u \\mid c)` at fixed ``u`` *and* ``c`` (the score
    term) and keeps the path terms through both. Wrapping the conditional density alone
    (:class:`~pyro_flows_ext.infer.StickingTheLanding`) would also drop the path term
    through :math:`c`, a biased gradient.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> c = torch.ones(1, requires_grad=True)
        >>> q = ConditionalSTL(dist.Normal(c, 1.0), dist.Normal(c.detach(), 1.0))
        >>> u = q.rsample()
        >>> torch.autograd.grad(q.log_prob(u), c)[0].item()  # u - c is constant in c
        0.0
    """

    def __init__(self, base: Distribution, score: Distribution) -> None:
        super().__init__(base)
        self.score = score

    def expand(self, batch_shape: Any, _instance: Any = None) -> ConditionalSTL:
        return ConditionalSTL(self.base.expand(batch_shape), self.score.expand(batch_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        log_q = self.base.log_prob(value)
        if not torch.is_grad_enabled():
            return log_q
        score_part = self.score.log_prob(value.detach())
        return log_q - score_part + score_part.detach()
