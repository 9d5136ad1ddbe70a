"""The Newton-step conditionals of AutoHierarchicalFlow (infer.hierarchical.newton): exact for
normal models with correlated locals, against the closed form; the fallback; the transform."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_median

from pyro_flows_ext.infer import AutoHierarchicalFlow
from pyro_flows_ext.infer.hierarchical.newton import MAX_STEP, PrecisionAffine, newton_gaussian

GROUPS, ROWS = 6, 5
GEN = torch.Generator().manual_seed(0)
X = torch.randn(ROWS, GROUPS, generator=GEN, dtype=torch.float64)
Y = 1.0 + 0.5 * X + torch.randn(ROWS, GROUPS, generator=GEN, dtype=torch.float64)


def regression(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> None:
    """Varying intercept and slope (two correlated locals per group), radon's form."""
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 5.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(1.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    with pyro.plate("g", y.shape[-1], subsample_size=batch, dim=-1) as i:
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
        with pyro.plate("rows", y.shape[-2], dim=-2):
            pyro.sample("y", dist.Normal(a + b * x[:, i], sigma_y), obs=y[:, i])


def exact_conditional(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Mean ``(G, 2)`` and precision ``(G, 2, 2)`` of (a_i, b_i) given the unconstrained
    globals ``g = (mu_a, mu_b, log sigma_a, log sigma_b, log sigma_y)``."""
    mu = g[:2]
    sa, sb, sy = g[2:].exp()
    design = torch.stack([torch.ones_like(x), x], dim=-1).transpose(0, 1)  # (G, rows, 2)
    prior = torch.diag(torch.stack([sa**-2, sb**-2]))
    prec = prior + design.transpose(-1, -2) @ design / sy**2
    rhs = prior @ mu + (design.transpose(-1, -2) @ y.T.unsqueeze(-1)).squeeze(-1) / sy**2
    return torch.linalg.solve(prec, rhs), prec


def conditionals(guide, g, *args):
    indices = {"g": torch.arange(GROUPS)}
    ((mean, chol),) = guide._conditionals(g, {}, indices, args, {}).values()
    return mean, chol @ chol.transpose(-1, -2)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    default = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(default)


def test_newton_conditional_is_the_exact_gaussian_conditional(dtype) -> None:
    x, y = X.to(dtype), Y.to(dtype)
    guide = AutoHierarchicalFlow(regression).initialize(x, y)
    assert guide._newton_groups == {0} and guide.structure.groups[0].dim == 2
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for g in ([0.0, 0.0, 0.0, 0.0, 0.0], [1.5, -0.5, -1.0, -3.0, 0.7]):  # the start and far
        g = torch.tensor(g, dtype=dtype)
        mean, prec = conditionals(guide, g, x, y)
        want_mean, want_prec = exact_conditional(g.double(), X, Y)
        assert torch.allclose(mean.double(), want_mean, rtol=tol, atol=tol)
        assert torch.allclose(prec.double(), want_prec, rtol=tol, atol=tol * want_prec.abs().max())


def masked_scalar(y: torch.Tensor, mask: torch.Tensor) -> None:
    """One normal local per group, rows in a padded ``(rows, groups)`` grid with a mask."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("g", y.shape[-1], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("rows", y.shape[-2], dim=-2), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(theta, 0.5), obs=y)


def test_scalar_conditionals_of_a_masked_grid_are_exact_and_differentiable() -> None:
    # F = 1 (one Hessian-vector product, the scalar Gaussian); the padding's values must
    # reach neither the conditionals nor their gradient
    mask = torch.arange(ROWS).unsqueeze(-1) < torch.arange(1, GROUPS + 1).clamp(max=ROWS)
    y = torch.where(mask, Y.float(), 1e3)
    guide = AutoHierarchicalFlow(masked_scalar).initialize(y, mask)
    g = torch.tensor([0.8, -0.4], requires_grad=True)  # mu, log tau
    mean, prec = conditionals(guide, g, y, mask)
    want_prec = g[1].mul(-2).exp() + mask.sum(0) / 0.25
    want_mean = (g[0] * g[1].mul(-2).exp() + torch.where(mask, y, 0).sum(0) / 0.25) / want_prec
    assert torch.allclose(prec[..., 0, 0], want_prec, rtol=1e-5)
    assert torch.allclose(mean[..., 0], want_mean, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((mean[..., 0] + prec[..., 0, 0]).sum(), g)[0]
    want = torch.autograd.grad((want_mean + want_prec).sum(), g)[0]
    assert torch.allclose(got, want, rtol=1e-4)


def test_conditional_follows_each_particles_globals() -> None:
    guide = AutoHierarchicalFlow(regression).initialize(X, Y)
    g = torch.randn(3, 1, 1, 5, generator=GEN)  # three particles left of the model's plates
    mean, prec = conditionals(guide, g, X, Y)
    assert mean.shape == (3, 1, GROUPS, 2) and prec.shape == (3, 1, GROUPS, 2, 2)
    mean, prec = mean.squeeze(1), prec.squeeze(1)
    for k in range(3):
        want_mean, want_prec = exact_conditional(g[k, 0, 0].double(), X, Y)
        assert torch.allclose(mean[k].double(), want_mean, atol=1e-4)
        assert torch.allclose(prec[k].double(), want_prec, rtol=1e-4)


def test_fresh_guide_draws_the_exact_conditional_and_its_log_density() -> None:
    # the networks start at zero: q(a, b | globals) is the Newton Gaussian itself
    guide = AutoHierarchicalFlow(regression).initialize(X, Y)
    trace = pyro.poutine.trace(guide).get_trace(X, Y)
    g = trace.nodes["_AutoHierarchicalFlow_globals"]["value"]
    u = trace.nodes["_AutoHierarchicalFlow_g"]["value"]
    mean, prec = exact_conditional(g.double(), X, Y)
    want = dist.MultivariateNormal(mean, precision_matrix=prec).log_prob(u.double())
    got = trace.nodes["_AutoHierarchicalFlow_g"]["fn"].log_prob(u)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_gradient_reaches_the_globals_through_the_conditionals() -> None:
    guide = AutoHierarchicalFlow(regression).initialize(X, Y)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True).differentiable_loss(
        regression, guide, X, Y
    )
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())


def test_subsampled_conditionals_are_those_of_the_subsample() -> None:
    guide = AutoHierarchicalFlow(regression).initialize(X, Y, 3)
    g = torch.tensor([0.3, 0.1, -0.5, -1.0, 0.2])
    index = torch.tensor([4, 1, 2])
    ((mean, chol),) = guide._conditionals(g, {}, {"g": index}, (X, Y, 3), {}).values()
    want_mean, want_prec = exact_conditional(g.double(), X, Y)
    assert torch.allclose(mean.double(), want_mean[index], atol=1e-4)
    assert torch.allclose((chol @ chol.transpose(-1, -2)).double(), want_prec[index], rtol=1e-4)


def test_full_plate_draws_of_a_subsampling_model_are_exact_conditionals() -> None:
    # median() reads the full plate in chunks of the model's subsample size
    guide = AutoHierarchicalFlow(regression).initialize(X, Y, 4)
    median = guide.median(X, Y, 4)
    g = torch.stack([median["mu_a"], median["mu_b"]] + [median[k].log() for k in
                    ("sigma_a", "sigma_b", "sigma_y")])  # fmt: skip
    want_mean, _ = exact_conditional(g.double(), X, Y)
    got = torch.stack([median["a"], median["b"]], -1).double()
    assert torch.allclose(got, want_mean, atol=1e-4)


def test_newton_gaussian_falls_back_where_the_precision_is_not_positive() -> None:
    u0 = torch.zeros(2, 2)
    grad = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    prec = torch.stack([torch.eye(2) * 2.0, torch.tensor([[1.0, 0.0], [0.0, -1.0]])])
    loc, log_scale = torch.full((2, 2), 5.0), torch.full((2, 2), math.log(0.5))
    mean, chol = newton_gaussian(u0, grad, prec, loc, log_scale)
    assert torch.allclose(mean[0], torch.tensor([0.5, 0.0]))  # the Newton step
    assert torch.allclose(chol[0] @ chol[0].T, prec[0])
    assert torch.allclose(mean[1], loc[1]) and torch.allclose(chol[1], torch.eye(2) * 2.0)


@pytest.mark.parametrize("precision, bound_sd", [(100.0, 0.5), (1.0, 1.0), (1e-4, 100.0)])
def test_newton_step_is_bounded_in_sds_of_the_wider_gaussian(precision, bound_sd) -> None:
    # the learned Gaussian's sd is 0.5, the step's own 1 / sqrt(precision): the wider bounds
    log_scale = torch.tensor([math.log(0.5)])
    prec = torch.full((1, 1), precision)
    mean, _ = newton_gaussian(torch.zeros(1), torch.tensor([1e6]), prec, torch.zeros(1), log_scale)
    assert mean.item() == pytest.approx(MAX_STEP * bound_sd, rel=1e-5)


def test_newton_step_bound_uses_the_marginal_sd_of_correlated_features() -> None:
    # two confounded features: each marginal sd is 10, their diagonal precision's sd 0.1
    cov = torch.tensor([[100.0, 99.9], [99.9, 100.0]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    grad = prec @ torch.tensor([200.0, 200.0], dtype=torch.float64)  # the mode 200 away
    small = torch.full((2,), math.log(0.01), dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    mean, _ = newton_gaussian(zeros, grad, prec, zeros, small)
    assert torch.allclose(mean, torch.full((2,), 200.0, dtype=torch.float64))  # 20 sds: free
    mean, _ = newton_gaussian(zeros, 2 * grad, prec, zeros, small)
    assert torch.allclose(mean, torch.full((2,), MAX_STEP * 10.0, dtype=torch.float64))


def test_precision_affine_maps_the_standard_normal_to_its_gaussian() -> None:
    chol = torch.tensor([[[2.0, 0.0], [0.5, 1.5]]], dtype=torch.float64)
    loc = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    t = PrecisionAffine(loc, chol)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 2).double(), 1.0).to_event(1), [t])
    want = dist.MultivariateNormal(loc, precision_matrix=chol @ chol.transpose(-1, -2))
    z = torch.randn(7, 1, 2, generator=GEN, dtype=torch.float64)
    assert torch.allclose(t.inv(t(z)), z)
    assert torch.allclose(q.log_prob(t(z)), want.log_prob(t(z)))


def test_scalar_locals_take_the_scalar_path_and_fall_back() -> None:
    u0, grad = torch.zeros(3, 1), torch.tensor([[2.0], [1.0], [math.nan]])
    prec = torch.tensor([4.0, -1.0, 1.0]).reshape(3, 1, 1)
    loc, log_scale = torch.full((3, 1), 7.0), torch.full((3, 1), math.log(0.5))
    mean, chol = newton_gaussian(u0, grad, prec, loc, log_scale)
    assert mean.flatten().tolist() == [0.5, 7.0, 7.0] and chol.flatten().tolist() == [2.0, 2.0, 2.0]
    t = PrecisionAffine(mean, chol)
    x = torch.randn(5, 3, 1, generator=GEN)
    assert torch.allclose(t(x), mean + x / 2) and torch.allclose(t.inv(t(x)), x)
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), torch.full((5, 3), -math.log(2.0)))


def test_steps_do_not_call_init_loc_fn() -> None:
    calls = []

    def init(site):
        calls.append(site["name"])
        return init_to_median(site)

    guide = AutoHierarchicalFlow(regression, init_loc_fn=init).initialize(X, Y)
    before = len(calls)
    Trace_ELBO(num_particles=2, vectorize_particles=True).loss(regression, guide, X, Y)
    guide.median(X, Y)
    assert len(calls) == before


def test_sticking_the_landing_drops_only_the_score_of_the_conditionals() -> None:
    # at the exact conditional the STL gradient of the locals' log q is zero in expectation;
    # here: it runs through the Newton layer and reaches every parameter finitely
    guide = AutoHierarchicalFlow(regression, stl=True).initialize(X, Y)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True).differentiable_loss(
        regression, guide, X, Y
    )
    loss.backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
