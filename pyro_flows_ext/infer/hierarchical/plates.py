"""The plate structure of a Pyro model, read from a prototype trace: which latent sites are
global (outside every plate) and which are local (inside plates), grouped by the set of plates
they sit in, with the packing of each group's unconstrained values into per-element vectors.

A *group* is the set of latent sites that share the same set of vectorised plates. Its
unconstrained values are one tensor of shape ``(*lead, *grid, F)``: ``grid`` has one entry per
batch dim from the group's outermost plate dim to ``-1`` (the plate's current subsample size at
a plate's dim, 1 elsewhere), ``F`` is the sum of the sites' unconstrained event sizes, and
``lead`` holds whatever batch dims surround the model (a particle plate). The globals are one
vector ``(*lead, D)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.ops.tensor_utils import periodic_repeat
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent, Normal, Transform, biject_to

__all__ = [
    "PlateGroup",
    "PlateInfo",
    "PlateStructure",
    "SiteLayout",
    "index_chunks",
    "non_normal_sites",
    "plate_nesting",
    "plate_structure",
]


@dataclass(frozen=True)
class PlateInfo:
    """A vectorised plate: its name, batch dim (negative), full size and subsample size."""

    name: str
    dim: int
    size: int
    subsample_size: int

    @property
    def rate(self) -> float:
        """The fraction of the plate's elements a step touches, ``B / N``."""
        return self.subsample_size / self.size


@dataclass
class SiteLayout:
    """Where a latent site's unconstrained features live in its block (globals or a group).

    ``shape`` and ``u_shape`` are the site's constrained and unconstrained value shapes in the
    prototype trace, ``u_event_dim`` the unconstrained event dims and ``event_dim`` the
    distribution's. A global site's features are its whole unconstrained value, a local
    site's its event (per plate element); they are ``start:stop`` of its block."""

    name: str
    transform: Transform
    shape: torch.Size
    u_shape: torch.Size
    u_event_dim: int
    event_dim: int
    local: bool
    start: int = 0
    stop: int = 0

    @property
    def u_event(self) -> torch.Size:
        return self.u_shape[len(self.u_shape) - self.u_event_dim :]

    @property
    def size(self) -> int:
        return math.prod(self.u_event if self.local else self.u_shape)

    def constrain(self, u: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """``(value, log_density)`` of the site from its features ``u`` reshaped to the
        unconstrained ``shape``; ``log_density`` is ``log|d u / d value|`` summed over the
        event, as the guide's ``Delta`` site needs it (as in Pyro's ``AutoNormal``)."""
        unconstrained = u.reshape(shape)
        value = self.transform(unconstrained)
        log_density = self.transform.inv.log_abs_det_jacobian(value, unconstrained)
        log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + self.event_dim)
        return value, log_density


@dataclass
class PlateGroup:
    """The latent sites inside the same set of plates, ``plates`` (outermost dim first), and
    the groups whose plate sets are strict subsets of it (``parents``, as indices)."""

    plates: tuple[PlateInfo, ...]
    sites: list[SiteLayout] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "__".join(p.name for p in self.plates)

    @property
    def dim(self) -> int:
        """``F``: unconstrained features per element."""
        return self.sites[-1].stop if self.sites else 0

    @property
    def nesting(self) -> int:
        """How many batch dims the group's grid has (its outermost plate's ``-dim``)."""
        return max(-p.dim for p in self.plates)

    def grid(self, sizes: dict[str, int]) -> torch.Size:
        """The group's grid for the plates' current sizes ``name -> size``."""
        shape = [1] * self.nesting
        for p in self.plates:
            shape[p.dim] = sizes[p.name]
        return torch.Size(shape)

    def site_shape(self, site: SiteLayout, sizes: dict[str, int] | None = None) -> torch.Size:
        """The site's constrained shape for the plates' sizes ``name -> size`` (default: the
        full plates, no subsampling)."""
        shape = list(site.shape)
        batch = len(shape) - site.event_dim
        for p in self.plates:
            if batch + p.dim >= 0:
                shape[batch + p.dim] = p.size if sizes is None else sizes[p.name]
        return torch.Size(shape)

    def initial_values(self, trace: Any) -> Tensor:
        """The prototype's unconstrained values of the group, ``(*grid, F)`` over the full
        plates (a subsampled plate's values repeated periodically, as ``AutoNormal`` does)."""
        sub = self.grid({p.name: p.subsample_size for p in self.plates})
        parts = [
            site.transform.inv(trace.nodes[site.name]["value"].detach()).reshape(sub + (site.size,))
            for site in self.sites
        ]
        values = torch.cat(parts, dim=-1)
        for p in self.plates:
            if p.subsample_size != p.size:
                values = periodic_repeat(values, p.size, p.dim - 1)
        return values

    def grid_index(self, idx: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Advanced indices of the elements ``idx`` (plate name -> indices) in a tensor
        ``(*lead, *grid, ...)`` over the full plates (index it as ``t[(..., *ix, slice)]``)."""
        n = self.nesting
        at = {p.dim: idx[p.name] for p in self.plates}
        device = next(iter(at.values())).device
        out = []
        for j in range(n):
            ids = at.get(j - n, torch.zeros(1, dtype=torch.long, device=device))
            out.append(ids.reshape([-1 if k == j else 1 for k in range(n)]))
        return tuple(out)

    def split(self, u: Tensor, sizes: dict[str, int]) -> dict[str, tuple[Tensor, Tensor]]:
        """``name -> (value, log_density)`` for every site from the group's values
        ``(*lead, *grid, F)``; without ``lead`` each value has the site's own batch shape."""
        grid = self.grid(sizes)
        lead = u.shape[: u.dim() - 1 - len(grid)]
        out = {}
        for site in self.sites:
            own = min(len(site.u_shape) - site.u_event_dim, len(grid))
            batch = lead + grid if lead else grid[len(grid) - own :]
            out[site.name] = site.constrain(u[..., site.start : site.stop], batch + site.u_event)
        return out


@dataclass
class PlateStructure:
    """Global sites, plate groups (fewest plates first) and every plate of the model."""

    global_sites: list[SiteLayout]
    groups: list[PlateGroup]
    plates: dict[str, PlateInfo]

    @property
    def leaves(self) -> list[int]:
        """The groups (indices) that no other group nests in."""
        parents = {j for group in self.groups for j in group.parents}
        return [i for i in range(len(self.groups)) if i not in parents]

    @property
    def global_dim(self) -> int:
        return self.global_sites[-1].stop if self.global_sites else 0

    def initial_globals(self, trace: Any) -> Tensor:
        """The prototype ``trace``'s unconstrained globals ``(D,)``, in its values' dtype and
        device (empty without globals)."""
        parts = [
            site.transform.inv(trace.nodes[site.name]["value"].detach()).reshape(-1)
            for site in self.global_sites
        ]
        like = next(trace.iter_stochastic_nodes())[1]["value"]
        return torch.cat(parts) if parts else like.new_zeros(0)

    def split_globals(self, g: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``name -> (value, log_density)`` of the global sites from ``g`` ``(*lead, D)``
        (the lead dims right-aligned with each site's batch dims, as ``AutoContinuous``)."""
        lead = g.shape[:-1]
        out = {}
        for site in self.global_sites:
            shape = torch.broadcast_shapes(site.u_shape, lead + (1,) * site.u_event_dim)
            out[site.name] = site.constrain(g[..., site.start : site.stop], shape)
        return out

    def indices(self, plates: dict[str, Any]) -> dict[str, Tensor]:
        """The (subsample) indices of the ``pyro.plate`` s a guide created, ``name -> plate``;
        ``ValueError`` if one has changed its full size."""
        out = {}
        for name, info in self.plates.items():
            plate = plates[name]
            if plate.size != info.size:
                sites = [s.name for g in self.groups if info in g.plates for s in g.sites]
                raise ValueError(
                    f"plate {name!r} (sites {sites}) has size {plate.size}; the guide was built "
                    f"for size {info.size}: build a new guide for a new plate size"
                )
            out[name] = plate.indices
        return out

    def site_shape(self, name: str, sizes: dict[str, int] | None = None) -> torch.Size:
        """Site ``name``'s constrained shape over the full plates (or for the plates' sizes
        ``name -> size``)."""
        for group in self.groups:
            for site in group.sites:
                if site.name == name:
                    return group.site_shape(site, sizes)
        return next(s.shape for s in self.global_sites if s.name == name)

    def site_plates(self) -> dict[str, tuple[str, ...]]:
        """Every latent site's plates (names; none for a global site)."""
        out: dict[str, tuple[str, ...]] = {site.name: () for site in self.global_sites}
        for group in self.groups:
            out.update({site.name: tuple(p.name for p in group.plates) for site in group.sites})
        return out


def index_chunks(plates: Sequence[PlateInfo]) -> list[list[Tensor]]:
    """Each plate's index chunks: the whole plate, or its subsample size at a time (the last
    chunk filled up from the start), for reading a subsampling model over its full plates.

    Example:
        >>> [c.tolist() for c in index_chunks([PlateInfo("g", -1, 5, 2)])[0]]
        [[0, 1], [2, 3], [4, 0]]
    """
    out = []
    for p in plates:
        if p.subsample_size == p.size:
            out.append([torch.arange(p.size)])
            continue
        ids = torch.arange(math.ceil(p.size / p.subsample_size) * p.subsample_size) % p.size
        out.append(list(ids.split(p.subsample_size)))
    return out


def _plates_of(name: str, site: dict[str, Any]) -> tuple[PlateInfo, ...]:
    plates = []
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized:
            raise ValueError(
                f"site {name!r} is inside the sequential plate {frame.name!r}; hierarchical "
                f"guides need vectorised plates (pyro.plate used as a context manager)"
            )
        full = frame.full_size or frame.size
        plates.append(PlateInfo(frame.name, frame.dim, full, frame.size))
    return tuple(sorted(plates, key=lambda p: p.dim))


def _layout(name: str, site: dict[str, Any], plates: Sequence[PlateInfo]) -> SiteLayout:
    """The site's unconstrained event shape, checking that its batch dims are its plates'."""
    fn, value = site["fn"], site["value"]
    if fn.support.is_discrete:
        raise ValueError(
            f"site {name!r} is a discrete latent ({type(fn).__name__}); hierarchical flow "
            f"guides need continuous latents: enumerate it out or hide it with poutine.block"
        )
    with helpful_support_errors(site):  # Pyro's errors for a support with no bijection
        transform = biject_to(fn.support)
    u = transform.inv(value.detach())
    u_event_dim = fn.event_dim + u.dim() - value.dim()
    batch = u.shape[: u.dim() - u_event_dim]
    at_plate = {p.dim: p for p in plates}
    for i, size in enumerate(batch):
        dim = i - len(batch)
        plate = at_plate.get(dim)
        expected = 1 if plate is None else plate.subsample_size
        if size != expected and plates:
            raise ValueError(
                f"site {name!r} has batch shape {tuple(batch)} whose dim {dim} (size {size}) "
                f"is not its plate's: declare every batch dim of a local latent with a "
                f"pyro.plate or move it into the event with .to_event()"
            )
    return SiteLayout(
        name, transform, value.shape, u.shape, u_event_dim, fn.event_dim, bool(plates)
    )


def _place(sites: list[SiteLayout]) -> None:
    start = 0
    for site in sites:
        site.start, site.stop = start, start + site.size
        start = site.stop


def plate_structure(trace: Any) -> PlateStructure:
    """Read the :class:`PlateStructure` of a model from its prototype trace.

    Raises ``ValueError`` naming the site for what a hierarchical guide cannot handle: a
    discrete latent, a sequential plate, a batch dim of a local site not declared by a plate,
    a support with no bijection (a sphere: Pyro's advice); ``RuntimeError`` for a model with
    no latent, as Pyro's autoguides do.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("groups", 5):
        ...         pyro.sample("theta", dist.Normal(mu, 1.0))
        >>> s = plate_structure(poutine.trace(model).get_trace())
        >>> s.global_dim, [(g.name, g.dim) for g in s.groups]
        (1, [('groups', 1)])
    """
    if not any(True for _ in trace.iter_stochastic_nodes()):
        raise RuntimeError("a hierarchical flow guide needs at least one latent sample site")
    global_sites: list[SiteLayout] = []
    by_plates: dict[tuple[str, ...], PlateGroup] = {}
    plates: dict[str, PlateInfo] = {}
    for name, site in trace.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        site_plates = _plates_of(name, site)
        for p in site_plates:
            if plates.setdefault(p.name, p) != p:
                raise ValueError(f"plate {p.name!r} of site {name!r} differs between sites")
        layout = _layout(name, site, site_plates)
        if not site_plates:
            global_sites.append(layout)
            continue
        key = tuple(p.name for p in site_plates)
        by_plates.setdefault(key, PlateGroup(site_plates)).sites.append(layout)
    _place(global_sites)
    groups = sorted(by_plates.values(), key=lambda g: len(g.plates))
    for i, group in enumerate(groups):
        _place(group.sites)
        names = {p.name for p in group.plates}
        group.parents = [j for j in range(i) if {p.name for p in groups[j].plates} < names]
    return PlateStructure(global_sites, groups, plates)


def non_normal_sites(trace: Any, plates: dict[str, Any]) -> list[str]:
    """The sample sites of ``trace`` inside any of ``plates`` (names) whose distribution,
    unwrapped of ``Independent``, masks and expansions, is not ``Normal``: where the locals'
    conditional is not normal, so their Laplace marginal is only an approximation."""
    out = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not any(f.name in plates for f in site["cond_indep_stack"]):
            continue
        fn = site["fn"]
        while isinstance(fn, Independent | MaskedDistribution | ExpandedDistribution):
            fn = fn.base_dist
        if not isinstance(fn, Normal):
            out.append(name)
    return out


def plate_nesting(trace: Any) -> int:
    """How many batch dims the plates of ``trace``'s sites take: read it from a trace that
    holds the observed sites (a guide's prototype trace does not, and misses a plate that
    only observations are in, such as the houses of a county)."""
    return max(
        (-f.dim for site in trace.nodes.values() for f in site.get("cond_indep_stack", ())),
        default=0,
    )
