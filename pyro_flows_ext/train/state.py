"""What changes while :func:`~pyro_flows_ext.train.fit` trains: :class:`TrainingState`
(everything a checkpoint keeps, with the :class:`~pyro_flows_ext.train.History`, and how it is
saved and restored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pyro_flows_ext.train._steps import Objective, snapshot
from pyro_flows_ext.train.checkpoint import Checkpoint, get_rng_state, set_rng_state
from pyro_flows_ext.train.history import History

__all__ = ["TrainingState"]


Weights = tuple[dict[str, Tensor], dict[str, Tensor]]


@dataclass
class TrainingState:
    """The state of a run: the objective (flow and learned preprocessing) with its optimizer
    and scheduler, the step, the early-stopping counter, the best weights and the history.

    :meth:`to_checkpoint` and :meth:`restore` are inverse: a run restored from a checkpoint
    continues exactly as the run that wrote it.
    """

    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    bad_evals: int = 0
    best: Weights | None = None
    history: History = field(default_factory=History)
    saved: int | None = None  # the step of the checkpoint on disk (written or read), if any

    @property
    def learned(self) -> nn.Module:
        """The learned preprocessing (an empty module when there is none)."""
        return self.objective.learned

    def record_step(self, train_bpd: float, seconds: float) -> None:
        self.step += 1
        self.history.record(train_bpd, seconds)

    def record_eval(self, valid_bpd: float, patience: int | None) -> None:
        """Log a validation score, keep the best weights, and count towards early stopping."""
        history = self.history
        history.valid_step.append(self.step)
        history.valid_loss.append(valid_bpd)
        if history.best_valid is None or valid_bpd < history.best_valid:
            history.best_valid, history.best_step, self.bad_evals = valid_bpd, self.step, 0
            self.best = (snapshot(self.objective.flow), snapshot(self.learned))
        else:
            self.bad_evals += 1
            history.stopped_early = patience is not None and self.bad_evals >= patience

    def weights_are_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.objective.parameters())

    def load_best(self) -> None:
        """Put the best weights (if any evaluation happened) into the flow."""
        if self.best is not None:
            self.objective.flow.load_state_dict(self.best[0])
            self.learned.load_state_dict(self.best[1])

    def to_checkpoint(self, fit_record: dict[str, Any]) -> Checkpoint:
        flow = self.objective.flow
        return Checkpoint(
            model=flow.state_dict(),
            flow_config=flow.config,
            preprocess=self.objective.pre.config(),
            preprocess_state=self.learned.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            step=self.step,
            bad_evals=self.bad_evals,
            best_state=None if self.best is None else self.best[0],
            best_preprocess_state=None if self.best is None else self.best[1],
            history=self.history.to_dict(),
            rng=get_rng_state(),
            fit=fit_record,
        )

    def check_compatible(self, ckpt: Checkpoint, where: Any, hint: str) -> None:
        """See :meth:`Checkpoint.check_compatible`."""
        ckpt.check_compatible(self.objective.flow.config, self.objective.pre.config(), where, hint)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (checked with :meth:`check_compatible` first)."""
        self.objective.flow.load_state_dict(ckpt.model)
        self.learned.load_state_dict(ckpt.preprocess_state)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        self.step, self.bad_evals, self.saved = ckpt.step, ckpt.bad_evals, ckpt.step
        if ckpt.best_state is not None:
            assert ckpt.best_preprocess_state is not None
            self.best = (ckpt.best_state, ckpt.best_preprocess_state)
        self.history = History.from_dict(ckpt.history)
        set_rng_state(ckpt.rng)
