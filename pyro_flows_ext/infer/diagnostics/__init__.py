"""Diagnostics of any guide's posterior, through ArviZ.

* :mod:`~pyro_flows_ext.infer.diagnostics.inference_data`: ``InferenceData``, PSIS k-hat and
  importance resampling of a guide;
* :mod:`~pyro_flows_ext.infer.diagnostics.importance`: the importance weights behind them;
* :mod:`~pyro_flows_ext.infer.diagnostics.pareto`: Pareto smoothing and k-hat verdicts;
* :mod:`~pyro_flows_ext.infer.diagnostics.plots`: pair plots against reference draws.
"""

from pyro_flows_ext.infer.diagnostics.importance import ImportanceDraws, importance_draws
from pyro_flows_ext.infer.diagnostics.inference_data import (
    importance_resample,
    psis_khat,
    to_inference_data,
)
from pyro_flows_ext.infer.diagnostics.pareto import ParetoK, khat_threshold, khat_verdict
from pyro_flows_ext.infer.diagnostics.plots import plot_pairs

__all__ = [
    "ImportanceDraws",
    "ParetoK",
    "importance_draws",
    "importance_resample",
    "khat_threshold",
    "khat_verdict",
    "plot_pairs",
    "psis_khat",
    "to_inference_data",
]
