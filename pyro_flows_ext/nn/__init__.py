"""Conditioner networks for coupling layers."""

from pyro_flows_ext.nn.conditioners import ConvNet, ZeroConv2d, mlp, zero_last_layer_

__all__ = ["ConvNet", "ZeroConv2d", "mlp", "zero_last_layer_"]
