"""Likelihood metrics of a flow on raw data: negative log-likelihood and bits per dimension.

``bits/dim = -log p(x) / (D log 2)`` with ``D`` the number of elements of one example and
``log p(x)`` the log-likelihood of the *raw* data, preprocessing Jacobian included (for
dequantized images, the usual variational bound on the discrete log-probability; see
:mod:`pyro_flows_ext.train.preprocess`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pyro_flows_ext.checks import positive_int
from pyro_flows_ext.flows import Flow
from pyro_flows_ext.train.data import examples
from pyro_flows_ext.train.preprocess import DequantizeSpec, Preprocess, as_preprocess

__all__ = ["bits_per_dim", "log_likelihood", "nll"]


def log_likelihood(
    flow: Flow,
    x: Tensor,
    preprocess: Preprocess,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
) -> Tensor:
    """``log p(x)`` (``log p(x | context)``) of raw data ``x``, shape ``(N,)``; ``x`` and
    ``context`` are already on the flow's device, the context in its dtype."""
    y, log_det = preprocess(x.to(flow.base_loc.dtype), len(flow.event_shape), generator)
    return flow.log_prob(y, context=context) + log_det


def nll(flow: Flow, data: Any, *, context: Any = None, dequantize: DequantizeSpec = None,
        batch_size: int = 500, seed: int = 0) -> float:  # fmt: skip
    """Mean negative log-likelihood of ``data`` in nats per example.

    Args:
        flow: the model; evaluated on its own device, without gradients.
        data: ``(N, *event_shape)`` tensor or array; integer data need ``dequantize``.
        context: for a conditional flow (``flow.context_dim = K > 0``, and only then), the
            ``(N, K)`` tensor or array of contexts, one row per example (cast to the flow's
            dtype): the result is then ``-log p(x | c)``.
        dequantize: see :func:`~pyro_flows_ext.train.fit` (``None`` for continuous data, a
            number of levels, or a :class:`Preprocess`).
        batch_size: examples per forward pass.
        seed: seed of the dequantization noise (the result is deterministic).

    Example:
        >>> import torch
        >>> from pyro_flows_ext.flows import Flow
        >>> x = torch.zeros(10, 2)
        >>> round(nll(Flow(2, []), x), 4) == round(2 * 0.5 * math.log(2 * math.pi), 4)
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyro_flows_ext Flow, got {type(flow).__name__}")
    positive_int("batch_size", batch_size)
    positive_int("seed", seed, minimum=0)
    pre = as_preprocess(dequantize)
    rows = examples(flow, data, context)
    pre.validate(rows.x)
    device = flow.base_loc.device
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            x, c = rows.take(torch.arange(start, min(start + batch_size, len(rows))), device)
            total -= float(log_likelihood(flow, x, pre, generator, c).double().sum())
    return total / len(rows)


def bits_per_dim(flow: Flow, data: Any, *, context: Any = None, dequantize: DequantizeSpec = None,
                 batch_size: int = 500, seed: int = 0) -> float:  # fmt: skip
    """``nll / (D log 2)``: negative log-likelihood in bits per dimension (see :func:`nll`;
    with ``context``, of the conditional density ``p(x | c)``).

    Example:
        >>> import torch
        >>> from pyro_flows_ext.flows import Flow
        >>> from pyro_flows_ext.train import Dequantize
        >>> from torch.distributions import CumulativeDistributionTransform, Normal
        >>> uniform = Flow(4, [CumulativeDistributionTransform(Normal(0.0, 1.0))])
        >>> pixels = torch.randint(0, 16, (50, 4))
        >>> bpd = bits_per_dim(uniform, pixels, dequantize=Dequantize(16, logit=False))
        >>> round(bpd, 5)  # log2(16): the flow is uniform on [0, 1]^4
        4.0
    """
    value = nll(flow, data, context=context, dequantize=dequantize, batch_size=batch_size,
                seed=seed)  # fmt: skip
    return value / (flow.num_dims * math.log(2))
