"""``AutoHierarchicalFlow``: a flow guide that follows a model's plates, so that it scales to
many plate elements and to subsampled plates (see
:mod:`pyro_flows_ext.infer.hierarchical.plates`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_flows_ext.checks import check_bool, hidden_sizes, one_of, positive_float, positive_int
from pyro_flows_ext.infer.diagnostics.importance import draw_elements
from pyro_flows_ext.infer.guide_state import GuideStateMixin, param_store_untouched
from pyro_flows_ext.infer.hierarchical.crossed import crossed_stages
from pyro_flows_ext.infer.hierarchical.full import Draw, FullPlateDraws
from pyro_flows_ext.infer.hierarchical.local_flow import (
    LOCAL_CLAMP,
    LOCAL_HIDDEN,
    ConditionalSTL,
    LocalFlow,
    check_encoders,
    encode,
    global_flow,
    group_flow,
    plate_features,
)
from pyro_flows_ext.infer.hierarchical.local_prior import local_priors
from pyro_flows_ext.infer.hierarchical.marginal import GlobalMarginal
from pyro_flows_ext.infer.hierarchical.newton import group_conditionals
from pyro_flows_ext.infer.hierarchical.plates import (
    PlateGroup,
    PlateStructure,
    non_normal_sites,
    plate_nesting,
    plate_structure,
)
from pyro_flows_ext.infer.stl import StickingTheLanding
from pyro_flows_ext.infer.vector.guide import INITS
from pyro_flows_ext.infer.vector.laplace import laplace_approximation
from pyro_flows_ext.infer.vector.steps import damped_network
from pyro_flows_ext.nn import LR_SCALE
from pyro_flows_ext.transforms import ElementwiseMap, LowerAffine, SplineMap, coupling_map

__all__ = ["AutoHierarchicalFlow"]

logger = logging.getLogger(__name__)

Emit = Callable[[str, Tensor, Tensor], Tensor]
Scope = Callable[[PlateGroup], AbstractContextManager[Any]]
Conditionals = Callable[[Tensor, dict[int, Tensor], list[int]], dict[int, tuple[Tensor, Tensor]]]


class AutoHierarchicalFlow(GuideStateMixin, FullPlateDraws, GlobalMarginal, AutoGuide):
    """A flow guide for hierarchical models: a coupling flow over the global latents and, for
    every plate element, a conditional flow over its local latents given the globals' draw.

    Sites outside every plate are *global*: their unconstrained values form one vector
    :math:`g \\in \\mathbb{R}^D` (``biject_to`` of each support, as in ``AutoContinuous``),
    modelled by ``depth`` spline or affine couplings with permutations and a final
    :class:`~pyro_flows_ext.transforms.LowerAffine` that starts at
    :math:`\\mathcal N(g_0, \\text{init\\_scale}^2 I)` around the ``init_loc_fn`` point. Sites
    inside plates are *local*, grouped by their set of plates; an element :math:`i` of a group
    has the unconstrained locals :math:`u_i \\in \\mathbb{R}^F` of all the group's sites and
    the :class:`LocalFlow` :math:`q(u_i \\mid c_i)` with context

    .. math:: c_i = [\\,g,\\; u_{\\text{parents}(i)},\\; e_i\\,],

    where :math:`e_i` concatenates, for each of the group's plates, a learned embedding (row
    :math:`i` of an ``(N, embedding_dim)`` parameter) or, for a plate with an encoder, the
    element's encoded data, and the parents are the groups in a subset of its plates (nested
    plates). The networks are shared across elements; the per-element parameters (embeddings,
    pseudo-likelihood, ``embedding_dim + 2 F`` numbers per element) are indexed by the plate's
    subsample, so under ``pyro.plate(name, N, subsample_size=B)`` a step computes and
    differentiates only the ``B`` sampled elements (the plate scales the log densities by
    ``N / B``, as for ``AutoNormal``). They learn at ``B / N`` of the step size: Adam's
    momentum turns each visit into some thirty steps of movement along one noisy gradient,
    which at full rate drove the globals of a 100,000-group funnel subsampled by 1,000 far off.
    Those of a subsampled plate are marked for
    :class:`~pyro_flows_ext.optim.LazyClippedAdam` (``fit_guide``'s optimiser), which then
    updates only the subsample's rows and their Adam moments.

    Newton conditionals (``newton``, the default), for every group that no other group nests
    in: after each draw of the globals (and enclosing groups), one run of the model at each
    element's learned Gaussian :math:`u_i^0` gives the gradient and ``F x F`` Hessian of its
    conditional log density, and one Newton step the Gaussian :math:`\\mathcal N(m_i,
    P_i^{-1})` (:mod:`~pyro_flows_ext.infer.hierarchical.newton`): the exact conditional for
    normal priors and likelihoods, correlated across the element's sites and moving with
    every global (radon's county intercept and slope with :math:`\\sigma_y`), the Laplace
    approximation otherwise. The network and couplings act in its whitened space. A fresh
    guide is, in the globals, the Laplace approximation of their marginal (``init``), each
    local at its Newton Gaussian (or, for ``newton=False`` and groups with children, at its
    prior given the globals times its pseudo-likelihood start, see ``local_prior``). Groups
    that share a likelihood term (crossed effects: a vote on its state's and its age
    group's; or a prior indexed by another group) are found at setup and conditioned in
    sequence, fewest elements first (:attr:`CROSSED_ORDER`,
    :mod:`~pyro_flows_ext.infer.hierarchical.crossed`): each one's Newton Gaussian at the
    draws of those before it, one model run per group of the chain, so that every group but
    the first gets its exact conditional in normal models.
    Its parameters and buffers (embeddings, prior coefficients) live in Pyro's param store
    under the guide's name: after ``pyro.get_param_store().load(path)`` a new guide's first
    call (or a built guide's next one) takes the saved values.

    Subsampling: the guide creates the model's plates itself (``pyro.plate(name, N,
    subsample_size=B)`` with the prototype's sizes), and the model's plate reuses its indices.
    To choose the subsample per call, pass Pyro's ``create_plates`` (called with the model's
    arguments, returning the plates); its plates must keep the model's full sizes.

    Amortisation: ``encoders={"plate": fn}`` with ``fn(*args, **kwargs) -> (N, K)`` per-element
    features (roughly standardised, e.g. an element's data summaries; return a precomputed
    tensor so that a step stays O(B)); the plate then has no embedding, and groups in it no
    per-element location or scale, so the guide answers for new data without refitting.

    Args:
        model: a Pyro model with continuous latents in vectorised plates (nested plates,
            several sites per plate and no plate at all all work).
        depth: coupling steps of the globals' flow (none with one global dimension);
            ``None`` (default): 2 with spline couplings, :attr:`AFFINE_DEPTH` with affine or
            additive ones.
        local_depth: conditional coupling steps of each local flow (none for ``F = 1``).
        hidden_dims: hidden sizes of the globals' couplings (default
            :func:`~pyro_flows_ext.nn.default_hidden_dims`).
        local_hidden_dims: hidden sizes of the local networks (default ``(16,)``: they run
            once per element and particle, and the prior-times-pseudo-likelihood layer does
            most of the work).
        embedding_dim: size of each plate's learned per-element embedding.
        encoders: per-plate feature functions (see above).
        coupling: the globals' coupling kind (a name of
            :data:`~pyro_flows_ext.transforms.COUPLINGS` or a ready map; affine ones get the
            guide's ``clamp``); by default (``None``) splines when the model's plates hold
            fewer than :attr:`AFFINE_FROM` elements in all, else affine. Splines bend the
            globals' marginals, which a few groups need (8-group funnel: 0.05 sd with splines,
            1.2 affine); with more groups their outer bins drift and fatten the tails (radon's
            85 counties, the 10,000-group funnel).
        init_loc_fn: initial values (:mod:`pyro.infer.autoguide.initialization`): the
            globals' flow starts around them, each element's pseudo-likelihood at one Newton
            step from them (:mod:`~pyro_flows_ext.infer.hierarchical.local_prior`).
        init_scale: initial standard deviation of every latent (unconstrained) that does not
            start at its prior or at the Laplace approximation.
        init: where the globals' flow starts. ``"laplace"`` (default): at the mode and
            curvature of the globals' Laplace marginal, :math:`\\log p(g, y) \\approx \\log
            p(g, \\bar u, y) - \\log q(\\bar u \\mid g)` with every group of locals at the
            centre :math:`\\bar u(g)` of its fresh conditional (the Newton mean: exact for
            normal models, where this *is* the marginal), found by L-BFGS and Newton steps
            from the ``init_loc_fn`` point (:func:`~pyro_flows_ext.infer.laplace_approximation`,
            in the model's dtype); the last layer then starts at that Gaussian, and every
            element's pseudo-likelihood is read there. A subsampled plate is read in
            chunks of its subsample size (:mod:`~pyro_flows_ext.infer.hierarchical.marginal`;
            every evaluation is a pass over the data: 27 CPU s for 100,000 groups by 1,000).
            ``"loc"``, or when the search fails:
            :math:`\\mathcal N(g_0, \\text{init\\_scale}^2 I)` around the ``init_loc_fn``
            point. Why: ``init_to_median`` reads the median of a few prior draws, and for
            radon's ``mu_a ~ Normal(0, 10)`` it started 110 posterior sds away (-4.0 against
            1.49); Adam's second moments, inflated by the large first gradients, then shrank
            the steps back to a tenth of the step size, and with 32 particles a fit of
            2,000 steps ended 24 nats short (ELBO -1086.0 against -1062.1), one of 500
            steps 200 nats.
        tails: an :class:`~pyro_flows_ext.transforms.ExponentialTails` on the globals' base,
            so that a global can learn an exponential tail on either side (the log of a
            group scale whose prior has a positive density at zero, as radon's
            :math:`\\log \\sigma_b`, whose spread a Gaussian tail cuts by half).
        newton: the Newton conditionals above (one more model run and ``F`` Hessian-vector
            products per step).
        local_prior: use the model's prior of each local given the globals where it is a
            location-scale family that depends on them (``theta ~ Normal(mu, tau)``): the
            local flow is then that prior times a learned Gaussian pseudo-likelihood per
            element (:class:`~pyro_flows_ext.infer.hierarchical.local_flow.LocalFlow`), exact for
            normal-normal models at every point of their funnel. ``False``: a learned
            Gaussian per element whatever the globals (plus the shared network).
        stl: sticking-the-landing gradient (:class:`~pyro_flows_ext.infer.StickingTheLanding`
            for the globals, :class:`~pyro_flows_ext.infer.hierarchical.local_flow.ConditionalSTL`
            for the locals). Off by default: on the radon model of tutorial 5 it trained to a
            far worse ELBO than the plain gradient (an open question).
        create_plates: as for every Pyro autoguide.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        ...     tau = pyro.sample("tau", dist.HalfNormal(5.0))
        ...     with pyro.plate("groups", len(y), subsample_size=2) as i:
        ...         theta = pyro.sample("theta", dist.Normal(mu, tau))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y[i])
        >>> guide = AutoHierarchicalFlow(model)
        >>> guide(torch.zeros(6))["theta"].shape, guide.median(torch.zeros(6))["theta"].shape
        (torch.Size([2]), torch.Size([6]))

    References: Kingma & Dhariwal (2018), Glow; Durkan et al. (2019), neural spline flows;
    Agrawal & Domke (2021), amortized variational inference for simple hierarchical models.
    """

    CROSSED_ORDER: str | None = "fewest"
    """The order in which leaf groups that share likelihood terms are conditioned on each
    other's draws (:mod:`~pyro_flows_ext.infer.hierarchical.crossed`): ``"largest"`` or
    ``"fewest"`` plate elements first; ``None``: each at the others' anchors, in one run."""

    LAPLACE_SEARCH: dict[str, Any] = {"max_iter": 100, "curvature": "differences"}
    """Options of the Laplace start's mode search
    (:func:`~pyro_flows_ext.infer.laplace_approximation`): L-BFGS, and the curvature from
    differences of the gradient, whose memory is one gradient's (autograd's Hessian of this
    marginal, itself built from Hessian-vector products, took 22 GB on 386 counties)."""

    AFFINE_FROM: int = 50
    """Plate elements (all plates) from which the globals' couplings are affine unless
    ``coupling`` says otherwise (radon's 85 counties: ELBO -1063.3 affine, -1067.0 spline)."""

    AFFINE_DEPTH: int = 6
    """Coupling steps of the globals' flow when they are affine (or additive) and ``depth`` is
    not given. An affine coupling bends no marginal, only shifts and scales half the
    coordinates given the rest, so a skewed global needs several: radon's ``log sigma_b``
    (an exponential left tail) came out with its sd 0.11-0.12 short in log with 2 steps,
    0.03-0.15 with 4 and 0.02-0.08 with 6 (six seeds each; the other globals within 0.06 sd),
    for about 12 % more time per step there."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        depth: int | None = None,
        local_depth: int = 2,
        hidden_dims: Sequence[int] | None = None,
        local_hidden_dims: Sequence[int] | None = None,
        embedding_dim: int = 8,
        encoders: dict[str, Callable[..., Tensor]] | None = None,
        coupling: str | ElementwiseMap | None = None,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        init: str = "laplace",
        tails: bool = True,
        clamp: float = LOCAL_CLAMP,
        lr_scale: float = LR_SCALE,
        local_prior: bool = True,
        newton: bool = True,
        stl: bool = False,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        for name, fn in (("model", model), ("init_loc_fn", init_loc_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.depth = None if depth is None else positive_int("depth", depth, minimum=0)
        self.local_depth = positive_int("local_depth", local_depth, minimum=0)
        self.hidden_dims = hidden_sizes("hidden_dims", hidden_dims)
        self.local_hidden_dims = hidden_sizes("local_hidden_dims", local_hidden_dims)
        self.embedding_dim = positive_int("embedding_dim", embedding_dim)
        self.encoders = check_encoders(encoders)
        self.clamp = positive_float("clamp", clamp)
        self.coupling = None if coupling is None else coupling_map(coupling, clamp=self.clamp)
        self.init_scale = positive_float("init_scale", init_scale)
        self.init = one_of("init", init, INITS)
        self.tails = check_bool("tails", tails)
        self.lr_scale = positive_float("lr_scale", lr_scale)
        self.local_prior = check_bool("local_prior", local_prior)
        self.newton = check_bool("newton", newton)
        self.stl = check_bool("stl", stl)
        self.structure: PlateStructure | None = None
        self._plain_model = model  # conditioned runs: no init_loc_fn draws at every site
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)

    def _build(self, *args: Any, **kwargs: Any) -> None:
        self._require_model()
        try:
            AutoGuide._setup_prototype(self, *args, **kwargs)  # Pyro's prototype trace
        except NotImplementedError:
            plate_structure(self.prototype_trace)  # raises a ValueError naming the site
            raise
        trace = cast(Any, self.prototype_trace)
        s = self.structure = plate_structure(trace)
        sites = list(trace.iter_stochastic_nodes())
        like = sites[0][1]["value"]
        unknown = sorted(set(self.encoders) - set(s.plates))
        if unknown:
            raise ValueError(f"encoders given for {unknown}, not plates of the model's latents")
        self._event_dims = {n: site["fn"].event_dim for n, site in sites}
        widths = {
            n: encode(self.encoders[n], n, self.structure.plates[n].size, args, kwargs).shape[-1]
            for n in self.encoders
        }
        self.embeddings = nn.ParameterDict(
            {
                n: torch.randn(p.size, self.embedding_dim) / p.rate  # read as rate * raw
                for n, p in s.plates.items()
                if n not in widths
            }
        )
        widths.update({n: self.embedding_dim for n in self.embeddings})
        g0 = s.initial_globals(trace)
        self._flows(trace, g0, None, widths, args, kwargs)
        self._newton_groups = frozenset(s.leaves if self.newton else ())
        leaves, order = sorted(self._newton_groups), self.CROSSED_ORDER
        self._stages = crossed_stages(self._plain_model, s, trace, g0, leaves, order, args, kwargs)
        replayed = poutine.trace(poutine.replay(self._plain_model, trace=trace))
        with_observed = poutine.block(replayed.get_trace)  # the plates of observations too
        rng = pyro.util.get_rng_state()  # a subsample drawn here must not move the user's seed
        try:
            observed = with_observed(*args, **kwargs)
        finally:
            pyro.util.set_rng_state(rng)
        self._model_nesting = plate_nesting(observed)
        self._draw_elements = draw_elements(observed)  # bounds marginal_resample's batches
        self._non_normal = non_normal_sites(observed, s.plates)  # its Laplace is approximate
        self.register_buffer("_anchor", like.new_zeros(()).detach())
        self.to(dtype=like.dtype, device=like.device)
        found = self._laplace_start(args, kwargs) if self.init == "laplace" else None
        if found is not None:
            self._flows(trace, *found, widths, args, kwargs)
            self.to(dtype=like.dtype, device=like.device)

    def _flows(
        self,
        trace: Any,
        center: Tensor,
        scale_tril: Tensor | None,
        widths: dict[str, int],
        args: tuple,
        kwargs: dict,
    ) -> None:
        """Fresh flows: the globals' around ``center`` (at ``N(center, L L^T)`` given the
        Laplace start's ``scale_tril`` ``L``), every local's prior and pseudo-likelihood read
        there."""
        s = cast(PlateStructure, self.structure)
        affine = sum(p.size for p in s.plates.values()) >= self.AFFINE_FROM
        coupling = self.coupling or coupling_map("affine" if affine else "spline", clamp=self.clamp)
        center = center.detach().cpu()
        depth = self.depth
        if depth is None:
            depth = 2 if isinstance(coupling, SplineMap) else self.AFFINE_DEPTH
        flow = global_flow(
            center, depth=depth, coupling=coupling,
            network=damped_network(self.hidden_dims, self.lr_scale),
            init_scale=self.init_scale, tails=self.tails,
        )  # fmt: skip
        if scale_tril is not None:
            flow[-1] = LowerAffine(s.global_dim, center, scale_tril.detach().cpu())
        self.global_flow = nn.ModuleList(flow)
        priors = local_priors(
            self._plain_model, trace, s, center, self.init_scale, args, kwargs,
            read=self.local_prior,
        )  # fmt: skip
        hidden = self.local_hidden_dims or LOCAL_HIDDEN
        self.local_flows = nn.ModuleList(
            group_flow(
                s, group, prior, widths, set(self.encoders), depth=self.local_depth,
                hidden_dims=hidden, lr_scale=self.lr_scale, clamp=self.clamp,
            )
            for group, prior in zip(s.groups, priors, strict=True)
        )  # fmt: skip

    def _laplace_start(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None] | None:
        """The mode of the globals' Laplace marginal (:meth:`_log_marginal`) and, where its
        Hessian is negative definite there, the lower Cholesky factor of its inverse; ``None``
        where there are no globals or the search fails (logged)."""
        s = cast(PlateStructure, self.structure)
        if not s.global_dim:
            return None

        def log_marginal(g: Tensor) -> Tensor:
            return self._log_marginal(g, args, kwargs)

        try:  # reading a module attribute registers it in the store: none of these is final
            with param_store_untouched():
                center = cast(LowerAffine, self.global_flow[-1]).center
                found = laplace_approximation(log_marginal, center, **self.LAPLACE_SEARCH)
        except (ValueError, RuntimeError) as err:  # a failed start is no failed guide
            logger.info("AutoHierarchicalFlow: no Laplace start (%s), the init point's", err)
            return None
        return found.loc, None if found.hessian_repaired else found.scale_tril

    def _aux(self, block: str) -> str:
        return f"_{self._pyro_name}_{block}"

    def _global_dist(self) -> Distribution:
        base = dist.Normal(self._anchor, 1.0).expand([self.structure.global_dim]).to_event(1)  # type: ignore[union-attr]
        return dist.TransformedDistribution(base, list(self.global_flow))

    def _local_dist(
        self,
        i: int,
        parts: list[Tensor],
        g: Tensor,
        indices: dict[str, Tensor],
        newton: tuple[Tensor, Tensor] | None,
    ) -> Distribution:
        assert self.structure is not None
        group, flow = self.structure.groups[i], cast(LocalFlow, self.local_flows[i])
        params = flow.element_params(group.plates, indices)
        shapes = [t.shape[:-1] for t in parts] + [params[0].shape[:-1]]
        if newton is not None:
            shapes.append(newton[0].shape[:-1])
        batch = torch.broadcast_shapes(*shapes)
        base = dist.Normal(self._anchor, 1.0).expand(batch + (group.dim,)).to_event(1)
        transforms = flow.transforms(parts, g, *params, newton=newton)
        return dist.TransformedDistribution(base, transforms)

    def _conditionals(
        self,
        g: Tensor,
        blocks: dict[int, Tensor],
        indices: dict[str, Tensor],
        args: tuple,
        kwargs: dict,
        chunked: bool = False,
        targets: list[int] | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """The Newton groups' Gaussians (of ``targets``, default all), for the model's
        ``args, kwargs``, read over the full plates in chunks with ``chunked``
        (:func:`group_conditionals`)."""
        assert self.structure is not None
        groups = {i: self.local_flows[i] for i in sorted(self._newton_groups - set(blocks))}
        model, s = self._plain_model, self.structure
        run = (args, kwargs, chunked)
        return group_conditionals(model, s, groups, g, blocks, indices, *run, targets=targets)

    def _features(self, indices: dict[str, Tensor], args: tuple, kwargs: dict) -> dict[str, Tensor]:
        assert self.structure is not None
        tables = (self.structure.plates, self.encoders, self.embeddings)
        return plate_features(*tables, self._anchor, indices, args, kwargs)

    def _walk(
        self,
        indices: dict[str, Tensor],
        feats: dict[str, Tensor],
        draw: Draw,
        emit: Emit,
        scope: Scope,
        conditionals: Conditionals,
    ) -> dict[str, Tensor]:
        """Draw the globals, then each group given the globals and its parents (the Newton
        groups last, from ``conditionals(g, blocks, targets)``, one call per stage of
        :mod:`~pyro_flows_ext.infer.hierarchical.crossed`); ``draw`` samples a block (told
        whether it is the first draw of its chain), ``emit`` turns a site's value into the
        result, ``scope`` enters a group's plates."""
        s = self.structure
        assert s is not None
        result: dict[str, Tensor] = {}
        g = centred = self._anchor.new_zeros(0)
        if s.global_dim:
            g = draw(self._aux("globals"), self._global_dist(), True, None)
            result.update({n: emit(n, v, ld) for n, (v, ld) in s.split_globals(g).items()})
            centred = g - cast(LowerAffine, self.global_flow[-1]).loc.detach()
        sizes = {n: len(i) for n, i in indices.items()}
        blocks: dict[int, Tensor] = {}
        gaussians: dict[int, tuple[Tensor, Tensor]] = {}
        fixed: dict[int, tuple[Tensor, Tensor]] = {}  # at the detached context, for STL
        stage = self._stages
        for i in sorted(range(len(s.groups)), key=lambda k: (k in stage, stage.get(k, 0))):
            group = s.groups[i]
            parts = [centred] if s.global_dim else []
            parts += [blocks[j] for j in group.parents] + [feats[p.name] for p in group.plates]
            if i in stage and i not in gaussians:  # outside the plates: runs the model
                targets = [k for k in sorted(stage) if stage[k] == stage[i]]
                gaussians.update(conditionals(g, blocks, targets))
                if self.stl:
                    detached = {k: b.detach() for k, b in blocks.items()}
                    fixed.update(conditionals(g.detach(), detached, targets))
            with scope(group):
                fresh = not s.global_dim and not group.parents  # no draw in its context yet
                q = self._local_dist(i, parts, g, indices, gaussians.get(i))
                at_fixed = fixed.get(i)

                def score(i: int = i, c: list[Tensor] = parts, n: Any = at_fixed) -> Any:
                    detached = [t.detach() for t in c]  # the density with its context detached
                    return self._local_dist(i, detached, g.detach(), indices, n)

                u = draw(self._aux(group.name), q, fresh, score)
                values = group.split(u, sizes)
                result.update({n: emit(n, v, ld) for n, (v, ld) in values.items()})
            blocks[i] = u
        return result

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every latent site (in the constrained space) for the model's arguments."""
        self.initialize(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        indices = self.structure.indices(plates)  # type: ignore[union-attr]
        feats = self._features(indices, args, kwargs)

        def draw(name: str, d: Distribution, fresh: bool, score: Any) -> Tensor:
            if self.stl:  # the path derivative through the context's draws too
                d = StickingTheLanding(d) if score is None else ConditionalSTL(d, score())
            return pyro.sample(name, cast(Any, d), infer={"is_auxiliary": True})

        def emit(name: str, value: Tensor, log_density: Tensor) -> Tensor:
            event_dim = self._event_dims[name]
            delta = dist.Delta(value, log_density=log_density, event_dim=event_dim)
            return pyro.sample(name, delta)

        def scope(group: PlateGroup) -> ExitStack:
            stack = ExitStack()
            for p in group.plates:
                stack.enter_context(plates[p.name])
            return stack

        def conditionals(g: Tensor, blocks: dict[int, Tensor], to: list[int]) -> dict[int, Any]:
            return self._conditionals(g, blocks, indices, args, kwargs, targets=to)

        return self._walk(indices, feats, draw, emit, scope, conditionals)

    def _full(self, draw: Draw, args: tuple, kwargs: dict) -> dict[str, Tensor]:
        """Run the flows over the full plates (no Pyro sites), values as ``draw`` gives,
        after :meth:`initialize`."""
        self.initialize(*args, **kwargs)
        assert self.structure is not None
        device = self._anchor.device
        indices = {n: torch.arange(p.size, device=device) for n, p in self.structure.plates.items()}
        feats = self._features(indices, args, kwargs)

        def conditionals(g: Tensor, blocks: dict[int, Tensor], to: list[int]) -> dict[int, Any]:
            return self._conditionals(g, blocks, indices, args, kwargs, True, targets=to)

        def emit(name: str, value: Tensor, log_det: Tensor) -> Tensor:
            return value

        return self._walk(indices, feats, draw, emit, lambda g: nullcontext(), conditionals)
