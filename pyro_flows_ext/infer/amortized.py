"""``AutoConditionalCouplingFlow``: an amortised coupling-flow guide :math:`q(u \\mid c)` whose
context :math:`c` is computed from the model's arguments (the observed data)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import AffineTransform
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_flows_ext.infer.affine import PermuteTransform
from pyro_flows_ext.infer.guide import AutoCouplingFlow
from pyro_flows_ext.infer.nets import DampedMLP
from pyro_flows_ext.transforms import ConditionalAffineCoupling
from pyro_flows_ext.transforms.masks import make_partition

__all__ = ["AutoConditionalCouplingFlow", "ConditionalShift"]


class _ContextMLP(DampedMLP):
    """``(x_A, context) -> (t, h)``: a :class:`DampedMLP` on ``[x_A, context]``."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            raise ValueError("this conditioner needs a context")
        context = context.expand(x.shape[:-1] + context.shape[-1:])
        return super().forward(torch.cat([x, context], dim=-1))


class ConditionalShift(ConditionalTransformModule):
    """``y = x + W c + b`` with ``W, b`` from a zero-initialised
    :class:`~pyro_flows_ext.infer.nets.DampedMLP` without hidden layers (``log|det| = 0``).

    Example:
        >>> import torch
        >>> t = ConditionalShift(3, context_dim=2)
        >>> t.condition(torch.ones(2))(torch.zeros(3)).tolist()  # zero at initialisation
        [0.0, 0.0, 0.0]
    """

    def __init__(self, dim: int, context_dim: int, lr_scale: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.context_dim = context_dim
        self.net = DampedMLP(context_dim, dim, [], lr_scale=lr_scale)

    def condition(self, context: Tensor) -> Transform:
        return AffineTransform(self.net(context), 1.0, event_dim=1)


class AutoConditionalCouplingFlow(AutoCouplingFlow):
    """Amortised inference: a coupling flow over the unconstrained latent vector conditioned
    on a context :math:`c` = ``context_fn(*args, **kwargs)`` computed from the model's
    arguments, e.g. the observed data or summary statistics of it.

    .. math::

        u = c_0 + B\\,(g_K \\circ \\dots \\circ g_1(\\epsilon; c) + W c + b),
        \\qquad \\epsilon \\sim \\mathcal N(0, I_D),

    where every :math:`g_k` is a :class:`~pyro_flows_ext.transforms.ConditionalAffineCoupling`
    (its network sees the context) followed by a fixed permutation, ``W, b`` start at zero and
    the final affine layer starts at :math:`\\mathcal N(c_0, \\text{init\\_scale}^2 I)` with
    :math:`c_0` the ``init_loc_fn`` point of the first data set, so a fresh guide is the
    diagonal Gaussian of ``AutoCouplingFlow(init="loc")`` for every context. Train it with SVI
    on many data sets (e.g. simulated from the prior predictive), then ``guide(*new_args)``,
    ``median(*new_args)`` and ``quantiles(q, *new_args)`` answer for new data without
    refitting. There is no Laplace start (it would depend on one data set); the context should
    be roughly standardised, since the networks see it as it is.

    Args:
        model: a Pyro model whose latent sites are all continuous, with the same latent shapes
            for every data set.
        context_fn: maps the model's ``*args, **kwargs`` to a context vector ``(C,)``.
        num_layers, hidden_dims, init_loc_fn, init_scale, scale, clamp, stl, net_lr_scale:
            as for :class:`~pyro_flows_ext.infer.AutoCouplingFlow`.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=y)
        >>> guide = AutoConditionalCouplingFlow(model, context_fn=lambda y: y)
        >>> guide(torch.zeros(3))["mu"].shape, guide.context_dim
        (torch.Size([]), 3)
    """

    def __init__(
        self,
        model: Callable[..., Any],
        context_fn: Callable[..., Tensor],
        *,
        num_layers: int = 3,
        hidden_dims: Any = None,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        scale: str = "exp",
        clamp: float = 3.0,
        stl: bool = True,
        net_lr_scale: float = 0.1,
    ) -> None:
        if not callable(context_fn):
            raise TypeError(f"context_fn must be callable, got {type(context_fn).__name__}")
        self.context_fn = context_fn
        self.context_dim = 0
        super().__init__(
            model,
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            init="loc",
            init_scale=init_scale,
            scale=scale,
            clamp=clamp,
            stl=stl,
            net_lr_scale=net_lr_scale,
            init_loc_fn=init_loc_fn,
        )

    def _context(self, *args: Any, **kwargs: Any) -> Tensor:
        context = self.context_fn(*args, **kwargs)
        if not isinstance(context, Tensor) or context.dim() != 1 or not context.is_floating_point():
            got = (
                f"shape {tuple(context.shape)}, dtype {context.dtype}"
                if isinstance(context, Tensor)
                else type(context).__name__
            )
            raise ValueError(f"context_fn must return a 1-d floating tensor (C,), got {got}")
        if self.context_dim and context.shape[0] != self.context_dim:
            raise ValueError(
                f"context_fn returned {context.shape[0]} features, the guide was built for "
                f"{self.context_dim}"
            )
        return context

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        self.context_dim = self._context(*args, **kwargs).shape[0]
        super()._setup_prototype(*args, **kwargs)

    def _couplings(self, dim: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        if dim >= 2:
            hidden = self.hidden_dims or (max(32, 2 * (dim + self.context_dim)),) * 2
            for _ in range(self.num_layers):
                part = make_partition((dim,), "half", parity=0)
                net = _ContextMLP(
                    part.conditioner_shape[0] + self.context_dim,
                    2 * part.transformed_shape[0],
                    hidden,
                    lr_scale=self.net_lr_scale,
                )
                coupling = ConditionalAffineCoupling(
                    (dim,), net, self.context_dim, "half", 0, scale=self.scale, clamp=self.clamp
                )
                layers += [coupling, PermuteTransform(dim)]
        layers.append(ConditionalShift(dim, self.context_dim, self.net_lr_scale))
        return layers

    def _flow(self, *args: Any, **kwargs: Any) -> list[Transform]:
        context = self._context(*args, **kwargs).to(self._base_loc)
        return [
            t.condition(context) if isinstance(t, ConditionalTransformModule) else t
            for t in self.transforms
            if isinstance(t, ConditionalTransformModule | Transform)
        ]
