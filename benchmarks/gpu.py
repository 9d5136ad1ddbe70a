"""The GPU check: one command, on one GPU, within 8 minutes, one results file.

Three sections, each timed and each recorded even when it fails (the error goes into the
results instead of stopping the run):

* ``tests``: the CUDA test set, ``pytest -m gpu`` (the tests marked ``gpu``), in a
  subprocess; the counts of passed, failed and skipped tests and the summary line.
* ``glow``: a Glow on 28x28 MNIST (``../shared/images/mnist``: 9,000 training and 1,000
  test images, fixed by the seed) trained by :func:`~pyro_flows_ext.fit` with uniform
  dequantization for a fixed number of steps, in float32 and in bfloat16 autocast, eager and
  with ``compile=True``; per run the images per second after the first tenth of the steps
  (compilation falls there), the first step's seconds (compilation included), the peak
  memory the allocator held (CUDA) and the test bits/dim at the end.
* ``guides``: time per step of :func:`~pyro_flows_ext.infer.fit_guide` for
  ``AutoCouplingFlow`` on a posteriordb posterior and ``AutoHierarchicalFlow`` on the
  10,000-group funnel of ``benchmarks/hierarchical.py``, on the device and on the CPU (one
  thread, the README protocol), and their ratio. The first steps (the guide's start) are not
  timed.

Usage (from the repository root)::

    python -m benchmarks.gpu                          # on CUDA; writes benchmarks/results/gpu.*
    python -m benchmarks.gpu --device cpu --smoke     # the same code paths, tiny, on the CPU

``--smoke`` shrinks every size (a tiny Glow, 8 steps, a 50-group funnel). On a CPU the
bfloat16 runs are recorded as skipped (``fit`` allows bf16 autocast on CUDA only).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_flows_ext import datasets, glow
from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow, fit_guide
from pyro_flows_ext.train import bits_per_dim, fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("tests", "glow", "guides")


@dataclass(frozen=True)
class Sizes:
    """Everything ``--smoke`` shrinks."""

    train: int = 9000
    test: int = 1000
    depth: int = 8
    hidden: int = 256
    batch: int = 256
    glow_steps: int = 300
    posterior: str = "diamonds-diamonds"
    groups: int = 10_000
    guide_steps: int = 200
    warmup_steps: int = 20


FULL = Sizes()
SMOKE = Sizes(train=256, test=64, depth=1, hidden=8, batch=32, glow_steps=8,
              posterior="eight_schools-eight_schools_noncentered", groups=50, guide_steps=4,
              warmup_steps=2)  # fmt: skip


def attempt(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` with its seconds, or the error that stopped it (a failure is a result)."""
    start = time.perf_counter()
    try:
        row = run()
    except Exception as err:  # noqa: BLE001 - any failure is recorded, the run goes on
        row = {"error": f"{type(err).__name__}: {err}"[:500]}
    return row | {"seconds": round(time.perf_counter() - start, 2)}


# ------------------------------------------------------------------ CUDA tests ---------
def run_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m gpu`` over ``tests/`` in a subprocess: counts and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"returncode": done.returncode, "summary": summary, **counts, "failures": failed}


# ------------------------------------------------------------------ Glow on MNIST -------
def mnist(sizes: Sizes, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``sizes.train`` training and ``sizes.test`` test images of MNIST, cut by ``seed``."""
    images = datasets.load_mnist()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[perm[: sizes.train]], images[perm[-sizes.test :]]


def train_glow(data: tuple[torch.Tensor, torch.Tensor], sizes: Sizes, device: torch.device,
               bf16: bool, compile: bool) -> dict[str, Any]:  # fmt: skip
    """One Glow run with ``fit``: throughput, first step, peak memory, test bits/dim."""
    train, test = data
    torch.manual_seed(0)
    flow = glow((1, 28, 28), levels=2, depth=sizes.depth, hidden_channels=sizes.hidden)
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def tick(step: int, bpd: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    fit(flow, train, steps=sizes.glow_steps, batch_size=sizes.batch, dequantize=256,
        device=device, bf16=bf16, compile=compile, progress=False, callback=tick,
        eval_every=sizes.glow_steps, lr=1e-3)  # fmt: skip
    skip = max(1, len(stamps) // 10)
    steady = (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "images_per_s": round(sizes.batch / steady, 1),
        "first_step_s": round(stamps[0] - start, 2),
        "peak_memory_mb": None if peak is None else round(peak, 1),
        "test_bpd": round(bits_per_dim(flow, test, dequantize=256), 4),
        "steps": sizes.glow_steps,
        "batch": sizes.batch,
    }


def run_glow(sizes: Sizes, device: torch.device, compile: bool) -> dict[str, dict[str, Any]]:
    data = mnist(sizes)
    rows: dict[str, dict[str, Any]] = {}
    for bf16 in (False, True):
        for compiled in (False, True) if compile else (False,):
            name = f"{'bf16' if bf16 else 'float32'} {'compiled' if compiled else 'eager'}"
            if bf16 and device.type != "cuda":
                rows[name] = {"skipped": "bf16 autocast needs CUDA"}
                continue
            rows[name] = attempt(functools.partial(train_glow, data, sizes, device, bf16, compiled))
            print(f"glow {name}: {rows[name]}", flush=True)
    return rows


# ------------------------------------------------------------------ guides ------------
def posterior_problem(sizes: Sizes, device: torch.device) -> tuple[Callable[[], None], Any]:
    """A posteriordb model (float32) with its data on ``device``, and its guide."""
    from benchmarks.posteriors import models

    post = models.load(sizes.posterior, dtype=torch.float32)
    bound = post.model
    assert isinstance(bound, functools.partial)
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in bound.keywords.items()}
    model = functools.partial(bound.func, **data)
    return model, AutoCouplingFlow(model)


def funnel_problem(sizes: Sizes, device: torch.device) -> tuple[Callable[[], None], Any]:
    """The hierarchical funnel with ``sizes.groups`` groups on ``device``, and its guide."""
    from benchmarks import hierarchical

    y, s = (t.to(device, torch.float32) for t in hierarchical.funnel_data(sizes.groups))
    model = functools.partial(hierarchical.model, y, s)
    plates = functools.partial(hierarchical.groups_plate, y, s)
    return model, AutoHierarchicalFlow(model, create_plates=plates)


def ms_per_step(problem: Callable[..., tuple[Callable[[], None], Any]], sizes: Sizes,
                device: torch.device, particles: int) -> float:  # fmt: skip
    """Milliseconds per ``fit_guide`` step on ``device`` after the untimed first steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with torch.device(device):  # the models' constants and the guides' parameters
        model, guide = problem(sizes, device)
        kw = {"num_particles": particles, "progress": False}
        fit_guide(model, guide, steps=sizes.warmup_steps, **kw)
        history = fit_guide(model, guide, steps=sizes.guide_steps, **kw)
    return 1e3 * history.seconds / len(history.loss)


def compare_guide(problem: Callable[..., Any], sizes: Sizes, device: torch.device,
                  particles: int) -> dict[str, Any]:  # fmt: skip
    cpu = ms_per_step(problem, sizes, torch.device("cpu"), particles)
    dev = ms_per_step(problem, sizes, device, particles)
    return {"device_ms_per_step": round(dev, 2), "cpu_ms_per_step": round(cpu, 2),
            "cpu_over_device": round(cpu / dev, 2), "steps": sizes.guide_steps,
            "particles": particles}  # fmt: skip


def run_guides(sizes: Sizes, device: torch.device) -> dict[str, dict[str, Any]]:
    rows = {
        f"AutoCouplingFlow, {sizes.posterior}": attempt(
            lambda: compare_guide(posterior_problem, sizes, device, particles=16)
        ),
        f"AutoHierarchicalFlow, funnel G={sizes.groups}": attempt(
            lambda: compare_guide(funnel_problem, sizes, device, particles=8)
        ),
    }
    for name, row in rows.items():
        print(f"guide {name}: {row}", flush=True)
    return rows


# ------------------------------------------------------------------ driver ------------
def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    out = [f"device: {results['device']}; torch {results['torch']}; smoke: {results['smoke']}; "
           f"{results['seconds']:.0f} s in all", ""]  # fmt: skip
    tests = results["sections"].get("tests")
    if tests is not None:
        out += [f"CUDA tests (`pytest -m gpu`): {tests.get('summary', tests.get('error'))}", ""]
    for section, key in (("glow", "run"), ("guides", "guide")):
        rows = results["sections"].get(section)
        if not rows or "error" in rows:
            continue
        cols = sorted({c for r in rows.values() for c in r})
        out += [f"| {key} | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        out += [f"| {n} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |"
                for n, r in rows.items()]  # fmt: skip
        out.append("")
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths")
    parser.add_argument(
        "--parts",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: {','.join(SECTIONS)})",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled Glow runs")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--tests-timeout", type=float, default=240.0, metavar="S")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (.json, with a .md beside it; default "
                        "benchmarks/results/gpu.json, gpu_smoke.json with --smoke)")  # fmt: skip
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(SECTIONS))
    if unknown or not parts:
        parser.error(f"--parts takes some of {', '.join(SECTIONS)}, got {args.parts!r}")
    args.parts = parts
    if args.out is None:
        args.out = RESULTS / ("gpu_smoke.json" if args.smoke else "gpu.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pyro_flows_ext.train import resolve_device

    args = parse(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    runs: dict[str, Callable[[], Any]] = {
        "tests": lambda: attempt(lambda: run_tests(args.tests_timeout)),
        "glow": lambda: run_glow(sizes, device, compile=not args.no_compile),
        "guides": lambda: run_guides(sizes, device),
    }
    sections: dict[str, Any] = {}
    for part in args.parts:
        sections[part] = runs[part]()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "smoke": args.smoke,
               "threads": args.threads, "sections": sections,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=_plain) + "\n")
    text = markdown(results)
    args.out.with_suffix(".md").write_text(f"# GPU check\n\n{text}\n")
    print(text)
    return results


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


if __name__ == "__main__":
    main()
