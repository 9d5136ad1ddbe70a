"""Density models: :class:`Flow` and the ``realnvp``/``glow`` builders.

:func:`build_flow` rebuilds a model from the ``config`` a builder stored on it (this is how
checkpoints are reloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_flows_ext.flows.flow import Flow
from pyro_flows_ext.flows.glow import glow
from pyro_flows_ext.flows.realnvp import realnvp

__all__ = ["BUILDERS", "Flow", "build_flow", "glow", "realnvp"]

BUILDERS: dict[str, Callable[..., Flow]] = {"glow": glow, "realnvp": realnvp}


def build_flow(config: dict[str, Any]) -> Flow:
    """A fresh model from ``flow.config`` (``{"builder": name, "event_shape": ..., **kwargs}``).

    Example:
        >>> flow = glow(2, depth=2)
        >>> build_flow(flow.config).config == flow.config
        True
    """
    if not isinstance(config, dict) or config.get("builder") not in BUILDERS:
        raise ValueError(
            f"config must be a dict with 'builder' in {sorted(BUILDERS)}, got {config!r}"
        )
    kwargs = dict(config)
    builder = BUILDERS[kwargs.pop("builder")]
    shape = kwargs.pop("event_shape")
    return builder(shape[0] if len(shape) == 1 else tuple(shape), **kwargs)
