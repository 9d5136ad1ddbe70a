"""``AutoConditionalCouplingFlow``: an amortised coupling-flow guide :math:`q(u \\mid c)` whose
context :math:`c` is computed from the model's arguments (the observed data)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_flows_ext.infer.vector.guide import AutoCouplingFlow
from pyro_flows_ext.transforms import ConditionalShift

__all__ = ["AutoConditionalCouplingFlow"]

_NOT_AMORTISED = ("init", "laplace_options", "init_elbo_samples")


class AutoConditionalCouplingFlow(AutoCouplingFlow):
    """Amortised inference: a coupling flow over the unconstrained latent vector conditioned
    on a context :math:`c` = ``context_fn(*args, **kwargs)`` computed from the model's
    arguments, e.g. the observed data or summary statistics of it.

    .. math::

        u = c_0 + B\\,(g_K \\circ \\dots \\circ g_1(\\epsilon; c) + W c + b),
        \\qquad \\epsilon \\sim \\mathcal N(0, I_D),

    where every :math:`g_k` is a :class:`~pyro_flows_ext.transforms.ConditionalCoupling`
    (its :class:`~pyro_flows_ext.nn.DampedMLP` sees the context) followed by the mixing layer
    of :class:`~pyro_flows_ext.infer.AutoCouplingFlow` (a fixed permutation by default),
    ``W c + b`` is a :class:`~pyro_flows_ext.transforms.ConditionalShift` that starts at zero
    and the final :class:`~pyro_flows_ext.transforms.LowerAffine` layer starts at
    :math:`\\mathcal N(c_0, \\text{init\\_scale}^2 I)` with :math:`c_0` the ``init_loc_fn``
    point of the first data set, so a fresh guide is the diagonal Gaussian of
    ``AutoCouplingFlow(init="loc")`` for every context. Train it with SVI on many data sets
    (e.g. simulated from the prior predictive), then ``guide(*new_args)``,
    ``median(*new_args)`` and ``quantiles(q, *new_args)`` answer for new data without
    refitting. There is no Laplace start (it would depend on one data set); the context should
    be roughly standardised, since the networks see it as it is.

    Args:
        model: a Pyro model whose latent sites are all continuous, with the same latent shapes
            for every data set.
        context_fn: maps the model's ``*args, **kwargs`` to a context vector ``(C,)``.
        options: keyword arguments of :class:`~pyro_flows_ext.infer.AutoCouplingFlow`
            (``depth``, ``hidden_dims``, ``mixing``, ``actnorm``, ``init_loc_fn``,
            ``init_scale``, ``coupling``, ``stl``, ``lr_scale``,
            ``base``, ``df``, ``affine``, ``rank``) with
            the same defaults; the default ``hidden_dims`` count the context among the network's
            inputs. ``init``, ``laplace_options`` and ``init_elbo_samples`` (the Laplace start)
            do not apply.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=y)
        >>> guide = AutoConditionalCouplingFlow(model, context_fn=lambda y: y, depth=2)
        >>> guide(torch.zeros(3))["mu"].shape, guide.context_dim
        (torch.Size([]), 3)
    """

    def __init__(
        self, model: Callable[..., Any], context_fn: Callable[..., Tensor], **options: Any
    ) -> None:
        if not callable(context_fn):
            raise TypeError(f"context_fn must be callable, got {type(context_fn).__name__}")
        wrong = [name for name in _NOT_AMORTISED if name in options]
        if wrong:
            raise TypeError(f"{type(self).__name__} has no Laplace start: {wrong} do not apply")
        self.context_fn = context_fn
        self.context_dim = 0
        super().__init__(model, init="loc", **options)

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
        shift = ConditionalShift(dim, self.context_dim, self.lr_scale)
        return [*super()._couplings(dim), shift]

    def _layers(self, *args: Any, **kwargs: Any) -> list[Transform]:
        context = self._context(*args, **kwargs).to(self._base_loc)
        return [
            t.condition(context) if isinstance(t, ConditionalTransformModule) else t
            for t in self.transforms
            if isinstance(t, ConditionalTransformModule | Transform)
        ]
