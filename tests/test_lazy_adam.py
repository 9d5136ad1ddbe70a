"""LazyClippedAdam: per-element rows move only when visited, everything else is ClippedAdam."""

from __future__ import annotations

import copy
import math
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from test_infer_hierarchical import funnel

from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow, fit_guide
from pyro_flows_ext.infer.fitting import svi as svi_module
from pyro_flows_ext.optim import (
    LazyClippedAdam,
    is_per_element,
    lazy_clipped_adam,
    mark_per_element,
)

OPTIONS = {"lr": 0.05, "betas": (0.8, 0.95), "clip_norm": 0.7, "lrd": 0.97, "weight_decay": 0.1}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def brute_force_rows(
    start: torch.Tensor, grads: list[torch.Tensor], visits: list[list[int]], o: dict
) -> torch.Tensor:
    """Every row its own Adam (ClippedAdam's formulas, in float64 Python scalars) that steps
    only when visited, with its own step count; the step size decays at every step."""
    x = start.double().clone()
    m, v, count = torch.zeros_like(x), torch.zeros_like(x), [0] * len(x)
    (b1, b2), lr = o["betas"], o["lr"]
    for grad, rows in zip(grads, visits, strict=True):
        lr *= o["lrd"]
        for r in rows:
            count[r] += 1
            g = grad[r].double().clamp(-o["clip_norm"], o["clip_norm"]) + o["weight_decay"] * x[r]
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            size = lr * math.sqrt(1 - b2 ** count[r]) / (1 - b1 ** count[r])
            x[r] = x[r] - size * m[r] / (v[r].sqrt() + 1e-8)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_lazy_rows_equal_brute_force_per_row_adam(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 3, generator=gen, dtype=dtype)
    visits = [[0, 1, 2, 3, 4, 5], [0, 2], [2, 5], [], [1, 2, 4], [2]]
    grads = []
    for rows in visits:
        g = torch.zeros(6, 3, dtype=dtype)
        g[rows] = torch.randn(len(rows), 3, generator=gen, dtype=dtype)
        grads.append(g)
    p = mark_per_element(torch.nn.Parameter(start.clone()))
    opt = LazyClippedAdam([p], **OPTIONS)
    for g in grads:
        before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        p.grad = g.clone()
        opt.step()
        untouched = g.ne(0).any(-1).logical_not()
        for key, old in before.items():  # the state of unvisited rows is left alone
            assert torch.equal(opt.state[p][key][untouched], old[untouched]), key
    expected = brute_force_rows(start, grads, visits, OPTIONS)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(p.detach().double(), expected, rtol=tol, atol=tol)
    assert opt.state[p]["row_step"].tolist() == [2, 2, 5, 1, 2, 2]
    assert opt.state[p]["exp_avg"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_dense_parameter_gets_clipped_adams_update_to_the_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(5, 2, generator=gen, dtype=dtype)
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    lazy, reference = LazyClippedAdam([p], **OPTIONS), ClippedAdam([q], **OPTIONS)
    for _ in range(5):
        g = torch.randn(5, 2, generator=gen, dtype=dtype)
        p.grad, q.grad = g.clone(), g.clone()
        lazy.step()
        reference.step()
        assert torch.equal(p, q)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(lazy.state[p][key], reference.state[q][key])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lr": -1.0}, "lr must be > 0"),
        ({"lr": "fast"}, "lr must be a real number"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be >= 0"),
        ({"clip_norm": 0.0}, "clip_norm must be > 0"),
        ({"lrd": 0.0}, "lrd must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"eps": math.inf}, "eps must be > 0 and finite"),
    ],
)
def test_bad_options_name_what_was_expected(options: dict, match: str) -> None:
    exc = TypeError if options.get("lr") == "fast" else ValueError
    with pytest.raises(exc, match=match):
        lazy_clipped_adam(options)
    with pytest.raises(exc, match=match):
        LazyClippedAdam([torch.zeros(1, requires_grad=True)], **options)


def test_bad_inputs_name_what_was_expected() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        lazy_clipped_adam({"momentum": 0.9})
    with pytest.raises(TypeError, match="optim_args must be a dict"):
        lazy_clipped_adam(0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2-D"):
        mark_per_element(torch.zeros(4, requires_grad=True))
    p = mark_per_element(torch.nn.Parameter(torch.zeros(3, 2)))
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(TypeError, match="dense gradients"):
        LazyClippedAdam([p]).step()


def logistic(y: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("g", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Bernoulli(logits=theta), obs=(y[i] > 0).to(theta))


def capture_optim(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The PyroOptim that fit_guide builds, appended to the returned list."""
    built: list[Any] = []

    def recording(options: dict) -> Any:
        built.append(lazy_clipped_adam(options))
        return built[-1]

    monkeypatch.setattr(svi_module, "lazy_clipped_adam", recording)
    return built


@pytest.mark.parametrize(
    "model, newton", [(logistic, True), (funnel, False)], ids=["newton", "learned_gaussian"]
)
def test_fit_guide_step_touches_only_the_subsample(monkeypatch, model, newton) -> None:
    # with Newton conditionals a normal likelihood gives the pseudo-likelihood no gradient
    # (the Newton step does not depend on where it starts): a logistic one here
    y = torch.randn(12)
    batches = [[0, 1, 2], [3, 4, 5], [0, 3, 6], [1, 7, 8], [9, 10, 11]]
    step = {"k": 0}

    def plates(y: torch.Tensor, batch: int | None = None) -> Any:
        return pyro.plate("g", len(y), subsample=torch.tensor(batches[step["k"]]))

    guide = AutoHierarchicalFlow(model, newton=newton, create_plates=plates)
    built = capture_optim(monkeypatch)
    snapshots: list[dict[str, dict[str, torch.Tensor]]] = []

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        store = pyro.get_param_store()
        out = {}
        for name, p in store.named_parameters():
            if is_per_element(p):
                state = built[0].optim_objs[p].state[p]
                out[name] = {"value": p.detach().clone()} | {
                    k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "row_step")
                }
        return out

    def callback(taken: int, loss: float) -> None:
        snapshots.append(snapshot())
        step["k"] = taken

    fit_guide(model, guide, y, 3, steps=len(batches), num_particles=2, progress=False,
              callback=callback)  # fmt: skip
    flow = guide.local_flows[0]
    per_element = [guide.embeddings["g"], flow.pseudo_loc_raw, flow.pseudo_log_prec_raw]
    assert all(is_per_element(p) for p in per_element)
    assert len(snapshots[0]) == len(per_element)
    for k in range(1, len(batches)):
        visited = torch.zeros(12, dtype=torch.bool)
        visited[batches[k]] = True
        for name, now in snapshots[k].items():
            before = snapshots[k - 1][name]
            for key, tensor in now.items():
                rows = tensor.reshape(12, -1)
                old = before[key].reshape(12, -1)
                assert torch.equal(rows[~visited], old[~visited]), (k, name, key)
                assert (rows[visited] != old[visited]).any(-1).all(), (k, name, key)


def coupling_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize("kind", ["coupling", "hierarchical_newton", "hierarchical_gaussian"])
def test_fit_guide_without_subsampling_fits_as_with_clipped_adam(kind: str) -> None:
    y = torch.tensor([1.0, -0.5, 2.0, 0.3])
    model = coupling_model if kind == "coupling" else funnel

    def fitted(lazy: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        if kind == "coupling":
            guide: Any = AutoCouplingFlow(model, depth=1)
            args: tuple = (y[:2],)
        else:
            guide = AutoHierarchicalFlow(model, newton=kind == "hierarchical_newton")
            args = (y,)
        history = fit_guide(model, guide, *args, steps=6, num_particles=2, progress=False,
                            lazy=lazy)  # fmt: skip
        store = pyro.get_param_store()
        return history.loss, {n: p.detach().clone() for n, p in store.named_parameters()}

    (lazy_loss, lazy_params), (loss, params) = fitted(True), fitted(False)
    assert lazy_loss == loss
    assert lazy_params.keys() == params.keys()
    assert all(torch.equal(lazy_params[n], params[n]) for n in params)


def test_optimiser_state_round_trips_through_pyro() -> None:
    # what a checkpoint of an SVI run holds: PyroOptim.get_state, then set_state on a new one
    y = torch.randn(10)

    def plates(y: torch.Tensor, batch: int | None = None) -> Any:
        return pyro.plate("g", len(y), subsample_size=3)

    guide = AutoHierarchicalFlow(funnel, newton=False, create_plates=plates)
    optim = lazy_clipped_adam({"lr": 0.02, "clip_norm": math.inf})
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    svi = SVI(funnel, guide, optim, elbo)
    for _ in range(3):
        svi.step(y, 3)
    store = pyro.get_param_store()
    saved_params, saved_optim = copy.deepcopy((store.get_state(), optim.get_state()))
    pyro.set_rng_seed(7)
    straight = [svi.step(y, 3) for _ in range(3)]
    p = guide.embeddings["g"]
    counts = optim.optim_objs[p].state[p]["row_step"].clone()

    store.set_state(saved_params)
    resumed_optim = lazy_clipped_adam({"lr": 0.02, "clip_norm": math.inf})
    resumed_optim.set_state(saved_optim)
    svi = SVI(funnel, guide, resumed_optim, elbo)
    pyro.set_rng_seed(7)
    assert [svi.step(y, 3) for _ in range(3)] == straight
    assert torch.equal(resumed_optim.optim_objs[p].state[p]["row_step"], counts)
