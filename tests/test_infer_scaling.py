"""``AutoCouplingFlow`` at large ``D``: capped conditioner widths, the low-rank final layer
(:class:`~pyro_flows_ext.transforms.LowRankAffine`) and no Laplace start above
``FULL_RANK_MAX_DIM``; the full-rank layer's cheaper passes."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flows_ext.infer import AutoCouplingFlow
from pyro_flows_ext.infer.vector.steps import (
    FULL_RANK_MAX_DIM,
    MAX_WIDTH,
    resolve_affine,
)
from pyro_flows_ext.nn import DampedMLP, default_hidden_dims
from pyro_flows_ext.transforms import LowerAffine, LowRankAffine


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _randomised(t: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return t


def _low_rank(dim: int = 5, rank: int = 2) -> LowRankAffine:
    gen = torch.Generator().manual_seed(0)
    center = torch.randn(dim, generator=gen, dtype=torch.float64)
    precond = 0.5 + torch.rand(dim, generator=gen, dtype=torch.float64)
    t = LowRankAffine(dim, rank, center, precond, init_scale=0.7).double()
    return _randomised(t)  # type: ignore[return-value]


# ------------------------------------------------------------------ LowRankAffine --------
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["no-batch", "batch-3", "batch-2x3"])
def test_low_rank_affine_round_trip(batch: tuple[int, ...]) -> None:
    t = _low_rank()
    x = torch.randn(*batch, 5, dtype=torch.float64)
    y = t(x)
    t.clear_cache()
    assert torch.allclose(t.inv(y), x, atol=1e-10)
    assert t.log_abs_det_jacobian(x, y).shape == batch


def test_low_rank_affine_log_det_matches_autograd() -> None:
    t = _low_rank()
    x = torch.randn(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: t._forward(v)[0], x)
    expected = torch.linalg.slogdet(jac)[1]
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), expected)
    y = t(x)
    t.clear_cache()
    assert torch.allclose(-t.inv.log_abs_det_jacobian(y, t.inv(y)), expected)


def test_low_rank_affine_is_the_stated_gaussian() -> None:
    t = _low_rank()
    base = dist.Normal(torch.zeros(5, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [t])
    m = torch.eye(5, dtype=torch.float64) + t.factor @ t.factor.T
    s = torch.diag(t.preconditioner * t.log_diag.exp())
    mvn = dist.MultivariateNormal(t.loc, covariance_matrix=s @ m @ m @ s)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(q.log_prob(x), mvn.log_prob(x))


def test_low_rank_affine_gradients_and_state_dict() -> None:
    t = _low_rank()
    base = dist.Normal(torch.zeros(5, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [t])
    x = q.rsample((4,))
    (x.sum() + q.log_prob(x).sum()).backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and (p.grad != 0).any(), name
    other = LowRankAffine(5, 2).double()
    other.load_state_dict(t.state_dict())
    z = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(other(z), t(z))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rank": 0}, ValueError),
        ({"rank": 2, "preconditioner": -torch.ones(4)}, ValueError),
        ({"rank": 2, "center": torch.zeros(3)}, ValueError),
    ],
)
def test_low_rank_affine_bad_arguments(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        LowRankAffine(4, **kwargs)


def test_lower_affine_passes_match_its_factor() -> None:
    """Sampling applies B then P (never forming L = P B); it must equal loc + L z."""
    gen = torch.Generator().manual_seed(0)
    precond = torch.tril(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    precond.diagonal().abs_().add_(0.5)
    t = _randomised(LowerAffine(4, torch.randn(4, dtype=torch.float64), precond, 0.7).double())
    z = torch.randn(3, 4, dtype=torch.float64)
    y = t(z)
    assert torch.allclose(y, t.loc + z @ t.scale_tril.T)
    t.clear_cache()
    assert torch.allclose(t.inv(y), z)


# ------------------------------------------------------------------ guide sizing ---------
def test_hidden_widths_are_capped() -> None:
    assert default_hidden_dims(10, MAX_WIDTH) == (64, 64)
    assert default_hidden_dims(50, MAX_WIDTH) == (200, 200)
    assert default_hidden_dims(5000, MAX_WIDTH) == (MAX_WIDTH, MAX_WIDTH)
    assert resolve_affine("auto", FULL_RANK_MAX_DIM) == "full"
    assert resolve_affine("auto", FULL_RANK_MAX_DIM + 1) == "lowrank"


def _wide_model(dim: int):  # noqa: ANN202
    def model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    return model


def test_guide_parameters_grow_linearly_past_the_cap() -> None:
    sizes = {}
    for dim in (400, 800):
        pyro.clear_param_store()  # guides of one class share their names in the store
        guide = AutoCouplingFlow(_wide_model(dim), init="loc", affine="lowrank").initialize()
        nets = [m for m in guide.modules() if isinstance(m, DampedMLP)]
        assert all(p.shape[0] <= max(MAX_WIDTH, dim) for n in nets for p in n.parameters())
        sizes[dim] = sum(p.numel() for p in guide.parameters())
    # doubling D less than doubles the parameters (D^2 growth would quadruple them)
    assert sizes[800] < 2.2 * sizes[400]


def test_large_dim_uses_low_rank_and_skips_laplace() -> None:
    dim = FULL_RANK_MAX_DIM + 1
    guide = AutoCouplingFlow(_wide_model(dim), depth=1).initialize()
    assert isinstance(guide.affine, LowRankAffine)
    assert guide.affine.rank == round(dim**0.5)
    assert guide.init_info["method"] == "loc"
    assert "no Laplace start" in guide.init_info["reason"]


def test_low_rank_guide_trains_on_a_correlated_gaussian() -> None:
    cov = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.25]])

    def model() -> None:
        pyro.sample("z", dist.MultivariateNormal(torch.tensor([1.0, -1.0, 0.0]), cov))

    guide = AutoCouplingFlow(model, depth=0, affine="lowrank", rank=1)
    optim = pyro.optim.ClippedAdam({"lr": 5e-2, "lrd": 0.1 ** (1 / 400)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(400):
        svi.step()
    with torch.no_grad():
        u = guide.get_posterior().sample((20000,))
    assert torch.allclose(u.mean(0), torch.tensor([1.0, -1.0, 0.0]), atol=0.05)
    assert torch.allclose(torch.cov(u.T), cov, atol=0.08)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"affine": "banded"}, ValueError),
        ({"affine": "lowrank", "rank": 0}, ValueError),
        ({"affine": "lowrank", "rank": 1.5}, TypeError),
        ({"affine": "full", "rank": 2}, ValueError),
    ],
    ids=["affine", "rank-zero", "rank-float", "rank-with-full"],
)
def test_bad_affine_arguments(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error, match="affine|rank"):
        AutoCouplingFlow(_wide_model(3), **kwargs)
