"""AutoHierarchicalFlow on groups that share likelihood terms (infer.hierarchical.crossed):
which groups are found to share terms, the sequential conditionals against the closed-form
Gaussian of a crossed linear model, and independent groups left as they were."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from pyro_flows_ext.infer import AutoHierarchicalFlow
from pyro_flows_ext.infer.hierarchical.crossed import condition_stages, shared_terms
from pyro_flows_ext.infer.hierarchical.newton import PrecisionAffine

GEN = torch.Generator().manual_seed(3)
A, B, REPEATS = 3, 2, 2  # every (a, b) cell observed REPEATS times
IA = torch.arange(A).repeat_interleave(B).repeat(REPEATS)
IB = torch.arange(B).repeat(A).repeat(REPEATS)
SA, SB, SY = 1.0, 0.7, 0.5
Y = torch.randn(len(IA), generator=GEN, dtype=torch.float64) + 1.0
PREFIX = "_AutoHierarchicalFlow_"


def crossed(y: torch.Tensor) -> None:
    """Two crossed random effects and an intercept; known scales."""
    b0 = pyro.sample("b0", dist.Normal(0.0, 1.0))
    with pyro.plate("a", A, dim=-1):
        ea = pyro.sample("ea", dist.Normal(0.0, SA))
    with pyro.plate("b", B, dim=-1):
        eb = pyro.sample("eb", dist.Normal(0.0, SB))
    with pyro.plate("obs", len(y), dim=-1):
        pyro.sample("y", dist.Normal(b0 + ea[..., IA] + eb[..., IB], SY), obs=y)


def index_nested(y: torch.Tensor) -> None:
    """States nested in regions through an index (not through plates)."""
    region = torch.tensor([0, 0, 1, 1])
    with pyro.plate("region", 2, dim=-1):
        er = pyro.sample("er", dist.Normal(0.0, 1.0))
    with pyro.plate("state", 4, dim=-1):
        es = pyro.sample("es", dist.Normal(er[..., region], 0.5))
        pyro.sample("y", dist.Normal(es, 1.0), obs=y[:4])


def plate_nested(y: torch.Tensor) -> None:
    """A child group in its parent's plate and one more: one leaf."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("county", 3, dim=-1):
        a = pyro.sample("a", dist.Normal(mu, 1.0))
        with pyro.plate("house", 2, dim=-2):
            h = pyro.sample("h", dist.Normal(a, 1.0))
            pyro.sample("y", dist.Normal(h, 1.0), obs=y[:6].reshape(2, 3))


def independent(y: torch.Tensor) -> None:
    """Two groups, each with its own data."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("a", 3, dim=-1):
        ea = pyro.sample("ea", dist.Normal(mu, 1.0))
        pyro.sample("ya", dist.Normal(ea, 1.0), obs=y[:3])
    with pyro.plate("b", 4, dim=-1):
        eb = pyro.sample("eb", dist.Normal(mu, 1.0))
        pyro.sample("yb", dist.Normal(eb, 1.0), obs=y[3:7])


def built(model) -> AutoHierarchicalFlow:
    pyro.clear_param_store()
    return AutoHierarchicalFlow(model).initialize(Y)


def found(guide: AutoHierarchicalFlow) -> list[frozenset[int]]:
    s = guide.structure
    args = (guide._plain_model, s, guide.prototype_trace)
    g0 = s.initial_globals(guide.prototype_trace)
    return shared_terms(*args, g0, s.leaves, (Y,), {})


def names(guide: AutoHierarchicalFlow, ks) -> set[str]:
    return {guide.structure.groups[k].name for k in ks}


def test_crossed_and_index_nested_groups_share_terms_others_not() -> None:
    guide = built(crossed)
    assert [names(guide, ks) for ks in found(guide)] == [{"a", "b"}]
    a, b = (next(k for k in range(2) if guide.structure.groups[k].name == n) for n in "ab")
    assert guide._stages == {a: 1, b: 0}  # fewest elements first
    assert condition_stages(guide.structure, [a, b], found(guide), "largest") == {a: 0, b: 1}
    guide = built(index_nested)
    assert [names(guide, ks) for ks in found(guide)] == [{"region", "state"}]
    assert sorted(guide._stages.values()) == [0, 1]
    for model in (plate_nested, independent):
        guide = built(model)
        assert found(guide) == []
        assert set(guide._stages.values()) == {0}


def exact_joint(b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(A + B,)`` and precision of (ea, eb) given the intercept."""
    z = torch.cat([torch.eye(A)[IA], torch.eye(B)[IB]], -1).double()
    prior = torch.diag(torch.tensor([SA**-2] * A + [SB**-2] * B, dtype=torch.float64))
    prec = prior + z.T @ z / SY**2
    return torch.linalg.solve(prec, z.T @ (Y - b0) / SY**2), prec


def newton_layer(trace, group: str) -> PrecisionAffine:
    layer = trace.nodes[PREFIX + group]["fn"].transforms[-1]
    assert isinstance(layer, PrecisionAffine)
    return layer


def test_second_group_draws_the_exact_conditional_given_the_first_draw() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        guide = built(crossed)
        pyro.set_rng_seed(0)
        trace = pyro.poutine.trace(guide).get_trace(Y)
    finally:
        torch.set_default_dtype(torch.float32)
    order = sorted(guide._stages, key=guide._stages.get)
    first, second = (guide.structure.groups[k].name for k in order)
    at = {"a": slice(0, A), "b": slice(A, A + B)}
    i, j = at[first], at[second]
    b0 = trace.nodes[PREFIX + "globals"]["value"][0].detach()
    u1 = trace.nodes[PREFIX + first]["value"].detach()
    u2 = trace.nodes[PREFIX + second]["value"].detach()
    mean, prec = exact_joint(b0)
    # q(u2 | u1, b0): the exact conditional, mean and (diagonal: no u2-u2 coupling) precision
    want_mean = mean[j] - torch.linalg.solve(prec[j, j], prec[j, i] @ (u1[:, 0] - mean[i]))
    layer = newton_layer(trace, second)
    assert torch.allclose(layer.loc[:, 0], want_mean, atol=1e-9)
    assert torch.allclose(torch.diag_embed(layer.chol[:, 0, 0] ** 2), prec[j, j], atol=1e-9)
    # q(u1 | b0): the conditional at u2's anchor, its precision the u1-u1 block
    chol = newton_layer(trace, first).chol
    assert torch.allclose(torch.diag_embed(chol[:, 0, 0] ** 2), prec[i, i], atol=1e-9)
    # the fresh guide's density of its draw is the Newton Gaussians' (its networks start at 0)
    want = dist.Normal(want_mean, prec[j, j].diagonal() ** -0.5).log_prob(u2[:, 0]).sum()
    got = trace.nodes[PREFIX + second]["fn"].log_prob(u2).sum()
    assert torch.allclose(got, want, atol=1e-9)
    # and the guide replayed at its draw scores it as it sampled it
    replayed = pyro.poutine.trace(pyro.poutine.replay(guide, trace=trace)).get_trace(Y)
    trace.compute_log_prob()
    replayed.compute_log_prob()
    for site in ("globals", first, second):
        before, after = (t.nodes[PREFIX + site]["log_prob_sum"] for t in (trace, replayed))
        assert torch.allclose(before, after, atol=1e-9)


def test_independent_groups_take_one_model_run_and_their_joint_conditionals() -> None:
    calls = []

    def counted(y: torch.Tensor) -> None:
        calls.append(1)
        independent(y)

    guide = built(counted)
    before = len(calls)
    pyro.set_rng_seed(1)
    trace = pyro.poutine.trace(guide).get_trace(Y)
    assert len(calls) - before == 1  # the one run of every group's Newton step
    g = trace.nodes[PREFIX + "globals"]["value"]
    indices = {"a": torch.arange(3), "b": torch.arange(4)}
    at_once = guide._conditionals(g, {}, indices, (Y,), {})  # every group in one run
    for k, (mean, chol) in at_once.items():
        layer = newton_layer(trace, guide.structure.groups[k].name)
        assert torch.equal(layer.loc, mean) and torch.equal(layer.chol, chol)


def test_sticking_the_landing_runs_through_the_sequential_conditionals() -> None:
    guide = AutoHierarchicalFlow(crossed, stl=True).initialize(Y.float())
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    elbo.differentiable_loss(crossed, guide, Y.float()).backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_sticking_the_landing_score_detaches_the_earlier_groups_draw() -> None:
    guide = AutoHierarchicalFlow(crossed, stl=True).initialize(Y.float())
    trace = pyro.poutine.trace(guide).get_trace(Y.float())
    first, second = (
        guide.structure.groups[k].name for k in sorted(guide._stages, key=guide._stages.get)
    )
    u1 = trace.nodes[PREFIX + first]["value"]
    u2 = trace.nodes[PREFIX + second]["value"]
    q = trace.nodes[PREFIX + second]["fn"]
    score = q.score.log_prob(u2.detach()).sum()
    assert torch.allclose(score, q.base.log_prob(u2).sum())  # the same density
    assert u1.requires_grad and torch.autograd.grad(score, u1, allow_unused=True)[0] is None
    params = [p for p in guide.parameters() if p.requires_grad]
    assert any(g is not None for g in torch.autograd.grad(score, params, allow_unused=True))
