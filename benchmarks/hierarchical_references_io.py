"""Reading and writing the gold references of :mod:`benchmarks.hierarchical_references`
(numpy and json only: the benchmark and the tests need neither NumPyro nor JAX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

REFERENCES = Path(__file__).resolve().parent / "results" / "references"
THINNED = 4000  # global draws kept per reference
MAX_R_HAT, MIN_ESS = 1.01, 1000.0


def meets_target(facts: dict[str, Any]) -> bool:
    """Whether a sampled reference's every global has r-hat <= 1.01 and bulk and tail ESS >=
    1,000, without divergences (``facts["diagnostics"]``: ``name -> stats``; the locals'
    entries, keyed ``max_r_hat``, are not held to it)."""
    stats = [d for d in facts["diagnostics"].values() if "r_hat" in d]
    if not stats:
        raise ValueError("the reference has no global diagnostics")
    return facts.get("divergences", 0) == 0 and all(
        d["r_hat"] <= MAX_R_HAT and min(d["ess_bulk"], d["ess_tail"]) >= MIN_ESS for d in stats
    )


def save(folder: Path, name: str, arrays: dict[str, np.ndarray], facts: dict[str, Any]) -> None:
    """``<name>.npz`` (``arrays``) and ``<name>.json`` (``facts``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{name}.npz", **arrays)
    (folder / f"{name}.json").write_text(json.dumps(facts, indent=1) + "\n")


def load(name: str, folder: Path = REFERENCES) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The reference ``name``: its arrays as float64 tensors and its facts."""
    path = folder / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no reference {path}; make it with python -m benchmarks.hierarchical_references "
            f"--posteriors {name}"
        )
    with np.load(path) as data:
        arrays = {k: torch.as_tensor(data[k], dtype=torch.float64) for k in data.files}
    facts = json.loads((folder / f"{name}.json").read_text())
    return arrays, facts


def _row(facts: dict[str, Any]) -> str:
    stats = [d for d in facts.get("diagnostics", {}).values() if "r_hat" in d]
    if not stats:
        return f"| {facts['name']} | {facts['method']} | | | | | | `{facts['command']}` |"
    r_hat = max(d["r_hat"] for d in stats)
    bulk, tail = min(d["ess_bulk"] for d in stats), min(d["ess_tail"] for d in stats)
    draws = f"{facts['chains']} x {facts['samples_per_chain']}"
    seconds = facts.get("seconds", "")
    return (
        f"| {facts['name']} | {facts['method']} | {draws} | {r_hat:.4f} | {bulk:.0f} / {tail:.0f}"
        f" | {facts['divergences']} | {seconds} | `{facts['command']}` |"
    )


def write_readme(folder: Path) -> None:
    """``README.md`` in ``folder``: one row per reference there."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    lines = [
        "# Gold references of the hierarchical benchmark",
        "",
        "Written by `benchmarks/hierarchical_references.py` (see its docstring); read by "
        "`benchmarks/hierarchical_real.py`. `<name>.npz`: every latent's mean and sd on the "
        "unconstrained scale (`<latent>_mean`, `<latent>_sd`; `log_sigma` for a positive "
        f"`sigma`) and the globals' draws thinned to {THINNED} (`draws_<global>`); "
        "`<name>.json`: the settings, the command and the diagnostics (ArviZ rank-normalised "
        "split r-hat, bulk and tail ESS per global; the locals' worst).",
        "",
        f"Target for every global: r-hat <= {MAX_R_HAT}, bulk and tail ESS >= {MIN_ESS:.0f}.",
        "",
        "| posterior | method | chains x draws | max r-hat (globals) | min ESS bulk / tail "
        "(globals) | divergences | seconds | command |",
        "|" + " --- |" * 8,
    ]
    lines += [_row(facts) for facts in rows]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
