"""fit_guide: the recommended SVI protocol in one call."""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from test_infer_hierarchical import funnel

from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow, fit_guide
from pyro_flows_ext.infer.fitting.svi import FIT_DEFAULTS
from pyro_flows_ext.optim import LazyClippedAdam, is_per_element
from pyro_flows_ext.train import History, TrainingDivergedError


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def gaussian(y: torch.Tensor, scale: float = 1.0) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype), 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def exact_mean(y: torch.Tensor) -> float:
    n = len(y)
    return float(y.sum() / (n + 1e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["AutoNormal", "AutoCouplingFlow"])
def test_fits_any_guide_in_both_dtypes(kind: str, dtype: torch.dtype) -> None:
    y = torch.tensor([1.0, 2.5, 0.5, 2.0], dtype=dtype)
    guide = AutoNormal(gaussian) if kind == "AutoNormal" else AutoCouplingFlow(gaussian, depth=1)
    history = fit_guide(gaussian, guide, y, steps=300, num_particles=4, progress=False)
    assert isinstance(history, History)
    assert len(history.loss) == len(history.smoothed) == len(history.step_time) == 300
    assert not history.stopped_early and history.seconds > 0 and history.cpu_seconds > 0
    assert all(math.isfinite(v) for v in history.loss)
    median = guide.median(y)["mu"]
    assert median.dtype == dtype
    assert abs(float(median) - exact_mean(y)) < 0.15  # posterior sd 0.5
    assert history.elbo == -history.smoothed[-1]


def test_model_keyword_arguments_are_passed_through() -> None:
    y = torch.tensor([0.3, -0.2])
    guide = AutoNormal(gaussian)
    fit_guide(gaussian, guide, y, scale=0.1, steps=400, num_particles=2, progress=False)
    # with scale 0.1 the posterior sd is 0.07 (with the default 1.0 it would be 0.7)
    assert float(guide.quantiles([0.84])["mu"][0] - guide.median()["mu"]) < 0.2


def test_a_nan_loss_stops_with_an_error_naming_the_step() -> None:
    calls = {"n": 0}

    def model() -> None:
        calls["n"] += 1
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        bad = math.nan if calls["n"] > 5 else 0.0
        pyro.factor("f", x * 0 + bad)

    def guide() -> None:
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0))

    with pytest.raises(TrainingDivergedError, match="step 6") as info:
        fit_guide(model, guide, steps=50, num_particles=1, progress=False)
    assert isinstance(info.value, FloatingPointError)
    assert info.value.step == 6 and math.isnan(info.value.loss)
    assert len(info.value.history.loss) == 5


def test_early_stopping_stops() -> None:
    y = torch.tensor([1.0, 2.0])
    history = fit_guide(
        gaussian, AutoNormal(gaussian), y, steps=3000, patience=50, num_particles=2, progress=False
    )
    assert history.stopped_early
    assert 50 < len(history.loss) < 3000 and len(history.smoothed) == len(history.loss)


def test_cooldown_decays_the_step_size_to_lr_end_then_stops() -> None:
    y = torch.tensor([1.0, 2.0])
    guide = AutoNormal(gaussian)
    history = fit_guide(gaussian, guide, y, steps=3000, patience=50, cooldown=40, lr_end=1e-4,
                        num_particles=2, progress=False)  # fmt: skip
    start = history.cooldown_from
    assert history.stopped_early and start is not None and 50 <= start < 2960
    assert len(history.loss) == start + 40
    store = pyro.get_param_store()
    assert len(store) > 0 and all(torch.isfinite(v).all() for v in store.values())


def test_cooldown_reaches_lr_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step size that the last step used is ``lr_end`` (within float rounding)."""
    lrs: list[float] = []
    step = LazyClippedAdam.step

    def spy(self: Any, closure: Any = None) -> Any:
        loss = step(self, closure)  # it decays lr, then steps with it
        lrs.append(self.param_groups[0]["lr"])
        return loss

    monkeypatch.setattr(LazyClippedAdam, "step", spy)
    fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), steps=500, patience=20,
              cooldown=30, lr=5e-2, lr_end=1e-3, num_particles=1, progress=False)  # fmt: skip
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-6) and max(lrs) > 1e-2


class _Declares(AutoNormal):
    """A guide that recommends fit_guide's steps and particles."""

    answer: Any = {"steps": 7, "num_particles": 3}

    def fit_defaults(self, *args: Any, **kwargs: Any) -> Any:
        self.seen = args
        return self.answer


def test_defaults_are_the_guides_recommendation(monkeypatch: pytest.MonkeyPatch) -> None:
    particles: list[int] = []
    init = pyro.infer.Trace_ELBO.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        particles.append(kwargs["num_particles"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(pyro.infer.Trace_ELBO, "__init__", spy)
    guide = _Declares(gaussian)
    history = fit_guide(gaussian, guide, torch.ones(2), progress=False)
    assert len(history.loss) == 7 and particles == [3]
    assert len(guide.seen) == 1  # asked with the model's arguments
    history = fit_guide(gaussian, guide, torch.ones(2), num_particles=2, progress=False)
    assert len(history.loss) == 7 and particles == [3, 2]  # an explicit value wins
    history = fit_guide(gaussian, guide, torch.ones(2), steps=4, progress=False)
    assert len(history.loss) == 4 and particles == [3, 2, FIT_DEFAULTS["num_particles"]]


def test_defaults_without_fit_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "pyro_flows_ext.infer.fitting.svi.FIT_DEFAULTS", {"steps": 9, "num_particles": 1}
    )
    history = fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), progress=False)
    assert len(history.loss) == 9


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"steps": 0}, ValueError),
        ({"steps": 2.5}, TypeError),
        ({"lr": 1}, TypeError),
        (5, TypeError),
    ],
)
def test_a_bad_recommendation_is_reported(value: Any, error: type) -> None:
    guide = _Declares(gaussian)
    guide.answer = value
    with pytest.raises(error, match="fit_defaults"):
        fit_guide(gaussian, guide, torch.ones(2), progress=False)


def test_coupling_flow_fits_shorter_from_its_laplace_start() -> None:
    y = torch.tensor([1.0, 2.5, 0.5, 2.0])
    laplace = AutoCouplingFlow(gaussian, depth=1)
    assert laplace.fit_defaults(y) == {"steps": 1000, "num_particles": 32}
    assert laplace.init_info["method"] == "laplace"
    loc = AutoCouplingFlow(gaussian, depth=1, init="loc")
    assert loc.fit_defaults(y) == {"steps": 3000, "num_particles": 16}


def test_callback_sees_every_step() -> None:
    seen: list[tuple[int, float]] = []
    history = fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), steps=7, progress=False,
                        callback=lambda step, loss: seen.append((step, loss)))  # fmt: skip
    assert [s for s, _ in seen] == list(range(1, 8))
    assert [loss for _, loss in seen] == history.loss


def test_progress_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), steps=20, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bar_shows_the_smoothed_elbo(capsys: pytest.CaptureFixture[str]) -> None:
    fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), steps=20, num_particles=1)
    err = capsys.readouterr().err
    assert "fit_guide" in err and "elbo=" in err and "20/20" in err


def test_a_model_that_does_not_vectorise_can_loop() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x.reshape(()), 1.0), obs=torch.tensor(0.5))

    history = fit_guide(
        model,
        AutoNormal(model),
        steps=5,
        num_particles=3,
        vectorize_particles=False,
        progress=False,
    )
    assert len(history.loss) == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr_end": 0.0}, ValueError, "lr_end"),
        ({"num_particles": 0}, ValueError, "num_particles"),
        ({"patience": 0}, ValueError, "patience"),
        ({"patience": "10"}, TypeError, "patience"),
        ({"cooldown": 10}, ValueError, "needs patience"),
        ({"patience": 10, "cooldown": 0}, ValueError, "cooldown"),
        ({"callback": 3}, TypeError, "callback"),
        ({"min_delta": -1.0}, ValueError, "min_delta"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"progress": 1}, TypeError, "progress"),
        ({"vectorize_particles": None}, TypeError, "vectorize_particles"),
        ({"average": -0.1}, ValueError, "average"),
        ({"average": 1.5}, ValueError, "average"),
        ({"average": "all"}, TypeError, "average"),
    ],
)
def test_arguments_are_validated(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit_guide(gaussian, AutoNormal(gaussian), torch.ones(2), **kwargs)


def test_model_and_guide_must_be_callable() -> None:
    with pytest.raises(TypeError, match="guide"):
        fit_guide(gaussian, "guide", torch.ones(2))


def _nan_gradient_after(calls: int):
    """A model whose factor's gradient turns NaN after ``calls`` executions."""
    count = {"n": 0}

    def model() -> None:
        count["n"] += 1
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("f", x * (math.nan if count["n"] > calls else 0.1))

    return model


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_the_failing_step_is_not_applied() -> None:
    """With Pyro's validation off a NaN loss comes with NaN gradients; applying them would
    leave the guide NaN. The step is refused: the guide keeps the last good parameters."""
    model = _nan_gradient_after(6)
    guide = AutoNormal(model)
    seen: list[dict[str, torch.Tensor]] = []
    original = pyro.infer.Trace_ELBO.loss_and_grads

    def spy(self, *args, **kwargs):  # the parameters before every step
        seen.append({k: v.detach().clone() for k, v in pyro.get_param_store().items()})
        return original(self, *args, **kwargs)

    pyro.enable_validation(False)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pyro.infer.Trace_ELBO, "loss_and_grads", spy)
            with pytest.raises(TrainingDivergedError, match="not applied"):
                fit_guide(model, guide, steps=20, num_particles=1, progress=False)
    finally:
        pyro.enable_validation(True)
    after = {k: v.detach() for k, v in pyro.get_param_store().items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    for k, v in seen[-1].items():  # exactly the parameters before the failing step
        assert torch.equal(after[k], v), k
    assert math.isfinite(guide.median()["x"].item())


def test_a_nan_from_the_model_does_not_blame_the_parameters() -> None:
    """With validation on, Pyro reports the model's NaN factor as an invalid value; the error
    must say the model or guide computed it, not that the parameters are not finite."""
    model = _nan_gradient_after(6)
    with pytest.raises(TrainingDivergedError) as info:
        fit_guide(model, AutoNormal(model), steps=20, num_particles=1, progress=False)
    message = str(info.value)
    assert "model or guide computed a non-finite value" in message
    assert "parameters left by" not in message and "log_factor" in message
    assert all(torch.isfinite(v).all() for v in pyro.get_param_store().values())


def test_a_non_finite_gradient_with_a_finite_loss_is_refused_too() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.sqrt(x.abs() * 0))  # finite value, infinite gradient at 0

    def guide() -> None:
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Delta(loc))

    with pytest.raises(TrainingDivergedError, match="gradient of loc is not finite"):
        fit_guide(model, guide, steps=5, num_particles=1, progress=False)
    assert pyro.param("loc").item() == 0.0


# ------------------------------------------------------------------ tail averaging --------
def fit_recording(model: Any, guide: Any, *args: Any, **options: Any) -> tuple[History, list]:
    """``fit_guide`` with every step's parameters recorded (name -> value)."""
    iterates: list[dict[str, torch.Tensor]] = []

    def record(taken: int, loss: float) -> None:
        store = pyro.get_param_store()
        iterates.append({n: p.detach().clone() for n, p in store.named_parameters()})

    history = fit_guide(model, guide, *args, progress=False, callback=record, **options)
    return history, iterates


def test_a_subsampled_fit_ends_at_the_mean_of_its_last_iterates() -> None:
    y = torch.linspace(-2.0, 3.0, 12)
    guide = AutoHierarchicalFlow(funnel)
    options = {"steps": 40, "num_particles": 2, "average": 0.25}
    history, iterates = fit_recording(funnel, guide, y, 4, **options)
    start = 30
    assert history.averaged_from == start
    averaged = per_element = 0
    for name, p in pyro.get_param_store().named_parameters():
        tail = torch.stack([it[name] for it in iterates[start:]])
        if is_per_element(p):  # rows of a subsampled plate: the last iterate, O(B) work
            per_element += 1
            assert torch.equal(p.detach(), iterates[-1][name]), name
            continue
        if tail.is_floating_point() and not torch.equal(tail[0], tail[-1]):
            averaged += 1
            assert torch.allclose(p.detach(), tail.mean(0), atol=1e-6), name
            assert not torch.equal(p.detach(), iterates[-1][name]), name
    assert averaged >= 3 and per_element >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_without_subsampling_the_last_iterate_stays_unless_asked(dtype: torch.dtype) -> None:
    y = torch.tensor([0.5, 1.5, 1.0], dtype=dtype)
    history, iterates = fit_recording(gaussian, AutoNormal(gaussian), y, steps=20)
    assert history.averaged_from is None
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p.detach(), iterates[-1][name])
    pyro.clear_param_store()
    history, iterates = fit_recording(gaussian, AutoNormal(gaussian), y, steps=20, average=0.5)
    assert history.averaged_from == 10
    for name, p in pyro.get_param_store().named_parameters():
        mean = torch.stack([it[name] for it in iterates[10:]]).mean(0)
        assert p.dtype == dtype and torch.allclose(p.detach(), mean), name


def test_a_subsampled_fit_is_not_averaged_by_default() -> None:
    y = torch.linspace(-2.0, 3.0, 12)
    guide = AutoHierarchicalFlow(funnel)
    history, iterates = fit_recording(funnel, guide, y, 4, steps=12, num_particles=2)
    assert history.averaged_from is None
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p.detach(), iterates[-1][name]), name
