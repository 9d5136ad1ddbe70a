"""Time per step of ``AutoHierarchicalFlow`` against ``AutoNormal``, same process, same protocol.

Issue 16's target: the hierarchical guide costs at most 3x AutoNormal's time per step. For
each posterior of :mod:`benchmarks.hierarchical_models` (and ``radon_synth``, below), both
guides are fitted under the protocol of :mod:`benchmarks.hierarchical_real`
(:func:`pyro_flows_ext.infer.fit_guide`: ``Trace_ELBO`` with ``--particles`` vectorised
particles, float32, one thread) for ``--steps`` steps, in alternating rounds of ``--round``
steps (so that both see the same machine load); each step is timed (wall clock) and the
table gives the median ms/step of each guide after ``--warmup`` steps, and their ratio.
Accuracy is :mod:`benchmarks.hierarchical_real`'s business: this only times.

``radon_synth`` is a large padded radon (the benchmark's model and grid, see
:func:`synthetic_radon`): ``--synth-counties`` counties whose house counts are log-normal
(heavy-tailed: many counties with few houses, a few with hundreds), about 30 per county.

Usage (from the repository root)::

    python -m benchmarks.hierarchical_cost
    python -m benchmarks.hierarchical_cost --posteriors radon_synth --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from benchmarks import hierarchical_models
from benchmarks.hierarchical_models import Posterior, county_plate, grid, radon
from pyro_flows_ext.checks import positive_int
from pyro_flows_ext.infer import AutoHierarchicalFlow, fit_guide

DEFAULT = "radon_mn,eight_schools,glm,counts,funnel,funnel10k,radon_synth"


def synthetic_radon(counties: int = 400, seed: int = 20261204) -> Posterior:
    """The radon model on simulated data: per county ``round(exp(N(2.8, 1.1)))`` houses (at
    least one; ``E`` about 30), a basement indicator ``floor ~ Bernoulli(0.2)``, and
    ``y ~ N(a_c + b_c floor, 0.75)`` with ``a_c ~ N(1.5, 0.35)``, ``b_c ~ N(-0.7, 0.3)``,
    all from ``seed``; the houses in a padded ``(max houses, counties)`` grid with a mask."""
    counties = positive_int("counties", counties)
    gen = torch.Generator().manual_seed(seed)
    houses = (torch.randn(counties, generator=gen, dtype=torch.float64) * 1.1 + 2.8).exp()
    houses = houses.round().clamp(min=1).long()
    county = torch.repeat_interleave(torch.arange(counties), houses)
    a = 1.5 + 0.35 * torch.randn(counties, generator=gen, dtype=torch.float64)
    b = -0.7 + 0.3 * torch.randn(counties, generator=gen, dtype=torch.float64)
    floor = (torch.rand(len(county), generator=gen) < 0.2).double()
    y = a[county] + b[county] * floor + 0.75 * torch.randn(len(county), generator=gen)
    positive = {"mu_a": False, "mu_b": False, "sigma_a": True, "sigma_b": True, "sigma_y": True}
    args = grid(county, counties, floor, y)
    return Posterior("radon_synth", radon, args, positive, ("a", "b"), county_plate)


def step_times(post: Posterior, kind: str, steps: int, opts: Any) -> list[float]:
    """Wall-clock seconds of each of ``steps`` steps of guide ``kind`` (a fresh guide)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    args = post.cast(torch.float32)
    plates = {"create_plates": post.plates} if post.plates is not None else {}
    guide_cls: Any = AutoNormal if kind == "normal" else AutoHierarchicalFlow
    guide = guide_cls(post.model, **plates)
    stamps = [time.perf_counter()]
    fit_guide(
        post.model, guide, *args, steps=steps, lr=opts.lr0, lr_end=opts.lr1,
        num_particles=opts.particles, progress=False,
        callback=lambda taken, loss: stamps.append(time.perf_counter()),
    )  # fmt: skip
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def measure(post: Posterior, opts: Any) -> dict[str, Any]:
    """Median ms/step of both guides (alternating rounds) and the ratio."""
    times: dict[str, list[float]] = {"normal": [], "hierarchical": []}
    rounds = max(1, opts.steps // opts.round)
    for _ in range(rounds):
        for kind in times:
            times[kind] += step_times(post, kind, opts.round + opts.warmup, opts)[opts.warmup :]
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"posterior": post.name, **ms, "ratio": ms["hierarchical"] / ms["normal"]}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posteriors", default=DEFAULT)
    p.add_argument("--steps", type=int, default=60, help="timed steps per guide")
    p.add_argument("--round", type=int, default=20, help="steps per alternating round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each round")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr0", type=float, default=5e-2)
    p.add_argument("--lr1", type=float, default=1e-4)
    p.add_argument("--synth-counties", type=int, default=400)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    opts = parse(argv)
    torch.set_num_threads(1)
    rows = []
    print("| posterior | AutoNormal ms/step | hierarchical ms/step | ratio |")
    print("| --- | --- | --- | --- |")
    for name in opts.posteriors.split(","):
        if name == "radon_synth":
            post = synthetic_radon(opts.synth_counties)
        else:
            post = hierarchical_models.load(name)
        row = measure(post, opts)
        rows.append(row)
        print(
            f"| {name} | {row['normal']:.2f} | {row['hierarchical']:.2f} | {row['ratio']:.2f} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
