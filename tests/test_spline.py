"""Family tests of the rational-quadratic spline couplings: identity at initialisation, exact
inverse and log-det anywhere on the real line (tails, bin edges, +-1e4), float32 and float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_flows_ext.transforms import (
    Coupling,
    SplineMap,
    rational_quadratic_spline,
    spline_coupling,
)

DTYPES = {"float32": (torch.float32, 1e-4), "float64": (torch.float64, 1e-10)}
SHAPES = {"vector": 6, "image": (2, 4, 4)}


def _random_spline(shape, dtype: torch.dtype, seed: int = 0, **kwargs) -> Coupling:
    torch.manual_seed(seed)
    hidden = {"hidden_dims": [16]} if isinstance(shape, int) else {"hidden_channels": 4}
    t = spline_coupling(shape, **hidden, **kwargs).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return t


def _hard_inputs(shape, dtype: torch.dtype, bound: float = 3.0) -> torch.Tensor:
    """Normal draws mixed with +-1e4, +-bound exactly, zero and inputs just inside/outside."""
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(8, *event, dtype=dtype) * 2
    flat = x.reshape(8, -1)
    specials = torch.tensor([1e4, -1e4, bound, -bound, 0.0, bound * (1 - 1e-7), -bound - 1e-3])
    n = flat.shape[1]
    flat[0] = specials.repeat(n // len(specials) + 1)[:n].to(dtype)
    flat[1] = 1e4  # every input in the upper tail
    flat[2] = -1e4
    return flat.reshape(x.shape)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_identity_at_initialisation(shape, dtype_name):
    dtype, tol = DTYPES[dtype_name]
    t = spline_coupling(shape, hidden_dims=[8] if isinstance(shape, int) else None).to(dtype)
    x = _hard_inputs(shape, dtype)
    torch.testing.assert_close(t(x), x, atol=tol, rtol=tol)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, t(x)), torch.zeros(8, dtype=dtype),
                               atol=tol, rtol=0)  # fmt: skip


def _transformed_positions(t: Coupling, x: torch.Tensor) -> torch.Tensor:
    """A boolean tensor like ``x``: True where the coupling transforms (not conditions)."""
    zeros = torch.zeros_like(x)
    a, b = t.partition.split(zeros)
    return t.partition.merge(zeros, a, torch.ones_like(b)).bool()


MASKS = {"half": 6, "alternating": 6, "channel": (2, 4, 4), "checkerboard": (2, 4, 4)}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_exact_inverse_and_log_det_at_hard_inputs(mask, dtype_name):
    """+-1e4, +-B exactly and values next to it in the transformed part; the conditioner
    sees moderate values (an extreme conditioner input makes any coupling ill-conditioned)."""
    dtype, tol = DTYPES[dtype_name]
    shape = MASKS[mask]
    t = _random_spline(shape, dtype, mask=mask)
    moderate = torch.randn(8, *((shape,) if isinstance(shape, int) else shape), dtype=dtype)
    x = torch.where(_transformed_positions(t, moderate), _hard_inputs(shape, dtype), moderate)
    y = t(x)
    assert torch.isfinite(y).all()
    x_back = t.inv(y.clone())  # a new tensor: the inverse is computed, not cached
    torch.testing.assert_close(x_back, x, atol=tol * 10, rtol=tol)
    ld_forward = t.log_abs_det_jacobian(x, y)
    ld_inverse = t.log_abs_det_jacobian(x_back, y.clone())  # recomputed from x_back
    torch.testing.assert_close(ld_forward, ld_inverse, atol=tol * 10, rtol=tol)
    assert torch.equal(y[1:3], x[1:3]), "the tails must be the identity"


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_no_failure_when_every_input_is_extreme(mask, dtype_name):
    """+-1e4 everywhere, the conditioner's inputs too (nflows #23/#25): finite both ways,
    every element of the tail rows exactly the identity with log-det 0."""
    dtype, _ = DTYPES[dtype_name]
    shape = MASKS[mask]
    t = _random_spline(shape, dtype, mask=mask)
    x = _hard_inputs(shape, dtype)
    y, z = t(x), t.inv(x)
    ld = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert torch.equal(y[1:3], x[1:3]) and torch.equal(z[1:3], x[1:3])
    assert torch.equal(ld[1:3], torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("point", ["inside", "knots", "tails"])
def test_log_det_against_autograd(point):
    t = _random_spline(4, torch.float64, bins=5, bound=2.0)
    x = {
        "inside": torch.tensor([0.3, -1.2, 1.9, -0.01]),
        "knots": torch.tensor([-2.0, 2.0, 0.0, 1e-12]),
        "tails": torch.tensor([-1e4, 1e4, 2.5, -7.0]),
    }[point].double()
    jac = torch.autograd.functional.jacobian(lambda v: t(v), x)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, t(x)), torch.linalg.slogdet(jac)[1])


def test_spline_on_its_knots_round_trips_exactly_enough():
    """Inputs exactly on every knot (where ``searchsorted`` changes bin) invert correctly."""
    torch.manual_seed(1)
    widths, heights, derivs = torch.randn(3, 1, 7, dtype=torch.float64).unbind(0)
    derivs = derivs[..., :6]
    from pyro_flows_ext.transforms.spline import _knots

    knots = _knots(widths, 3.0).reshape(-1)  # all 8 knots, both ends included
    y, ld = rational_quadratic_spline(knots, widths.expand(8, 7), heights.expand(8, 7),
                                      derivs.expand(8, 6))  # fmt: skip
    torch.testing.assert_close(y, _knots(heights, 3.0).reshape(-1))  # knots map to knots
    x, _ = rational_quadratic_spline(y, widths.expand(8, 7), heights.expand(8, 7),
                                     derivs.expand(8, 6), inverse=True)  # fmt: skip
    torch.testing.assert_close(x, knots)
    assert torch.isfinite(ld).all()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_gradients_are_finite_everywhere(dtype_name):
    dtype, _ = DTYPES[dtype_name]
    t = _random_spline(6, dtype)
    moderate = torch.randn(8, 6, dtype=dtype)
    hard = torch.where(_transformed_positions(t, moderate), _hard_inputs(6, dtype), moderate)
    x = hard.requires_grad_(True)
    z = t.inv(x)
    loss = z.pow(2).sum() - t.log_abs_det_jacobian(z, x).sum()
    loss.backward()
    grads = [p.grad for p in t.parameters()] + [x.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bins": 0}, ValueError, "bins"),
        ({"bins": 2.5}, TypeError, "bins"),
        ({"bound": -1.0}, ValueError, "bound"),
        ({"bound": float("inf")}, ValueError, "bound"),
        ({"mask": "checkerboard"}, ValueError, "mask"),
    ],
    ids=["bins-zero", "bins-float", "bound-negative", "bound-inf", "image-mask"],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        spline_coupling(4, **kwargs)


def test_is_a_coupling_module_with_a_swappable_network():
    net = nn.Linear(2, 2 * (3 * 4 - 1))
    t = Coupling(4, SplineMap(bins=4), net)
    assert t(torch.randn(3, 4)).shape == (3, 4)
