"""The hierarchical posteriors of :mod:`benchmarks.hierarchical_real`, as users write them in
Pyro: centred, with plates.

Each :class:`Posterior` holds a model, its data (float64 tensors), the plates a guide should
create (``create_plates`` for the plate-aware guides) and how its latents read on the
unconstrained scale: a positive global ``sigma`` is compared as ``log_sigma``; every local is
real. The dev suite:

* ``radon_mn``: varying intercept and slope radon regression of tutorial 5 (Gelman & Hill
  2006), 919 houses in 85 Minnesota counties, houses in a padded ``(houses, counties)`` grid
  with a mask so that the county plate can be subsampled::

      mu_a, mu_b ~ N(0, 10),  sigma_a, sigma_b, sigma_y ~ HalfNormal(1),
      a_c ~ N(mu_a, sigma_a),  b_c ~ N(mu_b, sigma_b),  y_i ~ N(a_c[i] + b_c[i] floor_i, sigma_y);

* ``eight_schools``: centred eight schools (posteriordb ``eight_schools_centered``);
* ``glm``: the varying-intercept logistic regression of :mod:`benchmarks.hierarchical_glm`
  (``G = 50`` groups of 8);
* ``counts``: a negative binomial regression with group intercepts, simulated with a fixed seed
  at known values (``COUNT_TRUTH``)::

      mu ~ N(0, 2),  sigma ~ HalfNormal(1),  beta ~ N(0, 1),  phi ~ HalfNormal(10),
      u_g ~ N(mu, sigma),  y_gj ~ NegBinomial(mean exp(u_g + beta x_gj), concentration phi);

* ``funnel``: the exact normal funnel of :mod:`benchmarks.hierarchical` at ``G = 1,000``
  (``funnel10k``: ``G = 10,000``).

Crossed designs (``CROSSED``, run when named): ``crossed_lm`` and ``crossed_logit``, data
simulated with a fixed seed at ``CROSSED_TRUTH`` in ``election88``'s shape (below): 51
states nested in 5 regions, 16 age x education cells crossing both, three covariates; 600
respondents with a normal likelihood of known scale ``CROSSED_NOISE`` (:func:`crossed_linear`),
or 3,000 with ``election88``'s Bernoulli one.

Held out (for one final evaluation; their data are read only when they are asked for):
``radon_all`` (the radon model on 386 counties) and ``election88`` (Gelman & Hill ch. 14, a
multilevel logistic regression with state, region and age x education effects, and ``female``,
``black`` and the standardised previous Republican vote share ``v_prev`` as predictors)::

      b0, b_female, b_black, b_v_prev ~ N(0, 5),  sigma_state, sigma_region, sigma_age_edu
      ~ HalfNormal(1),  e_k ~ N(0, sigma_k) for each of state, region and age_edu,
      y_i ~ Bernoulli(logit^-1(b0 + b_female female_i + ... + e_state[i] + e_region[i]
      + e_age_edu[i])).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from benchmarks import hierarchical, hierarchical_glm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV = ("radon_mn", "eight_schools", "glm", "counts", "funnel")
HELD_OUT = ("radon_all", "election88")
COUNT_TRUTH = {"mu": 1.0, "sigma": 0.5, "beta": 0.5, "phi": 5.0}
COUNT_GROUPS, COUNT_PER_GROUP = 100, 6
CROSSED = ("crossed_lm", "crossed_logit")
CROSSED_TRUTH = {"b0": 0.3, "b_female": -0.1, "b_black": -1.5, "b_v_prev": 0.4}
CROSSED_TRUTH |= {"sigma_state": 0.4, "sigma_region": 0.3, "sigma_age_edu": 0.3}
CROSSED_NOISE = 1.0
ELECTION88_GLOBALS = {"b0": False} | {f"b_{k}": False for k in ("female", "black", "v_prev")}
ELECTION88_GLOBALS |= {f"sigma_{k}": True for k in ("state", "region", "age_edu")}


@dataclass(frozen=True)
class Posterior:
    """A hierarchical posterior: ``model(*args)``, its globals (``site -> True`` where the site
    is positive and compared on the log scale), its locals and the guides' plates."""

    name: str
    model: Callable[..., None]
    args: tuple
    globals_: dict[str, bool]
    locals_: tuple[str, ...]
    plates: Callable[..., Any] | None = None

    def cast(self, dtype: torch.dtype) -> tuple:
        """The arguments with floating tensors in ``dtype``."""
        return tuple(
            a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in self.args
        )

    @property
    def global_names(self) -> tuple[str, ...]:
        """The globals' names on the unconstrained scale (``log_sigma`` for ``sigma``)."""
        return tuple(f"log_{k}" if pos else k for k, pos in self.globals_.items())

    def unconstrained(self, draws: dict[str, Any], num: int) -> dict[str, Tensor]:
        """``draws`` (``site -> (num, *shape)``, tensors or arrays) as unconstrained values,
        ``(num, -1)`` float64 each, named as :attr:`global_names` and :attr:`locals_`."""
        out = {}
        for site, positive in self.globals_.items():
            value = torch.as_tensor(draws[site], dtype=torch.float64).reshape(num, -1)
            out[f"log_{site}" if positive else site] = value.log() if positive else value
        for site in self.locals_:
            out[site] = torch.as_tensor(draws[site], dtype=torch.float64).reshape(num, -1)
        return out


# ------------------------------------------------------------------ radon ---------------
def read_json(path: Path) -> dict[str, Any]:
    """A data file, with a ``FileNotFoundError`` naming it when absent."""
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path} (expected the repository's ../shared)")
    with open(path) as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def grid(group: Tensor, groups: int, *columns: Tensor) -> tuple[Tensor, ...]:
    """Rows grouped by ``group`` (0-based) into padded ``(rows per group, groups)`` grids, one
    per column, and their mask."""
    slot = torch.zeros_like(group)
    for g in range(groups):  # the position of each row within its group
        slot[group == g] = torch.arange(int((group == g).sum()))
    rows = int(torch.bincount(group, minlength=groups).max())
    mask = torch.zeros(rows, groups, dtype=torch.bool)
    mask[slot, group] = True
    out: list[Tensor] = []
    for col in columns:
        padded = torch.zeros(rows, groups, dtype=torch.float64)
        padded[slot, group] = col.double()
        out.append(padded)
    return (*out, mask)


def radon(floor: Tensor, y: Tensor, mask: Tensor, batch: int | None = None) -> None:
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(1.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    with pyro.plate("county", y.shape[-1], subsample_size=batch, dim=-1) as c:
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
        with pyro.plate("house", y.shape[-2], dim=-2), poutine.mask(mask=mask[:, c]):
            pyro.sample("y", dist.Normal(a + b * floor[:, c], sigma_y), obs=y[:, c])


def county_plate(floor: Tensor, y: Tensor, mask: Tensor, batch: int | None = None) -> Any:
    """The guides' county plate (the full plate when ``batch`` is ``None``)."""
    return pyro.plate("county", y.shape[-1], subsample_size=batch, dim=-1)


def radon_posterior(name: str) -> Posterior:
    raw = read_json(SHARED / "hierarchical" / f"{name}.json")
    county = torch.tensor(raw["county_idx"] if "county_idx" in raw else raw["county"]) - 1
    floor, y, mask = grid(
        county,
        int(raw["J"]),
        torch.tensor(raw["floor_measure"], dtype=torch.float64),
        torch.tensor(raw["log_radon"], dtype=torch.float64),
    )
    positive = {"mu_a": False, "mu_b": False, "sigma_a": True, "sigma_b": True, "sigma_y": True}
    return Posterior(name, radon, (floor, y, mask), positive, ("a", "b"), county_plate)


# ------------------------------------------------------------------ eight schools -------
def eight_schools(y: Tensor, sigma: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y), dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_posterior() -> Posterior:
    raw = read_json(SHARED / "posteriordb" / "eight_schools-eight_schools_centered" / "data.json")
    args = (torch.tensor(raw["y"], dtype=torch.float64), torch.tensor(raw["sigma"]).double())
    return Posterior("eight_schools", eight_schools, args, {"mu": False, "tau": True}, ("theta",))


# ------------------------------------------------------------------ counts --------------
def counts(x: Tensor, y: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    phi = pyro.sample("phi", dist.HalfNormal(10.0))
    with pyro.plate("groups", y.shape[-1], dim=-1):
        u = pyro.sample("u", dist.Normal(mu, sigma))
        with pyro.plate("obs", y.shape[-2], dim=-2):
            rate = phi / (u + beta * x).exp()
            pyro.sample("y", dist.GammaPoisson(phi, rate), obs=y)


def count_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Covariates and counts ``(COUNT_PER_GROUP, COUNT_GROUPS)`` simulated at
    ``COUNT_TRUTH`` (float64)."""
    rng = np.random.default_rng(seed)
    t = COUNT_TRUTH
    shape = (COUNT_PER_GROUP, COUNT_GROUPS)
    u = t["mu"] + t["sigma"] * rng.standard_normal(COUNT_GROUPS)
    x = rng.standard_normal(shape)
    mean = np.exp(u + t["beta"] * x)
    y = rng.poisson(rng.gamma(t["phi"], mean / t["phi"]))  # gamma-Poisson: NB(mean, phi)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float64))


def counts_posterior() -> Posterior:
    positive = {"mu": False, "sigma": True, "beta": False, "phi": True}
    return Posterior("counts", counts, count_data(), positive, ("u",))


# ------------------------------------------------------------------ glm and funnel ------
def glm_posterior() -> Posterior:
    x, y = hierarchical_glm.glm_data(50)
    positive = {"mu": False, "sigma": True, "beta": False}
    return Posterior("glm", hierarchical_glm.model, (x.double(), y.double()), positive, ("a",))


def funnel_posterior(groups: int) -> Posterior:
    y, s = hierarchical.funnel_data(groups)
    name = "funnel" if groups == 1000 else f"funnel{groups // 1000}k"
    positive = {"mu": False, "tau": True}
    return Posterior(
        name, hierarchical.model, (y, s), positive, ("theta",), hierarchical.groups_plate
    )


# ------------------------------------------------------------------ election88 ----------
def election88(
    x: Tensor, y: Tensor, state: Tensor, region: Tensor, age_edu: Tensor, sizes: Tensor
) -> None:
    """``x``: ``(N, 3)`` columns female, black, standardised v_prev; ``sizes``: the numbers
    of states, regions and age x education groups."""
    effect = crossed_effects(x, state, region, age_edu, sizes)
    with pyro.plate("respondents", len(y), dim=-1):
        pyro.sample("y", dist.Bernoulli(logits=effect), obs=y)


def crossed_linear(
    x: Tensor, y: Tensor, state: Tensor, region: Tensor, age_edu: Tensor, sizes: Tensor
) -> None:
    """``election88``'s effects with a normal likelihood of known scale
    (:data:`CROSSED_NOISE`): given the sigmas, the locals' posterior is exactly Gaussian."""
    effect = crossed_effects(x, state, region, age_edu, sizes)
    with pyro.plate("respondents", len(y), dim=-1):
        pyro.sample("y", dist.Normal(effect, CROSSED_NOISE), obs=y)


def crossed_effects(
    x: Tensor, state: Tensor, region: Tensor, age_edu: Tensor, sizes: Tensor
) -> Tensor:
    """The linear predictor of ``election88``'s form, its latents sampled."""
    b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
    effect = b0
    for k, name in enumerate(("female", "black", "v_prev")):
        b = pyro.sample(f"b_{name}", dist.Normal(0.0, 5.0))
        effect = effect + b * x[:, k]
    for name, index, size in zip(
        ("state", "region", "age_edu"), (state, region, age_edu), sizes, strict=True
    ):
        sigma = pyro.sample(f"sigma_{name}", dist.HalfNormal(1.0))
        with pyro.plate(name, int(size), dim=-1):
            e = pyro.sample(f"e_{name}", dist.Normal(0.0, sigma))
        effect = effect + e[..., index]
    return effect


def crossed_data(respondents: int, linear: bool, seed: int) -> tuple:
    """Simulated data of ``election88``'s shape at :data:`CROSSED_TRUTH`: 51 states nested
    in 5 regions (state ``s`` in region ``s % 5``), 16 age x education cells crossing both,
    covariates female, black (10%) and a standardised state-level v_prev; the arguments of
    :func:`crossed_linear` (``linear``) or :func:`election88`."""
    rng = np.random.default_rng(seed)
    t = CROSSED_TRUTH
    sizes = (51, 5, 16)
    state = rng.integers(0, sizes[0], respondents)
    region = state % sizes[1]
    age_edu = rng.integers(0, sizes[2], respondents)
    v_prev = rng.standard_normal(sizes[0])[state]
    x = np.stack([rng.random(respondents) < 0.5, rng.random(respondents) < 0.1, v_prev], -1)
    effect = t["b0"] + x @ np.array([t["b_female"], t["b_black"], t["b_v_prev"]])
    names = ("state", "region", "age_edu")
    for name, index, size in zip(names, (state, region, age_edu), sizes, strict=True):
        effect = effect + t[f"sigma_{name}"] * rng.standard_normal(size)[index]
    if linear:
        y = effect + CROSSED_NOISE * rng.standard_normal(respondents)
    else:
        y = (rng.random(respondents) < 1 / (1 + np.exp(-effect))).astype(np.float64)
    index = [torch.from_numpy(i) for i in (state, region, age_edu)]
    x_ = torch.from_numpy(x.astype(np.float64))
    return (x_, torch.from_numpy(y), *index, torch.tensor(sizes))


def crossed_posterior(linear: bool) -> Posterior:
    """A simulated posterior of ``election88``'s form: ``crossed_lm`` (normal likelihood, 600
    respondents) or ``crossed_logit`` (Bernoulli, 3,000), for developing on crossed plates
    without reading the held-out data."""
    name, model = ("crossed_lm", crossed_linear) if linear else ("crossed_logit", election88)
    args = crossed_data(600 if linear else 3000, linear, seed=7)
    return Posterior(name, model, args, ELECTION88_GLOBALS, ("e_state", "e_region", "e_age_edu"))


def election88_posterior() -> Posterior:
    raw = read_json(SHARED / "hierarchical" / "election88.json")
    v_prev = torch.tensor(raw["v_prev_full"], dtype=torch.float64)
    v_prev = (v_prev - v_prev.mean()) / v_prev.std()
    cols = [torch.tensor(raw[k], dtype=torch.float64) for k in ("female", "black")]
    x = torch.stack([*cols, v_prev], -1)
    index = [torch.tensor(raw[k]) - 1 for k in ("state", "region_full", "age_edu")]
    sizes = torch.tensor([int(i.max()) + 1 for i in index])
    args = (x, torch.tensor(raw["y"], dtype=torch.float64), *index, sizes)
    locals_ = ("e_state", "e_region", "e_age_edu")
    return Posterior("election88", election88, args, ELECTION88_GLOBALS, locals_)


LOADERS: dict[str, Callable[[], Posterior]] = {
    "radon_mn": lambda: radon_posterior("radon_mn"),
    "eight_schools": eight_schools_posterior,
    "glm": glm_posterior,
    "counts": counts_posterior,
    "funnel": lambda: funnel_posterior(1000),
    "funnel10k": lambda: funnel_posterior(10_000),
    "radon_all": lambda: radon_posterior("radon_all"),
    "election88": election88_posterior,
    "crossed_lm": lambda: crossed_posterior(linear=True),
    "crossed_logit": lambda: crossed_posterior(linear=False),
}


def load(name: str) -> Posterior:
    """The posterior ``name`` (one of :data:`LOADERS`)."""
    if name not in LOADERS:
        raise ValueError(f"unknown posterior {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name]()
