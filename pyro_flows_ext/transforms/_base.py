"""Shared machinery of the transforms: event constraints and the intermediate cache.

Every learnable transform here computes its output and its log-determinant in one pass. The
:class:`CachedTransformModule` base keeps the last ``(x, y, log_det)`` triple so that
``log_abs_det_jacobian(x, y)`` right after either direction, and the inverse of the output it
just produced, cost nothing. Its rules make a stale value impossible for the patterns Pyro and
torch users write, whatever updates the parameters (see :class:`CachedTransformModule`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import constraints
from torch.optim.optimizer import register_optimizer_step_post_hook

from pyro_flows_ext.checks import check_input

__all__ = [
    "CachedTransformModule",
    "NoSignError",
    "event_constraint",
    "permutation_sign",
    "sum_event",
]


class NoSignError(AttributeError, NotImplementedError):
    """A transform whose Jacobian determinant has no fixed sign to report. It is an
    ``AttributeError``, so that ``hasattr(t, "sign")`` is ``False`` (TorchScript's
    ``trace_module`` asks every module attribute with ``hasattr``, and any other error, such
    as the ``NotImplementedError`` of torch's ``Transform.sign``, stops the trace), and a
    ``NotImplementedError`` like torch's. On an ``nn.Module`` the caller sees the module's own
    ``AttributeError`` (Python falls back to ``__getattr__``)."""


def permutation_sign(perm: Tensor) -> int:
    """The sign (+1 or -1) of the permutation ``perm`` of ``0..n-1``: -1 to the number of
    even-length cycles.

    Example:
        >>> import torch
        >>> permutation_sign(torch.tensor([0, 1, 2])), permutation_sign(torch.tensor([1, 0, 2]))
        (1, -1)
    """
    order = [int(i) for i in perm.tolist()]
    seen, sign = [False] * len(order), 1
    for start in range(len(order)):
        length, i = 0, start
        while not seen[i]:
            seen[i], i, length = True, order[i], length + 1
        if length and length % 2 == 0:
            sign = -sign
    return sign


@functools.cache
def event_constraint(event_dim: int) -> constraints.Constraint:
    """The real constraint with ``event_dim`` dependent dimensions (one shared object per
    ``event_dim``: constraints are immutable, and transforms read them on every call)."""
    return constraints.independent(constraints.real, event_dim)


def sum_event(t: Tensor, event_dim: int) -> Tensor:
    """Sum the rightmost ``event_dim`` dimensions."""
    return t.sum(tuple(range(-event_dim, 0))) if event_dim else t


class _OptimizerSteps:
    """Counts the steps of every torch optimizer in the process (Pyro's ``ClippedAdam``
    included), through torch's global post-step hook, registered on first use."""

    count = 0
    _registered = False

    @classmethod
    def current(cls) -> int:
        if not cls._registered:
            register_optimizer_step_post_hook(cls._tick)
            cls._registered = True
        return cls.count

    @classmethod
    def _tick(cls, *_: Any) -> None:
        cls.count += 1


_Direction = Literal["forward", "inverse"]


class _Entry(NamedTuple):
    x: Tensor
    y: Tensor
    log_det: Tensor
    direction: _Direction  # the call that computed the triple
    state: tuple[int, ...]


class CachedTransformModule(TransformModule):
    """A bijective ``TransformModule`` that computes output and log-det together.

    Subclasses implement ``_forward(x) -> (y, log_det)`` and ``_backward(y) -> (x, log_det)``,
    where ``log_det`` is ``log|dy/dx|`` summed over the event (batch shape), and pass the
    number of event dims to ``__init__``.

    With ``cache_size=1`` the module keeps the triple ``(x, y, log_det)`` of its last call and
    serves it only where it cannot be stale:

    * ``log_abs_det_jacobian(x, y)`` for the exact pair of tensors of the last call (the
      ``log_prob`` and ``rsample`` paths of ``TransformedDistribution``);
    * ``inv(y)`` only when ``y`` is the output of the last *forward* call, and ``t(x)`` only
      when ``x`` is the output of the last *inverse* call (``log_prob`` of a value the flow
      just sampled). The inverse of an input that came from outside, such as observed data
      scored at every SVI step, is always computed afresh.

    A hit also needs the same grad mode, no optimizer step since (any torch optimizer,
    Pyro's ``ClippedAdam`` too, through torch's global step hook) and unchanged version
    counters of every parameter and buffer (in-place updates, ``load_state_dict``); ``.to()``
    and assigning a parameter or submodule clear the cache. So the one way left to get a
    stale value is to write a parameter's ``.data`` by hand *and* then feed the very output
    tensor of the previous call back in; call :meth:`clear_cache` after such surgery.

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
        >>> t.inv(y) is x  # the inverse of the output just produced: cached
        True
        >>> data = torch.ones(3, 2)
        >>> z = t.inv(data)
        >>> t.log_abs_det_jacobian(z, data).tolist()  # the exact pair: cached
        [0.0, 0.0, 0.0]
        >>> with torch.no_grad():
        ...     _ = t.log_s.data.add_(1.0)  # bypasses autograd's version counters
        >>> bool(torch.allclose(t.inv(data), data / torch.e))  # data is never a cache hit
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

    @property
    def sign(self) -> int:
        """The sign of the Jacobian determinant (+1 or -1) where it is fixed; subclasses say.
        Otherwise an ``AttributeError`` (:class:`NoSignError`): ``hasattr(t, "sign")`` is
        ``False``."""
        raise NoSignError(f"{type(self).__name__} does not report the sign of its Jacobian")

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
        """Grad mode, the process's optimizer step count, then the version counters of every
        parameter and buffer (bumped by in-place updates through autograd). Grad mode is part
        of the key: a result computed under ``no_grad`` has no graph and must not be handed
        to a caller that wants gradients."""
        tracked = self.__dict__.get("_tracked")
        if tracked is None:
            tracked = tuple(self.parameters()) + tuple(self.buffers())
            self.__dict__["_tracked"] = tracked
        steps = _OptimizerSteps.current()
        return (int(torch.is_grad_enabled()), steps, *(t._version for t in tracked))

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor | torch.nn.Module):  # a parameter, buffer or submodule
            self.__dict__["_tracked"] = None
            self.__dict__["_entry"] = None
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CachedTransformModule:
        self.__dict__["_tracked"] = None  # .to(), .double(), .cuda() may swap tensors
        self._entry = None
        return super()._apply(fn, *args, **kwargs)

    def _hit(
        self, x: Tensor | None, y: Tensor | None, computed_by: _Direction | None = None
    ) -> _Entry | None:
        """The cached triple if it holds ``x`` and ``y`` (``None``: any) and, when given,
        was computed by the ``computed_by`` direction, with parameters unchanged since."""
        e = self._entry
        if self._cache_size == 0 or e is None:
            return None
        if (x is not None and x is not e.x) or (y is not None and y is not e.y):
            return None
        if computed_by is not None and e.direction != computed_by:
            return None
        if e.state != self._state():
            return None
        return e

    def _store(self, x: Tensor, y: Tensor, log_det: Tensor, direction: _Direction) -> None:
        if self._cache_size:
            self._entry = _Entry(x, y, log_det, direction, self._state())

    def __call__(self, x: Tensor) -> Tensor:
        hit = self._hit(x, None, computed_by="inverse")  # x is the last inverse's output
        if hit is not None:
            return hit.y
        self._check(x, "input of the forward direction")
        y, log_det = self._forward(x)
        self._store(x, y, log_det, "forward")
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        hit = self._hit(None, y, computed_by="forward")  # y is the last forward's output
        if hit is not None:
            return hit.x
        self._check(y, "input of the inverse direction")
        x, log_det = self._backward(y)
        self._store(x, y, log_det, "inverse")
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
        """Forget the cached triple."""
        self._entry = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._entry = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_entry"] = None  # cached tensors may carry an autograd graph
        state["_tracked"] = None
        return state
