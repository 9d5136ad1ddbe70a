"""``AutoCouplingFlow``: a Glow-style coupling-flow guide for Pyro SVI with a Laplace start."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn
from torch.distributions import Transform
from torch.distributions.transforms import ComposeTransform

from pyro_flows_ext.checks import check_bool, hidden_sizes, one_of, positive_float, positive_int
from pyro_flows_ext.infer.guide_state import (
    GuideStateMixin,
    stored_under,
    sync_param_store,
)
from pyro_flows_ext.infer.stl import StickingTheLanding
from pyro_flows_ext.infer.traces import unsupported_latents
from pyro_flows_ext.infer.vector.laplace import ModeSearch
from pyro_flows_ext.infer.vector.start import GaussianStart, LogJoint, gaussian_start
from pyro_flows_ext.infer.vector.steps import (
    AFFINES,
    FULL_RANK_MAX_DIM,
    coupling_steps,
    damped_network,
    final_affine,
    resolve_affine,
)
from pyro_flows_ext.infer.vector.summaries import FlowSummaries
from pyro_flows_ext.infer.vector.tails import BASES, StudentTBase
from pyro_flows_ext.nn import LR_SCALE, damp_parameters_
from pyro_flows_ext.transforms import (
    ActNorm,
    ElementwiseMap,
    InvertibleLinear,
    LowerAffine,
    LowRankAffine,
    NetworkFactory,
    Partition,
    PermuteTransform,
    coupling_map,
    make_coupling,
)

__all__ = ["AutoCouplingFlow"]

logger = logging.getLogger(__name__)

MIXINGS = ("lu", "permute")
INITS = ("laplace", "loc")


class AutoCouplingFlow(GuideStateMixin, FlowSummaries, AutoContinuous):
    """A normalizing-flow guide over the unconstrained latent vector, started at a Gaussian.

    Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide it packs the model's
    latent sites into one vector :math:`u \\in \\mathbb{R}^D` in the unconstrained space
    (``biject_to`` of each site's support) and models

    .. math::

        u = c + P\\,(a + B\\, g_K \\circ \\dots \\circ g_1(\\epsilon)),
        \\qquad \\epsilon \\sim \\mathcal N(0, I_D) \\text{ (or Student-t)},

    where each step :math:`g_k` is an affine :class:`~pyro_flows_ext.transforms.Coupling`
    (alternating halves, a zero-initialised :class:`~pyro_flows_ext.nn.DampedMLP`
    conditioner) followed by a mixing layer: a fixed random permutation
    (:class:`~pyro_flows_ext.transforms.PermuteTransform`, default) or a learned
    :class:`~pyro_flows_ext.transforms.InvertibleLinear` in LU form, optionally with Glow's
    :class:`~pyro_flows_ext.transforms.ActNorm` (never initialised from data). ``c`` and the
    lower-triangular ``P`` are fixed and ``a``, lower-triangular ``B`` are learned
    (:class:`~pyro_flows_ext.transforms.LowerAffine`), so with the couplings at the identity
    the guide is a full-rank Gaussian like ``AutoMultivariateNormal`` (with t tails under the
    default Student-t base). A fresh guide is centred at :math:`c` with scale :math:`P B_0`
    (exactly the Gaussian :math:`\\mathcal N(c, (P B_0)(P B_0)^\\top)` with
    ``base="normal"``):

    * ``init="laplace"`` (default): the Laplace approximation. ``c`` is the mode of the log
      joint in the unconstrained space (Jacobians included), found by L-BFGS and Newton steps
      from the ``init_loc_fn`` point, and ``P`` the Cholesky factor of the inverse Hessian
      there, ``B_0 = I``. Because ``a, B`` and the couplings act in the space whitened by
      ``P``, training is as easy for a coefficient of ``-6e4`` with sd ``1e3`` as for a
      standard normal. The Laplace Gaussian is not always a good start (a funnel's mode is at
      its neck; a mode in the tail of a skewed posterior gives too wide a Gaussian), so it
      competes by estimated ELBO with half its scale and with the ``"loc"`` start at scales
      ``init_scale`` and 1 (:func:`~pyro_flows_ext.infer.vector.start.gaussian_start`);
      :attr:`init_info` says which won and why.
    * ``init="loc"``: ``c`` is the ``init_loc_fn`` point, ``P = I``, ``B_0 = init_scale * I``:
      a diagonal Gaussian like a fresh ``AutoNormal``. Use it when the model subsamples data
      (the Laplace start would see one random subsample).

    The parameters are created on the first call of the guide (when the model's arguments are
    known) or by :meth:`initialize`; create them before handing ``guide.parameters()`` to a
    torch optimiser. They take the dtype and device of the model's latent values. They and
    the fixed buffers live in Pyro's param store under the guide's name, so that
    ``pyro.get_param_store().save(path)`` keeps the fit: a guide built anew after
    ``pyro.get_param_store().load(path)`` loads it on its first call instead of computing a
    start, and a built guide reads values loaded later on its next call (see
    ``pyro_flows_ext.infer.guide_state``).

    Recommended training (Agrawal, Sheldon & Domke 2020; Agrawal & Domke 2024): enough
    particles, the sticking-the-landing gradient (on by default), and a step size that decays
    by orders of magnitude; :func:`~pyro_flows_ext.infer.fit_guide` runs it (with
    :meth:`fit_defaults`' steps and particles), by hand::

        guide = AutoCouplingFlow(model)
        defaults, lr0, lr1 = guide.fit_defaults(*args), 5e-2, 1e-4
        steps, particles = defaults["steps"], defaults["num_particles"]
        optim = pyro.optim.ClippedAdam(
            {"lr": lr0, "lrd": (lr1 / lr0) ** (1 / steps), "clip_norm": math.inf}
        )
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
        svi = SVI(model, guide, optim, elbo)
        for _ in range(steps):
            svi.step(*args)

    then check the fit with :func:`~pyro_flows_ext.infer.psis_khat` (and, when you have them,
    against reference draws: a small k-hat can hide a guide that misses part of the posterior).

    Args:
        model: a Pyro model whose latent sites are all continuous.
        depth: flow steps ``K`` (0 gives the Gaussian ``N(loc, L L^T)``); with a single
            latent dimension there is nothing to couple and the guide is Gaussian.
        hidden_dims: hidden sizes of each coupling's MLP (default
            :func:`~pyro_flows_ext.nn.default_hidden_dims` of its input: two layers of
            ``max(64, 2 * D)`` units, at most
            :data:`~pyro_flows_ext.infer.vector.steps.MAX_WIDTH`, so the parameters grow
            linearly in ``D``).
        mixing: ``"permute"`` (fixed random permutation) or ``"lu"`` (learned invertible
            linear map, trained at ``lr_scale`` times the step size; in the posteriordb
            benchmark it was slower and less stable than a permutation, since the final
            affine layer already learns the linear part).
        actnorm: add an ActNorm after each mixing layer (Glow's step; redundant with the final
            affine layer in a guide, and slower).
        init: ``"laplace"`` or ``"loc"`` (see above).
        init_loc_fn: per-site initial values (see :mod:`pyro.infer.autoguide.initialization`);
            the start of the mode search, or the mean for ``init="loc"``.
        init_scale: the initial standard deviation for ``init="loc"`` and for the fallback.
        coupling: a kind of :data:`~pyro_flows_ext.transforms.COUPLINGS` (``"affine"``:
            :class:`~pyro_flows_ext.transforms.AffineMap` with its soft-clamped ``exp``
            scale; ``"spline"``: :class:`~pyro_flows_ext.transforms.SplineMap`, 8 bins on
            ``[-3, 3]`` of the whitened space and the identity outside; ...) or a ready map
            with options of your own (``AffineMap(clamp=5.0)``).
        lr_scale: the couplings' networks (and the LU and ActNorm layers) learn at this
            fraction of the optimiser's step size (:class:`~pyro_flows_ext.nn.DampedMLP`,
            :func:`~pyro_flows_ext.nn.damp_parameters_`), so that one step size suits
            the Gaussian part and the networks.
        stl: use the sticking-the-landing (path-derivative) gradient of ``log q`` (see
            :class:`~pyro_flows_ext.infer.stl.StickingTheLanding`); on by default (it was more
            accurate on every posteriordb posterior tried); may be toggled any time.
        laplace_options: options of the mode search, the keyword arguments of
            :func:`~pyro_flows_ext.infer.laplace_approximation` (``max_iter``,
            ``newton_steps``, ``tol``, ``eig_floor``).
        init_elbo_samples: draws per candidate start behind the ELBO estimates.
        base: ``"studentt"`` (default: independent Student-t coordinates with degrees of
            freedom learned per dimension in ``(1, 50)``, starting at 30,
            :class:`~pyro_flows_ext.infer.vector.tails.StudentTBase`) or ``"normal"``
            (:math:`\\epsilon \\sim \\mathcal N(0, I)`). A flow keeps its base's tails, and
            where the posterior's are heavier than Gaussian (the log residual scale of a
            regression) a Gaussian base left PSIS :math:`\\hat k` above 0.7 on 6 of the 16
            posteriordb posteriors of ``benchmarks/posteriors`` however well the bulk fitted
            (kilpisjarvi 2.1); the Student-t base brought all 16 below 0.7, at the cost of
            slightly less precise bulk fits on some (``benchmarks/posteriors``).
        df: with ``base="studentt"``, fixed degrees of freedom instead of learned ones.
        affine: the final layer: ``"full"`` (lower-triangular,
            :class:`~pyro_flows_ext.transforms.LowerAffine`, ``D^2`` parameters), ``"lowrank"``
            (diagonal plus rank ``rank``, :class:`~pyro_flows_ext.transforms.LowRankAffine`) or
            ``"auto"``: full up to ``D = 1024`` features
            (:data:`~pyro_flows_ext.infer.vector.steps.FULL_RANK_MAX_DIM`), low rank above. Above
            that size ``init="laplace"`` starts as ``"loc"`` (the ``D x D`` Hessian is not
            computed) and :attr:`init_info` says so.
        rank: the rank of the low-rank layer (default ``round(sqrt(D))``); an error with
            ``affine="full"``.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model():
        ...     x = pyro.sample("x", dist.Normal(3.0, 2.0))
        ...     pyro.sample("y", dist.LogNormal(x, 1.0))
        >>> guide = AutoCouplingFlow(model, depth=2).initialize()
        >>> round(guide.median()["x"].item(), 2), round(guide.median()["y"].item(), 1)
        (3.0, 20.1)

    References: Kucukelbir et al. (2017), ADVI; Kingma & Dhariwal (2018), Glow; Agrawal,
    Sheldon & Domke (2020); Agrawal & Domke (2024).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        depth: int = 3,
        hidden_dims: Sequence[int] | None = None,
        mixing: str = "permute",
        actnorm: bool = False,
        init: str = "laplace",
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        coupling: str | ElementwiseMap = "affine",
        stl: bool = True,
        lr_scale: float = LR_SCALE,
        laplace_options: dict[str, Any] | None = None,
        init_elbo_samples: int = 256,
        base: str = "studentt",
        df: float | None = None,
        affine: str = "auto",
        rank: int | None = None,
    ) -> None:
        for name, fn in (("model", model), ("init_loc_fn", init_loc_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.depth = positive_int("depth", depth, minimum=0)
        self.hidden_dims = hidden_sizes("hidden_dims", hidden_dims)
        self.mixing = one_of("mixing", mixing, MIXINGS)
        self.actnorm = check_bool("actnorm", actnorm)
        self.init = one_of("init", init, INITS)
        self.init_scale = positive_float("init_scale", init_scale)
        self.coupling = coupling_map(coupling)
        self.stl = check_bool("stl", stl)
        self.lr_scale = positive_float("lr_scale", lr_scale)
        self.laplace_options = ModeSearch.options("laplace_options", laplace_options)
        self.init_elbo_samples = positive_int("init_elbo_samples", init_elbo_samples)
        self.base = one_of("base", base, BASES)
        self.df = None if df is None else positive_float("df", df)
        if self.df is not None and self.base != "studentt":
            raise ValueError(f"df applies to base='studentt' only, got base={base!r}")
        self.student_t: StudentTBase | None = None
        self.affine_kind = one_of("affine", affine, AFFINES)
        self.rank = None if rank is None else positive_int("rank", rank)
        if self.rank is not None and self.affine_kind == "full":
            raise ValueError("rank applies to the low-rank affine layer, got affine='full'")
        self.init_info: dict[str, Any] = {}
        """How the guide was initialised (see
        :class:`~pyro_flows_ext.infer.vector.start.GaussianStart`): ``method``, the ELBO
        estimates of the candidate starts, the Laplace result; ``method`` is ``"param
        store"`` when the values were loaded from Pyro's param store."""
        self._raw_model = (model,)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def fit_defaults(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        """The ``steps`` and ``num_particles`` that :func:`~pyro_flows_ext.infer.fit_guide`
        uses by default; builds the guide for the model's arguments first (:meth:`initialize`),
        since its start decides. When the Laplace Gaussian won the start
        (``init_info["method"] == "laplace"``) the guide is already close to the posterior:
        1,000 steps of 32 particles (a third of the steps, each at about 1.1x the cost of 16
        particles; the extra particles cut the gradient noise that fewer steps average less).
        Otherwise (a start at ``init_loc_fn``'s point, or the half-scale Laplace one) 3,000
        steps of 16, as for any guide. Measured on the posteriordb suite
        (``benchmarks/posteriors/results/NOTES.md``)."""
        self.initialize(*args, **kwargs)
        if self.init_info.get("method") == "laplace":
            return {"steps": 1000, "num_particles": 32}
        return {"steps": 3000, "num_particles": 16}

    # ---------------------------------------------------------------- setup -------------
    def _build(self, *args: Any, **kwargs: Any) -> None:
        self._require_model()
        raw_model = self._raw_model[0]
        try:
            AutoContinuous._setup_prototype(self, *args, **kwargs)  # Pyro's packing
        except (ValueError, RuntimeError, NotImplementedError) as err:
            problem = unsupported_latents(self.prototype_trace, type(self).__name__)
            if problem is not None:
                raise problem from err
            raise
        init_loc = self._init_loc().detach()
        dim = self.latent_dim
        kind = resolve_affine(self.affine_kind, dim)
        if stored_under(self._pyro_name):  # the values come from the param store
            info = {"method": "param store", "reason": "loaded from Pyro's param store"}
            start = GaussianStart(init_loc, None, self.init_scale, info)
        else:
            start = gaussian_start(
                LogJoint(self, raw_model, args, kwargs),
                init_loc,
                self.init_scale,
                laplace=self.init == "laplace" and dim <= FULL_RANK_MAX_DIM,
                laplace_options=self.laplace_options,
                num_samples=self.init_elbo_samples,
            )
            if self.init == "laplace" and dim > FULL_RANK_MAX_DIM:
                start.info["reason"] = (
                    f"no Laplace start above D = {FULL_RANK_MAX_DIM} (D = {dim}: its D x D "
                    f"Hessian costs D model gradients and D^2 memory); started as init='loc'"
                )
        self.init_info = start.info
        precond = None if start.preconditioner is None else start.preconditioner.cpu()
        affine = final_affine(dim, kind, start.center.cpu(), precond, start.scale, self.rank)
        layers = [*self._couplings(dim), affine]
        self.transforms = nn.ModuleList(layers).to(dtype=init_loc.dtype, device=init_loc.device)
        if self.base == "studentt":
            tails = StudentTBase(dim, self.df)
            self.student_t = tails.to(dtype=init_loc.dtype, device=init_loc.device)
        self.register_buffer("_base_loc", torch.zeros_like(init_loc))
        self.register_buffer("_base_scale", torch.ones_like(init_loc))

    def _couplings(self, dim: int) -> list[nn.Module]:
        """The ``depth`` flow steps (none for ``D = 1``), at the identity; a permutation
        alternates the halves itself (see ``half_swapping_permutation`` in
        :mod:`pyro_flows_ext.transforms.linear`)."""
        return coupling_steps(
            dim, self.depth, self._coupling, self._mixing, alternate=self.mixing == "lu"
        )

    context_dim = 0
    """The size of the context the couplings' networks see (none here; the amortised guide
    sets it)."""

    @property
    def _network(self) -> NetworkFactory:
        """The couplings' zero-initialised damped MLPs."""
        return damped_network(self.hidden_dims, self.lr_scale)

    def _coupling(self, part: Partition, parity: int) -> nn.Module:
        return make_coupling(
            self.coupling, part.event_shape, mask=part, network=self._network,
            context_dim=self.context_dim,
        )  # fmt: skip

    def _mixing(self) -> list[nn.Module]:
        dim = self.latent_dim
        layers: list[nn.Module] = [
            damp_parameters_(InvertibleLinear(dim), self.lr_scale)
            if self.mixing == "lu"
            else PermuteTransform(dim)
        ]
        if self.actnorm:
            layers.append(damp_parameters_(ActNorm(dim, data_init=False), self.lr_scale))
        return layers

    # ---------------------------------------------------------------- posterior ---------
    @property
    def affine(self) -> LowerAffine | LowRankAffine:
        """The final affine layer; ``guide.affine.loc`` is its mean and, for a
        :class:`~pyro_flows_ext.transforms.LowerAffine`, ``.scale_tril`` its Cholesky factor
        (the whole guide's when the couplings are at the identity)."""
        self._require_setup()
        layer = self.transforms[-1]
        assert isinstance(layer, LowerAffine | LowRankAffine)
        return layer

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call the guide or "
                f"guide.initialize(*model_args) first"
            )

    def get_base_dist(self) -> dist.TorchDistribution:
        if self.student_t is not None:
            return self.student_t()
        return dist.Normal(self._base_loc, self._base_scale).to_event(1)

    def _flow(self, *args: Any, **kwargs: Any) -> list[Transform]:
        """The transforms from the base to the latent vector for the model's arguments (the
        same for all arguments here; a conditional guide conditions them), after reading
        any values loaded into Pyro's param store since the last call."""
        self._require_setup()
        sync_param_store(self)
        return self._layers(*args, **kwargs)

    def _layers(self, *args: Any, **kwargs: Any) -> list[Transform]:
        """The transforms for the model's arguments (a conditional guide conditions them)."""
        return [cast(Transform, t) for t in self.transforms]

    def get_transform(self, *args: Any, **kwargs: Any) -> ComposeTransform:
        return ComposeTransform(self._flow(*args, **kwargs))

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        """The flow over the unconstrained latent vector; wrapped in
        :class:`~pyro_flows_ext.infer.stl.StickingTheLanding` when ``stl`` is set."""
        flow = self._flow(*args, **kwargs)
        posterior = dist.TransformedDistribution(self.get_base_dist(), flow)
        return StickingTheLanding(posterior) if self.stl else posterior
