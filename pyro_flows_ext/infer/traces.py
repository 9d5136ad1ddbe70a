"""Small helpers on Pyro traces shared by the guide and the diagnostics: plate nesting,
per-draw log densities, "vectorise under a particle plate, else loop", and evaluating a
float32 model in float64."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "VECTORISE_ERRORS",
    "PromoteToFloat64",
    "check_vectorised",
    "max_plate_nesting",
    "particle_dim",
    "per_particle_log_prob",
    "unsupported_latents",
    "vectorised_or_looped",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

VECTORISE_ERRORS = (ValueError, RuntimeError, IndexError, NotImplementedError)
"""What a model that does not vectorise over a particle plate raises (shape errors)."""


def max_plate_nesting(trace: Any) -> int:
    """How many batch dims the vectorised plates of ``trace``'s sample sites use."""
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def particle_dim(trace: Any) -> int:
    """The (negative) dim of a particle plate left of every plate of ``trace``'s sites.

    Create the ``pyro.plate(name, num, dim=particle_dim(trace))`` inside ``poutine.block``:
    a plate records a subsample site where it is created."""
    return -(max_plate_nesting(trace) + 1)


def per_particle_log_prob(trace: Any, num: int, dim: int) -> Tensor:
    """Sum every sample site's ``log_prob`` (scales and masks applied) over all axes but the
    particle axis ``dim`` (negative, counted from the right of the batch shape): ``(num,)``."""
    trace.compute_log_prob()
    total: Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        lp = site["log_prob"]
        if lp.dim() >= -dim and lp.shape[lp.dim() + dim] == num:
            total = total + lp.movedim(lp.dim() + dim, 0).reshape(num, -1).sum(-1)
        else:
            total = total + lp.sum()
    if not isinstance(total, Tensor):
        raise ValueError("the trace has no sample site")
    return total.expand(num)


def check_vectorised(got: float, expected: float) -> None:
    """Raise ``ValueError`` unless the vectorised log density of a draw, ``got``, matches the
    unvectorised one, ``expected`` (a model that ignores the particle plate does not)."""
    if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-3 * (1 + abs(expected))):
        raise ValueError(
            f"vectorised log p(x, z) {got} differs from the unvectorised {expected}: the "
            f"model does not vectorise over a particle plate"
        )


def vectorised_or_looped(
    vectorised: Callable[[], T],
    looped: Callable[[], T],
    vectorize: bool | None = None,
    label: str = "",
) -> tuple[T, bool]:
    """``(vectorised(), True)``, or ``(looped(), False)`` when ``vectorised`` raises one of
    :data:`VECTORISE_ERRORS`; ``vectorize=True`` re-raises instead, ``False`` only loops.

    Example:
        >>> def fails():
        ...     raise ValueError("shape mismatch")
        >>> vectorised_or_looped(fails, lambda: "looped")
        ('looped', False)
    """
    if vectorize is not False:
        try:
            return vectorised(), True
        except VECTORISE_ERRORS as err:
            if vectorize:
                raise
            logger.info("%s: not vectorised (%s); looping over draws", label, err)
    return looped(), False


# ------------------------------------------------------------------ float64 evaluation ----
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_DOWNCASTS = ("float", "half", "bfloat16")


def _is_mutation(func: Callable) -> bool:
    """Attribute access and in-place ops (``add_``, ``__setitem__``, ``__iadd__``) must act
    on the tensor itself, never on a promoted copy."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__setitem__", "__delete__"):
        return True
    if name.startswith("__i") and name.endswith("__"):
        return True
    return name.endswith("_") and not name.endswith("__")


def _map(fn: Callable[[Any], Any], obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return type(obj)(_map(fn, x) for x in obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _has_float64(obj: Any) -> bool:
    found = False

    def look(x: Any) -> Any:
        nonlocal found
        found = found or (isinstance(x, Tensor) and x.dtype == torch.float64)
        return x

    _map(look, obj)
    return found


def _promote(x: Any) -> Any:
    if isinstance(x, Tensor) and x.dtype in _LOW_PRECISION:
        return x.to(torch.float64)
    if isinstance(x, torch.dtype) and x in _LOW_PRECISION:
        return torch.float64
    return x


class PromoteToFloat64(TorchFunctionMode):
    """Run a model on float64 values although its constants (data, parameters) are float32.

    Inside this mode every torch operation that receives a float64 tensor first casts its
    other low-precision floating tensors and dtype arguments to float64, and casts a
    low-precision floating result back up (``x.float()``, ``x.to(data.dtype)`` and
    ``x.type_as(data)`` keep a float64 ``x``); operations on constants alone, attribute
    access and in-place operations run unchanged. Conditioning a float32 model on float64
    latents under this mode evaluates its log density in float64 (see
    :class:`~pyro_flows_ext.infer.vector.start.LogJoint`).

    Example:
        >>> data = torch.tensor([1.0, 2.0])  # float32
        >>> with PromoteToFloat64():
        ...     out = torch.ones(2, dtype=torch.float64) @ data
        >>> out.dtype
        torch.float64
    """

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _is_mutation(func) or not _has_float64((args, kwargs)):
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") in _DOWNCASTS:
            return args[0]  # x.float() of a float64 x: keep the precision
        args, kwargs = _map(_promote, (args, kwargs))
        return _map(_promote, func(*args, **kwargs))


def unsupported_latents(trace: Any, owner: str) -> Exception | None:
    """The error for a model trace whose latents a continuous guide named ``owner`` cannot
    handle, of the type Pyro's autoguides raise: ``ValueError`` for a discrete latent,
    ``RuntimeError`` for no latent at all; ``None`` when there is no such problem.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("k", dist.Bernoulli(0.5))
        >>> trace = pyro.poutine.trace(model).get_trace()
        >>> type(unsupported_latents(trace, "MyGuide")).__name__
        'ValueError'
    """
    if trace is None:
        return None
    latents = list(trace.iter_stochastic_nodes())
    for name, site in latents:
        if site["fn"].support.is_discrete:
            return ValueError(
                f"{owner} needs continuous latent sites, but site {name!r} has discrete "
                f"support ({type(site['fn']).__name__}); enumerate it out (TraceEnum_ELBO) and "
                f"hide it from this guide with poutine.block"
            )
    if not latents:
        observed = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        return RuntimeError(
            f"{owner} needs at least one continuous latent sample site; the model has none "
            f"(its sample sites: {observed or 'none'})"
        )
    return None
