"""Normalizing flows for Pyro.

The top level re-exports the density-model API: :class:`Flow` and the ``realnvp``/``glow``
builders (from :mod:`pyro_flows_ext.flows`), :func:`fit` and :func:`bits_per_dim` (from
:mod:`pyro_flows_ext.train`). They are imported on first use, so ``import pyro_flows_ext``
stays light (it does not import torch) and has no side effects.

Example:
    >>> import pyro_flows_ext as pfe
    >>> pfe.glow((1, 8, 8), depth=1, hidden_channels=4).event_shape
    (1, 8, 8)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Flow", "__version__", "bits_per_dim", "fit", "glow", "realnvp"]

_LAZY = {
    "Flow": "pyro_flows_ext.flows",
    "glow": "pyro_flows_ext.flows",
    "realnvp": "pyro_flows_ext.flows",
    "fit": "pyro_flows_ext.train",
    "bits_per_dim": "pyro_flows_ext.train",
}

if TYPE_CHECKING:
    from pyro_flows_ext.flows import Flow, glow, realnvp
    from pyro_flows_ext.train import bits_per_dim, fit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyro_flows_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
