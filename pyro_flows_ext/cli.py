"""The ``pyro-flows`` command: train a RealNVP or Glow density model, and sample from it.

``pyro-flows fit`` with no arguments trains a small Glow on scikit-learn's digits (fixed
train/validation/test split), prints the test bits/dim and writes ``model.pt`` (the
checkpoint), ``samples.png``, ``curve.png`` and ``metrics.json`` to ``runs/digits``. Running
the same command again resumes from the checkpoint. ``pyro-flows sample CKPT`` draws from a
trained model. Under ``torchrun --nproc_per_node=N -m pyro_flows_ext fit ...`` training is
data-parallel (``DistributedDataParallel``) and process 0 alone prints and writes files. Errors
in the input (a missing file, a malformed array) end with a one-line
message and exit status 2 (set ``PYRO_FLOWS_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

DATA_HELP = (
    "training data: 'digits' (scikit-learn's 8x8 digits, 17 grey levels), 'mnist' "
    "(28x28, read from ../shared/images/mnist or --data-dir), 'moons' (2-D toy), or a file "
    "PATH.npy / PATH.csv: (N, D) arrays are continuous vectors, (N, H, W) or (N, C, H, W) "
    "integer arrays 256-level images (default: digits)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-flows`` (``fit`` and ``sample`` subcommands)."""
    parser = argparse.ArgumentParser(
        prog="pyro-flows",
        description="Normalizing-flow density models (RealNVP, Glow) trained by maximum "
        "likelihood. Run 'pyro-flows fit' to train a small Glow on the digits data set.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    fit = sub.add_parser(
        "fit",
        help="train a flow and report its test bits/dim",
        description="Train a flow by maximum likelihood with early stopping on a validation "
        "split, print the test bits/dim, and write the checkpoint (model.pt), a grid or "
        "scatter of samples (samples.png), the training curve (curve.png) and metrics.json "
        "to --out. If --out already holds a checkpoint of the same configuration, training "
        "resumes from it. Launched by 'torchrun --nproc_per_node=N -m pyro_flows_ext fit ...', "
        "it trains data-parallel on N processes (one GPU each, or CPU processes with gloo).",
    )
    fit.add_argument(
        "--data", default="digits", metavar="{digits,mnist,moons,PATH.npy,PATH.csv}", help=DATA_HELP
    )
    fit.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder holding the MNIST IDX files "
        "(default: ../shared/images/mnist, or $PYRO_FLOWS_DATA)",
    )
    fit.add_argument(
        "--dequantize",
        choices=("uniform", "variational"),
        default="uniform",
        help="noise that makes discrete images continuous: uniform (the standard bound, "
        "comparable with published bits/dim) or variational (learned, Flow++; a tighter "
        "bound) (default: uniform)",
    )
    fit.add_argument(
        "--model", choices=("glow", "realnvp"), default="glow", help="architecture (default: glow)"
    )
    fit.add_argument(
        "--levels",
        type=int,
        default=None,
        metavar="L",
        help="multi-scale levels for images (default: as many as the image size allows, up to 3)",
    )
    fit.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="K",
        help="flow steps per level (Glow; default 8) or couplings per stage "
        "(RealNVP; default 3 for images, 8 for vectors)",
    )
    fit.add_argument(
        "--hidden",
        type=int,
        default=None,
        metavar="N",
        help="width of the coupling networks: conv channels for images (default 32), "
        "MLP units for vectors (default 64)",
    )
    fit.add_argument(
        "--steps",
        type=int,
        default=1000,
        metavar="N",
        help="maximum training steps (default 1000; early stopping may end sooner)",
    )
    fit.add_argument(
        "--batch-size", type=int, default=64, metavar="N",
        help="examples per step, per process under torchrun (default 64)",
    )  # fmt: skip
    fit.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="Adam learning rate after a 100-step warm-up (default 2e-3)",
    )
    fit.add_argument(
        "--patience",
        type=int,
        default=10,
        metavar="N",
        help="evaluations without validation improvement before stopping (default 10)",
    )
    fit.add_argument(
        "--eval-every",
        type=int,
        default=50,
        metavar="N",
        help="steps between validation evaluations and checkpoints (default 50)",
    )
    fit.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' (default auto)",
    )
    fit.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for torch (default 1: small flows gain little from more, and on a "
        "busy machine extra threads can slow training down many times)",
    )
    fit.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    fit.add_argument("--compile", action="store_true", help="torch.compile the coupling networks")
    fit.add_argument(
        "--out", default="runs/digits", metavar="DIR", help="output folder (default runs/digits)"
    )
    fit.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the initialisation, batches and samples (default 0)",
    )
    fit.add_argument(
        "--restart", action="store_true", help="start afresh even if --out holds a checkpoint"
    )
    fit.add_argument(
        "--samples",
        type=int,
        default=64,
        metavar="N",
        help="number of samples drawn for samples.png (default 64)",
    )
    fit.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature for images (default 0.8; 1 for vectors)",
    )
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sample = sub.add_parser(
        "sample",
        help="draw samples from a trained checkpoint",
        description="Draw samples from a checkpoint written by 'pyro-flows fit' and write them "
        "as a PNG (image grid or scatter) and, with --npy, as an array in data units (integer "
        "levels for images).",
    )
    sample.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (model.pt)")
    sample.add_argument(
        "-n", "--num", type=int, default=64, metavar="N", help="number of samples (default 64)"
    )
    sample.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature (default 0.8 for images, 1 for vectors)",
    )
    sample.add_argument(
        "--out",
        default=None,
        metavar="PATH.png",
        help="PNG to write (default: samples_T<temperature>.png next to CKPT)",
    )
    sample.add_argument(
        "--npy", default=None, metavar="PATH.npy", help="also save the samples as a .npy array"
    )
    sample.add_argument(
        "--last",
        action="store_true",
        help="use the weights of the last training step rather than the best validation ones",
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


class _UsageError(ValueError):
    """An invalid option value, reported in one line."""


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise _UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _load_data(args: argparse.Namespace) -> tuple[str, Any]:
    from pyro_flows_ext import datasets

    if args.data == "digits":
        return "digits", datasets.load_digits_split(args.seed)
    if args.data == "mnist":
        return "mnist", datasets.mnist_split(args.data_dir, args.seed)
    if args.data == "moons":
        return "moons", datasets.load_moons(seed=args.seed)
    if Path(args.data).suffix.lower() in (".npy", ".csv"):
        return Path(args.data).name, datasets.load_array(args.data, args.seed)
    raise _UsageError(
        f"--data must be digits, mnist, moons, PATH.npy or PATH.csv, got {args.data!r}"
    )


def _make_flow(args: argparse.Namespace, shape: tuple[int, ...]) -> Any:
    from pyro_flows_ext.flows import glow, realnvp

    builder = glow if args.model == "glow" else realnvp
    depth = {"steps" if args.model == "glow" else "couplings": args.depth}
    if len(shape) == 1:
        dims = None if args.hidden is None else [args.hidden] * 2
        return builder(shape[0], hidden_dims=dims, **depth)
    return builder(shape, args.levels, hidden_channels=args.hidden or 32, **depth)


def _describe(flow: Any) -> str:
    keys = ("levels", "steps", "couplings", "hidden_channels", "hidden_dims")
    config = flow.config
    args = ", ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None)
    return f"{config['builder']}({tuple(flow.event_shape)}, {args})"


def _to_images(x: Any, pre: Any) -> Any:
    """Samples in the flow's space to displayable ``[0, 1]`` images or raw vectors."""
    from pyro_flows_ext.train import Dequantize

    decoded = pre.decode(x)
    if x.dim() == 4 and not isinstance(pre, Dequantize):  # continuous images: rescale
        lo, hi = decoded.min(), decoded.max()
        decoded = (decoded - lo) / (hi - lo).clamp_min(1e-12)
    return decoded


def _fit(args: argparse.Namespace) -> int:
    _positive(
        args,
        "levels",
        "depth",
        "hidden",
        "steps",
        "batch_size",
        "lr",
        "patience",
        "eval_every",
        "samples",
        "temperature",
        "threads",
    )
    import torch

    torch.set_num_threads(args.threads)
    from pyro_flows_ext import plots
    from pyro_flows_ext.train import (
        Standardize,
        VariationalDequantize,
        as_preprocess,
        bits_per_dim,
        fit,
        read_checkpoint,
        resolve_device,
        torchrun_env,
    )

    device, launch = resolve_device(args.device), torchrun_env()
    main = launch is None or launch.rank == 0  # under torchrun, process 0 prints and writes

    def say(text: str) -> None:
        if main:
            print(text)

    name, split = _load_data(args)
    shape = split.event_shape
    if split.levels is not None and args.dequantize == "variational":
        pre: Any = VariationalDequantize(shape, split.levels)
    elif split.levels is not None:
        pre = split.levels
    else:
        pre = Standardize.fit(split.train, len(shape), per_element=len(shape) == 1)
    pre = as_preprocess(pre)
    torch.manual_seed(args.seed)
    flow = _make_flow(args, shape)
    out = Path(args.out)
    ckpt = out / "model.pt"
    levels = f", {split.levels} levels" if split.levels else ""
    say(
        f"data: {name}, event shape {shape}{levels}; "
        f"train {len(split.train)} / valid {len(split.valid)} / test {len(split.test)}"
    )
    n_params = sum(p.numel() for p in flow.parameters())
    where = f"device {device}" + (f", {launch.world_size} processes" if launch else "")
    say(f"model: {_describe(flow)}, {n_params:,} parameters; {where}")
    if ckpt.exists() and not args.restart:
        old = read_checkpoint(ckpt)
        if old.get("flow_config") != flow.config or old.get("preprocess") != pre.config():
            raise _UsageError(
                f"{ckpt} holds another model or preprocessing; use --restart or another --out"
            )
        say(f"resuming from {ckpt} (step {old['step']})")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    history = fit(
        flow, split.train, valid=split.valid, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, eval_every=args.eval_every, patience=args.patience, device=device,
        dequantize=pre, checkpoint=ckpt, resume=not args.restart, progress=not args.no_progress,
        seed=args.seed, bf16=args.bf16, compile=args.compile,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if not main:
        return 0
    test = bits_per_dim(flow, split.test, dequantize=pre, seed=args.seed)
    temperature = args.temperature if len(shape) == 3 else 1.0
    torch.manual_seed(args.seed)
    samples = _to_images(flow.sample((args.samples,), temperature=temperature), pre)
    ref = split.test if len(shape) == 1 else None
    plots.save_samples(samples, out / "samples.png", reference=ref,
                       title=f"{_describe(flow)}, T = {temperature:g}")  # fmt: skip
    plots.save_curve(history, out / "curve.png", title=f"{name}: test {test:.3f} bits/dim")
    metrics = {
        "data": name,
        "model": flow.config,
        "dequantize": pre.config().get("kind"),
        "test_bpd": test,
        "best_valid_bpd": history.best_valid,
        "best_step": history.best_step,
        "steps": history.step[-1] if history.step else 0,
        "stopped_early": history.stopped_early,
        "train_seconds": round(seconds, 2),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    best = ""
    if history.best_valid is not None:
        best = f" (best validation {history.best_valid:.3f} at step {history.best_step})"
    print(f"test bits/dim: {test:.3f}{best}; {metrics['steps']} steps in {seconds:.0f} s")
    print(f"wrote {ckpt}, {out / 'samples.png'}, {out / 'curve.png'}, {out / 'metrics.json'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    _positive(args, "num", "temperature")
    import numpy as np
    import torch

    torch.set_num_threads(1)

    from pyro_flows_ext import plots
    from pyro_flows_ext.train import Dequantize, load_checkpoint

    flow, pre, _ = load_checkpoint(args.checkpoint, best=not args.last)
    image = len(flow.event_shape) == 3
    temperature = args.temperature or (0.8 if image else 1.0)
    torch.manual_seed(args.seed)
    x = flow.sample((args.num,), temperature=temperature)
    out = (
        Path(args.out)
        if args.out
        else Path(args.checkpoint).with_name(f"samples_T{temperature:g}.png")
    )
    plots.save_samples(_to_images(x, pre), out, title=f"T = {temperature:g}")
    written = [str(out)]
    if args.npy:
        values = pre.to_levels(x) if isinstance(pre, Dequantize) else pre.decode(x)
        np.save(args.npy, values.cpu().numpy())
        written.append(args.npy)
    print(f"wrote {', '.join(written)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-flows``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _fit(args) if args.command == "fit" else _sample(args)
    except KeyboardInterrupt:
        print("pyro-flows: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except FloatingPointError as err:  # TrainingDivergedError
        print(f"pyro-flows: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, TypeError, OSError) as err:
        if os.environ.get("PYRO_FLOWS_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pyro-flows: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
