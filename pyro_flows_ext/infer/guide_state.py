"""What a guide owes Pyro beyond sampling: its state in Pyro's param store, copies and pickles
that leave the original alone, and a first call that either completes or leaves nothing.

**The param store.** Pyro saves and restores a fit through its param store
(``pyro.get_param_store().save(path)``, later ``.load(path)`` and a call of a fresh guide).
Pyro's own autoguides keep their parameters as ``PyroParam`` s, which read the store on every
call; a guide built from ``torch.nn`` modules (flows, networks) is registered with
``pyro.module``, which puts its parameters into the store but never reads them back, and its
fixed buffers (a Laplace start's centre and Cholesky factor, permutations) are not in the
store at all. :func:`sync_param_store` closes that gap: every parameter and persistent buffer
of the guide lives in the store under the name ``pyro.module`` gives it (buffers too, as
tensors without gradient, which no optimiser ever sees), and on every call

* an entry that is the guide's own tensor is left alone (the steady state: one identity check
  per tensor);
* a missing entry is added (a fresh guide, or after ``pyro.clear_param_store()``);
* an entry that holds another tensor (loaded from a file, or left by another guide of the same
  name) wins, as a ``PyroParam`` reads the store: its value is copied into the guide's tensor,
  which then takes its place in the store, so that optimisers keep stepping the tensors the
  guide computes with. The entries must fit exactly (the same names and shapes), else a
  ``RuntimeError`` says what differs instead of mixing two guides' values.

**Copies.** Pyro's ``AutoGuide.__getstate__`` drops the model from the live guide (so that a
pickle holds no unpicklable model) and an unconfigured guide cannot set itself up afterwards.
:class:`GuideStateMixin` pickles a copy of the state instead, and :func:`copy.deepcopy` keeps
the model (functions are shared by ``deepcopy``), so copies before and after the first call
work and the original is untouched.

**Failures.** :func:`all_or_nothing` restores a module's attributes, parameters, buffers and
submodules when the block inside raises anything (an unsupported model, a ``KeyboardInterrupt``
during the start's mode search): a guide whose first call failed starts again on the next.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self, cast

import pyro
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn
from torch.distributions import constraints

__all__ = [
    "GuideStateMixin",
    "all_or_nothing",
    "param_store_untouched",
    "store_entries",
    "stored_under",
    "sync_param_store",
]

_MODULE_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_STORE_DICTS = ("_params", "_param_to_name", "_constraints")


@contextmanager
def all_or_nothing(module: nn.Module) -> Iterator[None]:
    """Run the block; if it raises (anything, ``KeyboardInterrupt`` included), put back every
    attribute, parameter, buffer and submodule ``module`` had before it, and Pyro's param
    store as it was (a half-built guide may have registered tensors there), then re-raise.

    Example:
        >>> import torch
        >>> m = torch.nn.Module()
        >>> try:
        ...     with all_or_nothing(m):
        ...         m.layer = torch.nn.Linear(2, 2)
        ...         m.ready = True
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> hasattr(m, "layer"), hasattr(m, "ready")
        (False, False)
    """
    saved = dict(module.__dict__)
    containers = {k: copy.copy(saved[k]) for k in _MODULE_DICTS if k in saved}
    tables = _store_tables()
    try:
        yield
    except BaseException:
        module.__dict__.clear()
        module.__dict__.update(saved)
        module.__dict__.update(containers)
        _restore_store(tables)
        raise


@contextmanager
def param_store_untouched() -> Iterator[None]:
    """Run the block and put Pyro's param store back as it was, whatever the block
    registered (a guide that evaluates its fresh flows while building itself, before they
    are final).

    Example:
        >>> import pyro, torch
        >>> with param_store_untouched():
        ...     _ = pyro.param("scratch", torch.zeros(1))
        >>> "scratch" in pyro.get_param_store()
        False
    """
    tables = _store_tables()
    try:
        yield
    finally:
        _restore_store(tables)


def _store_tables() -> dict[str, dict]:
    store = pyro.get_param_store()
    return {k: dict(getattr(store, k)) for k in _STORE_DICTS}


def _restore_store(tables: dict[str, dict]) -> None:
    store = pyro.get_param_store()
    for k, table in tables.items():
        setattr(store, k, table)


def _make_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def store_entries(module: PyroModule) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of ``module`` under its param-store name: the
    name ``pyro.module`` gives the tensors of a plain ``nn.Module`` attribute
    (``"Guide.transforms$$$0.weight"``), ``"Guide.name"`` for tensors on ``module`` itself,
    recursively for ``PyroModule`` attributes. A tensor shared under several names is listed
    once."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def add(name: str, t: Tensor | None) -> None:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out[name] = t

    def walk(mod: PyroModule, prefix: str) -> None:
        for name, p in mod._parameters.items():
            add(_make_name(prefix, name), p)
        for name, b in mod._buffers.items():
            if name not in mod._non_persistent_buffers_set:
                add(_make_name(prefix, name), b)
        for name, child in mod._modules.items():
            if child is None:
                continue
            if isinstance(child, PyroModule):
                walk(child, _make_name(prefix, name))
                continue
            head = _make_name(prefix, name)
            for path, t in child.state_dict(keep_vars=True).items():
                add(param_with_module_name(head, path), t)

    walk(module, module._pyro_name)
    return out


def stored_under(name: str) -> bool:
    """Whether Pyro's param store holds an entry of the module named ``name``."""
    prefix = name + "."
    return any(key.startswith(prefix) for key in pyro.get_param_store())


def _describe(names: set[str], limit: int = 3) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more


def sync_param_store(module: PyroModule) -> bool:
    """Make Pyro's param store and ``module``'s tensors one (see the module docstring).
    Returns whether values were read from the store into ``module``.

    Raises:
        RuntimeError: the store holds entries under ``module``'s name that are not its own
            and do not fit it (other names or shapes): another guide's values.
    """
    store = pyro.get_param_store()
    params = store._params
    entries = store_entries(module)
    if all(params.get(name) is t for name, t in entries.items()):
        return False
    prefix = module._pyro_name + "."
    held = {n for n in params if n.startswith(prefix)}
    foreign = {n for n in held if params[n] is not entries.get(n)}
    if foreign:
        _check_fit(module, entries, held, {n: params[n] for n in foreign})
    for name, t in entries.items():
        old = params.get(name)
        if old is t:
            continue
        if old is not None:
            with torch.no_grad():
                t.copy_(old.detach())
            store._param_to_name.pop(old, None)
        params[name] = t
        store._param_to_name[t] = name
        store._constraints.setdefault(name, constraints.real)
    return bool(foreign)


def _check_fit(
    module: nn.Module, entries: dict[str, Tensor], held: set[str], foreign: dict[str, Tensor]
) -> None:
    missing = set(entries) - held
    unknown = held - set(entries)
    shapes = {
        n: (tuple(t.shape), tuple(entries[n].shape))
        for n, t in foreign.items()
        if n in entries and t.shape != entries[n].shape
    }
    if not (missing or unknown or shapes):
        return
    problems = []
    if missing:
        problems.append(f"it lacks {_describe(missing)}")
    if unknown:
        problems.append(f"it has {_describe(unknown)}, which this guide does not")
    for name, (got, want) in list(shapes.items())[:3]:
        problems.append(f"{name!r} has shape {got}, this guide's {want}")
    raise RuntimeError(
        f"Pyro's param store holds values under {module._pyro_name!r} that do not fit this "
        f"{type(module).__name__} ({'; '.join(problems)}): they come from another guide or "
        f"model. Call pyro.clear_param_store() before building a new guide, or load the "
        f"store saved with this model and these options."
    )


class GuideStateMixin:
    """Pickling and copying that leave the live guide alone (put it before Pyro's
    ``AutoGuide`` in the bases). A pickle drops the model, as Pyro's does (models are often
    closures), and a guide unpickled before its first call says so when called; a
    ``deepcopy`` keeps the model."""

    _MODEL_ATTRS = ("_model", "_raw_model")

    def __getstate__(self) -> dict[str, Any]:
        module: Any = self
        for t in [*module.parameters(), *module.buffers()]:
            t.__dict__.pop("unconstrained", None)  # the store's weakrefs cannot be pickled
        state = dict(module.__dict__)
        state["master"] = None
        for name in self._MODEL_ATTRS:
            if name in state:
                state[name] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        state = self.__getstate__()
        for name in self._MODEL_ATTRS:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        cast(Any, new).__setstate__(copy.deepcopy(state, memo))
        return new

    def initialize(self, *args: Any, **kwargs: Any) -> Self:
        """Run the model once with ``*args, **kwargs`` and build the guide, its start included
        (only the first time), and read any values loaded into Pyro's param store since the
        last call. Returns the guide."""
        if cast(Any, self).prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            sync_param_store(cast(PyroModule, self))
        return self

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """Build the guide for the model's arguments (:meth:`_build`), all or nothing: a
        failure (an unsupported model, an interrupt during the start) leaves the guide unbuilt,
        so the next call starts again. Values held in Pyro's param store under this guide's
        name (``pyro.get_param_store().load(path)``) are then loaded."""
        with all_or_nothing(cast(nn.Module, self)):
            self._build(*args, **kwargs)
            sync_param_store(cast(PyroModule, self))

    def _build(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def _require_model(self) -> None:
        if self.__dict__.get("_model") is None:
            raise RuntimeError(
                f"this {type(self).__name__} was unpickled before its first call, and a pickle "
                f"does not hold the model: build the guide anew (or pickle it after its first "
                f"call, when it no longer needs the model)"
            )

    @property
    def model(self) -> Any:
        self._require_model()
        return self.__dict__["_model"][0]
