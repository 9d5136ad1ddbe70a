"""Posterior summaries of a flow guide over the packed unconstrained latent vector: the
median and Monte Carlo marginal quantiles per site, in the constrained space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["FlowSummaries"]


class FlowSummaries:
    """Mixin of an ``AutoContinuous`` flow guide (before it in the bases) that has
    ``initialize(*args)``, the base location ``_base_loc`` (the base's median), the transforms
    ``_flow(*args)`` and ``get_posterior(*args)``: :meth:`median` and :meth:`quantiles`."""

    num_quantile_samples: int = 10_000
    """Draws behind :meth:`quantiles` (Monte Carlo)."""

    def _constrained(self: Any, latent: Tensor) -> dict[str, Tensor]:
        """Unpack unconstrained latents ``(S, D)`` into constrained sites ``(S, *shape)``.

        Pyro's ``_unpack_latent`` broadcasts the batch dims against each site's shape (which
        includes its plates), so ``S`` is put left of enough singleton dims and taken back."""
        num = latent.shape[0]
        pad = max(len(shape) for shape in self._unconstrained_shapes.values())
        padded = latent.reshape((num,) + (1,) * pad + latent.shape[-1:])
        return {
            site["name"]: biject_to(site["fn"].support)(u).reshape((num, *site["value"].shape))
            for site, u in self._unpack_latent(padded)
        }

    @torch.no_grad()
    def median(self: Any, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The image of the base distribution's median (zero) through the flow, per site in
        the constrained space. This is the exact median of the Gaussian the guide starts at
        (and of any flow whose layers are elementwise monotone); for a trained flow it is a
        central point, not necessarily the marginal medians (see :meth:`quantiles`)."""
        self.initialize(*args, **kwargs)
        z = self._base_loc.clone()  # a fresh tensor: never a cache hit on an earlier call
        for t in self._flow(*args, **kwargs):
            z = t(z)
        return {k: v[0] for k, v in self._constrained(z[None]).items()}

    @torch.no_grad()
    def quantiles(
        self: Any, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Marginal quantiles of every latent site, elementwise in the constrained space,
        estimated from :attr:`num_quantile_samples` draws: ``name -> (len(quantiles), *shape)``.

        Example:
            >>> import pyro, pyro.distributions as dist
            >>> def model():
            ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
            >>> from pyro_flows_ext.infer import AutoCouplingFlow
            >>> guide = AutoCouplingFlow(model, init="loc").initialize()
            >>> guide.quantiles([0.25, 0.75])["s"].shape
            torch.Size([2])
        """
        self.initialize(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=self._base_loc.dtype, device=self._base_loc.device)
        if q.dim() != 1 or not ((q >= 0) & (q <= 1)).all():
            raise ValueError(f"quantiles must be a 1-d sequence in [0, 1], got {quantiles!r}")
        draws = self.get_posterior(*args, **kwargs).sample((self.num_quantile_samples,))
        out = {}
        for name, value in self._constrained(draws).items():
            flat = value.reshape(value.shape[0], -1)
            out[name] = torch.quantile(flat, q, dim=0).reshape(q.shape + value.shape[1:])
        return out
