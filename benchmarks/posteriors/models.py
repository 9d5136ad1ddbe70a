"""Pyro versions of posteriordb posteriors, their reference draws, and a Stein-identity check.

Every model reproduces the *target density* of the posteriordb Stan program, up to an additive
constant, on the same constrained parameters: the same priors (flat/improper ones included),
the same likelihood and the same constraints. Improper flat priors are written as a proper
distribution with the right support masked out with ``.mask(False)``: the site then adds
nothing to the log density, exactly like a Stan parameter with no prior statement, while
initialisation strategies that call ``.sample()`` (``init_to_feasible``, ``init_to_uniform``)
still work. (``dist.ImproperUniform`` has the same density but cannot be sampled, which breaks
``AutoNormal``'s and ``initialize_model``'s default initialisation.)

Conventions shared by all models, so that they run under
``Trace_ELBO(vectorize_particles=True)`` and under batched evaluation:

* a model takes the Stan data as keyword arguments (reals as tensors of one float dtype, sizes as
  ``int``), and infers its dtype from the data;
* vector parameters are single sites with ``.to_event(1)``; a scalar latent has shape
  ``batch`` and a vector latent ``batch + (d,)``, where ``batch`` is any leading particle
  shape; scalars are combined with vectors as ``x[..., None]``;
* observations are one site ``"y"`` with ``.to_event(1)`` (no plates), so the model has
  ``max_plate_nesting == 0`` and a particle plate can take any leading dim;
* quantities that the reference draws hold but which are not parameters are recorded with
  ``pyro.deterministic`` (``theta`` of the non-centred eight schools, ``f`` of the GP Poisson
  regression, ``beta1`` of GARCH(1,1)).

Data live in a posteriordb folder (see :func:`posteriordb_root`), one sub-folder per posterior
with ``data.json``, ``reference_draws.json`` and ``info.json``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive
from pyro.infer.mcmc.util import initialize_model
from torch import Tensor
from torch.distributions import transform_to

__all__ = [
    "ENV_VAR",
    "NAMES",
    "POSTERIORS",
    "STEIN_THRESHOLD",
    "Posterior",
    "arK",
    "arma11",
    "blr",
    "diamonds",
    "earn_height",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "garch11",
    "gp_pois_regr",
    "gp_regr",
    "kidscore_interaction",
    "kilpisjarvi",
    "latent_dim",
    "load",
    "load_data",
    "load_reference",
    "logearn_interaction",
    "logmesquite_logvas",
    "nes",
    "posteriordb_root",
    "sample_quantities",
    "stein_check",
    "stein_zscores",
]

ENV_VAR = "PYRO_FLOWS_POSTERIORDB"
"""Environment variable naming the posteriordb data folder."""

STEIN_THRESHOLD = 5.0
"""Largest acceptable Stein z-score (see :func:`stein_zscores`)."""

# Stan data fields that are sizes or flags (kept as ``int``); every other number becomes a tensor.
_INT_FIELDS = frozenset({"N", "J", "K", "T", "D", "N_t", "prior_only"})


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _flat(zero: Tensor, support: constraints.Constraint, shape: tuple[int, ...] = ()) -> Any:
    """Improper flat prior on ``support`` (zero log density), sampleable for initialisation.

    ``zero`` is a 0-d tensor fixing dtype and device. Only ``real`` and ``positive`` supports are
    needed by the posteriordb programs here.
    """
    if support is constraints.real:
        base = dist.Normal(zero, 1.0)
    elif support is constraints.positive:
        base = dist.LogNormal(zero, 1.0)
    else:  # pragma: no cover - guarded by the callers
        raise ValueError(f"no flat prior for support {support}")
    if shape:
        base = base.expand(shape).to_event(len(shape))
    return base.mask(False)


def _scalar(x: Tensor) -> Tensor:
    """Add a trailing axis to a (possibly batched) scalar parameter to broadcast with vectors."""
    return x[..., None]


def _se_cholesky(x: Tensor, alpha: Tensor, rho: Tensor, jitter: Tensor | float) -> Tensor:
    """Cholesky factor of Stan's ``gp_exp_quad_cov(x, alpha, rho) + diag(jitter)``.

    ``k(x, x') = alpha^2 exp(-(x - x')^2 / (2 rho^2))``; ``alpha``, ``rho`` and ``jitter`` may
    carry leading batch dims, the result has shape ``batch + (N, N)``.
    """
    sqdist = (x[:, None] - x[None, :]) ** 2
    a2 = alpha[..., None, None] ** 2
    r2 = rho[..., None, None] ** 2
    cov = a2 * torch.exp(-0.5 * sqdist / r2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    jit = jitter[..., None, None] if isinstance(jitter, Tensor) else jitter
    return torch.linalg.cholesky(cov + jit * eye)


def _regression(beta: Tensor, X: Tensor) -> Tensor:
    """``X @ beta`` for ``beta`` of shape ``batch + (K,)`` and ``X`` of shape ``(N, K)``."""
    return beta @ X.T


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def eight_schools_noncentered(J: int, y: Tensor, sigma: Tensor) -> None:
    """Non-centred eight schools (posteriordb ``eight_schools_noncentered``).

    Stan::

        theta_trans ~ normal(0, 1);      // vector[J]
        mu ~ normal(0, 5);
        tau ~ cauchy(0, 5);              // real<lower=0>
        theta = theta_trans * tau + mu;  // transformed parameter
        y ~ normal(theta, sigma);
    """
    zero = y.new_zeros(())
    theta_trans = pyro.sample("theta_trans", dist.Normal(zero, 1.0).expand([J]).to_event(1))
    mu = pyro.sample("mu", dist.Normal(zero, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
    theta = pyro.deterministic("theta", _scalar(mu) + _scalar(tau) * theta_trans, event_dim=1)
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_centered(J: int, y: Tensor, sigma: Tensor) -> None:
    """Centred eight schools (posteriordb ``eight_schools_centered``): a funnel.

    Stan::

        mu ~ normal(0, 5);
        tau ~ cauchy(0, 5);              // real<lower=0>
        theta ~ normal(mu, tau);         // vector[J]
        y ~ normal(theta, sigma);
    """
    zero = y.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
    theta = pyro.sample(
        "theta", dist.Normal(_scalar(mu), _scalar(tau)).expand(mu.shape + (J,)).to_event(1)
    )
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def arK(K: int, T: int, y: Tensor) -> None:
    """AR(K) time series (posteriordb ``arK``; the data have K = 5, T = 200).

    Stan::

        alpha ~ normal(0, 10);
        beta ~ normal(0, 10);            // real beta[K]
        sigma ~ cauchy(0, 2.5);          // real<lower=0>
        for (t in (K+1):T)
          y[t] ~ normal(alpha + sum_k beta[k] * y[t-k], sigma);

    The mean depends on the data only, so it is a matrix product with the lag matrix.
    """
    zero = y.new_zeros(())
    alpha = pyro.sample("alpha", dist.Normal(zero, 10.0))
    beta = pyro.sample("beta", dist.Normal(zero, 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(zero + 2.5))
    # lags[i, k] = y[K + i - (k + 1)] (0-based), for the targets y[K:]
    lags = torch.stack([y[K - k - 1 : T - k - 1] for k in range(K)], dim=-1)
    loc = _scalar(alpha) + _regression(beta, lags)
    pyro.sample("y", dist.Normal(loc, _scalar(sigma)).to_event(1), obs=y[K:])


def arma11(T: int, y: Tensor) -> None:
    """ARMA(1, 1) time series (posteriordb ``arma11``), with ``err[0] = 0``.

    Stan::

        nu[1] = mu + phi * mu;  err[1] = y[1] - nu[1];
        for (t in 2:T) { nu[t] = mu + phi * y[t-1] + theta * err[t-1];  err[t] = y[t] - nu[t]; }
        mu ~ normal(0, 10);  phi ~ normal(0, 2);  theta ~ normal(0, 2);   // all real
        sigma ~ cauchy(0, 2.5);                                            // real<lower=0>
        err ~ normal(0, sigma);

    ``err ~ normal(0, sigma)`` equals ``y ~ normal(nu, sigma)`` (unit-triangular change of
    variables), which is what is observed here.
    """
    zero = y.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, 10.0))
    phi = pyro.sample("phi", dist.Normal(zero, 2.0))
    theta = pyro.sample("theta", dist.Normal(zero, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(zero + 2.5))
    base = _scalar(mu) + _scalar(phi) * y[:-1]  # mu + phi * y[t-1], t = 2..T
    nu_t = mu + phi * mu
    nus = [nu_t]
    for t in range(1, T):
        nu_t = base[..., t - 1] + theta * (y[t - 1] - nu_t)
        nus.append(nu_t)
    nu = torch.stack(nus, dim=-1)
    pyro.sample("y", dist.Normal(nu, _scalar(sigma)).to_event(1), obs=y)


def garch11(T: int, y: Tensor, sigma1: Tensor) -> None:
    """GARCH(1, 1) time series (posteriordb ``garch11``); all priors flat.

    Stan::

        real mu;  real<lower=0> alpha0;  real<lower=0, upper=1> alpha1;
        real<lower=0, upper=(1 - alpha1)> beta1;
        sigma[1] = sigma1;
        for (t in 2:T)
          sigma[t] = sqrt(alpha0 + alpha1 * square(y[t-1] - mu) + beta1 * square(sigma[t-1]));
        y ~ normal(mu, sigma);

    ``beta1`` is sampled as ``beta1_unit`` in (0, 1) with ``beta1 = (1 - alpha1) * beta1_unit``
    (a ``pyro.deterministic`` site); the factor ``beta1_jacobian = log(1 - alpha1)`` makes the
    density flat in ``beta1`` given ``alpha1``, so the target on (mu, alpha0, alpha1, beta1) is
    Stan's exactly (Stan's own unconstraining transform for ``beta1`` is the same scaled logit).
    """
    zero = y.new_zeros(())
    mu = pyro.sample("mu", _flat(zero, constraints.real))
    alpha0 = pyro.sample("alpha0", _flat(zero, constraints.positive))
    alpha1 = pyro.sample("alpha1", dist.Uniform(zero, zero + 1.0))  # log density 0: flat
    beta1_unit = pyro.sample("beta1_unit", dist.Uniform(zero, zero + 1.0))
    beta1 = pyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)
    pyro.factor("beta1_jacobian", torch.log1p(-alpha1))
    sq_resid = (y[:-1] - _scalar(mu)) ** 2
    var_t = torch.ones_like(mu) * sigma1**2
    variances = [var_t]
    for t in range(1, T):
        var_t = alpha0 + alpha1 * sq_resid[..., t - 1] + beta1 * var_t
        variances.append(var_t)
    scale = torch.stack(variances, dim=-1).sqrt()
    pyro.sample("y", dist.Normal(_scalar(mu), scale).to_event(1), obs=y)


def diamonds(K: int, X: Tensor, Y: Tensor, prior_only: int = 0) -> None:
    """brms linear regression of log price on diamond features (posteriordb ``diamonds``).

    Stan (brms)::

        Xc = X[, 2:K] with every column centred;       // transformed data
        vector[K-1] b;  real Intercept;  real<lower=0> sigma;
        target += normal_id_glm_lpdf(Y | Xc, Intercept, b, sigma);   // unless prior_only
        target += normal_lpdf(b | 0, 1);
        target += student_t_lpdf(Intercept | 3, 8, 10);
        target += student_t_lpdf(sigma | 3, 0, 10) - student_t_lccdf(0 | 3, 0, 10);

    The sigma prior is a half Student-t, written as a folded Student-t.
    """
    zero = Y.new_zeros(())
    Xc = X[:, 1:K] - X[:, 1:K].mean(dim=0)
    b = pyro.sample("b", dist.Normal(zero, 1.0).expand([K - 1]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(zero + 3.0, zero + 8.0, zero + 10.0))
    sigma = pyro.sample(
        "sigma", dist.FoldedDistribution(dist.StudentT(zero + 3.0, zero, zero + 10.0))
    )
    if not prior_only:
        loc = _scalar(intercept) + _regression(b, Xc)
        pyro.sample("y", dist.Normal(loc, _scalar(sigma)).to_event(1), obs=Y)


def kilpisjarvi(
    x: Tensor,
    y: Tensor,
    pmualpha: Tensor,
    psalpha: Tensor,
    pmubeta: Tensor,
    psbeta: Tensor,
) -> None:
    """Linear trend of summer temperature on year (posteriordb ``kilpisjarvi``).

    Stan::

        alpha ~ normal(pmualpha, psalpha);
        beta ~ normal(pmubeta, psbeta);
        // real<lower=0> sigma: flat
        y ~ normal(alpha + beta * x, sigma);
    """
    zero = y.new_zeros(())
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", _flat(zero, constraints.positive))
    loc = _scalar(alpha) + _scalar(beta) * x
    pyro.sample("y", dist.Normal(loc, _scalar(sigma)).to_event(1), obs=y)


def gp_pois_regr(N: int, x: Tensor, k: Tensor) -> None:
    """Poisson regression on a latent GP, non-centred (posteriordb ``gp_pois_regr``).

    Stan::

        real<lower=0> rho;  real<lower=0> alpha;  vector[N] f_tilde;
        f = cholesky_decompose(gp_exp_quad_cov(x, alpha, rho) + diag(1e-10)) * f_tilde;
        rho ~ gamma(25, 4);
        alpha ~ normal(0, 2);
        f_tilde ~ normal(0, 1);
        k ~ poisson_log(f);

    Use float64: the 1e-10 jitter is below float32 resolution.
    """
    zero = x.new_zeros(())
    rho = pyro.sample("rho", dist.Gamma(zero + 25.0, zero + 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(zero + 2.0))
    f_tilde = pyro.sample("f_tilde", dist.Normal(zero, 1.0).expand([N]).to_event(1))
    chol = _se_cholesky(x, alpha, rho, 1e-10)
    f = pyro.deterministic("f", (chol @ f_tilde[..., None])[..., 0], event_dim=1)
    pyro.sample("y", dist.Poisson(f.exp()).to_event(1), obs=k)


def gp_regr(N: int, x: Tensor, y: Tensor) -> None:
    """GP regression with marginalised latent function (posteriordb ``gp_regr``).

    Stan::

        real<lower=0> rho;  real<lower=0> alpha;  real<lower=0> sigma;
        cov = gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(sigma, N));
        rho ~ gamma(25, 4);
        alpha ~ normal(0, 2);
        sigma ~ normal(0, 1);
        y ~ multi_normal_cholesky(rep_vector(0, N), cholesky_decompose(cov));

    Note that ``sigma`` is added to the diagonal as a variance, as in the Stan program.
    """
    zero = y.new_zeros(())
    rho = pyro.sample("rho", dist.Gamma(zero + 25.0, zero + 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(zero + 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))
    chol = _se_cholesky(x, alpha, rho, sigma)
    pyro.sample("y", dist.MultivariateNormal(y.new_zeros(N), scale_tril=chol), obs=y)


def blr(D: int, X: Tensor, y: Tensor) -> None:
    """Bayesian linear regression with vague priors (posteriordb ``blr``; sblrc and sblri).

    Stan::

        vector[D] beta;  real<lower=0> sigma;
        target += normal_lpdf(beta | 0, 10);
        target += normal_lpdf(sigma | 0, 10);
        target += normal_lpdf(y | X * beta, sigma);
    """
    zero = y.new_zeros(())
    beta = pyro.sample("beta", dist.Normal(zero, 10.0).expand([D]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 10.0))
    pyro.sample("y", dist.Normal(_regression(beta, X), _scalar(sigma)).to_event(1), obs=y)


def _flat_regression(X: Tensor, y: Tensor, sigma_prior: Any | None = None) -> None:
    """``y ~ normal(X * beta, sigma)`` with flat ``beta`` and ``sigma`` flat unless given."""
    zero = y.new_zeros(())
    beta = pyro.sample("beta", _flat(zero, constraints.real, (X.shape[-1],)))
    if sigma_prior is None:
        sigma_prior = _flat(zero, constraints.positive)
    sigma = pyro.sample("sigma", sigma_prior)
    pyro.sample("y", dist.Normal(_regression(beta, X), _scalar(sigma)).to_event(1), obs=y)


def earn_height(earn: Tensor, height: Tensor) -> None:
    """Earnings in dollars on height (posteriordb ``earn_height``); flat priors, badly scaled.

    Stan::

        vector[2] beta;  real<lower=0> sigma;   // no priors
        earn ~ normal(beta[1] + beta[2] * height, sigma);
    """
    X = torch.stack([torch.ones_like(height), height], dim=-1)
    _flat_regression(X, earn)


def logearn_interaction(earn: Tensor, height: Tensor, male: Tensor) -> None:
    """Log earnings on height, sex and their interaction (posteriordb ``logearn_interaction``).

    Stan::

        vector[4] beta;  real<lower=0> sigma;   // no priors
        log(earn) ~ normal(beta[1] + beta[2] * height + beta[3] * male
                           + beta[4] * height .* male, sigma);
    """
    X = torch.stack([torch.ones_like(height), height, male, height * male], dim=-1)
    _flat_regression(X, earn.log())


def kidscore_interaction(kid_score: Tensor, mom_hs: Tensor, mom_iq: Tensor) -> None:
    """Child test score on mother's schooling and IQ with interaction (``kidscore_interaction``).

    Stan::

        vector[4] beta;  real<lower=0> sigma;   // beta flat
        sigma ~ cauchy(0, 2.5);
        kid_score ~ normal(beta[1] + beta[2] * mom_hs + beta[3] * mom_iq
                           + beta[4] * mom_hs .* mom_iq, sigma);
    """
    zero = kid_score.new_zeros(())
    X = torch.stack([torch.ones_like(mom_iq), mom_hs, mom_iq, mom_hs * mom_iq], dim=-1)
    _flat_regression(X, kid_score, dist.HalfCauchy(zero + 2.5))


def logmesquite_logvas(
    weight: Tensor,
    diam1: Tensor,
    diam2: Tensor,
    canopy_height: Tensor,
    total_height: Tensor,
    density: Tensor,
    group: Tensor,
) -> None:
    """Log-log regression of mesquite bush weight (posteriordb ``logmesquite_logvas``).

    Stan::

        vector[7] beta;  real<lower=0> sigma;   // no priors
        log(weight) ~ normal(beta[1] + beta[2] * log(diam1 .* diam2 .* canopy_height)
                             + beta[3] * log(diam1 .* diam2) + beta[4] * log(diam1 ./ diam2)
                             + beta[5] * log(total_height) + beta[6] * log(density)
                             + beta[7] * group, sigma);
    """
    X = torch.stack(
        [
            torch.ones_like(weight),
            (diam1 * diam2 * canopy_height).log(),
            (diam1 * diam2).log(),
            (diam1 / diam2).log(),
            total_height.log(),
            density.log(),
            group,
        ],
        dim=-1,
    )
    _flat_regression(X, weight.log())


def nes(
    partyid7: Tensor,
    real_ideo: Tensor,
    race_adj: Tensor,
    age_discrete: Tensor,
    educ1: Tensor,
    gender: Tensor,
    income: Tensor,
) -> None:
    """Party identification regression, NES 2000 (posteriordb ``nes``); flat priors.

    Stan::

        age30_44 = age_discrete == 2;  age45_64 = age_discrete == 3;  age65up = age_discrete == 4;
        vector[9] beta;  real<lower=0> sigma;   // no priors
        partyid7 ~ normal(beta[1] + beta[2] * real_ideo + beta[3] * race_adj
                          + beta[4] * age30_44 + beta[5] * age45_64 + beta[6] * age65up
                          + beta[7] * educ1 + beta[8] * gender + beta[9] * income, sigma);
    """
    dtype = partyid7.dtype
    X = torch.stack(
        [
            torch.ones_like(partyid7),
            real_ideo,
            race_adj,
            (age_discrete == 2).to(dtype),
            (age_discrete == 3).to(dtype),
            (age_discrete == 4).to(dtype),
            educ1,
            gender,
            income,
        ],
        dim=-1,
    )
    _flat_regression(X, partyid7)


# --------------------------------------------------------------------------------------------
# reference quantities -> latent sample sites
# --------------------------------------------------------------------------------------------

LatentMap = Callable[[Mapping[str, Tensor], Mapping[str, Any]], dict[str, Tensor]]


def _theta_to_theta_trans(ref: Mapping[str, Tensor], data: Mapping[str, Any]) -> dict[str, Tensor]:
    """Non-centred eight schools: ``theta_trans = (theta - mu) / tau``."""
    mu, tau = ref["mu"], ref["tau"]
    return {"mu": mu, "tau": tau, "theta_trans": (ref["theta"] - _scalar(mu)) / _scalar(tau)}


def _beta1_to_unit(ref: Mapping[str, Tensor], data: Mapping[str, Any]) -> dict[str, Tensor]:
    """GARCH(1, 1): ``beta1_unit = beta1 / (1 - alpha1)``."""
    out = {k: ref[k] for k in ("mu", "alpha0", "alpha1")}
    out["beta1_unit"] = ref["beta1"] / (1.0 - ref["alpha1"])
    return out


def _f_to_f_tilde(ref: Mapping[str, Tensor], data: Mapping[str, Any]) -> dict[str, Tensor]:
    """GP Poisson regression: ``f_tilde = L(alpha, rho)^{-1} f``."""
    chol = _se_cholesky(data["x"], ref["alpha"], ref["rho"], 1e-10)
    f_tilde = torch.linalg.solve_triangular(chol, ref["f"][..., None], upper=False)[..., 0]
    return {"rho": ref["rho"], "alpha": ref["alpha"], "f_tilde": f_tilde}


def _identity(ref: Mapping[str, Tensor], data: Mapping[str, Any]) -> dict[str, Tensor]:
    """The reference draws hold the latent sites themselves."""
    return dict(ref)


# --------------------------------------------------------------------------------------------
# registry and loaders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    model: Callable[..., None]
    to_latent: LatentMap = _identity


_SPECS: dict[str, _Spec] = {
    "eight_schools-eight_schools_noncentered": _Spec(
        eight_schools_noncentered, _theta_to_theta_trans
    ),
    "eight_schools-eight_schools_centered": _Spec(eight_schools_centered),
    "arK-arK": _Spec(arK),
    "arma-arma11": _Spec(arma11),
    "garch-garch11": _Spec(garch11, _beta1_to_unit),
    "gp_pois_regr-gp_pois_regr": _Spec(gp_pois_regr, _f_to_f_tilde),
    "gp_pois_regr-gp_regr": _Spec(gp_regr),
    "kilpisjarvi_mod-kilpisjarvi": _Spec(kilpisjarvi),
    "sblrc-blr": _Spec(blr),
    "sblri-blr": _Spec(blr),
    "diamonds-diamonds": _Spec(diamonds),
    "earnings-earn_height": _Spec(earn_height),
    "earnings-logearn_interaction": _Spec(logearn_interaction),
    "kidiq-kidscore_interaction": _Spec(kidscore_interaction),
    "mesquite-logmesquite_logvas": _Spec(logmesquite_logvas),
    "nes2000-nes": _Spec(nes),
}

NAMES: tuple[str, ...] = tuple(_SPECS)
"""Names of the implemented posteriors (posteriordb ``<data>-<model>`` names)."""


@dataclass(frozen=True)
class Posterior:
    """A posteriordb posterior as a Pyro model with its reference draws.

    Attributes:
        name: posteriordb name, ``"<data>-<model>"``.
        model: the Pyro model with its data bound; call it with no arguments.
        reference: reference draws in Pyro naming, ``name -> array (10000, *site_shape)``;
            some names are ``pyro.deterministic`` sites rather than latent sample sites.
        data: the model's keyword arguments (Stan data as tensors / ints).
        to_latent: maps a dict of reference tensors (same keys as ``reference``, any leading
            batch shape) to the values of the model's latent sample sites, in constrained space.
    """

    name: str
    model: Callable[[], None]
    reference: dict[str, np.ndarray]
    data: dict[str, Any] = field(repr=False)
    to_latent: LatentMap = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the bound data."""
        for value in self.data.values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return value.dtype
        return torch.get_default_dtype()  # pragma: no cover - every model has real data

    def reference_latents(self, index: np.ndarray | slice | None = None) -> dict[str, Tensor]:
        """Reference draws (optionally a subset) mapped to the latent sample sites."""
        idx = slice(None) if index is None else index
        ref = {k: torch.as_tensor(v[idx], dtype=self.dtype) for k, v in self.reference.items()}
        return self.to_latent(ref, self.data)


def posteriordb_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The posteriordb data folder.

    Order: the explicit ``root``; else ``$PYRO_FLOWS_POSTERIORDB``; else
    ``<repo>/../shared/posteriordb`` relative to this file. Raises ``FileNotFoundError`` naming
    the path when the folder does not exist.
    """
    if root is not None:
        path = Path(root)
    elif os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
    else:
        repo = Path(__file__).resolve().parents[2]
        path = repo.parent / "shared" / "posteriordb"
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"posteriordb data folder not found: {path} (pass root=... or set ${ENV_VAR})"
        )
    return path


def _posterior_dir(name: str, root: str | os.PathLike[str] | None) -> Path:
    if name not in _SPECS:
        raise KeyError(f"unknown posterior {name!r}; known: {', '.join(NAMES)}")
    folder = posteriordb_root(root) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"posteriordb posterior folder not found: {folder}")
    return folder


def load_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Stan data of posterior ``name``: sizes/flags as ``int``, everything else as tensors."""
    with open(_posterior_dir(name, root) / "data.json") as fh:
        raw = json.load(fh)
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _INT_FIELDS:
            data[key] = int(value)
        else:
            data[key] = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype)
    return data


_STAN_NAME = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_.]*)(?:\[(?P<idx>[0-9,\s]+)\])?$")


def load_reference(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """Reference draws of ``name`` in Pyro naming: ``site -> array (n_draws, *site_shape)``.

    Chains are concatenated in file order. ``beta[1]..beta[5]`` become ``"beta"`` of shape
    ``(n_draws, 5)`` (1-based Stan indices, row-major for matrices).
    """
    with open(_posterior_dir(name, root) / "reference_draws.json") as fh:
        chains = json.load(fh)
    columns = {
        key: np.concatenate([np.asarray(c[key], dtype=np.float64) for c in chains])
        for key in chains[0]
    }
    groups: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key, values in columns.items():
        match = _STAN_NAME.match(key)
        if match is None:
            raise ValueError(f"cannot parse reference draw name {key!r}")
        idx = match["idx"]
        index = tuple(int(i) - 1 for i in idx.split(",")) if idx else ()
        groups.setdefault(match["base"], {})[index] = values
    reference: dict[str, np.ndarray] = {}
    for base, entries in groups.items():
        ndraws = len(next(iter(entries.values())))
        if list(entries) == [()]:
            reference[base] = entries[()]
            continue
        shape = tuple(max(ix[d] for ix in entries) + 1 for d in range(len(next(iter(entries)))))
        array = np.full((ndraws, *shape), np.nan)
        for ix, values in entries.items():
            target: tuple[slice | int, ...] = (slice(None), *ix)
            array[target] = values
        if np.isnan(array).any():
            raise ValueError(f"reference draws of {base!r} in {name} are incomplete")
        reference[base] = array
    return reference


def load(
    name: str,
    root: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Posterior:
    """Build the :class:`Posterior` ``name`` from the posteriordb folder (see
    :func:`posteriordb_root`), with data tensors of ``dtype``."""
    spec = _SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown posterior {name!r}; known: {', '.join(NAMES)}")
    data = load_data(name, root, dtype)
    params = inspect.signature(spec.model).parameters
    kwargs = {k: v for k, v in data.items() if k in params}
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs
    ]
    if missing:
        raise ValueError(f"{name}: data.json lacks {missing}")
    return Posterior(
        name=name,
        model=functools.partial(spec.model, **kwargs),
        reference=load_reference(name, root),
        data=kwargs,
        to_latent=spec.to_latent,
    )


@functools.cache
def _load_cached(name: str, root: Path) -> Posterior:
    return load(name, root)


class _Registry(Mapping[str, Posterior]):
    """Lazy ``name -> Posterior`` mapping over :data:`NAMES` (float64, default data folder).

    A posterior is loaded on first access and cached; iterating or ``len`` reads no data.
    """

    def __getitem__(self, name: str) -> Posterior:
        if name not in _SPECS:
            raise KeyError(name)
        return _load_cached(name, posteriordb_root())

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)

    def __repr__(self) -> str:
        return f"POSTERIORS({', '.join(NAMES)})"


POSTERIORS: Mapping[str, Posterior] = _Registry()
"""Registry of all implemented posteriors, loaded lazily from the default data folder."""


# --------------------------------------------------------------------------------------------
# utilities
# --------------------------------------------------------------------------------------------


def latent_dim(posterior: Posterior) -> int:
    """Number of unconstrained latent dimensions of the Pyro model."""
    with torch.no_grad(), pyro.poutine.block():
        trace = pyro.poutine.trace(posterior.model).get_trace()
    dim = 0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            fn: Any = site["fn"]
            dim += transform_to(fn.support).inv(site["value"]).numel()
    return dim


def sample_quantities(
    posterior: Posterior, guide: Callable[..., Any], num_samples: int
) -> dict[str, np.ndarray]:
    """Draw the reference quantities from ``guide`` (through the model, so deterministic
    sites such as ``theta`` or ``f`` are included): ``name -> array (num_samples, *shape)``."""
    predictive = Predictive(
        posterior.model,
        guide=guide,
        num_samples=num_samples,
        return_sites=list(posterior.reference),
        parallel=True,
    )
    with torch.no_grad():
        draws = predictive()
    return {
        k: draws[k].detach().cpu().numpy().reshape(num_samples, *v.shape[1:])
        for k, v in posterior.reference.items()
    }


def _reference_scores(
    posterior: Posterior, n: int, seed: int, chunk_size: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Unconstrained latents and log-density gradients at ``n`` reference draws."""
    ndraws = len(next(iter(posterior.reference.values())))
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(ndraws, size=min(n, ndraws), replace=False))
    with pyro.poutine.block():
        _, potential_fn, transforms, _ = initialize_model(posterior.model)
    values: dict[str, list[Tensor]] = {}
    scores: dict[str, list[Tensor]] = {}
    for start in range(0, len(index), chunk_size):
        latents = posterior.reference_latents(index[start : start + chunk_size])
        if set(latents) != set(transforms):
            raise ValueError(
                f"{posterior.name}: reference maps to {sorted(latents)}, "
                f"model latents are {sorted(transforms)}"
            )
        params = {k: transforms[k](v).detach().requires_grad_(True) for k, v in latents.items()}
        # the draws are independent, so the gradient of the summed potential is per draw
        grads = torch.autograd.grad(potential_fn(params), list(params.values()))
        for (k, v), g in zip(params.items(), grads, strict=True):
            values.setdefault(k, []).append(v.detach())
            scores.setdefault(k, []).append(-g.detach())
    return (
        {k: torch.cat(v) for k, v in values.items()},
        {k: torch.cat(v) for k, v in scores.items()},
    )


def _zscore(stat: np.ndarray) -> np.ndarray:
    """|mean| / standard error along axis 0."""
    se = stat.std(axis=0, ddof=1) / math.sqrt(stat.shape[0])
    return np.abs(stat.mean(axis=0)) / np.where(se > 0, se, np.inf)


def stein_zscores(
    posterior: Posterior,
    n: int = 500,
    seed: int = 0,
    *,
    linear: bool = False,
    chunk_size: int = 1000,
) -> dict[str, np.ndarray]:
    """Stein-identity z-scores of the model at the reference draws.

    Under the exact posterior, ``E[grad log p(z)] = 0`` where ``z`` is the unconstrained latent
    vector and ``log p`` includes the log-Jacobian of the constraining transforms. ``n``
    reference draws (chosen without replacement with ``seed``) are mapped to unconstrained
    space with the transforms from :func:`pyro.infer.mcmc.util.initialize_model`, the gradient
    of ``-potential_fn`` is taken at all of them in batched evaluations of ``chunk_size`` draws,
    and each component's mean gradient is divided by its standard error. Returns
    ``site -> z-scores`` of the site's unconstrained shape. A wrong prior, likelihood or
    Jacobian gives |z| far above a few, provided that it moves the posterior by more than about
    ``5 / sqrt(n)`` posterior standard deviations.

    With ``linear=True`` the result also holds ``"linear"``: a ``(d, d)`` array of z-scores of
    the second Stein identity ``E[(z_i - E z_i) d_j log p(z)] = -delta_ij``, which also catches
    errors of scale and correlation (tempered likelihoods, variance-vs-sd mix-ups) that leave
    the first identity intact.
    """
    values, scores = _reference_scores(posterior, n, seed, chunk_size)
    out: dict[str, np.ndarray] = {}
    for k, score in scores.items():
        out[k] = _zscore(score.cpu().numpy())
    if linear:
        count = next(iter(scores.values())).shape[0]
        z = np.concatenate([v.reshape(count, -1).cpu().numpy() for v in values.values()], 1)
        g = np.concatenate([s.reshape(count, -1).cpu().numpy() for s in scores.values()], 1)
        z = z - z.mean(axis=0)
        stat = z[:, :, None] * g[:, None, :] + np.eye(z.shape[1])
        out["linear"] = _zscore(stat)
    return out


def stein_check(posterior: Posterior, n: int = 500, seed: int = 0, linear: bool = False) -> float:
    """Largest Stein z-score over all unconstrained components (see :func:`stein_zscores`)."""
    zscores = stein_zscores(posterior, n, seed, linear=linear)
    return float(max(np.max(z) for z in zscores.values()))


def _main(argv: list[str] | None = None) -> int:
    """Print ``name, latent dims, Stein max z-score, ok/FAIL`` for every posterior."""
    names = list(argv) if argv else list(NAMES)
    failures = 0
    for name in names:
        start = time.perf_counter()
        posterior = load(name)
        z = stein_check(posterior)
        ok = z < STEIN_THRESHOLD
        failures += not ok
        print(
            f"{name:42s} dim={latent_dim(posterior):3d}  stein_max_z={z:6.2f}  "
            f"{'ok' if ok else 'FAIL'}  ({time.perf_counter() - start:.1f}s)"
        )
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
