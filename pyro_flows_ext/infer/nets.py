"""The guide's coupling conditioner: an MLP whose parameters learn at a fraction of the rate.

Variational guides are trained with step sizes meant for their Gaussian parts (``5e-2`` is
common for ``AutoNormal``-style locations and log-scales). Adam moves every parameter by about
the step size per step, which for the weights of a hidden layer (typically ``~0.2`` in size) is
a wholesale change: the conditioner is scrambled in a few steps and the flow diverges. Storing
each weight and bias as ``theta / lr_scale`` and using ``lr_scale * theta`` in the forward pass
leaves the function (and its initialisation) unchanged while Adam's steps move it ``lr_scale``
times as far, i.e. the network trains with ``lr_scale`` times the optimiser's step size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["DampedMLP", "damp_parameters_"]


class DampedMLP(nn.Module):
    """``(..., in_dim) -> (..., out_dim)``: ReLU MLP, last layer zero, learning ``lr_scale``
    times slower than its optimiser's step size (see the module docstring).

    Each layer is one parameter ``[W | b]`` of shape ``(out, in + 1)``, initialised like
    ``nn.Linear``: half as many tensors as weights and biases apart, which matters because
    ``pyro.optim`` keeps one optimiser per tensor and its per-step cost is per tensor.

    Args:
        in_dim: input size.
        out_dim: output size.
        hidden_dims: hidden layer sizes.
        lr_scale: factor on the effective step size of every parameter (1 gives a plain MLP).

    Example:
        >>> import torch
        >>> net = DampedMLP(3, 4, [8], lr_scale=0.1)
        >>> net(torch.randn(2, 3)).abs().max().item()  # zero last layer
        0.0
        >>> [tuple(p.shape) for p in net.parameters()]
        [(8, 4), (4, 9)]
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dims: Sequence[int], lr_scale: float = 0.1
    ) -> None:
        super().__init__()
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {lr_scale!r}")
        self.lr_scale = float(lr_scale)
        sizes = [in_dim, *hidden_dims, out_dim]
        self.layers = nn.ParameterList()
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            if i == len(sizes) - 2:
                weight = torch.zeros(b, a + 1)
            else:
                linear = nn.Linear(a, b)
                weight = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach()
                weight = weight / self.lr_scale
            self.layers.append(nn.Parameter(weight))

    def forward(self, x: Tensor) -> Tensor:
        c = self.lr_scale
        h = x
        last = len(self.layers) - 1
        for i, weight in enumerate(self.layers):
            h = F.linear(h, weight[:, :-1] * c, weight[:, -1] * c)
            if i < last:
                h = F.relu(h)
        return h

    def extra_repr(self) -> str:
        return f"lr_scale={self.lr_scale}"


class _Scaled(nn.Module):
    """Parametrization ``W = lr_scale * theta`` (``theta`` is what the optimiser sees)."""

    def __init__(self, lr_scale: float) -> None:
        super().__init__()
        self.lr_scale = lr_scale

    def forward(self, theta: Tensor) -> Tensor:
        return theta * self.lr_scale

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight / self.lr_scale


def damp_parameters_(module: nn.Module, lr_scale: float) -> nn.Module:
    """Make every direct parameter of ``module`` learn ``lr_scale`` times slower (in place), by
    a ``torch.nn.utils.parametrize`` parametrization ``W = lr_scale * theta``; the module's
    values are unchanged.

    Example:
        >>> import torch
        >>> lin = damp_parameters_(torch.nn.Linear(2, 2), 0.1)
        >>> w = lin.weight.clone()
        >>> with torch.no_grad():
        ...     _ = lin.parametrizations.weight.original.add_(1.0)
        >>> bool(torch.allclose(lin.weight - w, torch.full((2, 2), 0.1)))
        True
    """
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be positive, got {lr_scale!r}")
    if lr_scale == 1:
        return module
    for name, _ in list(module.named_parameters(recurse=False)):
        parametrize.register_parametrization(module, name, _Scaled(lr_scale))
    return module
