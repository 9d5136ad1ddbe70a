"""ArviZ diagnostics of a guide against its model: PSIS :math:`\\hat k`, importance
resampling and ``InferenceData`` (see :mod:`pyro_flows_ext.infer.diagnostics.importance` for
the weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor

from pyro_flows_ext.checks import check_bool, positive_int
from pyro_flows_ext.infer.diagnostics.importance import (
    ImportanceDraws,
    _value,
    importance_draws,
)
from pyro_flows_ext.infer.diagnostics.pareto import ParetoK, _arviz, resample_index

__all__ = ["importance_resample", "psis_khat", "to_inference_data"]


def _posterior_predictive(
    model: Callable, draws: ImportanceDraws, args: tuple, kwargs: dict
) -> dict[str, Tensor]:
    """One replicate of every observed site per draw, from the model at the guide's draws."""
    names = list(draws.observed)
    num = len(draws.log_p)
    if draws._replay is not None:
        return draws._replay(
            poutine.uncondition(model), {n: draws.observed[n].shape for n in names}
        )
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in range(num):
        data = {k: v[s] for k, v in draws.latents.items()}
        with poutine.block():
            tr = poutine.trace(poutine.uncondition(poutine.condition(model, data=data)))
            trace = tr.get_trace(*args, **kwargs)
        for n in names:
            out[n].append(_value(trace.nodes[n]))
    return {n: torch.stack(v) for n, v in out.items()}


# ------------------------------------------------------------------------------ public ----
def psis_khat(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000, **kwargs: Any
) -> ParetoK:
    """Pareto :math:`\\hat k` of the importance weights :math:`p(x, z) / q(z)` from
    ``num_samples`` guide draws, by ArviZ's ``psislw``, with its sample-size dependent
    threshold (Vehtari et al. 2024), its Monte Carlo spread (bootstrap over the draws) and
    the PSIS effective sample size (:class:`~pyro_flows_ext.infer.ParetoK`); ``str()`` of the
    result reads it in words.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> psis_khat(model, guide, num_samples=500).verdict
        'good'
    """
    return importance_draws(model, guide, *args, num_samples=num_samples, **kwargs).psis()[1]


def importance_resample(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    num_draws: int | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Guide draws resampled (with replacement) by their PSIS-smoothed importance weights:
    ``name -> (num_draws, *shape)`` for the latent and deterministic sites. With a
    :math:`\\hat k` below 0.7 these are closer to the posterior than the guide's own draws.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.0, 1.5))
        >>> draws = importance_resample(model, guide, num_samples=4000)
        >>> bool(abs(draws["x"].mean() - 1.0) < 0.15)
        True
    """
    if num_draws is not None:
        positive_int("num_draws", num_draws)
    d = importance_draws(model, guide, *args, num_samples=num_samples, **kwargs)
    smoothed, _ = d.psis()
    index = resample_index(smoothed, num_draws or num_samples)
    sites = {**d.latents, **d.deterministic}
    return {k: v[index.to(v.device)] for k, v in sites.items()}


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    posterior_predictive: bool = True,
    **kwargs: Any,
) -> Any:
    """Guide draws as ArviZ ``InferenceData`` (one chain of ``num_samples`` draws).

    Groups:

    * ``posterior``: every latent site in the constrained space, with its own name and shape,
      and every ``pyro.deterministic`` site; axes indexed by a plate are named after it;
    * ``sample_stats``: ``log_weight`` (:math:`\\log p(x,z) - \\log q(z)`), ``lp``
      (:math:`\\log p(x, z)`), ``log_q`` and ``psis_log_weight`` (smoothed, normalised); its
      attributes (and the dataset's) hold the :class:`~pyro_flows_ext.infer.ParetoK`:
      ``pareto_k``, ``pareto_k_interval`` (bootstrap quartiles), ``pareto_k_threshold``,
      ``pareto_k_verdict`` and ``importance_ess``;
    * ``observed_data`` and ``posterior_predictive`` (one replicate per draw) when the model
      has observed sites (skip the replicates with ``posterior_predictive=False``).

    Reading ``az.summary(idata)``: the draws are independent draws of the guide, so its
    ``ess_bulk``/``ess_tail`` (close to ``num_samples``) and ``mcse_*`` columns are about
    expectations under the guide. How many posterior draws they are worth is the PSIS
    effective sample size ``idata.sample_stats.attrs["importance_ess"]`` (one number for all
    quantities; meaningful while ``pareto_k`` is below ``pareto_k_threshold``); expectations
    corrected towards the posterior weight the draws by ``exp(psis_log_weight)``, or use
    :func:`importance_resample`.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> def guide(y):
        ...     pyro.sample("mu", dist.Normal(0.0, 0.5))
        >>> idata = to_inference_data(model, guide, torch.zeros(3), num_samples=50)
        >>> idata.posterior["mu"].shape, idata.posterior_predictive["y"].dims
        ((1, 50), ('chain', 'draw', 'data'))
    """
    check_bool("posterior_predictive", posterior_predictive)
    d = importance_draws(model, guide, *args, num_samples=num_samples, **kwargs)
    az = _arviz()
    smoothed, khat = d.psis()
    groups = _groups(d, smoothed)
    if d.observed and posterior_predictive:
        pp = _posterior_predictive(model, d, args, kwargs)
        groups["posterior_predictive"] = {k: _chain(v) for k, v in pp.items()}
    psis = {
        "pareto_k": khat.khat,
        "pareto_k_interval": list(khat.interval),
        "pareto_k_threshold": khat.threshold,
        "pareto_k_verdict": khat.verdict,
        "importance_ess": khat.ess,
    }
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "guide": type(guide).__name__,
        **psis,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        idata = az.from_dict(**groups, dims=d.dims, attrs=attrs)
    idata.sample_stats.attrs.update(psis)
    return idata


def _chain(t: Tensor) -> np.ndarray:
    """Draws ``(S, ...)`` as one chain ``(1, S, ...)``."""
    return t.detach().cpu().numpy()[None]


def _groups(d: ImportanceDraws, smoothed: np.ndarray) -> dict[str, Any]:
    """The ``posterior``, ``sample_stats`` and (with observations) ``observed_data`` groups."""
    posterior = {k: _chain(v) for k, v in {**d.latents, **d.deterministic}.items()}
    stats = {
        "log_weight": _chain(d.log_weights),
        "lp": _chain(d.log_p),
        "log_q": _chain(d.log_q),
        "psis_log_weight": smoothed[None],
    }
    groups: dict[str, Any] = {"posterior": posterior, "sample_stats": stats}
    if d.observed:
        groups["observed_data"] = {k: v.detach().cpu().numpy() for k, v in d.observed.items()}
    return groups
