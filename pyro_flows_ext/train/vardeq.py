"""Variational dequantization (Flow++): learn the noise that makes discrete data continuous.

Uniform dequantization scores ``v = x + u`` with ``u ~ U[0, 1)^D``. Ho et al. (2019) draw ``u``
from a learned ``q(u | x)`` instead, which tightens the bound

.. math:: \\log P(x) \\ge E_{u \\sim q(\\cdot | x)}[\\log p(x + u) - \\log q(u | x)].

Here ``q`` is a logistic distribution squashed into ``(0, 1)``:
``u = sigmoid(mu(x) + exp(s(x)) * eps)`` with ``eps ~ Logistic(0, 1)``, whose parameters come
from a network of ``x`` with a zero-initialised last layer. At initialisation
``u = sigmoid(eps)`` is exactly uniform, so training starts from the uniform bound and can
only improve on it. (Flow++ uses a conditional coupling flow for ``q``; this elementwise
version is the cheapest member of that family.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_flows_ext.checks import as_event_shape, positive_float, positive_int
from pyro_flows_ext.nn import HIDDEN_CHANNELS, ConvNet, mlp
from pyro_flows_ext.train.preprocess import Dequantize, _sum_event
from pyro_flows_ext.transforms.maps import CLAMP

__all__ = ["VariationalDequantize"]


class VariationalDequantize(Dequantize, nn.Module):
    """:class:`~pyro_flows_ext.train.Dequantize` with a learned noise distribution ``q(u|x)``.

    Its parameters are trained by :func:`~pyro_flows_ext.train.fit` together with the flow
    and saved in its checkpoints; the reported bits/dim are the variational bound.

    Args:
        event_shape: ``D`` or ``(C, H, W)`` of the data.
        levels, alpha, logit: as for :class:`~pyro_flows_ext.train.Dequantize`.
        hidden: width of the network of ``x`` (conv channels for images, MLP units for
            vectors; default :data:`~pyro_flows_ext.nn.HIDDEN_CHANNELS`).
        clamp: bound of the log-scale ``s`` (soft clamp ``clamp * tanh(s / clamp)``).

    Example:
        >>> import torch
        >>> q = VariationalDequantize((1, 8, 8), levels=17)
        >>> y, log_det = q(torch.randint(0, 17, (4, 1, 8, 8)).float(), event_dim=3)
        >>> y.shape, log_det.shape, sum(p.numel() for p in q.parameters()) > 0
        (torch.Size([4, 1, 8, 8]), torch.Size([4]), True)

    Reference: Ho, Chen, Srinivas, Duan & Abbeel (2019), Flow++.
    """

    kind = "variational"

    def __init__(
        self,
        event_shape: int | tuple[int, ...],
        levels: int,
        alpha: float = 0.05,
        logit: bool = True,
        hidden: int = HIDDEN_CHANNELS,
        clamp: float = CLAMP,
    ) -> None:
        nn.Module.__init__(self)
        Dequantize.__init__(self, levels, alpha, logit)
        self.event_shape = shape = as_event_shape(event_shape)
        self.hidden = positive_int("hidden", hidden)
        self.clamp = positive_float("clamp", clamp)
        c = shape[0]
        self.net: nn.Module
        if len(shape) == 3:
            self.net = ConvNet(c, 2 * c, self.hidden)
        else:
            self.net = mlp(c, [c, c], (self.hidden, self.hidden))

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x / (self.levels - 1) - 0.5)
        loc, s = h.chunk(2, dim=-len(self.event_shape)) if isinstance(h, Tensor) else h
        return loc, self.clamp * torch.tanh(s / self.clamp)

    def __call__(
        self, x: Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        x = x.float() if not x.is_floating_point() else x
        tiny = torch.finfo(x.dtype).tiny
        r = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        eps = torch.logit(r.clamp(tiny, 1 - 1e-7))
        loc, log_scale = self._params(x)
        z = loc + log_scale.exp() * eps
        u = torch.sigmoid(z).clamp(0.0, 1.0 - 1e-6)  # keep v inside its cell in float32
        log_eps = F.logsigmoid(eps) + F.logsigmoid(-eps)  # Logistic(0, 1) density
        log_q = log_eps - log_scale - F.logsigmoid(z) - F.logsigmoid(-z)
        y, log_det = self._continuous(x + u, event_dim)
        return y, log_det - _sum_event(log_q, event_dim)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "kind": self.kind,
            "event_shape": list(self.event_shape),
            "hidden": self.hidden,
            "clamp": self.clamp,
        }

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)
