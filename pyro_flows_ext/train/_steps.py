"""Pieces of :func:`~pyro_flows_ext.train.fit`'s loop: seeds, batch order, the learning-rate
schedule and the training objective as a module (so that
``DistributedDataParallel`` can wrap it)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from pyro_flows_ext.flows import Flow
from pyro_flows_ext.train.preprocess import Preprocess

__all__ = [
    "Batches",
    "Objective",
    "Schedule",
    "compile_conditioners",
    "seed_of",
    "snapshot",
]


def seed_of(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Batches:
    """Epoch permutations from ``(seed, epoch)``; batch ``s`` is a slice of epoch ``s // n``."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.batch_size = min(batch_size, size)
        self.per_epoch = size // self.batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_of(self.seed, 0, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


class Schedule:
    """Learning-rate factor: linear warm-up, then constant or a half cosine to zero."""

    def __init__(self, warmup: int, total: int, kind: str) -> None:
        self.warmup, self.total, self.kind = max(int(warmup), 1), total, kind

    def __call__(self, step: int) -> float:
        ramp = min(1.0, (step + 1) / self.warmup)
        if self.kind == "constant" or step < self.warmup:
            return ramp
        frac = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def compile_conditioners(flow: Flow) -> int:
    """``torch.compile`` the coupling networks of ``flow`` in place (where the FLOPs are) and
    return how many there are; the rest of the flow is small elementwise bookkeeping that
    would only break graphs (compiling the whole ``log_prob`` of a Glow took minutes on a
    CPU). Parameter names, ``state_dict`` and checkpoints are unchanged; each network is
    compiled on its first call (and again for new input shapes).

    Raises:
        ValueError: when ``flow`` has no coupling network to compile.
    """
    from pyro_flows_ext.transforms import ConditionalCoupling, Coupling

    nets = [
        m.conditioner
        for m in flow.modules()
        if isinstance(m, Coupling | ConditionalCoupling)
        and isinstance(m.conditioner, torch.nn.Module)
    ]
    if not nets:
        raise ValueError("compile=True needs a flow with coupling networks; this flow has none")
    for net in nets:
        net.compile()
    return len(nets)


class Objective(nn.Module):
    """The training loss as a module: bits/dim of a raw batch, averaged over the batch.

    It owns the flow and the learned preprocessing (an empty module when there is none), so
    its ``parameters()`` are everything ``fit`` optimises and, wrapped in
    ``DistributedDataParallel``, its ``forward`` is where the gradients get averaged.
    """

    def __init__(self, flow: Flow, pre: Preprocess, bf16: bool = False) -> None:
        super().__init__()
        self.flow = flow
        self.learned = pre if isinstance(pre, nn.Module) else nn.Module()
        self._fixed = None if isinstance(pre, nn.Module) else pre
        self.bf16 = bf16

    @property
    def pre(self) -> Preprocess:
        return self._fixed if self._fixed is not None else self.learned  # type: ignore[return-value]

    def forward(
        self, x: Tensor, generator: torch.Generator, context: Tensor | None = None
    ) -> Tensor:
        """Mean bits/dim of the raw batch ``x`` (given ``context`` for a conditional flow;
        the preprocessing, even a learned one, does not see the context)."""
        flow = self.flow
        y, log_det = self.pre(x.to(flow.base_loc.dtype), len(flow.event_shape), generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            lp = flow.log_prob(y, context=context)
        return -(lp.float() + log_det.float()).mean() / (flow.num_dims * math.log(2))
