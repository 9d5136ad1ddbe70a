"""Lazy Adam for per-element parameters: a step of a subsampled plate moves only the rows of
the elements in its subsample, in the parameters and in the optimiser's state.

A guide that follows a subsampled plate (:class:`~pyro_flows_ext.infer.AutoHierarchicalFlow`)
keeps parameters with one row per plate element (embeddings, pseudo-likelihoods) and gathers
the ``B`` rows of a step's subsample. Their gradient is exactly zero on every other row, but
plain Adam (:class:`pyro.optim.ClippedAdam`) still decays every row's moments and moves every
row by its momentum: each visit of a row turns into many steps of movement along one noisy
gradient, and the update costs ``O(N)`` arithmetic and writes however small ``B`` is.

:class:`LazyClippedAdam` is ``ClippedAdam`` (same options, same update) except on parameters
that a guide marked as per-element with :func:`mark_per_element`. There, the *cells* of the
parameter (every index of all its dimensions but the last, which holds one element's values)
whose gradient is not all zero are the step's rows; only they get their moments, values and
step counts updated, and their bias correction uses their own step count (TensorFlow's
LazyAdam, torch's ``SparseAdam``). A row in the subsample whose gradient happens to be exactly
zero is treated as not visited. Unmarked parameters get ``ClippedAdam``'s update to the bit
(a guide marks only the parameters of subsampled plates, so that an unsubsampled fit is the
same as with ``ClippedAdam``). The rows are found by one read of the dense gradient; the Adam
arithmetic and every write are ``O(B)``.

The marker is an attribute on the parameter, set by the guide each time it gathers rows, so it
needs no bookkeeping across copies, pickles or param-store loads: the next call marks again.
Pyro uses the optimiser through :func:`lazy_clipped_adam` (a :class:`pyro.optim.PyroOptim`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.optim import PyroOptim
from torch import Tensor
from torch.optim import Optimizer

from pyro_flows_ext.checks import check_bool, positive_float

__all__ = ["LazyClippedAdam", "is_per_element", "lazy_clipped_adam", "mark_per_element"]

_MARK = "_per_element_rows"


def mark_per_element(param: Tensor) -> Tensor:
    """Mark ``param`` (``(*cells, values)``, at least 2-D) as holding one row per plate
    element, for :class:`LazyClippedAdam`; returns it.

    Example:
        >>> t = mark_per_element(torch.nn.Parameter(torch.zeros(5, 2)))
        >>> is_per_element(t), is_per_element(torch.zeros(5, 2))
        (True, False)
    """
    if param.dim() < 2:
        raise ValueError(
            f"a per-element parameter must be (*elements, values), at least 2-D, got shape "
            f"{tuple(param.shape)}"
        )
    setattr(param, _MARK, True)
    return param


def is_per_element(param: Tensor) -> bool:
    """Whether ``param`` was marked by :func:`mark_per_element`."""
    return bool(getattr(param, _MARK, False))


def _check_options(
    lr: float,
    betas: Any,
    eps: float,
    weight_decay: float,
    clip_norm: float,
    lrd: float,
    centered_variance: bool,
) -> tuple[float, float]:
    positive_float("lr", lr)
    positive_float("eps", eps)
    positive_float("weight_decay", weight_decay, allow_zero=True)
    positive_float("clip_norm", clip_norm, allow_inf=True)
    positive_float("lrd", lrd)
    check_bool("centered_variance", centered_variance)
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    for name, beta in zip(("betas[0]", "betas[1]"), betas, strict=True):
        if positive_float(name, beta, allow_zero=True) >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    return float(betas[0]), float(betas[1])


class LazyClippedAdam(Optimizer):
    """:class:`pyro.optim.ClippedAdam` with lazy rows on per-element parameters (module
    docstring). Options as ``ClippedAdam``'s: the step size ``lr`` is multiplied by ``lrd``
    at every step (whichever rows move), gradients are clamped elementwise to
    ``[-clip_norm, clip_norm]``, ``weight_decay`` adds an L2 gradient (on a lazy parameter,
    to the visited rows only).

    Its state per parameter: ``step`` (the optimiser's steps), ``exp_avg`` and ``exp_avg_sq``
    (the parameter's shape) and, for a lazy one, ``row_step`` (each cell's update count).

    Example:
        >>> p = mark_per_element(torch.nn.Parameter(torch.zeros(4, 1)))
        >>> opt = LazyClippedAdam([p], lr=0.1, clip_norm=math.inf)
        >>> p.grad = torch.tensor([[1.0], [0.0], [0.0], [-1.0]])
        >>> opt.step()
        >>> [round(x, 4) for x in p.detach().squeeze(-1).tolist()], opt.state[p]["row_step"]
        ([-0.1, 0.0, 0.0, 0.1], tensor([1, 0, 0, 1]))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_norm: float = 10.0,
        lrd: float = 1.0,
        centered_variance: bool = False,
    ) -> None:
        options = (lr, betas, eps, weight_decay, clip_norm, lrd, centered_variance)
        betas = _check_options(*options)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm,
            lrd=lrd, centered_variance=centered_variance,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every parameter with a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["lr"] *= group["lrd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("LazyClippedAdam takes dense gradients (zero rows unvisited)")
                state = self.state[p]
                if not state:
                    state.update(
                        step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )
                    if is_per_element(p):
                        cells = p.numel() // p.shape[-1]
                        state["row_step"] = torch.zeros(cells, dtype=torch.long, device=p.device)
                state["step"] += 1
                if "row_step" in state:
                    self._lazy(p, state, group)
                else:
                    _adam(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a saved state (torch casts every tensor of it to its parameter's dtype: the
        step counts are made integers again)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "row_step" in state:
                state["row_step"] = state["row_step"].long()

    def _lazy(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        width = p.shape[-1]
        grad = p.grad.view(-1, width)  # type: ignore[union-attr]
        rows = grad.any(dim=1).nonzero().squeeze(1)  # the rows with a non-zero gradient
        if not len(rows):
            return
        value, row_step = p.view(-1, width), state["row_step"]
        m_all, v_all = state["exp_avg"].view(-1, width), state["exp_avg_sq"].view(-1, width)
        row_step[rows] += 1
        count = row_step[rows].unsqueeze(1).to(torch.float64)
        x, m, v = value[rows], m_all[rows], v_all[rows]
        beta1, beta2 = group["betas"]
        g = grad[rows].clamp(-group["clip_norm"], group["clip_norm"])
        if group["weight_decay"] != 0:
            g = g.add(x, alpha=group["weight_decay"])
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        centred = g - m if group["centered_variance"] else g
        v.mul_(beta2).addcmul_(centred, centred, value=1 - beta2)
        step_size = group["lr"] * (1 - beta2**count).sqrt() / (1 - beta1**count)
        x.sub_(step_size.to(x.dtype) * m / (v.sqrt() + group["eps"]))
        value[rows], m_all[rows], v_all[rows] = x, m, v


def _adam(
    p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, group: dict
) -> None:
    """``ClippedAdam``'s update of ``p`` at ``step`` (from 1), operation for operation, so
    that a guide without subsampled plates fits exactly as with ``ClippedAdam``."""
    grad.clamp_(-group["clip_norm"], group["clip_norm"])
    beta1, beta2 = group["betas"]
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    centred = grad - exp_avg if group["centered_variance"] else grad
    exp_avg_sq.mul_(beta2).addcmul_(centred, centred, value=1 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def lazy_clipped_adam(optim_args: dict[str, Any] | Callable[..., dict[str, Any]]) -> PyroOptim:
    """:class:`LazyClippedAdam` for Pyro's ``SVI``, as ``pyro.optim.ClippedAdam(optim_args)``
    (a dict of options, or a callable ``(module_name, param_name) -> dict`` per parameter).
    A dict is checked at once.

    Example:
        >>> optim = lazy_clipped_adam({"lr": 0.01, "clip_norm": math.inf})
        >>> type(optim).__name__
        'PyroOptim'
    """
    if isinstance(optim_args, dict):
        LazyClippedAdam([torch.zeros(1, requires_grad=True)], **optim_args)  # checks them
    elif not callable(optim_args):
        raise TypeError(
            f"optim_args must be a dict of LazyClippedAdam's options or a callable returning "
            f"one, got {type(optim_args).__name__}"
        )
    return PyroOptim(LazyClippedAdam, optim_args)
