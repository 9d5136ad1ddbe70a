"""Checkpoints that are written atomically and resume exactly.

A checkpoint is one ``torch.save`` d dict of plain values and tensors (loadable with
``weights_only=True``): the model's ``state_dict`` and the ``config`` that rebuilds it, the
preprocessing, optimizer and scheduler states, the step, the best weights so far, the history
and the random number generators' states. It is written to ``path.tmp`` and then renamed over
``path`` (``os.replace`` is atomic), so an interrupted write never leaves a broken file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_flows_ext.flows import Flow, build_flow
from pyro_flows_ext.train.preprocess import Preprocess, as_preprocess

__all__ = [
    "get_rng_state",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = 1


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


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path.tmp``, then rename over ``path`` (atomic)."""
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise ValueError(f"{path} is not a pyro_flows_ext checkpoint")
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
    ckpt = read_checkpoint(path)
    if ckpt.get("flow_config") is None:
        raise ValueError(f"{path} holds a flow without a builder config; rebuild it yourself")
    flow = build_flow(ckpt["flow_config"])
    pre = as_preprocess(ckpt.get("preprocess"))
    use_best = best and ckpt.get("best_state") is not None
    flow.load_state_dict(ckpt["best_state"] if use_best else ckpt["model"])
    if isinstance(pre, torch.nn.Module):  # learned preprocessing (variational dequantization)
        pre.load_state_dict(ckpt["best_preprocess_state" if use_best else "preprocess_state"])
        pre.to(device)
    return flow.to(device), pre, ckpt
