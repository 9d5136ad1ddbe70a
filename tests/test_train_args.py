"""Every bad argument of ``fit``, ``nll``/``bits_per_dim`` and the preprocessing classes is a
``TypeError`` (wrong kind) or ``ValueError`` (bad value) naming the argument, raised before
any work is done. One test id per bad case."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pyro_flows_ext.flows import Flow, glow
from pyro_flows_ext.train import (
    Dequantize,
    FitConfig,
    Standardize,
    VariationalDequantize,
    as_preprocess,
    bits_per_dim,
    fit,
    nll,
)

V, T = ValueError, TypeError

FIT_CASES: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "steps-zero": ({"steps": 0}, V, "steps"),
    "steps-negative": ({"steps": -3}, V, "steps"),
    "steps-float": ({"steps": 2.5}, T, "steps"),
    "steps-str": ({"steps": "10"}, T, "steps"),
    "steps-bool": ({"steps": True}, T, "steps"),
    "epochs-zero": ({"epochs": 0}, V, "epochs"),
    "epochs-float": ({"epochs": 1.0}, T, "epochs"),
    "steps-and-epochs": ({"steps": 5, "epochs": 1}, V, "not both"),
    "batch_size-zero": ({"batch_size": 0}, V, "batch_size"),
    "batch_size-negative": ({"batch_size": -4}, V, "batch_size"),
    "batch_size-float": ({"batch_size": 8.0}, T, "batch_size"),
    "batch_size-str": ({"batch_size": "64"}, T, "batch_size"),
    "lr-zero": ({"lr": 0}, V, "lr"),
    "lr-negative": ({"lr": -1e-3}, V, "lr"),
    "lr-nan": ({"lr": math.nan}, V, "lr"),
    "lr-inf": ({"lr": math.inf}, V, "lr"),
    "lr-str": ({"lr": "0.1"}, T, "lr"),
    "warmup-negative": ({"warmup": -1}, V, "warmup"),
    "warmup-float": ({"warmup": 1.5}, T, "warmup"),
    "schedule-unknown": ({"schedule": "step"}, V, "schedule"),
    "schedule-none": ({"schedule": None}, V, "schedule"),
    "weight_decay-negative": ({"weight_decay": -0.1}, V, "weight_decay"),
    "weight_decay-str": ({"weight_decay": "0"}, T, "weight_decay"),
    "clip_grad-zero": ({"clip_grad": 0}, V, "clip_grad"),
    "clip_grad-negative": ({"clip_grad": -1.0}, V, "clip_grad"),
    "clip_grad-str": ({"clip_grad": "5"}, T, "clip_grad"),
    "eval_every-zero": ({"eval_every": 0}, V, "eval_every"),
    "eval_every-float": ({"eval_every": 2.5}, T, "eval_every"),
    "patience-zero": ({"patience": 0}, V, "patience"),
    "patience-float": ({"patience": 1.5}, T, "patience"),
    "device-unknown": ({"device": "tpu9"}, V, "device"),
    "device-int": ({"device": 3}, T, "device"),
    "dequantize-one-level": ({"dequantize": 1}, V, "dequantize"),
    "dequantize-str": ({"dequantize": "uniform"}, T, "dequantize"),
    "dequantize-float": ({"dequantize": 2.5}, T, "dequantize"),
    "dequantize-unknown-config": ({"dequantize": {"kind": "bogus"}}, T, "dequantize"),
    "checkpoint-int": ({"checkpoint": 3}, T, "checkpoint"),
    "resume-str": ({"resume": "yes"}, T, "resume"),
    "resume-int": ({"resume": 1}, T, "resume"),
    "progress-str": ({"progress": "no"}, T, "progress"),
    "seed-negative": ({"seed": -1}, V, "seed"),
    "seed-float": ({"seed": 1.5}, T, "seed"),
    "seed-str": ({"seed": "0"}, T, "seed"),
    "bf16-on-cpu": ({"bf16": True, "device": "cpu"}, V, "CUDA"),
    "bf16-str": ({"bf16": "yes"}, T, "bf16"),
    "compile-int": ({"compile": 1}, T, "compile"),
    "callback-str": ({"callback": "print"}, T, "callback"),
    "callback-int": ({"callback": 3}, T, "callback"),
    "distributed-str": ({"distributed": "yes"}, T, "distributed"),
    "distributed-int": ({"distributed": 1}, T, "distributed"),
}


@pytest.fixture()
def flow() -> Flow:
    torch.manual_seed(0)
    return glow(2, depth=1, hidden_dims=[4])


@pytest.mark.parametrize(("kwargs", "error", "match"), FIT_CASES.values(), ids=FIT_CASES.keys())
def test_fit_rejects_before_any_work(
    flow: Flow, tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    calls: list[int] = []
    settings: dict[str, Any] = {"steps": 2, "device": "cpu", "progress": False,
                                "checkpoint": tmp_path / "c.pt",
                                "callback": lambda step, bpd: calls.append(step)}  # fmt: skip
    if "epochs" in kwargs:
        settings.pop("steps")
    with pytest.raises(error, match=match):
        fit(flow, torch.randn(32, 2), **{**settings, **kwargs})
    after = flow.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # ActNorm not initialised
    assert not list(tmp_path.iterdir()) and not calls


def test_fit_rejects_what_is_not_a_flow() -> None:
    with pytest.raises(TypeError, match="flow"):
        fit(torch.nn.Linear(2, 2), torch.randn(8, 2), steps=1, progress=False)  # type: ignore[arg-type]


def test_fit_config_is_frozen_and_normalised() -> None:
    config = FitConfig(lr=1, clip_grad=None, device="cpu", dequantize=17, checkpoint="a/b.pt")
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.clip_grad is None
    assert config.torch_device == torch.device("cpu")
    assert config.preprocess.config() == Dequantize(17).config()
    assert config.checkpoint_path == Path("a/b.pt")
    assert config.total_steps(7) == 1000 and FitConfig(epochs=3).total_steps(7) == 21
    assert FitConfig(eval_every=None).eval_interval(7) == 25
    with pytest.raises(AttributeError):
        config.lr = 2.0  # type: ignore[misc]


METRIC_CASES: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "batch_size-zero": ({"batch_size": 0}, V, "batch_size"),
    "batch_size-negative": ({"batch_size": -1}, V, "batch_size"),
    "batch_size-float": ({"batch_size": 2.0}, T, "batch_size"),
    "seed-negative": ({"seed": -1}, V, "seed"),
    "seed-str": ({"seed": "0"}, T, "seed"),
    "dequantize-zero": ({"dequantize": 0}, V, "dequantize"),
    "dequantize-str": ({"dequantize": "x"}, T, "dequantize"),
}


@pytest.mark.parametrize("metric", [nll, bits_per_dim], ids=["nll", "bits_per_dim"])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"), METRIC_CASES.values(), ids=METRIC_CASES.keys()
)
def test_metrics_reject(
    metric: Callable[..., float], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        metric(Flow(2, []), torch.randn(4, 2), **kwargs)


PREPROCESS_CASES: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "Dequantize-levels-one": (lambda: Dequantize(1), V, "levels"),
    "Dequantize-levels-float": (lambda: Dequantize(2.5), T, "levels"),  # type: ignore[arg-type]
    "Dequantize-levels-str": (lambda: Dequantize("256"), T, "levels"),  # type: ignore[arg-type]
    "Dequantize-alpha-half": (lambda: Dequantize(4, alpha=0.5), V, "alpha"),
    "Dequantize-alpha-negative": (lambda: Dequantize(4, alpha=-0.1), V, "alpha"),
    "Dequantize-alpha-zero-logit": (lambda: Dequantize(4, alpha=0), V, "alpha"),
    "Dequantize-alpha-str": (lambda: Dequantize(4, alpha="0.05"), T, "alpha"),  # type: ignore[arg-type]
    "Dequantize-logit-str": (lambda: Dequantize(4, logit="yes"), T, "logit"),  # type: ignore[arg-type]
    "Standardize-mean-str": (lambda: Standardize("a", 1.0), T, "mean"),  # type: ignore[arg-type]
    "Standardize-mean-nan": (lambda: Standardize(math.nan, 1.0), V, "mean"),
    "Standardize-std-zero": (lambda: Standardize(0.0, 0.0), V, "std"),
    "Standardize-std-negative": (lambda: Standardize(0.0, torch.tensor([1.0, -1.0])), V, "std"),
    "Standardize-std-inf": (lambda: Standardize(0.0, math.inf), V, "std"),
    "Standardize.fit-event_dim-negative": (
        lambda: Standardize.fit(torch.randn(5, 2), event_dim=-1), V, "event_dim"),
    "Standardize.fit-event_dim-float": (
        lambda: Standardize.fit(torch.randn(5, 2), event_dim=1.0), T, "event_dim"),  # type: ignore[arg-type]
    "Standardize.fit-per_element-str": (
        lambda: Standardize.fit(torch.randn(5, 2), 1, per_element="no"), T, "per_element"),  # type: ignore[arg-type]
    "Standardize.fit-data-str": (lambda: Standardize.fit("data", 1), T, "data"),  # type: ignore[arg-type]
    "VariationalDequantize-event_shape-2d": (
        lambda: VariationalDequantize((1, 8), 17), V, "event shape"),
    "VariationalDequantize-event_shape-str": (
        lambda: VariationalDequantize("x", 17), T, "event shape"),  # type: ignore[arg-type]
    "VariationalDequantize-levels-one": (lambda: VariationalDequantize(2, 1), V, "levels"),
    "VariationalDequantize-hidden-zero": (
        lambda: VariationalDequantize(2, 4, hidden=0), V, "hidden"),
    "VariationalDequantize-hidden-float": (
        lambda: VariationalDequantize(2, 4, hidden=2.5), T, "hidden"),  # type: ignore[arg-type]
    "VariationalDequantize-clamp-zero": (
        lambda: VariationalDequantize(2, 4, clamp=0), V, "clamp"),
    "VariationalDequantize-clamp-str": (
        lambda: VariationalDequantize(2, 4, clamp="3"), T, "clamp"),  # type: ignore[arg-type]
    "as_preprocess-list": (lambda: as_preprocess([256]), T, "dequantize"),  # type: ignore[arg-type]
    "as_preprocess-bool": (lambda: as_preprocess(True), T, "dequantize"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("make", "error", "match"), PREPROCESS_CASES.values(), ids=PREPROCESS_CASES.keys()
)
def test_preprocess_constructors_reject(
    make: Callable[[], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "pre",
    [Dequantize(5, alpha=0.1), Dequantize(3, alpha=0.0, logit=False), Standardize(1.0, 2.0),
     VariationalDequantize((1, 2, 2), 4, hidden=3), as_preprocess(None)],
    ids=["dequantize", "dequantize-no-logit", "standardize", "variational", "identity"],
)  # fmt: skip
def test_preprocess_config_round_trip(pre: Any) -> None:
    rebuilt = as_preprocess(pre.config())
    assert type(rebuilt) is type(pre) and rebuilt.config() == pre.config()
