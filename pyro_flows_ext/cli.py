"""The ``pyro-flows`` command: train a RealNVP or Glow density model, and sample from it.

``pyro-flows fit`` with no arguments trains a small Glow on scikit-learn's digits (fixed
train/validation/test split), prints the test bits/dim and writes ``model.pt`` (the
checkpoint), ``samples.png``, ``curve.png`` and ``metrics.json`` to ``runs/digits``. Running
the same command again resumes from the checkpoint. ``pyro-flows sample CKPT`` draws from a
trained model. Under ``torchrun --nproc_per_node=N -m pyro_flows_ext fit ...`` training is
data-parallel (``DistributedDataParallel``) and process 0 alone prints and writes files. Errors
in the input (a missing file, a malformed array, an option that does nothing for the data
given) end with a one-line message and exit status 2 (set ``PYRO_FLOWS_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_flows_ext.nn import HIDDEN_CHANNELS

__all__ = ["build_parser", "main"]

IMAGE_TEMPERATURE = 0.8
"""Default sampling temperature for images (vectors are drawn at 1)."""

DATA_HELP = (
    "training data: 'digits' (scikit-learn's 8x8 digits, 17 grey levels), 'mnist' "
    "(28x28, read from ../shared/images/mnist or --data-dir), 'moons' (2-D toy), or a file "
    "PATH.npy / PATH.csv: (N, D) arrays are continuous vectors, (N, H, W) or (N, C, H, W) "
    "integer arrays 256-level images (default: digits)"
)


FIT_DESCRIPTION = (
    "Train a flow by maximum likelihood with early stopping on a validation split, print the "
    "test bits/dim, and write the checkpoint (model.pt), a grid or scatter of samples "
    "(samples.png), the training curve (curve.png) and metrics.json to --out. If --out already "
    "holds a checkpoint of the same configuration, training resumes from it. Launched by "
    "'torchrun --nproc_per_node=N -m pyro_flows_ext fit ...', it trains data-parallel on N "
    "processes (one GPU each, or CPU processes with gloo). Options that apply to images only "
    "(--levels, --hidden-channels, --temperature), to vectors only (--hidden-dims) or to "
    "discrete data only (--dequantize) are errors for other data."
)

SAMPLE_DESCRIPTION = (
    "Draw samples from a checkpoint written by 'pyro-flows fit' and write them as a PNG (image "
    "grid or scatter) and, with --npy, as an array in data units (integer levels for images)."
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
    commands = {"fit": ("train a flow and report its test bits/dim", FIT_DESCRIPTION,
                        _add_fit_options),
                "sample": ("draw samples from a trained checkpoint", SAMPLE_DESCRIPTION,
                           _add_sample_options)}  # fmt: skip
    for name, (summary, description, add_options) in commands.items():
        add_options(sub.add_parser(name, help=summary, description=description))
    return parser


def _add_fit_options(fit: argparse.ArgumentParser) -> None:
    _add_data_options(fit)
    _add_model_options(fit)
    _add_training_options(fit)
    _add_output_options(fit)


def _add_data_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--data", default="digits", help=DATA_HELP,
                     metavar="{digits,mnist,moons,PATH.npy,PATH.csv}")  # fmt: skip
    fit.add_argument("--data-dir", default=None, metavar="DIR",
                     help="folder holding the MNIST IDX files "
                     "(default: ../shared/images/mnist, or $PYRO_FLOWS_DATA)")  # fmt: skip
    fit.add_argument("--dequantize", choices=("uniform", "variational"), default=None,
                     help="noise that makes discrete images continuous: uniform (the standard "
                     "bound, comparable with published bits/dim) or variational (learned, "
                     "Flow++; a tighter bound) (default: uniform; an error for continuous "
                     "data)")  # fmt: skip


def _add_model_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--model", choices=("glow", "realnvp"), default="glow",
                     help="architecture (default: glow)")  # fmt: skip
    fit.add_argument("--levels", type=int, default=None, metavar="L",
                     help="multi-scale levels for images (default: as many as the image size "
                     "allows, up to 3; an error for vector data)")  # fmt: skip
    fit.add_argument("--depth", type=int, default=None, metavar="K",
                     help="flow steps per level (default: Glow 8; RealNVP 3 for images, 8 for "
                     "vectors)")  # fmt: skip
    fit.add_argument("--hidden-channels", type=int, default=None, metavar="N",
                     help="conv channels of the coupling networks, for images (default "
                     f"{HIDDEN_CHANNELS}; an error for vector data)")  # fmt: skip
    fit.add_argument("--hidden-dims", default=None, metavar="N[,N...]",
                     help="hidden layer widths of the coupling MLPs, for vectors, e.g. 64,64 "
                     "(default: the builder's, two layers of max(64, 4 D); an error for "
                     "images)")  # fmt: skip


def _add_training_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--steps", type=int, default=1000, metavar="N",
                     help="maximum training steps (default 1000; early stopping may end "
                     "sooner)")  # fmt: skip
    fit.add_argument("--batch-size", type=int, default=64, metavar="N",
                     help="examples per step, per process under torchrun (default 64)")  # fmt: skip
    fit.add_argument("--lr", type=float, default=2e-3,
                     help="Adam learning rate after a 100-step warm-up (default 2e-3)")  # fmt: skip
    fit.add_argument("--patience", type=int, default=10, metavar="N",
                     help="evaluations without validation improvement before stopping "
                     "(default 10)")  # fmt: skip
    fit.add_argument("--eval-every", type=int, default=50, metavar="N",
                     help="steps between validation evaluations and checkpoints "
                     "(default 50)")  # fmt: skip
    fit.add_argument("--device", default="auto",
                     help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' "
                     "(default auto)")  # fmt: skip
    fit.add_argument("--threads", type=int, default=1, metavar="N",
                     help="CPU threads for torch (default 1: small flows gain little from "
                     "more, and on a busy machine extra threads can slow training down many "
                     "times)")  # fmt: skip
    fit.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    fit.add_argument("--compile", action="store_true", help="torch.compile the coupling networks")
    fit.add_argument("--seed", type=int, default=0,
                     help="seed of the data split, the initialisation, batches and samples "
                     "(default 0)")  # fmt: skip
    fit.add_argument("--restart", action="store_true",
                     help="start afresh even if --out holds a checkpoint")  # fmt: skip


def _add_output_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--out", default="runs/digits", metavar="DIR",
                     help="output folder (default runs/digits)")  # fmt: skip
    fit.add_argument("--samples", type=int, default=64, metavar="N",
                     help="number of samples drawn for samples.png (default 64)")  # fmt: skip
    fit.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature of samples.png, for images (default "
                     f"{IMAGE_TEMPERATURE}; an error for vector data, which are drawn at "
                     "T = 1 next to the test data)")  # fmt: skip
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_sample_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (model.pt)")
    sample.add_argument("-n", "--num", type=int, default=64, metavar="N",
                        help="number of samples (default 64)")  # fmt: skip
    sample.add_argument("--temperature", type=float, default=None, metavar="T",
                        help=f"sampling temperature (default {IMAGE_TEMPERATURE} for images, "
                        "1 for vectors)")  # fmt: skip
    sample.add_argument("--out", default=None, metavar="PATH.png",
                        help="PNG to write (default: samples_T<temperature>.png next to "
                        "CKPT)")  # fmt: skip
    sample.add_argument("--npy", default=None, metavar="PATH.npy",
                        help="also save the samples as a .npy array")  # fmt: skip
    sample.add_argument("--last", action="store_true",
                        help="use the weights of the last training step rather than the best "
                        "validation ones")  # fmt: skip
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


class _UsageError(ValueError):
    """An invalid option value, reported in one line."""


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise _UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _sizes(text: str | None, option: str) -> list[int] | None:
    """``"64,64"`` -> ``[64, 64]``, with a one-line error for anything else."""
    if text is not None and not re.fullmatch(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*", text):
        raise _UsageError(f"{option} must be positive integers separated by commas, got {text!r}")
    return None if text is None else [int(part) for part in text.split(",")]


def _check_options_fit_data(args: argparse.Namespace, image: bool, discrete: bool) -> None:
    """An option that does nothing for the data given is an error, never silently dropped."""
    kind = "images" if image else "vector data"
    only_for = {"--levels": (args.levels, image, "images"),
                "--hidden-channels": (args.hidden_channels, image, "images (use --hidden-dims)"),
                "--temperature": (args.temperature, image, "images"),
                "--hidden-dims": (args.hidden_dims, not image,
                                  "vector data (use --hidden-channels)")}  # fmt: skip
    for option, (value, applies, target) in only_for.items():
        if value is not None and not applies:
            raise _UsageError(f"{option} applies to {target}, not to {kind}")
    if args.dequantize is not None and not discrete:
        raise _UsageError("--dequantize applies to discrete data, not to continuous data")


def _load_data(args: argparse.Namespace) -> tuple[str, Any]:
    from pyro_flows_ext import datasets

    named = {"digits": lambda: datasets.load_digits_split(args.seed),
             "mnist": lambda: datasets.mnist_split(args.data_dir, args.seed),
             "moons": lambda: datasets.load_moons(seed=args.seed)}  # fmt: skip
    if args.data in named:
        return args.data, named[args.data]()
    if Path(args.data).suffix.lower() in (".npy", ".csv"):
        return Path(args.data).name, datasets.load_array(args.data, args.seed)
    raise _UsageError(
        f"--data must be digits, mnist, moons, PATH.npy or PATH.csv, got {args.data!r}"
    )


def _make_preprocess(args: argparse.Namespace, split: Any) -> Any:
    from pyro_flows_ext.train import Standardize, VariationalDequantize, as_preprocess

    shape = split.event_shape
    if split.levels is None:
        return Standardize.fit(split.train, len(shape), per_element=len(shape) == 1)
    if args.dequantize == "variational":
        return VariationalDequantize(shape, split.levels)
    return as_preprocess(split.levels)


def _make_flow(args: argparse.Namespace, shape: tuple[int, ...]) -> Any:
    from pyro_flows_ext.flows import BUILDERS

    builder = BUILDERS[args.model]
    if len(shape) == 1:
        dims = _sizes(args.hidden_dims, "--hidden-dims")
        return builder(shape[0], depth=args.depth, hidden_dims=dims)
    channels = HIDDEN_CHANNELS if args.hidden_channels is None else args.hidden_channels
    return builder(shape, args.levels, depth=args.depth, hidden_channels=channels)


def _describe(flow: Any) -> str:
    config = flow.config
    width = "hidden_channels" if len(flow.event_shape) == 3 else "hidden_dims"
    keys = ("levels", "depth", width)
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


def _say(*lines: str) -> None:
    """Print in process 0 only (under torchrun the others stay quiet)."""
    from pyro_flows_ext.train import is_main_process

    if is_main_process():
        print(*lines, sep="\n")


def _announce(name: str, split: Any, flow: Any, device: Any) -> None:
    from pyro_flows_ext.train import process_count

    levels = f", {split.levels} levels" if split.levels else ""
    n_params, count = sum(p.numel() for p in flow.parameters()), process_count()
    where = f"device {device}" + (f", {count} processes" if count > 1 else "")
    _say(f"data: {name}, event shape {split.event_shape}{levels}; train {len(split.train)} / "
         f"valid {len(split.valid)} / test {len(split.test)}",
         f"model: {_describe(flow)}, {n_params:,} parameters; {where}")  # fmt: skip


def _check_resume(args: argparse.Namespace, ckpt: Path, flow: Any, pre: Any) -> None:
    """Say where a resumed run starts, or refuse a checkpoint of another configuration."""
    from pyro_flows_ext.train import Checkpoint, CheckpointMismatchError

    if args.restart or not ckpt.exists():
        return
    old = Checkpoint.read(ckpt)
    try:
        old.check_compatible(flow.config, pre.config(), ckpt, "use --restart or another --out")
    except CheckpointMismatchError as err:
        raise _UsageError(str(err)) from None
    _say(f"resuming from {ckpt} (step {old.step})")


def _fit(args: argparse.Namespace) -> int:
    _positive(args, "levels", "depth", "hidden_channels", "steps", "batch_size", "lr",
              "patience", "eval_every", "samples", "temperature", "threads")  # fmt: skip
    import torch

    torch.set_num_threads(args.threads)
    from pyro_flows_ext.train import fit, is_main_process, resolve_device

    device = resolve_device(args.device)
    name, split = _load_data(args)
    shape = split.event_shape
    _check_options_fit_data(args, image=len(shape) == 3, discrete=split.levels is not None)
    pre = _make_preprocess(args, split)
    torch.manual_seed(args.seed)
    flow = _make_flow(args, shape)
    out, ckpt = Path(args.out), Path(args.out) / "model.pt"
    _announce(name, split, flow, device)
    _check_resume(args, ckpt, flow, pre)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    history = fit(
        flow, split.train, valid=split.valid, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, eval_every=args.eval_every, patience=args.patience, device=device,
        dequantize=pre, checkpoint=ckpt, resume=not args.restart, progress=not args.no_progress,
        seed=args.seed, bf16=args.bf16, compile=args.compile,
    )  # fmt: skip
    if is_main_process():
        _report(args, name, split, flow, pre, history, time.perf_counter() - start)
    return 0


def _report(args: argparse.Namespace, name: str, split: Any, flow: Any, pre: Any,
            history: Any, seconds: float) -> None:  # fmt: skip
    """Test bits/dim, samples.png, curve.png and metrics.json (in process 0)."""
    import torch

    from pyro_flows_ext import plots
    from pyro_flows_ext.train import bits_per_dim

    out, image = Path(args.out), len(split.event_shape) == 3
    test = bits_per_dim(flow, split.test, dequantize=pre, seed=args.seed)
    temperature = (args.temperature or IMAGE_TEMPERATURE) if image else 1.0
    torch.manual_seed(args.seed)
    samples = _to_images(flow.sample((args.samples,), temperature=temperature), pre)
    plots.save_samples(samples, out / "samples.png", reference=None if image else split.test,
                       title=f"{_describe(flow)}, T = {temperature:g}")  # fmt: skip
    plots.save_curve(history, out / "curve.png", title=f"{name}: test {test:.3f} bits/dim")
    steps = history.step[-1] if history.step else 0
    metrics = {"data": name, "model": flow.config, "dequantize": pre.config().get("kind"),
               "test_bpd": test, "best_valid_bpd": history.best_valid, "best_step":
               history.best_step, "steps": steps, "stopped_early": history.stopped_early,
               "train_seconds": round(seconds, 2)}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    best = "" if history.best_valid is None else (
        f" (best validation {history.best_valid:.3f} at step {history.best_step})")  # fmt: skip
    print(f"test bits/dim: {test:.3f}{best}; {steps} steps in {seconds:.0f} s")
    print(f"wrote {out / 'model.pt'}, {out / 'samples.png'}, {out / 'curve.png'}, "
          f"{out / 'metrics.json'}")  # fmt: skip


def _sample(args: argparse.Namespace) -> int:
    _positive(args, "num", "temperature")
    import numpy as np
    import torch

    torch.set_num_threads(1)

    from pyro_flows_ext import plots
    from pyro_flows_ext.train import Dequantize, load_checkpoint

    flow, pre, _ = load_checkpoint(args.checkpoint, best=not args.last)
    image = len(flow.event_shape) == 3
    temperature = args.temperature or (IMAGE_TEMPERATURE if image else 1.0)
    torch.manual_seed(args.seed)
    x = flow.sample((args.num,), temperature=temperature)
    out = Path(args.out or Path(args.checkpoint).with_name(f"samples_T{temperature:g}.png"))
    plots.save_samples(_to_images(x, pre), out, title=f"T = {temperature:g}")
    if args.npy:
        values = pre.to_levels(x) if isinstance(pre, Dequantize) else pre.decode(x)
        np.save(args.npy, values.cpu().numpy())
    print(f"wrote {out}" + (f", {args.npy}" if args.npy else ""))
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
