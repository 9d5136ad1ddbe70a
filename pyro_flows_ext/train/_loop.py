""":func:`~pyro_flows_ext.train.fit`'s loop as a small object with named steps, on arguments
already checked (a :class:`~pyro_flows_ext.train.FitConfig` and validated data)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from pyro_flows_ext.flows import Flow
from pyro_flows_ext.train._steps import (
    Batches,
    Objective,
    Schedule,
    compile_conditioners,
    seed_of,
)
from pyro_flows_ext.train.checkpoint import Checkpoint, save_checkpoint
from pyro_flows_ext.train.config import FitConfig
from pyro_flows_ext.train.data import Examples
from pyro_flows_ext.train.distributed import Distributed
from pyro_flows_ext.train.history import History, TrainingDivergedError
from pyro_flows_ext.train.metrics import log_likelihood, nll
from pyro_flows_ext.train.state import TrainingState

__all__ = ["Trainer"]

RESUME_HINT = "pass resume=False or another checkpoint path"


class _Progress:
    """The tqdm bar with the running bits/dim (and the last validation score)."""

    def __init__(self, show: bool, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not show, unit="step")
        self.postfix: dict[str, str] = {}

    def update(self, step: int, total: int, train_bpd: list[float]) -> None:
        self.bar.update(1)
        if step % 10 == 0 or step == total:
            recent = train_bpd[-50:]
            self.show("bpd", sum(recent) / len(recent))

    def show(self, key: str, value: float) -> None:
        self.postfix[key] = f"{value:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)


class Trainer:
    """One process's run of :func:`~pyro_flows_ext.train.fit` in the process view ``ctx``:
    :meth:`start` (resume, or initialise ActNorm on data), then :meth:`run`. The examples
    carry their contexts for a conditional flow; every row selection applies to both."""

    def __init__(
        self,
        flow: Flow,
        train: Examples,
        valid: Examples | None,
        config: FitConfig,
        ctx: Distributed,
    ) -> None:
        self.flow, self.config, self.ctx = flow, config, ctx
        self.valid = valid
        # one global batch per step, cut into world_size shards (see train.distributed)
        self.batches = Batches(len(train), config.batch_size * ctx.world_size, config.seed)
        self.total = config.total_steps(self.batches.per_epoch)
        self.every = config.eval_interval(self.batches.per_epoch)
        # the loss as a module; a learned preprocessing (variational dequantization) trains too
        objective = Objective(flow, config.preprocess, config.bf16).to(ctx.device)
        self.data = train.staged(ctx.device)
        # one fused kernel for all parameters where torch has one (CPU, CUDA): a Glow has
        # hundreds of small tensors, and the per-tensor loop cost ~3% of a step
        fused = ctx.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(
            objective.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused
        )
        schedule = Schedule(config.warmup, self.total, config.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.state = TrainingState(objective, optimizer, scheduler)
        self.path = config.checkpoint_path

    def start(self) -> torch.nn.Module:
        """Resume from the checkpoint or initialise; return the loss module (wrapped in
        ``DistributedDataParallel`` for a data-parallel run)."""
        if self.path is not None and self.config.resume and self.path.exists():
            ckpt = Checkpoint.read(self.path)
            self.state.check_compatible(ckpt, self.path, RESUME_HINT)
            self.state.restore(ckpt)
        else:
            self._initialise()
        if self.config.compile:
            compile_conditioners(self.flow)
        return self.ctx.wrap(self.state.objective)  # DDP syncs process 0's state here

    def _initialise(self) -> None:
        """Data-dependent initialisation (ActNorm) on a batch of training data."""
        g = torch.Generator().manual_seed(seed_of(self.config.seed, 2))  # same in every process
        idx = torch.randperm(len(self.data), generator=g)[: max(self.batches.batch_size, 256)]
        x, c = self.data.take(idx, self.ctx.device)
        with torch.no_grad():
            log_likelihood(self.flow, x, self.config.preprocess, g, c)

    def run(self, loss_fn: torch.nn.Module) -> History:
        """Train to the last step or until early stopping; leave the best weights in."""
        state, config = self.state, self.config
        show = config.progress and self.ctx.is_main
        progress = _Progress(show, self.total, min(state.step, self.total))
        self.flow.train()
        try:
            while state.step < self.total and not state.history.stopped_early:
                start = time.perf_counter()
                value = self._step(loss_fn)
                state.record_step(value, time.perf_counter() - start)
                progress.update(state.step, self.total, state.history.loss)
                if state.step % self.every == 0 or state.step == self.total:
                    self._checkpoint(progress)
                if config.callback is not None:
                    config.callback(state.step, value)
        finally:
            progress.bar.close()
        self.ctx.barrier()  # process 0's checkpoint is complete when fit returns anywhere
        state.load_best()
        self.flow.eval()
        return state.history

    def _step(self, loss_fn: torch.nn.Module) -> float:
        """One optimiser step on the global batch; its bits/dim."""
        state, ctx = self.state, self.ctx
        g = torch.Generator().manual_seed(seed_of(self.config.seed, 1, state.step, *ctx.rank_key))
        x, c = self.data.take(ctx.shard(self.batches.indices(state.step)), ctx.device)
        loss = loss_fn(x, g, c)
        value = ctx.mean(loss)  # the global batch's bits/dim, the same in every process
        if not math.isfinite(value):
            raise self._diverged(f"the loss is {value}")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in state.objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad or math.inf)
        if not bool(torch.isfinite(norm)):
            raise self._diverged(f"the gradient norm is {float(norm)}")
        state.optimizer.step()
        state.scheduler.step()
        return value

    def _checkpoint(self, progress: _Progress) -> None:
        """Evaluate (with validation data) and write the checkpoint."""
        state = self.state
        if self.valid is not None:
            score = self._evaluate(self.valid)
            if not math.isfinite(score):
                raise TrainingDivergedError(
                    f"training diverged by step {state.step}: validation bits/dim is {score}",
                    state.step,
                )
            state.record_eval(score, self.config.patience)
            progress.show("valid", score)
        self._write()

    def _evaluate(self, valid: Examples) -> float:
        """Global validation bits/dim: each process scores its shard."""
        ctx, part, ll = self.ctx, valid.rows(self.ctx.shard), 0.0
        if len(part):
            seed = seed_of(self.config.seed, 3, *ctx.rank_key)
            pre = self.config.preprocess
            ll = -nll(self.flow, part.x, context=part.context, dequantize=pre, seed=seed)
        total_ll, count = ctx.sum(ll * len(part), len(part))
        return -total_ll / count / (self.flow.num_dims * math.log(2))

    def _write(self) -> None:
        state = self.state
        if self.path is None:
            return
        if not state.weights_are_finite():
            raise TrainingDivergedError(
                f"weights became NaN or infinite by step {state.step}", state.step
            )
        state.saved = state.step
        if self.ctx.is_main:  # the replicas are identical: process 0 writes
            save_checkpoint(self.path, state.to_checkpoint(self._fit_record()))

    def _fit_record(self) -> dict[str, Any]:
        config = self.config
        return {"steps": self.total, "batch_size": config.batch_size, "lr": config.lr,
                "seed": config.seed, "world_size": self.ctx.world_size}  # fmt: skip

    def _diverged(self, what: str) -> TrainingDivergedError:
        step, saved = self.state.step + 1, self.state.saved
        held = "no checkpoint of this run" if saved is None else f"the checkpoint of step {saved}"
        where = "" if self.path is None else f"; {self.path} holds {held}"
        return TrainingDivergedError(f"training diverged at step {step}: {what}{where}", step)
