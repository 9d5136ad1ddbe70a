"""Guides for a non-conjugate hierarchical model against NUTS: a varying-intercept logistic
regression on simulated groups.

The model (``G`` groups of ``n`` Bernoulli observations, covariate ``x``)::

    mu ~ N(0, 2),  sigma ~ HalfNormal(2),  beta ~ N(0, 2),
    a_g ~ N(mu, sigma),  y_gj ~ Bernoulli(logit^-1(a_g + beta x_gj)),

with data simulated at ``mu = -0.5, sigma = 1, beta = 1`` (``n = 8``: weak per-group data, a
mild funnel). The reference is NUTS on the same posterior in the non-centred
parameterisation (``a_g = mu + sigma z_g``, which NUTS samples without divergences):
``--chains`` chains of ``--warmup`` + ``--samples``. The guides are fitted with the funnel
benchmark's protocol (:mod:`benchmarks.hierarchical`) and scored the same way: the largest
|mean error| / sd and |log sd ratio| over all latents (``mu``, ``log sigma``, ``beta``, every
``a_g``, unconstrained) and over the globals, against the NUTS moments.

Usage (from the repository root)::

    python -m benchmarks.hierarchical_glm                  # G = 50, every guide
    python -m benchmarks.hierarchical_glm --groups 20 --steps 500 --samples 500

The table is printed and written to ``benchmarks/results/hierarchical_glm.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.reparam import LocScaleReparam
from torch import Tensor

from benchmarks.hierarchical import (
    RESULTS,
    attempt,
    cells,
    errors,
    fit,
    guide_moments,
    parse_protocol,
    protocol_parser,
    write_results,
)
from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow

PER_GROUP = 8


def glm_data(groups: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Covariates and outcomes ``(PER_GROUP, groups)`` (float32)."""
    gen = torch.Generator().manual_seed(seed)
    a = -0.5 + torch.randn(groups, generator=gen)
    x = torch.randn(PER_GROUP, groups, generator=gen)
    y = torch.bernoulli(torch.sigmoid(a + x), generator=gen)
    return x, y


def model(x: Tensor, y: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", y.shape[-1], dim=-1):
        a = pyro.sample("a", dist.Normal(mu, sigma))
        with pyro.plate("obs", y.shape[-2], dim=-2):
            pyro.sample("y", dist.Bernoulli(logits=a + beta * x), obs=y)


def values(out: dict[str, Tensor], num: int) -> dict[str, Tensor]:
    """The latents on the unconstrained scale, ``(num, -1)`` each."""
    return {
        "mu": out["mu"].reshape(num, -1),
        "log_sigma": out["sigma"].reshape(num, -1).log(),
        "beta": out["beta"].reshape(num, -1),
        "a": out["a"].reshape(num, -1),
    }


GLOBALS, LOCALS = ("mu", "log_sigma", "beta"), ("a",)
GUIDES: dict[str, Any] = {
    "normal": lambda m: AutoNormal(m),
    "mvn": lambda m: AutoMultivariateNormal(m),
    "iaf": lambda m: AutoIAFNormal(m, num_transforms=2),
    "coupling": lambda m: AutoCouplingFlow(m, init="loc"),
    "hierarchical": lambda m: AutoHierarchicalFlow(m),
}


def nuts_moments(x: Tensor, y: Tensor, opts: argparse.Namespace) -> dict[str, Tensor]:
    """Posterior means and sds from NUTS on the non-centred model (float64)."""
    reparam = pyro.poutine.reparam(model, config={"a": LocScaleReparam(centered=0.0)})
    pyro.set_rng_seed(1)
    mcmc = MCMC(
        NUTS(reparam, target_accept_prob=0.9),
        num_samples=opts.samples,
        warmup_steps=opts.warmup,
        num_chains=opts.chains,
        mp_context="spawn" if opts.chains > 1 else None,
        disable_progbar=True,
    )
    mcmc.run(x.double(), y.double())
    draws = mcmc.get_samples()
    num = len(draws["mu"])
    if "a" not in draws:  # the deterministic site of the reparameterised model
        draws["a"] = draws["mu"][:, None] + draws["sigma"][:, None] * draws["a_decentered"]
    got = values(draws, num)
    out = {}
    for k, v in got.items():
        out[k + "_mean"], out[k + "_sd"] = v.mean(0), v.std(0)
    return out


def table(rows: list[dict], opts: argparse.Namespace, nuts_s: float) -> str:
    lines = [
        f"Varying-intercept logistic regression, G = {opts.groups} groups of {PER_GROUP}. "
        f"Reference: NUTS (non-centred), {opts.chains} chain(s) of {opts.warmup} + "
        f"{opts.samples} draws, float64, {nuts_s:.0f} s. Guides: {opts.steps} steps of "
        f"ClippedAdam, lr {opts.lr0:g} -> {opts.lr1:g}, Trace_ELBO with {opts.particles} "
        f"vectorised particles, float32, one thread, seed 0; moments from {opts.draws} draws.",
        "",
        "| guide | mean err (all) | log sd (all) | mean err (globals) | log sd (globals) "
        "| ms/step | CPU s | params |",
        "|" + " --- |" * 8,
    ]
    for r in rows:
        lines.append(f"| {r['guide']} | {cells(r)}")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = protocol_parser(__doc__, GUIDES, 2000, RESULTS / "hierarchical_glm.md")
    p.add_argument("--groups", type=int, default=50)
    p.add_argument("--chains", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4000)
    return parse_protocol(p, GUIDES, argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    torch.set_num_threads(1)
    x, y = glm_data(opts.groups)
    start = time.perf_counter()
    truth = nuts_moments(x, y, opts)
    nuts_s = time.perf_counter() - start
    rows = []
    for kind in opts.guides.split(","):
        guide = GUIDES[kind](model)

        def score(guide: Any = guide) -> dict:
            out = fit(guide, (x, y), opts.steps, opts.particles, opts.lr0, opts.lr1, model)
            got = guide_moments(guide, (x, y), values, opts.draws, min(opts.draws, 1000))
            return out | errors(truth, got, GLOBALS, LOCALS)

        rows.append({"guide": kind} | attempt(score))
        print(table(rows[-1:], opts, nuts_s).splitlines()[-1], flush=True)
    title = "Hierarchical logistic regression: guides against NUTS"
    write_results(opts.out, title, table(rows, opts, nuts_s))


if __name__ == "__main__":
    main()
