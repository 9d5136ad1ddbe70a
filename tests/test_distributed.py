"""Data-parallel training: two gloo processes on the CPU against one process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_flows_ext.flows import Flow, glow
from pyro_flows_ext.train import (
    fit,
    is_main_process,
    process_count,
    process_rank,
    setup_distributed,
    torchrun_env,
)
from pyro_flows_ext.train.distributed import Distributed

WORLD, BATCH, STEPS = 2, 16, 6
SETTINGS: dict[str, Any] = dict(steps=STEPS, lr=1e-2, warmup=2, eval_every=3, device="cpu",
                                progress=False, seed=3)  # fmt: skip


def _flow(init_seed: int) -> Flow:
    torch.manual_seed(init_seed)  # a different start in each process: DDP broadcasts rank 0's
    return glow((1, 4, 4), levels=1, depth=2, hidden_channels=4).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(144, 1, 4, 4, generator=g, dtype=torch.float64)
    x = x.cumsum(-1) + 2.0  # correlated pixels, away from zero: something for ActNorm to fit
    return x[:128], x[128:]


def _contexts() -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot contexts of :func:`_data`'s examples, one row each (3 classes)."""
    labels = torch.arange(144) % 3
    c = torch.nn.functional.one_hot(labels, 3)
    return c[:128], c[128:]


def _conditional_flow(init_seed: int) -> Flow:
    torch.manual_seed(init_seed)
    return glow((1, 4, 4), levels=1, depth=1, hidden_channels=4, context_dim=3).double()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        train, valid = _data()
        flow = _flow(100 + rank)
        ckpt = Path(out) / "run.pt"
        history = fit(flow, train, valid=valid, batch_size=BATCH, checkpoint=ckpt, **SETTINGS)
        torch.save({"state": flow.state_dict(), "history": history.to_dict()},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
        # interrupted after 3 steps, resumed (from fresh, different weights) to the end
        part = Path(out) / "part.pt"
        fit(_flow(100 + rank), train, valid=valid, batch_size=BATCH, checkpoint=part,
            **{**SETTINGS, "steps": 3})  # fmt: skip
        resumed = _flow(9 + rank)
        fit(resumed, train, valid=valid, batch_size=BATCH, checkpoint=part, **SETTINGS)
        torch.save(resumed.state_dict(), Path(out) / f"resumed{rank}.pt")
        # a conditional flow: each process takes the context rows of its shard
        (c_train, c_valid), cond = _contexts(), _conditional_flow(200 + rank)
        history = fit(cond, train, context=c_train, valid=valid, valid_context=c_valid,
                      batch_size=BATCH, **SETTINGS)  # fmt: skip
        torch.save({"state": cond.state_dict(), "history": history.to_dict()},
                   Path(out) / f"conditional{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def test_ranks_hold_identical_weights(two_processes: Path) -> None:
    a, b = (_load(two_processes / f"rank{r}.pt") for r in range(WORLD))
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["history"]["valid_loss"] == b["history"]["valid_loss"]
    assert a["history"]["best_step"] == b["history"]["best_step"]


def test_two_processes_match_one_process_on_the_global_batch(two_processes: Path) -> None:
    train, valid = _data()
    flow = _flow(100)  # rank 0's start
    single = fit(flow, train, valid=valid, batch_size=BATCH * WORLD, distributed=False,
                 **SETTINGS)  # fmt: skip
    ddp = _load(two_processes / "rank0.pt")
    assert len(ddp["history"]["loss"]) == STEPS
    torch.testing.assert_close(
        torch.tensor(ddp["history"]["loss"]), torch.tensor(single.loss),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(ddp["history"]["valid_loss"]), torch.tensor(single.valid_loss),
        rtol=1e-6, atol=1e-8,
    )  # fmt: skip
    for key, value in flow.state_dict().items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_conditional_flows_train_data_parallel(two_processes: Path) -> None:
    """Two processes on a conditional flow match one process on the global batch: every
    process pairs its shard of the examples with the same shard of the contexts."""
    (train, valid), (c_train, c_valid) = _data(), _contexts()
    flow = _conditional_flow(200)  # rank 0's start
    single = fit(flow, train, context=c_train, valid=valid, valid_context=c_valid,
                 batch_size=BATCH * WORLD, distributed=False, **SETTINGS)  # fmt: skip
    runs = [_load(two_processes / f"conditional{r}.pt") for r in range(WORLD)]
    assert runs[0]["history"]["valid_loss"] == runs[1]["history"]["valid_loss"]
    torch.testing.assert_close(
        torch.tensor(runs[0]["history"]["loss"]), torch.tensor(single.loss),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(runs[0]["history"]["valid_loss"]), torch.tensor(single.valid_loss),
        rtol=1e-6, atol=1e-8,
    )  # fmt: skip
    for key, value in flow.state_dict().items():
        assert torch.equal(runs[0]["state"][key], runs[1]["state"][key]), key
        torch.testing.assert_close(runs[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_only_rank_zero_writes_and_resume_is_exact(two_processes: Path) -> None:
    files = sorted(p.name for p in two_processes.iterdir())
    assert "run.pt" in files and not any(name.endswith(".tmp") for name in files)
    ckpt = _load(two_processes / "run.pt")
    assert ckpt["step"] == STEPS and ckpt["fit"]["world_size"] == WORLD
    full = _load(two_processes / "rank0.pt")["state"]
    for rank in range(WORLD):
        resumed = _load(two_processes / f"resumed{rank}.pt")
        for key, value in full.items():
            assert torch.equal(resumed[key], value), (rank, key)


def test_single_process_view() -> None:
    ctx = setup_distributed(None, torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert ctx.sum(1.5, 2) == [1.5, 2.0] and ctx.rank_key == ()
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap(module) is module
    assert torch.equal(Distributed(rank=2, world_size=3).shard(torch.arange(7)), torch.arange(5, 7))


def test_distributed_argument_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None
    flow, (train, _) = _flow(0), _data()
    with pytest.raises(ValueError, match="torchrun"):
        fit(flow, train, steps=1, device="cpu", progress=False, distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        fit(flow, train, steps=1, device="cpu", progress=False, distributed="yes")  # type: ignore[arg-type]
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        torchrun_env()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name(
    "torchrun").exists(), reason="torchrun not installed")  # fmt: skip
def test_cli_under_torchrun(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "pyro_flows_ext", "fit",
               "--data", "moons", "--model", "realnvp", "--depth", "2", "--hidden-dims", "8,8",
               "--steps", "6", "--eval-every", "3", "--batch-size", "32", "--samples", "8",
               "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("test bits/dim") == 1  # process 0 alone reports
    for name in ("model.pt", "samples.png", "curve.png", "metrics.json"):
        assert (tmp_path / name).exists()
    assert torch.load(tmp_path / "model.pt", weights_only=True)["fit"]["world_size"] == 2


def test_process_rank_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI asks these (not the environment) which process prints and writes."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (process_rank(), process_count(), is_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert (process_rank(), process_count(), is_main_process()) == (1, 3, False)
