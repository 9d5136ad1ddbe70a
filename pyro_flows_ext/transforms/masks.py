"""Masks of coupling layers: which part of the input conditions, which part is transformed.

A coupling splits its input into an identity part ``x_A`` (fed to the conditioner) and a
transformed part ``x_B``. Two kinds of split cover the usual masks:

* :class:`SlicePartition` cuts the feature (vectors) or channel (images) axis in two
  contiguous halves: the ``half`` mask for vectors and the ``channel`` mask for images. The
  conditioner sees only ``x_A`` and outputs parameters for ``x_B`` alone, so no work is wasted.
* :class:`MaskPartition` keeps a boolean mask of the event shape: the ``alternating`` mask for
  vectors and the ``checkerboard`` mask for images. The conditioner sees ``x * mask`` and
  outputs parameters for every element; the masked elements are left unchanged.

``parity`` flips which part is the identity, so that consecutive couplings with parities 0
and 1 transform complementary parts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import EventShape, one_of

__all__ = ["MASKS", "MaskPartition", "Partition", "SlicePartition", "make_partition"]

MASKS = {1: ("half", "alternating"), 3: ("channel", "checkerboard")}


class Partition(nn.Module):
    """Splits an input of a fixed event shape into conditioning and transformed parts.

    Example:
        >>> import torch
        >>> p = make_partition((4, 2, 2), "channel", parity=1)
        >>> a, b = p.split(torch.arange(16.0).reshape(4, 2, 2))
        >>> a.shape, b.shape, p.conditioner_shape
        (torch.Size([2, 2, 2]), torch.Size([2, 2, 2]), (2, 2, 2))
    """

    def __init__(self, event_shape: EventShape) -> None:
        super().__init__()
        self.event_shape = event_shape
        self.event_dim = len(event_shape)

    @property
    def feature_dim(self) -> int:
        """The axis holding features (vectors) or channels (images), counted from the right."""
        return -self.event_dim

    @property
    def conditioner_shape(self) -> EventShape:
        """Event shape of the conditioner's input."""
        raise NotImplementedError

    @property
    def transformed_shape(self) -> EventShape:
        """Event shape of the transformed part (and of each conditioner output)."""
        raise NotImplementedError

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(conditioner input, transformed part)``."""
        raise NotImplementedError

    def merge(self, x: Tensor, a: Tensor, y_b: Tensor) -> Tensor:
        """Put the transformed part ``y_b`` back beside the identity part of ``x``
        (``a`` is the conditioner input that :meth:`split` returned for ``x``)."""
        raise NotImplementedError

    def sum_log_det(self, log_det: Tensor) -> Tensor:
        """Sum an elementwise log-det of the transformed part over the event."""
        raise NotImplementedError


class SlicePartition(Partition):
    """Contiguous halves along the feature/channel axis (``half`` and ``channel`` masks).

    With an odd size the identity part gets the larger half under parity 0.

    Example:
        >>> SlicePartition((5,), parity=0).sizes
        (3, 2)
    """

    def __init__(self, event_shape: EventShape, parity: int = 0) -> None:
        super().__init__(event_shape)
        n = event_shape[0]
        if n < 2:
            raise ValueError(
                f"a {'half' if self.event_dim == 1 else 'channel'} mask needs at least 2 "
                f"{'features' if self.event_dim == 1 else 'channels'}, got event shape "
                f"{event_shape}"
            )
        first = (n + 1) // 2 if parity == 0 else n // 2
        self.sizes = (first, n - first)
        self.parity = parity  # parity 0: the first slice is the identity part

    @property
    def conditioner_shape(self) -> EventShape:
        return (self.sizes[self.parity],) + self.event_shape[1:]

    @property
    def transformed_shape(self) -> EventShape:
        return (self.sizes[1 - self.parity],) + self.event_shape[1:]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = torch.split(x, list(self.sizes), dim=self.feature_dim)
        return (a, b) if self.parity == 0 else (b, a)

    def merge(self, x: Tensor, a: Tensor, y_b: Tensor) -> Tensor:
        parts = (a, y_b) if self.parity == 0 else (y_b, a)
        return torch.cat(parts, dim=self.feature_dim)

    def sum_log_det(self, log_det: Tensor) -> Tensor:
        return log_det.sum(tuple(range(-self.event_dim, 0)))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, parity={self.parity}"


class MaskPartition(Partition):
    """An elementwise boolean mask (``alternating`` and ``checkerboard`` masks).

    ``mask`` is ``True`` where the input is the identity (conditioning) part.

    Example:
        >>> make_partition((4,), "alternating").mask
        tensor([ True, False,  True, False])
    """

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__(tuple(mask.shape))
        if mask.all() or not mask.any():
            raise ValueError(
                f"a coupling mask must hold both identity and transformed elements; a mask of "
                f"shape {tuple(mask.shape)} has only one kind (too few elements to split?)"
            )
        self.register_buffer("mask", mask.bool())

    @property
    def conditioner_shape(self) -> EventShape:
        return self.event_shape

    @property
    def transformed_shape(self) -> EventShape:
        return self.event_shape

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.mask.to(x.dtype), x

    def merge(self, x: Tensor, a: Tensor, y_b: Tensor) -> Tensor:
        return torch.where(self.mask, x, y_b)

    def sum_log_det(self, log_det: Tensor) -> Tensor:
        return log_det.masked_fill(self.mask, 0.0).sum(tuple(range(-self.event_dim, 0)))


def make_partition(event_shape: EventShape, mask: str | None = None, parity: int = 0) -> Partition:
    """The partition for ``mask`` (``None``: ``half`` for vectors, ``channel`` for images)."""
    one_of("parity", parity, (0, 1))
    event_dim = len(event_shape)
    kind = "vectors" if event_dim == 1 else "images"
    mask = one_of(f"mask for {kind}", mask or MASKS[event_dim][0], MASKS[event_dim])
    if mask in ("half", "channel"):
        return SlicePartition(event_shape, parity)
    if mask == "alternating":
        keep = torch.arange(event_shape[0]) % 2 == parity
    else:
        _, h, w = event_shape
        grid = torch.arange(h)[:, None] + torch.arange(w)[None, :]
        keep = (grid % 2 == parity).expand(event_shape)
    return MaskPartition(keep.contiguous())
