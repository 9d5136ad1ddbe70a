"""The settings of one :func:`~pyro_flows_ext.train.fit` run, checked once.

:class:`FitConfig` is a frozen dataclass of :func:`~pyro_flows_ext.train.fit`'s keyword
arguments. Building it validates every argument (a ``TypeError`` for a value of the wrong
kind, a ``ValueError`` for a bad value, each naming the argument) and normalises them: the
device is resolved, ``dequantize`` becomes a
:class:`~pyro_flows_ext.train.preprocess.Preprocess` and ``checkpoint`` a ``Path``. Nothing
is trained, allocated or read before every argument has been checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_flows_ext.checks import check_bool, one_of, positive_float, positive_int
from pyro_flows_ext.train.distributed import check_distributed
from pyro_flows_ext.train.preprocess import DequantizeSpec, Preprocess, as_preprocess

__all__ = ["DEFAULT_STEPS", "SCHEDULES", "FitConfig", "resolve_device"]

DEFAULT_STEPS = 1000
"""Length of a :func:`~pyro_flows_ext.train.fit` run given neither ``steps`` nor ``epochs``."""

SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules after the warm-up."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or a torch.device, got {device!r}")
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


def _optional(check: Callable[..., Any], name: str, value: Any, **kw: Any) -> Any:
    return None if value is None else check(name, value, **kw)


@dataclass(frozen=True)
class FitConfig:
    """:func:`~pyro_flows_ext.train.fit`'s settings (see it for their meaning), checked and
    normalised when the object is built.

    Example:
        >>> config = FitConfig(steps=100, batch_size=32, device="cpu")
        >>> config.total_steps(steps_per_epoch=10), config.torch_device
        (100, device(type='cpu'))
        >>> FitConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be an int >= 1, got 0
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip_grad: float | None = 50.0
    eval_every: int | None = None
    patience: int | None = 10
    device: str | torch.device = "auto"
    dequantize: DequantizeSpec = None
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = True
    progress: bool = True
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    callback: Callable[[int, float], None] | None = None
    distributed: bool | None = None

    def __post_init__(self) -> None:
        self._check_length()
        self._check_optimiser()
        for name in ("resume", "progress", "bf16", "compile"):
            check_bool(name, getattr(self, name))
        positive_int("seed", self.seed, minimum=0)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"callback must be callable(step, loss), got {self.callback!r}")
        check_distributed(self.distributed)
        if self.checkpoint is not None and not isinstance(self.checkpoint, str | os.PathLike):
            raise TypeError(f"checkpoint must be a path or None, got {self.checkpoint!r}")
        device = resolve_device(self.device)
        if self.bf16 and device.type != "cuda":
            raise ValueError(f"bf16 autocast needs a CUDA device, got {device}")
        self._set("device", device)
        self._set("dequantize", as_preprocess(self.dequantize))
        self._set("checkpoint", None if self.checkpoint is None else Path(self.checkpoint))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalise a field of the frozen instance

    def _check_length(self) -> None:
        _optional(positive_int, "steps", self.steps)
        _optional(positive_int, "epochs", self.epochs)
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})"
            )
        _optional(positive_int, "eval_every", self.eval_every)
        _optional(positive_int, "patience", self.patience)

    def _check_optimiser(self) -> None:
        positive_int("batch_size", self.batch_size)
        self._set("lr", positive_float("lr", self.lr))
        positive_int("warmup", self.warmup, minimum=0)
        one_of("schedule", self.schedule, SCHEDULES)
        self._set("weight_decay", positive_float("weight_decay", self.weight_decay, True))
        clip = _optional(positive_float, "clip_grad", self.clip_grad, allow_inf=True)
        self._set("clip_grad", clip)

    @property
    def torch_device(self) -> torch.device:
        """``device``, resolved (``"auto"`` made a choice)."""
        assert isinstance(self.device, torch.device)  # __post_init__ resolved it
        return self.device

    @property
    def preprocess(self) -> Preprocess:
        """``dequantize`` as the :class:`Preprocess` it was normalised to."""
        assert isinstance(self.dequantize, Preprocess)  # __post_init__ made it one
        return self.dequantize

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint`` as a ``Path``."""
        assert self.checkpoint is None or isinstance(self.checkpoint, Path)
        return self.checkpoint

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in optimiser steps."""
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return DEFAULT_STEPS if self.steps is None else self.steps

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Steps between evaluations and checkpoints (default: one epoch, within 25..500)."""
        return self.eval_every or min(max(steps_per_epoch, 25), 500)
