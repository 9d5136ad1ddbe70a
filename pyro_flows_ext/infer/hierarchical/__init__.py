"""The hierarchical guide: a flow over the globals and, per plate element, a conditional flow
over its locals.

* :mod:`~pyro_flows_ext.infer.hierarchical.guide`: :class:`AutoHierarchicalFlow`;
* :mod:`~pyro_flows_ext.infer.hierarchical.plates`: which sites are global and which local, per
  plate;
* :mod:`~pyro_flows_ext.infer.hierarchical.local_prior`: each local's prior given the globals,
  read from the model;
* :mod:`~pyro_flows_ext.infer.hierarchical.local_flow`: the globals' flow and the locals'
  conditional flow (:class:`LocalFlow`).
"""

from pyro_flows_ext.infer.hierarchical.guide import AutoHierarchicalFlow
from pyro_flows_ext.infer.hierarchical.local_flow import LocalFlow

__all__ = ["AutoHierarchicalFlow", "LocalFlow"]
