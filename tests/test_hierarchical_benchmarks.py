"""The hierarchical benchmarks (``benchmarks/hierarchical*.py``, ``subsample_noise.py``): the
funnel's exact posterior and the scripts end to end at a tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(_REPO))

import pyro.distributions as dist  # noqa: E402

from benchmarks import hierarchical, hierarchical_glm, subsample_noise  # noqa: E402


def test_exact_moments_match_brute_force_integration() -> None:
    # G = 2: integrate (mu, log tau) on a grid, theta in closed form given them
    y, s = hierarchical.funnel_data(2)
    exact = hierarchical.exact_moments(y, s)
    mu = torch.linspace(-40.0, 40.0, 801, dtype=torch.float64)[:, None]
    lt = torch.linspace(-12.0, 6.0, 901, dtype=torch.float64)[None, :]
    tau = lt.exp()
    log_p = dist.Normal(0.0, hierarchical.PRIOR_MU).log_prob(mu)
    log_p = log_p + dist.HalfCauchy(hierarchical.PRIOR_TAU).log_prob(tau) + lt
    for g in range(2):
        log_p = log_p + dist.Normal(mu, (tau**2 + s[g] ** 2).sqrt()).log_prob(y[g])
    w = torch.softmax(log_p.flatten(), 0).reshape(log_p.shape)
    mu_mean = (w * mu).sum()
    lt_mean = (w * lt).sum()
    lt_sd = ((w * (lt - lt_mean) ** 2).sum()).sqrt()
    assert torch.isclose(exact["mu_mean"].squeeze(), mu_mean, atol=1e-3)
    assert torch.isclose(exact["log_tau_mean"].squeeze(), lt_mean, atol=1e-3)
    assert torch.isclose(exact["log_tau_sd"].squeeze(), lt_sd, atol=1e-3)
    prec = 1 / tau**2 + 1 / s[0] ** 2
    theta0 = (mu / tau**2 + y[0] / s[0] ** 2) / prec
    assert torch.isclose(exact["theta_mean"][0], (w * theta0).sum(), atol=1e-3)


def test_funnel_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "funnel.md"
    argv = ["--sizes", "8,20:5", "--guides", "normal,hierarchical", "--steps", "3"]
    hierarchical.main([*argv, "--draws", "50", "--optims", "clipped,fit_guide", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 8 and "| 20 | 5 | hierarchical (fit_guide) |" in out.read_text()


@pytest.mark.filterwarnings("ignore:marginal_resample:UserWarning")  # tiny fits
def test_subsample_noise_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "noise.md"
    argv = ["--groups", "30", "--batch", "5", "--steps", "4", "--every", "2", "--seeds", "0,1"]
    subsample_noise.main([*argv, "--average", "0.5", "--draws", "20", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 * 3 and "| 1 | end |" in rows[-1] and "nan" not in out.read_text()
    subsample_noise.main([*argv, "--marginal", "50", "--draws", "20", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 * 4 and "| 1 | end, marginal_resample (" in rows[-1]
    assert "nan" not in out.read_text()


def test_glm_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "glm.md"
    argv = ["--groups", "4", "--guides", "normal,hierarchical", "--steps", "3"]
    argv += ["--warmup", "5", "--samples", "10", "--draws", "50", "--out", str(out)]
    hierarchical_glm.main(argv)
    text = out.read_text()
    assert "| normal |" in text and "| hierarchical |" in text and "failed" not in text
