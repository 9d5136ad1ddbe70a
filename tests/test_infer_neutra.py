"""``neutra_mcmc``: exact draws in the guide's whitened space, mapped back to every site with
its shape and support; bookkeeping (gradient evaluations, divergences); ArviZ output; bad
arguments."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

from pyro_flows_ext.infer import AutoCouplingFlow, NeuTraDraws, fit_guide, neutra_mcmc

MEAN = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.9], [0.9, 1.0]])


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def gaussian() -> None:
    pyro.sample("z", dist.MultivariateNormal(MEAN, COV))


def constrained() -> None:
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("group", 4):
        b = pyro.sample("b", dist.Normal(0.0, scale))
        pyro.sample("y", dist.Normal(b, 1.0), obs=torch.zeros(4))
    pyro.deterministic("total", b.sum())


def fitted(model, steps: int = 100, **options) -> AutoCouplingFlow:
    guide = AutoCouplingFlow(model, **options)
    fit_guide(model, guide, steps=steps, num_particles=4, progress=False)
    return guide


def test_recovers_a_correlated_gaussian() -> None:
    guide = fitted(gaussian, depth=1)
    draws = neutra_mcmc(gaussian, guide, num_samples=400, warmup_steps=150, seed=0)
    z = draws.samples["z"].reshape(-1, 2)
    assert torch.allclose(z.mean(0), MEAN, atol=0.25)
    assert torch.allclose(z.std(0), COV.diag().sqrt(), atol=0.2)
    assert abs(torch.corrcoef(z.T)[0, 1].item() - 0.9) < 0.1


def test_sites_come_back_in_shape_and_support() -> None:
    guide = fitted(constrained, steps=20, init="loc")
    draws = neutra_mcmc(constrained, guide, num_samples=30, warmup_steps=20, num_chains=2)
    s = draws.samples
    assert set(s) == {"scale", "p", "b", "total"}
    assert s["scale"].shape == (2, 30) and bool((s["scale"] > 0).all())
    assert s["p"].shape == (2, 30, 3) and torch.allclose(s["p"].sum(-1), torch.ones(2, 30))
    assert s["b"].shape == (2, 30, 4)
    assert torch.allclose(s["total"], s["b"].sum(-1), atol=1e-5)
    assert draws.latent is not None and draws.latent.shape == (2, 30, 1 + 2 + 4)


def test_bookkeeping_and_inference_data() -> None:
    guide = fitted(constrained, steps=10, init="loc")
    draws = neutra_mcmc(constrained, guide, num_samples=25, warmup_steps=15, seed=1)
    assert isinstance(draws, NeuTraDraws)
    assert draws.num_steps.shape == draws.diverging.shape == (1, 25)
    assert bool((draws.num_steps >= 1).all()) and draws.warmup_num_steps >= 15
    assert draws.gradient_evaluations == int(draws.num_steps.sum())
    assert bool((draws.num_steps <= 2**10).all()) and len(draws.step_size) == 1
    idata = draws.to_inference_data()
    assert idata.posterior["p"].shape == (1, 25, 3)
    assert int(idata.sample_stats["n_steps"].sum()) == draws.gradient_evaluations
    assert int(idata.sample_stats["diverging"].sum()) == draws.num_divergences


def test_plain_nuts_and_other_autocontinuous_guides() -> None:
    plain = neutra_mcmc(constrained, None, num_samples=10, warmup_steps=10, seed=0)
    assert plain.latent is None and set(plain.samples) == {"scale", "p", "b", "total"}
    iaf = AutoIAFNormal(gaussian, num_transforms=1)
    fit_guide(gaussian, iaf, steps=5, num_particles=2, progress=False)
    draws = neutra_mcmc(gaussian, iaf, num_samples=10, warmup_steps=10, max_tree_depth=3)
    assert draws.samples["z"].shape == (1, 10, 2)
    assert bool((draws.num_steps <= 2**3).all())


def test_an_initialised_guide_never_called_works() -> None:
    guide = AutoCouplingFlow(gaussian, depth=0).initialize()
    draws = neutra_mcmc(gaussian, guide, num_samples=5, warmup_steps=5)
    assert draws.samples["z"].shape == (1, 5, 2)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.0}, TypeError, "num_samples"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"num_chains": 0}, ValueError, "num_chains"),
        ({"max_tree_depth": True}, TypeError, "max_tree_depth"),
        ({"target_accept_prob": 1.0}, ValueError, "target_accept_prob"),
        ({"target_accept_prob": "0.8"}, TypeError, "target_accept_prob"),
        ({"seed": -1}, ValueError, "seed"),
        ({"progress": 1}, TypeError, "progress"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_arguments(options: dict, error: type, match: str) -> None:
    guide = AutoCouplingFlow(gaussian, depth=0).initialize()
    with pytest.raises(error, match=match):
        neutra_mcmc(gaussian, guide, **options)


def test_bad_guides_and_models() -> None:
    with pytest.raises(TypeError, match="AutoContinuous"):
        neutra_mcmc(gaussian, AutoNormal(gaussian))
    with pytest.raises(ValueError, match="no parameters yet"):
        neutra_mcmc(gaussian, AutoCouplingFlow(gaussian))
    with pytest.raises(TypeError, match="model"):
        neutra_mcmc("model", None)


def test_a_guide_of_another_model_is_an_error() -> None:
    """Not plain NUTS with the model's raw draws labelled as the whitened chains (issue 17,
    item 9)."""
    guide = AutoCouplingFlow(gaussian, depth=0).initialize()
    with pytest.raises(ValueError, match=r"another model.*'z'.*'scale'"):
        neutra_mcmc(constrained, guide, num_samples=5, warmup_steps=5)

    def wider() -> None:
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    with pytest.raises(ValueError, match=r"'z' has shape \(2,\) in the guide, \(3,\)"):
        neutra_mcmc(wider, guide, num_samples=5, warmup_steps=5)


def test_one_pass_reparam_matches_pyros_neutra() -> None:
    from pyro import poutine
    from pyro.infer.reparam import NeuTraReparam

    from pyro_flows_ext.infer.fitting.neutra import _OnePassNeuTra

    guide = fitted(constrained, steps=5, init="loc", depth=2)
    z = torch.randn(7)

    def log_density(reparam: NeuTraReparam) -> torch.Tensor:
        model = poutine.condition(reparam.reparam(constrained), {"scale_shared_latent": z})
        return poutine.trace(model).get_trace().log_prob_sum()

    ours, pyros = log_density(_OnePassNeuTra(guide)), log_density(NeuTraReparam(guide))
    assert torch.allclose(ours, pyros, atol=1e-5)
