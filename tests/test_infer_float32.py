"""Float32 guides start as well as float64 ones: the start is computed in float64."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext.infer import AutoCouplingFlow, laplace_approximation
from pyro_flows_ext.infer.traces import PromoteToFloat64
from pyro_flows_ext.infer.vector.start import LogJoint

SEEDS = range(4)


def badly_scaled_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Like posteriordb's sblri: predictors of size ~200, coefficients pinned near 1 with
    posterior sd ~5e-4; float32-rounded, so that both dtypes see the same numbers."""
    gen = torch.Generator().manual_seed(0)
    x = 200 * torch.randn(100, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.ones(5, dtype=torch.float64) + torch.randn(100, generator=gen).double()
    return x.float().to(dtype), y.float().to(dtype)


def blr(x: torch.Tensor, y: torch.Tensor) -> None:
    zero = y.new_zeros(())
    beta = pyro.sample("beta", dist.Normal(zero, 10.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 10.0))
    pyro.sample("y", dist.Normal(beta @ x.T, sigma[..., None]).to_event(1), obs=y)


def start(dtype: torch.dtype, seed: int) -> AutoCouplingFlow:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return AutoCouplingFlow(blr).initialize(*badly_scaled_data(dtype))


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_laplace_start_matches_float64(seed: int) -> None:
    g32, g64 = start(torch.float32, seed), start(torch.float64, seed)
    assert g32.init_info["method"] == "laplace", g32.init_info.get("reason")
    assert g32.init_info["dtype"] == "float64" and g64.init_info["method"] == "laplace"
    a32, a64 = g32.affine, g64.affine
    sd = a64.scale_tril.detach().diagonal()
    assert a32.loc.dtype == torch.float32
    assert float(sd[:5].max()) < 1e-3  # the coefficients really are pinned
    assert torch.allclose(a32.loc.double(), a64.loc, rtol=0, atol=1e-2 * float(sd.min()))
    assert torch.allclose(a32.scale_tril.double(), a64.scale_tril, rtol=1e-3, atol=1e-8)


def test_native_float32_mode_search_converges_at_float32_resolution() -> None:
    # without the float64 evaluation the search must still stop (tolerance floored at eps)
    guide = start(torch.float32, 2)
    args = badly_scaled_data(torch.float32)
    log_joint = LogJoint(guide, blr, args, {})
    result = laplace_approximation(log_joint, guide.affine.loc.detach().clone())
    assert result.converged and result.loc.dtype == torch.float32
    assert torch.allclose(result.loc, guide.affine.loc, rtol=0, atol=1e-5)


def test_promotion_mode_computes_in_float64() -> None:
    data = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    latent = torch.tensor([1.0, 1e-8], dtype=torch.float64, requires_grad=True)
    with PromoteToFloat64():
        out = (latent @ data.T).float() + data.new_zeros(())
        data.mul_(1.0)  # in-place on a constant stays float32
    assert out.dtype == torch.float64 and data.dtype == torch.float32
    assert float(out[0].detach() - 1.0) == pytest.approx(2e-8, rel=1e-6)


def test_a_model_whose_float64_evaluation_differs_starts_in_its_own_dtype() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        shift = 0.0 if x.dtype == torch.float32 else 5.0  # a dtype-dependent model
        pyro.factor("f", -((x - shift) ** 2))

    guide = AutoCouplingFlow(model).initialize()
    assert guide.init_info["dtype"].startswith("torch.float32 (float64 log density")
    assert guide.init_info["method"] == "laplace"
    assert abs(float(guide.median()["x"])) < 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_sblri_float32_start_matches_float64(seed: int) -> None:
    models = pytest.importorskip("benchmarks.posteriors.models")
    try:
        models.posteriordb_root()
    except FileNotFoundError:
        pytest.skip("../shared/posteriordb is not available")
    guides = {}
    for dtype in (torch.float32, torch.float64):
        posterior = models.load("sblri-blr", dtype=dtype)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guides[dtype] = AutoCouplingFlow(posterior.model).initialize()
    g32, g64 = guides[torch.float32], guides[torch.float64]
    assert g32.init_info["method"] == "laplace", g32.init_info.get("reason")
    sd = g64.affine.scale_tril.detach().diagonal()
    # the float32 data are the float64 data rounded: the modes differ by far less than a sd
    assert ((g32.affine.loc.double() - g64.affine.loc).abs() / sd).max() < 0.05
    assert torch.allclose(g32.affine.scale_tril.double(), g64.affine.scale_tril, rtol=2e-2)
