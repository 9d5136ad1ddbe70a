"""dtype follows the user: every exported factory and builder creates its parameters and
buffers in ``torch.get_default_dtype()``, runs both directions in it, and converts with
``.double()``/``.float()``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import pyro_flows_ext as pfe
from pyro_flows_ext import transforms as T

VEC = 4
IMG = (2, 4, 4)

# every lower_snake factory of pyro_flows_ext.transforms and every builder, on vectors and
# images where it takes both: name -> (build, event shape)
FACTORIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "affine_coupling-vec": (lambda: T.affine_coupling(VEC, [8]), (VEC,)),
    "affine_coupling-img": (lambda: T.affine_coupling(IMG, hidden_channels=4), IMG),
    "additive_coupling-vec": (lambda: T.additive_coupling(VEC, [8]), (VEC,)),
    "additive_coupling-img": (lambda: T.additive_coupling(IMG, hidden_channels=4), IMG),
    "conditional_affine_coupling-vec": (
        lambda: T.conditional_affine_coupling(VEC, 3, [8]),
        (VEC,),
    ),
    "conditional_affine_coupling-img": (
        lambda: T.conditional_affine_coupling(IMG, 3, hidden_channels=4),
        IMG,
    ),
    "spline_coupling-vec": (lambda: T.spline_coupling(VEC, [8]), (VEC,)),
    "spline_coupling-img": (lambda: T.spline_coupling(IMG, hidden_channels=4), IMG),
    "conditional_spline_coupling-vec": (
        lambda: T.conditional_spline_coupling(VEC, 3, [8]),
        (VEC,),
    ),
    "conditional_spline_coupling-img": (
        lambda: T.conditional_spline_coupling(IMG, 3, hidden_channels=4),
        IMG,
    ),
    "actnorm-vec": (lambda: T.actnorm(VEC), (VEC,)),
    "actnorm-img": (lambda: T.actnorm(IMG), IMG),
    "invertible_linear": (lambda: T.invertible_linear(VEC), (VEC,)),
    "invertible_linear-plain": (lambda: T.invertible_linear(VEC, lu=False), (VEC,)),
    "invertible_conv1x1": (lambda: T.invertible_conv1x1(IMG), IMG),
    "LowerAffine": (lambda: T.LowerAffine(VEC, init_scale=0.5), (VEC,)),
    "LowRankAffine": (lambda: T.LowRankAffine(VEC, 2, init_scale=0.5), (VEC,)),
    "ConditionalShift": (lambda: T.ConditionalShift(VEC, 3), (VEC,)),
    "split_prior": (lambda: T.split_prior(IMG), IMG),
    "top_prior-vec": (lambda: T.top_prior(VEC), (VEC,)),
    "top_prior-img": (lambda: T.top_prior(IMG), IMG),
    "glow_step-vec": (lambda: T.glow_step(VEC, hidden_dims=[8]), (VEC,)),
    "glow_step-img": (lambda: T.glow_step(IMG, hidden_channels=4), IMG),
    "glow-vec": (lambda: pfe.glow(VEC, depth=2, hidden_dims=[8]), (VEC,)),
    "glow-img": (lambda: pfe.glow((1, 8, 8), depth=2, hidden_channels=4), (1, 8, 8)),
    "realnvp-vec": (lambda: pfe.realnvp(VEC, depth=2, hidden_dims=[8]), (VEC,)),
    "glow-img-spline": (
        lambda: pfe.glow((1, 8, 8), depth=1, hidden_channels=4, coupling="spline"),
        (1, 8, 8),
    ),
    "realnvp-img": (lambda: pfe.realnvp((1, 8, 8), depth=1, hidden_channels=4), (1, 8, 8)),
}


def _floating_tensors(module: nn.Module) -> list[torch.Tensor]:
    tensors = list(module.parameters()) + list(module.buffers())
    return [t for t in tensors if t.is_floating_point()]


def _round_trip(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Both directions in ``dtype``: the log-density (inverse) and a sample (forward)."""
    torch.manual_seed(0)
    x = torch.randn(3, *shape, dtype=dtype)
    if isinstance(module, pfe.Flow):
        log_p = module.log_prob(x)
        assert log_p.dtype == dtype and torch.isfinite(log_p).all()
        assert module.sample((2,)).dtype == dtype
        return
    t = module.condition(torch.ones(3, dtype=dtype)) if hasattr(module, "condition") else module
    z = t.inv(x)
    back = t(z + 0)  # a new tensor object: computed, not served from the cache
    assert z.dtype == back.dtype == t.log_abs_det_jacobian(z, x).dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(back, x, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_built_in_the_default_dtype_and_runs_both_directions(name, default_dtype):
    build, shape = FACTORIES[name]
    module = build()
    tensors = _floating_tensors(module)
    assert tensors, "nothing to check"
    assert {t.dtype for t in tensors} == {default_dtype}
    _round_trip(module, shape, default_dtype)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_converts_with_double_and_float(name):
    build, shape = FACTORIES[name]
    module = build().double()
    assert {t.dtype for t in _floating_tensors(module)} == {torch.float64}
    _round_trip(module, shape, torch.float64)
    module = module.float()
    assert {t.dtype for t in _floating_tensors(module)} == {torch.float32}
    _round_trip(module, shape, torch.float32)


def test_image_glow_under_float64_default(default_dtype):
    """The reported failure: ``glow((1, 8, 8)).log_prob`` after
    ``torch.set_default_dtype(torch.float64)`` mixed float32 LU factors into float64."""
    flow = pfe.glow((1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    assert flow.log_prob(x).dtype == default_dtype
