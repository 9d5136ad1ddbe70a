"""Maximum-likelihood training of a :class:`~pyro_flows_ext.flows.Flow`, on CPU or GPU.

The loss is the negative log-likelihood of the raw data in bits per dimension (see
:mod:`pyro_flows_ext.train.preprocess`), minimised by Adam with a linear warm-up and gradient
norm clipping. Batch order and dequantization noise come from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have. Under ``torchrun`` the same function trains data-parallel
across processes (see :mod:`pyro_flows_ext.train.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from pyro_flows_ext.flows import Flow
from pyro_flows_ext.train._loop import Trainer
from pyro_flows_ext.train.config import FitConfig, resolve_device
from pyro_flows_ext.train.data import examples
from pyro_flows_ext.train.distributed import setup_distributed
from pyro_flows_ext.train.history import History
from pyro_flows_ext.train.preprocess import DequantizeSpec

__all__ = ["fit", "resolve_device"]


def fit(
    flow: Flow,
    train: Any,
    *,
    context: Any = None,
    valid: Any = None,
    valid_context: Any = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    clip_grad: float | None = 50.0,
    eval_every: int | None = None,
    patience: int | None = 10,
    device: str | torch.device = "auto",
    dequantize: DequantizeSpec = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    bf16: bool = False,
    compile: bool = False,
    callback: Callable[[int, float], None] | None = None,
    distributed: bool | None = None,
) -> History:
    """Train ``flow`` by maximum likelihood; return the :class:`History`.

    Args:
        flow: the model; it is moved to ``device`` and left there.
        train, valid: ``(N, *event_shape)`` tensors or arrays of raw data (integers for
            discrete data). With ``valid``, the validation bits/dim is measured every
            ``eval_every`` steps, training stops after ``patience`` evaluations without
            improvement, and the best weights are restored at the end.
        context, valid_context: for a conditional flow (``flow.context_dim = K > 0``), the
            ``(N, K)`` tensors or arrays of contexts of ``train`` and ``valid``, one row per
            example (e.g. one-hot labels), cast to the flow's dtype; rows are shuffled and
            sharded with their examples. The flow learns ``p(x | c)``. An unconditional flow
            takes neither. The context is data: checkpoints hold nothing of it.
        steps, epochs: length of the run (at most one; default 1000 steps). An epoch is
            ``N // (batch_size * world_size)`` steps.
        batch_size, lr, weight_decay: Adam's settings (``batch_size`` per process: a
            data-parallel step uses ``batch_size * world_size`` examples); the learning rate
            rises linearly over ``warmup`` steps, then stays (``schedule="constant"``) or
            decays to zero at the last step along a half cosine (``"cosine"``).
        clip_grad: maximum gradient norm (``None``: no clipping).
        eval_every: steps between evaluations and checkpoints (default: one epoch, at least
            25 and at most 500 steps).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        dequantize: ``None`` for continuous data, a number of levels ``L`` for uniform
            dequantization plus the logit transform, or a
            :class:`~pyro_flows_ext.train.preprocess.Preprocess` (a learned one, such as
            :class:`~pyro_flows_ext.train.VariationalDequantize`, is trained, checkpointed
            and early-stopped with the flow). Bits/dim are those of the raw data either way.
        checkpoint: file written (atomically) at each evaluation and at the end. With
            ``resume`` and an existing file, training continues from it exactly.
        progress: show a tqdm bar with the running bits/dim.
        seed: seeds batch order and dequantization noise.
        bf16: bfloat16 autocast (CUDA only).
        compile: ``torch.compile`` the coupling networks in place (see
            :func:`~pyro_flows_ext.train.compile_conditioners`); the losses are those of
            the eager run to float tolerance. Compiling takes a while (about a minute on a
            CPU for a small Glow) and pays on GPUs; ``benchmarks/throughput.py --compile``
            measures both.
        callback: ``callback(step, loss)`` after every step, the loss in bits/dim (in every
            process).
        distributed: train data-parallel with ``DistributedDataParallel`` (``True``), in one
            process (``False``), or when started by ``torchrun`` or inside an initialised
            process group (``None``). Each process then uses ``cuda:LOCAL_RANK`` (NCCL) or
            the CPU (gloo), trains on its shard of each global batch, and reports global
            bits/dim; process 0 alone shows progress and writes the checkpoint. See
            :mod:`pyro_flows_ext.train.distributed`.

    Every argument is checked (see :class:`~pyro_flows_ext.train.FitConfig`) before any work
    is done: a value of the wrong kind is a ``TypeError``, a bad value a ``ValueError``.

    Raises:
        TrainingDivergedError: (a ``FloatingPointError``) when the loss, the gradient norm or
            the weights stop being finite; it names the step and writes no checkpoint.

    Example:
        >>> import torch
        >>> from pyro_flows_ext.flows import realnvp
        >>> _ = torch.manual_seed(0)
        >>> flow = realnvp(2, depth=2, hidden_dims=[16])
        >>> data = torch.randn(512, 2) + 4 * torch.randint(0, 2, (512, 1))  # two clusters
        >>> h = fit(flow, data, steps=60, lr=3e-3, progress=False, device="cpu")
        >>> sum(h.loss[-10:]) < sum(h.loss[:10])
        True

        A class-conditional model ``p(x | c)``, the context one-hot labels:

        >>> labels = torch.randint(0, 2, (512,))
        >>> x = torch.randn(512, 2) + 4 * labels[:, None]
        >>> cflow = realnvp(2, depth=2, hidden_dims=[16], context_dim=2)
        >>> c = torch.nn.functional.one_hot(labels, 2)
        >>> h = fit(cflow, x, context=c, steps=60, lr=3e-3, progress=False, device="cpu")
        >>> cflow.sample((3,), context=torch.eye(2)).shape  # 3 per class
        torch.Size([3, 2, 2])
    """
    config = FitConfig(
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
        schedule=schedule, weight_decay=weight_decay, clip_grad=clip_grad,
        eval_every=eval_every, patience=patience, device=device, dequantize=dequantize,
        checkpoint=checkpoint, resume=resume, progress=progress, seed=seed, bf16=bf16,
        compile=compile, callback=callback, distributed=distributed,
    )  # fmt: skip
    return _fit(flow, (train, context), (valid, valid_context), config)


def _fit(flow: Flow, train: tuple[Any, Any], valid: tuple[Any, Any], config: FitConfig) -> History:
    """:func:`fit` with its settings as a :class:`~pyro_flows_ext.train.FitConfig` and its
    data as ``(data, context)`` pairs."""
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyro_flows_ext Flow, got {type(flow).__name__}")
    train_rows = examples(flow, *train, "train", "context")
    if valid[0] is None and valid[1] is not None:
        raise ValueError("valid_context was given without valid; pass both or neither")
    valid_rows = None if valid[0] is None else examples(flow, *valid, "valid", "valid_context")
    for rows in (train_rows, valid_rows):
        if rows is not None:
            config.preprocess.validate(rows.x)
    ctx = setup_distributed(config.distributed, config.torch_device)
    try:
        needed = config.batch_size * ctx.world_size
        if ctx.enabled and len(train_rows) < needed:
            raise ValueError(
                f"a data-parallel step needs batch_size * world_size = {needed} training "
                f"examples, got {len(train_rows)}"
            )
        trainer = Trainer(flow, train_rows, valid_rows, config, ctx)
        return trainer.run(trainer.start())
    finally:
        ctx.close()
