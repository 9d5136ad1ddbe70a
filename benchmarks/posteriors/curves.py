"""Time to accuracy: the sliced Wasserstein distance to the reference draws against the CPU
seconds of the fit, for ``AutoCouplingFlow`` and ``AutoIAFNormal``.

Each guide is fitted by :func:`~pyro_flows_ext.infer.fit_guide` with the protocol of
``benchmarks/posteriors/run.py`` (3,000 steps, lr 5e-2 -> 1e-4, 16 vectorised particles, seed
0, one thread); at the checkpoint steps a ``callback`` draws ``--draws`` samples from the guide
and scores them; the CPU seconds spent scoring are left out of the fit's time (the guide's
start, in the first step, is in it), and the random state is restored after scoring, so the
fit is the one ``run.py`` makes.

Usage (from the repository root)::

    python -m benchmarks.posteriors.curves            # four posteriors, float64
    python -m benchmarks.posteriors.curves --posteriors sblrc-blr --dtype float32

The table is printed and written to ``benchmarks/posteriors/results/curves.md`` (``--tag``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pyro
import torch

from benchmarks.posteriors import metrics, models
from benchmarks.posteriors.run import GUIDES, RESULTS, SCHEDULES
from pyro_flows_ext.infer import fit_guide

POSTERIORS = (
    "kidiq-kidscore_interaction",
    "eight_schools-eight_schools_noncentered",
    "garch-garch11",
    "sblrc-blr",
)
CHECKPOINTS = (50, 100, 250, 500, 1000, 2000, 3000)


def curve(posterior: models.Posterior, guide_name: str, opts: argparse.Namespace) -> list[Any]:
    """``[(step, fit CPU seconds, sliced Wasserstein), ...]`` at the checkpoints."""
    pyro.clear_param_store()
    pyro.set_rng_seed(opts.seed)
    guide = GUIDES[guide_name](posterior.model)
    points: list[tuple[int, float, float]] = []
    start, scoring = time.process_time(), 0.0

    def score(step: int, loss: float) -> None:
        nonlocal scoring
        if step not in CHECKPOINTS:
            return
        begin = time.process_time()
        rng = torch.get_rng_state()  # scoring must not change the fit's random numbers
        with torch.no_grad():
            draws = models.sample_quantities(posterior, guide, opts.draws)
        torch.set_rng_state(rng)
        swd = metrics.accuracy(draws, posterior.reference).sliced_wasserstein
        points.append((step, begin - start - scoring, swd))
        scoring += time.process_time() - begin

    lr0, lr1 = SCHEDULES["default"]
    fit_guide(posterior.model, guide, steps=max(CHECKPOINTS), lr=lr0, lr_end=lr1,
              num_particles=16, progress=False, callback=score)  # fmt: skip
    return points


def table(results: dict[tuple[str, str], list[Any]]) -> str:
    lines = ["| posterior | guide | " + " | ".join(f"step {s}" for s in CHECKPOINTS) + " |"]
    lines.append("| --- | --- |" + " ---: |" * len(CHECKPOINTS))
    for (name, guide), points in results.items():
        cells = [f"{swd:.3g} ({cpu:.1f} s)" for _, cpu, swd in points]
        lines.append(f"| {name} | {guide} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default=",".join(POSTERIORS))
    parser.add_argument("--guides", default="coupling_flow,iaf")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="curves")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, opts.dtype)
    torch.set_default_dtype(dtype)
    results: dict[tuple[str, str], list[Any]] = {}
    for name in opts.posteriors.split(","):
        posterior = models.load(name, dtype=dtype)
        for guide in opts.guides.split(","):
            results[(name, guide)] = curve(posterior, guide, opts)
            print(name, guide, results[(name, guide)], flush=True)
    text = table(results)
    header = (
        f"Sliced Wasserstein (fit CPU seconds) at each step, {opts.dtype}, 16 particles, "
        f"seed {opts.seed}, {opts.draws} draws per point: "
        f"`python -m benchmarks.posteriors.curves --dtype {opts.dtype}`"
    )
    (RESULTS / f"{opts.tag}.md").write_text(f"# Time to accuracy\n\n{header}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
