"""Maximum-likelihood training of flows: preprocessing, metrics, ``fit``, checkpoints."""

from pyro_flows_ext.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from pyro_flows_ext.train.distributed import Distributed, setup_distributed, torchrun_env
from pyro_flows_ext.train.fit import History, TrainingDivergedError, fit, resolve_device
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
    "Dequantize",
    "Distributed",
    "History",
    "Identity",
    "Preprocess",
    "Standardize",
    "TrainingDivergedError",
    "VariationalDequantize",
    "as_preprocess",
    "bits_per_dim",
    "fit",
    "load_checkpoint",
    "log_likelihood",
    "nll",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "setup_distributed",
    "torchrun_env",
]
