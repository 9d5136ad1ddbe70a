"""``Stack``: Pyro's ``ComposeTransformModule`` with its domain and codomain computed once.

torch's ``ComposeTransform`` recomputes its ``domain`` and ``codomain`` (walking every part, and
every part of a nested composition) each time they are read, and ``TransformedDistribution``
and ``ComposeTransform.log_abs_det_jacobian`` read them for every part on every call. In a
multi-scale Glow, compositions nest three deep, and that bookkeeping took about a tenth of a
training step (``benchmarks/throughput.py --profile``). A ``Stack`` computes both once, on
first use; its parts are fixed after construction.
"""

from __future__ import annotations

from typing import Any

from pyro.distributions.torch_transform import ComposeTransformModule
from torch.distributions import ComposeTransform, constraints

from pyro_flows_ext.transforms._base import NoSignError

__all__ = ["Stack"]


class Stack(ComposeTransformModule):
    """A composition of transforms (applied in order, like ``ComposeTransformModule``) whose
    ``domain`` and ``codomain`` are computed once; learnable parts are submodules.

    Example:
        >>> import torch
        >>> from pyro_flows_ext.transforms import actnorm, affine_coupling
        >>> s = Stack([affine_coupling(4), actnorm(4)])
        >>> s.codomain.event_dim, s(torch.zeros(2, 4)).shape
        (1, torch.Size([2, 4]))
    """

    def _constraint(self, which: str) -> Any:
        key = f"_{which}_once"
        value = self.__dict__.get(key)
        if value is None:
            value = getattr(ComposeTransform, which).fget(self)
            self.__dict__[key] = value
        return value

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return self._constraint("domain")

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return self._constraint("codomain")

    @property
    def sign(self) -> int:
        """The product of the parts' signs; :class:`~pyro_flows_ext.transforms.NoSignError`
        when a part has none."""
        sign = 1
        for part in self.parts:
            try:
                sign *= int(part.sign)
            except NotImplementedError as err:
                raise NoSignError(f"{type(part).__name__} has no sign ({err})") from None
        return sign
