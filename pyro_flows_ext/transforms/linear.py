"""Parameter-light linear bijections of vectors: a preconditioned lower-triangular affine map
(the Gaussian end of a flow guide, :class:`LowerAffine`) and a fixed permutation that mixes
the features between couplings (:class:`PermuteTransform`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_flows_ext.checks import check_input, positive_float, positive_int
from pyro_flows_ext.transforms._base import CachedTransformModule, permutation_sign

__all__ = ["LowerAffine", "PermuteTransform", "half_swapping_permutation"]


def half_swapping_permutation(dim: int, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation that moves the second half of ``D`` features (the part a ``half``
    coupling transforms) to the front, where the next coupling conditions on it, and the first
    half to the back (one of its features stays in front when ``D`` is odd).

    Between couplings with the same split this makes every feature transformed at least every
    other layer, as RealNVP's alternating masks do, while still shuffling the features; a
    uniformly random permutation can hand the same half to two couplings in a row.

    Example:
        >>> p = half_swapping_permutation(5)
        >>> sorted(p[:3].tolist()) in ([0, 3, 4], [1, 3, 4], [2, 3, 4])
        True
    """
    first = (dim + 1) // 2  # the half the coupling leaves unchanged (parity 0)
    kept = torch.randperm(first, generator=generator)
    moved = first + torch.randperm(dim - first, generator=generator)
    extra = kept[: first - (dim - first)]
    return torch.cat([moved, extra, kept[len(extra) :]])


class LowerAffine(CachedTransformModule):
    """``x = c + P (a + B z)``: a learnable lower-triangular affine map behind a fixed one.

    ``c`` (``center``) and the lower-triangular ``P`` (``preconditioner``) are fixed buffers;
    ``a`` (``shift``) and ``B = diag(exp(log_diag)) + r * strictly_lower(off_diag)`` are
    learned, where the fixed ``r`` (``off_diag_scale``) makes the off-diagonal learn at ``r``
    times the step size.
    The map is ``loc + L z`` with ``loc = c + P a`` and lower-triangular ``L = P B``
    (:attr:`loc`, :attr:`scale_tril`). Learning ``a, B`` in the space whitened by ``P`` makes
    Adam's steps the same size in every direction, however badly the target is scaled: a guide
    sets ``c, P`` from a Laplace approximation and starts at ``a = 0, B = I``.

    ``log|det| = sum(log diag P) + sum(log_diag)``, a constant, so sampling costs two
    matrix-vector products per draw (``B`` then ``P``; ``L = P B`` is never formed) and scoring
    two triangular solves; with ``cache_size=1`` the log-det of the last call is reused. The
    ``(D, D)`` parameters limit it to moderate ``D`` (a full-rank Gaussian, as in
    ``AutoMultivariateNormal``); :class:`~pyro_flows_ext.transforms.LowRankAffine` is the
    ``O(D r)`` alternative.

    Args:
        dim: ``D``.
        center: ``c``, shape ``(D,)`` (default 0).
        preconditioner: ``P``, lower triangular with a positive diagonal (default ``I``).
        init_scale: initial ``B = init_scale * I``.
        off_diag_scale: ``r``; a guide passes its start's scale (``init_scale``), so that one
            Adam step (about the step size in every entry of ``off_diag``, whatever the
            gradient) changes ``B`` by the same relative amount at any scale. With ``B`` at
            ``0.1 I`` and ``r = 1``, the first steps of ``5e-2`` in the ~5,000 off-diagonal
            entries of a ``D = 102`` map made ``B``'s condition number ``1e15`` within five
            steps; the inverse then lost every digit in float32 and the loss went to NaN.
        cache_size: 1 (default) keeps the last result so that the log-det is free.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = LowerAffine(2, center=torch.ones(2), init_scale=0.5)
        >>> t(torch.zeros(3, 2))[0].tolist(), t.scale_tril.diagonal().tolist()
        ([1.0, 1.0], [0.5, 0.5])
        >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
        >>> mvn = dist.MultivariateNormal(t.loc, scale_tril=t.scale_tril)
        >>> x = torch.randn(4, 2)
        >>> bool(torch.allclose(q.log_prob(x), mvn.log_prob(x)))
        True

    Reference: Kucukelbir et al. (2017), ADVI (full-rank Gaussian in the unconstrained space).
    """

    sign = +1  # its Jacobian determinant is positive

    center: Tensor
    preconditioner: Tensor
    precond_log_det: Tensor
    strict_mask: Tensor
    off_diag_scale: Tensor

    def __init__(
        self,
        dim: int,
        center: Tensor | None = None,
        preconditioner: Tensor | None = None,
        init_scale: float = 1.0,
        cache_size: int = 1,
        off_diag_scale: float = 1.0,
    ) -> None:
        super().__init__(event_dim=1, cache_size=cache_size)
        self.dim = positive_int("dim", dim)
        init_scale = positive_float("init_scale", init_scale)
        off_diag_scale = positive_float("off_diag_scale", off_diag_scale)
        center = torch.zeros(dim) if center is None else center.detach().clone()
        precond = torch.eye(dim) if preconditioner is None else preconditioner.detach().clone()
        if center.shape != (dim,) or precond.shape != (dim, dim):
            raise ValueError(
                f"center must have shape ({dim},) and preconditioner ({dim}, {dim}), "
                f"got {tuple(center.shape)} and {tuple(precond.shape)}"
            )
        diag = precond.diagonal()
        if not (torch.isfinite(precond).all() and (diag > 0).all()):
            raise ValueError("preconditioner must be finite with a positive diagonal")
        self.register_buffer("center", center)
        self.register_buffer("preconditioner", torch.tril(precond))
        self.register_buffer("precond_log_det", diag.log().sum())
        self.register_buffer("strict_mask", torch.tril(torch.ones(dim, dim), -1))
        self.register_buffer("off_diag_scale", torch.tensor(off_diag_scale))
        self.shift = nn.Parameter(torch.zeros(dim, dtype=center.dtype))
        self.log_diag = nn.Parameter(torch.full((dim,), float(init_scale)).log().to(center))
        self.off_diag = nn.Parameter(torch.zeros(dim, dim, dtype=center.dtype))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.dim,), name)

    def _inner(self) -> Tensor:
        off = self.off_diag * (self.strict_mask * self.off_diag_scale)
        return off + torch.diag(self.log_diag.exp())

    @property
    def loc(self) -> Tensor:
        """``c + P a``."""
        return self.center + self.preconditioner @ self.shift

    @property
    def scale_tril(self) -> Tensor:
        """``L = P B``."""
        return self.preconditioner @ self._inner()

    def _log_det(self, x: Tensor) -> Tensor:
        ld = self.precond_log_det + self.log_diag.sum()
        return ld.expand(x.shape[:-1])

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # (a + B z) then P: two matrix-vector products per row, never the D^3 product P B
        w = self.shift + x @ self._inner().T
        return self.center + w @ self.preconditioner.T, self._log_det(x)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # z = B^{-1} (P^{-1} (y - c) - a): two right-sided triangular solves (z^T = r^T L^{-T})
        rhs = (y - self.center).reshape(-1, self.dim)
        w = torch.linalg.solve_triangular(self.preconditioner.T, rhs, upper=True, left=False)
        z = torch.linalg.solve_triangular(self._inner().T, w - self.shift, upper=True, left=False)
        return z.reshape(y.shape), self._log_det(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class PermuteTransform(CachedTransformModule):
    """A fixed permutation of the features, ``y = x[..., perm]`` (``log|det| = 0``); the
    permutation and its inverse are buffers, so they follow ``.to(device)`` and ``state_dict``.
    Between couplings with a ``half`` split it plays the part of RealNVP's alternating masks
    while also shuffling the features (Pyro's ``Permute`` without a learned part).

    Args:
        dim: ``D``.
        perm: the permutation (default: :func:`half_swapping_permutation`).
        cache_size: 1 (default) keeps the last result.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = PermuteTransform(3, perm=torch.tensor([2, 0, 1]))
        >>> t(torch.tensor([10.0, 20.0, 30.0])).tolist()
        [30.0, 10.0, 20.0]
        >>> base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> dist.TransformedDistribution(base, [t]).sample((5,)).shape
        torch.Size([5, 3])

    Reference: Dinh, Sohl-Dickstein & Bengio (2017), RealNVP (alternating the coupled halves).
    """

    perm: Tensor
    inv_perm: Tensor

    def __init__(self, dim: int, perm: Tensor | None = None, cache_size: int = 1) -> None:
        super().__init__(event_dim=1, cache_size=cache_size)
        self.dim = positive_int("dim", dim)
        if perm is not None and not isinstance(perm, Tensor):
            raise TypeError(f"perm must be a tensor of indices, got {type(perm).__name__}")
        perm = half_swapping_permutation(dim) if perm is None else perm.long()
        if sorted(perm.tolist()) != list(range(dim)):
            raise ValueError(f"perm must be a permutation of 0..{dim - 1}, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, (self.dim,), name)

    @property
    def sign(self) -> int:
        """The sign of the permutation (the determinant of its matrix)."""
        return permutation_sign(self.perm)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self.perm], x.new_zeros(x.shape[:-1])

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[..., self.inv_perm], y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
