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

from pyro_flows_ext.checks import positive_float, positive_int
from pyro_flows_ext.infer.hierarchical.local_prior import LocalPrior
from pyro_flows_ext.infer.hierarchical.newton import PrecisionAffine
from pyro_flows_ext.infer.hierarchical.plates import PlateGroup, PlateInfo, PlateStructure
from pyro_flows_ext.infer.stl import StickingTheLanding
from pyro_flows_ext.infer.vector.steps import coupling_steps, damped_network
from pyro_flows_ext.nn import LR_SCALE, DampedMLP
from pyro_flows_ext.optim import mark_per_element
from pyro_flows_ext.transforms import (
    AffineMap,
    ElementwiseMap,
    ExponentialTails,
    LowerAffine,
    NetworkFactory,
    Partition,
    PermuteTransform,
    condition_all,
    make_coupling,
)

__all__ = [
    "LOCAL_CLAMP",
    "LOCAL_HIDDEN",
    "ConditionalSTL",
    "LocalFlow",
    "cat_features",
    "check_encoders",
    "encode",
    "global_flow",
    "group_flow",
    "plate_features",
]

LOCAL_HIDDEN = (16,)
"""Default hidden sizes of the local flows' networks (they run once per plate element)."""
LOCAL_CLAMP = 5.0
"""The default bound of the hierarchical guide's log-scales (its couplings' and the locals'
scale correction), wider than a density coupling's
(:data:`~pyro_flows_ext.transforms.maps.CLAMP`): the locals' correction multiplies the
prior-times-pseudo-likelihood scale, which can start off by more than ``e^3``. Every figure of
the README's hierarchical benchmarks was measured with it."""


def cat_features(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate feature vectors ``(*batch_k, F_k)`` whose batch shapes broadcast."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in parts], dim=-1)


class LocalFlow(nn.Module):
    """The conditional flow :math:`q(u_i \\mid c_i)` of one plate group's unconstrained
    locals :math:`u_i \\in \\mathbb{R}^F` given the globals' draw :math:`g` and a context
    :math:`c_i` (the globals centred at their current location, the element's embedding or
    encoded data, the draws of enclosing groups):

    .. math::

        u_i = \\mu_i(g) + t(c_i)
        + \\sigma_i(g)\\, e^{C \\tanh(h(c_i) / C)}
        \\odot f_K \\circ \\dots \\circ f_1(\\epsilon; c_i),
        \\qquad \\epsilon \\sim \\mathcal N(0, I_F),

    where :math:`\\mathcal N(\\mu_i(g), \\sigma_i(g)^2)` is the model's prior of the local
    given the globals, :math:`\\mathcal N(m(g), e^{2 s(g)})` (a
    :class:`~pyro_flows_ext.infer.hierarchical.local_prior.LocalPrior`), times a learned per-element
    Gaussian pseudo-likelihood :math:`\\mathcal N(\\hat y_i, e^{-\\lambda_i})`, featurewise:

    .. math::

        \\sigma_i^{-2} = e^{-2 s(g)} + e^{\\lambda_i}, \\qquad
        \\mu_i = \\sigma_i^2 \\big(e^{-2 s(g)} m(g) + e^{\\lambda_i} \\hat y_i\\big),

    (for a feature without a prior, :math:`\\mathcal N(\\hat y_i, e^{-\\lambda_i})` alone).
    This is the exact conditional posterior of a normal local with a normal likelihood (the
    hierarchical normal model's :math:`\\theta_g \\mid \\mu, \\tau, y` at every point of
    its funnel), with two numbers per element and feature; ``(t, h)`` is a zero-initialised
    :class:`~pyro_flows_ext.nn.DampedMLP` of the context and the :math:`f_k`
    affine :class:`~pyro_flows_ext.transforms.ConditionalCoupling` s with permutations (only
    for ``F > 1``), for what is not Gaussian. :math:`\\hat y_i, \\lambda_i` (``(*grid, F)``)
    are per-element parameters, or one shared pair when ``grid`` is ``None`` (amortised
    groups), starting at ``prior``'s pseudo-likelihood start and learning at
    ``element_rate`` times the step size (the guide sets it to :math:`B / N` for a plate
    subsampled to ``B`` of ``N`` elements).

    With the guide's Newton conditionals (:meth:`transforms` given ``newton``), that Gaussian
    (:meth:`gaussian`) is where a Newton step on the model's conditional log density starts,
    and the last layer is instead :math:`u_i = m_i + L_i^{-\\top}(t(c_i) + e^{C \\tanh(h(c_i)
    / C)} \\odot f_K \\circ \\dots \\circ f_1(\\epsilon; c_i))` for the step's mean
    :math:`m_i` and precision :math:`L_i L_i^\\top`
    (:mod:`~pyro_flows_ext.infer.hierarchical.newton`).

    Example:
        >>> import torch
        >>> from pyro_flows_ext.infer.hierarchical.local_prior import LocalPrior
        >>> zeros, no = torch.zeros(5, 2), torch.zeros(2, dtype=torch.bool)
        >>> prec = torch.full((5, 2), 4.0).log()  # scale 0.5
        >>> prior = LocalPrior(zeros, zeros, torch.zeros(5, 4, 1), no, torch.zeros(1), zeros, prec)
        >>> flow = LocalFlow(2, 3, torch.Size([5]), prior, depth=2)
        >>> params = flow.element_params((), {})
        >>> ts = flow.transforms([torch.zeros(5, 3)], torch.zeros(1), *params)
        >>> len(ts), ts[-1](torch.ones(5, 2))[0].tolist()
        (5, [0.5, 0.5])
    """

    prior_loc: Tensor
    prior_log_scale: Tensor
    prior_coef: Tensor
    prior_mask: Tensor
    prior_g0: Tensor

    def __init__(
        self,
        features: int,
        context_dim: int,
        grid: torch.Size | None,
        prior: LocalPrior,
        *,
        depth: int = 2,
        hidden_dims: Sequence[int] = LOCAL_HIDDEN,
        lr_scale: float = LR_SCALE,
        clamp: float = LOCAL_CLAMP,
        element_rate: float = 1.0,
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
        self.per_element = grid is not None
        if not self.per_element:
            prior = prior.pooled()
        self.element_rate = c = positive_float("element_rate", element_rate)
        self.pseudo_loc_raw = nn.Parameter(prior.pseudo_loc.detach() / c)
        self.pseudo_log_prec_raw = nn.Parameter(prior.pseudo_log_prec.detach() / c)
        self.register_buffer("prior_loc", prior.loc.detach().clone())
        self.register_buffer("prior_log_scale", prior.log_scale.detach().clone())
        self.register_buffer("prior_coef", prior.coef.detach().clone())
        self.register_buffer("prior_mask", prior.mask.clone())
        self.has_prior = bool(prior.mask.any())  # read per step: no device sync there
        self.register_buffer("prior_g0", prior.g0.detach().clone())

    def _coupling(self, part: Partition, parity: int) -> nn.Module:
        k = self.context_dim
        network = damped_network(self.hidden_dims, self.lr_scale)
        return make_coupling(
            AffineMap(clamp=self.clamp), part.event_shape, mask=part, network=network, context_dim=k
        )

    @property
    def pseudo_loc(self) -> Tensor:
        """:math:`\\hat y` of every element, ``(*grid, F)``."""
        return self.pseudo_loc_raw * self.element_rate

    @property
    def pseudo_log_prec(self) -> Tensor:
        """:math:`\\lambda` of every element, ``(*grid, F)``."""
        return self.pseudo_log_prec_raw * self.element_rate

    def element_params(
        self, plates: Sequence[PlateInfo], indices: dict[str, Tensor]
    ) -> tuple[Tensor, ...]:
        """The per-element pseudo-likelihood and prior tensors at the plates' (subsample)
        ``indices``: only those rows are used, so only they get a gradient (and, for a
        subsampled plate and :class:`~pyro_flows_ext.optim.LazyClippedAdam`, an update)."""
        named: list[Tensor] = [self.pseudo_loc_raw, self.pseudo_log_prec_raw]
        named += [self.prior_loc, self.prior_log_scale]
        params = [*named, self.prior_coef]
        if self.per_element:
            if self.element_rate < 1:  # subsampled: a step updates only these rows
                mark_per_element(self.pseudo_loc_raw)
                mark_per_element(self.pseudo_log_prec_raw)
            for p in plates:
                index = indices[p.name].to(self.pseudo_loc_raw.device)
                for k, t in enumerate(params):
                    dim = p.dim - (2 if k == len(named) else 1)
                    if t.shape[dim] != 1:
                        params[k] = t.index_select(dim, index)
        c = self.element_rate
        return (params[0] * c, params[1] * c, *params[2:])

    def transforms(
        self,
        parts: Sequence[Tensor],
        g: Tensor,
        *params: Tensor,
        newton: tuple[Tensor, Tensor] | None = None,
    ) -> list[Transform]:
        """Base-to-latent transforms for the context given as ``parts`` (``(*batch_k, C_k)``
        that broadcast, concatenated in order: see :func:`cat_features`) and the globals'
        draw ``g`` ``(*batch, D)``, with :meth:`element_params`. With ``newton`` (the mean and
        the precision's Cholesky factor of each element's Newton-step Gaussian, see
        :mod:`~pyro_flows_ext.infer.hierarchical.newton`) the last layer maps to that Gaussian
        and the network's shift and scale act in its whitened space; without, to
        :meth:`gaussian`."""
        shift, h = self.net.forward_parts(parts).chunk(2, dim=-1)
        squash = self.clamp * torch.tanh(h / self.clamp)
        couplings: list[Transform] = []
        if len(self.couplings):
            context = cat_features(parts)
            couplings = [condition_all(cast(Transform, t), context) for t in self.couplings]
        if newton is None:
            loc, log_scale = self.gaussian(g, *params)
            return [
                *couplings,
                AffineTransform(loc + shift, (log_scale + squash).exp(), event_dim=1),
            ]
        whitened = AffineTransform(shift, squash.exp(), event_dim=1)
        return [*couplings, whitened, PrecisionAffine(*newton)]

    def gaussian(
        self,
        g: Tensor,
        pseudo_loc: Tensor,
        pseudo_log_prec: Tensor,
        prior_loc: Tensor,
        prior_log_scale: Tensor,
        prior_coef: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The location and log-scale ``(*batch, F)`` of the prior at ``g`` times the learned
        pseudo-likelihood, featurewise (class docstring), with :meth:`element_params`."""
        loc, log_scale = pseudo_loc, -0.5 * pseudo_log_prec
        if g.shape[-1] and self.has_prior:
            f = self.features
            linear = (prior_coef @ (g - self.prior_g0).unsqueeze(-1)).squeeze(-1)
            log_prior = -2 * (prior_log_scale + linear[..., f:])
            log_prior = torch.where(self.prior_mask, log_prior, -math.inf)
            weight = torch.sigmoid(log_prior - pseudo_log_prec)
            loc = pseudo_loc + weight * (prior_loc + linear[..., :f] - pseudo_loc)
            log_scale = -0.5 * torch.logaddexp(log_prior, pseudo_log_prec)
        return loc, log_scale


def global_flow(
    center: Tensor,
    *,
    depth: int,
    coupling: ElementwiseMap,
    network: NetworkFactory,
    init_scale: float,
    tails: bool = True,
) -> list[nn.Module]:
    """The globals' flow from the base to :math:`g \\in \\mathbb{R}^D`: with ``tails``, an
    :class:`~pyro_flows_ext.transforms.ExponentialTails` on the base (learned exponential
    tails, starting close to the identity), then ``depth`` couplings
    with the elementwise map ``coupling`` and networks from ``network``, each followed by a
    :class:`~pyro_flows_ext.transforms.PermuteTransform` (none for ``D = 1``), then a
    :class:`~pyro_flows_ext.transforms.LowerAffine` at
    :math:`\\mathcal N(\\text{center}, \\text{init\\_scale}^2 I)`; empty for ``D = 0``.

    Example:
        >>> from pyro_flows_ext.transforms import SplineMap
        >>> flow = global_flow(
        ...     torch.zeros(2), depth=1, coupling=SplineMap(), network=damped_network(),
        ...     init_scale=0.1,
        ... )
        >>> [type(t).__name__ for t in flow]
        ['ExponentialTails', 'Coupling', 'PermuteTransform', 'LowerAffine']
    """
    dim = center.shape[0]
    if dim == 0:
        return []

    def step(part: Partition, parity: int) -> nn.Module:
        return make_coupling(coupling, part.event_shape, mask=part, network=network)

    steps = coupling_steps(dim, depth, step, lambda: [PermuteTransform(dim)])
    head = [ExponentialTails(dim)] if tails else []
    return [*head, *steps, LowerAffine(dim, center.cpu(), init_scale=init_scale)]


def group_flow(
    structure: PlateStructure,
    group: PlateGroup,
    prior: LocalPrior,
    widths: dict[str, int],
    encoded: set[str],
    **options: Any,
) -> LocalFlow:
    """The :class:`LocalFlow` of ``group``: its context is the globals, its parents' locals
    and each of its plates' features (``widths``: plate -> feature size); shared by every
    element (no per-element parameters) when one of its plates is ``encoded``. ``options``:
    :class:`LocalFlow`'s keywords."""
    context = structure.global_dim + sum(structure.groups[j].dim for j in group.parents)
    context += sum(widths[p.name] for p in group.plates)
    amortised = any(p.name in encoded for p in group.plates)
    grid = None if amortised else group.grid({p.name: p.size for p in group.plates})
    rate = math.prod(p.rate for p in group.plates)
    return LocalFlow(group.dim, context, grid, prior, element_rate=rate, **options)


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


def plate_features(
    plates: dict[str, PlateInfo],
    encoders: dict[str, Callable[..., Tensor]],
    embeddings: nn.ParameterDict,
    like: Tensor,
    indices: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
) -> dict[str, Tensor]:
    """Each plate's per-element features at ``indices`` (its encoder's rows, or its learned
    embedding's, read at the plate's rate ``B / N`` and, for a subsampled plate, marked for
    :class:`~pyro_flows_ext.optim.LazyClippedAdam`), placed at the plate's dim, in ``like``'s
    dtype and device."""
    out = {}
    for name, plate in plates.items():
        if name in encoders:
            table, scale = encode(encoders[name], name, plate.size, args, kwargs), 1.0
        else:
            table, scale = embeddings[name], plate.rate
            if scale < 1:  # subsampled: a step updates only these rows
                mark_per_element(table)
        rows = table.to(like).index_select(0, indices[name].to(table.device)) * scale
        out[name] = rows.reshape((len(rows),) + (1,) * (-plate.dim - 1) + rows.shape[-1:])
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
