"""AutoHierarchicalFlow's start: the globals' Laplace marginal against the closed-form marginal
of normal models (over subsampled plates too), its mode and curvature, its independence of
the initial point, its fallbacks, and the learned exponential tails of the globals."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from pyro_flows_ext.infer import AutoHierarchicalFlow, fit_guide
from pyro_flows_ext.infer.guide_state import param_store_untouched
from pyro_flows_ext.infer.vector.laplace import laplace_approximation
from pyro_flows_ext.transforms import ExponentialTails, LowerAffine

GEN = torch.Generator().manual_seed(3)
COUNTIES = 6
HOUSES = 40
FLOOR = (torch.rand(HOUSES, COUNTIES, generator=GEN) < 0.3).double()
FLOOR[:, 0] = 0.0  # one county measured on one floor only: its intercept and slope confounded
Y = 1.5 - 0.7 * FLOOR + 0.3 * torch.randn(HOUSES, COUNTIES, generator=GEN, dtype=torch.float64)
Y[:, 1] += 4.0  # a county far from the others: its locals start many sds away


@pytest.fixture(autouse=True)
def _float64():  # the models' priors follow the default dtype, and the guide them
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def radon(floor: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> None:
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(1.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    with pyro.plate("county", y.shape[-1], subsample_size=batch, dim=-1) as i:
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
        with pyro.plate("house", y.shape[-2], dim=-2):
            pyro.sample("y", dist.Normal(a + b * floor[:, i], sigma_y), obs=y[:, i])


def exact_log_marginal(g: torch.Tensor) -> torch.Tensor:
    """log p(y, g) in the unconstrained globals (mu_a, mu_b, log sigma_a, log sigma_b,
    log sigma_y), the county effects integrated out in closed form."""
    mu_a, mu_b, ls_a, ls_b, ls_y = g
    total = dist.Normal(0.0, 10.0).log_prob(mu_a) + dist.Normal(0.0, 10.0).log_prob(mu_b)
    for ls in (ls_a, ls_b, ls_y):  # HalfNormal(1) of exp(ls), with its Jacobian
        total = total + dist.HalfNormal(1.0).log_prob(ls.exp()) + ls
    for c in range(COUNTIES):
        x = torch.stack([torch.ones(HOUSES, dtype=g.dtype), FLOOR[:, c]], -1)
        cov = x @ torch.diag(torch.stack([(2 * ls_a).exp(), (2 * ls_b).exp()])) @ x.T
        cov = cov + (2 * ls_y).exp() * torch.eye(HOUSES, dtype=g.dtype)
        mean = x @ torch.stack([mu_a, mu_b])
        total = total + dist.MultivariateNormal(mean, cov).log_prob(Y[:, c])
    return total


def built(seed: int, **options) -> AutoHierarchicalFlow:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return AutoHierarchicalFlow(radon, **options).initialize(FLOOR, Y)


@pytest.mark.parametrize("mu_a", [-8.0, 0.0, 8.0])
def test_laplace_marginal_is_the_closed_form_marginal_of_a_normal_model(mu_a) -> None:
    # the county effects start around mu_a, up to 70 of their conditional sds away
    start = init_to_value(values={"mu_a": torch.tensor(mu_a)}, fallback=init_to_median)
    guide = built(0, init="loc", init_loc_fn=start)
    g = torch.tensor([1.2, -0.5, -0.8, -1.5, -1.1], dtype=torch.float64)
    for shift in (0.0, 0.7):
        at = g + shift
        with torch.no_grad():
            got = guide._log_marginal(at, (FLOOR, Y), {})
        assert got.item() == pytest.approx(exact_log_marginal(at).item(), abs=1e-6)


def test_laplace_start_is_the_mode_and_curvature_of_the_marginal() -> None:
    guide = built(0)
    with param_store_untouched():
        want = laplace_approximation(exact_log_marginal, torch.zeros(5, dtype=torch.float64))
    last = guide.global_flow[-1]
    assert isinstance(last, LowerAffine)
    assert torch.allclose(last.loc, want.loc, atol=1e-5)
    assert torch.allclose(last.scale_tril, want.scale_tril, atol=1e-5)
    other = built(1, init_loc_fn=init_to_value(values={"mu_a": torch.tensor(-8.0).double()}))
    assert torch.allclose(other.global_flow[-1].loc, want.loc, atol=1e-5)


def test_init_loc_keeps_the_initial_point() -> None:
    guide = built(0, init="loc")
    start = guide.global_flow[-1]
    assert torch.allclose(start.scale_tril, 0.1 * torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="init must be one of"):
        AutoHierarchicalFlow(radon, init="mode")


@pytest.mark.parametrize("batch", [2, 4, 5], ids=["divides", "pads_2", "pads_4"])
def test_a_subsampled_plate_starts_at_the_marginal_over_all_its_elements(batch) -> None:
    # 6 counties read in chunks of the subsample size: with 4 and 5 the last chunk repeats
    # counties from the start, which must count zero, and the globals' prior counts once
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(radon).initialize(FLOOR, Y, batch)
    g = torch.tensor([1.2, -0.5, -0.8, -1.5, -1.1], dtype=torch.float64)
    with torch.no_grad():
        got = guide._log_marginal(g, (FLOOR, Y, batch), {})
    assert got.item() == pytest.approx(exact_log_marginal(g).item(), abs=1e-6)
    with param_store_untouched():
        want = laplace_approximation(exact_log_marginal, torch.zeros(5, dtype=torch.float64))
    last = guide.global_flow[-1]
    assert torch.allclose(last.loc, want.loc, atol=1e-5)
    assert torch.allclose(last.scale_tril, want.scale_tril, atol=1e-5)
    assert guide(FLOOR, Y, batch)["a"].shape == (batch,)  # and a step still draws B elements


def test_a_failed_search_starts_at_the_initial_point() -> None:
    class Failing(AutoHierarchicalFlow):
        def _log_marginal(self, g, args, kwargs):
            return g.sum() * math.nan

    pyro.clear_param_store()
    guide = Failing(radon).initialize(FLOOR, Y)
    assert torch.allclose(guide.global_flow[-1].scale_tril, 0.1 * torch.eye(5).double())
    assert torch.isfinite(guide.global_flow[-1].loc).all()


def test_the_start_leaves_the_param_store_holding_the_final_flows_only() -> None:
    guide = built(0)
    guide(FLOOR, Y)
    store = pyro.get_param_store()
    mine = {id(t) for t in [*guide.parameters(), *guide.buffers()]}
    held = [store._params[n] for n in store if n.startswith("AutoHierarchicalFlow.")]
    assert held and all(id(t) in mine for t in held)
    centers = [store._params[n] for n in store if n.endswith(".center")]
    assert len(centers) == 1 and centers[0] is guide.global_flow[-1].center


def test_a_fit_from_the_laplace_start_learns_the_long_left_tail_of_a_group_scale(
    eight_schools,
) -> None:
    # eight schools: log tau's posterior has an exponential left tail (the HalfCauchy's
    # density is positive at zero); the fit should make its left tail weight grow
    schools, y, sigma = eight_schools
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(schools)
    fit_guide(schools, guide, y, sigma, steps=600, num_particles=8, progress=False)
    tails = guide.global_flow[0]
    assert isinstance(tails, ExponentialTails)
    assert tails.weights.max() > 0.3  # from 0.01: some direction grew an exponential tail
