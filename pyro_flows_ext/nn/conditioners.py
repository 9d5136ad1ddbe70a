"""Conditioner networks of coupling layers, with zero-initialised heads.

A conditioner maps the identity part of a coupling's input (and, for conditional flows, a
context vector) to the parameters of the elementwise map applied to the other part. Its last
layer starts at zero, so a fresh coupling is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import Tensor, nn

__all__ = [
    "HIDDEN_CHANNELS",
    "ConvNet",
    "ZeroConv2d",
    "default_hidden_dims",
    "mlp",
    "zero_last_layer_",
]

HIDDEN_CHANNELS = 32
"""The one default width of every convolutional conditioner (``hidden_channels``), from the
coupling factories and ``glow_step`` up to the builders and the ``pyro-flows`` command."""


def default_hidden_dims(input_dim: int, max_width: int | None = None) -> tuple[int, int]:
    """The one default ``hidden_dims`` of an MLP conditioner that sees ``input_dim``
    features: two layers of ``max(64, 4 * input_dim)`` units (``2 D`` for a half split of
    ``D`` features), at most ``max_width`` (the guides cap it, so that their parameters grow
    linearly in ``D``, not as ``D^2``).

    Example:
        >>> default_hidden_dims(8), default_hidden_dims(40), default_hidden_dims(500, 256)
        ((64, 64), (160, 160), (256, 256))
    """
    width = max(64, 4 * input_dim)
    if max_width is not None:
        width = min(width, max_width)
    return (width, width)


def zero_last_layer_(net: nn.Module) -> nn.Module:
    """Zero the weight and bias of the last ``nn.Linear``/``nn.Conv2d`` of ``net`` in place.

    Example:
        >>> from torch import nn
        >>> net = zero_last_layer_(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4)))
        >>> bool(net[1].weight.abs().sum() == 0), bool(net[0].weight.abs().sum() > 0)
        (True, True)
    """
    last = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        raise TypeError(f"{type(net).__name__} has no Linear or Conv2d layer to zero")
    with torch.no_grad():
        last[-1].weight.zero_()
        if last[-1].bias is not None:
            last[-1].bias.zero_()
    return net


def mlp(
    input_dim: int,
    param_dims: Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
) -> DenseNN | ConditionalDenseNN:
    """A Pyro ``DenseNN`` (``ConditionalDenseNN`` if ``context_dim``) with a zero last layer
    and ``hidden_dims`` (default :func:`default_hidden_dims` of ``input_dim``).

    Maps ``(..., input_dim)`` (and ``(..., context_dim)``) to a tuple of tensors of sizes
    ``param_dims`` (one tensor when there is one parameter).

    Example:
        >>> shift, scale = mlp(3, [2, 2], hidden_dims=[8])(torch.randn(5, 3))
        >>> shift.shape, bool(shift.abs().sum() == 0)
        (torch.Size([5, 2]), True)
    """
    net: DenseNN | ConditionalDenseNN
    hidden_dims = default_hidden_dims(input_dim) if hidden_dims is None else hidden_dims
    if context_dim:
        net = ConditionalDenseNN(input_dim, context_dim, list(hidden_dims), list(param_dims))
    else:
        net = DenseNN(input_dim, list(hidden_dims), list(param_dims))
    zero_last_layer_(net)
    return net


class ZeroConv2d(nn.Conv2d):
    """A ``padding='same'`` convolution whose weight and bias start at zero (Glow's head).

    Accepts any number of leading batch dims: ``(..., C_in, H, W) -> (..., C_out, H, W)``.

    Example:
        >>> ZeroConv2d(3, 4)(torch.randn(2, 5, 3, 8, 8)).shape
        torch.Size([2, 5, 4, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        zero_last_layer_(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return super().forward(x)
        out = super().forward(x.reshape((-1,) + x.shape[-3:]))
        return out.reshape(x.shape[:-3] + out.shape[1:])


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class ConvNet(nn.Module):
    """Glow's coupling network, optionally with residual blocks (RealNVP) and a context.

    ``conv3x3 -> ReLU -> conv1x1 -> [residual blocks] -> ReLU -> zero conv3x3``. Accepts any
    number of leading batch dims: ``(..., in_channels, H, W) -> (..., out_channels, H, W)``.
    With ``context_dim > 0`` a context ``(..., context_dim)`` is mapped by a linear layer to a
    per-channel bias of the first hidden layer.

    Example:
        >>> net = ConvNet(2, 4, hidden_channels=8, num_blocks=1, context_dim=3)
        >>> net(torch.randn(5, 2, 6, 6), torch.randn(5, 3)).shape
        torch.Size([5, 4, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = HIDDEN_CHANNELS,
        num_blocks: int = 0,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.inp = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.context = nn.Linear(context_dim, hidden_channels) if context_dim else None
        layers: list[nn.Module] = [nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 1)]
        layers += [_ResBlock(hidden_channels) for _ in range(num_blocks)]
        layers += [nn.ReLU(), ZeroConv2d(hidden_channels, out_channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch = x.shape[:-3]
        h = self.inp(x.reshape((-1,) + x.shape[-3:]))
        if self.context is not None:
            if context is None:
                raise ValueError("this ConvNet was built with a context_dim and needs a context")
            c = self.context(context).expand(batch + (h.shape[1],))
            h = h + c.reshape(-1, h.shape[1], 1, 1)
        out = self.body(h)
        return out.reshape(batch + out.shape[1:])
