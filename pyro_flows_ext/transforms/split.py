"""Multi-scale architecture pieces: Glow's learned split prior and factoring out.

In a multi-scale flow (RealNVP, Glow) each level factors out half of its channels, which are
modelled by a Gaussian whose mean and log-scale depend on the kept half. Written as
bijections on the full tensor, so that ``TransformedDistribution`` with a standard-normal base
does the whole change of variables:

* :class:`SplitPrior` maps the factored-out half ``z_B`` to standard normal noise given the
  kept half ``h``: ``z_B = mu(h) + exp(log_sigma(h)) * eps`` (forward, noise to data). It is an
  affine coupling over a channel split whose conditioner is one zero-initialised
  convolution, so at initialisation the prior is N(0, I).
* :class:`FactorOut` applies an inner transform (the next levels) to the kept channels only
  and passes the factored-out channels through unchanged.

One level of the density direction (data to noise) is then: squeeze, K flow steps,
``SplitPrior.inv``, ``FactorOut(next level).inv``, unsqueeze; see
:func:`pyro_flows_ext.flows.glow`.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_flows_ext.checks import EventShape, as_event_shape, check_input, positive_int
from pyro_flows_ext.nn import ZeroConv2d
from pyro_flows_ext.transforms._base import CachedTransformModule, NoSignError
from pyro_flows_ext.transforms.coupling import Coupling
from pyro_flows_ext.transforms.maps import AffineMap
from pyro_flows_ext.transforms.masks import SlicePartition

__all__ = ["PRIOR_CLAMP", "FactorOut", "SplitPrior", "split_prior"]

PRIOR_CLAMP = 5.0
"""The default bound of a split prior's log-scale, wider than a coupling's
(:data:`~pyro_flows_ext.transforms.maps.CLAMP`): it is the whole spread of the factored-out
channels, not one flow step's change of it."""


class SplitPrior(Coupling):
    """Glow's learned conditional prior of the factored-out channels.

    The last ``C // 2`` channels (features) are ``mu(h) + exp(log_sigma(h)) * eps`` where
    ``h`` are the first ``C - C // 2`` and ``(mu, log_sigma)`` come from a zero-initialised 3x3
    convolution (a linear layer for vectors). ``log_sigma`` is soft-clamped to
    ``[-clamp, clamp]``. Arguments as :func:`split_prior`.

    Example:
        >>> import torch
        >>> t = split_prior((4, 8, 8))
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(t(x), x)  # N(0, I) at initialisation
        True
    """

    def __init__(
        self,
        shape: int | EventShape,
        kernel_size: int = 3,
        clamp: float = PRIOR_CLAMP,
        cache_size: int = 1,
    ) -> None:
        event_shape = as_event_shape(shape)
        kernel_size = positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'same' convolution), got {kernel_size}")
        partition = SlicePartition(event_shape, parity=0)
        kept, factored = partition.sizes
        net: nn.Module
        if len(event_shape) == 3:
            net = ZeroConv2d(kept, 2 * factored, kernel_size)
        else:
            net = nn.Linear(kept, 2 * factored)
            nn.init.zeros_(net.weight)
            nn.init.zeros_(net.bias)
        super().__init__(
            event_shape, AffineMap("exp", clamp), net, partition, cache_size=cache_size
        )


def split_prior(
    shape: int | EventShape, kernel_size: int = 3, clamp: float = PRIOR_CLAMP
) -> SplitPrior:
    """A :class:`SplitPrior` for ``(C, H, W)`` (or ``D``).

    Args:
        shape: the event shape of the level, ``(C, H, W)`` or ``D``.
        kernel_size: of the zero-initialised convolution (images).
        clamp: bound of the soft-clamped log-scale.

    Example:
        >>> split_prior((4, 8, 8)).partition.sizes  # (kept, factored out)
        (2, 2)
    """
    return SplitPrior(shape, kernel_size=kernel_size, clamp=clamp)


def _is_conditional(t: object) -> bool:
    """Whether ``t`` is, or holds anywhere, a ``ConditionalTransform``."""
    if isinstance(t, ConditionalTransform):
        return True
    parts = [*getattr(t, "parts", ()), getattr(t, "inner", None)]
    return any(_is_conditional(p) for p in parts if p is not None)


class FactorOut(CachedTransformModule):
    """Apply ``inner`` to the first ``C - C // 2`` channels (features); pass the rest through.

    ``inner`` must keep the shape of its input, ``(C - C // 2, H, W)``; its log-det is the
    log-det of the whole map.

    Example:
        >>> import torch
        >>> from pyro_flows_ext.transforms import ActNorm
        >>> t = FactorOut(ActNorm((2, 4, 4), data_init=False), (4, 4, 4))
        >>> t(torch.randn(3, 4, 4, 4)).shape
        torch.Size([3, 4, 4, 4])
    """

    def __init__(self, inner: Transform, shape: int | EventShape, cache_size: int = 1) -> None:
        event_shape = as_event_shape(shape)
        super().__init__(event_dim=len(event_shape), cache_size=cache_size)
        self.event_shape = event_shape
        self.partition = SlicePartition(event_shape, parity=0)
        kept = self.partition.conditioner_shape
        # a stack with conditional couplings is checked once conditioned (condition_all)
        if not _is_conditional(inner) and tuple(inner.forward_shape(kept)) != kept:
            raise ValueError(f"inner transform must keep the shape {kept} of the kept channels")
        self.inner = inner

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, self.event_shape, name)

    @property
    def sign(self) -> int:
        """The inner transform's sign (the passed-through channels add +1)."""
        try:
            return int(self.inner.sign)
        except NotImplementedError as err:
            raise NoSignError(f"FactorOut: {err}") from None

    def _inner_log_det(self, a: Tensor, b: Tensor) -> Tensor:
        log_det = self.inner.log_abs_det_jacobian(a, b)
        extra = self._event_dim - self.inner.domain.event_dim
        return log_det.sum(tuple(range(-extra, 0))) if extra else log_det

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, rest = self.partition.split(x)
        b = self.inner(a)
        return torch.cat([b, rest], dim=-self._event_dim), self._inner_log_det(a, b)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        b, rest = self.partition.split(y)
        a = self.inner.inv(b)
        return torch.cat([a, rest], dim=-self._event_dim), self._inner_log_det(a, b)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"
