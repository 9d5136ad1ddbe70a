"""Laplace approximation of a log density on :math:`\\mathbb{R}^D`: mode and curvature.

Given an unnormalised log density :math:`\\ell(z)` (for a guide: the model's log joint in the
unconstrained space, Jacobians included), :func:`laplace_approximation` finds the mode

.. math:: \\hat z = \\arg\\max_z \\ell(z)

by L-BFGS with a strong-Wolfe line search followed by a few damped Newton steps (which make the
result independent of how badly the problem is scaled), and returns the Gaussian
:math:`\\mathcal N(\\hat z, H^{-1})` with :math:`H = -\\nabla^2 \\ell(\\hat z)` as a mean and a
lower-triangular factor :math:`L`, :math:`L L^\\top = H^{-1}`.

With ``curvature="differences"`` the search is L-BFGS alone and :math:`H` comes from central
differences of the gradient (``4 D`` gradients, the step set per coordinate from a first pass
to a fixed fraction of that coordinate's sd), never from second derivatives of the gradient:
the memory of one gradient, where autograd's Hessian keeps a graph of third derivatives (a
log density that is itself built from Hessian-vector products, as the hierarchical guide's
Laplace marginal, took 22 GB for radon's 386 counties that way).

When :math:`H` is not positive definite (a saddle, a flat direction, or a mode that does not
exist, as at the neck of a funnel), its eigenvalues are replaced by their absolute values,
floored at ``eig_floor`` times the largest one, and the result says so: a caller should then
compare the approximation with an alternative (the guide compares ELBOs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from pyro_flows_ext.checks import check_input, one_of, positive_float, positive_int

__all__ = [
    "LaplaceResult",
    "ModeSearch",
    "find_mode",
    "laplace_approximation",
    "precision_to_scale_tril",
]

LogDensity = Callable[[Tensor], Tensor]
CURVATURES = ("autograd", "differences")


@dataclass(frozen=True)
class LaplaceResult:
    """Outcome of :func:`laplace_approximation`.

    Attributes:
        loc: the mode :math:`\\hat z`, shape ``(D,)``.
        scale_tril: lower-triangular :math:`L` with :math:`L L^\\top = H^{-1}`, ``(D, D)``.
        log_density: :math:`\\ell(\\hat z)`.
        converged: the Newton decrement :math:`g^\\top H^{-1} g / 2` fell below the tolerance
            and :math:`H` was positive definite there.
        hessian_repaired: the eigenvalues of :math:`H` had to be repaired.
        num_evaluations: log-density evaluations used by the search.
    """

    loc: Tensor
    scale_tril: Tensor
    log_density: float
    converged: bool
    hessian_repaired: bool
    num_evaluations: int


def _value_and_grad(fn: LogDensity, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(value, gradient)``; the gradient is NaN where ``fn`` gave a constant (a failure)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(z)
        if not value.requires_grad:
            return value.detach(), torch.full_like(z, math.nan).detach()
        (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad.detach()


def _hessian(fn: LogDensity, z: Tensor) -> Tensor:
    with torch.enable_grad():
        h = torch.autograd.functional.hessian(fn, z.detach())
    assert isinstance(h, Tensor)
    return 0.5 * (h + h.T)


def _repair(precision: Tensor, eig_floor: float) -> tuple[Tensor, bool]:
    """``precision`` itself if it is positive definite, else its eigenvalues made positive."""
    _, info = torch.linalg.cholesky_ex(precision)
    if info.item() == 0:
        return precision, False
    evals, evecs = torch.linalg.eigh(precision)
    top = evals.abs().max().clamp_min(torch.finfo(evals.dtype).tiny)
    evals = evals.abs().clamp_min(eig_floor * top)
    return (evecs * evals) @ evecs.T, True


def precision_to_scale_tril(precision: Tensor) -> Tensor:
    """Lower-triangular :math:`L` with :math:`L L^\\top = P^{-1}` for a positive definite
    precision :math:`P`, without forming the inverse.

    With the reversal permutation :math:`J`, :math:`J P J = R R^\\top` (Cholesky) gives
    :math:`P^{-1} = (J R^{-\\top} J)(J R^{-\\top} J)^\\top`, and :math:`J R^{-\\top} J` is lower
    triangular.

    Example:
        >>> import torch
        >>> p = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> L = precision_to_scale_tril(p)
        >>> torch.allclose(L @ L.T, torch.linalg.inv(p))
        True
    """
    flipped = precision.flip(-1, -2)
    r = torch.linalg.cholesky(flipped)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    r_inv_t = torch.linalg.solve_triangular(r, eye, upper=False).T  # R^{-T}, upper
    return r_inv_t.flip(-1, -2)


@dataclass(frozen=True)
class ModeSearch:
    """Options of the mode search of :func:`laplace_approximation` (validated on creation).

    Attributes:
        max_iter: L-BFGS iterations at most.
        newton_steps: damped Newton steps at most after L-BFGS (each takes a Hessian, i.e.
            ``D`` backward passes).
        tol: tolerance on the Newton decrement, relative to ``max(1, |log density|)``;
            floored at ten times the machine epsilon of the point's dtype (``1.2e-6`` in
            float32), below which the decrement is roundoff.
        eig_floor: smallest eigenvalue of a repaired :math:`H`, relative to the largest.
        curvature: ``"autograd"`` (Newton steps with autograd Hessians) or ``"differences"``
            (no Newton steps; :math:`H` from differences of the gradient).

    Example:
        >>> ModeSearch(newton_steps=5).max_iter
        500
    """

    max_iter: int = 500
    newton_steps: int = 20
    tol: float = 1e-9
    eig_floor: float = 1e-10
    curvature: str = "autograd"

    def __post_init__(self) -> None:
        one_of("curvature", self.curvature, CURVATURES)
        positive_int("max_iter", self.max_iter)
        positive_int("newton_steps", self.newton_steps, minimum=0)
        positive_float("tol", self.tol)
        positive_float("eig_floor", self.eig_floor)

    @classmethod
    def options(cls, name: str, options: Any) -> dict[str, Any]:
        """``options`` (a dict of keyword arguments of :func:`laplace_approximation`, or
        ``None``) as a dict, checked: ``TypeError``/``ValueError`` naming ``name``."""
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise TypeError(f"{name} must be a dict or None, got {type(options).__name__}")
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            known = [f.name for f in fields(cls)]
            raise ValueError(f"{name} has unknown keys {unknown}; known: {known}")
        cls(**options)
        return dict(options)


def _lbfgs(
    log_density: LogDensity, best: Tensor, best_value: Tensor, search: ModeSearch
) -> tuple[Tensor, Tensor, int]:
    """L-BFGS (strong Wolfe) in chunks of 50 iterations from ``best``, keeping the last point
    where value and gradient were finite: ``(point, value, evaluations)``."""
    count = 0
    z = best.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=50,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
    )

    def closure() -> Tensor:
        nonlocal count
        count += 1
        opt.zero_grad()
        with torch.enable_grad():
            loss = -log_density(z)
            if not torch.isfinite(loss):
                return loss.detach().new_tensor(math.inf)
            loss.backward()
        return loss.detach()

    for _ in range(max(1, search.max_iter // 50)):
        opt.step(closure)
        value, grad = _value_and_grad(log_density, z)
        count += 1
        if not (torch.isfinite(value) and torch.isfinite(grad).all()):
            break
        improved = value > best_value
        if improved:
            best, best_value = z.detach().clone(), value
        if not improved or grad.abs().max() < search.tol:
            break
    return best, best_value, count


def _differences(log_density: LogDensity, z: Tensor) -> Tensor:
    """:math:`\\nabla^2 \\ell(z)` by central differences of the gradient, in two passes: the
    second with each coordinate's step a fixed fraction (``eps ** (1/3)`` times ten, 0.05 in
    float32) of the sd the first pass reads off the diagonal."""
    rel = 10 * torch.finfo(z.dtype).eps ** (1 / 3)
    step = torch.full_like(z, 1e-2)
    hessian = torch.zeros(z.shape * 2, dtype=z.dtype, device=z.device)
    for _ in range(2):
        cols = []
        for j in range(z.shape[0]):
            e = torch.zeros_like(z)
            e[j] = step[j]
            _, up = _value_and_grad(log_density, z + e)
            _, down = _value_and_grad(log_density, z - e)
            cols.append((up - down) / (2 * step[j]))
        hessian = torch.stack(cols, dim=-1)
        hessian = 0.5 * (hessian + hessian.T)
        curv = -hessian.diagonal()
        step = torch.where(curv > 0, rel / curv.clamp_min(1e-30).sqrt(), step)
    return hessian


def _newton(
    log_density: LogDensity, best: Tensor, best_value: Tensor, search: ModeSearch
) -> tuple[Tensor, Tensor | None, bool, int]:
    """Damped Newton with a repaired Hessian from ``best`` (robust to bad scaling, quadratic at
    the end): ``(point, precision there or None, converged, evaluations)``."""
    count = 0
    precision: Tensor | None = None
    # a decrement below a few units of roundoff of the log density cannot be resolved
    tol = max(search.tol, 10 * torch.finfo(best.dtype).eps)
    for _ in range(search.newton_steps + 1):
        value, grad = _value_and_grad(log_density, best)
        precision = -_hessian(log_density, best)
        count += 2
        if not torch.isfinite(precision).all():
            return best, None, False, count
        repaired, was_repaired = _repair(precision, search.eig_floor)
        step = torch.linalg.solve(repaired, grad)
        decrement = float(grad @ step) / 2
        if not was_repaired and decrement < tol * max(1.0, abs(float(value))):
            return best, precision, True, count
        for t in (0.5**i for i in range(30)):
            candidate = best + t * step
            cand_value, _ = _value_and_grad(log_density, candidate)
            count += 1
            if torch.isfinite(cand_value) and cand_value >= best_value:
                best, best_value = candidate, cand_value
                break
        else:
            break
    return best, precision, False, count


def find_mode(
    log_density: LogDensity, init: Tensor, search: ModeSearch | None = None
) -> tuple[Tensor, Tensor | None, bool, int]:
    """Maximise ``log_density`` from ``init``: L-BFGS (strong Wolfe) then damped Newton.

    Returns ``(mode, precision at the mode or None, converged, evaluations)``; the precision
    is :math:`-\\nabla^2 \\ell` (unrepaired). Non-finite values stop the search at the last
    finite point.
    """
    search = search or ModeSearch()
    best = init.detach().clone()
    best_value, grad = _value_and_grad(log_density, best)
    if not torch.isfinite(best_value) or not torch.isfinite(grad).all():
        raise ValueError(
            f"the log density is not finite at the initial point (value {best_value.item()}); "
            "choose another init_loc_fn"
        )
    best, best_value, count = _lbfgs(log_density, best, best_value, search)
    if search.curvature == "differences":
        measured = -_differences(log_density, best)
        _, grad = _value_and_grad(log_density, best)
        repaired, _ = _repair(measured, search.eig_floor)
        decrement = float(grad @ torch.linalg.solve(repaired, grad)) / 2
        tol = max(search.tol, 10 * torch.finfo(best.dtype).eps) * max(1.0, abs(float(best_value)))
        converged = bool(torch.isfinite(measured).all()) and decrement < tol
        return best, measured, converged, 2 + count + 4 * best.shape[0]
    mode, precision, converged, newton_count = _newton(log_density, best, best_value, search)
    return mode, precision, converged, 1 + count + newton_count


def laplace_approximation(log_density: LogDensity, init: Tensor, **options: Any) -> LaplaceResult:
    """Gaussian approximation :math:`\\mathcal N(\\hat z, H^{-1})` at the mode of
    ``log_density``.

    Args:
        log_density: maps a vector ``(D,)`` to a scalar tensor, differentiable twice.
        init: starting point ``(D,)``; its dtype and device are used throughout (use float64
            for badly conditioned problems: a float32 search stops at float32's resolution;
            :func:`~pyro_flows_ext.infer.vector.start.gaussian_start` searches in float64).
        options: options of the mode search: ``max_iter``, ``newton_steps``, ``tol``,
            ``eig_floor``, ``curvature`` (see :class:`ModeSearch`).

    Example:
        >>> import torch
        >>> cov = torch.tensor([[4.0, 1.9], [1.9, 1.0]], dtype=torch.float64)
        >>> g = torch.distributions.MultivariateNormal(torch.tensor([3.0, -1.0]).double(), cov)
        >>> res = laplace_approximation(g.log_prob, torch.zeros(2, dtype=torch.float64))
        >>> res.converged, torch.allclose(res.scale_tril @ res.scale_tril.T, cov)
        (True, True)
    """
    if not callable(log_density):
        raise TypeError(f"log_density must be callable, got {type(log_density).__name__}")
    check_input(init, (None,), "init")
    if init.dim() != 1:
        raise ValueError(f"init must have shape (D,), got {tuple(init.shape)}")
    search = ModeSearch(**ModeSearch.options("options", options))
    mode, precision, converged, count = find_mode(log_density, init, search)
    if precision is None:
        raise ValueError("the Hessian of the log density is not finite at the mode found")
    # repair and factorise in float64: the precision of badly scaled problems spans many
    # orders of magnitude
    repaired, was_repaired = _repair(precision.double(), search.eig_floor)
    scale_tril = precision_to_scale_tril(repaired).to(precision.dtype)
    value, _ = _value_and_grad(log_density, mode)
    return LaplaceResult(
        loc=mode.detach(),
        scale_tril=scale_tril.detach(),
        log_density=float(value),
        converged=converged and not was_repaired,
        hessian_repaired=was_repaired,
        num_evaluations=count + 1,
    )
