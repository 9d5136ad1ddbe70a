"""Learned invertible linear mixing: Glow's 1x1 convolution and its vector twin.

``y = W x`` over the channel axis of ``(C, H, W)`` images (every pixel mixed by the same
``C x C`` matrix), or over the feature axis of vectors. In the LU parameterisation

.. math:: W = P \\, L \\, (U + \\mathrm{diag}(\\mathrm{sign} \\cdot e^{\\log|s|}))

with a fixed permutation ``P``, unit lower-triangular ``L``, strictly upper ``U``, and fixed
signs, ``log|det W| = sum(log|s|)``: no determinant, and the diagonal can never cross zero.
The log-det of the whole map is ``H * W * sum(log|s|)`` for images.

Pyro's ``GeneralizedChannelPermute`` is the same 1x1 convolution in an LU form, but it learns
the diagonal of ``U`` directly (it can cross zero, making ``W`` singular) and materialises a
``[..., C, C, H, W]`` tensor in its forward; ours applies one batched matrix product per
direction (see ``benchmarks/transforms.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import (
    EventShape,
    as_event_shape,
    check_bool,
    check_input,
    positive_int,
)
from pyro_flows_ext.transforms._base import CachedTransformModule, NoSignError, permutation_sign

__all__ = ["InvertibleConv1x1", "InvertibleLinear", "invertible_conv1x1", "invertible_linear"]


class _InvertibleMixing(CachedTransformModule):
    """Shared body of :class:`InvertibleLinear` (``event_dim=1``) and
    :class:`InvertibleConv1x1` (``event_dim=3``)."""

    perm: Tensor
    signs: Tensor
    lower_mask: Tensor
    eye: Tensor

    def __init__(self, features: int, event_dim: int, lu: bool, cache_size: int) -> None:
        super().__init__(event_dim=event_dim, cache_size=cache_size)
        self.features = positive_int("number of features/channels", features)
        self.lu = check_bool("lu", lu)
        # a random rotation, factored in float64, stored in the default dtype
        dtype = torch.get_default_dtype()
        w = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))[0]
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p.to(dtype))
            self.register_buffer("signs", torch.sign(s).to(dtype))
            self.register_buffer("lower_mask", torch.tril(torch.ones_like(w), -1).to(dtype))
            self.register_buffer("eye", torch.eye(features, dtype=dtype))
            self.lower = nn.Parameter(lower.to(dtype))
            self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
            self.log_s = nn.Parameter(s.abs().log().to(dtype))
        else:
            self.weight = nn.Parameter(w.to(dtype))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.features,) + (None,) * (self._event_dim - 1), name)

    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.lower * self.lower_mask + self.eye, self._upper()

    def _upper(self) -> Tensor:
        return self.upper * self.lower_mask.T + torch.diag(self.signs * self.log_s.exp())

    def weight_matrix(self) -> Tensor:
        """The ``C x C`` matrix ``W``."""
        if not self.lu:
            return self.weight
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_matrix(self) -> Tensor:
        """``W^{-1}``, by triangular solves in the LU form."""
        if not self.lu:
            return torch.linalg.inv(self.weight)
        # W^{-1} = U^{-1} L^{-1} P^T: two triangular solves with P^T as the right-hand side
        # (no identity, no matrix products); a unit-triangular solve reads only L's strictly
        # lower part, so the raw parameter is passed and its gradient stays strictly lower
        upper = self._upper()
        perm_t = self.perm.T.to(upper.dtype)
        l_inv_pt = torch.linalg.solve_triangular(
            self.lower, perm_t, upper=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)

    def _matrix_sign(self) -> int:
        """The sign of ``det W``."""
        with torch.no_grad():
            if not self.lu:
                return int(torch.linalg.slogdet(self.weight)[0])
            perm = self.perm.argmax(dim=0)  # column j of P is e_perm[j]
            return permutation_sign(perm) * int(self.signs.prod())

    @property
    def sign(self) -> int:
        """The sign of the Jacobian determinant: that of ``det W`` for vectors; for images
        (``det W`` to the power ``H W``) +1 when ``det W > 0``, else it depends on ``H W``
        and :class:`~pyro_flows_ext.transforms.NoSignError` is raised."""
        sign = self._matrix_sign()
        if self._event_dim == 1 or sign > 0:
            return sign
        raise NoSignError("the sign of an InvertibleConv1x1 with det W < 0 depends on H * W")

    def _log_det(self, x: Tensor) -> Tensor:
        log_det = self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]
        pixels = x.shape[-2] * x.shape[-1] if self._event_dim == 3 else 1
        return (log_det * pixels).expand(x.shape[: x.dim() - self._event_dim])

    def _mix(self, matrix: Tensor, x: Tensor) -> Tensor:
        if self._event_dim == 1:
            return x @ matrix.T
        # one batched product of (C, C) with each (C, H * W) image: ``matrix @ x`` would
        # fold the batch into a transposed copy and copy the result back, about 3x the time
        # of ``bmm`` (forward and backward) at Glow's sizes on a CPU
        c, h, w = x.shape[-3:]
        flat = x.reshape(math.prod(x.shape[:-3]), c, h * w)
        return torch.bmm(matrix.expand(flat.shape[0], c, c), flat).reshape(x.shape)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._mix(self.weight_matrix(), x), self._log_det(x)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._mix(self.inverse_matrix(), y), self._log_det(y)

    def extra_repr(self) -> str:
        return f"features={self.features}, lu={self.lu}"


class InvertibleLinear(_InvertibleMixing):
    """A learned invertible ``D x D`` linear map of vectors, ``y = W x`` (Glow's 1x1
    convolution for vectors), initialised at a random rotation.

    Args:
        dim: ``D``.
        lu: use the LU parameterisation (default) or a plain matrix (log-det by ``slogdet``).

    Example:
        >>> import torch
        >>> t = InvertibleLinear(3)
        >>> x = torch.randn(2, 3)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
    """

    def __init__(self, dim: int, lu: bool = True, cache_size: int = 1) -> None:
        super().__init__(dim, event_dim=1, lu=lu, cache_size=cache_size)


class InvertibleConv1x1(_InvertibleMixing):
    """Glow's invertible 1x1 convolution over the channels of ``(C, H, W)`` images,
    initialised at a random rotation; ``log|det| = H * W * sum(log|s|)``.

    Args:
        channels: ``C`` (any ``H, W`` are accepted).
        lu: use the LU parameterisation (default) or a plain matrix (log-det by ``slogdet``).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(4, 2, 2), 1).to_event(3)
        >>> d = dist.TransformedDistribution(base, [InvertibleConv1x1(4)])
        >>> d.log_prob(torch.randn(7, 4, 2, 2)).shape
        torch.Size([7])

    Reference: Kingma & Dhariwal (2018), Glow.
    """

    def __init__(self, channels: int, lu: bool = True, cache_size: int = 1) -> None:
        super().__init__(channels, event_dim=3, lu=lu, cache_size=cache_size)


def invertible_linear(shape: int | EventShape, lu: bool = True) -> _InvertibleMixing:
    """An :class:`InvertibleLinear` for ``D``; for ``(C, H, W)`` its image twin,
    :class:`InvertibleConv1x1`.

    Example:
        >>> invertible_linear(5).features
        5
    """
    event_shape = as_event_shape(shape)
    if len(event_shape) == 3:
        return InvertibleConv1x1(event_shape[0], lu=lu)
    return InvertibleLinear(event_shape[0], lu=lu)


def invertible_conv1x1(shape: int | EventShape, lu: bool = True) -> _InvertibleMixing:
    """An :class:`InvertibleConv1x1` for ``(C, H, W)``; for ``D``, its vector twin
    :class:`InvertibleLinear`.

    Example:
        >>> invertible_conv1x1((3, 8, 8)).features
        3
    """
    return invertible_linear(shape, lu=lu)
