"""Checkpoints that are written atomically and resume exactly.

A checkpoint is one ``torch.save`` d dict of plain values and tensors (loadable with
``weights_only=True``) whose keys are the fields of :class:`Checkpoint` plus ``"format"``:
the model's ``state_dict`` and the ``config`` that rebuilds it, the preprocessing, optimizer
and scheduler states, the step, the best weights so far, the history and the random number
generators' states. It is written to ``path.tmp`` and then renamed over ``path``
(``os.replace`` is atomic), so an interrupted write never leaves a broken file.
:meth:`Checkpoint.check_compatible` is the one test of whether a checkpoint belongs to a
given model and preprocessing.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_flows_ext.flows import Flow, build_flow
from pyro_flows_ext.train.preprocess import Preprocess, as_preprocess

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointMismatchError",
    "get_rng_state",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = 1
"""Version of the checkpoint layout (the fields of :class:`Checkpoint`) that this code writes
and reads; it changes whenever they do."""

StateDict = dict[str, Any]


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model or preprocessing than the one at hand."""


@dataclass
class Checkpoint:
    """The checkpoint schema: one field per key of the stored dict.

    Attributes:
        model, flow_config: the flow's ``state_dict`` after the last step and the builder
            ``config`` that rebuilds it (``None`` for a hand-made flow).
        preprocess, preprocess_state: the preprocessing's ``config()`` and the ``state_dict``
            of a learned one (empty otherwise).
        optimizer, scheduler: their ``state_dict``.
        step, bad_evals: steps taken; evaluations since the best one.
        best_state, best_preprocess_state: the weights with the best validation score (or
            ``None``).
        history: :meth:`History.to_dict <pyro_flows_ext.train.History.to_dict>`.
        rng: :func:`get_rng_state`.
        fit: a record of the run's settings (``steps``, ``batch_size``, ``lr``, ``seed``,
            ``world_size``).
    """

    model: StateDict
    flow_config: dict[str, Any] | None
    preprocess: dict[str, Any]
    preprocess_state: StateDict
    optimizer: StateDict
    scheduler: StateDict
    step: int
    bad_evals: int
    best_state: StateDict | None
    best_preprocess_state: StateDict | None
    history: dict[str, Any]
    rng: dict[str, Any]
    fit: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The dict that :func:`save_checkpoint` stores (``"format"`` is added there)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any]) -> Checkpoint:
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """:func:`read_checkpoint` as a :class:`Checkpoint`."""
        return cls.from_dict(read_checkpoint(path))

    def weights(self, best: bool = True) -> tuple[StateDict, StateDict]:
        """The flow's and the learned preprocessing's ``state_dict``: the best ones when
        ``best`` and there are any, else those of the last step."""
        if best and self.best_state is not None and self.best_preprocess_state is not None:
            return self.best_state, self.best_preprocess_state
        return self.model, self.preprocess_state

    def check_compatible(
        self, flow_config: Any, preprocess_config: dict[str, Any], where: Any, hint: str
    ) -> None:
        """Raise :class:`CheckpointMismatchError` (naming ``where`` and ending in ``hint``)
        unless this checkpoint was written for a flow with ``flow_config`` and the
        preprocessing with ``preprocess_config``."""
        if self.flow_config != flow_config or self.preprocess != preprocess_config:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written for another model or preprocessing "
                f"({self.flow_config}, {self.preprocess}); {hint}"
            )


def get_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's and (if initialised) CUDA's global RNGs."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    legacy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint | dict[str, Any]) -> None:
    """``torch.save`` to ``path.tmp``, then rename over ``path`` (atomic)."""
    if isinstance(checkpoint, Checkpoint):
        checkpoint = checkpoint.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **checkpoint}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict stored at ``path`` (tensors on the CPU), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), int):
        raise ValueError(f"{path} is not a pyro_flows_ext checkpoint")
    if ckpt["format"] != FORMAT:
        raise ValueError(
            f"{path} is a checkpoint of format {ckpt['format']}, but this version of "
            f"pyro_flows_ext reads format {FORMAT}; train again, or load it with the "
            f"version that wrote it"
        )
    missing = [f.name for f in fields(Checkpoint) if f.name not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint (it lacks {', '.join(missing)})")
    return ckpt


def load_checkpoint(
    path: str | os.PathLike[str], best: bool = True, device: str | torch.device = "cpu"
) -> tuple[Flow, Preprocess, dict[str, Any]]:
    """Rebuild ``(flow, preprocess, checkpoint)`` from a file written by
    :func:`~pyro_flows_ext.train.fit`.

    Args:
        path: the checkpoint.
        best: load the weights with the best validation score (when there are any) rather
            than those of the last training step.
        device: where to put the flow.

    The flow must come from a builder (``glow``/``realnvp``); for a hand-made :class:`Flow`,
    build it again yourself and ``load_state_dict(checkpoint["model"])``.
    """
    ckpt = Checkpoint.read(path)
    if ckpt.flow_config is None:
        raise ValueError(f"{path} holds a flow without a builder config; rebuild it yourself")
    flow = build_flow(ckpt.flow_config)
    pre = as_preprocess(ckpt.preprocess)
    flow_state, pre_state = ckpt.weights(best)
    flow.load_state_dict(flow_state)
    if isinstance(pre, torch.nn.Module):  # learned preprocessing (variational dequantization)
        pre.load_state_dict(pre_state)
        pre.to(device)
    return flow.to(device), pre, ckpt.to_dict()
