"""Space-to-depth reshaping of images (RealNVP's squeeze)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.distributions import Transform

from pyro_flows_ext.checks import check_input
from pyro_flows_ext.transforms._base import NoSignError, event_constraint

__all__ = ["SqueezeTransform"]


class SqueezeTransform(Transform):
    """``(C, H, W) -> (4C, H/2, W/2)``: each 2x2 block of pixels becomes 4 channels.

    A permutation of the elements, so ``log|det| = 0``. The inverse (``.inv``) is
    depth-to-space. ``H`` and ``W`` must be even.

    Example:
        >>> import torch
        >>> t = SqueezeTransform()
        >>> t(torch.randn(5, 3, 8, 6)).shape, t.forward_shape((3, 8, 6))
        (torch.Size([5, 12, 4, 3]), (12, 4, 3))
    """

    domain = event_constraint(3)
    codomain = event_constraint(3)
    bijective = True

    def __init__(self, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)

    @property
    def sign(self) -> int:
        """Not fixed (a permutation whose sign depends on the image size):
        :class:`~pyro_flows_ext.transforms.NoSignError`."""
        raise NoSignError("the sign of SqueezeTransform depends on the image size")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SqueezeTransform)

    def __hash__(self) -> int:
        return hash(SqueezeTransform)

    @staticmethod
    def _check_spatial(shape: Sequence[int], what: str) -> None:
        if len(shape) < 3 or shape[-1] % 2 or shape[-2] % 2:
            raise ValueError(
                f"{what} of SqueezeTransform must end in (C, H, W) with even H and W, "
                f"got shape {tuple(shape)}"
            )

    @staticmethod
    def _check_channels(shape: Sequence[int], what: str) -> None:
        if len(shape) < 3 or shape[-3] % 4:
            raise ValueError(
                f"{what} of SqueezeTransform.inv must end in (4C, H, W), got shape {tuple(shape)}"
            )

    def _call(self, x: Tensor) -> Tensor:
        check_input(x, (None, None, None), "input of SqueezeTransform")
        self._check_spatial(x.shape, "input")
        *batch, c, h, w = x.shape
        x = x.reshape(*batch, c, h // 2, 2, w // 2, 2)
        n = len(batch)
        x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # (..., c, 2, 2, h/2, w/2)
        return x.reshape(*batch, 4 * c, h // 2, w // 2)

    def _inverse(self, y: Tensor) -> Tensor:
        check_input(y, (None, None, None), "input of SqueezeTransform.inv")
        self._check_channels(y.shape, "input")
        *batch, c4, h, w = y.shape
        y = y.reshape(*batch, c4 // 4, 2, 2, h, w)
        n = len(batch)
        y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # (..., c, h, 2, w, 2)
        return y.reshape(*batch, c4 // 4, 2 * h, 2 * w)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-3])

    def forward_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        self._check_spatial(shape, "shape")
        *batch, c, h, w = shape
        return (*batch, 4 * c, h // 2, w // 2)

    def inverse_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        self._check_channels(shape, "shape")
        *batch, c, h, w = shape
        return (*batch, c // 4, 2 * h, 2 * w)
