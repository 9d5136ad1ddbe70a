"""How far the globals of a subsampled fit wander: signed errors along the fit, and the end.

:mod:`benchmarks.hierarchical`'s funnel (exact posterior by quadrature) with ``--groups``
groups subsampled by ``--batch``, fitted by :func:`~pyro_flows_ext.infer.fit_guide` with
``AutoHierarchicalFlow``'s defaults and the benchmark's protocol (``--steps`` steps, lr
``--lr0`` -> ``--lr1``, 8 particles, float32, one thread), once per seed. At every
``--every`` steps the guide's means and sds of ``mu`` and ``log tau`` (``--draws`` draws) are
compared with the exact ones, signed: mean error in posterior sds and log sd ratio. With
``--average`` the fit ends at the mean of its last iterates (``fit_guide(average=...)``); the
last checkpoint is the last iterate, the ``end`` row what the fit returned. With
``--marginal S`` a last row reads the end's globals from
:meth:`~pyro_flows_ext.infer.AutoHierarchicalFlow.marginal_resample` (``S`` guide draws of the
globals resampled by their importance weights against the Laplace marginal over all groups,
exact for this normal model), with its CPU time.

Usage (from the repository root)::

    python -m benchmarks.subsample_noise --groups 100000 --batch 1000 --steps 20000 \\
        --seeds 0,1 --average 0.25

Writes the table to ``benchmarks/results/subsample_noise.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import torch

from benchmarks.hierarchical import (
    RESULTS,
    exact_moments,
    funnel_data,
    funnel_values,
    groups_plate,
    guide_moments,
    model,
    write_results,
)
from benchmarks.hierarchical_real import moments
from pyro_flows_ext.infer import AutoHierarchicalFlow, fit_guide

GLOBALS = ("mu", "log_tau")


def signed(truth: dict, got: dict) -> dict[str, tuple[float, float]]:
    """Each global's signed mean error in posterior sds and log sd ratio."""
    return {
        n: (
            float((got[n + "_mean"] - truth[n + "_mean"]) / truth[n + "_sd"]),
            float((got[n + "_sd"] / truth[n + "_sd"]).log()),
        )
        for n in GLOBALS
    }


def run(seed: int, opts: argparse.Namespace) -> list[tuple[str, dict]]:
    """The checkpoints of one fit: ``(label, signed errors)``."""
    y, s = (t.float() for t in funnel_data(opts.groups))
    truth = exact_moments(y.double(), s.double())
    chunk = max(1, min(opts.draws, 2_000_000 // opts.groups))

    def errors() -> dict:
        got = guide_moments(guide, (y, s, None), funnel_values, opts.draws, chunk)
        return signed(truth, got)

    rows: list[tuple[str, dict]] = []

    def checkpoint(taken: int, loss: float) -> None:
        if taken % opts.every == 0:
            rows.append((f"step {taken}", errors()))

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoHierarchicalFlow(model, create_plates=groups_plate)
    fit_guide(
        model, guide, y, s, opts.batch, steps=opts.steps, lr=opts.lr0, lr_end=opts.lr1,
        num_particles=opts.particles, average=opts.average, progress=False, callback=checkpoint,
    )  # fmt: skip
    rows.append(("end", errors()))
    if opts.marginal:  # the end's globals resampled by their marginal importance weights
        start = time.process_time()
        draws = guide.marginal_resample(
            y, s, opts.batch, num_samples=opts.marginal, globals_only=True
        )  # fmt: skip
        got = moments({"mu": draws["mu"].double(), "log_tau": draws["tau"].double().log()})
        seconds = time.process_time() - start
        rows.append((f"end, marginal_resample ({seconds:.0f} CPU s)", signed(truth, got)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--every", type=int, default=5000, help="steps between checkpoints")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--average", type=float, default=0.0, help="fit_guide's average")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr0", type=float, default=5e-2)
    p.add_argument("--lr1", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--marginal", type=int, default=0, help="marginal_resample draws (0: none)")
    p.add_argument("--out", type=Path, default=RESULTS / "subsample_noise.md")
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        f"Funnel, {opts.groups} groups subsampled by {opts.batch}; fit_guide, {opts.steps} "
        f"steps, lr {opts.lr0:g} -> {opts.lr1:g}, {opts.particles} particles, float32, "
        f"average {opts.average:g}; moments from {opts.draws} draws. Signed errors: mean in "
        "posterior sds / log sd ratio.",
        "",
        "| seed | checkpoint | mu | log tau |",
        "| --- | --- | --- | --- |",
    ]
    for seed in (int(x) for x in opts.seeds.split(",")):
        for label, err in run(seed, opts):
            cells = " | ".join(f"{err[n][0]:+.3f} / {err[n][1]:+.3f}" for n in GLOBALS)
            lines.append(f"| {seed} | {label} | {cells} |")
            print(lines[-1], flush=True)
    title = "Subsampled fits: the globals' errors along the fit"
    write_results(opts.out, title, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
