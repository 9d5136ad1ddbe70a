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
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyro_flows_ext.checks import check_bool, positive_float, positive_int

__all__ = ["DequantizeSpec", "Dequantize", "Identity", "Preprocess", "Standardize", "as_preprocess"]

# ``config()["kind"]`` -> the class that rebuilds it (filled by ``Preprocess.__init_subclass__``,
# so that a subclass defined in another module registers itself: the dependency goes one way)
_KINDS: dict[str, type[Preprocess]] = {}


def _sum_event(t: Tensor, event_dim: int) -> Tensor:
    return t.flatten(t.dim() - event_dim).sum(-1) if event_dim else t


class Preprocess:
    """Base class: the identity (continuous data modelled as it is).

    Subclasses implement :meth:`__call__` (raw data to the flow's space, with the
    log-determinant per example), :meth:`decode` (the flow's space back to data units, for
    plots and samples) and :meth:`config` (a dict of plain values, stored in checkpoints,
    whose ``"kind"`` is the class's ``kind``; :func:`as_preprocess` rebuilds the object from
    it with :meth:`from_config`). Defining a subclass with a new ``kind`` registers it.
    """

    discrete = False
    kind: ClassVar[str] = "identity"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocess:
        """The object that :meth:`config` described (``"kind"`` already removed)."""
        return cls(**config)

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
        return {"kind": self.kind}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


Identity = Preprocess
_KINDS[Preprocess.kind] = Preprocess


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
    kind = "dequantize"

    def __init__(self, levels: int, alpha: float = 0.05, logit: bool = True) -> None:
        self.levels = positive_int("levels", levels, minimum=2)
        self.logit = check_bool("logit", logit)
        self.alpha = positive_float("alpha", alpha, allow_zero=not logit)
        if self.alpha >= 0.5:
            raise ValueError(f"alpha must be < 0.5, got {alpha!r}")

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
            "kind": self.kind,
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

    kind = "standardize"

    def __init__(self, mean: Tensor | float, std: Tensor | float) -> None:
        self.mean, self.std = _float64("mean", mean), _float64("std", std)
        if not bool(torch.isfinite(self.mean).all()):
            raise ValueError("Standardize needs a finite mean")
        if not bool((self.std > 0).all()) or not bool(torch.isfinite(self.std).all()):
            raise ValueError("Standardize needs a positive, finite std")

    @classmethod
    def fit(cls, data: Tensor, event_dim: int, per_element: bool = True) -> Standardize:
        """Mean and std of ``data`` per element of the event (or one scalar each)."""
        event_dim = positive_int("event_dim", event_dim, minimum=0)
        check_bool("per_element", per_element)
        x = _float64("data", data)
        if x.dim() < event_dim:
            raise ValueError(f"data of shape {tuple(x.shape)} have fewer than {event_dim} dims")
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
        return {"kind": self.kind, "mean": self.mean.tolist(), "std": self.std.tolist()}


def _float64(name: str, value: Any) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or a number, got {value!r}") from None


DequantizeSpec = Preprocess | int | None
"""What ``dequantize=`` arguments accept: ``None`` (continuous data), a number of levels, or a
:class:`Preprocess`."""


def as_preprocess(spec: DequantizeSpec | dict[str, Any]) -> Preprocess:
    """``None`` -> :class:`Identity`; an int ``L`` -> ``Dequantize(L)``; a config dict ->
    the object it describes; a :class:`Preprocess` is returned as it is.

    Example:
        >>> as_preprocess(256)
        Dequantize(levels=256, alpha=0.05, logit=True)
        >>> as_preprocess({"kind": "identity"})
        Preprocess()
    """
    if spec is None:
        return Identity()
    if isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return Dequantize(positive_int("dequantize (a number of levels)", spec, minimum=2))
    if isinstance(spec, dict) and spec.get("kind") in _KINDS:
        kw = dict(spec)
        return _KINDS[kw.pop("kind")].from_config(kw)
    raise TypeError(
        f"dequantize must be None, a number of levels, a Preprocess or its config, got {spec!r}"
    )
