"""The ``pyro-flows`` command: train a RealNVP or Glow density model, and sample from it.

``pyro-flows fit`` with no arguments trains a small Glow on scikit-learn's digits (fixed
train/validation/test split), prints the test bits/dim and writes ``model.pt`` (the
checkpoint), ``samples.png``, ``curve.png`` and ``metrics.json`` to ``runs/digits``. Running
the same command again resumes from the checkpoint. ``pyro-flows sample CKPT`` draws from a
trained model. With ``--conditional`` (digits) the model is class-conditional,
``p(x | label)``, and the sample grids show one row per class. Under
``torchrun --nproc_per_node=N -m pyro_flows_ext fit ...`` training is data-parallel
(``DistributedDataParallel``) and process 0 alone prints and writes files. Errors in the input
(a missing file, a malformed array, an option that does nothing for the data given) end with a
one-line message and exit status 2 (set ``PYRO_FLOWS_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pyro_flows_ext import cli_commands as run
from pyro_flows_ext.cli_commands import IMAGE_TEMPERATURE
from pyro_flows_ext.nn import HIDDEN_CHANNELS
from pyro_flows_ext.transforms.kinds import COUPLINGS

__all__ = ["build_parser", "main"]

DATA_HELP = (
    "training data: 'digits' (scikit-learn's 8x8 digits, 17 grey levels), 'mnist' "
    "(28x28, read from ../shared/images/mnist or --data-dir), 'moons' (2-D toy), or a file "
    "PATH.npy / PATH.csv: (N, D) arrays are continuous vectors, (N, H, W) or (N, C, H, W) "
    "integer arrays 256-level images (default: digits)"
)

SAMPLES_HELP = (
    "number of samples drawn for samples.png (default 64; with --conditional, per class: one "
    "row per class, default 8)"
)

FIT_DESCRIPTION = (
    "Train a flow by maximum likelihood with early stopping on a validation split, print the "
    "test bits/dim, and write the checkpoint (model.pt), a grid or scatter of samples "
    "(samples.png), the training curve (curve.png) and metrics.json to --out. If --out already "
    "holds a checkpoint of the same configuration, training resumes from it. Launched by "
    "'torchrun --nproc_per_node=N -m pyro_flows_ext fit ...', it trains data-parallel on N "
    "processes (one GPU each, or CPU processes with gloo). Options that apply to images only "
    "(--levels, --hidden-channels, --temperature), to vectors only (--hidden-dims) or to "
    "discrete data only (--dequantize) are errors for other data. With --conditional (labelled "
    "data: digits) the model is class-conditional, p(x | label), the test bits/dim are given "
    "the true labels and samples.png shows one row per class."
)

SAMPLE_DESCRIPTION = (
    "Draw samples from a checkpoint written by 'pyro-flows fit' and write them as a PNG (image "
    "grid or scatter) and, with --npy, as an array in data units (integer levels for images). "
    "For a class-conditional model the grid has one row per class and the array the shape "
    "(classes, N, ...)."
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
    fit.add_argument("--conditional", action="store_true",
                     help="train a class-conditional model p(x | label) whose context is "
                     "the one-hot label (labelled data only: digits; an error for other "
                     "data)")  # fmt: skip


def _add_model_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--model", choices=("glow", "realnvp"), default="glow",
                     help="architecture (default: glow)")  # fmt: skip
    fit.add_argument("--coupling", choices=sorted(COUPLINGS), default="spline",
                     help="coupling layers: rational-quadratic splines or affine maps "
                     "(default: spline)")  # fmt: skip
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
    fit.add_argument("--samples", type=int, default=None, metavar="N", help=SAMPLES_HELP)
    fit.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature of samples.png, for images (default "
                     f"{IMAGE_TEMPERATURE}; an error for vector data, which are drawn at "
                     "T = 1 next to the test data)")  # fmt: skip
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_sample_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (model.pt)")
    sample.add_argument("-n", "--num", type=int, default=None, metavar="N",
                        help="number of samples (default 64; for a class-conditional model, "
                        "per class: default 8, one row per class)")  # fmt: skip
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-flows``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run.run_fit(args) if args.command == "fit" else run.run_sample(args)
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
