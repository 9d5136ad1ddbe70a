"""Training throughput of our Glow against normflows' Glow and against the floor.

The floor is the same conditioner networks run alone (forward and backward on inputs of the
shapes they see in the flow, no flow bookkeeping): no Glow with these networks can be faster.
All models have the same levels ``L``, steps ``K`` and width, and train on 28x28 inputs with
Adam; each "step" is one forward + backward + optimizer step on a batch. Timings alternate
between the models, so load on the machine hits all of them alike; figures are medians.

    python benchmarks/throughput.py                         # L=2, K=8, 64 channels, batch 64
    python benchmarks/throughput.py --profile               # where our step spends its time
    python benchmarks/throughput.py --compile               # adds fit(compile=True)'s path

``--compile`` adds our Glow with its coupling networks compiled as ``fit(compile=True)`` does
(:func:`~pyro_flows_ext.train.compile_conditioners`, on a copy of the same flow), and reports
the compile time: the first compiled step minus an eager step, with inductor's on-disk cache
in a fresh folder so that nothing is reused from an earlier run.

Needs the ``bench`` extra (normflows) for the peer; without it only ours and the floor run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from pyro_flows_ext import glow
from pyro_flows_ext.train import compile_conditioners
from pyro_flows_ext.transforms import Coupling


def floor_step(flow: nn.Module, batch: int) -> tuple[Callable[[], None], nn.Module]:
    """A step that runs only the conditioners of ``flow`` on inputs of the right shapes."""
    nets = nn.ModuleList()
    shapes = []
    for m in flow.modules():
        if isinstance(m, Coupling) and isinstance(m.conditioner, nn.Module):
            nets.append(m.conditioner)
            shapes.append((batch,) + m.partition.conditioner_shape)
    inputs = [torch.randn(s) for s in shapes]
    opt = torch.optim.Adam(nets.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        loss = sum(net(x).square().mean() for net, x in zip(nets, inputs, strict=True))
        loss.backward()  # type: ignore[union-attr]
        opt.step()

    return step, nets


def ours_step(flow: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=True)  # as ``fit`` does

    def step() -> None:
        opt.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        opt.step()

    return step


def compiled_step(flow: nn.Module, x: torch.Tensor) -> tuple[Callable[[], None], nn.Module]:
    """Our step on a copy of ``flow`` whose coupling networks are compiled as in ``fit``;
    prints the compile time (the first step's time minus an eager step's)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold
    eager = ours_step(copy.deepcopy(flow), x)
    eager()
    start = time.perf_counter()
    eager()
    eager_s = time.perf_counter() - start
    twin = copy.deepcopy(flow)
    n = compile_conditioners(twin)
    step = ours_step(twin, x)
    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    print(f"compiled {n} coupling networks: first step {first_s:.1f} s, "
          f"compile time {first_s - eager_s:.1f} s")  # fmt: skip
    return step, twin


def normflows_step(
    levels: int, steps: int, hidden: int, x: torch.Tensor
) -> tuple[Callable[[], None], nn.Module] | None:
    try:
        import normflows as nf
    except ImportError:
        return None
    c, h, w = x.shape[1:]
    q0, flows, merges = [], [], []
    for i in range(levels):
        blocks = [
            nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(steps)
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            f = 2 ** (levels - i)
            latent = (c * f, h // f, w // f)
        else:
            f = 2**levels
            latent = (c * 2 * f, h // f, w // f)
        q0.append(nf.distributions.GlowBase(latent))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model.log_prob(x, None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        (-model.log_prob(x, None).mean()).backward()
        opt.step()

    return step, model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="flow steps per level (K)")
    parser.add_argument("--hidden", type=int, default=64, help="conditioner channels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28, help="image height and width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per model")
    parser.add_argument(
        "--compile", action="store_true", help="also time fit(compile=True)'s compiled networks"
    )
    parser.add_argument("--profile", action="store_true", help="profile our training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size)
    flow = glow(
        (1, args.size, args.size), levels=args.levels, depth=args.steps, hidden_channels=args.hidden
    )
    with torch.no_grad():
        flow.log_prob(x)  # ActNorm's data-dependent initialisation
    floor, nets = floor_step(flow, args.batch)
    models: dict[str, tuple[Callable[[], None], nn.Module]] = {
        "floor (conditioners alone)": (floor, nets),
        "pyro_flows_ext glow": (ours_step(flow, x), flow),
    }
    if args.compile:
        models["pyro_flows_ext glow, compiled"] = compiled_step(flow, x)
    peer = normflows_step(args.levels, args.steps, args.hidden, x)
    if peer is not None:
        models["normflows glow"] = peer

    print(
        f"torch {torch.__version__}, {args.threads} thread(s); L={args.levels} "
        f"K={args.steps} hidden={args.hidden} batch={args.batch} {args.size}x{args.size}"
    )
    for fn, _ in models.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, (fn, _) in models.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    floor_s = statistics.median(times["floor (conditioners alone)"])
    for name, (_, module) in models.items():
        t = statistics.median(times[name])
        print(
            f"{name:<32} {args.batch / t:8.1f} samples/s   {1e3 * t:8.1f} ms/step   "
            f"{t / floor_s:5.2f}x the floor's time   {n_params(module):,} params"
        )
    if args.compile:
        ratio = statistics.median(times["pyro_flows_ext glow"]) / statistics.median(
            times["pyro_flows_ext glow, compiled"]
        )
        print(f"compiled speed-up (eager time / compiled time, same run): {ratio:.2f}x")

    if args.profile:
        step = models["pyro_flows_ext glow"][0]
        with torch.profiler.profile() as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
