"""Networks whose parameters learn at a fraction of the optimiser's step size.

Variational guides are trained with step sizes meant for their Gaussian parts (``5e-2`` is
common for ``AutoNormal``-style locations and log-scales). Adam moves every parameter by about
the step size per step, which for the weights of a hidden layer (typically ``~0.2`` in size) is
a wholesale change: a conditioner is scrambled in a few steps and the flow diverges. Storing
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

from pyro_flows_ext.checks import hidden_sizes, positive_float, positive_int

__all__ = ["LR_SCALE", "DampedMLP", "damp_parameters_"]

LR_SCALE = 0.1
"""The default ``lr_scale`` of the guides' networks: the step sizes that suit a guide's Gaussian
part (``5e-2``) scramble a network's weights in a few steps. Every figure of the README's guide
benchmarks was measured with it."""


class DampedMLP(nn.Module):
    """``(..., input_dim) [, (..., context_dim)] -> (..., output_dim)``: a ReLU MLP whose last
    layer starts at zero and whose parameters learn ``lr_scale`` times slower than the
    optimiser's step size (see the module docstring).

    Each layer is one parameter ``[W | b]`` of shape ``(out, in + 1)``, initialised like
    ``nn.Linear``: half as many tensors as weights and biases apart, which matters because
    ``pyro.optim`` keeps one optimiser per tensor and its per-step cost is per tensor. With
    ``context_dim > 0`` the network is called as ``net(x, context)`` and sees
    ``[x, context]`` (the context broadcast over ``x``'s batch shape), as the conditioner of a
    :class:`~pyro_flows_ext.transforms.ConditionalCoupling` is.

    Args:
        input_dim: input size (without the context).
        output_dim: output size.
        hidden_dims: hidden layer sizes (empty: one affine layer).
        lr_scale: factor on the effective step size of every parameter (1 gives a plain MLP).
        context_dim: size of the context vector (0: no context).

    Example:
        >>> import torch
        >>> net = DampedMLP(3, 4, [8], lr_scale=0.1)
        >>> net(torch.randn(2, 3)).abs().max().item()  # zero last layer
        0.0
        >>> [tuple(p.shape) for p in net.parameters()]
        [(8, 4), (4, 9)]
        >>> DampedMLP(3, 4, [8], context_dim=2)(torch.randn(5, 3), torch.ones(2)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int],
        lr_scale: float = LR_SCALE,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        hidden = hidden_sizes("hidden_dims", hidden_dims)
        if hidden is None:
            raise TypeError("hidden_dims must be a sequence of positive ints, got None")
        self.lr_scale = positive_float("lr_scale", lr_scale)
        self.context_dim = positive_int("context_dim", context_dim, minimum=0)
        sizes = [positive_int("input_dim", input_dim) + self.context_dim, *hidden]
        sizes.append(positive_int("output_dim", output_dim))
        self.layers = nn.ParameterList()
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            if i == len(sizes) - 2:
                weight = torch.zeros(b, a + 1)
            else:
                linear = nn.Linear(a, b)
                weight = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach()
                weight = weight / self.lr_scale
            self.layers.append(nn.Parameter(weight))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_dim:
            if context is None:
                raise ValueError("this DampedMLP was built with a context_dim and needs a context")
            context = context.expand(x.shape[:-1] + context.shape[-1:])
            x = torch.cat([x, context], dim=-1)
        first, c = self.layers[0], self.lr_scale
        return self._after_first(F.linear(x, first[:, :-1] * c, first[:, -1] * c))

    def _after_first(self, h: Tensor) -> Tensor:
        """The layers after the first, from the first layer's output ``h``."""
        c = self.lr_scale
        for weight in list(self.layers)[1:]:
            h = F.linear(F.relu(h), weight[:, :-1] * c, weight[:, -1] * c)
        return h

    def forward_parts(self, parts: Sequence[Tensor]) -> Tensor:
        """The network of the concatenation of ``parts`` (``(*batch_k, F_k)``, batch shapes
        that broadcast; their sizes sum to ``input_dim + context_dim``), without building it:
        the first layer is applied to each part at its own batch shape and the results are
        broadcast-summed, so that a part shared along a batch dim (a plate element's
        embedding across particles) is not repeated there.

        Example:
            >>> import torch
            >>> net = DampedMLP(3, 2, [4])
            >>> _ = torch.nn.init.normal_(net.layers[-1])
            >>> a, b = torch.randn(5, 1, 1), torch.randn(1, 7, 2)
            >>> x = torch.cat([a.expand(5, 7, 1), b.expand(5, 7, 2)], dim=-1)
            >>> bool(torch.allclose(net.forward_parts([a, b]), net(x), atol=1e-6))
            True
        """
        first, c = self.layers[0], self.lr_scale
        h, start = first[:, -1] * c, 0
        for part in parts:
            stop = start + part.shape[-1]
            h = h + F.linear(part, first[:, start:stop] * c)
            start = stop
        if start != first.shape[1] - 1:
            raise ValueError(f"parts have {start} features in all, expected {first.shape[1] - 1}")
        return self._after_first(h)

    def extra_repr(self) -> str:
        context = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"lr_scale={self.lr_scale}{context}"


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
    values are unchanged. Returns ``module``.

    Example:
        >>> import torch
        >>> lin = damp_parameters_(torch.nn.Linear(2, 2), 0.1)
        >>> w = lin.weight.clone()
        >>> with torch.no_grad():
        ...     _ = lin.parametrizations.weight.original.add_(1.0)
        >>> bool(torch.allclose(lin.weight - w, torch.full((2, 2), 0.1)))
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    lr_scale = positive_float("lr_scale", lr_scale)
    if lr_scale == 1:
        return module
    for name, _ in list(module.named_parameters(recurse=False)):
        parametrize.register_parametrization(module, name, _Scaled(lr_scale))
    return module
