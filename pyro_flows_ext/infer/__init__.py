"""Flow guides for Pyro SVI and diagnostics of the posteriors they produce.

* :class:`AutoCouplingFlow`: a Glow-style coupling-flow ``AutoContinuous`` guide that starts at
  a Laplace approximation (or a diagonal Gaussian at ``init_loc_fn``'s point);
* :class:`AutoConditionalCouplingFlow`: its amortised twin, conditioned on a context computed
  from the observed data;
* :class:`AutoHierarchicalFlow`: a flow over the global latents and, per plate element, a
  conditional flow (:class:`LocalFlow`) over its local latents; scales to large and
  subsampled plates;
* :class:`StickingTheLanding`: the path-derivative gradient for any reparameterised guide;
* :class:`StudentTBase`: the heavier-tailed base of ``AutoCouplingFlow(base="studentt")``;
* :func:`fit_guide`: fit any guide by SVI with the recommended protocol, in one call;
* :func:`laplace_approximation`: mode and inverse-Hessian factor of a log density;
* :func:`to_inference_data`, :func:`psis_khat`, :func:`importance_resample`: ArviZ
  diagnostics of any guide (:mod:`pyro_flows_ext.infer.diagnostics.inference_data`);
* :func:`neutra_mcmc`: NeuTra HMC, exact NUTS in the space a fitted guide whitens;
* :func:`plot_pairs`: pair plot of guide draws against reference draws.

The guides compose layers of :mod:`pyro_flows_ext.transforms` (couplings,
:class:`~pyro_flows_ext.transforms.PermuteTransform`,
:class:`~pyro_flows_ext.transforms.LowerAffine`,
:class:`~pyro_flows_ext.transforms.ConditionalShift`) and networks of
:mod:`pyro_flows_ext.nn` (:class:`~pyro_flows_ext.nn.DampedMLP`).
"""

from pyro_flows_ext.infer.diagnostics import (
    ImportanceDraws,
    ParetoK,
    importance_draws,
    importance_resample,
    khat_threshold,
    khat_verdict,
    plot_pairs,
    psis_khat,
    to_inference_data,
)
from pyro_flows_ext.infer.fitting import NeuTraDraws, fit_guide, neutra_mcmc
from pyro_flows_ext.infer.hierarchical import AutoHierarchicalFlow, LocalFlow
from pyro_flows_ext.infer.stl import StickingTheLanding
from pyro_flows_ext.infer.vector import (
    AutoConditionalCouplingFlow,
    AutoCouplingFlow,
    LaplaceResult,
    StudentTBase,
    laplace_approximation,
)

__all__ = [
    "AutoConditionalCouplingFlow",
    "AutoCouplingFlow",
    "AutoHierarchicalFlow",
    "ImportanceDraws",
    "LaplaceResult",
    "LocalFlow",
    "NeuTraDraws",
    "ParetoK",
    "StickingTheLanding",
    "StudentTBase",
    "fit_guide",
    "importance_draws",
    "importance_resample",
    "khat_threshold",
    "khat_verdict",
    "laplace_approximation",
    "neutra_mcmc",
    "plot_pairs",
    "psis_khat",
    "to_inference_data",
]
