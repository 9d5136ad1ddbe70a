"""The examples that :func:`~pyro_flows_ext.train.fit` and the metrics work on: rows of raw
data and, for a conditional flow (``flow.context_dim = K > 0``), one context row per example.

The context is data, like the examples it goes with: it is checked once against the flow and
the data (:func:`as_context`), kept next to them (:class:`Examples`) and indexed with the same
batch indices, so that shuffling, data-parallel sharding and exact resumption treat the two
alike. Nothing of it goes into a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyro_flows_ext.flows import Flow

__all__ = ["Examples", "as_context", "as_tensor_data", "examples", "stage"]


def as_tensor_data(data: Any, event_shape: tuple[int, ...], name: str = "data") -> Tensor:
    """``data`` (a tensor or array of shape ``(N, *event_shape)``) as a CPU tensor."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(data).__name__}")
    if data.dim() != len(event_shape) + 1 or tuple(data.shape[1:]) != tuple(event_shape):
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, event_shape))}) to match the "
            f"flow, got {tuple(data.shape)}"
        )
    if data.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return data.cpu()


def as_context(
    context: Any, flow: Flow, rows: int, name: str = "context", data_name: str = "data"
) -> Tensor | None:
    """``context`` checked against ``flow`` and the ``rows`` examples of ``data_name`` it
    goes with, as a CPU tensor of shape ``(rows, K)`` in the flow's dtype; ``None`` for an
    unconditional flow given no context.

    A conditional flow needs one context row per example; an unconditional one takes none.
    Integer or boolean contexts (one-hot labels) are cast to the flow's dtype.

    Example:
        >>> from pyro_flows_ext.flows import realnvp
        >>> flow = realnvp(2, depth=1, context_dim=3)
        >>> as_context(np.eye(3)[[0, 2]], flow, rows=2).dtype
        torch.float32
        >>> as_context(torch.ones(2, 4), flow, rows=2)
        Traceback (most recent call last):
        ...
        ValueError: context must have shape (N, 3) for a flow with context_dim=3, got (2, 4)
    """
    k = flow.context_dim
    if context is None:
        if k:
            raise ValueError(
                f"this conditional flow (context_dim={k}) needs {name}=c of shape ({rows}, {k}), "
                f"one row per example of {data_name}"
            )
        return None
    if not k:
        raise ValueError(
            f"{name} was given, but the flow is not conditional (context_dim=0); pass "
            f"{name}=None, or build the flow with context_dim=K"
        )
    if isinstance(context, np.ndarray):
        context = torch.from_numpy(context)
    if not isinstance(context, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array, got {type(context).__name__}"
        )
    if context.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {context.dtype}")
    if context.dim() != 2 or context.shape[1] != k:
        raise ValueError(
            f"{name} must have shape (N, {k}) for a flow with context_dim={k}, got "
            f"{tuple(context.shape)}"
        )
    if context.shape[0] != rows:
        raise ValueError(
            f"{name} has {context.shape[0]} rows but {data_name} has {rows} examples; give "
            f"one context row per example"
        )
    out = context.detach().cpu().to(flow.base_loc.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return out


def stage(data: Tensor, device: torch.device) -> Tensor:
    """Keep data on the CPU for CPU training; for CUDA pin it, and move it whole when small."""
    if device.type != "cuda":
        return data
    pinned = data.pin_memory()
    small = data.numel() * data.element_size() < 2**30
    return pinned.to(device, non_blocking=True) if small else pinned


@dataclass(frozen=True)
class Examples:
    """Raw data ``x`` of shape ``(N, *event_shape)`` and their contexts ``(N, K)`` (``None``
    for an unconditional flow), row ``i`` of one with row ``i`` of the other.

    Example:
        >>> ex = Examples(torch.arange(6.0).reshape(3, 2), torch.eye(3))
        >>> x, c = ex.take(torch.tensor([2, 0]), torch.device("cpu"))
        >>> x.tolist(), c.argmax(-1).tolist()
        ([[4.0, 5.0], [0.0, 1.0]], [2, 0])
    """

    x: Tensor
    context: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def _map(self, fn: Any) -> Examples:
        return Examples(fn(self.x), None if self.context is None else fn(self.context))

    def staged(self, device: torch.device) -> Examples:
        """The examples where :func:`stage` keeps them for training on ``device``."""
        return self._map(lambda t: stage(t, device))

    def rows(self, select: Any) -> Examples:
        """The examples ``select`` picks (``select(tensor)`` applied to both parts)."""
        return self._map(select)

    def take(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Rows ``idx`` of the data and of the context, on ``device``."""
        out = self._map(lambda t: t[idx.to(t.device)].to(device, non_blocking=True))
        return out.x, out.context


def examples(
    flow: Flow, data: Any, context: Any, name: str = "data", context_name: str = "context"
) -> Examples:
    """``data`` and ``context`` checked against ``flow`` (see :func:`as_tensor_data` and
    :func:`as_context`) as :class:`Examples`."""
    x = as_tensor_data(data, flow.event_shape, name)
    return Examples(x, as_context(context, flow, x.shape[0], context_name, name))
