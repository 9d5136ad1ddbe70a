"""NeuTra HMC: exact MCMC in the space a fitted flow guide whitens (Hoffman et al. 2019).

A fitted ``AutoContinuous`` guide :math:`q = T_\\# \\mathcal N(0, I)` maps base noise
:math:`z` to the unconstrained latent vector :math:`u = T(z)`. NUTS then samples

.. math::

    \\pi(z) \\propto p\\big(x, c(T(z))\\big)\\,
    \\big|\\det \\partial_u c(u)\\big|\\,\\big|\\det \\partial_z T(z)\\big|,

with :math:`c` the constraining bijections of the sites, and every draw is mapped back,
:math:`\\theta = c(T(z))`. The draws are exact (the Metropolis step corrects any mismatch
between :math:`q` and the posterior); the guide only changes the geometry NUTS sees: where
:math:`q` matches the posterior, :math:`\\pi` is the standard normal and one step size fits
everywhere. Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` does the change of variables;
:func:`neutra_mcmc` adds the bookkeeping a user needs to judge the run (gradient
evaluations per draw, divergences, step size, time) and ArviZ output.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.reparam import NeuTraReparam
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import ComposeTransform, Transform

from pyro_flows_ext.checks import check_bool, positive_float, positive_int
from pyro_flows_ext.infer.traces import vectorised_or_looped

__all__ = ["NeuTraDraws", "neutra_mcmc"]


@dataclass
class NeuTraDraws:
    """MCMC draws from :func:`neutra_mcmc`, mapped back to the model's sites.

    Attributes:
        samples: every latent and ``pyro.deterministic`` site in the constrained space,
            ``name -> (num_chains, num_samples, *site_shape)``.
        latent: the chains in the whitened space, ``(num_chains, num_samples, D)``
            (``None`` for plain NUTS).
        num_steps: leapfrog steps (gradient evaluations) behind each draw,
            ``(num_chains, num_samples)``.
        diverging: whether each draw's trajectory diverged, ``(num_chains, num_samples)``.
        step_size: the adapted step size of each chain.
        warmup_num_steps: gradient evaluations during the warm-up of all chains.
        seconds: wall-clock seconds of warm-up and sampling (mapping back excluded).
    """

    samples: dict[str, Tensor]
    latent: Tensor | None
    num_steps: Tensor
    diverging: Tensor
    step_size: list[float] = field(default_factory=list)
    warmup_num_steps: int = 0
    seconds: float = 0.0

    @property
    def num_divergences(self) -> int:
        """Divergent transitions after warm-up, all chains."""
        return int(self.diverging.sum())

    @property
    def gradient_evaluations(self) -> int:
        """Gradient evaluations after warm-up, all chains."""
        return int(self.num_steps.sum())

    def to_inference_data(self) -> Any:
        """The draws as ArviZ ``InferenceData``: ``posterior`` (every site) and
        ``sample_stats`` (``diverging``, ``n_steps``, ``step_size``), so that
        ``az.summary``/``az.ess`` and ArviZ's divergence plots read them as usual."""
        import arviz as az

        chains, draws = self.num_steps.shape
        stats = {
            "diverging": self.diverging.cpu().numpy(),
            "n_steps": self.num_steps.cpu().numpy(),
            "step_size": torch.tensor(self.step_size)[:, None].expand(chains, draws).numpy(),
        }
        posterior = {k: v.detach().cpu().numpy() for k, v in self.samples.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
            return az.from_dict(
                posterior=posterior,
                sample_stats=stats,
                attrs={"inference_library": "pyro", "sampler": "NUTS (NeuTra)"},
            )


class _OnePass(Transform):
    """``T`` whose ``log_abs_det_jacobian(z, T(z))`` right after ``T(z)`` costs nothing.

    ``ComposeTransform.log_abs_det_jacobian`` recomputes the intermediate values, and a
    coupling's cache serves a forward call only from a preceding inverse, so
    ``NeuTraReparam`` would run the flow twice per gradient. This walks the parts once,
    keeping the log-det with the exact ``(z, x)`` pair it belongs to (any other pair is
    recomputed); a fresh wrapper is made for every execution of the model."""

    def __init__(self, flow: Transform) -> None:
        self.flow = flow
        self.bijective = True
        self.domain, self.codomain = flow.domain, flow.codomain
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        super().__init__(cache_size=0)

    def _call(self, z: Tensor) -> Tensor:
        parts = self.flow.parts if isinstance(self.flow, ComposeTransform) else [self.flow]
        x, log_det = z, z.new_zeros(())
        for part in parts:
            y = part(x)
            ld = part.log_abs_det_jacobian(x, y)
            extra = self.flow.domain.event_dim - part.domain.event_dim
            log_det = log_det + (ld.flatten(ld.dim() - extra).sum(-1) if extra > 0 else ld)
            x = y
        self._last = (z, x, log_det)
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        return self.flow.inv(x)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        return self.flow.log_abs_det_jacobian(x, y)


class _OnePassNeuTra(NeuTraReparam):
    """Pyro's ``NeuTraReparam`` with the guide's flow wrapped in :class:`_OnePass`."""

    @property
    def transform(self) -> Transform | None:
        return self._one_pass

    @transform.setter
    def transform(self, flow: Transform | None) -> None:
        self._one_pass = None if flow is None else _OnePass(flow)


class _Counted:
    """The model, counting its executions: one per potential-and-gradient evaluation."""

    def __init__(self, model: Callable[..., Any]) -> None:
        self.model, self.calls = model, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)


def _check(guide: Any, settings: dict[str, Any]) -> None:
    """Validate the arguments of :func:`neutra_mcmc` before any work."""
    if guide is not None and not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"guide must be a fitted AutoContinuous guide (e.g. AutoCouplingFlow) or None, "
            f"got {type(guide).__name__}"
        )
    if guide is not None and guide.prototype_trace is None:
        raise ValueError(
            f"guide {type(guide).__name__} has no parameters yet: fit it (or call "
            f"guide(*args)) before neutra_mcmc"
        )
    for name in ("num_samples", "num_chains", "max_tree_depth"):
        positive_int(name, settings[name])
    positive_int("warmup_steps", settings["warmup_steps"], minimum=0)
    accept = positive_float("target_accept_prob", settings["target_accept_prob"])
    if accept >= 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {accept!r}")
    check_bool("progress", settings["progress"])
    if settings["seed"] is not None:
        positive_int("seed", settings["seed"], minimum=0)


def _chain(model: Any, args: tuple, kwargs: dict, settings: dict[str, Any]) -> dict[str, Any]:
    """One NUTS chain of ``model`` (a ``_Counted``): its raw draws and bookkeeping."""
    marks: list[int] = []
    kernel = NUTS(
        model,
        max_tree_depth=settings["max_tree_depth"],
        target_accept_prob=settings["target_accept_prob"],
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings["num_samples"],
        warmup_steps=settings["warmup_steps"],
        disable_progbar=not settings["progress"],
        hook_fn=lambda *_: marks.append(model.calls),
    )
    before = model.calls
    mcmc.run(*args, **kwargs)
    warmup = settings["warmup_steps"]
    start = marks[warmup - 1] if warmup else before
    diverging = torch.zeros(settings["num_samples"], dtype=torch.bool)
    diverging[mcmc.diagnostics()["divergences"]["chain 0"]] = True
    return {
        "draws": mcmc.get_samples(),
        "num_steps": torch.tensor([start, *marks[warmup:]]).diff(),
        "diverging": diverging,
        "step_size": float(kernel.step_size),
        "warmup": start - before,
    }


def _check_fits(
    guide: AutoContinuous, model: Callable[..., Any], args: tuple, kwargs: dict
) -> None:
    """``ValueError`` unless the guide's latent sites are the model's (names and shapes): a
    guide fitted to another model would leave the model's sites to plain NUTS, and its raw
    draws would be reported as the whitened chains."""
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    assert guide.prototype_trace is not None
    ours, theirs = (
        {
            name: tuple(torch.as_tensor(site["value"]).shape)
            for name, site in t.iter_stochastic_nodes()
            if not site_is_subsample(site)
        }
        for t in (trace, guide.prototype_trace)
    )
    if ours == theirs:
        return
    problems = []
    if set(theirs) - set(ours):
        problems.append(f"the guide has {sorted(set(theirs) - set(ours))}, the model not")
    if set(ours) - set(theirs):
        problems.append(f"the model has {sorted(set(ours) - set(theirs))}, the guide not")
    problems += [
        f"{n!r} has shape {theirs[n]} in the guide, {ours[n]} in the model"
        for n in sorted(set(ours) & set(theirs))
        if ours[n] != theirs[n]
    ]
    raise ValueError(
        f"the guide was fitted to another model ({'; '.join(problems)}): neutra_mcmc needs the "
        f"guide of this model, fitted with the same arguments"
    )


def _site_shapes(model: Callable[..., Any], args: tuple, kwargs: dict) -> dict:
    """``name -> shape`` of the latent and ``pyro.deterministic`` sites to report."""
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    shapes = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not site["is_observed"] or (site["infer"] or {}).get("_deterministic"):
            shapes[name] = torch.as_tensor(site["value"]).shape
    return shapes


def _map_back(
    model: Callable[..., Any], draws: dict[str, Tensor], shapes: dict, args: tuple, kwargs: dict
) -> dict[str, Tensor]:
    """Replay ``model`` (the reparameterised one for NeuTra) on the raw draws ``(N, ...)``:
    every site of ``shapes`` as ``(N, *shape)``; vectorised when the model allows."""
    num = next(iter(draws.values())).shape[0]

    def replay(parallel: bool) -> dict[str, Tensor]:
        predictive = Predictive(
            model, posterior_samples=draws, return_sites=list(shapes), parallel=parallel
        )
        out = predictive(*args, **kwargs)
        return {k: out[k].reshape((num, *shapes[k])) for k in shapes}

    with torch.no_grad():
        out, _ = vectorised_or_looped(
            lambda: replay(True), lambda: replay(False), label="neutra_mcmc"
        )
    return out


def neutra_mcmc(
    model: Callable[..., Any],
    guide: AutoContinuous | None,
    *args: Any,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    num_chains: int = 1,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    seed: int | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> NeuTraDraws:
    """Run NUTS in the space whitened by a fitted guide and map the draws back to the sites.

    The model runs under :class:`~pyro.infer.reparam.NeuTraReparam` (module docstring); the
    chains run one after the other (no multiprocessing), each with its own warm-up (step
    size and a diagonal mass matrix adapted), then the whitened draws :math:`z` are mapped
    through :math:`c \\circ T` by replaying the model (so ``pyro.deterministic`` sites come
    back too).

    A guide pays when it has learned the posterior's *shape*, its tails included: NUTS in the
    whitened space needs one step size for the whole posterior. The recommended path is
    ``AutoCouplingFlow(model, base="normal")`` (the default Student-t base diverged more often
    in ``benchmarks/neutra.py``) fitted by
    :func:`~pyro_flows_ext.infer.fit_guide` for 3,000 steps (``steps=3000``; on a 10-d funnel,
    1,500 steps left the guide's neck half as wide as the posterior's and NeuTra little better
    than plain NUTS), then two or more chains here. Check the run as any MCMC run (r-hat,
    divergences) and the guide through the whitened chains: :attr:`NeuTraDraws.latent` should
    look like standard normal draws.

    Args:
        model: the Pyro model the guide was fitted to (static structure, continuous latents).
        guide: a fitted :class:`~pyro.infer.autoguide.AutoContinuous` guide; ``None`` runs
            plain NUTS on the model with the same bookkeeping (for comparisons).
        *args, **kwargs: the model's arguments.
        num_samples, warmup_steps: draws kept and warm-up iterations, per chain.
        num_chains: chains, run sequentially.
        max_tree_depth: NUTS's tree depth limit (at most ``2**max_tree_depth`` gradient
            evaluations per draw).
        target_accept_prob: the step-size adaptation's target, in ``(0, 1)``.
        seed: when given, ``pyro.set_rng_seed(seed + chain)`` before each chain.
        progress: show Pyro's progress bar.

    Returns:
        :class:`NeuTraDraws`; ``.to_inference_data()`` gives ArviZ ``InferenceData``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro_flows_ext.infer import AutoCouplingFlow
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 0.5))
        >>> guide = AutoCouplingFlow(model, depth=0).initialize()
        >>> draws = neutra_mcmc(model, guide, num_samples=100, warmup_steps=50, seed=0)
        >>> draws.samples["s"].shape, bool((draws.samples["s"] > 0).all())
        (torch.Size([1, 100]), True)
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    settings = dict(
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        max_tree_depth=max_tree_depth,
        target_accept_prob=target_accept_prob,
        seed=seed,
        progress=progress,
    )
    _check(guide, settings)
    if guide is not None:
        _check_fits(guide, model, args, kwargs)
    if guide is not None and not hasattr(guide, "plates"):
        with poutine.block(), torch.no_grad():
            guide(*args, **kwargs)  # an initialised, never-called guide: create its plates
    target = model if guide is None else _OnePassNeuTra(guide).reparam(model)
    counted = _Counted(target)
    chains, start = [], time.perf_counter()
    for chain in range(num_chains):
        if seed is not None:
            pyro.set_rng_seed(seed + chain)
        chains.append(_chain(counted, args, kwargs, settings))
    seconds = time.perf_counter() - start
    raw = {k: torch.cat([c["draws"][k] for c in chains]) for k in chains[0]["draws"]}
    samples = _map_back(target, raw, _site_shapes(model, args, kwargs), args, kwargs)
    latent = None if guide is None else next(iter(raw.values()))
    return NeuTraDraws(
        samples={k: v.reshape((num_chains, num_samples, *v.shape[1:])) for k, v in samples.items()},
        latent=None if latent is None else latent.reshape(num_chains, num_samples, -1),
        num_steps=torch.stack([c["num_steps"] for c in chains]),
        diverging=torch.stack([c["diverging"] for c in chains]),
        step_size=[c["step_size"] for c in chains],
        warmup_num_steps=sum(c["warmup"] for c in chains),
        seconds=seconds,
    )
