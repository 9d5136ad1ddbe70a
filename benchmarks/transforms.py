"""Speed of our transforms against Pyro's, same sizes, same run.

Times one "round" = forward, log-det, inverse of a fresh tensor and its log-det (the work of
``rsample`` plus ``log_prob`` in a ``TransformedDistribution``), and one training step
(the round's outputs summed and back-propagated). Prints the median over repeats and the
ratio ours / Pyro's (below 1 means ours is faster).

    python benchmarks/transforms.py            # one thread, default sizes
    python benchmarks/transforms.py --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro.distributions.transforms as pt
import torch
from pyro.nn import DenseNN
from torch.distributions import Transform

from pyro_flows_ext import transforms as T


def _round(t: Transform, x: torch.Tensor, y_shape: tuple[int, ...]) -> torch.Tensor:
    y = t(x)
    ld = t.log_abs_det_jacobian(x, y)
    y2 = torch.randn(y_shape, dtype=x.dtype)
    x2 = t.inv(y2)
    ld2 = t.log_abs_det_jacobian(x2, y2)
    return y.sum() + ld.sum() + x2.sum() + ld2.sum()


def median_ms(
    fns: tuple[Callable[[], object], Callable[[], object]], repeats: int, warmup: int = 3
) -> tuple[float, float]:
    """Medians (ms) of two functions timed alternately, so that load on the machine hits both."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for fn, acc in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                acc.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def compare(name: str, ours: Transform, theirs: Transform, x: torch.Tensor, repeats: int) -> None:
    shape = tuple(x.shape)

    def run(t: Transform, train: bool) -> Callable[[], object]:
        def step() -> object:
            if train:
                _round(t, x, shape).backward()
                return None
            with torch.no_grad():
                return _round(t, x, shape)

        return step

    for mode, train in (("round", False), ("train step", True)):
        a, b = median_ms((run(ours, train), run(theirs, train)), repeats)
        print(f"{name:<44} {mode:<10} ours {a:8.3f} ms   pyro {b:8.3f} ms   ratio {a / b:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=200, help="timed repeats per case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")

    for c, hw, batch in [(12, 16, 64), (48, 8, 64), (96, 4, 256)]:
        x = torch.randn(batch, c, hw, hw)
        ours = T.InvertibleConv1x1(c)
        theirs = pt.GeneralizedChannelPermute(channels=c)
        compare(f"1x1 conv C={c} {hw}x{hw} batch {batch}", ours, theirs, x, args.repeats)

    for dim, hidden, batch in [(10, 64, 256), (64, 256, 256)]:
        x = torch.randn(batch, dim)
        split = dim // 2
        ours_c = T.affine_coupling(dim, hidden_dims=[hidden, hidden])
        theirs_c = pt.AffineCoupling(
            split, DenseNN(split, [hidden, hidden], [dim - split, dim - split])
        )
        compare(
            f"affine coupling D={dim} hidden {hidden} batch {batch}",
            ours_c,
            theirs_c,
            x,
            args.repeats,
        )


if __name__ == "__main__":
    main()
