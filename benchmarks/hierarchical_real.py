"""Every guide on real hierarchical posteriors against gold references, under one protocol.

The posteriors are those of :mod:`benchmarks.hierarchical_models` (radon in Minnesota, centred
eight schools, a varying-intercept logistic regression, a negative binomial count model, the
exact funnel), the references those of :mod:`benchmarks.hierarchical_references` (NUTS on the
non-centred form, or exact moments), read from ``benchmarks/results/references/``.

The protocol, for every guide, posterior and seed: :func:`pyro_flows_ext.infer.fit_guide` with
the funnel benchmark's settings (:func:`benchmarks.hierarchical.protocol_parser`:
``ClippedAdam`` without clipping, the step size decaying exponentially from ``--lr0`` to
``--lr1`` over ``--steps``, ``Trace_ELBO`` with ``--particles`` vectorised particles), in
``--dtype``, on one thread, each fit in its own process stopped after ``--time-limit``
wall-clock seconds (a guide that raises or runs out of time is a row saying so). Then
``--draws`` guide draws give, with the model's log density at each
(:func:`pyro_flows_ext.infer.importance_draws`):

* the ELBO, ``mean(log p(x, z) - log q(z))`` over the draws (the same estimator for every
  guide) and PSIS k-hat of the same weights;
* for each global, on the unconstrained scale (``log_sigma`` for a scale ``sigma``),
  ``|mean error| / sd`` and ``|log sd ratio|`` against the reference; the largest over the
  globals; and the largest and the median over every local element;
* CPU ms per step and CPU seconds to convergence (the steps after which the smoothed
  training ELBO stays within ``--tol`` nats of its final value).

Each fit gives a second row, ``<guide>+psis``: the same fit and draws (same ELBO, k-hat and
times), the errors from the draws' moments weighted by their PSIS-smoothed importance weights,
as :func:`pyro_flows_ext.infer.importance_resample` corrects a guide's draws (trustworthy where
k-hat is below its threshold, about 0.7). ``AutoHierarchicalFlow`` fits give a third,
``<guide>+marginal``, where its
:meth:`~pyro_flows_ext.infer.AutoHierarchicalFlow.marginal_resample` applies (every latent
group a leaf): ``4 * --draws`` draws of the globals resampled to ``--draws`` by their weights
against the globals' Laplace marginal, the locals drawn given them (the ELBO and k-hat columns
are still the fit's).

Each cell is the median over ``--seeds`` with the range (min-max) where it matters.

Usage (from the repository root)::

    python -m benchmarks.hierarchical_real                   # the dev suite, every guide
    python -m benchmarks.hierarchical_real --posteriors radon_mn --guides normal,hierarchical \\
        --seeds 0,1,2 --steps 2000 --steps-for gaussian=500 --time-limit 300
    python -m benchmarks.hierarchical_real --held-out --posteriors radon_all,election88
    python -m benchmarks.hierarchical_real --posteriors crossed_lm --seeds 0,1,2 \\
        --guides normal,hierarchical_uncrossed,hierarchical_largest,hierarchical

The guides ``hierarchical_largest`` and ``hierarchical_uncrossed`` (:data:`VARIANTS`) run only
when named: ``AutoHierarchicalFlow`` with its crossed groups conditioned largest first, or not
in sequence at all (each at the others' anchors, as before the sequential conditionals).

The held-out posteriors (``radon_all``, ``election88``) are for one final evaluation: their
references come from ``python -m benchmarks.hierarchical_references --held-out``.

The tables are printed and written next to ``--out`` (a JSON file of every row) as Markdown.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import (
    AutoGaussian,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoStructured,
)
from torch import Tensor

from benchmarks import hierarchical_models, hierarchical_real_report, hierarchical_references_io
from benchmarks.hierarchical import RESULTS, parse_protocol, protocol_parser
from benchmarks.hierarchical_models import CROSSED, DEV, HELD_OUT, Posterior
from pyro_flows_ext.infer import (
    AutoCouplingFlow,
    AutoHierarchicalFlow,
    fit_guide,
    importance_draws,
)


def _plates(post: Posterior) -> dict[str, Any]:
    return {"create_plates": post.plates} if post.plates is not None else {}


GUIDES: dict[str, Callable[[Posterior], Any]] = {
    "normal": lambda p: AutoNormal(p.model, **_plates(p)),
    "lowrank": lambda p: AutoLowRankMultivariateNormal(p.model),
    "mvn": lambda p: AutoMultivariateNormal(p.model),
    "gaussian": lambda p: AutoGaussian(p.model),
    "structured": lambda p: AutoStructured(p.model),
    "iaf": lambda p: AutoIAFNormal(p.model, num_transforms=2),
    "coupling": lambda p: AutoCouplingFlow(p.model, init="loc"),
    "hierarchical": lambda p: AutoHierarchicalFlow(p.model, **_plates(p)),
}


class _LargestFirst(AutoHierarchicalFlow):
    CROSSED_ORDER = "largest"


class _Uncrossed(AutoHierarchicalFlow):
    CROSSED_ORDER = None


VARIANTS: dict[str, Callable[[Posterior], Any]] = {
    "hierarchical_largest": lambda p: _LargestFirst(p.model, **_plates(p)),
    "hierarchical_uncrossed": lambda p: _Uncrossed(p.model, **_plates(p)),
}
"""Variants of the guides, run only when named: the order of crossed groups (see
:mod:`pyro_flows_ext.infer.hierarchical.crossed`), and none (the guide before it)."""
GUIDES |= VARIANTS
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------ scoring -------------
def moments(values: dict[str, Tensor], log_weights: Tensor | None = None) -> dict[str, Tensor]:
    """Means and sds (``<name>_mean``, ``<name>_sd``) of ``(S, -1)`` draws, weighted by
    ``exp(log_weights)`` (``(S,)``, normalised here) when given."""
    out = {}
    for name, v in values.items():
        if log_weights is None:
            out[name + "_mean"], out[name + "_sd"] = v.mean(0), v.std(0)
            continue
        w = torch.softmax(log_weights.to(v), 0)[:, None]
        mean = (w * v).sum(0)
        out[name + "_mean"], out[name + "_sd"] = mean, (w * (v - mean) ** 2).sum(0).sqrt()
    return out


def scores(truth: dict[str, Tensor], got: dict[str, Tensor], post: Posterior) -> dict:
    """Each global's |mean error| / sd and |log sd ratio|, their largest, and the largest and
    median over every local element."""

    def errs(name: str) -> tuple[Tensor, Tensor]:
        sd = truth[name + "_sd"].reshape(-1)
        mean_err = (got[name + "_mean"].reshape(-1) - truth[name + "_mean"].reshape(-1)).abs() / sd
        return mean_err, (got[name + "_sd"].reshape(-1) / sd).log().abs()

    out: dict[str, Any] = {"globals": {}}
    for name in post.global_names:
        m, s = errs(name)
        out["globals"][name] = {"mean_err": float(m), "log_sd": float(s)}
    out["glob_mean_max"] = max(g["mean_err"] for g in out["globals"].values())
    out["glob_log_sd_max"] = max(g["log_sd"] for g in out["globals"].values())
    pairs = [errs(name) for name in post.locals_]
    m, s = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    out |= {"loc_mean_max": float(m.max()), "loc_mean_median": float(m.median())}
    out |= {"loc_log_sd_max": float(s.max()), "loc_log_sd_median": float(s.median())}
    return out


def converged_at(smoothed: list[float], tol: float) -> int:
    """Steps after which the smoothed loss (or ELBO) stays within ``tol`` of its final value."""
    outside = [i for i, v in enumerate(smoothed) if abs(v - smoothed[-1]) > tol]
    return outside[-1] + 2 if outside else 1


def fit_and_score(
    post: Posterior,
    kind: str,
    seed: int,
    steps: int,
    opts: Any,
    truth: dict[str, Tensor] | None = None,
) -> dict:
    """Fit guide ``kind`` to ``post`` with the protocol and score it against ``truth``
    (moments, by default the reference's)."""
    if truth is None:
        truth, _ = hierarchical_references_io.load(post.name, opts.references)
    torch.set_num_threads(1)
    torch.set_default_dtype(DTYPES[opts.dtype])
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    args = post.cast(DTYPES[opts.dtype])
    guide = GUIDES[kind](post)
    hist = fit_guide(
        post.model,
        guide,
        *args,
        steps=steps,
        lr=opts.lr0,
        lr_end=opts.lr1,
        num_particles=opts.particles,
        progress=False,
    )
    draws = importance_draws(post.model, guide, *args, num_samples=opts.draws)
    smoothed, khat = draws.psis()
    log_w = draws.log_weights.double()
    conv = converged_at(hist.smoothed, opts.tol)
    row = {
        "elbo": float(log_w.mean()),
        "elbo_se": float(log_w.std() / math.sqrt(len(log_w))),
        "khat": float(khat.khat),
        "ms_per_step": 1e3 * hist.cpu_seconds / len(hist.loss),
        "cpu_s": hist.cpu_seconds,
        "conv_steps": conv,
        "conv_cpu_s": hist.cpu_seconds * conv / len(hist.loss),
        "params": sum(p.numel() for p in guide.parameters()),
    }
    values = post.unconstrained(draws.latents, opts.draws)
    weighted = moments(values, torch.as_tensor(smoothed, dtype=torch.float64))
    row["psis"] = scores(truth, weighted, post)
    if isinstance(guide, AutoHierarchicalFlow):
        try:  # 4x the draws, resampled to as many as the others'
            resampled = guide.marginal_resample(
                *args, num_samples=4 * opts.draws, num_draws=opts.draws
            )
            row["marginal"] = scores(
                truth, moments(post.unconstrained(resampled, opts.draws)), post
            )
        except ValueError:  # nested or crossed groups: no Laplace marginal of the globals
            pass
    return row | scores(truth, moments(values), post)


# ------------------------------------------------------------------ isolation -----------
def _child(fn: Callable[[], dict], send: Any) -> None:
    try:
        send.send(fn())
    except Exception as e:  # any failure of a guide is a result
        first = (str(e).splitlines() or [""])[0][:120]
        send.send({"failed": f"{type(e).__name__}: {first}"})


def limited(fn: Callable[[], dict], seconds: float) -> dict:
    """``fn()`` (picklable) in a child process, or a failure row when it raises or outlives
    ``seconds``. Children fork from a server that imported this module once (``forkserver``:
    no fork of a process that other libraries made multi-threaded)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["benchmarks.hierarchical_real"])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, send), daemon=True)
    proc.start()
    result = recv.recv() if recv.poll(seconds) else {"failed": f"timed out after {seconds:g} s"}
    if proc.is_alive():
        proc.kill()
    proc.join()
    return result


# ------------------------------------------------------------------ driver --------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = protocol_parser(__doc__, GUIDES, 2000, RESULTS / "hierarchical_real.json")
    p.set_defaults(draws=2000, guides=",".join(k for k in GUIDES if k not in VARIANTS))
    p.add_argument("--posteriors", default=",".join(DEV), help="of " + ", ".join(DEV + CROSSED))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per fit")
    p.add_argument("--steps-for", default="", help="per-guide steps, e.g. gaussian=500")
    p.add_argument("--tol", type=float, default=1.0, help="nats, for the time to converge")
    p.add_argument("--references", type=Path, default=hierarchical_references_io.REFERENCES)
    p.add_argument("--held-out", action="store_true", help=f"allow {', '.join(HELD_OUT)}")
    opts = parse_protocol(p, GUIDES, argv)
    names = set(opts.posteriors.split(","))
    unknown = names - set(hierarchical_models.LOADERS)
    if names & set(HELD_OUT) and not opts.held_out:
        p.error(f"{sorted(names & set(HELD_OUT))} are held out: pass --held-out to run them")
    if unknown:
        p.error(
            f"unknown posteriors {sorted(unknown)}; choose from {list(hierarchical_models.LOADERS)}"
        )
    try:
        opts.seed_list = [int(s) for s in opts.seeds.split(",")]
        pairs = [item.split("=") for item in opts.steps_for.split(",") if item]
        opts.guide_steps = {k: int(v) for k, v in pairs}
    except ValueError as e:
        p.error(f"--seeds takes integers and --steps-for guide=steps pairs ({e})")
    if set(opts.guide_steps) - set(GUIDES):
        p.error(f"--steps-for names unknown guides {sorted(set(opts.guide_steps) - set(GUIDES))}")
    return opts


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse(argv)
    command = "python -m benchmarks.hierarchical_real " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for name in opts.posteriors.split(","):
        post = hierarchical_models.load(name)
        for kind in opts.guides.split(","):
            steps = opts.guide_steps.get(kind, opts.steps)
            for seed in opts.seed_list:
                run = functools.partial(fit_and_score, post, kind, seed, steps, opts)
                row = {"posterior": name, "guide": kind, "seed": seed, "steps": steps}
                result = limited(run, opts.time_limit)
                readings = {k: result.pop(k) for k in ("psis", "marginal") if k in result}
                rows.append(row | result)
                print(hierarchical_real_report.one_line(rows[-1]), flush=True)
                fit = rows[-1]
                for tail, reading in readings.items():  # the same fit, read otherwise
                    rows.append(fit | reading | {"guide": f"{kind}+{tail}"})
                    print(hierarchical_real_report.one_line(rows[-1]), flush=True)
    hierarchical_real_report.write(opts, command.strip(), rows)
    return rows


if __name__ == "__main__":
    main()
