"""NeuTra HMC against plain NUTS: effective samples of the hardest coordinate per second and
per gradient evaluation, on the centred eight schools (log tau) and a 10-dimensional Neal's
funnel (its neck v), with :func:`pyro_flows_ext.infer.neutra_mcmc`.

Every guide is fitted with :func:`pyro_flows_ext.infer.fit_guide` (``--steps`` Adam steps, 16
particles, the step size decaying from 5e-2 to 1e-4); every sampler runs NUTS
(``--chains`` chains of ``--warmup`` + ``--draws``, tree depth ``--tree-depth``) in the same
process, one chain after the other; all of it for each of ``--seeds``. Prints a Markdown
table (with the r-hat of the hardest coordinate, as a check that the chains agree) and writes
it to
``benchmarks/results/neutra.md``::

    python benchmarks/neutra.py               # the published settings
    python benchmarks/neutra.py --smoke       # seconds, to check that it runs
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoIAFNormal

from pyro_flows_ext.infer import AutoCouplingFlow, fit_guide, neutra_mcmc

RESULTS = Path(__file__).resolve().parent / "results" / "neutra.md"
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
FUNNEL_DIM = 10


def eight_schools() -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, SIGMA), obs=Y)


def funnel() -> None:
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("dim", FUNNEL_DIM - 1):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


PROBLEMS = {
    "eight schools (centred)": (eight_schools, lambda s: s["tau"].log(), "log tau"),
    "Neal's funnel (10-d)": (funnel, lambda s: s["v"], "v"),
}
GUIDES = {
    "NUTS": None,
    "NeuTra + AutoCouplingFlow": lambda m: AutoCouplingFlow(m),
    "NeuTra + AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=2),
    "NeuTra + AutoCouplingFlow(depth=6)": lambda m: AutoCouplingFlow(m, depth=6),
    "NeuTra + AutoCouplingFlow(base=normal)": lambda m: AutoCouplingFlow(m, base="normal"),
}
DEFAULT_GUIDES = list(GUIDES)[1:3]


def run(problem: str, guide_name: str, seed: int, opts: argparse.Namespace) -> dict:
    model, hardest, _ = PROBLEMS[problem]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    make = GUIDES[guide_name]
    guide, fit_seconds, elbo = None, 0.0, math.nan
    if make is not None:
        guide = make(model)
        start = time.perf_counter()
        elbo = fit_guide(model, guide, steps=opts.steps, progress=False).elbo
        fit_seconds = time.perf_counter() - start
    draws = neutra_mcmc(
        model,
        guide,
        num_samples=opts.draws,
        warmup_steps=opts.warmup,
        max_tree_depth=opts.tree_depth,
        num_chains=opts.chains,
        seed=seed,
    )
    ess = float(az.ess(hardest(draws.samples).numpy()))
    r_hat = float(az.rhat(hardest(draws.samples).numpy())) if opts.chains > 1 else math.nan
    return {
        "seed": seed,
        "elbo": elbo,
        "r_hat": r_hat,
        "ess": ess,
        "per_s": ess / draws.seconds,
        "per_grad": 1000 * ess / max(draws.gradient_evaluations, 1),
        "div": draws.num_divergences,
        "grads": draws.gradient_evaluations / (opts.draws * opts.chains),
        "seconds": draws.seconds,
        "fit": fit_seconds,
    }


def table(results: dict, opts: argparse.Namespace) -> str:
    lines = [
        f"Fit: {opts.steps} steps, 16 particles; NUTS: {opts.chains} chains of {opts.warmup} "
        f"warm-up + {opts.draws} draws, tree depth {opts.tree_depth}. "
        f"Torch threads: 1. ESS (all chains) of the hardest "
        f"coordinate (ArviZ bulk ESS); ratios against plain NUTS on the same problem.",
        "",
        "| problem | seed | sampler | guide ELBO | ESS | r-hat | ESS/s | ratio ESS/s "
        "| ESS/1k grads | ratio ESS/grad | grads/draw | divergences | MCMC s | fit s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for (problem, seed), rows in results.items():
        base = rows["NUTS"]
        coordinate = PROBLEMS[problem][2]
        for name, r in rows.items():
            per_s = r["per_s"] / base["per_s"] if base["per_s"] > 0 else math.nan
            per_grad = r["per_grad"] / base["per_grad"] if base["per_grad"] > 0 else math.nan
            lines.append(
                f"| {problem}: {coordinate} | {seed} | {name} | {r['elbo']:.2f} "
                f"| {r['ess']:.0f} | {r['r_hat']:.2f} | {r['per_s']:.2f} | {per_s:.1f} "
                f"| {r['per_grad']:.2f} | {per_grad:.1f} | {r['grads']:.1f} | {r['div']} "
                f"| {r['seconds']:.1f} | {r['fit']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--tree-depth", type=int, default=6)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--guides", nargs="*", default=DEFAULT_GUIDES, choices=list(GUIDES))
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown results file")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, no results file")
    opts = parser.parse_args()
    if opts.smoke:
        opts.steps, opts.warmup, opts.draws, opts.seeds = 20, 20, 30, [0]
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    samplers = ["NUTS", *[g for g in opts.guides if g != "NUTS"]]
    results = {}
    for problem in opts.problems:
        for seed in opts.seeds:
            results[problem, seed] = {g: run(problem, g, seed, opts) for g in samplers}
            print(table({(problem, seed): results[problem, seed]}, opts), flush=True)
    text = table(results, opts)
    print(text)
    if not opts.smoke:
        opts.output.write_text("# NeuTra HMC benchmark\n\n" + text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
