"""Fitting a guide and using it: SVI with the recommended protocol
(:mod:`~pyro_flows_ext.infer.fitting.svi`) and NeuTra HMC in the space a fitted guide whitens
(:mod:`~pyro_flows_ext.infer.fitting.neutra`)."""

from pyro_flows_ext.infer.fitting.neutra import NeuTraDraws, neutra_mcmc
from pyro_flows_ext.infer.fitting.svi import fit_guide

__all__ = ["NeuTraDraws", "fit_guide", "neutra_mcmc"]
