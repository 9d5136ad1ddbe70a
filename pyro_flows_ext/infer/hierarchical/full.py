"""What :class:`~pyro_flows_ext.infer.AutoHierarchicalFlow` answers over the full plates (no
subsampling, no Pyro sites): its median, joint draws and marginal quantiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from pyro_flows_ext.checks import positive_int

__all__ = ["DRAW_CELLS", "Draw", "FullPlateDraws"]

DRAW_CELLS = 2**22
"""Draws times the elements of the model's largest site evaluated at once over the full plates
(each element carries a Newton step's gradient and Hessian products: about 1 GB at this
bound)."""

Draw = Callable[[str, Distribution, bool, Callable[[], Distribution] | None], Tensor]
"""How a block is drawn: ``(name, distribution, fresh, score) -> value``; ``fresh`` tells
whether it is the first draw of its chain (no draw in its context yet)."""


class FullPlateDraws:
    """The full-plate methods of the hierarchical guide; the guide provides ``initialize``,
    ``structure``, ``_anchor``, ``_model_nesting``, ``_draw_elements`` (the elements of the
    model's largest site), ``_aux`` and ``_full(draw, args, kwargs)``, which runs its flows
    over the full plates with blocks drawn by ``draw``."""

    num_quantile_samples: int = 1000
    """Draws behind :meth:`quantiles` (Monte Carlo over the full plates)."""

    structure: Any
    _anchor: Tensor
    _model_nesting: int
    _draw_elements: int = 1  # guides pickled before it was kept: every draw at once, as then
    initialize: Callable[..., Any]
    _aux: Callable[[str], str]
    _full: Callable[[Draw, tuple, dict], dict[str, Tensor]]

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The image of the base median (zero) through the flows, for every element of the
        full plates: ``name -> value`` in the constrained space. For the Gaussian the guide
        starts at it is the median; for a trained flow a central point (see
        :meth:`quantiles`)."""

        def draw(name: str, d: Distribution, fresh: bool, score: Any) -> Tensor:
            z = d.base_dist.mean  # type: ignore[attr-defined]
            for t in d.transforms:  # type: ignore[attr-defined]
                z = t(z)
            return z

        values = self._full(draw, args, kwargs)
        assert self.structure is not None
        return {n: v.reshape(self.structure.site_shape(n)) for n, v in values.items()}

    @torch.no_grad()
    def sample_full(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """``num_samples`` joint draws over the full plates (no subsampling):
        ``name -> (num_samples, *shape)`` in the constrained space, computed
        :meth:`draws_at_once` draws at a time. The result takes ``num_samples`` times the
        total size of the latents.

        Example:
            >>> import pyro, pyro.distributions as dist
            >>> from pyro_flows_ext.infer import AutoHierarchicalFlow
            >>> def model():
            ...     with pyro.plate("g", 3):
            ...         pyro.sample("x", dist.Normal(0.0, 1.0))
            >>> AutoHierarchicalFlow(model).sample_full(4)["x"].shape
            torch.Size([4, 3])
        """
        num = positive_int("num_samples", num_samples)
        self.initialize(*args, **kwargs)
        return self._draw_full(num, args, kwargs)

    def _draw_full(
        self, num: int, args: tuple, kwargs: dict, globals_: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``num`` joint draws over the full plates (:meth:`sample_full`), the unconstrained
        globals fixed to ``globals_`` ``(num, D)`` when given; in batches of
        :meth:`draws_at_once` draws (each runs the model for the Newton conditionals)."""
        step = self.draws_at_once()
        batches = [
            self._draw_batch(
                min(step, num - start),
                None if globals_ is None else globals_[start : start + step],
                args,
                kwargs,
            )
            for start in range(0, num, step)
        ]
        return {n: torch.cat([b[n] for b in batches]) for n in batches[0]}

    def _draw_batch(
        self, num: int, globals_: Tensor | None, args: tuple, kwargs: dict
    ) -> dict[str, Tensor]:
        """One batch of :meth:`_draw_full`."""
        assert self.structure is not None
        nesting = max([self._model_nesting] + [g.nesting for g in self.structure.groups])
        first = self._aux("globals")

        def draw(name: str, d: Distribution, fresh: bool, score: Any) -> Tensor:
            pad = (1,) * (nesting - len(d.batch_shape))  # the sample dim left of every plate
            if name == first and globals_ is not None:
                return globals_.reshape((num, *pad) + globals_.shape[-1:])
            return d.sample((num, *pad) if fresh else ())

        values = self._full(draw, args, kwargs)
        return {n: v.reshape((num, *self.structure.site_shape(n))) for n, v in values.items()}

    def draws_at_once(self) -> int:
        """Draws evaluated together over the full plates: :data:`DRAW_CELLS` over the
        elements of the model's largest site (its observations' padded grid, say)."""
        return max(1, DRAW_CELLS // self._draw_elements)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Marginal quantiles of every latent over the full plates, elementwise in the
        constrained space, from :attr:`num_quantile_samples` draws of :meth:`sample_full`:
        ``name -> (len(quantiles), *shape)``.

        Example:
            >>> import pyro, pyro.distributions as dist
            >>> from pyro_flows_ext.infer import AutoHierarchicalFlow
            >>> def model():
            ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
            >>> AutoHierarchicalFlow(model).quantiles([0.25, 0.75])["s"].shape
            torch.Size([2])
        """
        self.initialize(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=self._anchor.dtype, device=self._anchor.device)
        if q.dim() != 1 or not ((q >= 0) & (q <= 1)).all():
            raise ValueError(f"quantiles must be a 1-d sequence in [0, 1], got {quantiles!r}")
        draws = self.sample_full(self.num_quantile_samples, *args, **kwargs)
        out = {}
        for name, value in draws.items():
            flat = value.reshape(value.shape[0], -1)
            out[name] = torch.quantile(flat, q, dim=0).reshape(q.shape + value.shape[1:])
        return out
