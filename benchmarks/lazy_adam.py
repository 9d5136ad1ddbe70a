"""The optimiser's own cost of a subsampled step: :class:`~pyro_flows_ext.optim.LazyClippedAdam`
against Pyro's ``ClippedAdam`` on the per-element parameters of ``AutoHierarchicalFlow`` for
``N`` plate elements of which a step touches ``B``.

The parameters are those of a plate with one local feature: an ``(N, 8)`` embedding and two
``(N, 1)`` pseudo-likelihood tables, float32, with a gradient that is non-zero on ``B`` random
rows (as a subsampled step leaves it). Each optimiser steps them ``--reps`` times (fresh rows
each time, gradients made beforehand); the median time of one step is reported, and the ratio
``ClippedAdam / LazyClippedAdam`` from the same run. One thread.

Usage (from the repository root)::

    python -m benchmarks.lazy_adam --sizes 10000,100000,1000000 --batch 1000
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch.optim import Optimizer

from pyro_flows_ext.optim import LazyClippedAdam, mark_per_element

WIDTHS = (8, 1, 1)  # the embedding, the pseudo-likelihood's location and log-precision


def step_ms(lazy: bool, groups: int, batch: int, reps: int) -> float:
    """Median milliseconds of one optimiser step over the per-element parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(groups, w, generator=gen)) for w in WIDTHS]
    options = {"lr": 5e-2, "lrd": 0.9999, "clip_norm": math.inf}
    optim: Optimizer
    if lazy:
        optim = LazyClippedAdam([mark_per_element(p) for p in params], **options)
    else:
        optim = ClippedAdam(params, **options)
    times = []
    for _ in range(reps):
        rows = torch.randperm(groups, generator=gen)[:batch]
        for p in params:
            p.grad = torch.zeros_like(p)
            p.grad[rows] = torch.randn(batch, p.shape[1], generator=gen)
        tick = time.perf_counter()
        optim.step()
        times.append(time.perf_counter() - tick)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="N, comma separated")
    p.add_argument("--batch", type=int, default=1000, help="B: rows touched per step")
    p.add_argument("--reps", type=int, default=50)
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| N | B | ClippedAdam ms/step | LazyClippedAdam ms/step | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for size in (int(n) for n in opts.sizes.split(",")):
        dense = step_ms(False, size, opts.batch, opts.reps)
        lazy = step_ms(True, size, opts.batch, opts.reps)
        print(f"| {size} | {opts.batch} | {dense:.3f} | {lazy:.3f} | {dense / lazy:.1f} |")


if __name__ == "__main__":
    main()
