"""Tests of training: preprocessing, metrics, ``fit``, early stopping, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.distributions import (
    AffineTransform,
    CumulativeDistributionTransform,
    Normal,
    SigmoidTransform,
)

from pyro_flows_ext import datasets
from pyro_flows_ext.flows import Flow, glow, realnvp
from pyro_flows_ext.train import (
    Checkpoint,
    CheckpointMismatchError,
    Dequantize,
    History,
    Standardize,
    TrainingDivergedError,
    VariationalDequantize,
    as_preprocess,
    bits_per_dim,
    fit,
    load_checkpoint,
    nll,
    read_checkpoint,
)
from pyro_flows_ext.train.checkpoint import FORMAT
from pyro_flows_ext.transforms import ActNorm, Coupling


@pytest.fixture(scope="module")
def moons() -> datasets.Split:
    return datasets.load_moons(1000, seed=0)


@pytest.fixture(scope="module")
def digits() -> datasets.Split:
    return datasets.load_digits_split(seed=0)


# -- preprocessing and metrics -----------------------------------------------------------


def test_dequantize_log_det_matches_autograd() -> None:
    pre = Dequantize(levels=17, alpha=0.05)
    x = torch.randint(0, 17, (3, 1, 2, 2))
    g = torch.Generator().manual_seed(0)
    y, log_det = pre(x, event_dim=3, generator=g)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    v = (x + u).double().requires_grad_()  # the continuous variable with unit-volume cells
    p = 0.05 + 0.9 * v / 17
    y_ref = torch.log(p) - torch.log1p(-p)
    (grad,) = torch.autograd.grad(y_ref.sum(), v)  # elementwise map: diagonal Jacobian
    assert torch.allclose(y.double(), y_ref.detach(), atol=1e-5)
    assert torch.allclose(log_det.double(), grad.log().sum((1, 2, 3)), atol=1e-4)


def test_dequantize_decode_and_levels() -> None:
    pre = Dequantize(levels=4)
    x = torch.arange(4).repeat(5, 1)
    y, _ = pre(x, event_dim=1)
    assert torch.equal(pre.to_levels(y), x)
    assert bool((pre.decode(y) >= 0).all() and (pre.decode(y) <= 1).all())
    with pytest.raises(ValueError, match="0..3"):
        pre.validate(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="levels"):
        Dequantize(levels=1)


def test_bits_per_dim_of_uniform_flow_is_log2_levels() -> None:
    """A flow that is uniform on [0, 1]^D scores dequantized L-level data at log2(L)."""
    uniform = Flow(6, [CumulativeDistributionTransform(Normal(0.0, 1.0))]).double()
    pixels = torch.randint(0, 17, (40, 6))
    bpd = bits_per_dim(uniform, pixels, dequantize=Dequantize(17, logit=False))
    assert math.isclose(bpd, math.log2(17), abs_tol=1e-9)


def test_bits_per_dim_counts_the_logit_jacobian() -> None:
    """The same uniform density, pushed through the logit: the bound is still log2(L)."""
    a = 0.05
    parts = [
        CumulativeDistributionTransform(Normal(0.0, 1.0)),
        AffineTransform(a, 1 - 2 * a),
        SigmoidTransform().inv,
    ]
    flow = Flow((1, 2, 2), parts).double()
    pixels = torch.randint(0, 256, (30, 1, 2, 2), dtype=torch.uint8)
    assert math.isclose(bits_per_dim(flow, pixels, dequantize=256), 8.0, abs_tol=1e-9)


def test_bits_per_dim_of_the_base_is_closed_form() -> None:
    x = torch.randn(100, 3, dtype=torch.float64)
    flow = Flow(3, []).double()
    expected = float((0.5 * x.square() + 0.5 * math.log(2 * math.pi)).sum(1).mean())
    assert math.isclose(nll(flow, x, batch_size=7), expected, rel_tol=1e-12)
    assert math.isclose(bits_per_dim(flow, x), expected / (3 * math.log(2)), rel_tol=1e-12)


def test_standardize_keeps_the_likelihood_of_raw_data() -> None:
    x = 5 + 3 * torch.randn(200, 2, dtype=torch.float64)
    pre = Standardize(torch.tensor([5.0, 5.0]), torch.tensor([3.0, 3.0]))
    flow = Flow(2, []).double()
    f64 = torch.float64
    ref = Normal(torch.tensor(5.0, dtype=f64), torch.tensor(3.0, dtype=f64))
    expected = -float(ref.log_prob(x).sum(1).mean())
    assert math.isclose(nll(flow, x, dequantize=pre), expected, rel_tol=1e-10)
    assert torch.allclose(pre.decode(pre(x, 1)[0]), x)
    assert as_preprocess(pre.config()).config() == pre.config()


def test_variational_dequantization_starts_uniform() -> None:
    x = torch.randint(0, 17, (6, 1, 4, 4)).float()
    y0, ld0 = Dequantize(17)(x, 3, torch.Generator().manual_seed(0))
    y1, ld1 = VariationalDequantize((1, 4, 4), 17)(x, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(y0, y1, atol=1e-5) and torch.allclose(ld0, ld1, atol=1e-4)


def test_variational_dequantization_log_q_is_a_density() -> None:
    """E_q[1/q(u|x)] over u ~ q is the volume of the unit cube: check on one pixel."""
    torch.manual_seed(0)  # E[1/q] is heavy-tailed for some draws of the weights: fix them
    q = VariationalDequantize(1, levels=4, logit=False)
    with torch.no_grad():
        for p in q.parameters():
            p.normal_(0, 0.5)
    x = torch.full((20000, 1), 2.0)
    with torch.no_grad():
        y, log_det = q(x, 1, torch.Generator().manual_seed(0))
    # log_det = -log L - log q(u|x), so E[exp(log_det + log L)] = E[1 / q] = 1
    assert abs(float(torch.exp(log_det + math.log(4)).mean()) - 1) < 0.05
    assert bool(((y * 4 >= 2) & (y * 4 < 3)).all())  # u stays inside the cell of x


def test_fit_trains_and_checkpoints_variational_dequantization(
    digits: datasets.Split, tmp_path
) -> None:
    torch.manual_seed(0)
    flow = glow((1, 8, 8), depth=1, hidden_channels=8)
    pre = VariationalDequantize((1, 8, 8), digits.levels, hidden=8)
    before = [p.detach().clone() for p in pre.parameters()]
    fit(flow, digits.train[:200], valid=digits.valid[:50], steps=10, eval_every=5,
        dequantize=pre, checkpoint=tmp_path / "v.pt", device="cpu", progress=False)  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(before, pre.parameters(), strict=True))
    loaded, loaded_pre, _ = load_checkpoint(tmp_path / "v.pt")
    assert isinstance(loaded_pre, VariationalDequantize)
    expected = bits_per_dim(flow, digits.test, dequantize=pre)
    assert bits_per_dim(loaded, digits.test, dequantize=loaded_pre) == expected


def test_discrete_data_need_dequantize() -> None:
    with pytest.raises(TypeError, match="dequantize"):
        bits_per_dim(Flow(2, []), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        bits_per_dim(Flow(2, []), torch.zeros(3, 4))


# -- fit ---------------------------------------------------------------------------------


def test_fit_lowers_the_loss_on_moons(moons: datasets.Split) -> None:
    torch.manual_seed(0)
    flow = realnvp(2, depth=4, hidden_dims=[32, 32])
    pre = Standardize.fit(moons.train, event_dim=1)
    before = bits_per_dim(flow, moons.valid, dequantize=pre)
    history = fit(flow, moons.train, valid=moons.valid, steps=300, batch_size=128, lr=3e-3,
                  eval_every=50, dequantize=pre, device="cpu", progress=False)  # fmt: skip
    after = bits_per_dim(flow, moons.valid, dequantize=pre)
    assert after < before - 0.3
    assert np.mean(history.loss[-20:]) < np.mean(history.loss[:20]) - 0.3
    assert len(history.step) == len(history.loss) == len(history.step_time) == 300
    assert history.valid_step == [50, 100, 150, 200, 250, 300]


def test_early_stopping_restores_the_best_weights(moons: datasets.Split) -> None:
    torch.manual_seed(0)
    flow = realnvp(2, depth=4, hidden_dims=[64, 64], actnorm=False)
    history = fit(flow, moons.train[:12], valid=moons.valid, steps=2000, batch_size=12,
                  lr=1e-2, warmup=1, eval_every=10, patience=5, device="cpu",
                  progress=False)  # fmt: skip
    assert history.stopped_early
    assert history.best_step is not None and history.best_step < history.step[-1]
    assert history.valid_loss[-1] > history.best_valid
    assert math.isclose(bits_per_dim(flow, moons.valid), history.best_valid, rel_tol=1e-6)


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def callback(s: int, loss: float) -> None:
        if s == step:
            raise _Interrupt

    return callback


def test_resume_equals_an_uninterrupted_run(digits: datasets.Split, tmp_path) -> None:
    def run(path, callback=None):
        torch.manual_seed(1)
        flow = glow((1, 8, 8), depth=1, hidden_channels=8)
        history = fit(flow, digits.train[:256], valid=digits.valid[:64], steps=16, batch_size=32,
                      eval_every=5, patience=None, dequantize=digits.levels, checkpoint=path,
                      device="cpu", progress=False, seed=3, callback=callback)  # fmt: skip
        return flow, history

    flow_a, history_a = run(tmp_path / "a.pt")
    with pytest.raises(_Interrupt):
        run(tmp_path / "b.pt", _interrupt_at(12))
    assert read_checkpoint(tmp_path / "b.pt")["step"] == 10
    flow_b, history_b = run(tmp_path / "b.pt")  # resumes at step 10
    a, b = history_a.to_dict(), history_b.to_dict()
    assert len(a.pop("step_time")) == len(b.pop("step_time")) == 16
    assert a == b
    for (name, a), b in zip(flow_a.state_dict().items(), flow_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ckpt_a, ckpt_b = read_checkpoint(tmp_path / "a.pt"), read_checkpoint(tmp_path / "b.pt")
    assert ckpt_a["step"] == ckpt_b["step"] == 16
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(
    moons: datasets.Split, tmp_path
) -> None:
    flow = glow(2, depth=2, hidden_dims=[8])
    path = tmp_path / "ckpt.pt"

    def poison(step: int, loss: float) -> None:
        if step == 5:
            with torch.no_grad():
                next(flow.parameters()).fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="step 6") as info:
        fit(flow, moons.train, steps=20, eval_every=4, checkpoint=path, device="cpu",
            progress=False, callback=poison)  # fmt: skip
    assert isinstance(info.value, TrainingDivergedError) and info.value.step == 6
    assert "checkpoint of step 4" in str(info.value)
    ckpt = read_checkpoint(path)
    assert ckpt["step"] == 4
    assert all(
        bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_checkpoint_reloads_log_prob_exactly(moons: datasets.Split, tmp_path) -> None:
    flow = glow(2, depth=2, hidden_dims=[8])
    pre = Standardize.fit(moons.train, event_dim=1)
    fit(flow, moons.train, valid=moons.valid, steps=10, eval_every=5, dequantize=pre,
        checkpoint=tmp_path / "m.pt", device="cpu", progress=True)  # fmt: skip
    loaded, loaded_pre, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = moons.test[:50]
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    assert loaded_pre.config() == pre.config()
    assert ckpt["history"]["valid_step"] == [5, 10]


def test_resume_refuses_another_model(moons: datasets.Split, tmp_path) -> None:
    path = tmp_path / "m.pt"
    fit(glow(2, depth=1), moons.train, steps=2, checkpoint=path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="another model"):
        fit(glow(2, depth=2), moons.train, steps=4, checkpoint=path, device="cpu", progress=False)
    fit(glow(2, depth=2), moons.train, steps=2, checkpoint=path, resume=False, device="cpu",
        progress=False)  # fmt: skip


def test_epochs_count_full_batches(moons: datasets.Split) -> None:
    history = fit(glow(2, depth=1), moons.train[:100], epochs=2, batch_size=32, device="cpu",
                  progress=False)  # fmt: skip
    assert len(history.step) == 2 * (100 // 32)


def test_fit_data_errors(digits: datasets.Split) -> None:
    flow = glow((1, 8, 8), depth=1, hidden_channels=4)
    with pytest.raises(TypeError, match="dequantize"):
        fit(flow, digits.train, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="0..15"):
        fit(flow, digits.train, steps=1, dequantize=16, device="cpu", progress=False)
    with pytest.raises(ValueError, match="shape"):
        fit(flow, digits.train[:, 0], steps=1, dequantize=17, device="cpu", progress=False)


def test_cosine_schedule_ends_at_zero(moons: datasets.Split) -> None:
    flow = glow(2, depth=1)
    lrs: list[float] = []
    fit(flow, moons.train, steps=12, warmup=2, schedule="cosine", device="cpu", progress=False,
        callback=lambda s, loss: lrs.append(s))  # fmt: skip
    assert lrs == list(range(1, 13))


def test_compile_reaches_every_coupling_network(
    digits: datasets.Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile=True`` hands each coupling network (the split prior's too) to
    ``torch.compile``, once; the real compilation is the slow test below."""
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    flow = glow((1, 8, 8), levels=2, depth=1, hidden_channels=4)
    nets = [m.conditioner for m in flow.modules() if isinstance(m, Coupling)]
    fit(flow, digits.train, steps=2, dequantize=digits.levels, device="cpu", progress=False,
        compile=True)  # fmt: skip
    assert len(nets) == 3 and sorted(map(id, compiled)) == sorted(map(id, nets))


def test_compile_without_coupling_networks_is_an_error(moons: datasets.Split) -> None:
    flow = Flow(2, [ActNorm(2)])
    with pytest.raises(ValueError, match="coupling networks"):
        fit(flow, moons.train, steps=1, device="cpu", progress=False, compile=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.compile's internal warnings
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_training_gives_the_eager_losses(digits: datasets.Split) -> None:
    torch.manual_seed(0)
    eager = glow((1, 8, 8), depth=1, hidden_channels=8)
    compiled = copy.deepcopy(eager)
    kw = {"steps": 6, "dequantize": digits.levels, "device": "cpu", "progress": False}
    expected = fit(eager, digits.train, **kw).loss
    got = fit(compiled, digits.train, compile=True, **kw).loss
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    x = Dequantize(digits.levels).to_levels(compiled.sample((2,)))  # a new shape recompiles
    assert x.shape == (2, 1, 8, 8)


# -- data sets ---------------------------------------------------------------------------


def test_digits_split_is_fixed_by_seed() -> None:
    a, b = datasets.load_digits_split(0), datasets.load_digits_split(0)
    assert a.train.shape == (1200, 1, 8, 8) and a.valid.shape[0] == 300 and a.test.shape[0] == 297
    assert a.train.dtype == torch.uint8 and int(a.train.max()) == 16 and a.levels == 17
    assert torch.equal(a.test, b.test)
    assert not torch.equal(a.test, datasets.load_digits_split(1).test)


def test_mnist_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        datasets.load_mnist(tmp_path)


def test_mnist_reader_on_a_tiny_idx_file(tmp_path) -> None:
    import gzip

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = np.array([2051, 2, 3, 4], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    x = datasets.load_mnist(tmp_path)
    assert x.shape == (2, 1, 3, 4) and torch.equal(x[:, 0], torch.from_numpy(images))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(ValueError, match="IDX"):
        datasets.load_mnist(tmp_path / "bad.gz")


def test_load_array_files(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(50, 3)))
    split = datasets.load_array(tmp_path / "x.npy")
    assert split.event_shape == (3,) and split.levels is None and len(split.train) == 40
    np.save(tmp_path / "img.npy", np.random.default_rng(0).integers(0, 256, (20, 4, 4)))
    split = datasets.load_array(tmp_path / "img.npy")
    assert split.event_shape == (1, 4, 4) and split.levels == 256
    (tmp_path / "t.csv").write_text("a,b\n" + "\n".join(f"{i},{2 * i}" for i in range(30)))
    assert datasets.load_array(tmp_path / "t.csv").event_shape == (2,)
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n5,6\n")
    with pytest.raises(ValueError, match="numeric CSV"):
        datasets.load_array(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        datasets.load_array(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=".npy or .csv"):
        datasets.load_array(tmp_path / "t.txt")


def test_checkpoint_schema_and_formats(moons: datasets.Split, tmp_path) -> None:
    path = tmp_path / "m.pt"
    fit(glow(2, depth=1), moons.train, steps=2, checkpoint=path, device="cpu", progress=False)
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {f.name for f in dataclasses.fields(Checkpoint)} | {"format"}
    assert stored["format"] == FORMAT
    ckpt = Checkpoint.read(path)
    assert ckpt.step == 2 and ckpt.to_dict().keys() == set(stored) - {"format"}
    with pytest.raises(CheckpointMismatchError, match="another model.*use X"):
        ckpt.check_compatible(glow(2, depth=2).config, ckpt.preprocess, path, "use X")
    ckpt.check_compatible(glow(2, depth=1).config, ckpt.preprocess, path, "use X")
    torch.save({**stored, "format": FORMAT - 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"format {FORMAT - 1}.*reads format {FORMAT}"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save({k: v for k, v in stored.items() if k != "rng"}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="lacks rng"):
        read_checkpoint(tmp_path / "part.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro_flows_ext checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_resume_with_learned_preprocessing_is_exact(digits: datasets.Split, tmp_path) -> None:
    """Interrupted and resumed with variational dequantization and early stopping on: the
    optimizer, the best weights and the learned noise all come back from the checkpoint."""

    def run(path, callback=None):
        torch.manual_seed(2)
        flow = glow((1, 8, 8), depth=1, hidden_channels=4)
        pre = VariationalDequantize((1, 8, 8), digits.levels, hidden=4)
        history = fit(flow, digits.train[:128], valid=digits.valid[:32], steps=12, batch_size=16,
                      eval_every=4, patience=5, lr=5e-3, warmup=2, schedule="cosine",
                      dequantize=pre, checkpoint=path, device="cpu", progress=False, seed=4,
                      callback=callback)  # fmt: skip
        return flow, pre, history

    flow_a, pre_a, history_a = run(tmp_path / "a.pt")
    with pytest.raises(_Interrupt):
        run(tmp_path / "b.pt", _interrupt_at(6))
    assert Checkpoint.read(tmp_path / "b.pt").step == 4
    flow_b, pre_b, history_b = run(tmp_path / "b.pt")
    a, b = history_a.to_dict(), history_b.to_dict()
    a.pop("step_time"), b.pop("step_time")
    assert a == b
    for module_a, module_b in ((flow_a, flow_b), (pre_a, pre_b)):
        for (name, x), y in zip(module_a.state_dict().items(), module_b.state_dict().values(),
                                strict=True):  # fmt: skip
            assert torch.equal(x, y), name


def test_history_reads_checkpoints_written_before_the_shared_vocabulary() -> None:
    old = {"step": [1, 2], "train_bpd": [3.0, 2.5], "step_time": [0.1, 0.1], "valid_step": [2]}
    old |= {"valid_bpd": [2.7], "best_step": 2, "best_valid": 2.7, "stopped_early": False}
    history = History.from_dict(old)
    assert history.loss == [3.0, 2.5] and history.valid_loss == [2.7] and history.best_step == 2
    assert History.from_dict(history.to_dict()) == history
