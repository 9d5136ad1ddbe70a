"""The vocabulary both fits share: :class:`History`, what a fit measured, and
:class:`TrainingDivergedError`, how a fit fails when its numbers stop being finite.

Density models (:func:`~pyro_flows_ext.train.fit`) and guides
(:func:`~pyro_flows_ext.infer.fit_guide`) are trained by the same kind of loop: a loss per
step, an optional evaluation, early stopping, a divergence check. Both return a
:class:`History` and raise a :class:`TrainingDivergedError`; the loss is what the fit
minimises: the batch's bits/dim for a density model, the negative ELBO estimate (nats) for a
guide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["History", "TrainingDivergedError"]


@dataclass
class History:
    """What a fit measured. Steps count from 1.

    Attributes:
        step, loss, step_time: per step taken, its loss (the batch's bits/dim, or the negative
            ELBO estimate of a guide) and seconds.
        smoothed: per step, the bias-corrected moving average of the loss that
            :func:`~pyro_flows_ext.infer.fit_guide` stops on (empty for density models).
        valid_step, valid_loss: per evaluation, the validation loss (bits/dim).
        best_step, best_valid: the evaluation with the lowest validation loss (its weights are
            the flow's when :func:`~pyro_flows_ext.train.fit` returns).
        stopped_early: whether early stopping ended the run.
        cooldown_from: the step after which early stopping decayed the step size before it
            stopped (``fit_guide(cooldown=...)``; ``None``: it did not).
        averaged_from: the step after which a guide's parameters were averaged
            (``fit_guide(average=...)``; ``None``: they were not).
        seconds, cpu_seconds: wall-clock and process CPU seconds of a guide's fit (0 for
            density models, whose per-step times are ``step_time`` and whose runs resume).

    Example:
        >>> h = History(step=[1, 2], loss=[3.0, 2.0], smoothed=[3.0, 2.5])
        >>> h.elbo, History.from_dict(h.to_dict()) == h
        (-2.5, True)
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    valid_step: list[int] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_valid: float | None = None
    stopped_early: bool = False
    cooldown_from: int | None = None
    averaged_from: int | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def elbo(self) -> float:
        """A guide's last smoothed ELBO, ``-smoothed[-1]`` (``nan`` before any step)."""
        return -self.smoothed[-1] if self.smoothed else math.nan

    def record(self, loss: float, seconds: float) -> None:
        """Append the next step's loss and time."""
        self.step.append(len(self.step) + 1)
        self.loss.append(loss)
        self.step_time.append(seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """The history ``to_dict`` gave, also from checkpoints written before the two fits
        shared it (``train_bpd``, ``valid_bpd``)."""
        renamed = {"train_bpd": "loss", "valid_bpd": "valid_loss"}
        return cls(**{renamed.get(k, k): v for k, v in d.items()})


class TrainingDivergedError(FloatingPointError):
    """The loss, a gradient or the parameters of a fit became NaN or infinite at ``step``
    (counted from 1); the update of that step was not applied.

    Attributes:
        step: the failing step.
        loss: its loss (``nan`` when unknown).
        history: the :class:`History` of the steps before it, when the fit kept one.
    """

    def __init__(
        self, message: str, step: int, loss: float = math.nan, history: History | None = None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.history = history
