"""Density estimation on scikit-learn's digits: our Glow and RealNVP against peer libraries.

Every model is wrapped as an ``nn.Module`` whose ``log_prob(y)`` takes a batch of
preprocessed images ``y`` of shape ``(B, 1, 8, 8)`` (vector models flatten it to ``(B, 64)``)
and returns shape ``(B,)``; all of them, ours included, train through the *one* loop below, so
the protocol is identical by construction:

* data: ``load_digits_split(seed=0)``, 1,200 train / 300 valid / 297 test images, 17 levels;
* preprocessing: the package's ``Dequantize(17)`` (uniform noise, then the logit with its
  Jacobian), bits/dim of the raw data;
* batches and dequantization noise: from generators seeded by ``(seed, epoch)`` and
  ``(seed, step)``, so every model sees the same batches with the same noise;
* optimiser: Adam, lr 1e-3 with a linear warm-up over 100 steps, gradient-norm clipping at 50
  (``pyro_flows_ext.train.fit``'s defaults), the same step budget and batch size;
* data-dependent initialisation: one ``log_prob`` call without gradient on 256 training images
  before the first step (initialises ActNorm; a no-op for the peers);
* early stopping: validation bits/dim (fixed noise seed) every 25 steps, stop after 10
  evaluations without improvement, best weights restored;
* test: bits/dim on the 297 test images with a fixed noise seed, the same for all models.

The loop is ``fit``'s, step for step: ``--models glow-fit,realnvp-fit`` trains our two
models through ``pyro_flows_ext.train.fit`` instead, and gives the same numbers (checked with
``--steps 300``: glow and glow-fit agree to the last digit). ``fit`` itself only takes our
``Flow``, hence the common loop for the peers.

``steps/s`` counts training steps only (forward, backward, optimiser), not evaluations; the
machine is shared, so treat it as indicative. The baseline ``gaussian`` is a full-covariance
Gaussian in logit space fitted by maximum likelihood in closed form (mean and covariance of the
preprocessed training images over 10 dequantization draws); it has no training steps.

Run (needs the ``bench`` extra: zuko, nflows)::

    python benchmarks/density.py                          # all models, 3000 steps, batch 128
    python benchmarks/density.py --steps 300 --out benchmarks/results/density.smoke
    python benchmarks/density.py --models glow,zuko-maf --threads 2
    python benchmarks/density.py --tune    # realnvp-spline and zuko-nsf: best of 4 configs each

``--tune`` gives the best of our flows and the best peer the same tuning effort: four
configurations each (ours: ``hidden_channels`` 16/32 x ``depth`` 2/3; zuko's NSF: 3/5
transforms x hidden 64/128), each trained under the protocol, the row being the one with the
best validation bits/dim (its test bits/dim; the others are listed in the model notes).
The class-conditional row (``realnvp-spline-cond``) scores ``p(x | digit)`` with the true
labels, so it is not comparable with the unconditional rows: it shows what the label is worth.

Results: a table on stdout, ``<out>.json`` and ``<out>.md`` (default
``benchmarks/results/density``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import pyro_flows_ext
from pyro_flows_ext.datasets import load_digits_split
from pyro_flows_ext.flows import Flow, glow, realnvp
from pyro_flows_ext.train import Dequantize

SHAPE = (1, 8, 8)
DIMS = math.prod(SHAPE)
WARMUP, CLIP, LR = 100, 50.0, 1e-3
EVAL_EVERY, PATIENCE, INIT_BATCH = 25, 10, 256
GAUSSIAN_DRAWS = 10


def _seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``(seed, *keys)``."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------- models


class Density(nn.Module):
    """A density model of preprocessed images: ``log_prob((B, 1, 8, 8)) -> (B,)``; a
    class-conditional one (``conditional = True``) also takes the one-hot labels ``(B, 10)``."""

    conditional = False

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class OurFlow(Density):
    """One of our :class:`Flow` s on ``(B, 1, 8, 8)`` (conditional when the flow is)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow
        self.conditional = flow.context_dim > 0

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.flow.log_prob(y, context=context)


class Flattened(Density):
    """A vector density model on ``y.flatten(1)``; ``fn(module, x)`` computes ``log p(x)``."""

    def __init__(self, module: nn.Module, fn: Callable[[Any, Tensor], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.fn(self.module, y.flatten(1))


class PyroAffineStack(Density):
    """Pyro's own flow: ``affine_coupling`` layers with reversing ``Permute`` between them,
    in a ``TransformedDistribution`` over a standard normal on 64 dimensions."""

    base_loc: Tensor
    base_scale: Tensor

    def __init__(self, layers: int, hidden_dims: list[int]) -> None:
        super().__init__()
        from pyro.distributions.transforms import Permute, affine_coupling

        self.couplings = nn.ModuleList(
            [affine_coupling(DIMS, hidden_dims=hidden_dims) for _ in range(layers)]
        )
        reverse = torch.arange(DIMS - 1, -1, -1)
        self.transforms: list[Any] = []
        for i, c in enumerate(self.couplings):
            if i:
                self.transforms.append(Permute(reverse))
            self.transforms.append(c)
        self.register_buffer("base_loc", torch.zeros(DIMS))
        self.register_buffer("base_scale", torch.ones(DIMS))

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        import pyro.distributions as dist

        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms).log_prob(y.flatten(1))


def _zuko(kind: str, transforms: int = 3, hidden: int = 64) -> Density:
    import zuko

    if kind == "nsf":
        flow = zuko.flows.NSF(DIMS, transforms=transforms, hidden_features=(hidden, hidden))
    else:
        flow = zuko.flows.MAF(DIMS, transforms=5, hidden_features=(128, 128))
    return Flattened(flow, lambda m, x: m().log_prob(x))


def _nflows() -> Density:
    from nflows.flows.realnvp import SimpleRealNVP

    flow = SimpleRealNVP(DIMS, hidden_features=64, num_layers=8, num_blocks_per_layer=2)
    return Flattened(flow, lambda m, x: m.log_prob(x))


# name -> (description, builder)
MODELS: dict[str, tuple[str, Callable[[], Density] | None]] = {
    "gaussian": ("full-covariance Gaussian in logit space, closed-form ML", None),
    "glow": (
        "ours: glow((1, 8, 8), hidden_channels=64) (L=2, K=8)",
        lambda: OurFlow(glow(SHAPE, hidden_channels=64)),
    ),
    "realnvp": (
        "ours: realnvp((1, 8, 8), hidden_channels=32) (L=3, 3 couplings/scale)",
        lambda: OurFlow(realnvp(SHAPE, hidden_channels=32)),
    ),
    "realnvp-spline": (
        "ours: realnvp((1, 8, 8), hidden_channels=32, coupling='spline') (L=3, 3 couplings/scale)",
        lambda: OurFlow(realnvp(SHAPE, hidden_channels=32, coupling="spline")),
    ),
    "glow-spline": (
        "ours: glow((1, 8, 8), hidden_channels=32, coupling='spline') (L=2, K=8)",
        lambda: OurFlow(glow(SHAPE, hidden_channels=32, coupling="spline")),
    ),
    "realnvp-spline-cond": (
        "ours, class-conditional: realnvp-spline with context_dim=10 (one-hot digit), "
        "bits/dim of p(x | label)",
        lambda: OurFlow(realnvp(SHAPE, hidden_channels=32, coupling="spline", context_dim=10)),
    ),
    "glow-fit": ("cross-check: glow as above, trained by pyro_flows_ext.train.fit", None),
    "realnvp-fit": ("cross-check: realnvp as above, trained by pyro_flows_ext.train.fit", None),
    "zuko-nsf": ("zuko.flows.NSF(64, transforms=3, hidden (64, 64), 8 bins)", lambda: _zuko("nsf")),
    "zuko-maf": ("zuko.flows.MAF(64, transforms=5, hidden (128, 128))", lambda: _zuko("maf")),
    "nflows-realnvp": ("nflows SimpleRealNVP(64, 64 hidden, 8 layers, 2 blocks)", _nflows),
    "pyro-affine": (
        "pyro affine_coupling x8, hidden [128, 128], reversing Permute",
        lambda: PyroAffineStack(8, [128, 128]),
    ),
}
DEFAULT = [name for name in MODELS if not name.endswith("-fit")]

# --tune: the same number of configurations for the best of ours and the best peer, each
# chosen by its best validation bits/dim; name -> [(label, builder)]
GRIDS: dict[str, list[tuple[str, Callable[[], Density]]]] = {
    "realnvp-spline": [
        (f"hidden_channels={h}, depth={k}",
         lambda h=h, k=k: OurFlow(realnvp(SHAPE, depth=k, hidden_channels=h, coupling="spline")))
        for h in (16, 32) for k in (2, 3)
    ],
    "zuko-nsf": [
        (f"transforms={t}, hidden=({h}, {h})", lambda t=t, h=h: _zuko("nsf", t, h))
        for t in (3, 5) for h in (64, 128)
    ],
}  # fmt: skip

# ------------------------------------------------------------------------------ protocol


@dataclass
class Result:
    """One model's outcome (bits/dim of the raw data; ``None`` where not applicable)."""

    model: str
    description: str
    params: int
    test_bpd: float | None = None
    best_valid_bpd: float | None = None
    best_step: int | None = None
    steps_run: int = 0
    stopped_early: bool = False
    steps_per_s: float | None = None
    seconds: float = 0.0
    error: str | None = None
    valid_curve: list[tuple[int, float]] = field(default_factory=list)


def bits_per_dim(
    model: Density, data: Tensor, pre: Dequantize, seed: int, context: Tensor | None = None
) -> float:
    """Mean ``-log p(x) / (D log 2)`` of raw images ``data`` (given ``context``, one row per
    image, for a conditional model), noise from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, data.shape[0], 500):
            y, log_det = pre(data[start : start + 500].float(), len(SHAPE), g)
            c = None if context is None else context[start : start + 500]
            total -= float((model.log_prob(y, c) + log_det).double().sum())
    return total / (data.shape[0] * DIMS * math.log(2))


def one_hot_labels(split: Any, model: Density) -> tuple[Tensor | None, ...]:
    """The one-hot digit of every train/valid/test image for a conditional model."""
    if not model.conditional:
        return None, None, None
    parts = (split.labels.train, split.labels.valid, split.labels.test)
    return tuple(torch.nn.functional.one_hot(p, 10).float() for p in parts)


def train(
    name: str, model: Density, split: Any, pre: Dequantize, steps: int, batch: int, seed: int
) -> Result:
    """The common loop (see the module docstring); returns the :class:`Result`."""
    params = sum(p.numel() for p in model.parameters())
    result = Result(name, MODELS[name][0], params)
    x_train, x_valid, x_test = split.train, split.valid, split.test
    c_train, c_valid, c_test = one_hot_labels(split, model)
    n = x_train.shape[0]
    batch = min(batch, n)
    per_epoch = n // batch

    g = torch.Generator().manual_seed(_seed(seed, 2))
    init = torch.randperm(n, generator=g)[:INIT_BATCH]
    with torch.no_grad():  # data-dependent initialisation (ActNorm)
        y, _ = pre(x_train[init].float(), len(SHAPE), g)
        model.log_prob(y, None if c_train is None else c_train[init])

    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    best_state: dict[str, Tensor] | None = None
    bad, perm, epoch = 0, torch.empty(0, dtype=torch.long), -1
    train_time, start_all = 0.0, time.perf_counter()
    for step in range(steps):
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch = e
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 0, e)))
        idx = perm[i * batch : (i + 1) * batch]
        x, c = x_train[idx].float(), None if c_train is None else c_train[idx]
        t0 = time.perf_counter()
        model.train()
        y, log_det = pre(x, len(SHAPE), torch.Generator().manual_seed(_seed(seed, 1, step)))
        loss = -(model.log_prob(y, c) + log_det).mean() / (DIMS * math.log(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        value, gnorm = float(loss.detach()), float(norm)
        if not (math.isfinite(value) and math.isfinite(gnorm)):
            result.error = f"diverged at step {step + 1} (loss {value}, grad norm {gnorm})"
            break
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        result.steps_run = step + 1
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            score = bits_per_dim(model, x_valid, pre, _seed(seed, 3), c_valid)
            result.valid_curve.append((step + 1, score))
            if result.best_valid_bpd is None or score < result.best_valid_bpd:
                result.best_valid_bpd, result.best_step, bad = score, step + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= PATIENCE:
                    result.stopped_early = True
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
        result.test_bpd = bits_per_dim(model, x_test, pre, _seed(seed, 4), c_test)
    result.steps_per_s = result.steps_run / train_time if train_time > 0 else None
    result.seconds = time.perf_counter() - start_all
    return result


def tune(name: str, split: Any, pre: Dequantize, steps: int, batch: int, seed: int) -> Result:
    """Train every configuration of ``GRIDS[name]`` under the protocol; the one with the best
    validation bits/dim is the row (its test bits/dim), the others are listed with it."""
    tried: list[tuple[str, Result]] = []
    for label, builder in GRIDS[name]:
        torch.manual_seed(_seed(seed, 6))
        tried.append((label, train(name, builder(), split, pre, steps, batch, seed)))
        print(f"  {name} [{label}]: valid {_f(tried[-1][1].best_valid_bpd, '.3f')}", flush=True)
    ok = [(label, r) for label, r in tried if r.best_valid_bpd is not None]
    label, best = min(ok, key=lambda lr: lr[1].best_valid_bpd or math.inf)
    grid = "; ".join(f"{lab}: valid {_f(r.best_valid_bpd, '.3f')}" for lab, r in tried)
    best.description = f"{MODELS[name][0]}, tuned: best of [{grid}] -> {label}"
    best.seconds = sum(r.seconds for _, r in tried)
    return best


def train_with_fit(
    name: str, split: Any, pre: Dequantize, steps: int, batch: int, seed: int
) -> Result:
    """Our model trained by our own ``fit`` with the protocol's settings: a check that the
    common loop is ``fit`` (same batches, noise, evaluations; the rows should agree)."""
    from pyro_flows_ext.train import fit

    flow = glow(SHAPE) if name == "glow-fit" else realnvp(SHAPE, hidden_channels=32)
    result = Result(name, MODELS[name][0], sum(p.numel() for p in flow.parameters()))
    start = time.perf_counter()
    h = fit(
        flow,
        split.train,
        valid=split.valid,
        steps=steps,
        batch_size=batch,
        lr=LR,
        warmup=WARMUP,
        clip_grad=CLIP,
        eval_every=EVAL_EVERY,
        patience=PATIENCE,
        device="cpu",
        dequantize=pre,
        progress=False,
        seed=seed,
    )
    result.best_valid_bpd, result.best_step = h.best_valid, h.best_step
    result.steps_run, result.stopped_early = len(h.step), h.stopped_early
    result.valid_curve = list(zip(h.valid_step, h.valid_bpd, strict=True))
    result.steps_per_s = len(h.step) / sum(h.step_time) if h.step_time else None
    result.test_bpd = bits_per_dim(OurFlow(flow), split.test, pre, _seed(seed, 4))
    result.seconds = time.perf_counter() - start
    return result


class GaussianBaseline(Density):
    """A full-covariance Gaussian over the flattened preprocessed image."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        self.dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.dist.log_prob(y.flatten(1).double()).float()


def gaussian(split: Any, pre: Dequantize, seed: int) -> Result:
    """Closed-form maximum likelihood: mean and (biased) covariance of the preprocessed
    training images over :data:`GAUSSIAN_DRAWS` dequantization draws."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(_seed(seed, 5))
    ys = [pre(split.train.float(), len(SHAPE), g)[0].flatten(1) for _ in range(GAUSSIAN_DRAWS)]
    y = torch.cat(ys).double()
    mean = y.mean(0)
    cov = (y - mean).T @ (y - mean) / y.shape[0]
    model = GaussianBaseline(mean, cov)
    result = Result("gaussian", MODELS["gaussian"][0], DIMS + DIMS * (DIMS + 1) // 2)
    result.best_valid_bpd = bits_per_dim(model, split.valid, pre, _seed(seed, 3))
    result.test_bpd = bits_per_dim(model, split.test, pre, _seed(seed, 4))
    result.seconds = time.perf_counter() - start
    return result


# -------------------------------------------------------------------------------- report


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[Result]) -> str:
    """A Markdown table of ``results``."""
    rows = [
        "| model | params | test bits/dim | best valid bits/dim | steps run | steps/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        steps = "-" if r.model == "gaussian" else str(r.steps_run)
        if r.stopped_early:
            steps += f" (early stop, best {r.best_step})"
        elif r.best_step is not None:
            steps += f" (best {r.best_step})"
        if r.error:
            steps += f" [{r.error}]"
        rows.append(
            f"| {r.model} | {r.params:,} | {_f(r.test_bpd, '.3f')} | "
            f"{_f(r.best_valid_bpd, '.3f')} | {steps} | {_f(r.steps_per_s, '.1f')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="step budget per model")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all but the *-fit checks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds init, batches and noise")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--tune",
        action="store_true",
        help=f"models in {sorted(GRIDS)} try {len(GRIDS['zuko-nsf'])} configurations each "
        "and report the best by validation (same effort for ours and the peer)",
    )
    parser.add_argument("--out", default="benchmarks/results/density", help="<out>.json/.md")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps and --batch must be positive, got {args.steps}, {args.batch}")
    torch.set_num_threads(args.threads)

    split = load_digits_split(seed=0)
    pre = Dequantize(split.levels or 17)
    results: list[Result] = []
    for name in names:
        torch.manual_seed(_seed(args.seed, 6))
        builder = MODELS[name][1]
        try:
            if name == "gaussian":
                result = gaussian(split, pre, args.seed)
            elif args.tune and name in GRIDS:
                result = tune(name, split, pre, args.steps, args.batch, args.seed)
            elif builder is None:
                result = train_with_fit(name, split, pre, args.steps, args.batch, args.seed)
            else:
                result = train(name, builder(), split, pre, args.steps, args.batch, args.seed)
        except Exception as err:  # one broken peer must not sink the benchmark
            result = Result(name, MODELS[name][0], 0, error=f"{type(err).__name__}: {err}")
        results.append(result)
        print(
            f"{name}: test {_f(result.test_bpd, '.3f')} bits/dim, "
            f"{result.steps_run} steps, {result.seconds:.0f} s"
            + (f" [{result.error}]" if result.error else ""),
            flush=True,
        )

    command = "python benchmarks/density.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = table(results)
    print("\n" + md)
    settings = {
        "command": command.strip(),
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "threads": args.threads,
        "lr": LR,
        "warmup": WARMUP,
        "clip_grad": CLIP,
        "eval_every": EVAL_EVERY,
        "patience": PATIENCE,
        "tune": args.tune,
        "split": [len(split.train), len(split.valid), len(split.test)],
        "preprocess": pre.config(),
        "package": str(Path(pyro_flows_ext.__file__).parent),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "results": [asdict(r) for r in results]}
    Path(f"{out}.json").write_text(json.dumps(payload, indent=2) + "\n")
    notes = "\n".join(f"- `{r.model}`: {r.description}" for r in results)
    Path(f"{out}.md").write_text(
        f"# Density on digits (bits/dim, lower is better)\n\n`{settings['command']}`\n\n"
        f"{md}\n\nModels:\n\n{notes}\n\nProtocol: see the docstring of "
        f"`benchmarks/density.py`; settings in `{out.name}.json`.\n"
    )


if __name__ == "__main__":
    main()
