"""Argument checks shared by every layer of the package.

Each helper returns the value in its normalised form or raises a ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, bad value) whose message names the argument, says what
was expected and shows what arrived. The module imports only torch, so that every subpackage,
from :mod:`pyro_flows_ext.nn` up, may use it.

Example:
    >>> positive_int("depth", 4)
    4
    >>> positive_int("batch_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be an int >= 1, got 0
    >>> one_of("scale", "exp", ("exp", "sigmoid"))
    'exp'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "EventShape",
    "as_event_shape",
    "check_bool",
    "check_input",
    "hidden_sizes",
    "one_of",
    "positive_float",
    "positive_int",
]

EventShape = tuple[int, ...]

T = TypeVar("T")


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``.

    Example:
        >>> positive_int("depth", 0, minimum=0)
        0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def positive_float(
    name: str, value: Any, allow_zero: bool = False, allow_inf: bool = False
) -> float:
    """``value`` as a float if it is a real number ``> 0`` (``>= 0`` with ``allow_zero``),
    finite unless ``allow_inf``.

    Example:
        >>> positive_float("lr", 1e-3)
        0.001
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if math.isnan(value) or not low_ok or (math.isinf(value) and not allow_inf):
        bound = ">= 0" if allow_zero else "> 0"
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"{name} must be {bound}{finite}, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``.

    Example:
        >>> one_of("mask", "half", ("half", "alternating"))
        'half'
    """
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Example:
        >>> check_bool("actnorm", True)
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def hidden_sizes(name: str, value: Any) -> tuple[int, ...] | None:
    """A sequence of positive ints as a tuple (``None`` stays ``None``: the default).

    Example:
        >>> hidden_sizes("hidden_dims", [32, 32])
        (32, 32)
    """
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    return tuple(positive_int(f"every entry of {name}", h) for h in value)


def as_event_shape(shape: Any) -> EventShape:
    """Normalise ``D`` (vectors) or ``(C, H, W)`` (images) to a tuple, with clear errors.

    Example:
        >>> as_event_shape(4), as_event_shape([1, 8, 8])
        ((4,), (1, 8, 8))
    """
    expected = "an int D or a tuple (C, H, W) of positive ints"
    if isinstance(shape, bool):
        raise TypeError(f"event shape must be {expected}, got {shape!r}")
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, tuple | list | torch.Size):
        raise TypeError(f"event shape must be {expected}, got {shape!r}")
    shape = tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise TypeError(f"event shape must be {expected}, got {shape!r}")
    if len(shape) not in (1, 3) or not all(s > 0 for s in shape):
        raise ValueError(f"event shape must be {expected}, got {shape!r}")
    return shape


def check_input(x: Any, event_shape: tuple[int | None, ...], name: str = "input") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a floating tensor ending in
    ``event_shape`` (``None`` entries accept any size).

    Example:
        >>> check_input(torch.zeros(2, 3), (None,))
        >>> check_input(torch.zeros(2, 3), (4,), "x")
        Traceback (most recent call last):
        ...
        ValueError: x must have event shape (4) in its last 1 dims, got a tensor of shape (2, 3)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    n = len(event_shape)
    tail = x.shape[x.dim() - n :] if x.dim() >= n else None
    pairs = zip(event_shape, tail or (), strict=False)  # tail has n entries when not None
    ok = tail is not None and (tail == event_shape or all(e is None or e == s for e, s in pairs))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in event_shape) + ")"
        raise ValueError(
            f"{name} must have event shape {want} in its last {n} dims, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
