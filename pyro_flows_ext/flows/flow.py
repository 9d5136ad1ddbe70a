"""``Flow``: a normalizing-flow density model as an ``nn.Module``.

A flow pushes a standard normal base ``z ~ N(0, I)`` over the data's event shape through one
bijection ``f`` (noise to data, Pyro's direction), so that

.. math:: \\log p(x) = \\log N(f^{-1}(x); 0, I) + \\log |\\det \\partial f^{-1}(x) / \\partial x|.

The module owns the base's ``loc``/``scale`` as buffers and the transforms as submodules, so
``.to(device)``, ``.double()`` and ``state_dict`` carry everything; :attr:`Flow.dist` builds
the ``TransformedDistribution`` on the module's current device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import ConditionalTransformedDistribution, TransformedDistribution
from pyro.distributions.conditional import ConditionalTransform, ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_flows_ext.checks import check_input, positive_int
from pyro_flows_ext.transforms import CachedTransformModule, Stack, condition_all

__all__ = ["Flow"]

SampleShape = int | Sequence[int] | torch.Size


def _event_shape(shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    if isinstance(shape, bool) or not isinstance(shape, int | Sequence | torch.Size):
        raise TypeError(f"event_shape must be an int or a tuple of ints, got {shape!r}")
    tup = (shape,) if isinstance(shape, int) else tuple(shape)
    if not tup or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in tup):
        raise ValueError(f"event_shape must hold positive ints, got {shape!r}")
    return tup


def _sample_shape(shape: SampleShape) -> torch.Size:
    error = TypeError(f"sample_shape must be an int or a tuple of ints, got {shape!r}")
    if isinstance(shape, bool):
        raise error
    if isinstance(shape, int):
        return torch.Size([shape])
    try:
        return torch.Size(shape)
    except TypeError:
        raise error from None


class Flow(nn.Module):
    """A density model ``x = f(z)``, ``z ~ N(0, I)`` over ``event_shape``.

    Args:
        event_shape: ``D`` for vectors or ``(C, H, W)`` for images (any shape is accepted).
        transforms: the bijection ``f`` (noise to data) or a list composed in order
            (``transforms[0]`` is applied to the noise first). Learnable parts must be
            ``nn.Module`` s (``TransformModule``) to be trained and saved.
        config: how a builder made this flow (see :func:`~pyro_flows_ext.flows.build_flow`);
            lets a checkpoint rebuild the model.
        context_dim: ``K > 0`` makes a conditional density model ``p(x | c)``: the
            transforms may then hold conditional couplings (``ConditionalTransform`` s,
            anywhere in the stack), and ``log_prob``, ``sample`` and ``rsample`` take
            ``context=c`` of shape ``(K,)`` or ``(*batch, K)``.

    ``log_prob(x)`` has the batch shape of ``x``; ``sample``/``rsample`` return
    ``sample_shape + event_shape``. ``temperature`` scales the base's standard deviation
    (``T < 1`` gives the sharper, more typical samples shown in the Glow paper).

    Example:
        >>> import torch
        >>> from pyro_flows_ext.transforms import affine_coupling
        >>> flow = Flow(4, [affine_coupling(4, parity=p) for p in (0, 1)])
        >>> flow.log_prob(torch.randn(3, 4)).shape, flow.sample((2,), temperature=0.7).shape
        (torch.Size([3]), torch.Size([2, 4]))

        A conditional flow (one context per example, or one for all):

        >>> from pyro_flows_ext.transforms import conditional_affine_coupling
        >>> cflow = Flow(4, [conditional_affine_coupling(4, 2, parity=p) for p in (0, 1)],
        ...              context_dim=2)
        >>> c = torch.randn(3, 2)
        >>> cflow.log_prob(torch.randn(3, 4), context=c).shape
        torch.Size([3])
        >>> cflow.sample((5,), context=c).shape  # sample_shape + context batch + event
        torch.Size([5, 3, 4])
    """

    base_loc: Tensor
    base_scale: Tensor

    def __init__(
        self,
        event_shape: int | Sequence[int] | torch.Size,
        transforms: Transform | ConditionalTransform | Sequence[Transform | ConditionalTransform],
        config: dict[str, Any] | None = None,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        self.event_shape = _event_shape(event_shape)
        self.context_dim = positive_int("context_dim", context_dim, minimum=0)
        kinds = (Transform, ConditionalTransform) if self.context_dim else Transform
        parts: list[Any] = (
            [transforms]
            if isinstance(transforms, Transform | ConditionalTransform)
            else list(transforms)
        )
        if not all(isinstance(t, kinds) for t in parts):
            got = [type(t).__name__ for t in parts]
            want = "Transform s" + (" or ConditionalTransform s" if self.context_dim else "")
            raise TypeError(f"transforms must be torch.distributions.{want}, got {got}")
        self.transform = Stack(parts)
        self.register_buffer("base_loc", torch.zeros(self.event_shape))
        self.register_buffer("base_scale", torch.ones(self.event_shape))
        self.config = config
        probe = self.base_loc.new_zeros(self.context_dim) if self.context_dim else None
        out = tuple(self._bijection(probe).forward_shape(self.event_shape))
        if out != self.event_shape:
            raise ValueError(
                f"transforms must map event shape {self.event_shape} to itself, got {out}"
            )

    @property
    def num_dims(self) -> int:
        """Number of elements of one event (the ``D`` of bits per dimension)."""
        return math.prod(self.event_shape)

    def base(self, temperature: float = 1.0) -> dist.TorchDistribution:
        """The base ``N(0, T^2 I)`` on the module's device and dtype."""
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 < temperature < math.inf
        ):
            raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
        scale = self.base_scale * temperature if temperature != 1.0 else self.base_scale
        normal = dist.Normal(self.base_loc, scale, validate_args=False)
        return normal.to_event(len(self.event_shape))

    def _bijection(self, context: Tensor | None) -> Transform:
        """The whole map ``f``, conditioned on ``context`` for a conditional flow."""
        if not self.context_dim:
            if context is not None:
                raise ValueError("this flow is not conditional (context_dim=0); pass no context")
            return self.transform
        if context is None:
            raise ValueError(
                f"this conditional flow needs context=c of shape (..., {self.context_dim})"
            )
        check_input(context, (self.context_dim,), "context")
        if context.dtype != self.base_loc.dtype or context.device != self.base_loc.device:
            raise ValueError(
                f"context must be {self.base_loc.dtype} on {self.base_loc.device} like the "
                f"flow, got {context.dtype} on {context.device}"
            )
        return condition_all(self.transform, context)

    @property
    def dist(self) -> TransformedDistribution | ConditionalTransformedDistribution:
        """The model as a ``TransformedDistribution`` (base ``N(0, I)``, one transform); for a
        conditional flow, Pyro's ``ConditionalTransformedDistribution`` (``.condition(c)``
        gives the ``TransformedDistribution`` for one context)."""
        if self.context_dim:
            return dist.ConditionalTransformedDistribution(self.base(), [_Conditioned(self)])
        return dist.TransformedDistribution(self.base(), [self.transform], validate_args=False)

    def condition(self, context: Tensor, temperature: float = 1.0) -> TransformedDistribution:
        """``p(x | context)`` as a ``TransformedDistribution``, base ``N(0, T^2 I)`` with the
        batch shape of ``context`` (a conditional flow only)."""
        bijection = self._bijection(context)
        base = self.base(temperature).expand(context.shape[:-1])
        return dist.TransformedDistribution(base, [bijection], validate_args=False)

    def _check(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        n = len(self.event_shape)
        if x.dim() < n or tuple(x.shape[x.dim() - n :]) != self.event_shape:
            raise ValueError(
                f"x must end in the event shape {self.event_shape}, got shape {tuple(x.shape)}"
            )
        if x.dtype != self.base_loc.dtype or x.device != self.base_loc.device:
            raise ValueError(
                f"x must be {self.base_loc.dtype} on {self.base_loc.device} like the flow, "
                f"got {x.dtype} on {x.device}"
            )

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` (``log p(x | context)``) in nats, shape ``x.shape[:-len(event_shape)]``
        broadcast with ``context.shape[:-1]``: ``x`` of shape ``(N, 1, *event_shape)`` and
        ``context`` of shape ``(K, C)`` give ``(N, K)``, every example under every context."""
        self._check(x)
        if context is not None and self.context_dim:
            x, context = self._broadcast(x, context)
        bijection = self._bijection(context)
        base = self.base()
        return dist.TransformedDistribution(base, [bijection], validate_args=False).log_prob(x)

    def _broadcast(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and ``context`` expanded to their common batch shape (views, no copies);
        a ``ValueError`` naming both shapes when their batch shapes do not broadcast."""
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        check_input(context, (self.context_dim,), "context")
        n = len(self.event_shape)
        x_batch, c_batch = x.shape[: x.dim() - n], context.shape[:-1]
        try:
            batch = torch.broadcast_shapes(x_batch, c_batch)
        except RuntimeError:
            raise ValueError(
                f"the batch shape of context {tuple(c_batch)} (context of shape "
                f"{tuple(context.shape)}) does not broadcast with that of x {tuple(x_batch)} "
                f"(x of shape {tuple(x.shape)}); give one context per example, one for all, "
                f"or shapes such as x (N, 1, ...) and context (K, C) for every pair"
            ) from None
        return x.expand(batch + x.shape[x.dim() - n :]), context.expand(batch + context.shape[-1:])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, context)

    def rsample(
        self,
        sample_shape: SampleShape = (),
        temperature: float = 1.0,
        context: Tensor | None = None,
    ) -> Tensor:
        """Reparameterised samples ``f(z)``, ``z ~ N(0, T^2 I)``; differentiable. With a
        context, the shape is ``sample_shape + context.shape[:-1] + event_shape``."""
        bijection = self._bijection(context)
        shape = _sample_shape(sample_shape)
        if context is not None:
            shape = shape + context.shape[:-1]
        return bijection(self.base(temperature).rsample(shape))

    def sample(
        self,
        sample_shape: SampleShape = (),
        temperature: float = 1.0,
        context: Tensor | None = None,
    ) -> Tensor:
        """Samples without gradient, ``sample_shape (+ context batch) + event_shape``."""
        with torch.no_grad():
            return self.rsample(sample_shape, temperature, context)

    def clear_cache(self) -> None:
        """Forget every transform's cached last result (they hold tensors and, in training,
        autograd graphs); done automatically before pickling and ``copy.deepcopy``."""
        seen: set[int] = set()
        stack: list[Any] = [self.transform]
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if hasattr(t, "clear_cache"):
                t.clear_cache()
            if getattr(t, "_cached_x_y", None) is not None:
                t._cached_x_y = None, None
            stack.extend(getattr(t, "parts", ()))
            stack.extend(x for x in (getattr(t, "_inv", None), getattr(t, "inner", None)) if x)
        for module in self.transform.modules():
            if id(module) not in seen and isinstance(module, CachedTransformModule):
                module.clear_cache()

    def __getstate__(self) -> dict[str, Any]:
        self.clear_cache()
        return super().__getstate__()

    def extra_repr(self) -> str:
        context = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"event_shape={self.event_shape}{context}"


class _Conditioned(ConditionalTransformModule):
    """A conditional flow's whole map as one Pyro ``ConditionalTransform``."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def condition(self, context: Tensor) -> Transform:
        return self.flow._bijection(context)
