"""End-to-end tests of the ``pyro-flows`` command on tiny settings."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_flows_ext.cli import build_parser, main
from pyro_flows_ext.flows import glow

COMMON = ["--steps", "6", "--depth", "1", "--eval-every", "3", "--samples", "4", "--no-progress"]
TINY = [*COMMON, "--hidden-channels", "4"]  # images
TINY_VECTORS = [*COMMON, "--hidden-dims", "4,4"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("digits")
    buffer, threads = io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(buffer):
        code = main(["fit", "--out", str(out), *TINY])
    torch.set_num_threads(threads)
    assert code == 0
    return out, buffer.getvalue()


def test_fit_writes_its_files(digits_run: tuple[Path, str]) -> None:
    out, stdout = digits_run
    for name in ("model.pt", "samples.png", "curve.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    assert "test bits/dim:" in stdout and "digits" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and 0 < metrics["test_bpd"] < np.log2(17) + 1


def test_fit_again_resumes(
    digits_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = digits_run
    assert main(["fit", "--out", str(out), *TINY]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["fit", "--out", str(out), *COMMON, "--hidden-channels", "8"]) == 2
    assert "--restart" in capsys.readouterr().err


def test_sample_writes_png_and_levels(digits_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = digits_run
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    code = main(["sample", str(out / "model.pt"), "-n", "5", "--temperature", "0.7",
                 "--out", str(png), "--npy", str(npy)])  # fmt: skip
    assert code == 0 and png.is_file()
    x = np.load(npy)
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 16
    assert main(["sample", str(out / "model.pt"), "-n", "2", "--last"]) == 0
    assert (out / "samples_T0.8.png").is_file()


@pytest.mark.parametrize("model", ["glow", "realnvp"])
def test_fit_moons(model: str, tmp_path: Path) -> None:
    args = ["fit", "--data", "moons", "--model", model, "--out", str(tmp_path), *TINY_VECTORS]
    assert main(args) == 0
    assert (tmp_path / "samples.png").is_file()
    config = json.loads((tmp_path / "metrics.json").read_text())["model"]
    assert (config["builder"], config["depth"], config["hidden_dims"]) == (model, 1, [4, 4])


def test_demo_defaults_build_the_documented_model() -> None:
    """``pyro-flows fit`` with no arguments (``make demo``): Glow with spline couplings,
    2 levels, depth 8, 32 channels, uniform dequantization of the digits' 17 levels."""
    from pyro_flows_ext import cli_commands
    from pyro_flows_ext.train import Dequantize

    args = build_parser().parse_args(["fit"])
    _, split = cli_commands.load_data(args)
    flow = cli_commands.make_flow(args, split.event_shape)
    expected = glow((1, 8, 8), levels=2, depth=8, hidden_channels=32, coupling="spline")
    assert flow.config == expected.config
    assert cli_commands.make_preprocess(args, split).config() == Dequantize(17).config()


def test_fit_compile_compiles_the_coupling_networks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    assert main(["fit", "--out", str(tmp_path), *TINY]) == 0
    assert not compiled
    assert main(["fit", "--compile", "--restart", "--out", str(tmp_path), *TINY]) == 0
    assert len(compiled) == 3  # 2 levels of 1 step, and the split prior


def test_fit_variational_dequantization(tmp_path: Path) -> None:
    assert main(["fit", "--dequantize", "variational", "--out", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dequantize"] == "variational"
    assert main(["sample", str(tmp_path / "model.pt"), "-n", "2"]) == 0


def test_fit_csv_and_image_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    csv = tmp_path / "table.csv"
    csv.write_text("x,y,z\n" + "\n".join(",".join(map(str, r)) for r in rng.normal(size=(60, 3))))
    assert main(["fit", "--data", str(csv), "--out", str(tmp_path / "a"), *TINY_VECTORS]) == 0
    npy = tmp_path / "images.npy"
    np.save(npy, rng.integers(0, 256, size=(40, 4, 4)))
    args = ["fit", "--data", str(npy), "--model", "realnvp", "--out", str(tmp_path / "b"), *TINY]
    assert main(args) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data", "missing.npy"], "no such file"),
        (["fit", "--data", "mnist", "--data-dir", "nowhere"], "MNIST not found"),
        (["fit", "--data", "data.txt"], "--data must be"),
        (["fit", "--steps", "0"], "--steps must be positive"),
        (["fit", "--hidden-channels", "0"], "--hidden-channels must be positive"),
        (["fit", "--data", "moons", "--temperature", "0.5"], "--temperature applies to images"),
        (["fit", "--data", "moons", "--levels", "2"], "--levels applies to images"),
        (["fit", "--data", "moons", "--hidden-channels", "8"], "--hidden-channels applies to"),
        (["fit", "--hidden-dims", "8,8"], "--hidden-dims applies to vector data"),
        (["fit", "--data", "moons", "--dequantize", "uniform"], "--dequantize applies to"),
        (["fit", "--data", "moons", "--hidden-dims", "8,x"], "--hidden-dims must be positive"),
        (["fit", "--data", "moons", "--hidden-dims", "0"], "--hidden-dims must be positive"),
        (["fit", "--device", "quantum"], "device"),
        (["sample", "missing.pt"], "no checkpoint"),
    ],
)
def test_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*args, "--out", str(tmp_path / "o.png")] if args[0] == "sample" else
                [*args, "--out", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("1,2\n3,oops\n")
    not_ckpt = tmp_path / "model.pt"
    not_ckpt.write_bytes(b"definitely not a checkpoint")
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    for args in (["fit", "--data", str(bad_csv)], ["fit", "--data", str(bad_npy)],
                 ["sample", str(not_ckpt)]):  # fmt: skip
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyro-flows: error:") and len(err.strip().splitlines()) == 1


def test_help_explains_every_option() -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("fit", "sample"):
        for action in sub[command]._actions:
            assert action.help, (command, action.dest)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "pyro_flows_ext", "--help"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "fit" in result.stdout
