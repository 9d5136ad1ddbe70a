"""AutoHierarchicalFlow: plate structures, subsampling, exactness on a conjugate model, and the
diagnostics."""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_flows_ext.infer import (
    AutoHierarchicalFlow,
    importance_resample,
    psis_khat,
    to_inference_data,
)

Y = torch.tensor([2.0, 0.0, -2.0, 1.0]) + 3.0


def hier(y: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("g", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y[i])


def funnel(y: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("g", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 2.0), obs=y[i])


def nested() -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("a", 3, dim=-1):
        alpha = pyro.sample("alpha", dist.Normal(mu, 1.0))
        with pyro.plate("b", 2, dim=-2):
            beta = pyro.sample("beta", dist.Normal(alpha, 1.0))
            pyro.sample("obs", dist.Normal(beta, 1.0), obs=torch.ones(2, 3))


def two_sites() -> None:
    with pyro.plate("g", 5):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        loc = pyro.sample("loc", dist.Normal(0.0, scale))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.zeros(5))


def no_plate() -> None:
    x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("s", dist.LogNormal(x.sum(), 1.0))


def train(model, guide, *args, steps=100, particles=4, lr=2e-2, final_lr=None):
    pyro.clear_param_store()
    decay = (final_lr / lr) ** (1 / steps) if final_lr else 1.0
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    return [svi.step(*args) for _ in range(steps)]


def logistic(y: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("g", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Bernoulli(logits=theta), obs=(y[i] > 0).float())


@pytest.mark.parametrize(
    "model, newton",
    [(funnel, False), (logistic, True)],
    ids=["learned_gaussian", "newton_logistic"],
)
def test_subsampled_step_touches_only_the_subsample(model, newton) -> None:
    # with Newton conditionals the pseudo-likelihood only places the Newton step's start,
    # on which the conditional of a normal likelihood does not depend: a logistic one here
    y = torch.randn(20)
    guide = AutoHierarchicalFlow(model, newton=newton)
    train(model, guide, y, 5, steps=3)  # the networks' zero last layers move off zero
    guide.zero_grad()
    pyro.set_rng_seed(1)
    index = pyro.poutine.trace(guide).get_trace(y, 5).nodes["g"]["value"].tolist()
    pyro.set_rng_seed(1)  # the same subsample again
    Trace_ELBO().differentiable_loss(model, guide, y, 5).backward()
    flow = guide.local_flows[0]
    for grad in (
        guide.embeddings["g"].grad,
        flow.pseudo_loc_raw.grad,
        flow.pseudo_log_prec_raw.grad,
    ):
        touched = (grad.abs().reshape(20, -1).sum(-1) > 0).nonzero().flatten().tolist()
        assert set(touched) <= set(index) and touched
    assert guide.embeddings["g"].shape == (20, guide.embedding_dim)


def test_subsampled_training_runs_and_median_covers_the_full_plate() -> None:
    y = torch.randn(30)
    guide = AutoHierarchicalFlow(funnel)
    losses = train(funnel, guide, y, 6, steps=20)
    assert all(math.isfinite(v) for v in losses)
    assert guide(y, 6)["theta"].shape == (6,)
    assert guide.median(y, 6)["theta"].shape == (30,)


def test_nested_plates() -> None:
    guide = AutoHierarchicalFlow(nested)
    train(nested, guide, steps=5)
    structure = guide.structure
    assert [g.name for g in structure.groups] == ["a", "b__a"]
    assert structure.groups[1].parents == [0]
    median = guide.median()
    assert median["alpha"].shape == (3,) and median["beta"].shape == (2, 3)
    assert guide.quantiles([0.5])["beta"].shape == (1, 2, 3)


def test_several_local_sites_in_one_plate() -> None:
    guide = AutoHierarchicalFlow(two_sites, local_depth=2)
    train(two_sites, guide, steps=5)
    (group,) = guide.structure.groups
    assert group.dim == 2 and len(guide.local_flows[0].couplings) == 4
    assert (guide.median()["scale"] > 0).all()


def test_no_plate_is_a_flow_over_the_globals() -> None:
    guide = AutoHierarchicalFlow(no_plate, depth=2)
    train(no_plate, guide, steps=5)
    assert not guide.structure.groups and guide.structure.global_dim == 3
    assert guide()["x"].shape == (2,) and guide.median()["s"].shape == ()


def discrete() -> None:
    pyro.sample("k", dist.Bernoulli(0.5))


def sequential() -> None:
    for i in pyro.plate("seq", 2):
        pyro.sample(f"x{i}", dist.Normal(0.0, 1.0))


def undeclared_batch() -> None:
    with pyro.plate("g", 3):
        pyro.sample("x", dist.Normal(torch.zeros(4, 3), 1.0))


@pytest.mark.parametrize(
    "model, site",
    [(discrete, "'k'"), (sequential, "'x0'"), (undeclared_batch, "'x'")],
    ids=["discrete", "sequential", "undeclared_batch"],
)
def test_unsupported_structure_is_a_clear_error(model, site) -> None:
    with pytest.raises(ValueError, match=site):
        AutoHierarchicalFlow(model).initialize()


def test_plate_size_change_is_an_error() -> None:
    guide = AutoHierarchicalFlow(hier, create_plates=lambda y, b=None: pyro.plate("g", len(y)))
    guide(Y)
    with pytest.raises(ValueError, match="plate 'g'.*'theta'"):
        guide(torch.zeros(7))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"depth": -1}, ValueError),
        ({"embedding_dim": 0}, ValueError),
        ({"coupling": "iaf"}, ValueError),
        ({"stl": 1}, TypeError),
        ({"encoders": {"g": 3}}, TypeError),
    ],
    ids=["depth", "embedding_dim", "coupling", "stl", "encoders"],
)
def test_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        AutoHierarchicalFlow(hier, **kwargs)


@pytest.fixture
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def test_predictive_median_quantiles_and_float64(float64) -> None:
    y = Y.double()
    guide = AutoHierarchicalFlow(hier)
    train(hier, guide, y, steps=5)
    assert guide.local_flows[0].pseudo_loc.dtype == torch.float64
    draws = Predictive(hier, guide=guide, num_samples=7)(y)
    assert draws["theta"].shape == (7, 4) and draws["theta"].dtype == torch.float64
    q = guide.quantiles([0.1, 0.9], y)
    assert (
        q["mu"].shape == (2,)
        and q["theta"].shape == (2, 4)
        and (q["theta"][0] < q["theta"][1]).all()
    )


def _observed_in_an_inner_plate(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("g", y.shape[-1], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("rows", y.shape[-2], dim=-2):  # only the observations: radon's houses
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_full_plate_draws_come_in_batches_bounded_by_the_largest_site(monkeypatch) -> None:
    """Draws over the full plates are made ``draws_at_once`` at a time (the Newton
    conditionals run the model over every observation per draw)."""
    from pyro_flows_ext.infer.hierarchical import full

    y = torch.randn(3, 4)
    pyro.clear_param_store()
    guide = AutoHierarchicalFlow(_observed_in_an_inner_plate)
    guide(y)
    assert guide.draws_at_once() == full.DRAW_CELLS // 12  # the (3, 4) observations
    monkeypatch.setattr(full, "DRAW_CELLS", 24)  # two draws at a time
    assert guide.draws_at_once() == 2
    pyro.set_rng_seed(0)
    draws = guide.sample_full(5, y)
    assert draws["mu"].shape == (5,) and draws["theta"].shape == (5, 4)
    assert len(set(draws["mu"].tolist())) == 5  # five draws, not one batch repeated
    resampled = guide.marginal_resample(y, num_samples=50, num_draws=5)
    assert resampled["theta"].shape == (5, 4)


def test_full_plate_draws_where_only_observations_sit_in_an_inner_plate() -> None:
    """The draws' sample dim goes left of every plate of the model, the observations' too
    (the guide's prototype trace holds no observed site)."""
    y = torch.randn(3, 4)
    guide = AutoHierarchicalFlow(_observed_in_an_inner_plate)
    guide(y)
    draws = guide.sample_full(6, y)
    assert draws["mu"].shape == (6,) and draws["theta"].shape == (6, 4)
    assert guide.quantiles([0.1, 0.9], y)["theta"].shape == (2, 4)


def test_exact_posterior_of_a_conjugate_hierarchical_model() -> None:
    # mu ~ N(0, 9), theta_g ~ N(mu, 1), y_g ~ N(theta_g, 1): y_g | mu ~ N(mu, 2)
    pyro.set_rng_seed(0)
    prec = 1 / 9 + len(Y) / 2
    mu_mean, mu_var = (Y.sum() / 2) / prec, 1 / prec
    theta_mean, theta_sd = (mu_mean + Y) / 2, math.sqrt(0.5 + 0.25 * mu_var)
    guide = AutoHierarchicalFlow(hier, depth=0)
    train(hier, guide, Y, steps=800, particles=8, lr=5e-2, final_lr=5e-3)
    draws = guide.sample_full(4000, Y)
    assert draws["mu"].mean() == pytest.approx(float(mu_mean), abs=0.08)
    assert draws["mu"].std() == pytest.approx(math.sqrt(mu_var), rel=0.1)
    assert torch.allclose(draws["theta"].mean(0), theta_mean, atol=0.15)  # 0.19 sd
    assert torch.allclose(draws["theta"].std(0), torch.full((4,), theta_sd), rtol=0.1)


def test_diagnostics_run_with_the_guide() -> None:
    guide = AutoHierarchicalFlow(hier)
    train(hier, guide, Y, steps=20)
    khat = psis_khat(hier, guide, Y, num_samples=200)
    assert math.isfinite(khat.khat)
    idata = to_inference_data(hier, guide, Y, num_samples=50)
    assert idata.posterior["theta"].shape == (1, 50, 4)
    assert importance_resample(hier, guide, Y, num_samples=100)["theta"].shape == (100, 4)


def test_encoders_amortise_a_plate() -> None:
    guide = AutoHierarchicalFlow(hier, encoders={"g": lambda y, b=None: y[:, None]})
    train(hier, guide, Y, steps=5)
    assert "g" not in guide.embeddings and not guide.local_flows[0].per_element
    assert guide.median(Y)["theta"].shape == (4,)
    with pytest.raises(ValueError, match="encoder of plate 'g'"):
        AutoHierarchicalFlow(hier, encoders={"g": lambda y, b=None: y}).initialize(Y)


def test_globals_couplings_are_splines_for_few_elements_affine_for_many_and_deeper() -> None:
    from pyro_flows_ext.transforms import AffineMap, SplineMap

    def build(y: torch.Tensor, **options: Any) -> AutoHierarchicalFlow:
        pyro.clear_param_store()  # guides of one class share their names in the store
        return AutoHierarchicalFlow(funnel, **options).initialize(y)

    few = build(torch.zeros(5))
    many = build(torch.zeros(AutoHierarchicalFlow.AFFINE_FROM))
    chosen = build(torch.zeros(5), coupling="affine")
    assert few.global_flow[1].transformer == SplineMap()  # behind the ExponentialTails
    assert many.global_flow[1].transformer == AffineMap(clamp=few.clamp)
    assert chosen.global_flow[1].transformer == AffineMap(clamp=few.clamp)

    def couplings(guide: AutoHierarchicalFlow) -> int:
        return sum(hasattr(t, "transformer") for t in guide.global_flow)

    # the default depth: 2 spline couplings, AFFINE_DEPTH affine ones; a given depth stays
    assert (couplings(few), couplings(chosen)) == (2, AutoHierarchicalFlow.AFFINE_DEPTH)
    assert couplings(many) == AutoHierarchicalFlow.AFFINE_DEPTH
    assert couplings(build(torch.zeros(5), coupling="affine", depth=3)) == 3


def _eight_schools_by_quadrature(y: torch.Tensor, sigma: torch.Tensor) -> dict[str, tuple]:
    """Posterior means and sds of ``mu``, ``log tau`` and each ``theta`` on an 801 x 801 grid
    over ``(mu, log tau)`` (``theta`` integrated out in closed form, then its normal
    conditional given the grid point)."""
    mu = torch.linspace(-15, 25, 801)[:, None, None]
    log_tau = torch.linspace(-8, 4.5, 801)[None, :, None]
    tau = log_tau.exp()
    marginal = dist.Normal(mu, (tau**2 + sigma**2).sqrt()).log_prob(y).sum(-1)
    lp = dist.Normal(0.0, 5.0).log_prob(mu[..., 0]) + marginal
    lp = lp + dist.HalfCauchy(5.0).log_prob(tau[..., 0]) + log_tau[..., 0]  # d tau / d log tau
    w = torch.softmax(lp.flatten(), 0).reshape(lp.shape)[..., None]
    precision = tau**-2 + sigma**-2
    cond_mean, cond_var = (mu / tau**2 + y / sigma**2) / precision, 1 / precision

    def moments(first: torch.Tensor, second: torch.Tensor) -> tuple:
        m = (w * first).sum((0, 1))
        return m, ((w * second).sum((0, 1)) - m**2).sqrt()

    return {
        "mu": moments(mu, mu**2),
        "log_tau": moments(log_tau, log_tau**2),
        "theta": moments(cond_mean, cond_var + cond_mean**2),
    }


def test_psis_corrected_draws_match_the_exact_posterior(eight_schools) -> None:
    """The guide's Laplace start (no training) is off in the globals; importance resampling
    of its draws (the locals drawn from their conditionals given the globals' draw) lands on
    the posterior computed by quadrature, globals and locals."""
    model, y, sigma = eight_schools
    sigma = sigma / 3  # informative enough that the start's draws cover the posterior
    exact = _eight_schools_by_quadrature(y, sigma)
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(model)
    guide(y, sigma)

    def errors(draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = {"mu": draws["mu"], "log_tau": draws["tau"].log(), "theta": draws["theta"]}
        out = {}
        for name, v in values.items():
            mean, sd = exact[name]
            out[name] = torch.stack([(v.mean(0) - mean) / sd, (v.std(0) / sd).log()]).abs()
        return out

    raw = errors(guide.sample_full(8000, y, sigma))
    assert raw["log_tau"][0] > 0.15  # the start alone is off: the correction is needed
    fixed = errors(importance_resample(model, guide, y, sigma, num_samples=8000))
    for name, err in fixed.items():
        assert err.max() < 0.06, (name, err)


def _eight_schools_log_marginal(
    g: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """``log p(mu, log tau, y)`` in closed form (``theta`` integrated out), ``g`` ``(S, 2)``."""
    mu, log_tau = g[:, 0], g[:, 1]
    scale = (log_tau.exp()[:, None] ** 2 + sigma**2).sqrt()
    prior = dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfCauchy(5.0).log_prob(log_tau.exp())
    return prior + log_tau + dist.Normal(mu[:, None], scale).log_prob(y).sum(-1)


@pytest.mark.parametrize("batch", [None, 3, 4], ids=["full", "pads-1", "divides"])
def test_laplace_marginal_of_the_globals_is_exact_for_a_normal_model(eight_schools, batch) -> None:
    """Read in chunks of the subsample size where the plate is subsampled (8 by 3: the last
    chunk padded)."""
    model, y, sigma = eight_schools
    pyro.clear_param_store()
    guide = AutoHierarchicalFlow(model)
    guide(y, sigma, batch)
    g = torch.randn(7, 2, dtype=torch.float64) * torch.tensor([3.0, 1.5]) + torch.tensor([4.0, 1.0])
    g = g.to(guide._anchor.dtype)  # the guide's (the priors' float32: the data's dtype aside)
    with torch.no_grad():
        got = guide._laplace_log_marginal(g, (y, sigma, batch), {})
    want = _eight_schools_log_marginal(g.double(), y, sigma)
    assert torch.allclose(got.double(), want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("batch", [None, 3])
def test_marginal_resample_matches_the_exact_posterior(eight_schools, batch) -> None:
    """From the untrained start the globals resampled by their marginal weights, and the
    locals drawn given them over the full plate, land on the posterior by quadrature."""
    model, y, sigma = eight_schools
    sigma = sigma / 3
    exact = _eight_schools_by_quadrature(y, sigma)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(model)
    draws = guide.marginal_resample(y, sigma, batch, num_samples=8000)
    values = {"mu": draws["mu"], "log_tau": draws["tau"].log(), "theta": draws["theta"]}
    assert values["theta"].shape == (8000, 8)  # the full plate, also when subsampled
    for name, v in values.items():
        mean, sd = exact[name]
        err = torch.stack([(v.mean(0) - mean) / sd, (v.std(0) / sd).log()]).abs()
        assert err.max() < 0.06, (name, err)
    only = guide.marginal_resample(
        y, sigma, batch, num_samples=100, num_draws=10, globals_only=True
    )
    assert set(only) == {"mu", "tau"} and only["tau"].shape == (10,)


def test_marginal_resample_refuses_what_it_cannot_integrate(eight_schools) -> None:
    model, y, sigma = eight_schools
    for guide, args in ((model, (y, sigma)), (nested, ()), (two_sites, ())):
        pyro.clear_param_store()
        with pytest.raises(ValueError, match="num_samples|leaf|no global"):
            AutoHierarchicalFlow(guide).marginal_resample(*args, num_samples=0 if args else 10)


def test_marginal_resample_warns_when_its_weights_are_unreliable(eight_schools) -> None:
    model, y, sigma = eight_schools
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(model, init="loc", init_scale=0.01)  # far too narrow
    with pytest.warns(UserWarning, match="k-hat"):
        guide.marginal_resample(y, sigma, num_samples=500)


def _logistic(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("g", len(y)):
        a = pyro.sample("a", dist.Normal(mu, sigma))
        pyro.sample("y", dist.Bernoulli(logits=a), obs=y)


@pytest.mark.filterwarnings("ignore:marginal_resample. the globals' importance weights")
def test_marginal_resample_warns_where_the_laplace_marginal_is_approximate() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHierarchicalFlow(_logistic)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    with pytest.warns(UserWarning, match=r"\['y'\] are not normal"):
        guide.marginal_resample(y, num_samples=200, num_draws=10)
