"""``AutoCouplingFlow`` in the SVI loop users run: Pyro's ``ClippedAdam`` (which writes
``p.data`` in place), ``Predictive``, and the default dtype (float32 and float64)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.optim import ClippedAdam
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam

from pyro_flows_ext.infer import AutoCouplingFlow

NUM_DATA = 8


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def regression(x: torch.Tensor, y: torch.Tensor) -> None:
    """``y ~ N(a + b x, sigma)``: scalar globals that vectorise over a particle plate."""
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1.0, 1.0, NUM_DATA)
    return x, 0.5 + 2.0 * x + 0.3 * torch.randn(NUM_DATA)


def _elbo(particles: int) -> Trace_ELBO:
    return Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)


def _train(guide: AutoCouplingFlow, steps: int, x: torch.Tensor, y: torch.Tensor) -> SVI:
    svi = SVI(regression, guide, ClippedAdam({"lr": 2e-2, "clip_norm": 10.0}), _elbo(4))
    for _ in range(steps):
        svi.step(x, y)
    return svi


@pytest.mark.parametrize("init", ["laplace", "loc"])
def test_guide_follows_the_default_dtype(default_dtype: torch.dtype, init: str) -> None:
    x, y = data()
    guide = AutoCouplingFlow(regression, depth=2, init=init)
    _train(guide, 5, x, y)
    floating = [t for t in [*guide.parameters(), *guide.buffers()] if t.is_floating_point()]
    assert floating and all(t.dtype == default_dtype for t in floating)
    median = guide.median(x, y)
    assert set(median) == {"a", "b", "sigma"}
    assert all(v.dtype == default_dtype and torch.isfinite(v) for v in median.values())
    draws = Predictive(regression, guide=guide, num_samples=6, parallel=True)(x, y)
    assert draws["y"].shape == (6, NUM_DATA) and draws["y"].dtype == default_dtype
    # a vectorised Predictive puts its particle plate left of the model's plate: (6, 1)
    assert draws["sigma"].numel() == 6 and (draws["sigma"] > 0).all()
    assert torch.isfinite(torch.tensor(_elbo(8).loss(regression, guide, x, y)))


def _twin(guide: AutoCouplingFlow, x: torch.Tensor, y: torch.Tensor) -> AutoCouplingFlow:
    """A guide re-built from scratch and loaded with ``guide``'s state (nothing shared)."""
    pyro.clear_param_store()  # PyroModule parameters live in the param store too
    pyro.set_rng_seed(123)
    twin = AutoCouplingFlow(regression, depth=2).initialize(x, y)
    twin.load_state_dict(guide.state_dict())
    return twin


def test_clipped_adam_training_leaves_no_stale_value() -> None:
    x, y = data()
    guide = AutoCouplingFlow(regression, depth=2)
    svi = _train(guide, 40, x, y)
    pyro.set_rng_seed(7)
    final = svi.evaluate_loss(x, y)
    twin = _twin(guide, x, y)
    pyro.set_rng_seed(7)
    fresh = _elbo(4).loss(regression, twin, x, y)
    assert final == pytest.approx(fresh, rel=1e-5, abs=1e-5)


def test_clipped_adam_step_on_a_fixed_input_is_not_served_from_the_cache() -> None:
    # scoring the same tensor before and after an in-place (p.data) update must see the update
    x, y = data()
    guide = AutoCouplingFlow(regression, depth=2).initialize(x, y)
    z = guide.get_posterior().sample((5,))
    optim = TorchClippedAdam(guide.parameters(), lr=5e-2)
    before = guide.get_posterior().log_prob(z)
    (-before.sum()).backward()
    optim.step()  # ClippedAdam writes p.data in place: no version counter moves
    after = guide.get_posterior().log_prob(z)
    expected = _twin(guide, x, y).get_posterior().log_prob(z.clone())
    assert torch.allclose(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # the step did change the guide


def test_predictive_with_the_trained_guide() -> None:
    x, y = data()
    guide = AutoCouplingFlow(regression, depth=2)
    _train(guide, 60, x, y)
    pyro.set_rng_seed(1)
    draws = Predictive(regression, guide=guide, num_samples=500, parallel=True)(x, y)
    assert draws["a"].numel() == 500 and draws["y"].shape == (500, NUM_DATA)
    pyro.set_rng_seed(1)
    looped = Predictive(regression, guide=guide, num_samples=500)(x, y)
    assert torch.allclose(draws["b"].mean(), looped["b"].mean(), atol=0.15)
    # the least-squares slope is near 2; the guide's draws are centred there
    assert abs(draws["b"].mean().item() - 2.0) < 0.5
