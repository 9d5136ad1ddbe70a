"""Fit flow and Gaussian guides to posteriordb posteriors and compare them with the reference
draws.

One protocol for every guide, so that the comparison is about the guide:
:func:`pyro_flows_ext.infer.fit_guide` (Adam, ``pyro.optim.ClippedAdam`` with clipping
switched off, with the learning rate decaying exponentially from ``lr0`` to ``lr1``,
``Trace_ELBO`` with vectorised particles, optional early stopping), the same seed, the same
dtype. The numbers of steps and particles are ``--steps`` and ``--particles`` for every guide,
or by default ``fit_guide``'s own: 3,000 steps of 16 particles, or the guide's
``fit_defaults`` (``AutoCouplingFlow``: 1,000 steps of 32 from its Laplace start), so that
the default run compares what a user of ``fit_guide`` gets. For every posterior and guide it
reports

* ``mean_err``: the largest |mean error| / reference sd over all reference quantities;
* ``log_sd``: the largest |log(sd ratio)|;
* ``swd``: the sliced Wasserstein distance between the standardised draw sets;
* ``khat``: the PSIS Pareto k-hat of ``log p(x, z) - log q(z)``, the median of 5 estimates
  from independent sets of ``--draws`` guide draws (one estimate varies by about +-0.15), and
  ``verdict``: the reading of that median with the threshold for ``--draws`` draws;
* ``cpu_s``: fit time (guide initialisation included) as CPU seconds of this process, which
  other jobs on a shared machine disturb far less than wall time (also recorded, ``seconds``);
* ``steps``: steps taken (fewer than the fit's steps when ``--patience`` stopped it);
* ``elbo``: the mean ELBO over the last 100 steps.

Usage (from the repository root)::

    python -m benchmarks.posteriors.run                       # all posteriors, default protocol
    python -m benchmarks.posteriors.run --guides coupling_flow,iaf --steps 3000  # equal steps
    python -m benchmarks.posteriors.run --schedule slow --posteriors kilpisjarvi_mod-kilpisjarvi
    python -m benchmarks.posteriors.run --guides coupling_flow,mvn --steps 500
    python -m benchmarks.posteriors.run --schedule default --dtype float32 --particles 1
    python -m benchmarks.posteriors.run --posteriors sblri-blr --patience 300 --tag stop

Results go to ``benchmarks/posteriors/results/<tag>.json`` and ``.md`` (the tables and a summary;
``--render results/<tag>.json`` rewrites the markdown of an earlier run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import affine_coupling, permute
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormalizingFlow

from benchmarks.posteriors import metrics, models
from pyro_flows_ext.infer import AutoCouplingFlow, fit_guide, khat_verdict, psis_khat

RESULTS = Path(__file__).resolve().parent / "results"
KHAT_REPEATS = 5

SCHEDULES: dict[str, tuple[float, float]] = {
    "default": (5e-2, 1e-4),  # lr0 -> lr1, exponential decay over the run
    "slow": (1e-2, 1e-4),
}


def _pyro_coupling_flow(dim: int, num_layers: int = 4) -> ComposeTransformModule:
    """Pyro's own RealNVP stack: ``affine_coupling`` layers separated by random permutations."""
    layers: list[Any] = []
    for k in range(num_layers):
        if k:
            layers.append(permute(dim))
        layers.append(affine_coupling(dim))
    return ComposeTransformModule(layers)


GuideFactory = Callable[[Callable[..., Any]], Any]

GUIDES: dict[str, GuideFactory] = {
    "coupling_flow": lambda model: AutoCouplingFlow(model),
    "coupling_flow_nostl": lambda model: AutoCouplingFlow(model, stl=False),
    "coupling_flow_loc": lambda model: AutoCouplingFlow(model, init="loc"),
    "mvn": lambda model: AutoMultivariateNormal(model),
    "iaf": lambda model: AutoIAFNormal(model),
    "pyro_coupling": lambda model: AutoNormalizingFlow(model, _pyro_coupling_flow),
}
DEFAULT_GUIDES = ("coupling_flow", "mvn", "iaf", "pyro_coupling")


def fit(
    posterior: models.Posterior,
    guide_name: str,
    *,
    steps: int | None,
    schedule: str,
    particles: int | None,
    seed: int,
    num_draws: int,
    patience: int | None = None,
    cooldown: int | None = None,
) -> dict[str, Any]:
    """Fit one guide to one posterior with the shared protocol and measure it."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = posterior.model
    guide = GUIDES[guide_name](model)
    lr0, lr1 = SCHEDULES[schedule]
    history = fit_guide(
        model,
        guide,
        steps=steps,
        lr=lr0,
        lr_end=lr1,
        num_particles=particles,
        patience=patience,
        cooldown=cooldown,
        progress=False,
    )
    losses = history.loss
    row: dict[str, Any] = {
        "posterior": posterior.name,
        "guide": guide_name,
        "seconds": history.seconds,
        "cpu_seconds": history.cpu_seconds,
        "steps": len(losses),
        "elbo": -float(np.mean(losses[-100:])),
        "finite": bool(np.isfinite(losses[-100:]).all()),
    }
    if isinstance(guide, AutoCouplingFlow):
        row["init"] = guide.init_info.get("method")
    with torch.no_grad():
        draws = models.sample_quantities(posterior, guide, num_draws)
        row.update(metrics.accuracy(draws, posterior.reference).as_dict())
        # one k-hat from a few thousand draws varies by +-0.15 between draw sets: report the
        # median of KHAT_REPEATS independent estimates
        khats = [float(psis_khat(model, guide, num_samples=num_draws)) for _ in range(KHAT_REPEATS)]
        row["khat"] = float(np.median(khats))
        row["khats"] = khats
        row["verdict"] = khat_verdict(row["khat"], num_draws)
    return row


def _fmt(x: Any, width: int = 9) -> str:
    if isinstance(x, float):
        return f"{x:{width}.3g}" if math.isfinite(x) else f"{str(x):>{width}}"
    return f"{str(x):>{width}}"


def _diverged(error: str) -> bool:
    """Whether a fit stopped because a value became NaN (Pyro's validation reports it as
    "found invalid values")."""
    return "nan" in error.lower() or "invalid values" in error


COLUMNS = (
    "guide",
    "mean_err",
    "log_sd",
    "swd",
    "khat",
    "verdict",
    "cpu_s",
    "steps",
    "elbo",
    "init",
)


def _cells(row: dict[str, Any]) -> list[Any]:
    if "error" in row:
        failed = "diverged" if _diverged(row["error"]) else "error"
        return [row["guide"], failed] + [""] * (len(COLUMNS) - 2)
    return [
        row["guide"],
        row["max_mean_error"],
        row["max_log_sd_ratio"],
        row["sliced_wasserstein"],
        row["khat"],
        row.get("verdict", ""),
        row.get("cpu_seconds", row["seconds"]),
        str(row.get("steps", "")),
        row["elbo"],
        row.get("init", ""),
    ]


def table(name: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table for one posterior."""
    lines = [
        name,
        "  " + "".join(f"{c:>14}" if i == 0 else f"{c:>10}" for i, c in enumerate(COLUMNS)),
    ]
    for row in rows:
        cells = _cells(row)
        lines.append("  " + f"{cells[0]:>14}" + "".join(" " + _fmt(c) for c in cells[1:]))
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """All results as one markdown table."""
    out = [
        header,
        "",
        "| posterior | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for row in rows:
        cells = _cells(row)
        text = [
            c if isinstance(c, str) else (f"{c:.3g}" if math.isfinite(c) else str(c)) for c in cells
        ]
        out.append(f"| {row['posterior']} | " + " | ".join(text) + " |")
    return "\n".join(out) + "\n"


def summary(rows: list[dict[str, Any]], ours: str = "coupling_flow") -> str:
    """Per posterior, the most accurate guide by sliced Wasserstein distance and by largest mean
    error; how often ``ours`` is the most accurate, has k-hat < 0.7, and its time over IAF's."""
    by_post: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_post.setdefault(row["posterior"], {})[row["guide"]] = row

    def score(row: dict[str, Any], key: str) -> float:
        value = row.get(key, math.inf)
        return value if isinstance(value, float) and math.isfinite(value) else math.inf

    lines = [
        "| posterior | best by swd | best by mean_err | ours: khat | ours / iaf cpu time |",
        "|---|---|---|---|---|",
    ]
    wins_swd = wins_mean = khat_ok = total = 0
    ratios = []
    for name, guides in by_post.items():
        best_swd = min(guides, key=lambda g: score(guides[g], "sliced_wasserstein"))
        best_mean = min(guides, key=lambda g: score(guides[g], "max_mean_error"))
        mine = guides.get(ours, {})
        total += 1
        wins_swd += best_swd == ours
        wins_mean += best_mean == ours
        khat = mine.get("khat", math.nan)
        khat_ok += isinstance(khat, float) and khat < 0.7
        ratio = math.nan
        iaf = guides.get("iaf", {})
        if "seconds" in mine and "seconds" in iaf:
            key = "cpu_seconds" if "cpu_seconds" in mine and "cpu_seconds" in iaf else "seconds"
            ratio = mine[key] / iaf[key]
            ratios.append(ratio)
        lines.append(f"| {name} | {best_swd} | {best_mean} | {khat:.3g} | {ratio:.2f} |")
    median_ratio = float(np.median(ratios)) if ratios else math.nan
    lines += [
        "",
        f"{ours}: most accurate by swd on {wins_swd}/{total} posteriors, by largest mean error "
        f"on {wins_mean}/{total}; k-hat < 0.7 on {khat_ok}/{total}; median fit CPU time "
        f"{median_ratio:.2f} x AutoIAFNormal's.",
    ]
    return "\n".join(lines) + "\n"


def compact(rows: list[dict[str, Any]], guides: tuple[str, ...] = DEFAULT_GUIDES) -> str:
    """One row per posterior, one cell per guide: ``mean err / k-hat / cpu s``; bold marks
    the smallest sliced Wasserstein distance."""
    by_post: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_post.setdefault(row["posterior"], {})[row["guide"]] = row
    lines = [
        "| posterior | " + " | ".join(f"{g}: mean err / k-hat / cpu s" for g in guides) + " |",
        "|---" * (len(guides) + 1) + "|",
    ]
    for name, found in by_post.items():
        swd = {
            g: r["sliced_wasserstein"]
            for g, r in found.items()
            if "error" not in r and math.isfinite(r["sliced_wasserstein"])
        }
        best = min(swd, key=lambda g: swd[g]) if swd else None
        cells = []
        for g in guides:
            r = found.get(g)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("failed (NaN)" if _diverged(r["error"]) else "failed")
            else:
                seconds = r.get("cpu_seconds", r["seconds"])
                text = f"{r['max_mean_error']:.3g} / {r['khat']:.2f} / {seconds:.0f}"
                cells.append(f"**{text}**" if g == best else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(tag: str, rows: list[dict[str, Any]], header: str) -> None:
    text = [markdown(rows, header), compact(rows), summary(rows)]
    (RESULTS / f"{tag}.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--posteriors", default="all", help="comma-separated posteriordb names, or 'all'"
    )
    parser.add_argument(
        "--guides", default=",".join(DEFAULT_GUIDES), help=f"comma-separated, from {sorted(GUIDES)}"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps for every guide (default: fit_guide's, 3,000 or the guide's fit_defaults)",
    )
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="default")
    parser.add_argument(
        "--particles",
        type=int,
        default=None,
        help="particles for every guide (default: fit_guide's, 16 or the guide's fit_defaults)",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument(
        "--patience", type=int, default=None, help="early stopping (fit_guide's patience)"
    )
    parser.add_argument(
        "--cooldown", type=int, default=None, help="with --patience: fit_guide's cooldown"
    )
    parser.add_argument(
        "--draws", type=int, default=4000, help="guide draws for the metrics and k-hat"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="results file name (default: the schedule)")
    parser.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="only rewrite the markdown (tables and summary) of an earlier results JSON",
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        _write(Path(args.render).stem, saved["rows"], saved["header"])
        print(summary(saved["rows"]))
        return 0

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # the models take the data's dtype; so do Pyro's guides then
    names = list(models.NAMES) if args.posteriors == "all" else args.posteriors.split(",")
    guides = args.guides.split(",")
    unknown = [g for g in guides if g not in GUIDES]
    if unknown:
        parser.error(f"unknown guides {unknown}; known: {sorted(GUIDES)}")
    lr0, lr1 = SCHEDULES[args.schedule]
    steps_text = (
        "fit_guide's default steps (3000; AutoCouplingFlow's fit_defaults)"
        if args.steps is None
        else f"{args.steps} steps"
    )
    particles_text = (
        "fit_guide's default particles (16; AutoCouplingFlow's fit_defaults)"
        if args.particles is None
        else f"{args.particles} particles"
    )
    header = (
        f"{steps_text} of Adam, lr {lr0:g} -> {lr1:g} (exponential), Trace_ELBO with "
        f"{particles_text} (vectorised), {args.dtype}, early stopping "
        f"{'off' if args.patience is None else f'after {args.patience} steps'}"
        f"{'' if args.cooldown is None else f' and a cool-down of {args.cooldown}'}, seed "
        f"{args.seed}, {args.draws} draws (k-hat: median of {KHAT_REPEATS} sets); "
        f"schedule '{args.schedule}'"
    )
    print(header, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.schedule
    rows: list[dict[str, Any]] = []
    for name in names:
        posterior = models.load(name, dtype=dtype)
        posterior_rows = []
        for guide_name in guides:
            try:
                row = fit(
                    posterior,
                    guide_name,
                    steps=args.steps,
                    schedule=args.schedule,
                    particles=args.particles,
                    seed=args.seed,
                    num_draws=args.draws,
                    patience=args.patience,
                    cooldown=args.cooldown,
                )
            except Exception as err:  # keep going: a failing guide is a result too
                message = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"  {guide_name} failed: {message}", flush=True)
                row = {"posterior": name, "guide": guide_name, "error": message}
            posterior_rows.append(row)
            rows.append(row)
            with open(RESULTS / f"{tag}.json", "w") as fh:
                json.dump(
                    {"protocol": vars(args), "header": header, "rows": rows},
                    fh,
                    indent=1,
                    default=str,
                )
        print(table(name, posterior_rows), flush=True)
    _write(tag, rows, header)
    print(summary(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
