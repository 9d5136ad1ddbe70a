"""A diagonal-plus-low-rank affine bijection of vectors: the Gaussian end of a flow guide
when ``D`` is too large for a ``(D, D)`` factor."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import check_input, positive_float, positive_int
from pyro_flows_ext.transforms._base import CachedTransformModule

__all__ = ["INIT_FACTOR", "LowRankAffine"]

INIT_FACTOR = 1e-2
"""Scale of the random initial ``U`` (times ``1 / sqrt(r)``)."""


class LowRankAffine(CachedTransformModule):
    """``x = c + p * (a + s * (z + U U^T z))``: a learned diagonal-plus-low-rank affine map
    behind a fixed elementwise one, in ``O(D r)`` memory and time.

    ``c`` (``center``) and the positive vector ``p`` (``preconditioner``) are fixed buffers;
    ``a`` (``shift``), ``s = exp(log_diag)`` and ``U`` (``factor``, ``(D, r)``) are learned.
    ``U`` starts at small random values (:data:`INIT_FACTOR` ``/ sqrt(r)`` times a standard
    normal), not at zero: ``U = 0`` is a stationary point of every loss, since the map is
    quadratic in ``U``, and an optimiser would never leave it; a fresh layer is then the
    diagonal map up to a relative ``1e-4`` in its covariance. ``M = I + U U^T`` is symmetric
    positive definite for every ``U``, so the map is a bijection for every value of the
    parameters, and with ``S = diag(p s)`` the image of :math:`\\mathcal N(0, I)` is
    :math:`\\mathcal N(c + p a, S M^2 S)`, which covers every covariance "diagonal + rank
    ``r``" (``S^2 + S W W^T S`` with ``M^2 = I + W W^T``), as
    ``AutoLowRankMultivariateNormal``'s does. As in
    :class:`~pyro_flows_ext.transforms.LowerAffine`, the learned part acts in the space
    whitened by ``p``.

    By the matrix determinant lemma and Woodbury's identity, with the ``(r, r)`` matrix
    ``K = I + U^T U``,

    .. math::

        \\log|\\det| = \\textstyle\\sum \\log p + \\sum \\log s + \\log\\det K, \\qquad
        M^{-1} w = w - U K^{-1} U^T w,

    so both directions cost two ``(D, r)`` products per draw and one ``r x r`` Cholesky per
    call; with ``cache_size=1`` the log-det of the last call is reused.

    Args:
        dim: ``D``.
        rank: ``r``.
        center: ``c``, shape ``(D,)`` (default 0).
        preconditioner: ``p``, shape ``(D,)``, positive (default ones).
        init_scale: initial ``s`` (everywhere).
        cache_size: 1 (default) keeps the last result so that the log-det is free.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = LowRankAffine(3, rank=1, center=torch.ones(3), init_scale=0.5)
        >>> t(torch.zeros(3)).tolist()  # the centre, whatever U
        [1.0, 1.0, 1.0]
        >>> with torch.no_grad():
        ...     _ = t.factor.fill_(0.3)
        >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
        >>> m = torch.eye(3) + t.factor @ t.factor.T
        >>> mvn = dist.MultivariateNormal(t.loc, 0.25 * m @ m)
        >>> x = torch.randn(4, 3)
        >>> bool(torch.allclose(q.log_prob(x), mvn.log_prob(x), atol=1e-5))
        True

    Reference: Ong, Nott & Smith (2018), Gaussian variational approximation with a factor
    covariance structure.
    """

    sign = +1  # its Jacobian determinant is positive

    center: Tensor
    preconditioner: Tensor
    precond_log_det: Tensor

    def __init__(
        self,
        dim: int,
        rank: int,
        center: Tensor | None = None,
        preconditioner: Tensor | None = None,
        init_scale: float = 1.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(event_dim=1, cache_size=cache_size)
        self.dim = positive_int("dim", dim)
        self.rank = positive_int("rank", rank)
        init_scale = positive_float("init_scale", init_scale)
        center = torch.zeros(dim) if center is None else center.detach().clone()
        precond = torch.ones(dim) if preconditioner is None else preconditioner.detach().clone()
        if center.shape != (dim,) or precond.shape != (dim,):
            raise ValueError(
                f"center and preconditioner must have shape ({dim},), "
                f"got {tuple(center.shape)} and {tuple(precond.shape)}"
            )
        if not (torch.isfinite(precond).all() and (precond > 0).all()):
            raise ValueError("preconditioner must be finite and positive")
        self.register_buffer("center", center)
        self.register_buffer("preconditioner", precond)
        self.register_buffer("precond_log_det", precond.log().sum())
        self.shift = nn.Parameter(torch.zeros(dim, dtype=center.dtype))
        self.log_diag = nn.Parameter(torch.full((dim,), float(init_scale)).log().to(center))
        # U = 0 is a stationary point of any loss (the map is quadratic in U): start near it
        factor = INIT_FACTOR / self.rank**0.5 * torch.randn(dim, self.rank)
        self.factor = nn.Parameter(factor.to(center))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.dim,), name)

    @property
    def loc(self) -> Tensor:
        """``c + p a``."""
        return self.center + self.preconditioner * self.shift

    def _capacitance(self) -> Tensor:
        """The Cholesky factor of ``K = I + U^T U``."""
        u = self.factor
        eye = torch.eye(self.rank, dtype=u.dtype, device=u.device)
        return torch.linalg.cholesky(eye + u.T @ u)

    def _log_det(self, x: Tensor, chol: Tensor) -> Tensor:
        ld = self.precond_log_det + self.log_diag.sum() + 2 * chol.diagonal().log().sum()
        return ld.expand(x.shape[:-1])

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.factor
        w = x + (x @ u) @ u.T
        y = self.center + self.preconditioner * (self.shift + self.log_diag.exp() * w)
        return y, self._log_det(x, self._capacitance())

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        u, chol = self.factor, self._capacitance()
        w = ((y - self.center) / self.preconditioner - self.shift) * (-self.log_diag).exp()
        rhs = (w @ u).reshape(-1, self.rank).T  # (r, N)
        coef = torch.cholesky_solve(rhs, chol).T.reshape(w.shape[:-1] + (self.rank,))
        return w - coef @ u.T, self._log_det(y, chol)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"
