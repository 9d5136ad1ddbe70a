"""What the ``pyro-flows`` subcommands do; :mod:`pyro_flows_ext.cli` parses the command line
and calls :func:`run_fit` or :func:`run_sample`.

With ``--conditional`` (labelled data: the digits), ``fit`` trains a class-conditional model
``p(x | class)`` whose context is the one-hot label, scores the test split given its true
labels, and draws ``samples.png`` with one row per class; ``sample`` draws the same kind of
grid from a conditional checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_flows_ext.flows import BUILDERS, Flow
from pyro_flows_ext.nn import HIDDEN_CHANNELS

__all__ = [
    "IMAGE_TEMPERATURE",
    "PER_CLASS",
    "SAMPLES",
    "UsageError",
    "check_options",
    "draw_samples",
    "load_data",
    "make_flow",
    "make_preprocess",
    "one_hot",
    "run_fit",
    "run_sample",
]

IMAGE_TEMPERATURE = 0.8
"""Default sampling temperature for images (vectors are drawn at 1)."""

SAMPLES = 64
"""Samples drawn for a PNG by default."""
PER_CLASS = 8
"""Samples per class (one grid row each) drawn for a conditional model by default."""


class UsageError(ValueError):
    """An invalid option value, reported in one line."""


def positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def sizes(text: str | None, option: str) -> list[int] | None:
    """``"64,64"`` -> ``[64, 64]``, with a one-line error for anything else."""
    if text is not None and not re.fullmatch(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*", text):
        raise UsageError(f"{option} must be positive integers separated by commas, got {text!r}")
    return None if text is None else [int(part) for part in text.split(",")]


def check_options(args: argparse.Namespace, name: str, split: Any) -> None:
    """An option that does nothing for the data given is an error, never silently dropped."""
    image, discrete = len(split.event_shape) == 3, split.levels is not None
    kind = "images" if image else "vector data"
    only_for = {"--levels": (args.levels, image, "images"),
                "--hidden-channels": (args.hidden_channels, image, "images (use --hidden-dims)"),
                "--temperature": (args.temperature, image, "images"),
                "--hidden-dims": (args.hidden_dims, not image,
                                  "vector data (use --hidden-channels)")}  # fmt: skip
    for option, (value, applies, target) in only_for.items():
        if value is not None and not applies:
            raise UsageError(f"{option} applies to {target}, not to {kind}")
    if args.dequantize is not None and not discrete:
        raise UsageError("--dequantize applies to discrete data, not to continuous data")
    if args.conditional and split.labels is None:
        raise UsageError(f"--conditional needs labelled data (digits); {name} has no labels")


def load_data(args: argparse.Namespace) -> tuple[str, Any]:
    """``(name, split)`` of ``--data``."""
    from pyro_flows_ext import datasets

    named = {"digits": lambda: datasets.load_digits_split(args.seed),
             "mnist": lambda: datasets.mnist_split(args.data_dir, args.seed),
             "moons": lambda: datasets.load_moons(seed=args.seed)}  # fmt: skip
    if args.data in named:
        return args.data, named[args.data]()
    if Path(args.data).suffix.lower() in (".npy", ".csv"):
        return Path(args.data).name, datasets.load_array(args.data, args.seed)
    raise UsageError(
        f"--data must be digits, mnist, moons, PATH.npy or PATH.csv, got {args.data!r}"
    )


def make_preprocess(args: argparse.Namespace, split: Any) -> Any:
    from pyro_flows_ext.train import Standardize, VariationalDequantize, as_preprocess

    shape = split.event_shape
    if split.levels is None:
        return Standardize.fit(split.train, len(shape), per_element=len(shape) == 1)
    if args.dequantize == "variational":
        return VariationalDequantize(shape, split.levels)
    return as_preprocess(split.levels)


def make_flow(args: argparse.Namespace, shape: tuple[int, ...], context_dim: int = 0) -> Flow:
    """The model that the options describe (conditional on ``context_dim`` numbers if > 0)."""
    builder = BUILDERS[args.model]
    if len(shape) == 1:
        dims = sizes(args.hidden_dims, "--hidden-dims")
        return builder(shape[0], depth=args.depth, hidden_dims=dims, coupling=args.coupling,
                       context_dim=context_dim)  # fmt: skip
    channels = HIDDEN_CHANNELS if args.hidden_channels is None else args.hidden_channels
    return builder(shape, args.levels, depth=args.depth, hidden_channels=channels,
                   coupling=args.coupling, context_dim=context_dim)  # fmt: skip


def describe(flow: Flow) -> str:
    config = flow.config or {}
    width = "hidden_channels" if len(flow.event_shape) == 3 else "hidden_dims"
    keys = ("levels", "depth", width, "coupling", "context_dim")
    args = ", ".join(f"{k}={config[k]}" for k in keys if config.get(k))
    return f"{config.get('builder', 'flow')}({tuple(flow.event_shape)}, {args})"


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """Integer labels ``(N,)`` as one-hot contexts ``(N, classes)`` (default float dtype).

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return torch.nn.functional.one_hot(labels.long(), classes).to(torch.get_default_dtype())


def to_images(x: Tensor, pre: Any) -> Tensor:
    """Samples in the flow's space to displayable ``[0, 1]`` images or raw vectors."""
    from pyro_flows_ext.train import Dequantize

    decoded = pre.decode(x)
    if x.dim() == 4 and not isinstance(pre, Dequantize):  # continuous images: rescale
        lo, hi = decoded.min(), decoded.max()
        decoded = (decoded - lo) / (hi - lo).clamp_min(1e-12)
    return decoded


def draw_samples(flow: Flow, pre: Any, count: int | None, temperature: float, path: Path,
                 title: str, reference: Tensor | None = None) -> Tensor:  # fmt: skip
    """Draw samples at ``temperature`` and write them to the PNG ``path``; return them in
    the flow's space.

    An unconditional flow draws ``count`` samples (default :data:`SAMPLES`), shape
    ``(N, *event_shape)``. A conditional flow with ``K = context_dim`` classes draws ``count``
    per class (default :data:`PER_CLASS`) given each one-hot context, shape
    ``(K, count, *event_shape)``, and an image grid shows one row per class.
    """
    from pyro_flows_ext import plots

    k = flow.context_dim
    if not k:
        x = flow.sample((count or SAMPLES,), temperature=temperature)
        plots.save_samples(to_images(x, pre), path, reference=reference, title=title)
        return x
    n = count or PER_CLASS
    classes = torch.eye(k, dtype=flow.base_loc.dtype, device=flow.base_loc.device)
    x = flow.sample((n,), temperature=temperature, context=classes).transpose(0, 1)
    flat = to_images(x.reshape(k * n, *flow.event_shape), pre)
    labels = [str(i) for i in range(k)] if len(flow.event_shape) == 3 else None
    plots.save_samples(flat, path, reference=reference, title=title, nrow=n, row_labels=labels)
    return x


def say(*lines: str) -> None:
    """Print in process 0 only (under torchrun the others stay quiet)."""
    from pyro_flows_ext.train import is_main_process

    if is_main_process():
        print(*lines, sep="\n")


def announce(name: str, split: Any, flow: Flow, device: Any) -> None:
    from pyro_flows_ext.train import process_count

    levels = f", {split.levels} levels" if split.levels else ""
    n_params, count = sum(p.numel() for p in flow.parameters()), process_count()
    where = f"device {device}" + (f", {count} processes" if count > 1 else "")
    given = f", conditional on the one-hot label ({flow.context_dim} classes)"
    say(f"data: {name}, event shape {split.event_shape}{levels}; train {len(split.train)} / "
        f"valid {len(split.valid)} / test {len(split.test)}",
        f"model: {describe(flow)}, {n_params:,} parameters{given if flow.context_dim else ''}; "
        f"{where}")  # fmt: skip


def check_resume(args: argparse.Namespace, ckpt: Path, flow: Flow, pre: Any) -> None:
    """Say where a resumed run starts, or refuse a checkpoint of another configuration."""
    from pyro_flows_ext.train import Checkpoint, CheckpointMismatchError

    if args.restart or not ckpt.exists():
        return
    old = Checkpoint.read(ckpt)
    try:
        old.check_compatible(flow.config, pre.config(), ckpt, "use --restart or another --out")
    except CheckpointMismatchError as err:
        raise UsageError(str(err)) from None
    say(f"resuming from {ckpt} (step {old.step})")


def contexts(split: Any, classes: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One-hot contexts of the train, validation and test examples (``None`` without
    ``classes``)."""
    if not classes:
        return None, None, None
    train, valid, test = (one_hot(labels, classes) for labels in split.labels)
    return train, valid, test


def run_fit(args: argparse.Namespace) -> int:
    """``pyro-flows fit``."""
    positive(args, "levels", "depth", "hidden_channels", "steps", "batch_size", "lr",
             "patience", "eval_every", "samples", "temperature", "threads")  # fmt: skip
    torch.set_num_threads(args.threads)
    from pyro_flows_ext.train import fit, is_main_process, resolve_device

    device = resolve_device(args.device)
    name, split = load_data(args)
    check_options(args, name, split)
    pre = make_preprocess(args, split)
    classes = split.labels.classes if args.conditional else 0
    torch.manual_seed(args.seed)
    flow = make_flow(args, split.event_shape, classes)
    out, ckpt = Path(args.out), Path(args.out) / "model.pt"
    announce(name, split, flow, device)
    check_resume(args, ckpt, flow, pre)
    out.mkdir(parents=True, exist_ok=True)
    train_c, valid_c, _ = contexts(split, classes)
    start = time.perf_counter()
    history = fit(
        flow, split.train, context=train_c, valid=split.valid, valid_context=valid_c,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        patience=args.patience, device=device, dequantize=pre, checkpoint=ckpt,
        resume=not args.restart, progress=not args.no_progress, seed=args.seed, bf16=args.bf16,
        compile=args.compile,
    )  # fmt: skip
    if is_main_process():
        report(args, name, split, flow, pre, history, time.perf_counter() - start)
    return 0


def report(args: argparse.Namespace, name: str, split: Any, flow: Flow, pre: Any,
           history: Any, seconds: float) -> None:  # fmt: skip
    """Test bits/dim, samples.png, curve.png and metrics.json (in process 0)."""
    from pyro_flows_ext import plots
    from pyro_flows_ext.train import bits_per_dim

    out, image = Path(args.out), len(split.event_shape) == 3
    test_c = contexts(split, flow.context_dim)[2]
    test = bits_per_dim(flow, split.test, context=test_c, dequantize=pre, seed=args.seed)
    temperature = (args.temperature or IMAGE_TEMPERATURE) if image else 1.0
    torch.manual_seed(args.seed)
    title = f"{describe(flow)}, T = {temperature:g}"
    if flow.context_dim:
        title = f"p(x | class), one row per class: {title}"
    draw_samples(flow, pre, args.samples, temperature, out / "samples.png", title,
                 reference=None if image else split.test)  # fmt: skip
    plots.save_curve(history, out / "curve.png", title=f"{name}: test {test:.3f} bits/dim")
    steps = history.step[-1] if history.step else 0
    metrics = {"data": name, "model": flow.config, "dequantize": pre.config().get("kind"),
               "conditional": bool(flow.context_dim), "test_bpd": test,
               "best_valid_bpd": history.best_valid, "best_step": history.best_step,
               "steps": steps, "stopped_early": history.stopped_early,
               "train_seconds": round(seconds, 2)}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    given = " given the true labels" if flow.context_dim else ""
    best = "" if history.best_valid is None else (
        f" (best validation {history.best_valid:.3f} at step {history.best_step})")  # fmt: skip
    print(f"test bits/dim{given}: {test:.3f}{best}; {steps} steps in {seconds:.0f} s")
    print(f"wrote {out / 'model.pt'}, {out / 'samples.png'}, {out / 'curve.png'}, "
          f"{out / 'metrics.json'}")  # fmt: skip


def run_sample(args: argparse.Namespace) -> int:
    """``pyro-flows sample``."""
    positive(args, "num", "temperature")
    import numpy as np

    torch.set_num_threads(1)
    from pyro_flows_ext.train import Dequantize, load_checkpoint

    flow, pre, _ = load_checkpoint(args.checkpoint, best=not args.last)
    image = len(flow.event_shape) == 3
    temperature = args.temperature or (IMAGE_TEMPERATURE if image else 1.0)
    torch.manual_seed(args.seed)
    out = Path(args.out or Path(args.checkpoint).with_name(f"samples_T{temperature:g}.png"))
    rows = ", one row per class" if flow.context_dim else ""
    x = draw_samples(flow, pre, args.num, temperature, out, f"T = {temperature:g}{rows}")
    if args.npy:
        values = pre.to_levels(x) if isinstance(pre, Dequantize) else pre.decode(x)
        np.save(args.npy, values.cpu().numpy())
    print(f"wrote {out}" + (f", {args.npy}" if args.npy else "") + rows)
    return 0
