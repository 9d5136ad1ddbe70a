"""Data preparation with its Jacobian: dequantization, the logit transform, standardisation.

A flow models a continuous variable ``y = g(x)`` of the raw data ``x``. A
:class:`Preprocess` maps a batch of raw data to ``y`` and returns ``log|det dy/dx|`` per
example, so that the likelihood of the raw data is

.. math:: \\log p(x) = \\log p_{flow}(g(x)) + \\log |\\det \\partial g / \\partial x|.

For discrete data (images with ``L`` grey levels) :class:`Dequantize` adds uniform noise,
``v = x + u``, ``u ~ U[0, 1)^D``, rescales to ``[0, 1)`` and applies RealNVP's logit
transform ``y = logit(alpha + (1 - 2 alpha) v / L)``. Because ``v`` has unit-volume cells,
``E_u[log p(v)]`` is a lower bound on the log-probability of the discrete ``x``, and

.. math:: \\text{bits/dim} = \\frac{-\\log p_{flow}(y) + D \\log L
          - \\sum_i \\log \\frac{1 - 2\\alpha}{p_i (1 - p_i)}}{D \\log 2},
          \\quad p = \\alpha + (1 - 2\\alpha) v / L,

the usual dequantization bound, comparable with published figures.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dequantize", "Identity", "Preprocess", "Standardize", "as_preprocess"]


def _sum_event(t: Tensor, event_dim: int) -> Tensor:
    return t.flatten(t.dim() - event_dim).sum(-1) if event_dim else t


class Preprocess:
    """Base class: the identity (continuous data modelled as it is).

    Subclasses implement :meth:`__call__` (raw data to the flow's space, with the
    log-determinant per example), :meth:`decode` (the flow's space back to data units, for
    plots and samples) and :meth:`config` (a dict of plain values, stored in checkpoints;
    :func:`as_preprocess` rebuilds the object from it).
    """

    discrete = False

    def __call__(
        self, x: Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)`` with the log-det of shape ``x.shape[:-event_dim]``; ``x``
        is a floating tensor (callers convert integer data to the flow's dtype first)."""
        return x, x.new_zeros(x.shape[: x.dim() - event_dim])

    def validate(self, data: Tensor) -> None:
        """Check a whole data set once (before training or evaluation)."""
        if not data.is_floating_point():
            raise TypeError(
                f"data of dtype {data.dtype} are discrete: pass dequantize=<number of levels> "
                f"(e.g. 256 for 8-bit images), or convert them to a floating dtype"
            )
        if data.numel() and not bool(torch.isfinite(data).all()):
            raise ValueError("data hold NaN or infinite values")

    def decode(self, y: Tensor) -> Tensor:
        """The flow's space back to data units."""
        return y

    def config(self) -> dict[str, Any]:
        return {"kind": "identity"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


Identity = Preprocess


class Dequantize(Preprocess):
    """Uniform dequantization of ``levels``-valued data, then (by default) the logit transform.

    Args:
        levels: number of values the data take, ``0, ..., levels - 1`` (17 for scikit-learn's
            digits, 256 for 8-bit images).
        alpha: RealNVP's margin keeping the logit finite (0.05); used with ``logit=True``.
        logit: apply ``logit(alpha + (1 - 2 alpha) v / L)``; without it ``y = v / L`` in
            ``[0, 1)``.

    ``decode`` returns pixel intensities in ``[0, 1]``; :meth:`to_levels` the integers.

    Example:
        >>> import torch
        >>> d = Dequantize(levels=17)
        >>> y, log_det = d(torch.randint(0, 17, (4, 1, 8, 8)), event_dim=3)
        >>> y.shape, log_det.shape, bool(d.decode(y).max() <= 1)
        (torch.Size([4, 1, 8, 8]), torch.Size([4]), True)
    """

    discrete = True

    def __init__(self, levels: int, alpha: float = 0.05, logit: bool = True) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        if not 0 <= alpha < 0.5 or (logit and alpha == 0):
            raise ValueError(f"alpha must lie in (0, 0.5) with the logit, got {alpha!r}")
        self.levels = levels
        self.alpha = float(alpha)
        self.logit = bool(logit)

    def __call__(
        self, x: Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        return self._continuous(x + u, event_dim)

    def _continuous(self, v: Tensor, event_dim: int) -> tuple[Tensor, Tensor]:
        """``(y, log|dy/dv|)`` for dequantized data ``v`` in ``[0, levels)``."""
        v = v / self.levels
        n = math.prod(v.shape[v.dim() - event_dim :])
        const = -n * math.log(self.levels)
        if not self.logit:
            return v, v.new_full(v.shape[: v.dim() - event_dim], const)
        p = self.alpha + (1 - 2 * self.alpha) * v
        y = torch.log(p) - torch.log1p(-p)
        log_det = _sum_event(-torch.log(p) - torch.log1p(-p), event_dim)
        return y, log_det + const + n * math.log(1 - 2 * self.alpha)

    def validate(self, data: Tensor) -> None:
        """Raise a ``ValueError`` unless ``data`` holds integers in ``0..levels - 1``."""
        if not data.numel():
            return
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > self.levels - 1 or not bool((data == data.round()).all()):
            raise ValueError(
                f"discrete data must hold integers in 0..{self.levels - 1} "
                f"(levels={self.levels}), got values in [{lo:g}, {hi:g}]"
            )

    def decode(self, y: Tensor) -> Tensor:
        v = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) if self.logit else y
        return v.clamp(0.0, 1.0)

    def to_levels(self, y: Tensor) -> Tensor:
        """The flow's space back to integer levels ``0, ..., levels - 1`` (``torch.long``)."""
        return (self.decode(y) * self.levels).floor().clamp(0, self.levels - 1).long()

    def config(self) -> dict[str, Any]:
        return {
            "kind": "dequantize",
            "levels": self.levels,
            "alpha": self.alpha,
            "logit": self.logit,
        }


class Standardize(Preprocess):
    """``y = (x - mean) / std`` (elementwise); ``log|det| = -sum(log std)``.

    Build it from training data with :meth:`fit`, so that likelihoods stay those of the raw
    data while the flow sees standardised inputs.

    Example:
        >>> import torch
        >>> s = Standardize.fit(10 + 3 * torch.randn(500, 2), event_dim=1)
        >>> y, log_det = s(torch.full((1, 2), 10.0), event_dim=1)
        >>> bool(y.abs().max() < 0.5), bool((log_det + 2 * torch.tensor(3.0).log()).abs() < 0.2)
        (True, True)
    """

    def __init__(self, mean: Tensor | float, std: Tensor | float) -> None:
        mean_t = torch.as_tensor(mean, dtype=torch.float64)
        std_t = torch.as_tensor(std, dtype=torch.float64)
        if not bool(torch.isfinite(mean_t).all()) or not bool((std_t > 0).all()):
            raise ValueError("Standardize needs a finite mean and a positive std")
        self.mean, self.std = mean_t, std_t

    @classmethod
    def fit(cls, data: Tensor, event_dim: int, per_element: bool = True) -> Standardize:
        """Mean and std of ``data`` per element of the event (or one scalar each)."""
        x = torch.as_tensor(data, dtype=torch.float64)
        x = x.reshape((-1,) + tuple(x.shape[x.dim() - event_dim :]))
        if not per_element:
            return cls(x.mean(), x.std().clamp_min(1e-8))
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
        return cls(x.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def __call__(
        self, x: Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        mean = self.mean.to(x.device, x.dtype)
        std = self.std.to(x.device, x.dtype)
        y = (x - mean) / std
        batch = x.shape[: x.dim() - event_dim]
        n = math.prod(x.shape[x.dim() - event_dim :])
        log_std = std.log().expand(x.shape[x.dim() - event_dim :]) if std.dim() else std.log() * n
        return y, (-log_std.sum()).expand(batch)

    def decode(self, y: Tensor) -> Tensor:
        return y * self.std.to(y.device, y.dtype) + self.mean.to(y.device, y.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": "standardize", "mean": self.mean.tolist(), "std": self.std.tolist()}


def as_preprocess(spec: Preprocess | int | dict[str, Any] | None) -> Preprocess:
    """``None`` -> :class:`Identity`; an int ``L`` -> ``Dequantize(L)``; a config dict ->
    the object it describes; a :class:`Preprocess` is returned as it is.

    Example:
        >>> as_preprocess(256)
        Dequantize(levels=256, alpha=0.05, logit=True)
    """
    if spec is None:
        return Identity()
    if isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return Dequantize(spec)
    if isinstance(spec, dict):
        kw = dict(spec)
        kind = kw.pop("kind", None)
        if kind == "identity":
            return Identity()
        if kind == "dequantize":
            return Dequantize(**kw)
        if kind == "variational":
            from pyro_flows_ext.train.vardeq import VariationalDequantize

            return VariationalDequantize(**kw)
        if kind == "standardize":
            f64 = torch.float64
            return Standardize(
                torch.tensor(kw["mean"], dtype=f64), torch.tensor(kw["std"], dtype=f64)
            )
    raise TypeError(
        f"dequantize must be None, a number of levels, a Preprocess or its config, got {spec!r}"
    )
