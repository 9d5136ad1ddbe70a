"""The cost benchmark (benchmarks.hierarchical_cost): its synthetic padded radon and the script
end to end at a tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(_REPO))

from benchmarks import hierarchical_cost  # noqa: E402


def test_synthetic_radon_is_a_padded_masked_grid_with_heavy_tailed_counties() -> None:
    post = hierarchical_cost.synthetic_radon(counties=200, seed=3)
    floor, y, mask = post.args
    houses = mask.sum(0)
    assert y.shape == floor.shape == mask.shape and y.shape == (int(houses.max()), 200)
    assert houses.min() >= 1 and houses.max() > 5 * houses.float().median()  # heavy tail
    assert 15 < houses.float().mean() < 50  # about 30 per county
    assert (y[~mask] == 0).all() and (floor[~mask] == 0).all()
    assert set(floor[mask].unique().tolist()) == {0.0, 1.0}
    again = hierarchical_cost.synthetic_radon(counties=200, seed=3).args[1]
    assert torch.equal(y, again)


def test_script_times_both_guides_and_reports_their_ratio(capsys) -> None:
    argv = ["--posteriors", "funnel", "--steps", "2", "--round", "2", "--warmup", "1"]
    (row,) = hierarchical_cost.main(argv)
    assert row["posterior"] == "funnel" and row["normal"] > 0 and row["hierarchical"] > 0
    assert row["ratio"] == row["hierarchical"] / row["normal"]
    assert "| funnel |" in capsys.readouterr().out


def test_synthetic_radon_rejects_a_bad_size() -> None:
    with pytest.raises(ValueError, match="counties"):
        hierarchical_cost.synthetic_radon(counties=0)
