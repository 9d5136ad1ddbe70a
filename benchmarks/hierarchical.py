"""Guides for a hierarchical normal model (a funnel) against its exact posterior, at growing
numbers of groups.

The model is the centred hierarchical normal model with known noise scales::

    mu ~ N(0, 5),  tau ~ HalfCauchy(5),  theta_g ~ N(mu, tau),  y_g ~ N(theta_g, s_g),

with ``s_g ~ U(8, 16)`` (weak data: the posterior is a funnel in ``(log tau, theta)``), data
simulated at ``mu = 4, tau = 3``. Its posterior is exact up to a 1-D quadrature: ``mu`` and
``theta`` integrate out in closed form (``y_g | mu, tau ~ N(mu, tau^2 + s_g^2)``, then
``mu | tau, y`` and ``theta_g | mu, tau, y`` are Gaussian), so the marginal of ``log tau`` is
computed on a fine grid and the means and sds of ``mu``, ``log tau`` and every ``theta_g`` are
mixtures over it.

One protocol for every guide: ``steps`` of ``ClippedAdam`` (no clipping) with the step size
decaying exponentially from ``lr0`` to ``lr1``, ``Trace_ELBO`` with ``particles`` vectorised
particles, seed 0, one run, on one thread. ``--optims clipped,lazy`` runs every guide also with
:class:`~pyro_flows_ext.optim.LazyClippedAdam` (``fit_guide``'s optimiser: a subsampled step
updates only its rows of the per-element parameters; rows ``guide (lazy)``), so that the two
updates' step times and accuracies come from the same run; ``--optims fit_guide`` fits with
:func:`~pyro_flows_ext.infer.fit_guide` itself (its lazy optimiser; same steps, step sizes and
particles; rows ``guide (fit_guide)``). With ``G:B`` in ``--sizes`` the model subsamples ``B``
groups per step (``pyro.plate(..., subsample_size=B)``); AutoNormal and AutoHierarchicalFlow
support that. For each guide it reports the largest |mean error| / sd and |log sd ratio| over
all latents (``mu``, ``log tau``, every ``theta_g``: the unconstrained space) and over the
globals alone, estimated from ``--draws`` guide draws, the time per step, the CPU seconds of
the whole fit (``time.process_time``) and the number of parameters.

Usage (from the repository root)::

    python -m benchmarks.hierarchical                      # the default sizes and guides
    python -m benchmarks.hierarchical --sizes 8,1000 --steps 500 --guides normal,hierarchical
    python -m benchmarks.hierarchical --sizes 100000:1000 --guides normal,hierarchical
    python -m benchmarks.hierarchical --sizes 100000:1000 --guides hierarchical \
        --optims clipped,lazy
    python -m benchmarks.hierarchical --sizes 100000:1000 --guides hierarchical \
        --optims fit_guide --steps 20000

The table is printed and written to ``benchmarks/results/hierarchical.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from torch import Tensor

from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow, fit_guide
from pyro_flows_ext.optim import lazy_clipped_adam

RESULTS = Path(__file__).resolve().parent / "results"
PRIOR_MU, PRIOR_TAU = 5.0, 5.0
SMALL = 100  # the largest G for the guides over one packed vector (MVN, IAF, coupling flow)


# ------------------------------------------------------------------ model and truth -----
def funnel_data(groups: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Noise scales ``s`` and data ``y`` of ``groups`` groups (float64)."""
    gen = torch.Generator().manual_seed(seed)
    s = 8.0 + 8.0 * torch.rand(groups, generator=gen, dtype=torch.float64)
    theta = 4.0 + 3.0 * torch.randn(groups, generator=gen, dtype=torch.float64)
    return theta + s * torch.randn(groups, generator=gen, dtype=torch.float64), s


def model(y: Tensor, s: Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_MU))
    tau = pyro.sample("tau", dist.HalfCauchy(PRIOR_TAU))
    with pyro.plate("groups", len(y), subsample_size=batch, dim=-1) as i:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, s[i].to(theta)), obs=y[i].to(theta))


def groups_plate(y: Tensor, s: Tensor, batch: int | None = None) -> Any:
    """The guides' plate, so that a full (unsubsampled) call draws every group."""
    return pyro.plate("groups", len(y), subsample_size=batch, dim=-1)


def exact_moments(y: Tensor, s: Tensor, grid: int = 4000, chunk: int = 10_000) -> dict[str, Tensor]:
    """Posterior means and sds of ``mu``, ``log_tau`` and ``theta`` (by quadrature in
    ``log tau`` and closed-form Gaussian conditionals), ``chunk`` groups at a time (a
    ``(grid, groups)`` table of 100,000 groups would take gigabytes)."""
    lt = torch.linspace(-12.0, 6.0, grid, dtype=torch.float64)[:, None]  # (T, 1)
    tau2 = (2 * lt).exp()
    parts = [y.split(chunk), s.split(chunk)]
    prec_mu = torch.full_like(lt, 1 / PRIOR_MU**2)
    weighted, log_lik = torch.zeros_like(lt), torch.zeros_like(lt)
    for yc, sc in zip(*parts, strict=True):
        var = tau2 + sc**2  # (T, chunk): y_g | mu, tau ~ N(mu, var)
        prec_mu += (1 / var).sum(-1, keepdim=True)
        weighted += (yc / var).sum(-1, keepdim=True)
        log_lik -= 0.5 * (var.log() + yc**2 / var).sum(-1, keepdim=True)
    mu_hat = weighted / prec_mu
    log_lik += 0.5 * mu_hat**2 * prec_mu - 0.5 * prec_mu.log()
    log_prior = dist.HalfCauchy(PRIOR_TAU).log_prob(lt.exp()) + lt  # density of log tau
    w = torch.softmax((log_lik + log_prior).squeeze(-1), 0)[:, None]  # (T, 1)
    v_mu = 1 / prec_mu

    def mix(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        m = (w * mean).sum(0)
        return m, ((w * (variance + mean**2)).sum(0) - m**2).clamp_min(0).sqrt()

    thetas = []
    for yc, sc in zip(*parts, strict=True):
        prec_t = 1 / tau2 + 1 / sc**2
        m_theta = (mu_hat / tau2 + yc / sc**2) / prec_t
        thetas.append(mix(m_theta, 1 / prec_t + (1 / (tau2 * prec_t)) ** 2 * v_mu))
    out = {"theta_mean": torch.cat([m for m, _ in thetas])}
    out["theta_sd"] = torch.cat([sd for _, sd in thetas])
    for name, (m, v) in {"mu": (mu_hat, v_mu), "log_tau": (lt, torch.zeros_like(lt))}.items():
        out[name + "_mean"], out[name + "_sd"] = mix(m, v)
    return out


# ------------------------------------------------------------------ guides --------------
GUIDES: dict[str, Callable[[Callable], Any]] = {
    "normal": lambda m: AutoNormal(m, create_plates=groups_plate),
    "mvn": lambda m: AutoMultivariateNormal(m),
    "iaf": lambda m: AutoIAFNormal(m, num_transforms=2),
    "coupling": lambda m: AutoCouplingFlow(m, init="loc"),
    "hierarchical": lambda m: AutoHierarchicalFlow(m, create_plates=groups_plate),
}
SUBSAMPLING = ("normal", "hierarchical")
OPTIMS = ("clipped", "lazy", "fit_guide")


def fit(
    guide: Any,
    args: tuple,
    steps: int,
    particles: int,
    lr0: float,
    lr1: float,
    model: Callable[..., None] = model,
    optim: str = "clipped",
) -> dict:
    """Train with the protocol (``optim``: ``"clipped"`` for ``ClippedAdam``, ``"lazy"`` for
    ``LazyClippedAdam``, ``"fit_guide"`` for :func:`~pyro_flows_ext.infer.fit_guide`);
    ``time.process_time`` seconds and the step time."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    cpu, wall = time.process_time(), time.perf_counter()
    if optim == "fit_guide":
        options = {"steps": steps, "lr": lr0, "lr_end": lr1, "num_particles": particles}
        losses = fit_guide(model, guide, *args, **options, progress=False).loss
    else:
        options = {"lr": lr0, "lrd": (lr1 / lr0) ** (1 / steps), "clip_norm": math.inf}
        adam = lazy_clipped_adam(options) if optim == "lazy" else pyro.optim.ClippedAdam(options)
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
        svi = SVI(model, guide, adam, elbo)
        losses = [svi.step(*args) for _ in range(steps)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    params = sum(p.numel() for p in guide.parameters())
    tail = losses[-min(100, steps) :]
    return {
        "cpu_s": cpu,
        "ms_per_step": 1e3 * wall / steps,
        "params": params,
        "elbo": -sum(tail) / len(tail),
    }


def funnel_values(out: dict[str, Tensor], num: int) -> dict[str, Tensor]:
    """The funnel's latents on the unconstrained scale, ``(num, -1)`` each."""
    return {
        "mu": out["mu"].reshape(num, -1),
        "log_tau": out["tau"].reshape(num, -1).log(),
        "theta": out["theta"].reshape(num, -1),
    }


@torch.no_grad()
def guide_moments(
    guide: Any,
    args: tuple,
    values: Callable[[dict[str, Tensor], int], dict[str, Tensor]],
    draws: int,
    chunk: int,
) -> dict[str, Tensor]:
    """Means and sds of the guide's latents as ``values`` gives them (unconstrained,
    ``(num, -1)`` each), from ``draws`` draws taken ``chunk`` at a time."""
    sums: dict[str, list[Tensor]] = {}
    done = 0
    while done < draws:
        num = min(chunk, draws - done)
        with pyro.plate("_draws", num, dim=-3):
            out = guide(*args)
        for k, v in values(out, num).items():
            v = v.double()
            acc = sums.setdefault(k, [torch.zeros(v.shape[1:], dtype=v.dtype)] * 2)
            sums[k] = [acc[0] + v.sum(0), acc[1] + (v**2).sum(0)]
        done += num
    res = {}
    for k, (a, b) in sums.items():
        mean = a / draws
        res[k + "_mean"], res[k + "_sd"] = mean, (b / draws - mean**2).clamp_min(0).sqrt()
    return res


def errors(
    truth: dict[str, Tensor],
    got: dict[str, Tensor],
    globals_: tuple[str, ...],
    locals_: tuple[str, ...],
) -> dict[str, float]:
    """The largest |mean error| / sd and |log sd ratio|, over all latents and the globals."""
    out: dict[str, float] = {}
    for scope, names in (("all", globals_ + locals_), ("glob", globals_)):
        mean = max(
            float(((got[n + "_mean"] - truth[n + "_mean"]).abs() / truth[n + "_sd"]).max())
            for n in names
        )
        sd = max(float((got[n + "_sd"] / truth[n + "_sd"]).log().abs().max()) for n in names)
        out[f"mean_{scope}"], out[f"log_sd_{scope}"] = mean, sd
    return out


# ------------------------------------------------------------------ driver --------------
def run_one(
    kind: str, groups: int, batch: int | None, opts: argparse.Namespace, optim: str = "clipped"
) -> dict:
    y, s = funnel_data(groups)
    dtype = torch.float32
    y, s = y.to(dtype), s.to(dtype)
    guide = GUIDES[kind](model)
    label = kind if optim == "clipped" else f"{kind} ({optim})"
    row: dict[str, Any] = {"G": groups, "B": batch or groups, "guide": label}

    def score() -> dict:
        fit_args = (opts.steps, opts.particles, opts.lr0, opts.lr1)
        out = fit(guide, (y, s, batch), *fit_args, optim=optim)
        truth = exact_moments(y.double(), s.double())
        chunk = max(1, min(opts.draws, 2_000_000 // groups))
        got = guide_moments(guide, (y, s, None), funnel_values, opts.draws, chunk)
        return out | errors(truth, got, ("mu", "log_tau"), ("theta",))

    return row | attempt(score)


def attempt(score: Callable[[], dict]) -> dict:
    """``score()``, or the error that stopped it (a guide that went to NaN is a result)."""
    try:
        return score()
    except (ValueError, RuntimeError) as e:
        return {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}


def cells(r: dict) -> str:
    """A row's accuracy, time and size cells, or its failure."""
    if "failed" in r:
        return f"failed ({r['failed']}) |" + " |" * 6
    return (
        f"{r['mean_all']:.3f} | {r['log_sd_all']:.3f} | {r['mean_glob']:.3f} "
        f"| {r['log_sd_glob']:.3f} | {r['ms_per_step']:.1f} | {r['cpu_s']:.1f} | {r['params']} |"
    )


def table(rows: list[dict], opts: argparse.Namespace) -> str:
    head = (
        "| G | B | guide | mean err (all) | log sd (all) | mean err (globals) | "
        "log sd (globals) | ms/step | CPU s | params |"
    )
    lines = [
        f"Protocol: {opts.steps} steps of ClippedAdam ('(lazy)': LazyClippedAdam, "
        f"'(fit_guide)': fit_guide), lr "
        f"{opts.lr0:g} -> {opts.lr1:g} (exponential), Trace_ELBO with {opts.particles} "
        f"vectorised particles, float32, one thread, seed 0, one run; moments from "
        f"{opts.draws} guide draws.",
        "",
        head,
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(f"| {r['G']} | {r['B']} | {r['guide']} | {cells(r)}")
    return "\n".join(lines) + "\n"


def protocol_parser(doc: str, guides: dict, steps: int, out: Path) -> argparse.ArgumentParser:
    """A parser with the options of the fitting protocol shared by the hierarchical
    benchmarks (guides, steps, particles, step sizes, draws, output file)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--guides", default=",".join(guides), help=f"of {', '.join(guides)}")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr0", type=float, default=5e-2)
    p.add_argument("--lr1", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=out)
    return p


def parse_protocol(
    p: argparse.ArgumentParser, guides: dict, argv: list[str] | None
) -> argparse.Namespace:
    """Parse ``argv``; a usage error for guides not in ``guides``."""
    opts = p.parse_args(argv)
    unknown = set(opts.guides.split(",")) - set(guides)
    if unknown:
        p.error(f"unknown guides {sorted(unknown)}; choose from {sorted(guides)}")
    return opts


def write_results(path: Path, title: str, text: str) -> None:
    """Print ``text`` and write it under the heading ``title`` to ``path``."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = protocol_parser(__doc__, GUIDES, 3000, RESULTS / "hierarchical.md")
    p.add_argument(
        "--sizes", default="8,100,1000,10000,100000:1000", help="G or G:B, comma separated"
    )
    p.add_argument(
        "--optims", default="clipped", help=f"of {', '.join(OPTIMS)}, comma separated: the "
        "optimisers each guide is fitted with (lazy: fit_guide's LazyClippedAdam; fit_guide: "
        "fit_guide itself)",
    )  # fmt: skip
    opts = parse_protocol(p, GUIDES, argv)
    unknown = set(opts.optims.split(",")) - set(OPTIMS)
    if unknown:
        p.error(f"unknown optims {sorted(unknown)}; choose from {list(OPTIMS)}")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    torch.set_num_threads(1)
    rows = []
    for size in opts.sizes.split(","):
        groups, _, b = size.partition(":")
        batch = int(b) if b else None
        for kind in opts.guides.split(","):
            if (int(groups) > SMALL and kind not in SUBSAMPLING) or (
                batch and kind not in SUBSAMPLING
            ):
                continue
            for optim in opts.optims.split(","):
                rows.append(run_one(kind, int(groups), batch, opts, optim))
                print(table(rows[-1:], opts).splitlines()[-1], flush=True)
    title = "Hierarchical normal model (funnel): guides against the exact posterior"
    write_results(opts.out, title, table(rows, opts))


if __name__ == "__main__":
    main()
