"""``benchmarks/gpu.py`` on its CPU fallback (``--device cpu --smoke``): the code paths the
GPU run takes, at a tiny size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(_REPO))

from benchmarks import gpu  # noqa: E402
from benchmarks.posteriors.models import posteriordb_root  # noqa: E402
from pyro_flows_ext.datasets import find_mnist  # noqa: E402

SMOKE = ["--device", "cpu", "--smoke"]


@pytest.fixture
def shared_data() -> None:
    """The Glow section reads MNIST and the guides section a posteriordb posterior from
    ``../shared``; without them (a user's clone) these runs are skipped."""
    try:
        find_mnist()
        posteriordb_root()
    except FileNotFoundError as err:
        pytest.skip(f"the shared data is not available here: {err}")


def _check_glow_and_guides(sections: dict) -> None:
    glow = sections["glow"]
    for name, row in glow.items():
        if name.startswith("bf16"):  # fit allows bf16 autocast on CUDA only
            assert row == {"skipped": "bf16 autocast needs CUDA"}
            continue
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["first_step_s"] > 0
        assert 0 < row["test_bpd"] < 9 and row["steps"] == gpu.SMOKE.glow_steps
    guides = sections["guides"]
    assert len(guides) == 2
    for row in guides.values():
        assert "error" not in row, row
        assert row["device_ms_per_step"] > 0 and row["cpu_ms_per_step"] > 0
        assert row["cpu_over_device"] > 0


def test_cpu_fallback_writes_its_results(tmp_path: Path, shared_data: None) -> None:
    out = tmp_path / "gpu.json"
    gpu.main([*SMOKE, "--parts", "glow,guides", "--no-compile", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["smoke"] is True
    assert set(saved["sections"]) == {"glow", "guides"}
    assert set(saved["sections"]["glow"]) == {"float32 eager", "bf16 eager"}
    _check_glow_and_guides(saved["sections"])
    assert "| float32 eager |" in out.with_suffix(".md").read_text()


def test_unknown_section_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu.parse(["--parts", "glow,speed"])
    assert "--parts takes some of tests, glow, guides" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.compile's internal warnings
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_whole_cpu_fallback(tmp_path: Path, shared_data: None) -> None:
    """Every section, the CUDA tests (all skipped without CUDA) and compiled Glows too."""
    results = gpu.main([*SMOKE, "--out", str(tmp_path / "gpu.json")])
    tests = results["sections"]["tests"]
    assert tests["returncode"] == 0 and tests.get("failed", 0) == 0, tests
    assert tests.get("skipped", 0) + tests.get("passed", 0) > 0
    assert set(results["sections"]["glow"]) == {
        "float32 eager", "float32 compiled", "bf16 eager", "bf16 compiled"
    }  # fmt: skip
    _check_glow_and_guides(results["sections"])
