"""Shared machinery of the transforms: event shapes, input checks, and the intermediate cache.

Every learnable transform here computes its output and its log-determinant in one pass. The
:class:`CachedTransformModule` base keeps the last ``(x, y, log_det)`` triple, keyed by the
identity of the tensors *and* by the version counters of the module's parameters and buffers,
so that ``log_abs_det_jacobian(x, y)`` right after either direction costs nothing, while an
optimizer step (which updates parameters in place) can never make it hand back a stale value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import constraints

from pyro_flows_ext.checks import check_input

__all__ = ["CachedTransformModule", "event_constraint", "sum_event"]


def event_constraint(event_dim: int) -> constraints.Constraint:
    """The real constraint with ``event_dim`` dependent dimensions."""
    return constraints.independent(constraints.real, event_dim)


def sum_event(t: Tensor, event_dim: int) -> Tensor:
    """Sum the rightmost ``event_dim`` dimensions."""
    return t.sum(tuple(range(-event_dim, 0))) if event_dim else t


class _Entry(NamedTuple):
    x: Tensor
    y: Tensor
    log_det: Tensor
    state: tuple[int, ...]


class CachedTransformModule(TransformModule):
    """A bijective ``TransformModule`` that computes output and log-det together.

    Subclasses implement ``_forward(x) -> (y, log_det)`` and ``_backward(y) -> (x, log_det)``,
    where ``log_det`` is ``log|dy/dx|`` summed over the event (batch shape), and pass the
    number of event dims to ``__init__``. With ``cache_size=1`` the last triple is reused by
    ``__call__``/``inv``/``log_abs_det_jacobian`` while the same tensors are passed *and* no
    parameter or buffer of the module (submodules included) changed in place since; an
    optimizer step, ``load_state_dict``, ``.to()`` or assigning a new parameter to the module
    itself invalidates it. (After replacing a parameter object of a *nested* module by
    assignment, call :meth:`clear_cache`.)

    Example:
        >>> import torch
        >>> class Scale(CachedTransformModule):
        ...     def __init__(self):
        ...         super().__init__(event_dim=1)
        ...         self.log_s = torch.nn.Parameter(torch.zeros(2))
        ...     def _forward(self, x):
        ...         return x * self.log_s.exp(), self.log_s.sum().expand(x.shape[:-1])
        ...     def _backward(self, y):
        ...         return y * (-self.log_s).exp(), self.log_s.sum().expand(y.shape[:-1])
        >>> t = Scale()
        >>> x = torch.ones(3, 2)
        >>> y = t(x)
        >>> t.inv(y) is x  # cached
        True
        >>> with torch.no_grad():
        ...     _ = t.log_s.add_(1.0)  # an in-place update invalidates the cache
        >>> bool(torch.allclose(t(x), x * torch.e))
        True
    """

    bijective = True

    def __init__(self, event_dim: int, cache_size: int = 1) -> None:
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        super().__init__(cache_size=cache_size)
        self._event_dim = event_dim
        self._entry: _Entry | None = None

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return event_constraint(self._event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return event_constraint(self._event_dim)

    # -- to implement -------------------------------------------------------------------
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check(self, x: Tensor, name: str) -> None:
        """Validate an input; subclasses with a known event shape override this."""
        check_input(x, (None,) * self._event_dim, name)

    # -- caching ------------------------------------------------------------------------
    def _state(self) -> tuple[int, ...]:
        """Grad mode, then the version counters of every parameter and buffer (bumped by any
        in-place update). Grad mode is part of the key: a result computed under ``no_grad``
        has no graph and must not be handed to a caller that wants gradients."""
        tracked = self.__dict__.get("_tracked")
        if tracked is None:
            tracked = tuple(self.parameters()) + tuple(self.buffers())
            self.__dict__["_tracked"] = tracked
        return (int(torch.is_grad_enabled()), *(t._version for t in tracked))

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor | torch.nn.Module):  # a parameter, buffer or submodule
            self.__dict__["_tracked"] = None
            self.__dict__["_entry"] = None
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CachedTransformModule:
        self.__dict__["_tracked"] = None  # .to(), .double(), .cuda() may swap tensors
        self._entry = None
        return super()._apply(fn, *args, **kwargs)

    def _hit(self, x: Tensor | None, y: Tensor | None) -> _Entry | None:
        e = self._entry
        if self._cache_size == 0 or e is None:
            return None
        if (x is not None and x is not e.x) or (y is not None and y is not e.y):
            return None
        if e.state != self._state():
            return None
        return e

    def _store(self, x: Tensor, y: Tensor, log_det: Tensor) -> None:
        if self._cache_size:
            self._entry = _Entry(x, y, log_det, self._state())

    def __call__(self, x: Tensor) -> Tensor:
        hit = self._hit(x, None)
        if hit is not None:
            return hit.y
        self._check(x, "input of the forward direction")
        y, log_det = self._forward(x)
        self._store(x, y, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        hit = self._hit(None, y)
        if hit is not None:
            return hit.x
        self._check(y, "input of the inverse direction")
        x, log_det = self._backward(y)
        self._store(x, y, log_det)
        return x

    def _call(self, x: Tensor) -> Tensor:
        return self._forward(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._backward(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        hit = self._hit(x, y)
        if hit is not None:
            return hit.log_det
        return self._forward(x)[1]

    def clear_cache(self) -> None:
        """Forget the cached triple (it is also invalidated by any parameter update)."""
        self._entry = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_entry"] = None  # cached tensors may carry an autograd graph
        state["_tracked"] = None
        return state
