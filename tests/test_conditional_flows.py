"""Conditional density models ``p(x | c)``: builders with ``context_dim``, ``Flow.log_prob`` /
``sample`` / ``rsample`` with a context, and Pyro's ``ConditionalTransformedDistribution``."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext.flows import Flow, build_flow, glow, realnvp

K = 3
CASES = {
    "glow-image-affine": lambda: glow((1, 8, 8), depth=2, hidden_channels=4, context_dim=K),
    "glow-image-spline": lambda: glow(
        (1, 4, 4), depth=1, hidden_channels=4, coupling="spline", context_dim=K
    ),
    "glow-vector": lambda: glow(4, depth=2, hidden_dims=[8], context_dim=K),
    "realnvp-image-split-prior": lambda: realnvp(
        (1, 4, 4), levels=2, depth=1, hidden_channels=4, split_prior=True, context_dim=K
    ),
    "realnvp-vector-spline": lambda: realnvp(
        3, depth=2, hidden_dims=[8], coupling="spline", context_dim=K
    ),
}


def _make(name: str) -> Flow:
    torch.manual_seed(0)
    flow = CASES[name]().double()
    x = torch.randn(8, *flow.event_shape, dtype=torch.float64)
    flow.log_prob(x, context=torch.randn(8, K, dtype=torch.float64))  # ActNorm init
    with torch.no_grad():  # move off the identity so the context matters
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


@pytest.fixture(params=sorted(CASES))
def flow(request: pytest.FixtureRequest) -> Flow:
    return _make(request.param)


def test_shapes_and_broadcasting(flow: Flow) -> None:
    x = torch.randn(5, *flow.event_shape, dtype=torch.float64)
    c = torch.randn(5, K, dtype=torch.float64)
    assert flow.log_prob(x, context=c).shape == (5,)
    assert flow.log_prob(x, context=c[0]).shape == (5,)  # one context for the whole batch
    assert flow.sample((2,), context=c).shape == (2, 5, *flow.event_shape)
    assert flow.sample(context=c[0]).shape == flow.event_shape
    assert flow.rsample((3,), temperature=0.5, context=c[:2]).shape == (3, 2, *flow.event_shape)


def test_every_example_under_every_context(flow: Flow) -> None:
    """``x`` of shape ``(N, 1, *event)`` with contexts ``(K, C)`` scores ``(N, K)``: example
    ``n`` under context ``k`` (issue 17, item 8)."""
    x = torch.randn(4, 1, *flow.event_shape, dtype=torch.float64)
    c = torch.randn(3, K, dtype=torch.float64)
    pairs = flow.log_prob(x, context=c)
    assert pairs.shape == (4, 3)
    for k in range(3):
        one = flow.log_prob(x[:, 0], context=c[k].expand(4, K))
        torch.testing.assert_close(pairs[:, k], one)


def test_a_context_batch_that_does_not_match_names_context(flow: Flow) -> None:
    x = torch.randn(5, *flow.event_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"context.*\(6,\).*x.*\(5,\)"):
        flow.log_prob(x, context=torch.randn(6, K, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0, True])
def test_a_temperature_that_is_not_finite_and_positive_is_an_error(
    flow: Flow, temperature: float
) -> None:
    with pytest.raises(ValueError, match="temperature"):
        flow.sample((2,), context=torch.zeros(K, dtype=torch.float64), temperature=temperature)


def test_the_context_changes_the_density(flow: Flow) -> None:
    x = torch.randn(4, *flow.event_shape, dtype=torch.float64)
    c0, c1 = torch.zeros(K, dtype=torch.float64), torch.ones(K, dtype=torch.float64)
    assert not torch.allclose(flow.log_prob(x, context=c0), flow.log_prob(x, context=c1))


def test_log_prob_matches_the_change_of_variables_for_each_context(flow: Flow) -> None:
    """One context per example equals scoring each example with its own context."""
    x = torch.randn(3, *flow.event_shape, dtype=torch.float64)
    c = torch.randn(3, K, dtype=torch.float64)
    each = torch.stack([flow.log_prob(x[i : i + 1], context=c[i])[0] for i in range(3)])
    torch.testing.assert_close(flow.log_prob(x, context=c), each)


def test_round_trip_and_gradients_reach_every_parameter(flow: Flow) -> None:
    c = torch.randn(6, K, dtype=torch.float64)
    y = flow.rsample(context=c)
    z = flow.condition(c).transforms[0].inv(y.detach().clone())
    back = flow.condition(c).transforms[0](z)
    torch.testing.assert_close(back, y.detach(), atol=1e-8, rtol=1e-8)
    loss = -flow.log_prob(y.detach(), context=c).sum() + y.pow(2).sum()
    loss.backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_composes_with_pyro_conditional_transformed_distribution(flow: Flow) -> None:
    c = torch.randn(2, K, dtype=torch.float64)
    d = flow.dist
    assert isinstance(d, dist.ConditionalTransformedDistribution)
    x = torch.randn(2, *flow.event_shape, dtype=torch.float64)
    torch.testing.assert_close(d.condition(c).log_prob(x), flow.log_prob(x, context=c))


def test_config_rebuilds_a_conditional_flow() -> None:
    flow = glow((1, 8, 8), depth=1, hidden_channels=4, coupling="spline", context_dim=K)
    again = build_flow(flow.config)
    assert again.context_dim == K and again.config == flow.config
    again.load_state_dict(flow.state_dict())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f: f.log_prob(torch.zeros(2, 4)), ValueError, "needs context"),
        (lambda f: f.log_prob(torch.zeros(2, 4), context=torch.zeros(2, K + 1)), ValueError,
         "context must have event shape"),
        (lambda f: f.log_prob(torch.zeros(2, 4), context=torch.zeros(2, K).double()), ValueError,
         "context must be"),
        (lambda f: f.sample((2,), context=[0.0] * K), TypeError, "context"),
        (lambda f: glow(4, depth=1).log_prob(torch.zeros(2, 4), context=torch.zeros(K)),
         ValueError, "not conditional"),
        (lambda f: glow(4, context_dim=-1), ValueError, "context_dim"),
    ],
    ids=["missing", "wrong-size", "wrong-dtype", "not-a-tensor", "unconditional", "negative"],
)  # fmt: skip
def test_bad_contexts(call, error, match) -> None:
    flow = glow(4, depth=1, hidden_dims=[8], context_dim=K)
    with pytest.raises(error, match=match):
        call(flow)
