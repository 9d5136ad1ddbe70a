"""Conditioner networks for coupling layers."""

from pyro_flows_ext.nn.conditioners import (
    HIDDEN_CHANNELS,
    ConvNet,
    ZeroConv2d,
    default_hidden_dims,
    mlp,
    zero_last_layer_,
)
from pyro_flows_ext.nn.damped import LR_SCALE, DampedMLP, damp_parameters_

__all__ = [
    "HIDDEN_CHANNELS",
    "LR_SCALE",
    "ConvNet",
    "DampedMLP",
    "ZeroConv2d",
    "damp_parameters_",
    "default_hidden_dims",
    "mlp",
    "zero_last_layer_",
]
