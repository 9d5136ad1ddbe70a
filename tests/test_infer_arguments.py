"""One table of bad arguments to the public API of ``pyro_flows_ext.infer`` and the layers it
composes: each must raise ``TypeError`` (wrong kind) or ``ValueError`` (bad value) naming the
argument, before any work is done (the model and log density here fail if they are run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext.infer import (
    AutoConditionalCouplingFlow,
    AutoCouplingFlow,
    importance_draws,
    importance_resample,
    khat_verdict,
    laplace_approximation,
    plot_pairs,
    psis_khat,
    to_inference_data,
)
from pyro_flows_ext.nn import DampedMLP, damp_parameters_
from pyro_flows_ext.transforms import AffineMap, ConditionalShift, LowerAffine, PermuteTransform


def forbidden(*args: Any, **kwargs: Any) -> None:
    """A model, guide or log density that must not be run: the arguments are checked first."""
    raise AssertionError("the arguments should have been rejected before running anything")


def model() -> None:
    pyro.sample("x", dist.Normal(0.0, 1.0))


def flow(**kwargs: Any) -> Callable[[], Any]:
    return lambda: AutoCouplingFlow(forbidden, **kwargs)


def amortised(**kwargs: Any) -> Callable[[], Any]:
    return lambda: AutoConditionalCouplingFlow(forbidden, **{"context_fn": forbidden, **kwargs})


def khat(**kwargs: Any) -> Callable[[], Any]:
    return lambda: psis_khat(forbidden, forbidden, **kwargs)


def pairs(**kwargs: Any) -> Callable[[], Any]:
    return lambda: plot_pairs({"x": torch.zeros(5)}, **kwargs)


def laplace(init: Any = None, **options: Any) -> Callable[[], Any]:
    return lambda: laplace_approximation(
        forbidden, torch.zeros(2) if init is None else init, **options
    )


CASES: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    # AutoCouplingFlow
    "guide-model-not-callable": (lambda: AutoCouplingFlow("model"), TypeError, "model"),  # type: ignore[arg-type]
    "guide-depth-negative": (flow(depth=-1), ValueError, "depth"),
    "guide-depth-float": (flow(depth=2.5), TypeError, "depth"),
    "guide-depth-bool": (flow(depth=True), TypeError, "depth"),
    "guide-hidden-dims-zero": (flow(hidden_dims=[0]), ValueError, "hidden_dims"),
    "guide-hidden-dims-string": (flow(hidden_dims="64"), TypeError, "hidden_dims"),
    "guide-hidden-dims-float": (flow(hidden_dims=[32.0]), TypeError, "hidden_dims"),
    "guide-mixing-unknown": (flow(mixing="shuffle"), ValueError, "mixing"),
    "guide-actnorm-int": (flow(actnorm=1), TypeError, "actnorm"),
    "guide-init-unknown": (flow(init="zeros"), ValueError, "init"),
    "guide-init-loc-fn-string": (flow(init_loc_fn="median"), TypeError, "init_loc_fn"),
    "guide-init-scale-zero": (flow(init_scale=0.0), ValueError, "init_scale"),
    "guide-init-scale-inf": (flow(init_scale=math.inf), ValueError, "init_scale"),
    "guide-init-scale-string": (flow(init_scale="big"), TypeError, "init_scale"),
    "guide-coupling-map": (flow(coupling=AffineMap), TypeError, "coupling"),
    "guide-coupling-unknown": (flow(coupling="maf"), ValueError, "coupling"),
    "guide-stl-string": (flow(stl="yes"), TypeError, "stl"),
    "guide-lr-scale-zero": (flow(lr_scale=0.0), ValueError, "lr_scale"),
    "guide-laplace-options-list": (flow(laplace_options=[1]), TypeError, "laplace_options"),
    "guide-laplace-options-unknown": (
        flow(laplace_options={"tolerance": 1e-6}),
        ValueError,
        "laplace_options",
    ),
    "guide-laplace-options-max-iter-zero": (
        flow(laplace_options={"max_iter": 0}),
        ValueError,
        "max_iter",
    ),
    "guide-init-elbo-samples-zero": (flow(init_elbo_samples=0), ValueError, "init_elbo_samples"),
    "guide-unknown-keyword": (flow(num_layers=2), TypeError, "num_layers"),
    # AutoConditionalCouplingFlow
    "amortised-context-fn-none": (amortised(context_fn=None), TypeError, "context_fn"),
    "amortised-init-laplace": (amortised(init="laplace"), TypeError, "init"),
    "amortised-laplace-options": (amortised(laplace_options={}), TypeError, "laplace_options"),
    "amortised-depth-negative": (amortised(depth=-1), ValueError, "depth"),
    "amortised-hidden-dims-zero": (amortised(hidden_dims=[0]), ValueError, "hidden_dims"),
    # diagnostics
    "khat-model-not-callable": (lambda: psis_khat("m", forbidden), TypeError, "model"),
    "khat-guide-none": (lambda: psis_khat(forbidden, None), TypeError, "guide"),
    "khat-num-samples-zero": (khat(num_samples=0), ValueError, "num_samples"),
    "khat-num-samples-one": (khat(num_samples=1), ValueError, "num_samples"),
    "khat-num-samples-float": (khat(num_samples=10.0), TypeError, "num_samples"),
    "draws-num-samples-negative": (
        lambda: importance_draws(forbidden, forbidden, num_samples=-5),
        ValueError,
        "num_samples",
    ),
    "draws-vectorize-string": (
        lambda: importance_draws(forbidden, forbidden, vectorize="yes"),
        TypeError,
        "vectorize",
    ),
    "resample-num-draws-zero": (
        lambda: importance_resample(forbidden, forbidden, num_draws=0),
        ValueError,
        "num_draws",
    ),
    "resample-num-draws-float": (
        lambda: importance_resample(forbidden, forbidden, num_draws=1.5),
        TypeError,
        "num_draws",
    ),
    "resample-num-samples-zero": (
        lambda: importance_resample(forbidden, forbidden, num_samples=0),
        ValueError,
        "num_samples",
    ),
    "idata-num-samples-zero": (
        lambda: to_inference_data(forbidden, forbidden, num_samples=0),
        ValueError,
        "num_samples",
    ),
    "idata-posterior-predictive-string": (
        lambda: to_inference_data(forbidden, forbidden, posterior_predictive="no"),
        TypeError,
        "posterior_predictive",
    ),
    "khat-verdict-string": (lambda: khat_verdict("0.3"), TypeError, "khat"),  # type: ignore[arg-type]
    # laplace_approximation
    "laplace-log-density-none": (
        lambda: laplace_approximation(None, torch.zeros(2)),  # type: ignore[arg-type]
        TypeError,
        "log_density",
    ),
    "laplace-init-list": (laplace(init=[0.0, 0.0]), TypeError, "init"),
    "laplace-init-integer": (laplace(init=torch.zeros(2, dtype=torch.long)), TypeError, "init"),
    "laplace-init-matrix": (laplace(init=torch.zeros(2, 2)), ValueError, "init"),
    "laplace-max-iter-zero": (laplace(max_iter=0), ValueError, "max_iter"),
    "laplace-newton-steps-negative": (laplace(newton_steps=-1), ValueError, "newton_steps"),
    "laplace-tol-negative": (laplace(tol=-1.0), ValueError, "tol"),
    "laplace-eig-floor-string": (laplace(eig_floor="small"), TypeError, "eig_floor"),
    "laplace-unknown-option": (laplace(tolerance=1e-3), ValueError, "tolerance"),
    # plot_pairs
    "pairs-draws-list": (lambda: plot_pairs([1, 2, 3]), TypeError, "mapping"),
    "pairs-var-names-string": (pairs(var_names="x"), TypeError, "var_names"),
    "pairs-max-components-zero": (pairs(max_components=0), ValueError, "max_components"),
    "pairs-num-points-zero": (pairs(num_points=0), ValueError, "num_points"),
    "pairs-labels-string": (pairs(labels="ab"), TypeError, "labels"),
    "pairs-seed-negative": (pairs(seed=-1), ValueError, "seed"),
    "pairs-figsize-zero": (pairs(figsize=(0.0, 3.0)), ValueError, "figsize"),
    # the layers the guides compose
    "damped-mlp-input-dim-zero": (lambda: DampedMLP(0, 2, [4]), ValueError, "input_dim"),
    "damped-mlp-hidden-none": (lambda: DampedMLP(2, 2, None), TypeError, "hidden_dims"),  # type: ignore[arg-type]
    "damped-mlp-lr-scale-zero": (
        lambda: DampedMLP(2, 2, [4], lr_scale=0.0),
        ValueError,
        "lr_scale",
    ),
    "damped-mlp-context-dim-negative": (
        lambda: DampedMLP(2, 2, [4], context_dim=-1),
        ValueError,
        "context_dim",
    ),
    "damp-parameters-not-a-module": (
        lambda: damp_parameters_("net", 0.1),  # type: ignore[arg-type]
        TypeError,
        "module",
    ),
    "damp-parameters-lr-scale-negative": (
        lambda: damp_parameters_(torch.nn.Linear(2, 2), -0.1),
        ValueError,
        "lr_scale",
    ),
    "lower-affine-dim-zero": (lambda: LowerAffine(0), ValueError, "dim"),
    "lower-affine-init-scale-zero": (
        lambda: LowerAffine(2, init_scale=0.0),
        ValueError,
        "init_scale",
    ),
    "lower-affine-center-shape": (
        lambda: LowerAffine(2, center=torch.zeros(3)),
        ValueError,
        "center",
    ),
    "permute-perm-not-a-permutation": (
        lambda: PermuteTransform(3, perm=torch.tensor([0, 0, 1])),
        ValueError,
        "perm",
    ),
    "permute-perm-list": (lambda: PermuteTransform(3, perm=[0, 1, 2]), TypeError, "perm"),  # type: ignore[arg-type]
    "conditional-shift-context-dim-zero": (
        lambda: ConditionalShift(3, 0),
        ValueError,
        "context_dim",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_is_a_clear_error(case: str) -> None:
    build, error, name = CASES[case]
    with pytest.raises(error, match=name):
        build()


def test_quantiles_outside_the_unit_interval() -> None:
    guide = AutoCouplingFlow(model, init="loc").initialize()
    with pytest.raises(ValueError, match="quantiles"):
        guide.quantiles([0.5, 1.5])
