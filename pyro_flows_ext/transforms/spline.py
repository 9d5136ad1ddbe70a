"""Rational-quadratic spline couplings (neural spline flows, Durkan et al. 2019).

On ``[-B, B]`` the elementwise map is a monotone rational-quadratic spline with ``K`` bins
whose widths, heights and interior knot derivatives come from the conditioner; outside it is
the identity (the boundary derivatives are fixed at 1, so the map is continuously
differentiable everywhere). Both directions are closed form: the inverse solves one
quadratic per element, so sampling and scoring cost one conditioner pass each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_flows_ext.checks import positive_float, positive_int
from pyro_flows_ext.transforms.maps import ElementwiseMap

__all__ = ["BINS", "BOUND", "SplineMap", "rational_quadratic_spline"]

MIN_BIN = 1e-3  # smallest bin width and height, as a fraction of the interval
MIN_DERIVATIVE = 1e-3
BINS = 8
"""The default number of bins (zuko's NSF uses 8 too): each bin costs three network outputs per
feature, and the README's digits and posteriordb figures were measured with 8."""
BOUND = 3.0
"""The default half-width of the spline's interval: the bulk of a standardised variable; the
map is the identity outside."""


def _knots(raw: Tensor, bound: float) -> Tensor:
    """Unnormalised bin sizes ``(..., K)`` to ``K + 1`` increasing knots from -B to B."""
    bins = raw.shape[-1]
    sizes = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(raw, dim=-1)
    knots = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) * (2 * bound) - bound
    # pin the ends exactly (the cumulative sum may miss 1 by rounding)
    return torch.cat([knots.new_full(knots.shape[:-1] + (1,), -bound), knots[..., 1:-1],
                      knots.new_full(knots.shape[:-1] + (1,), bound)], dim=-1)  # fmt: skip


def _derivatives(raw: Tensor) -> Tensor:
    """Unnormalised interior derivatives ``(..., K - 1)`` to ``K + 1`` positive knot slopes,
    1 at both ends (identity tails) and 1 for a zero input (identity at initialisation)."""
    shift = math.log(math.expm1(1 - MIN_DERIVATIVE))
    inner = MIN_DERIVATIVE + F.softplus(raw + shift)
    return F.pad(inner, (1, 1), value=1.0)


def _gather(t: Tensor, k: Tensor) -> Tensor:
    return t.gather(-1, k).squeeze(-1)


def rational_quadratic_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = BOUND,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply the monotone rational-quadratic spline (or its inverse) elementwise.

    Args:
        x: inputs of any shape ``S``; any real value (the map is the identity outside
            ``[-bound, bound]``).
        widths, heights: unnormalised bin sizes ``S + (K,)`` (a softmax, with a floor, makes
            them sum to the interval).
        derivatives: unnormalised interior knot derivatives ``S + (K - 1,)`` (a shifted
            softplus, so that zeros give derivative 1: with all three at zero the spline is
            the identity).
        bound: ``B``.
        inverse: apply the inverse map.

    Returns:
        ``(y, log|dy/dx|)``, both of shape ``S``; the log-derivative is that of the forward
        map at the pair, in both directions.

    Example:
        >>> x = torch.tensor([-5.0, -1.0, 0.5, 2.0])
        >>> w, d = torch.randn(4, 6), torch.randn(4, 5)
        >>> y, ld = rational_quadratic_spline(x, w, w.flip(-1), d)
        >>> x_back, _ = rational_quadratic_spline(y, w, w.flip(-1), d, inverse=True)
        >>> bool(torch.allclose(x_back, x, atol=1e-5)), y[0].item()  # identity tail
        (True, -5.0)
    """
    xs, ys = _knots(widths, bound), _knots(heights, bound)
    slopes = _derivatives(derivatives)
    inside = (x >= -bound) & (x <= bound)
    z = x.clamp(-bound, bound)  # finite values in the unused branch keep gradients finite
    edges = ys if inverse else xs
    k = torch.searchsorted(edges[..., 1:-1].contiguous(), z[..., None].contiguous(), right=True)
    x0, y0 = _gather(xs, k), _gather(ys, k)
    w, h = _gather(xs, k + 1) - x0, _gather(ys, k + 1) - y0
    d0, d1 = _gather(slopes, k), _gather(slopes, k + 1)
    s = h / w
    if inverse:
        dy = z - y0
        a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = h * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp_min(0.0))
        xi = (2 * c / (-b - root)).clamp(0.0, 1.0)
        out = x0 + xi * w
    else:
        xi = ((z - x0) / w).clamp(0.0, 1.0)
        out = y0 + h * (s * xi**2 + d0 * xi * (1 - xi)) / (s + (d1 + d0 - 2 * s) * xi * (1 - xi))
    both = xi * (1 - xi)
    denominator = s + (d1 + d0 - 2 * s) * both
    numerator = s**2 * (d1 * xi**2 + 2 * s * both + d0 * (1 - xi) ** 2)
    log_det = torch.log(numerator) - 2 * torch.log(denominator)
    return torch.where(inside, out, x), torch.where(inside, log_det, torch.zeros_like(log_det))


class SplineMap(ElementwiseMap):
    """The rational-quadratic spline map of neural spline flows: on ``[-bound, bound]`` a
    monotone spline with ``bins`` bins, the identity outside.

    Its parameters are ``3K - 1`` values per element (``K`` widths, ``K`` heights, ``K - 1``
    interior derivatives), in that order; all zero give the identity. The inverse is exact (one
    quadratic per element) and inputs anywhere on the real line are fine (identity tails with
    log-det 0).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_flows_ext.transforms import Coupling, density_network
        >>> t = Coupling(4, SplineMap(bins=6), density_network([16]))
        >>> base = dist.Normal(torch.zeros(4), 1).to_event(1)
        >>> dist.TransformedDistribution(base, [t]).log_prob(torch.randn(3, 4)).shape
        torch.Size([3])

    Reference: Durkan, Bekasov, Murray & Papamakarios (2019), Neural spline flows.
    """

    def __init__(self, bins: int = BINS, bound: float = BOUND) -> None:
        self.bins = positive_int("bins", bins)
        self.bound = positive_float("bound", bound)
        self.num_params = 3 * self.bins - 1

    def options(self) -> dict[str, Any]:
        return {"bins": self.bins, "bound": self.bound}

    def _spline(self, x: Tensor, params: Sequence[Tensor], inverse: bool) -> tuple[Tensor, Tensor]:
        theta = torch.stack(tuple(params), dim=-1)
        widths, heights, derivatives = theta.split([self.bins, self.bins, self.bins - 1], -1)
        return rational_quadratic_spline(x, widths, heights, derivatives, self.bound, inverse)

    def forward(self, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return self._spline(x, params, inverse=False)

    def inverse(self, y: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return self._spline(y, params, inverse=True)
