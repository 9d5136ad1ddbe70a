"""Diagnostics: importance weights, PSIS k-hat, importance resampling, InferenceData, plots."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext.infer import (
    AutoCouplingFlow,
    ParetoK,
    importance_draws,
    importance_resample,
    khat_threshold,
    khat_verdict,
    plot_pairs,
    psis_khat,
    to_inference_data,
)
from pyro_flows_ext.infer.diagnostics import importance
from pyro_flows_ext.infer.diagnostics.pareto import _arviz
from pyro_flows_ext.infer.diagnostics.plots import flatten_components

matplotlib.use("Agg")

Y = torch.tensor([1.0, 2.5, 0.5, 2.0])


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def normal_model() -> None:
    pyro.sample("x", dist.Normal(0.0, 1.0))


def exact_guide() -> None:
    pyro.sample("x", dist.Normal(0.0, 1.0))


def wide_guide() -> None:
    pyro.sample("x", dist.Normal(0.1, 1.1))


def bad_guide() -> None:
    pyro.sample("x", dist.Normal(2.5, 0.3))


def hierarchical(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, sigma))
        pyro.deterministic("theta_sq", theta**2)
        pyro.sample("y", dist.Normal(theta, 1.0 + w[..., 0]), obs=y)


def hierarchical_guide() -> AutoCouplingFlow:
    return AutoCouplingFlow(hierarchical, depth=1, init="loc", init_scale=0.5)


# ------------------------------------------------------------------ k-hat -----------------
def test_khat_is_small_for_the_exact_guide_and_large_for_a_bad_one() -> None:
    exact = psis_khat(normal_model, exact_guide, num_samples=2000)
    good = psis_khat(normal_model, wide_guide, num_samples=2000)
    bad = psis_khat(normal_model, bad_guide, num_samples=2000)
    assert isinstance(good, ParetoK) and good.num_samples == 2000
    assert float(exact) == -math.inf and exact.verdict == "good"  # equal weights
    # arviz 0.23's psislw takes log weights as they are: bounded weights give a small k-hat
    assert float(good) < 0.3 and good.verdict == "good"
    assert float(bad) > 0.7 and bad.verdict == "do not trust"
    assert "do not trust" in str(bad) and "k-hat" in str(good)


def test_psislw_convention_is_pinned() -> None:
    # heavy right tail of the weights (a too-narrow guide) must give a large k-hat; if the
    # function negated its input (arviz-stats 1.x), the light left tail would give a small one
    # (weights w = 1 + Lomax(1.25) have a Pareto tail with k = 0.8)
    rng = np.random.default_rng(0)
    log_w = np.log1p(rng.pareto(1.25, 4000))
    _, khat = _arviz().psislw(log_w)
    assert 0.7 < float(khat) < 1.2


@pytest.mark.parametrize(
    ("k", "verdict"),
    [(0.1, "good"), (0.55, "usable with PSIS"), (0.71, "do not trust"), (math.nan, "do not trust")],
)
def test_khat_verdicts(k: float, verdict: str) -> None:
    assert khat_verdict(k) == verdict


@pytest.mark.parametrize("num_samples", [100, 500, 2000, 4000, 100_000])
def test_khat_threshold_follows_vehtari_2024(num_samples: int) -> None:
    expected = min(1 - 1 / math.log10(num_samples), 0.7)
    assert khat_threshold(num_samples) == pytest.approx(expected)
    assert ParetoK(0.3, num_samples).threshold == pytest.approx(expected)


def test_khat_threshold_values() -> None:
    assert khat_threshold(100) == pytest.approx(0.5) and khat_threshold(4000) == 0.7
    # 0.6 is fine from 4000 draws but not from 100
    assert (
        khat_verdict(0.6, 4000) == "usable with PSIS" and khat_verdict(0.6, 100) == "do not trust"
    )


@pytest.mark.parametrize(
    ("k", "interval", "verdict"),
    [
        (0.65, (0.6, 0.75), "uncertain"),
        (0.75, (0.65, 0.8), "uncertain"),
        (0.9, (0.8, 1.0), "do not trust"),
    ],
)
def test_a_spread_straddling_the_threshold_is_uncertain(
    k: float, interval: tuple[float, float], verdict: str
) -> None:
    assert khat_verdict(k, 4000, interval) == verdict
    assert ParetoK(k, 4000, interval).verdict == verdict


def test_khat_of_an_exact_guide_is_small() -> None:
    # a conjugate Gaussian model and a guide equal to its posterior N(y/2, 1/2): the log
    # weights are the constant log evidence up to roundoff
    y = torch.tensor(1.0)

    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    def posterior() -> None:
        pyro.sample("x", dist.Normal(y / 2, 0.5**0.5))

    k = psis_khat(model, posterior, num_samples=1000)
    assert float(k) < 0.5 and k.verdict == "good" and k.flat
    assert k.ess == pytest.approx(1000)
    assert "nearly equal" in str(k)


def test_khat_of_a_guide_with_too_light_tails_is_large() -> None:
    # a Normal guide for a Student-t(3) posterior: weights grow like exp(x^2 / 2) / |x|^4
    def model() -> None:
        pyro.sample("x", dist.StudentT(3.0, 0.0, 1.0))

    def guide() -> None:
        pyro.sample("x", dist.Normal(0.0, 1.0))

    k = psis_khat(model, guide, num_samples=4000)
    assert float(k) > 0.6 and k.verdict in ("do not trust", "uncertain")
    low, high = k.interval
    assert low < high and high > 0.6 and k.ess < 4000 / 2


def _cut(where: str):
    """The standard normal times a factor that is ``where`` (``+inf`` or ``-inf``) above 1.5."""

    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        value = math.inf if where == "+inf" else -math.inf
        pyro.factor("cut", torch.where(x > 1.5, torch.tensor(value), torch.tensor(0.0)))

    return model


@pytest.mark.filterwarnings("ignore:Encountered \\+inf:UserWarning")
def test_infinite_log_weights_are_never_good() -> None:
    """Draws with log weight ``+inf`` (the guide has no density where the model has some)
    make the weights unbounded: k-hat is infinite, not -4.5 (issue 17, item 10)."""
    k = psis_khat(_cut("+inf"), exact_guide, num_samples=1000)
    assert float(k) == math.inf and k.verdict == "do not trust"
    draws = importance_resample(_cut("+inf"), exact_guide, num_samples=1000)
    assert (draws["x"] > 1.5).all()  # all the weight is where it is infinite


def test_minus_infinite_log_weights_are_zero_weights() -> None:
    """Draws the model rules out (log weight ``-inf``) get weight zero; the others are
    exact here, so the reading is good."""
    k = psis_khat(_cut("-inf"), exact_guide, num_samples=1000)
    assert k.verdict == "good" and k.ess < 1000
    draws = importance_resample(_cut("-inf"), exact_guide, num_samples=1000)
    assert (draws["x"] <= 1.5).all()


# ------------------------------------------------------------------ importance draws ------
def test_vectorised_and_looped_weights_agree_with_direct_evaluation() -> None:
    guide = hierarchical_guide()
    guide.initialize(Y)
    vec = importance_draws(hierarchical, guide, Y, num_samples=50)
    loop = importance_draws(hierarchical, guide, Y, num_samples=5, vectorize=False)
    assert vec.vectorized and not loop.vectorized
    for d in (vec, loop):
        assert d.latents["theta"].shape[1:] == (4,) and d.latents["w"].shape[1:] == (3,)
        assert d.deterministic["theta_sq"].shape[1:] == (4,)
        s = 1
        data = {k: v[s] for k, v in d.latents.items()}
        tr = pyro.poutine.trace(pyro.poutine.condition(hierarchical, data=data)).get_trace(Y)
        assert torch.allclose(d.log_p[s], tr.log_prob_sum(), rtol=1e-4)
    assert torch.isfinite(vec.log_weights).all()
    assert vec.dims["theta"] == ["groups"] and vec.dims["y"] == ["groups"]


def test_a_model_that_does_not_vectorise_is_looped() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(float(x.sum()), 1.0), obs=torch.tensor(0.5))

    def guide() -> None:
        pyro.sample("x", dist.Normal(0.2, 0.8))

    d = importance_draws(model, guide, num_samples=20)
    assert not d.vectorized and d.log_p.shape == (20,)
    with pytest.raises((ValueError, RuntimeError)):
        importance_draws(model, guide, num_samples=20, vectorize=True)


def test_importance_resampling_corrects_a_shifted_guide() -> None:
    def model() -> None:
        pyro.sample("x", dist.Normal(1.0, 1.0))

    def guide() -> None:
        pyro.sample("x", dist.Normal(0.3, 1.5))

    draws = importance_resample(model, guide, num_samples=8000, num_draws=3000)
    assert draws["x"].shape == (3000,)
    assert abs(draws["x"].mean().item() - 1.0) < 0.1
    assert abs(draws["x"].std().item() - 1.0) < 0.1


PLATE_SIZES: list[int] = []


def plated(y: torch.Tensor, noise: float = 1.0) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    PLATE_SIZES.append(mu.numel())
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, noise), obs=y)


def plated_guide(y: torch.Tensor, noise: float = 1.0) -> None:
    pyro.sample("mu", dist.Normal(0.3, 0.5))


def test_draws_in_batches_agree_with_direct_evaluation() -> None:
    d = importance_draws(plated, plated_guide, Y, num_samples=23, batch_size=5)
    assert d.vectorized and d.log_p.shape == (23,) and d.latents["mu"].shape == (23,)
    assert d.latents["mu"].unique().numel() == 23  # every batch draws afresh
    for s in (0, 7, 22):  # the first batch, a middle one and the last (short) one
        tr = pyro.poutine.trace(pyro.poutine.condition(plated, data={"mu": d.latents["mu"][s]}))
        assert torch.allclose(d.log_p[s], tr.get_trace(Y).log_prob_sum(), rtol=1e-5)
        assert torch.allclose(d.log_q[s], dist.Normal(0.3, 0.5).log_prob(d.latents["mu"][s]))


def test_default_batches_bound_the_largest_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importance, "DRAW_BUDGET", 40)  # y holds 4 elements a draw: 10 draws
    PLATE_SIZES.clear()
    d = importance_draws(plated, plated_guide, Y, num_samples=23)
    assert d.vectorized and d.log_p.shape == (23,)
    assert max(PLATE_SIZES) == 10 and sorted(PLATE_SIZES).count(10) == 2 and 3 in PLATE_SIZES
    # the posterior predictive replays every batch on its own draws
    idata = to_inference_data(plated, plated_guide, Y, 1e-4, num_samples=23)
    mu = idata.posterior["mu"].values[0]
    replicate = idata.posterior_predictive["y"].values[0]
    assert replicate.shape == (23, 4) and np.allclose(replicate, mu[:, None], atol=1e-3)


# ------------------------------------------------------------------ InferenceData ---------
def test_inference_data_groups_names_and_shapes() -> None:
    guide = hierarchical_guide()
    idata = to_inference_data(hierarchical, guide, Y, num_samples=100)
    assert set(idata.groups()) == {
        "posterior",
        "sample_stats",
        "observed_data",
        "posterior_predictive",
    }
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "sigma", "w", "theta", "theta_sq"}
    assert post["mu"].shape == (1, 100) and post["w"].shape == (1, 100, 3)
    assert post["theta"].dims == ("chain", "draw", "groups")
    assert (post["sigma"] > 0).all() and np.allclose(post["w"].sum("w_dim_0"), 1.0, atol=1e-5)
    stats = idata.sample_stats
    assert stats["log_weight"].shape == (1, 100)
    assert np.allclose(stats["log_weight"], stats["lp"] - stats["log_q"])
    assert stats.attrs["pareto_k"] >= 0 or math.isinf(stats.attrs["pareto_k"])
    assert stats.attrs["pareto_k_threshold"] == pytest.approx(0.5)  # 100 draws
    assert 0 < stats.attrs["importance_ess"] <= 100 and len(stats.attrs["pareto_k_interval"]) == 2
    assert idata.attrs["importance_ess"] == stats.attrs["importance_ess"]
    assert idata.observed_data["y"].shape == (4,)
    assert idata.posterior_predictive["y"].shape == (1, 100, 4)
    summary = _arviz().summary(idata, var_names=["mu", "theta"], kind="stats")
    assert list(summary.index) == ["mu"] + [f"theta[{i}]" for i in range(4)]


def test_inference_data_without_observations() -> None:
    idata = to_inference_data(normal_model, exact_guide, num_samples=20)
    assert set(idata.groups()) == {"posterior", "sample_stats"}
    assert idata.posterior["x"].shape == (1, 20)


def test_bad_input_is_a_clear_error() -> None:
    def no_latents() -> None:
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="no latent"):
        psis_khat(no_latents, lambda: None, num_samples=10)
    with pytest.raises(ValueError, match="does not sample"):
        psis_khat(hierarchical, lambda y: None, Y, num_samples=10)
    with pytest.raises(ValueError, match="num_samples"):
        psis_khat(normal_model, exact_guide, num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        importance_draws(normal_model, exact_guide, num_samples=10, batch_size=0)


# ------------------------------------------------------------------ plots -----------------
def test_pair_plot_of_guide_draws_against_reference() -> None:
    rng = np.random.default_rng(0)
    draws = {"a": rng.normal(size=300), "b": torch.randn(300, 2)}
    ref = {"a": rng.normal(size=500), "b": rng.normal(size=(500, 2))}
    fig = plot_pairs(draws, ref, max_components=2)
    assert len(fig.axes) == 4
    names, x = flatten_components(draws)
    assert names == ["a", "b[0]", "b[1]"] and x.shape == (300, 3)
    with pytest.raises(ValueError, match="not among"):
        plot_pairs(draws, var_names=["c"])
    with pytest.raises(TypeError, match="mapping"):
        plot_pairs([1, 2, 3])


def test_pair_plot_of_inference_data() -> None:
    idata = to_inference_data(normal_model, exact_guide, num_samples=50)
    fig = plot_pairs(idata)
    assert len(fig.axes) == 1
