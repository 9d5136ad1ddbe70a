"""The real-data hierarchical benchmark: its gold references (diagnostics, exactness, the
NumPyro twins' densities against the Pyro models) and the script end to end at a tiny size."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from pyro import poutine

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(_REPO))

from benchmarks import (  # noqa: E402
    hierarchical,
    hierarchical_models,
    hierarchical_real,
    hierarchical_real_report,
    hierarchical_references_io,
)

needs_shared = pytest.mark.skipif(
    not (hierarchical_models.SHARED / "hierarchical").is_dir(),
    reason="the shared data folder ../shared is absent",
)
SAMPLED = ("radon_mn", "eight_schools", "glm", "counts")


@needs_shared
@pytest.mark.parametrize("name", SAMPLED)
def test_reference_meets_its_diagnostics(name: str) -> None:
    arrays, facts = hierarchical_references_io.load(name)
    post = hierarchical_models.load(name)
    assert facts["ok"] and hierarchical_references_io.meets_target(facts)
    for g in post.global_names:
        stats = facts["diagnostics"][g]
        assert stats["r_hat"] <= 1.01 and min(stats["ess_bulk"], stats["ess_tail"]) >= 1000
        assert arrays["draws_" + g].shape == (hierarchical_references_io.THINNED,)
        assert torch.isclose(arrays["draws_" + g].mean(), arrays[g + "_mean"], atol=0.1)
    prior = poutine.trace(post.model).get_trace(*post.args)
    for site in post.locals_:
        size = prior.nodes[site]["value"].numel()
        assert arrays[site + "_mean"].shape == arrays[site + "_sd"].shape == (size,)
        assert bool((arrays[site + "_sd"] > 0).all())
    assert facts["command"].startswith("python -m benchmarks.hierarchical_references")


def test_meets_target_rejects_a_short_chain() -> None:
    facts = {"diagnostics": {"mu": {"r_hat": 1.0, "ess_bulk": 400.0, "ess_tail": 5e3}}}
    assert not hierarchical_references_io.meets_target(facts)
    facts["diagnostics"]["mu"]["ess_bulk"] = 2e3
    assert hierarchical_references_io.meets_target(facts)
    assert not hierarchical_references_io.meets_target(facts | {"divergences": 3})
    with pytest.raises(ValueError, match="no global diagnostics"):
        hierarchical_references_io.meets_target({"diagnostics": {}})


def test_funnel_reference_is_the_exact_posterior() -> None:
    arrays, facts = hierarchical_references_io.load("funnel")
    y, s = hierarchical.funnel_data(1000)
    exact = hierarchical.exact_moments(y, s)
    for key, value in exact.items():
        assert torch.allclose(arrays[key], value.reshape(-1).double())
    assert facts["method"].startswith("exact")


def _pyro_and_numpyro_log_joint(post: hierarchical_models.Posterior, twin_name: str) -> tuple:
    numpyro = pytest.importorskip("numpyro")
    import jax

    from benchmarks import hierarchical_references

    jax.config.update("jax_enable_x64", True)
    torch.manual_seed(0)
    prior = poutine.trace(post.model).get_trace(*post.args)
    latent = set(post.globals_) | set(post.locals_)
    point = {n: s["value"].double() for n, s in prior.nodes.items() if n in latent}
    tr = poutine.trace(poutine.condition(post.model, data=point)).get_trace(*post.args)
    twin = hierarchical_references._numpyro_models()[twin_name]
    args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in post.args]
    params = {k: v.numpy() for k, v in point.items()}
    log_q, _ = numpyro.infer.util.log_density(twin, args, {}, params)
    return float(tr.log_prob_sum()), float(log_q)


@needs_shared
@pytest.mark.parametrize(
    ("name", "twin"), [("radon_mn", "radon"), ("glm", "glm"), ("counts", "counts")]
)
def test_numpyro_twin_has_the_pyro_models_density(name: str, twin: str) -> None:
    pyro_lp, numpyro_lp = _pyro_and_numpyro_log_joint(hierarchical_models.load(name), twin)
    assert math.isfinite(pyro_lp) and math.isclose(pyro_lp, numpyro_lp, rel_tol=1e-8)


def _synthetic_election88() -> hierarchical_models.Posterior:
    """The election88 model on simulated data with the same fields (the held-out data are
    not read)."""
    gen = torch.Generator().manual_seed(0)
    n, sizes = 40, torch.tensor([6, 3, 4])
    index = [torch.randint(int(k), (n,), generator=gen) for k in sizes]
    x = torch.stack([torch.bernoulli(torch.full((n,), 0.5), generator=gen) for _ in range(2)])
    x = torch.cat([x, torch.randn(1, n, generator=gen, dtype=torch.float32)]).T.double()
    y = torch.bernoulli(torch.full((n,), 0.5), generator=gen).double()
    positive = {"b0": False, "b_female": False, "b_black": False, "b_v_prev": False}
    positive |= {f"sigma_{k}": True for k in ("state", "region", "age_edu")}
    return hierarchical_models.Posterior(
        "election88",
        hierarchical_models.election88,
        (x, y, *index, sizes),
        positive,
        ("e_state", "e_region", "e_age_edu"),
    )


def test_election88_twin_on_synthetic_data() -> None:
    pyro_lp, numpyro_lp = _pyro_and_numpyro_log_joint(_synthetic_election88(), "election88")
    assert math.isclose(pyro_lp, numpyro_lp, rel_tol=1e-8)


@pytest.mark.parametrize("guide", ["normal", "hierarchical"])
def test_election88_fits_and_scores(guide: str) -> None:
    post = _synthetic_election88()
    opts = argparse.Namespace(lr0=5e-2, lr1=1e-4, particles=4, draws=100, dtype="float32", tol=1.0)
    opts.references = None
    truth = {f"{k}_{s}": torch.ones(1) for k in post.global_names for s in ("mean", "sd")}
    sizes = {"e_state": 6, "e_region": 3, "e_age_edu": 4}
    truth |= {f"{k}_{s}": torch.ones(n) for k, n in sizes.items() for s in ("mean", "sd")}
    row = hierarchical_real.fit_and_score(post, guide, 0, 3, opts, truth=truth)
    assert math.isfinite(row["elbo"]) and set(row["globals"]) == set(post.global_names)


def test_scores_against_a_known_shift() -> None:
    post = hierarchical_models.Posterior(
        "toy", lambda: None, (), {"mu": False, "tau": True}, ("theta",)
    )
    truth = {k + "_mean": torch.zeros(3 if k == "theta" else 1) for k in ("mu", "log_tau", "theta")}
    truth |= {
        k + "_sd": torch.full_like(v, 2.0) for k, v in ((k[:-5], v) for k, v in truth.items())
    }
    got = {k: v.clone() for k, v in truth.items()}
    got["mu_mean"] += 1.0  # half a sd
    got["theta_sd"] = torch.tensor([2.0, 2.0 * math.exp(0.3), 2.0])
    out = hierarchical_real.scores(truth, got, post)
    assert math.isclose(out["globals"]["mu"]["mean_err"], 0.5)
    assert out["globals"]["log_tau"] == {"mean_err": 0.0, "log_sd": 0.0}
    assert math.isclose(out["loc_log_sd_max"], 0.3, rel_tol=1e-6) and out["loc_log_sd_median"] == 0


def test_weighted_moments() -> None:
    values = {"x": torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)}
    flat = hierarchical_real.moments(values, torch.zeros(4))
    assert torch.allclose(flat["x_mean"], values["x"].mean(0))
    assert torch.allclose(flat["x_sd"], values["x"].std(0, unbiased=False))
    # weights 1 : 1 : 2 : 0 (log weights shifted: normalised inside)
    log_w = torch.tensor([0.0, 0.0, math.log(2.0), -math.inf]) + 3.0
    got = hierarchical_real.moments(values, log_w)
    assert torch.allclose(got["x_mean"], torch.tensor([1.25], dtype=torch.float64))
    var = (1.25**2 + 0.25**2 + 2 * 0.75**2) / 4
    assert torch.allclose(got["x_sd"], torch.tensor([math.sqrt(var)], dtype=torch.float64))


def test_converged_at() -> None:
    assert hierarchical_real.converged_at([-10.0, -3.0, -1.5, -1.2, -1.0], tol=1.0) == 3
    # a fit that got worse has not converged early because it started near its end
    assert hierarchical_real.converged_at([-9.0, -5.0, -2.0, -9.0, -9.0], tol=1.0) == 4


def test_failures_and_time_outs_are_rows() -> None:
    failed = hierarchical_real.limited(functools.partial(int, "x"), 60)
    assert failed == {"failed": "ValueError: invalid literal for int() with base 10: 'x'"}
    start = time.perf_counter()
    slept = hierarchical_real.limited(functools.partial(time.sleep, 60), 0.5)
    assert slept == {"failed": "timed out after 0.5 s"}
    assert time.perf_counter() - start < 30


def test_bad_options_are_usage_errors() -> None:
    bad = (["--posteriors", "nope"], ["--guides", "nope"], ["--seeds", "a"])
    for argv in (*bad, ["--posteriors", "radon_all"], ["--steps-for", "nope=3"]):
        with pytest.raises(SystemExit):
            hierarchical_real.parse(argv)
    with pytest.raises(ValueError, match="unknown posterior"):
        hierarchical_models.load("nope")


@needs_shared
@pytest.mark.filterwarnings("ignore:marginal_resample:UserWarning")  # tiny fits
def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["--posteriors", "eight_schools", "--guides", "normal,hierarchical", "--seeds", "0,1"]
    rows = hierarchical_real.main([*argv, "--steps", "5", "--draws", "50", "--out", str(out)])
    tails = {"normal": ("", "+psis"), "hierarchical": ("", "+psis", "+marginal")}
    assert [(r["guide"], r["seed"]) for r in rows] == [
        (guide + tail, seed) for guide in tails for seed in (0, 1) for tail in tails[guide]
    ]
    for row in rows:  # every reading of a fit has the fit's ELBO, k-hat and time
        fit = next(r for r in rows if r["seed"] == row["seed"] and r["guide"] in tails
                   and row["guide"].startswith(r["guide"]))  # fmt: skip
        assert {k: fit[k] for k in ("elbo", "khat", "cpu_s")} == {
            k: row[k] for k in ("elbo", "khat", "cpu_s")
        }
    assert all("failed" not in r and math.isfinite(r["elbo"]) for r in rows)
    assert set(rows[0]["globals"]) == {"mu", "log_tau"}
    payload = json.loads(out.read_text())
    assert payload["rows"] == rows and payload["command"].endswith("--out " + str(out))
    merged = tmp_path / "merged.md"
    hierarchical_real_report.main([str(out), str(out), "--out", str(merged)])
    text = merged.read_text()
    assert "| normal |" in text and "| hierarchical+marginal |" in text and "4/4" in text


def test_summary_tells_failed_from_not_run() -> None:
    scores = {"elbo": -10.0, "glob_mean_max": 0.5, "glob_log_sd_max": 0.25}
    rows = [
        {"posterior": "a", "guide": "x", "seed": 0, "failed": "ValueError: boom"},
        {"posterior": "b", "guide": "y", "seed": 0} | scores,
        {"posterior": "b", "guide": "y", "seed": 1} | scores | {"elbo": -12.0},
    ]
    lines = hierarchical_real_report.summary(rows).splitlines()
    assert lines[2] == "| x | failed | not run |"
    assert lines[3] == "| y | not run | -11.0; 0.50 / 0.25 |"
