"""What Pyro promises of an autoguide, asked of each of our guides, with Pyro's ``AutoNormal`` as
the control: ``Predictive`` (sequential and vectorised), ``median``/``quantiles``, the ELBOs
(``Trace_ELBO``, ``TraceMeanField_ELBO`` and their JIT twins), TorchScript tracing, saving and
restoring (``torch.save``, pickle, ``deepcopy`` before and after the first call, the param
store's ``save``/``load`` both before and after the first call, ``state_dict``),
``init_loc_fn``, subsampled and nested plates, the errors for discrete, spherical and missing
latents, ``AutoGuideList`` membership, float32 and float64, ``ClippedAdam``; and the faults a
first call must survive. Each (guide, check) pair is its own test; every model is tiny and
every fit a few steps, so the module runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Predictive,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_value

from pyro_flows_ext.infer import (
    AutoConditionalCouplingFlow,
    AutoCouplingFlow,
    AutoHierarchicalFlow,
)

Y = torch.tensor([1.5, -0.3, 2.2, 0.8])
S = torch.tensor([1.0, 2.0, 1.5, 1.0])


def hier(y: torch.Tensor) -> None:
    """Eight-schools-like: globals ``mu``, ``tau`` (positive), a local ``theta`` per group."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    with pyro.plate("g", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, S.to(theta)), obs=y)


def data_context(y: torch.Tensor) -> torch.Tensor:
    """The amortised guide's context (module level, so that the guide pickles)."""
    return y.reshape(-1) / 3


FLOW = {"depth": 1, "hidden_dims": (8,)}
GUIDES: dict[str, Callable[..., Any]] = {
    "AutoNormal": lambda model, **kw: AutoNormal(model, **kw),
    "AutoCouplingFlow": lambda model, **kw: AutoCouplingFlow(
        model, **FLOW, init_elbo_samples=32, **kw
    ),
    "AutoConditionalCouplingFlow": lambda model, **kw: AutoConditionalCouplingFlow(
        model, data_context, **FLOW, **kw
    ),
    "AutoHierarchicalFlow": lambda model, **kw: AutoHierarchicalFlow(
        model, depth=1, local_depth=1, hidden_dims=(8,), **kw
    ),
}
OURS = [name for name in GUIDES if name != "AutoNormal"]
LATENTS = {"mu": (), "tau": (), "theta": (4,)}


@pytest.fixture(params=list(GUIDES))
def kind(request: pytest.FixtureRequest) -> str:
    pyro.set_rng_seed(0)
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_tracer_warnings() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


def train(model: Callable, guide: Any, *args: Any, steps: int = 5, elbo: Any = None) -> list:
    optim = pyro.optim.ClippedAdam({"lr": 0.02})
    svi = SVI(model, guide, optim, elbo or Trace_ELBO())
    return [svi.step(*args) for _ in range(steps)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def trained(kind: str, steps: int = 5) -> Any:
    guide = GUIDES[kind](hier)
    train(hier, guide, Y, steps=steps)
    return guide


# ------------------------------------------------------------------ predictions ---------
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_predictive(kind: str, parallel: bool) -> None:
    guide = trained(kind)
    out = Predictive(hier, guide=guide, num_samples=6, parallel=parallel)(Y)
    for name, shape in LATENTS.items():  # Predictive keeps the plate dims of globals
        assert out[name].shape[0] == 6 and out[name][0].numel() == math.prod(shape), name
    assert out["y"].shape == (6, 4)
    assert (out["tau"] > 0).all()


def test_median_and_quantiles(kind: str) -> None:
    guide = trained(kind)
    median = guide.median(Y)
    assert {k: tuple(v.shape) for k, v in median.items()} == LATENTS
    assert median["tau"] > 0
    q = guide.quantiles([0.1, 0.5, 0.9], Y)
    assert {k: tuple(v.shape) for k, v in q.items()} == {k: (3, *s) for k, s in LATENTS.items()}
    for v in q.values():
        assert (v[0] <= v[1]).all() and (v[1] <= v[2]).all()


# ------------------------------------------------------------------ the ELBOs ------------
ELBOS = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "Trace_ELBO-vectorised": lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "JitTrace_ELBO": lambda: JitTrace_ELBO(),
    "JitTraceMeanField_ELBO": lambda: JitTraceMeanField_ELBO(),
}


@pytest.mark.parametrize("elbo", list(ELBOS))
def test_elbo_trains(kind: str, elbo: str) -> None:
    guide = GUIDES[kind](hier)
    guide(Y)
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    losses = train(hier, guide, Y, steps=3, elbo=ELBOS[elbo]())
    assert all(math.isfinite(loss) for loss in losses)
    moved = [k for k, v in guide.named_parameters() if not torch.equal(v, before[k])]
    assert moved


def test_clipped_adam_with_a_decaying_step_size(kind: str) -> None:
    guide = GUIDES[kind](hier)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99, "clip_norm": 10.0})
    svi = SVI(hier, guide, optim, Trace_ELBO())
    losses = [svi.step(Y) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_torchscript_trace_of_call(kind: str) -> None:
    """Pyro's own check: ``torch.jit.trace_module(guide, {"call": args})`` (every module
    attribute is read with ``hasattr`` on the way), saved, loaded, and the same draws."""
    guide = trained(kind, steps=2)
    traced = torch.jit.trace_module(guide, {"call": (Y,)}, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    pyro.set_rng_seed(1)
    got = loaded.call(Y)
    pyro.set_rng_seed(1)
    want = guide.call(Y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ saving and copying ---
def test_torch_save_and_load(kind: str) -> None:
    guide = trained(kind)
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_same(loaded.median(Y), guide.median(Y))
    pyro.clear_param_store()  # a fresh process: only the file is left
    assert_same(loaded.median(Y), guide.median(Y))
    assert set(loaded(Y)) == set(LATENTS)


def test_state_dict_into_a_fresh_guide(kind: str) -> None:
    guide = trained(kind)
    state = guide.state_dict()
    want = guide.median(Y)
    pyro.clear_param_store()
    fresh = GUIDES[kind](hier)
    fresh(Y)  # create the parameters
    fresh.load_state_dict(state)
    assert_same(fresh.median(Y), want)
    fresh(Y)  # the loaded values stay (the store holds the fresh guide's tensors)
    assert_same(fresh.median(Y), want)


def _pyro_bug_before_first_call(kind: str) -> None:
    if kind == "AutoNormal":  # AutoGuide.__getstate__ sets the live guide's _model to None
        pytest.xfail("Pyro's AutoGuide.__getstate__ drops the model of the original guide")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_before_the_first_call_leaves_the_original_alone(kind: str, how: str) -> None:
    guide = GUIDES[kind](hier)
    copied = copy.deepcopy(guide) if how == "deepcopy" else pickle.loads(pickle.dumps(guide))
    _pyro_bug_before_first_call(kind)
    assert set(guide(Y)) == set(LATENTS)  # the original still sets itself up
    if how == "deepcopy":
        pyro.clear_param_store()
        assert set(copied(Y)) == set(LATENTS)  # and so does the copy, which kept the model
    else:
        with pytest.raises(RuntimeError, match="unpickled before its first call"):
            copied(Y)  # a pickle holds no model: a clear error, not a TypeError


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_the_first_call(kind: str, how: str) -> None:
    guide = trained(kind)
    copied = copy.deepcopy(guide) if how == "deepcopy" else pickle.loads(pickle.dumps(guide))
    assert_same(copied.median(Y), guide.median(Y))
    assert set(copied(Y)) == set(LATENTS) and set(guide(Y)) == set(LATENTS)
    assert_same(copied.median(Y), guide.median(Y))


@pytest.mark.parametrize("order", ["load-then-call", "call-then-load"])
def test_param_store_save_and_load(kind: str, order: str, tmp_path: Any) -> None:
    """Pyro's documented way to keep a fit: ``pyro.get_param_store().save(path)``, then
    ``load(path)`` and a fresh guide; the first call must not overwrite what was loaded (the
    Laplace start, the random permutations and embeddings of a fresh guide)."""
    guide = trained(kind, steps=20)
    want = guide.median(Y)
    pyro.set_rng_seed(3)
    draws = Predictive(hier, guide=guide, num_samples=4)(Y)
    path = str(tmp_path / "params.pt")
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # a fresh guide would draw other permutations
    fresh = GUIDES[kind](hier)
    if order == "call-then-load":
        fresh(Y)
        pyro.get_param_store().load(path)
        fresh(Y)
    else:
        pyro.get_param_store().load(path)
        fresh(Y)
    assert_same(fresh.median(Y), want)
    pyro.set_rng_seed(3)
    assert_same(Predictive(hier, guide=fresh, num_samples=4)(Y), draws)
    losses = train(hier, fresh, Y, steps=2)  # and it trains on from there
    assert all(math.isfinite(loss) for loss in losses)


def test_param_store_of_another_model_is_a_clear_error(kind: str) -> None:
    if kind == "AutoNormal":
        pytest.skip("AutoNormal adopts whatever the store holds under its names")
    train(hier, GUIDES[kind](hier), Y, steps=1)  # leaves its values in the store
    with pytest.raises(RuntimeError, match="clear_param_store"):
        GUIDES[kind](nested)(torch.zeros(3, 2))  # other shapes under the same names


# ------------------------------------------------------------------ options and plates ---
def test_init_loc_fn_places_the_start(kind: str) -> None:
    values = {"mu": torch.tensor(2.0), "tau": torch.tensor(0.5)}
    options: dict[str, Any] = {"init_loc_fn": init_to_value(values=values)}
    if kind in ("AutoCouplingFlow", "AutoHierarchicalFlow"):
        options["init"] = "loc"  # the Laplace start moves to the mode
    guide = GUIDES[kind](hier, **options)
    guide(Y)
    median = guide.median(Y)
    for name, value in values.items():
        torch.testing.assert_close(median[name], value, rtol=1e-5, atol=1e-5)


def subsampled_data(y: torch.Tensor) -> None:
    """Global latents, observations subsampled (``N / B`` scaling by the plate)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=3) as i:
        pyro.sample("y", dist.Normal(mu, sigma), obs=y[i])


def subsampled_locals(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("g", len(y), subsample_size=2) as i:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y[i])


def test_subsampled_plate_of_observations(kind: str) -> None:
    y = torch.linspace(-1.0, 1.0, 9)
    guide = GUIDES[kind](subsampled_data)
    losses = train(subsampled_data, guide, y, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    assert {k: v.shape for k, v in guide.median(y).items()} == {"mu": (), "sigma": ()}


def test_subsampled_plate_of_local_latents(kind: str) -> None:
    if kind not in ("AutoNormal", "AutoHierarchicalFlow"):
        pytest.skip("an AutoContinuous guide packs every latent: no subsampled locals")
    y = torch.linspace(-1.0, 1.0, 6)

    def plates(y: torch.Tensor) -> Any:
        return pyro.plate("g", len(y), subsample_size=2)

    guide = GUIDES[kind](subsampled_locals, create_plates=plates)
    assert guide(y)["theta"].shape == (2,)
    losses = train(subsampled_locals, guide, y, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    assert guide.median(y)["theta"].shape == (6,)


def nested(y: torch.Tensor) -> None:
    """Groups ``g`` (3) and, inside each, members ``m`` (2): a latent per group and per
    member."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("g", 3, dim=-2):
        a = pyro.sample("a", dist.Normal(mu, 1.0))
        with pyro.plate("m", 2, dim=-1):
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def test_nested_plates(kind: str) -> None:
    y = torch.arange(6.0).reshape(3, 2)
    guide = GUIDES[kind](nested)
    losses = train(nested, guide, y, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    shapes = {k: tuple(v.shape) for k, v in guide.median(y).items()}
    assert shapes == {"mu": (), "a": (3, 1), "b": (3, 2)}
    out = Predictive(nested, guide=guide, num_samples=4, parallel=True)(y)
    assert out["b"].shape == (4, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_dtype(kind: str, dtype: torch.dtype) -> None:
    y = Y.to(dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        guide = GUIDES[kind](hier)
        losses = train(hier, guide, y, steps=2)
        assert all(math.isfinite(loss) for loss in losses)
        assert all(v.dtype == dtype for v in guide(y).values())
        assert all(v.dtype == dtype for v in guide.median(y).values())
    finally:
        torch.set_default_dtype(old)


def test_member_of_an_autoguide_list(kind: str) -> None:
    guide = AutoGuideList(hier)
    guide.append(GUIDES[kind](poutine.block(hier, expose=["mu", "tau"])))
    guide.append(AutoNormal(poutine.block(hier, hide=["mu", "tau"])))
    losses = train(hier, guide, Y, steps=3)
    assert all(math.isfinite(loss) for loss in losses)
    assert {k: tuple(v.shape) for k, v in guide.median(Y).items()} == LATENTS
    out = Predictive(hier, guide=guide, num_samples=3)(Y)
    assert out["theta"].shape == (3, 4) and out["mu"].numel() == 3


# ------------------------------------------------------------------ errors ---------------
def with_discrete() -> None:
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("k", dist.Bernoulli(0.3))


def on_a_sphere() -> None:
    pyro.sample("direction", dist.ProjectedNormal(torch.ones(3)))


def no_latent() -> None:
    pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def _build(kind: str, model: Callable) -> Any:
    if kind == "AutoConditionalCouplingFlow":
        return AutoConditionalCouplingFlow(model, lambda: torch.zeros(1), **FLOW)
    return GUIDES[kind](model)


def test_discrete_latent_is_a_value_error_naming_it(kind: str) -> None:
    with pytest.raises(ValueError, match="'k'"):
        _build(kind, with_discrete)()


def test_spherical_latent_points_to_the_reparameterizer(kind: str) -> None:
    with pytest.raises(ValueError, match="ProjectedNormalReparam"):
        _build(kind, on_a_sphere)()


def test_no_latent_is_a_runtime_error_as_for_pyros_continuous_guides(kind: str) -> None:
    if kind == "AutoNormal":
        pytest.skip("AutoNormal accepts a model without latents")
    with pytest.raises(RuntimeError, match="latent"):
        _build(kind, no_latent)()


# ------------------------------------------------------------------ faults ---------------
def test_a_failed_first_call_starts_again(kind: str) -> None:
    """An interrupt inside the first call (here in the second run of the model, where the
    start is computed) leaves no half-built guide: the next call builds it."""
    calls = {"n": 0, "interrupt": 2}

    def flaky(y: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == calls["interrupt"]:
            raise KeyboardInterrupt
        hier(y)

    guide = GUIDES[kind](flaky)
    with contextlib.suppress(KeyboardInterrupt):
        guide(Y)
    calls["interrupt"] = -1
    assert set(guide(Y)) == set(LATENTS)
    losses = train(flaky, guide, Y, steps=2)
    assert all(math.isfinite(loss) for loss in losses)


def test_an_unsupported_model_repeats_its_error(kind: str) -> None:
    if kind == "AutoNormal":
        pytest.xfail("AutoNormal keeps the prototype of its failed first call")
    guide = _build(kind, on_a_sphere)
    for _ in range(2):
        with pytest.raises(ValueError, match="spherical"):
            guide()
