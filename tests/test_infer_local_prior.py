"""The local flows' start (infer.local_prior): the prior of each local given the globals and
the Newton-step pseudo-likelihood, read from the model; exact for normal-normal models."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext.infer import AutoHierarchicalFlow

S = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
Y = torch.tensor([3.0, -1.0, 0.5, 2.0, 8.0, -4.0, 1.0])
X = torch.linspace(-1.0, 1.0, 7)


def funnel(y: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("g", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, S[i]), obs=y[i])


def regression(y: torch.Tensor) -> None:
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("g", len(y)):
        theta = pyro.sample("theta", dist.Normal(beta * X, sigma))
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))  # not location-scale: no prior
        pyro.sample("y", dist.Normal(theta, 1.0 / rate), obs=y)


def starts(model, *args, **kwargs):
    pyro.clear_param_store()  # a fresh start, not the values of the last guide of this name
    guide = AutoHierarchicalFlow(model, **kwargs)
    guide.initialize(*args)
    return guide, guide.local_flows[0]


def test_normal_normal_start_is_the_exact_conditional() -> None:
    guide, flow = starts(funnel, Y)
    mu0, log_tau0 = flow.prior_g0.tolist()  # the start: init_to_median's (mu, log tau)
    # the pseudo-likelihood is the likelihood: y_g with precision s_g ** -2
    assert torch.allclose(flow.pseudo_loc.squeeze(-1), Y, atol=1e-5)
    assert torch.allclose(flow.pseudo_log_prec.squeeze(-1), -2 * S.log(), atol=1e-5)
    # the prior Normal(mu, tau) in (mu, log tau): shared by every element, exactly linear
    assert flow.prior_mask.tolist() == [True]
    assert flow.prior_loc.shape == flow.prior_log_scale.shape == (1, 1)
    assert flow.prior_loc.item() == pytest.approx(mu0, abs=1e-5)
    assert flow.prior_log_scale.item() == pytest.approx(log_tau0, abs=1e-5)
    assert torch.allclose(flow.prior_coef.reshape(2, 2), torch.eye(2))


def test_start_is_the_exact_conditional_at_other_globals() -> None:
    # q(theta | mu, tau) = N(mu, tau) x N(y, s): the posterior conditional, checked at a
    # point away from the start through the flow's affine layer
    guide, flow = starts(funnel, Y)
    mu, tau = 1.5, 0.7
    g = torch.tensor([mu, math.log(tau)])
    params = flow.element_params((), {})
    context = torch.zeros(len(Y), flow.context_dim)
    layer = flow.transforms([context], g, *params)[-1]
    prec = tau**-2 + S**-2
    mean, sd = (mu * tau**-2 + Y * S**-2) / prec, prec**-0.5
    assert torch.allclose(layer.loc.squeeze(-1), mean, atol=1e-5)
    assert torch.allclose(layer.scale.squeeze(-1), sd, atol=1e-5)


def test_subsampled_plate_gives_every_element_its_own_start() -> None:
    _, whole = starts(funnel, Y)
    _, chunked = starts(funnel, Y, 3)  # 7 elements in chunks of 3 (the last wraps around)
    assert torch.allclose(whole.pseudo_loc, chunked.pseudo_loc, atol=1e-5)
    assert torch.allclose(whole.pseudo_log_prec, chunked.pseudo_log_prec, atol=1e-5)


def test_covariates_give_per_element_priors_and_other_families_none() -> None:
    _, flow = starts(regression, Y)
    assert flow.prior_mask.tolist() == [True, False]  # theta, rate
    coef = flow.prior_coef  # (7, 4, 2): d loc / d beta = x_g for theta
    assert torch.allclose(coef[:, 0, 0], X, atol=1e-6)
    assert torch.allclose(coef[:, 2, 1], torch.ones(7), atol=1e-6)  # d log sigma / d log sigma
    assert (coef[:, 1].abs().sum() == 0) and (coef[:, 3].abs().sum() == 0)


def test_point_start_without_the_prior() -> None:
    _, flow = starts(funnel, Y, local_prior=False, init_scale=0.2)
    assert not flow.prior_mask.any()
    assert torch.allclose(flow.pseudo_log_prec, torch.full((7, 1), -2 * math.log(0.2)))
    median = AutoHierarchicalFlow(funnel, local_prior=False).median(Y)["theta"]
    assert median.shape == (7,)


def test_reading_the_start_draws_no_random_numbers() -> None:
    after = []
    for local_prior in (True, False):
        pyro.set_rng_seed(3)
        starts(funnel, Y, 3, local_prior=local_prior)
        after.append(torch.rand(3))
    assert torch.equal(*after)


def test_a_plate_left_of_an_empty_dim_gets_its_start() -> None:
    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("g", 7, dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(theta, S[:, None]), obs=Y[:, None])

    _, flow = starts(model)
    assert flow.pseudo_loc.shape == (7, 1, 1)
    assert torch.allclose(flow.pseudo_loc.flatten(), Y, atol=1e-5)
    assert torch.allclose(flow.pseudo_log_prec.flatten(), -2 * S.log(), atol=1e-5)
