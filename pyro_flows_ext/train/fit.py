"""Maximum-likelihood training of a :class:`~pyro_flows_ext.flows.Flow`, on CPU or GPU.

The loss is the negative log-likelihood of the raw data in bits per dimension (see
:mod:`pyro_flows_ext.train.preprocess`), minimised by Adam with a linear warm-up and gradient
norm clipping. Batch order and dequantization noise come from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have. Under ``torchrun`` the same function trains data-parallel
across processes (see :mod:`pyro_flows_ext.train.distributed`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_flows_ext.flows import Flow
from pyro_flows_ext.train._steps import (
    Batches,
    Objective,
    Schedule,
    compile_conditioners,
    seed_of,
    snapshot,
    stage,
)
from pyro_flows_ext.train.checkpoint import (
    get_rng_state,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pyro_flows_ext.train.distributed import Distributed, setup_distributed
from pyro_flows_ext.train.metrics import as_tensor_data, log_likelihood, nll
from pyro_flows_ext.train.preprocess import Preprocess, as_preprocess

__all__ = ["History", "TrainingDivergedError", "fit", "resolve_device"]


class TrainingDivergedError(FloatingPointError):
    """The loss, a gradient or the weights became NaN or infinite at ``step``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class History:
    """What :func:`fit` measured. Steps count from 1.

    Attributes:
        step, train_bpd, step_time: per training step, the batch's bits/dim and seconds.
        valid_step, valid_bpd: per evaluation, validation bits/dim.
        best_step, best_valid: the evaluation with the lowest validation bits/dim (its weights
            are the flow's when ``fit`` returns).
        stopped_early: whether early stopping ended the run.
    """

    step: list[int] = field(default_factory=list)
    train_bpd: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    valid_step: list[int] = field(default_factory=list)
    valid_bpd: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_valid: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(**d)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def fit(
    flow: Flow,
    train: Any,
    *,
    valid: Any = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    clip_grad: float | None = 50.0,
    eval_every: int | None = None,
    patience: int | None = 10,
    device: str | torch.device = "auto",
    dequantize: Preprocess | int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    bf16: bool = False,
    compile: bool = False,
    callback: Callable[[int, float], None] | None = None,
    distributed: bool | None = None,
) -> History:
    """Train ``flow`` by maximum likelihood; return the :class:`History`.

    Args:
        flow: the model; it is moved to ``device`` and left there.
        train, valid: ``(N, *event_shape)`` tensors or arrays of raw data (integers for
            discrete data). With ``valid``, the validation bits/dim is measured every
            ``eval_every`` steps, training stops after ``patience`` evaluations without
            improvement, and the best weights are restored at the end.
        steps, epochs: length of the run (at most one; default 1000 steps). An epoch is
            ``N // (batch_size * world_size)`` steps.
        batch_size, lr, weight_decay: Adam's settings (``batch_size`` per process: a
            data-parallel step uses ``batch_size * world_size`` examples); the learning rate
            rises linearly over ``warmup`` steps, then stays (``schedule="constant"``) or
            decays to zero at the last step along a half cosine (``"cosine"``).
        clip_grad: maximum gradient norm (``None``: no clipping).
        eval_every: steps between evaluations and checkpoints (default: one epoch, at least
            25 and at most 500 steps).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        dequantize: ``None`` for continuous data, a number of levels ``L`` for uniform
            dequantization plus the logit transform, or a
            :class:`~pyro_flows_ext.train.preprocess.Preprocess` (a learned one, such as
            :class:`~pyro_flows_ext.train.VariationalDequantize`, is trained, checkpointed
            and early-stopped with the flow). Bits/dim are those of the raw data either way.
        checkpoint: file written (atomically) at each evaluation and at the end. With
            ``resume`` and an existing file, training continues from it exactly.
        progress: show a tqdm bar with the running bits/dim.
        seed: seeds batch order and dequantization noise.
        bf16: bfloat16 autocast (CUDA only). ``compile``: ``torch.compile`` the coupling
            networks in place (worth it on GPUs; compiling takes a while).
        callback: ``callback(step, train_bpd)`` after every step (in every process).
        distributed: train data-parallel with ``DistributedDataParallel`` (``True``), in one
            process (``False``), or when started by ``torchrun`` or inside an initialised
            process group (``None``). Each process then uses ``cuda:LOCAL_RANK`` (NCCL) or
            the CPU (gloo), trains on its shard of each global batch, and reports global
            bits/dim; process 0 alone shows progress and writes the checkpoint. See
            :mod:`pyro_flows_ext.train.distributed`.

    Raises:
        TrainingDivergedError: (a ``FloatingPointError``) when the loss, the gradient norm or
            the weights stop being finite; it names the step and writes no checkpoint.

    Example:
        >>> import torch
        >>> from pyro_flows_ext.flows import realnvp
        >>> _ = torch.manual_seed(0)
        >>> flow = realnvp(2, couplings=2, hidden_dims=[16])
        >>> data = torch.randn(512, 2) + 4 * torch.randint(0, 2, (512, 1))  # two clusters
        >>> h = fit(flow, data, steps=60, lr=3e-3, progress=False, device="cpu")
        >>> sum(h.train_bpd[-10:]) < sum(h.train_bpd[:10])
        True
    """
    if steps is not None and epochs is not None:
        raise ValueError(f"give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    dev = resolve_device(device)
    if not (distributed is None or isinstance(distributed, bool)):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if bf16 and dev.type != "cuda":
        raise ValueError(f"bf16 autocast needs a CUDA device, got {dev}")
    pre = as_preprocess(dequantize)
    x_train = as_tensor_data(train, flow.event_shape, "train")
    x_valid = None if valid is None else as_tensor_data(valid, flow.event_shape, "valid")
    for x in (x_train, x_valid):
        if x is not None:
            pre.validate(x)
    if (steps is not None and int(steps) < 1) or (epochs is not None and int(epochs) < 1):
        raise ValueError(f"steps/epochs must be positive, got steps={steps}, epochs={epochs}")
    ctx = setup_distributed(distributed, dev)
    try:
        if x_train.shape[0] < batch_size * ctx.world_size and ctx.enabled:
            raise ValueError(
                f"a data-parallel step needs batch_size * world_size = "
                f"{batch_size * ctx.world_size} training examples, got {x_train.shape[0]}"
            )
        return _train(
            flow, x_train, x_valid, pre, ctx, steps=steps, epochs=epochs,
            batch_size=batch_size, lr=lr, warmup=warmup, schedule=schedule,
            weight_decay=weight_decay, clip_grad=clip_grad, eval_every=eval_every,
            patience=patience, checkpoint=checkpoint, resume=resume, progress=progress,
            seed=seed, bf16=bf16, compile=compile, callback=callback,
        )  # fmt: skip
    finally:
        ctx.close()


def _train(
    flow: Flow,
    x_train: Tensor,
    x_valid: Tensor | None,
    pre: Preprocess,
    ctx: Distributed,
    *,
    steps: int | None,
    epochs: int | None,
    batch_size: int,
    lr: float,
    warmup: int,
    schedule: str,
    weight_decay: float,
    clip_grad: float | None,
    eval_every: int | None,
    patience: int | None,
    checkpoint: str | os.PathLike[str] | None,
    resume: bool,
    progress: bool,
    seed: int,
    bf16: bool,
    compile: bool,
    callback: Callable[[int, float], None] | None,
) -> History:
    """:func:`fit`'s loop, on arguments already checked, in the process view ``ctx``."""
    dev = ctx.device
    # one global batch per step, cut into world_size shards (see train.distributed)
    batches = Batches(x_train.shape[0], batch_size * ctx.world_size, seed)
    if epochs is not None:
        steps = int(epochs) * batches.per_epoch
    total = 1000 if steps is None else int(steps)
    every = eval_every or min(max(batches.per_epoch, 25), 500)

    # the loss as a module; a learned preprocessing (variational dequantization) trains with it
    objective = Objective(flow, pre, bf16).to(dev)
    learned = objective.learned
    data = stage(x_train, dev)
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(warmup, total, schedule))
    history = History()
    step, bad_evals, saved = 0, 0, None
    best_state: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
    path = None if checkpoint is None else Path(checkpoint)

    if path is not None and resume and path.exists():
        ckpt = read_checkpoint(path)
        if ckpt.get("flow_config") != flow.config or ckpt.get("preprocess") != pre.config():
            raise ValueError(
                f"checkpoint {path} was written for another model or preprocessing "
                f"({ckpt.get('flow_config')}, {ckpt.get('preprocess')}); pass resume=False "
                f"or another checkpoint path"
            )
        flow.load_state_dict(ckpt["model"])
        learned.load_state_dict(ckpt["preprocess_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, bad_evals = ckpt["step"], ckpt["bad_evals"]
        if ckpt["best_state"] is not None:
            best_state = (ckpt["best_state"], ckpt["best_preprocess_state"])
        saved = step
        history = History.from_dict(ckpt["history"])
        set_rng_state(ckpt["rng"])
    else:  # data-dependent initialisation (ActNorm) on a batch of training data
        g = torch.Generator().manual_seed(seed_of(seed, 2))  # the same batch in every process
        idx = torch.randperm(x_train.shape[0], generator=g)[: max(batches.batch_size, 256)]
        with torch.no_grad():
            log_likelihood(flow, data[idx.to(data.device)].to(dev), pre, g)  # ActNorm init

    if compile:
        compile_conditioners(flow)
    loss_fn = ctx.wrap(objective)  # DistributedDataParallel syncs process 0's state here

    def evaluate() -> float:  # global bits/dim: each process scores its shard
        assert x_valid is not None
        part, ll = ctx.shard(x_valid), 0.0
        if part.shape[0]:
            ll = -nll(flow, part, dequantize=pre, seed=seed_of(seed, 3, *ctx.rank_key))
        total_ll, count = ctx.sum(ll * part.shape[0], part.shape[0])
        return -total_ll / count / (flow.num_dims * math.log(2))

    def write() -> None:
        nonlocal saved
        if path is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in objective.parameters()):
            raise TrainingDivergedError(f"weights became NaN or infinite by step {step}", step)
        saved = step
        if not ctx.is_main:  # the replicas are identical: process 0 writes
            return
        state = {
            "model": flow.state_dict(),
            "preprocess_state": learned.state_dict(),
            "flow_config": flow.config,
            "preprocess": pre.config(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "bad_evals": bad_evals,
            "best_state": None if best_state is None else best_state[0],
            "best_preprocess_state": None if best_state is None else best_state[1],
            "history": history.to_dict(),
            "rng": get_rng_state(),
            "fit": {"steps": total, "batch_size": batch_size, "lr": lr, "seed": seed,
                    "world_size": ctx.world_size},
        }  # fmt: skip
        save_checkpoint(path, state)

    def diverged(what: str) -> TrainingDivergedError:
        where = (
            ""
            if path is None
            else f"; {path} holds "
            + ("no checkpoint of this run" if saved is None else f"the checkpoint of step {saved}")
        )
        return TrainingDivergedError(
            f"training diverged at step {step + 1}: {what}{where}", step + 1
        )

    from tqdm.auto import tqdm

    postfix: dict[str, str] = {}
    show = progress and ctx.is_main
    bar = tqdm(total=total, initial=min(step, total), disable=not show, unit="step")
    flow.train()
    try:
        while step < total and not history.stopped_early:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(seed_of(seed, 1, step, *ctx.rank_key))
            idx = ctx.shard(batches.indices(step))
            x = data[idx.to(data.device)].to(dev, non_blocking=True)
            loss = loss_fn(x, g)
            value = ctx.mean(loss)  # the global batch's bits/dim, the same in every process
            if not math.isfinite(value):
                raise diverged(f"the loss is {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in objective.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
            if not bool(torch.isfinite(norm)):
                raise diverged(f"the gradient norm is {float(norm)}")
            optimizer.step()
            scheduler.step()
            step += 1
            history.step.append(step)
            history.train_bpd.append(value)
            history.step_time.append(time.perf_counter() - start)
            bar.update(1)
            if step % 10 == 0 or step == total:
                recent = history.train_bpd[-50:]
                postfix["bpd"] = f"{sum(recent) / len(recent):.3f}"
                bar.set_postfix(postfix, refresh=False)
            if step % every == 0 or step == total:
                if x_valid is not None:
                    score = evaluate()
                    if not math.isfinite(score):
                        raise TrainingDivergedError(
                            f"training diverged by step {step}: validation bits/dim is {score}",
                            step,
                        )
                    history.valid_step.append(step)
                    history.valid_bpd.append(score)
                    if history.best_valid is None or score < history.best_valid:
                        history.best_valid, history.best_step, bad_evals = score, step, 0
                        best_state = (snapshot(flow), snapshot(learned))
                    else:
                        bad_evals += 1
                        history.stopped_early = patience is not None and bad_evals >= patience
                    postfix["valid"] = f"{score:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                write()
            if callback is not None:
                callback(step, value)
    finally:
        bar.close()
    ctx.barrier()  # process 0's checkpoint is complete when fit returns anywhere
    if best_state is not None:
        flow.load_state_dict(best_state[0])
        learned.load_state_dict(best_state[1])
    flow.eval()
    return history
