"""Base distributions of the flow guides: the standard normal, and a product of Student-t
distributions whose degrees of freedom are learned per dimension (tail-adaptive flows).

A flow :math:`u = f(\\epsilon)` whose layers are affine far from the bulk (affine couplings
with bounded log-scales, a final affine layer) keeps the tails of its base: with
:math:`\\epsilon \\sim \\mathcal N(0, I)` the guide's tails are Gaussian in every direction.
Where the posterior's are heavier (the log of a residual scale in a regression has an
exponential tail), the importance weights :math:`p/q` grow without bound in q's extreme tail
and PSIS :math:`\\hat k` reads large even when the bulk is matched. A base

.. math::

    \\epsilon_i \\sim t_{\\nu_i}(0, 1), \\qquad
    \\nu_i = \\nu_{\\min} + (\\nu_{\\max} - \\nu_{\\min})\\,\\sigma(\\rho_i),

with :math:`\\rho` learned lets the guide choose its tail weight per direction (Jaini et al.
2020); draws are reparameterised (``rsample`` goes through a Gamma draw whose gradient torch
implements), so :math:`\\nu` is trained by the same ELBO gradient as the flow.

Why a logistic map onto :math:`(1, 50)` rather than :math:`\\nu = 1 + \\mathrm{softplus}(\\rho)`:
the ELBO's gradient in :math:`\\nu` is weak and noisy, and with the softplus (unit slope at
:math:`\\nu = 30`) Adam moved :math:`\\nu` from 30 to 27.5 in 500 steps on a Student-t(3)
target; the logistic map (slope 12 there) reached 3.2 to 3.6. The ceiling keeps the tails
polynomial: the reverse KL favours light tails, and on posteriors that are light-tailed on
one side and exponential on the other (the log residual scale of a regression) it pushed
:math:`\\nu` up, towards a Gaussian and the large :math:`\\hat k` the base is meant to fix.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import positive_float, positive_int

__all__ = ["BASES", "DF_INIT", "DF_MAX", "DF_MIN", "StudentTBase"]

BASES = ("normal", "studentt")
DF_INIT = 30.0
"""Initial degrees of freedom of a learned Student-t base (close to a Gaussian)."""
DF_MIN = 1.0
"""Floor of the learned degrees of freedom."""
DF_MAX = 50.0
"""Ceiling of the learned degrees of freedom: the tails stay polynomial."""


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class StudentTBase(nn.Module):
    """``()`` -> the distribution :math:`\\prod_i t_{\\nu_i}(0, 1)` over ``(D,)``, with
    :math:`\\nu` learned (``df=None``, starting at ``init_df``) or fixed (``df`` a number).

    The learned :math:`\\nu = \\nu_{\\min} + (\\nu_{\\max} - \\nu_{\\min})\\,\\sigma(\\rho)`
    (``rho`` is the parameter; :data:`DF_MIN`, :data:`DF_MAX`) receives gradients through
    ``rsample``.

    Args:
        dim: ``D``.
        df: fixed degrees of freedom, or ``None`` to learn them per dimension.
        init_df: the learned degrees of freedom at initialisation, in ``(DF_MIN, DF_MAX)``.

    Example:
        >>> import torch
        >>> base = StudentTBase(3)
        >>> z = base().rsample((5,))
        >>> z.shape, [round(v, 1) for v in base.df.tolist()]
        (torch.Size([5, 3]), [30.0, 30.0, 30.0])
        >>> z.sum().backward()
        >>> base.rho.grad.shape
        torch.Size([3])
        >>> StudentTBase(2, df=4.0).df.tolist()
        [4.0, 4.0]
    """

    rho: Tensor | None
    fixed_df: Tensor | None
    zero: Tensor

    def __init__(self, dim: int, df: float | None = None, init_df: float = DF_INIT) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.register_buffer("zero", torch.zeros(dim))
        if df is None:
            init_df = positive_float("init_df", init_df)
            if not DF_MIN < init_df < DF_MAX:
                raise ValueError(f"init_df must lie in ({DF_MIN}, {DF_MAX}), got {init_df}")
            frac = (init_df - DF_MIN) / (DF_MAX - DF_MIN)
            self.rho = nn.Parameter(torch.full((dim,), _logit(frac)))
            self.fixed_df = None
        else:
            self.rho = None
            self.register_buffer("fixed_df", torch.full((dim,), positive_float("df", df)))

    @property
    def learned(self) -> bool:
        """Whether the degrees of freedom are learned."""
        return self.rho is not None

    @property
    def df(self) -> Tensor:
        """The degrees of freedom :math:`\\nu`, shape ``(D,)``."""
        if self.rho is not None:
            return DF_MIN + (DF_MAX - DF_MIN) * torch.sigmoid(self.rho)
        assert self.fixed_df is not None
        return self.fixed_df

    def forward(self) -> dist.TorchDistribution:
        return dist.StudentT(self.df, self.zero, torch.ones_like(self.zero)).to_event(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, learned={self.learned}"
