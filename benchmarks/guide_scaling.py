"""How ``AutoCouplingFlow`` scales with the latent dimension, against ``AutoIAFNormal``.

The model is a centred hierarchical normal with ``N`` groups (``D = N + 2`` latents: ``mu``,
``tau`` and one ``theta`` per group, one observation each). Every guide takes SVI steps with
``Trace_ELBO`` (16 vectorised particles) and ``ClippedAdam`` on one thread; each (guide, D)
runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its own. Printed
per row: parameters, the guide's initialisation time, the CPU time per SVI step (median of
``--steps`` steps after two warm-up steps; CPU time of the process, which other jobs on a
shared machine disturb far less than wall time), the peak RSS, and for ours the ratios to
``AutoIAFNormal``'s figures of the same run.

Usage (from the repository root)::

    python -m benchmarks.guide_scaling                          # D = 102 and 1,002, both guides
    python -m benchmarks.guide_scaling --dims 10002 --guides ours --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal

from pyro_flows_ext.infer import AutoCouplingFlow

GUIDES = {
    "ours": lambda model: AutoCouplingFlow(model),
    "iaf": lambda model: AutoIAFNormal(model),
}


def hierarchical_normal(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """``theta_i ~ N(mu, tau)``, ``y_i ~ N(theta_i, sigma_i)`` (centred)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def data(num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    theta = 1.0 + 2.0 * torch.randn(num_groups, generator=gen)
    sigma = 0.5 + torch.rand(num_groups, generator=gen)
    return theta + sigma * torch.randn(num_groups, generator=gen), sigma


def measure(guide_name: str, dim: int, steps: int) -> dict[str, Any]:
    """One (guide, D) in this process."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    y, sigma = data(dim - 2)
    guide = GUIDES[guide_name](hierarchical_normal)
    start = time.process_time()
    guide(y, sigma)  # creates the parameters (and, for ours, the start)
    init_s = time.process_time() - start
    optim = pyro.optim.ClippedAdam({"lr": 1e-3})
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(hierarchical_normal, guide, optim, elbo)
    times, losses = [], []
    for k in range(steps + 2):
        t0 = time.process_time()
        losses.append(svi.step(y, sigma))
        if k >= 2:
            times.append(time.process_time() - t0)
    row = {
        "guide": guide_name,
        "D": dim,
        "params": sum(p.numel() for p in guide.parameters()),
        "init_s": init_s,
        "ms_per_step": 1e3 * statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
    }
    if isinstance(guide, AutoCouplingFlow):
        row["affine"] = type(guide.affine).__name__
        row["start"] = guide.init_info.get("method")
    return row


def run_one(guide_name: str, dim: int, steps: int) -> dict[str, Any]:
    """:func:`measure` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, "-m", "benchmarks.guide_scaling", "--one", guide_name, str(dim)]
    out = subprocess.run(cmd + ["--steps", str(steps)], capture_output=True, text=True, check=False)
    if out.returncode:
        return {"guide": guide_name, "D": dim, "error": out.stderr.strip().splitlines()[-1]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'guide':>5} {'D':>6} {'params':>11} {'init s':>7} {'ms/step':>8} {'peak MB':>8} "
        f"{'params/iaf':>10} {'time/iaf':>8}  notes"
    ]
    iaf = {r["D"]: r for r in rows if r["guide"] == "iaf" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['guide']:>5} {r['D']:>6}  failed: {r['error']}")
            continue
        ref = iaf.get(r["D"])
        p_ratio = f"{r['params'] / ref['params']:.2f}" if ref and r["guide"] != "iaf" else ""
        t_ratio = (
            f"{r['ms_per_step'] / ref['ms_per_step']:.2f}" if ref and r["guide"] != "iaf" else ""
        )
        notes = " ".join(str(r[k]) for k in ("affine", "start") if k in r)
        lines.append(
            f"{r['guide']:>5} {r['D']:>6} {r['params']:>11,} {r['init_s']:>7.2f} "
            f"{r['ms_per_step']:>8.1f} {r['peak_rss_mb']:>8.0f} {p_ratio:>10} {t_ratio:>8}  "
            f"{notes}{'' if r['finite'] else ' (non-finite loss)'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="102,1002", help="comma-separated D = groups + 2")
    parser.add_argument(
        "--guides", default="iaf,ours", help=f"comma-separated, from {list(GUIDES)}"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("GUIDE", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps)))
        return 0
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        for name in args.guides.split(","):
            rows.append(run_one(name, dim, args.steps))
            print(report(rows[-1:]).splitlines()[-1], flush=True)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
