"""Maximum-likelihood training of flows: preprocessing, metrics, ``fit``, checkpoints."""

from pyro_flows_ext.train._steps import compile_conditioners
from pyro_flows_ext.train.checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pyro_flows_ext.train.config import FitConfig, resolve_device
from pyro_flows_ext.train.distributed import (
    Distributed,
    is_main_process,
    process_count,
    process_rank,
    setup_distributed,
    torchrun_env,
)
from pyro_flows_ext.train.fit import fit
from pyro_flows_ext.train.history import History, TrainingDivergedError
from pyro_flows_ext.train.metrics import bits_per_dim, log_likelihood, nll
from pyro_flows_ext.train.preprocess import (
    Dequantize,
    Identity,
    Preprocess,
    Standardize,
    as_preprocess,
)
from pyro_flows_ext.train.vardeq import VariationalDequantize

__all__ = [
    "Checkpoint",
    "CheckpointMismatchError",
    "Dequantize",
    "Distributed",
    "FitConfig",
    "History",
    "Identity",
    "Preprocess",
    "Standardize",
    "TrainingDivergedError",
    "VariationalDequantize",
    "as_preprocess",
    "bits_per_dim",
    "compile_conditioners",
    "fit",
    "is_main_process",
    "load_checkpoint",
    "log_likelihood",
    "nll",
    "process_count",
    "process_rank",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "setup_distributed",
    "torchrun_env",
]
