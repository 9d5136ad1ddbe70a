"""The transforms' cache never hands back a stale value, whatever updates the parameters.

The trap (Pyro #2564 and our issue 9): a Pyro model scores the same observed-data tensor with a
flow likelihood at every SVI step. Pyro's ``ClippedAdam`` writes ``p.data`` in place, which
bumps no version counter, so a cache keyed on the input's identity and version counters hands
back last step's inverse (and its freed graph). Each case trains for a few steps and then checks
the loss against a cache-free evaluation of the same parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_flows_ext as pfe
from pyro_flows_ext.transforms import CachedTransformModule, affine_coupling, glow_step

N, D = 32, 4


def _likelihoods() -> dict[str, Callable[[], nn.Module]]:
    return {
        "affine_coupling": lambda: affine_coupling(D, hidden_dims=[8]),
        "glow_step": lambda: glow_step(D, hidden_dims=[8]),
        "glow_image": lambda: pfe.glow((1, 4, 4), depth=2, hidden_channels=4).transform,
    }


def _event_shape(name: str) -> tuple[int, ...]:
    return (1, 4, 4) if name == "glow_image" else (D,)


def _clear_all(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, CachedTransformModule):
            m.clear_cache()


def _model_and_guide(transform: nn.Module, shape: tuple[int, ...]):
    def model(data):
        pyro.module("likelihood", transform)
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand(list(shape)).to_event(len(shape)))
        base = dist.Normal(loc, 1.0).to_event(len(shape))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.TransformedDistribution(base, [transform]), obs=data)

    return model, AutoNormal(model)


OPTIMIZERS = {
    "ClippedAdam": lambda: pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.999, "clip_norm": 10.0}),
    "Adam": lambda: pyro.optim.Adam({"lr": 0.05}),
    "torch_SGD": lambda: pyro.optim.PyroOptim(torch.optim.SGD, {"lr": 1e-4}),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("likelihood", list(_likelihoods()))
def test_svi_on_fixed_data_matches_a_cache_free_evaluation(likelihood, optimizer):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    shape = _event_shape(likelihood)
    transform = _likelihoods()[likelihood]()
    data = torch.randn((N, *shape)) * 2 + 1  # one tensor object, scored at every step
    model, guide = _model_and_guide(transform, shape)
    svi = SVI(model, guide, OPTIMIZERS[optimizer](), Trace_ELBO())
    before = [p.detach().clone() for p in transform.parameters()]
    for _ in range(5):
        loss = svi.step(data)  # step 2 raised "backward through the graph a second time"
    assert torch.isfinite(torch.tensor(loss))
    moved = [not torch.equal(a, b) for a, b in zip(before, transform.parameters(), strict=True)]
    assert any(moved), "the likelihood's parameters never changed: the test would prove nothing"

    # the log-likelihood of the data now, through the cache, against a fresh evaluation
    loc = torch.zeros(shape)
    with torch.no_grad():
        cached = dist.TransformedDistribution(
            dist.Normal(loc, 1.0).to_event(len(shape)), [transform]
        ).log_prob(data)
        _clear_all(transform)
        fresh_module = copy.deepcopy(transform)
        for m in fresh_module.modules():
            if isinstance(m, CachedTransformModule):
                m._cache_size = 0
        fresh = dist.TransformedDistribution(
            dist.Normal(loc, 1.0).to_event(len(shape)), [fresh_module]
        ).log_prob(data)
    torch.testing.assert_close(cached, fresh)


@pytest.mark.parametrize("update", ["data_copy", "load_state_dict", "torch_adam", "clipped_adam"])
def test_inverse_of_a_repeated_input_follows_every_kind_of_update(update):
    torch.manual_seed(0)
    t = affine_coupling(D, hidden_dims=[8])
    other = affine_coupling(D, hidden_dims=[8])
    for p in other.parameters():
        nn.init.normal_(p, std=0.3)
    data = torch.randn(N, D)
    x_old = t.inv(data)
    ld_old = t.log_abs_det_jacobian(x_old, data)
    if update == "data_copy":
        for p, q in zip(t.parameters(), other.parameters(), strict=True):
            p.data.copy_(q.data)
    elif update == "load_state_dict":
        t.load_state_dict(other.state_dict())
    else:
        params = list(t.parameters())
        loss = -(t.log_abs_det_jacobian(t.inv(data + 0), data).sum())
        loss = loss + t.inv(data + 0).pow(2).sum()
        loss.backward()
        if update == "torch_adam":
            torch.optim.Adam(params, lr=0.5).step()
        else:
            pyro.optim.clipped_adam.ClippedAdam(params, lr=0.5).step()
    x_new = t.inv(data)
    ld_new = t.log_abs_det_jacobian(x_new, data)
    expected_x, expected_ld = t._backward(data)
    torch.testing.assert_close(x_new, expected_x)
    torch.testing.assert_close(ld_new, expected_ld)
    assert not torch.allclose(x_new, x_old)
    assert not torch.allclose(ld_new, ld_old)


def test_the_cheap_paths_stay_cached():
    """rsample then log_prob of the draw, and log_prob of data, evaluate each network once."""
    torch.manual_seed(0)
    t = affine_coupling(D, hidden_dims=[8])
    calls = []
    t.conditioner.register_forward_hook(lambda *_: calls.append(1))
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [t])
    z = q.rsample((5,))
    q.log_prob(z)
    assert len(calls) == 1  # the inverse of the output just produced is a cache hit
    calls.clear()
    q.log_prob(torch.randn(5, D))
    assert len(calls) == 1  # inv(data) once, its log-det from the cache


def test_an_optimizer_step_invalidates_the_output_of_the_last_call():
    """Even the inverse of the flow's own last output is recomputed after a ClippedAdam step
    (which bumps no version counter)."""
    torch.manual_seed(0)
    t = affine_coupling(D, hidden_dims=[8])
    for p in t.parameters():
        p.grad = torch.randn_like(p)
    x = torch.randn(3, D)
    y = t(x)
    pyro.optim.clipped_adam.ClippedAdam(list(t.parameters()), lr=0.5).step()
    x_again = t.inv(y)
    assert x_again is not x
    torch.testing.assert_close(x_again, t._backward(y)[0])
