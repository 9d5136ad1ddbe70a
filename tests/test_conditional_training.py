"""Training and scoring conditional density models ``p(x | c)``: ``fit(..., context=)``,
``nll``/``bits_per_dim(..., context=)``, checkpoints and exact resumption, the bad-context
table, the digits' labels, and ``pyro-flows fit --conditional``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pyro_flows_ext import datasets
from pyro_flows_ext.cli import main
from pyro_flows_ext.flows import Flow, glow, realnvp
from pyro_flows_ext.train import bits_per_dim, fit, load_checkpoint, nll, read_checkpoint

K = 3
MEANS = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])


def _labelled(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D points around one of three means chosen by a one-hot label: ``(x, context)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=g)
    x = MEANS[labels] + 0.5 * torch.randn(n, 2, generator=g)
    return x, torch.nn.functional.one_hot(labels, K).float()


@pytest.fixture(scope="module")
def trained() -> tuple[Flow, torch.Tensor, torch.Tensor]:
    """A conditional RealNVP fitted to the three clusters, with held-out data."""
    x, c = _labelled(1024, seed=0)
    x_valid, c_valid = _labelled(256, seed=1)
    torch.manual_seed(0)
    flow = realnvp(2, depth=4, hidden_dims=[32, 32], context_dim=K)
    fit(flow, x, context=c, valid=x_valid, valid_context=c_valid, steps=300, batch_size=128,
        lr=5e-3, warmup=20, eval_every=100, device="cpu", progress=False)  # fmt: skip
    x_test, c_test = _labelled(512, seed=2)
    return flow, x_test, c_test


def test_the_true_labels_explain_the_data_better(
    trained: tuple[Flow, torch.Tensor, torch.Tensor],
) -> None:
    flow, x, c = trained
    shuffled = c[torch.randperm(len(c), generator=torch.Generator().manual_seed(5))]
    true_nll, wrong_nll = nll(flow, x, context=c), nll(flow, x, context=shuffled)
    # the clusters are 8 standard deviations apart: the wrong label costs many nats
    assert true_nll < wrong_nll - 5.0
    # the truth, N(mean_k, 0.5^2 I), has entropy log(2 pi e 0.25) ~ 1.45 nats; without the
    # label the best one can do is the mixture, log 3 ~ 1.10 nats worse
    entropy = math.log(2 * math.pi * math.e * 0.25)
    assert entropy - 0.1 < true_nll < entropy + 0.2
    assert math.isclose(bits_per_dim(flow, x, context=c), true_nll / (2 * math.log(2)))


def test_samples_given_each_label_land_on_its_cluster(
    trained: tuple[Flow, torch.Tensor, torch.Tensor],
) -> None:
    flow, _, _ = trained
    torch.manual_seed(0)
    samples = flow.sample((400,), context=torch.eye(K))  # (400, K, 2)
    assert samples.shape == (400, K, 2)
    torch.testing.assert_close(samples.mean(0), MEANS, atol=0.3, rtol=0)


def test_metrics_take_numpy_and_integer_contexts(
    trained: tuple[Flow, torch.Tensor, torch.Tensor],
) -> None:
    flow, x, c = trained
    expected = nll(flow, x, context=c, batch_size=100)
    assert nll(flow, x.numpy(), context=c.long().numpy()) == pytest.approx(expected, rel=1e-6)


class _Interrupt(Exception):
    pass


def test_conditional_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    digits = datasets.load_digits_split(seed=0)
    assert digits.labels is not None
    train_c = torch.nn.functional.one_hot(digits.labels.train[:128], 10)
    valid_c = torch.nn.functional.one_hot(digits.labels.valid[:32], 10)

    def run(path: Path, stop: int | None = None) -> tuple[Flow, dict[str, Any]]:
        def callback(step: int, loss: float) -> None:
            if step == stop:
                raise _Interrupt

        torch.manual_seed(1)
        flow = glow((1, 8, 8), depth=1, hidden_channels=4, context_dim=10)
        history = fit(flow, digits.train[:128], context=train_c, valid=digits.valid[:32],
                      valid_context=valid_c, steps=10, batch_size=16, eval_every=4,
                      patience=None, dequantize=digits.levels, checkpoint=path, device="cpu",
                      progress=False, seed=3, callback=callback)  # fmt: skip
        return flow, history.to_dict()

    flow_a, history_a = run(tmp_path / "a.pt")
    with pytest.raises(_Interrupt):
        run(tmp_path / "b.pt", stop=6)
    assert read_checkpoint(tmp_path / "b.pt")["step"] == 4
    flow_b, history_b = run(tmp_path / "b.pt")  # resumes at step 4
    assert len(history_a.pop("step_time")) == len(history_b.pop("step_time")) == 10
    assert history_a == history_b
    for (name, a), b in zip(flow_a.state_dict().items(), flow_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the checkpoint rebuilds the conditional model (its config holds context_dim) exactly
    ckpt = read_checkpoint(tmp_path / "a.pt")
    assert ckpt["flow_config"]["context_dim"] == 10
    loaded, pre, _ = load_checkpoint(tmp_path / "a.pt", best=False)
    x, c = digits.test[:20], torch.nn.functional.one_hot(digits.labels.test[:20], 10)
    assert bits_per_dim(loaded, x, context=c, dequantize=pre) == bits_per_dim(
        flow_a, x, context=c, dequantize=pre
    )


def test_the_context_is_data_not_state(tmp_path: Path) -> None:
    """A conditional checkpoint holds what an unconditional one holds, nothing more."""
    x, c = _labelled(64, seed=0)
    fit(realnvp(2, depth=1, context_dim=K), x, context=c, steps=2, checkpoint=tmp_path / "c.pt",
        device="cpu", progress=False)  # fmt: skip
    fit(realnvp(2, depth=1), x, steps=2, checkpoint=tmp_path / "u.pt", device="cpu",
        progress=False)  # fmt: skip
    conditional, unconditional = (
        read_checkpoint(tmp_path / "c.pt"),
        read_checkpoint(tmp_path / "u.pt"),
    )
    assert conditional.keys() == unconditional.keys()
    assert conditional["fit"].keys() == unconditional["fit"].keys()


# -- bad contexts: one test id per case, each raised before any work --------------------

X, C = _labelled(32, seed=0)
V, T = ValueError, TypeError
BAD: dict[str, tuple[bool, dict[str, Any], type[Exception], str]] = {
    # (conditional flow?, fit arguments, error, message)
    "conditional-without-context": (True, {}, V, "needs context=c of shape \\(32, 3\\)"),
    "unconditional-with-context": (False, {"context": C}, V, "not conditional"),
    "rows-differ": (True, {"context": C[:31]}, V, "31 rows but train has 32"),
    "context-dim-differs": (True, {"context": C[:, :2]}, V, "shape \\(N, 3\\)"),
    "context-one-dimensional": (True, {"context": C[0]}, V, "shape \\(N, 3\\)"),
    "context-a-list": (True, {"context": C.tolist()}, T, "context must be a torch.Tensor"),
    "context-complex": (True, {"context": C.to(torch.complex64)}, T, "real numbers"),
    "context-nan": (True, {"context": C.masked_fill(C == 1, math.nan)}, V, "NaN"),
    "valid-without-valid-context": (True, {"context": C, "valid": X}, V, "valid_context=c"),
    "valid-context-without-valid": (True, {"context": C, "valid_context": C}, V, "without valid"),
    "valid-context-rows-differ": (
        True,
        {"context": C, "valid": X, "valid_context": C[:5]},
        V,
        "valid has 32",
    ),  # fmt: skip
    "valid-context-unconditional": (False, {"valid": X, "valid_context": C}, V, "not conditional"),
}


@pytest.mark.parametrize(("conditional", "kwargs", "error", "match"), BAD.values(), ids=BAD.keys())
def test_bad_contexts_are_rejected_before_any_work(
    conditional: bool, kwargs: dict[str, Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    flow = glow(2, depth=1, hidden_dims=[4], context_dim=K if conditional else 0)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    calls: list[int] = []
    with pytest.raises(error, match=match):
        fit(flow, X, steps=2, device="cpu", progress=False, checkpoint=tmp_path / "c.pt",
            callback=lambda step, bpd: calls.append(step), **kwargs)  # fmt: skip
    after = flow.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # ActNorm not initialised
    assert not list(tmp_path.iterdir()) and not calls


METRIC_CASES: dict[str, tuple[bool, Any, type[Exception], str]] = {
    "nll-conditional-without-context": (True, None, V, "needs context"),
    "nll-unconditional-with-context": (False, C, V, "not conditional"),
    "nll-rows-differ": (True, C[:3], V, "3 rows but data has 32"),
    "nll-context-dim-differs": (True, torch.zeros(32, 4), V, "context_dim=3"),
}


@pytest.mark.parametrize(
    ("conditional", "context", "error", "match"), METRIC_CASES.values(), ids=METRIC_CASES.keys()
)
@pytest.mark.parametrize("metric", [nll, bits_per_dim], ids=["nll", "bits_per_dim"])
def test_metrics_reject_bad_contexts(
    metric: Callable[..., float], conditional: bool, context: Any, error: type[Exception],
    match: str,
) -> None:  # fmt: skip
    flow = realnvp(2, depth=1, context_dim=K if conditional else 0)
    with pytest.raises(error, match=match):
        metric(flow, X, context=context)


# -- the digits' labels ------------------------------------------------------------------


def test_digit_labels_follow_their_images_and_leave_the_split_unchanged() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    label_of = {img.astype(np.uint8).tobytes(): int(t) for img, t in zip(raw.images, raw.target,
                                                                         strict=True)}  # fmt: skip
    split = datasets.load_digits_split(seed=4)
    assert split.labels is not None and split.labels.classes == 10
    for images, labels in zip(split[:3], split.labels, strict=True):
        assert labels.dtype == torch.long and labels.shape == (len(images),)
        assert [label_of[img[0].numpy().tobytes()] for img in images] == labels.tolist()
    # the images are those of a split made without labels
    images = torch.from_numpy(raw.images.astype(np.uint8)).unsqueeze(1)
    plain = datasets.split_data(images, (1200, 300, 297), seed=4, levels=17)
    assert plain.labels is None
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], split[:3], strict=True))
    assert datasets.load_moons(100).labels is None


# -- the command -------------------------------------------------------------------------

TINY = ["--steps", "3", "--depth", "1", "--hidden-channels", "4", "--eval-every", "3",
        "--samples", "5", "--no-progress"]  # fmt: skip


def test_cli_fit_conditional_draws_one_row_per_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    assert main(["fit", "--conditional", "--out", str(tmp_path), *TINY]) == 0
    torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "test bits/dim given the true labels:" in stdout and "10 classes" in stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["conditional"] and metrics["model"]["context_dim"] == 10
    assert 0 < metrics["test_bpd"] < math.log2(17) + 1
    assert (tmp_path / "samples.png").is_file()
    npy = tmp_path / "s.npy"
    assert main(["sample", str(tmp_path / "model.pt"), "-n", "3", "--npy", str(npy)]) == 0
    assert "one row per class" in capsys.readouterr().out
    assert np.load(npy).shape == (10, 3, 1, 8, 8)  # (classes, per class, C, H, W)
    assert (tmp_path / "samples_T0.8.png").is_file()
    # resuming with the same options works; without --conditional it is another model
    assert main(["fit", "--conditional", "--out", str(tmp_path), *TINY]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["fit", "--out", str(tmp_path), *TINY]) == 2


def test_grid_row_i_is_drawn_given_class_i(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyro_flows_ext import cli_commands, plots
    from pyro_flows_ext.train import Dequantize

    torch.manual_seed(0)
    flow = glow((1, 4, 4), levels=1, depth=1, hidden_channels=4, context_dim=3)
    shown: dict[str, Any] = {}
    monkeypatch.setattr(plots, "save_samples", lambda x, path, **kw: shown.update(kw, x=x))
    torch.manual_seed(7)
    pre = Dequantize(17)
    x = cli_commands.draw_samples(flow, pre, 4, 1.0, tmp_path / "g.png", "title")
    torch.manual_seed(7)
    reference = flow.sample((4,), context=torch.eye(3))  # (per class, class, C, H, W)
    assert x.shape == (3, 4, 1, 4, 4) and torch.equal(x, reference.transpose(0, 1))
    assert shown["nrow"] == 4 and shown["row_labels"] == ["0", "1", "2"]
    grid_rows = shown["x"].reshape(3, 4, 1, 4, 4)  # 4 images per grid row, row-major
    for k in range(3):
        torch.testing.assert_close(grid_rows[k], pre.decode(reference[:, k]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("data", ["moons", "mnist"])
def test_cli_conditional_needs_labelled_data(
    data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--conditional", "--data", data, "--out", str(tmp_path), "--steps", "1"]
    if data == "mnist":
        try:
            datasets.find_mnist()
        except FileNotFoundError:
            pytest.skip("MNIST is not available here")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--conditional needs labelled data" in err and len(err.strip().splitlines()) == 1
