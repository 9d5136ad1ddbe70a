"""The vector guide: one flow over all the model's latents packed into a vector.

* :mod:`~pyro_flows_ext.infer.vector.guide`: :class:`AutoCouplingFlow`;
* :mod:`~pyro_flows_ext.infer.vector.amortized`: its amortised twin,
  :class:`AutoConditionalCouplingFlow`;
* :mod:`~pyro_flows_ext.infer.vector.start` and :mod:`~pyro_flows_ext.infer.vector.laplace`: the
  Gaussian start (Laplace approximation, competing starts);
* :mod:`~pyro_flows_ext.infer.vector.steps`: the flow steps and the final affine layer;
* :mod:`~pyro_flows_ext.infer.vector.tails`: the Student-t base;
* :mod:`~pyro_flows_ext.infer.vector.summaries`: ``median`` and ``quantiles``.
"""

from pyro_flows_ext.infer.vector.amortized import AutoConditionalCouplingFlow
from pyro_flows_ext.infer.vector.guide import AutoCouplingFlow
from pyro_flows_ext.infer.vector.laplace import LaplaceResult, laplace_approximation
from pyro_flows_ext.infer.vector.tails import StudentTBase

__all__ = [
    "AutoConditionalCouplingFlow",
    "AutoCouplingFlow",
    "LaplaceResult",
    "StudentTBase",
    "laplace_approximation",
]
