"""Activation normalisation (Glow): a per-feature or per-channel affine map with
data-dependent initialisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import EventShape, as_event_shape, check_bool, check_input
from pyro_flows_ext.transforms._base import CachedTransformModule

__all__ = ["ActNorm", "actnorm"]


class ActNorm(CachedTransformModule):
    """``y = x * exp(log_scale) + loc``, per feature (vectors) or per channel (images).

    On its first use in the density direction (the inverse, as in ``log_prob``) it sets
    ``loc`` and ``log_scale`` from that batch so that the inverse's outputs have zero mean and
    unit variance per feature/channel (over the batch and, for images, the pixels). A channel
    with (near) zero variance, or a batch of one vector, gets unit scale and only the mean
    removed, so nothing becomes NaN. A batch holding a NaN or an infinite value does not
    initialise it (that batch goes through the identity): the first finite batch does. The
    ``initialized`` flag is a buffer: a model loaded from a ``state_dict`` is not initialised
    again. Pass ``data_init=False`` to start at the identity
    and never initialise from data (e.g. inside a variational guide).

    ``log|det| = sum(log_scale)`` (times ``H * W`` for images).

    Args:
        shape: ``D`` or ``(C, H, W)`` (only ``C`` matters for images; any ``H, W`` work).

    Example:
        >>> import torch
        >>> t = ActNorm(3)
        >>> z = t.inv(5 + 2 * torch.randn(100, 3))  # initialises from this batch
        >>> bool(t.initialized), z.mean(0).abs().max() < 1e-5
        (True, tensor(True))

    Reference: Kingma & Dhariwal (2018), Glow.
    """

    sign = +1  # its Jacobian determinant is positive

    initialized: Tensor

    def __init__(
        self, shape: int | EventShape, data_init: bool = True, cache_size: int = 1
    ) -> None:
        event_shape = as_event_shape(shape)
        super().__init__(event_dim=len(event_shape), cache_size=cache_size)
        self.features = event_shape[0]
        param_shape = (self.features,) + (1,) * (self._event_dim - 1)
        self.loc = nn.Parameter(torch.zeros(param_shape))
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.data_init = check_bool("data_init", data_init)
        self.register_buffer("initialized", torch.tensor(not data_init))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.features,) + (None,) * (self._event_dim - 1), name)

    def _log_det(self, x: Tensor) -> Tensor:
        pixels = x.shape[-2] * x.shape[-1] if self._event_dim == 3 else 1
        return (self.log_scale.sum() * pixels).expand(x.shape[: x.dim() - self._event_dim])

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Set ``loc``/``log_scale`` from data ``y`` (batch of the output space) and mark the
        layer initialised."""
        dims = [d for d in range(y.dim()) if d != y.dim() - self._event_dim]
        mean = y.mean(dims, keepdim=True)
        std = (y - mean).square().mean(dims, keepdim=True).sqrt()
        tiny = 1e-6 * (1.0 + mean.abs())
        std = torch.where(std > tiny, std, torch.ones_like(std))
        view = self.loc.shape
        self.loc.copy_(mean.reshape(view))
        self.log_scale.copy_(std.log().reshape(view))
        self.initialized.fill_(True)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.loc, self._log_det(x)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.initialized and bool(torch.isfinite(y).all()):  # never from NaN or inf
            self.initialize(y)
        return (y - self.loc) * (-self.log_scale).exp(), self._log_det(y)

    def extra_repr(self) -> str:
        return f"features={self.features}, event_dim={self._event_dim}, data_init={self.data_init}"


def actnorm(shape: int | EventShape, data_init: bool = True, cache_size: int = 1) -> ActNorm:
    """An :class:`ActNorm` for event shape ``D`` or ``(C, H, W)``.

    Example:
        >>> actnorm((3, 8, 8)).loc.shape
        torch.Size([3, 1, 1])
    """
    return ActNorm(shape, data_init=data_init, cache_size=cache_size)
