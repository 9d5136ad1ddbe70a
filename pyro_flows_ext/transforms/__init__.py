"""Coupling and Glow-style transforms for ``torch.distributions.TransformedDistribution``.

Direction follows Pyro: ``forward`` maps noise to data, ``inv`` maps data to noise.
"""

from pyro_flows_ext.transforms._base import CachedTransformModule, NoSignError
from pyro_flows_ext.transforms.actnorm import ActNorm, actnorm
from pyro_flows_ext.transforms.conditional import ConditionalCoupling, condition_all
from pyro_flows_ext.transforms.coupling import Coupling
from pyro_flows_ext.transforms.glow import glow_step
from pyro_flows_ext.transforms.invertible import (
    InvertibleConv1x1,
    InvertibleLinear,
    invertible_conv1x1,
    invertible_linear,
)
from pyro_flows_ext.transforms.kinds import (
    COUPLINGS,
    additive_coupling,
    affine_coupling,
    conditional_affine_coupling,
    conditional_spline_coupling,
    coupling_map,
    make_coupling,
    register_coupling,
    spline_coupling,
)
from pyro_flows_ext.transforms.linear import LowerAffine, PermuteTransform
from pyro_flows_ext.transforms.lowrank import LowRankAffine
from pyro_flows_ext.transforms.maps import AdditiveMap, AffineMap, ElementwiseMap
from pyro_flows_ext.transforms.masks import MaskPartition, Partition, SlicePartition
from pyro_flows_ext.transforms.networks import NetworkFactory, density_network
from pyro_flows_ext.transforms.prior import ElementwiseAffine, top_prior
from pyro_flows_ext.transforms.shift import ConditionalShift
from pyro_flows_ext.transforms.spline import SplineMap, rational_quadratic_spline
from pyro_flows_ext.transforms.split import FactorOut, SplitPrior, split_prior
from pyro_flows_ext.transforms.squeeze import SqueezeTransform
from pyro_flows_ext.transforms.stack import Stack
from pyro_flows_ext.transforms.tails import ExponentialTails

__all__ = [
    "COUPLINGS",
    "ActNorm",
    "AdditiveMap",
    "AffineMap",
    "CachedTransformModule",
    "ConditionalCoupling",
    "ConditionalShift",
    "Coupling",
    "ElementwiseAffine",
    "ElementwiseMap",
    "ExponentialTails",
    "FactorOut",
    "InvertibleConv1x1",
    "InvertibleLinear",
    "LowRankAffine",
    "LowerAffine",
    "MaskPartition",
    "NetworkFactory",
    "NoSignError",
    "Partition",
    "PermuteTransform",
    "SlicePartition",
    "SplineMap",
    "SplitPrior",
    "SqueezeTransform",
    "Stack",
    "actnorm",
    "additive_coupling",
    "affine_coupling",
    "conditional_affine_coupling",
    "conditional_spline_coupling",
    "condition_all",
    "coupling_map",
    "density_network",
    "glow_step",
    "invertible_conv1x1",
    "invertible_linear",
    "make_coupling",
    "rational_quadratic_spline",
    "register_coupling",
    "spline_coupling",
    "split_prior",
    "top_prior",
]
