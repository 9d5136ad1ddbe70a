"""Pyro posteriordb models: Stein-identity check against reference draws, vectorised ELBO,
loaders and accuracy metrics (``benchmarks/posteriors``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(_REPO))

import pyro  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from benchmarks.posteriors import metrics, models  # noqa: E402

STEIN_DRAWS = 2000  # 5 / sqrt(2000) ~ 0.11 posterior sd: smallest error the check can see

EXPECTED_DIMS = {
    "eight_schools-eight_schools_noncentered": 10,
    "eight_schools-eight_schools_centered": 10,
    "arK-arK": 7,
    "arma-arma11": 4,
    "garch-garch11": 4,
    "gp_pois_regr-gp_pois_regr": 13,
    "gp_pois_regr-gp_regr": 3,
    "kilpisjarvi_mod-kilpisjarvi": 3,
    "sblrc-blr": 6,
    "sblri-blr": 6,
    "diamonds-diamonds": 26,
    "earnings-earn_height": 3,
    "earnings-logearn_interaction": 5,
    "kidiq-kidscore_interaction": 5,
    "mesquite-logmesquite_logvas": 8,
    "nes2000-nes": 10,
}


def _load(name: str) -> models.Posterior:
    """The posterior, or a skip when the posteriordb data folder is absent."""
    try:
        return models.POSTERIORS[name]
    except FileNotFoundError as err:
        pytest.skip(f"posteriordb data not available: {err}")


def test_registry_lists_every_posterior() -> None:
    assert set(models.NAMES) == set(EXPECTED_DIMS)
    assert list(models.POSTERIORS) == list(models.NAMES)


@pytest.mark.parametrize("name", models.NAMES)
def test_stein_identity_at_reference_draws(name: str) -> None:
    posterior = _load(name)
    assert models.latent_dim(posterior) == EXPECTED_DIMS[name]
    for value in posterior.reference.values():
        assert value.shape[0] == 10_000
        assert np.isfinite(value).all()
    z = models.stein_check(posterior, n=STEIN_DRAWS, linear=True)
    assert z < models.STEIN_THRESHOLD, f"{name}: Stein max z-score {z:.2f}"


@pytest.mark.parametrize("name", models.NAMES)
def test_vectorised_elbo_with_autonormal(name: str) -> None:
    posterior = _load(name)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(posterior.model)
    elbo = Trace_ELBO(vectorize_particles=True, num_particles=4)
    loss = elbo.loss(posterior.model, guide)
    assert math.isfinite(loss)
    for param in pyro.get_param_store().values():
        assert param.dtype == torch.float64
    draws = models.sample_quantities(posterior, guide, num_samples=16)
    for key, ref in posterior.reference.items():
        assert draws[key].shape == (16, *ref.shape[1:])
    result = metrics.accuracy(draws, posterior.reference, num_directions=20)
    assert math.isfinite(result.max_mean_error)
    assert math.isfinite(result.sliced_wasserstein)


def test_reference_names_and_latent_map() -> None:
    posterior = _load("eight_schools-eight_schools_noncentered")
    assert set(posterior.reference) == {"theta", "mu", "tau"}
    assert posterior.reference["theta"].shape == (10_000, 8)
    latents = posterior.reference_latents(np.arange(5))
    theta = latents["mu"][:, None] + latents["tau"][:, None] * latents["theta_trans"]
    np.testing.assert_allclose(theta.numpy(), posterior.reference["theta"][:5], rtol=1e-12)
    blr = _load("sblrc-blr")
    assert blr.reference["beta"].shape == (10_000, 5)
    assert blr.reference["sigma"].shape == (10_000,)


def test_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.posteriordb_root(missing)
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path))
    assert models.posteriordb_root() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="arK-arK"):
        models.load("arK-arK")
    with pytest.raises(KeyError):
        models.load("no-such-posterior", root=tmp_path)


def test_metrics_on_known_gaussians() -> None:
    rng = np.random.default_rng(1)
    ref = {"a": rng.normal(2.0, 3.0, size=4000), "b": rng.normal(size=(4000, 2))}
    same = {"a": rng.normal(2.0, 3.0, size=4000), "b": rng.normal(size=(4000, 2))}
    good = metrics.accuracy(same, ref)
    assert good.max_mean_error < 0.1
    assert good.max_log_sd_ratio < 0.1
    assert good.sliced_wasserstein < 0.1
    assert good.num_components == 3
    shifted = {"a": same["a"] + 1.5, "b": same["b"] * np.array([1.0, 2.0])}
    bad = metrics.accuracy(shifted, ref)
    assert bad.max_mean_error == pytest.approx(0.5, abs=0.1)
    assert bad.worst_mean_component == "a"
    assert bad.max_log_sd_ratio == pytest.approx(math.log(2.0), abs=0.1)
    assert bad.worst_sd_component == "b[2]"
    assert bad.sliced_wasserstein > 3 * good.sliced_wasserstein
    assert metrics.component_names(ref) == ["a", "b[1]", "b[2]"]
    with pytest.raises(KeyError):
        metrics.accuracy({"a": same["a"]}, ref)
