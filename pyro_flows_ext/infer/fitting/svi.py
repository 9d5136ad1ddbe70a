"""``fit_guide``: fit any Pyro guide by SVI with the recommended protocol, in one call.

The protocol (Agrawal, Sheldon & Domke 2020; Agrawal & Domke 2024; the one behind
``benchmarks/posteriors``): Adam (:class:`pyro.optim.ClippedAdam`'s update, clipping off) with a
step size decaying exponentially from ``lr`` to ``lr_end`` over ``steps``,

.. math:: \\eta_t = \\eta_0 \\, (\\eta_{\\mathrm{end}} / \\eta_0)^{t / T},

and :class:`~pyro.infer.Trace_ELBO` with ``num_particles`` particles vectorised over a particle
plate. How many steps and particles a guide needs depends on where it starts, so the guide
may say (a ``fit_defaults(*args, **kwargs)`` method, used when ``steps`` is left ``None``):
``AutoCouplingFlow`` asks for 1,000 steps of 32 particles from its Laplace start, which is
close to the posterior already, and any other guide gets 3,000 of 16 (:data:`FIT_DEFAULTS`).
On posteriordb that made our default fit cheaper than ``AutoIAFNormal``'s (README). The
gradient of ``log q`` is the guide's own business (``AutoCouplingFlow(stl=True)``
uses sticking the landing). The ELBO estimates are smoothed by an exponential moving average
(bias-corrected, weight ``smoothing``), which the progress bar shows and which optional early
stopping watches. Stopping at once leaves the parameters where a large step size put them
(they jitter around the optimum); with ``cooldown`` the fit instead spends that many more
steps decaying the step size from where it stands to ``lr_end``, then stops.

With ``average`` the fit ends at the mean of its last iterates instead of the last one
(Polyak-Ruppert tail averaging, the per-element rows of subsampled plates left out so that a
step stays ``O(B)``). It is off by default: on a 100,000-group funnel subsampled by 1,000
(20,000 steps, two seeds, ``benchmarks/subsample_noise.py``) averaging the last quarter ended
the globals 0.22 and 0.26 posterior sds off, the last iterate 0.24 and 0.23 (that guide then
started at the init point; from the Laplace start over all groups, 3,000 steps end within
0.22 sd without averaging, four seeds).

The optimiser is :class:`~pyro_flows_ext.optim.LazyClippedAdam`: ``ClippedAdam`` to the bit
for every parameter of a guide without subsampled plates, but on the per-element parameters of
a guide over a subsampled plate (:class:`~pyro_flows_ext.infer.AutoHierarchicalFlow`'s
embeddings and pseudo-likelihoods) a step updates only the rows of the step's subsample, and
their moments, with bias corrections per row: the optimiser's work is ``O(B)``, and a row does
not keep moving on its momentum while it is out of the batch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import zero_grads

from pyro_flows_ext.checks import check_bool, positive_float, positive_int
from pyro_flows_ext.optim import is_per_element, lazy_clipped_adam
from pyro_flows_ext.train import History, TrainingDivergedError

__all__ = ["FIT_DEFAULTS", "fit_guide"]

FIT_DEFAULTS = {"steps": 3000, "num_particles": 16}
"""``fit_guide``'s ``steps`` and ``num_particles`` for a guide without ``fit_defaults`` (a
guide started at a point, like ``AutoNormal`` or ``AutoIAFNormal``)."""


class _Smoother:
    """Bias-corrected exponential moving average of the ELBO, and how long it has not
    improved on its best by more than ``min_delta``."""

    def __init__(self, weight: float, min_delta: float) -> None:
        self.weight, self.min_delta = weight, min_delta
        self.average, self.count = 0.0, 0
        self.best, self.since_best = -math.inf, 0

    def update(self, elbo: float) -> float:
        self.count += 1
        self.average = self.weight * self.average + (1 - self.weight) * elbo
        value = self.average / (1 - self.weight**self.count)
        if value > self.best + self.min_delta:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return value


def _guide_defaults(guide: Any, args: tuple, kwargs: dict) -> dict[str, int]:
    """:data:`FIT_DEFAULTS` updated by the guide's ``fit_defaults(*args, **kwargs)`` where it
    has that method (a guide that starts close to the posterior needs fewer steps than one
    started at a point)."""
    method = getattr(guide, "fit_defaults", None)
    if method is None:
        return dict(FIT_DEFAULTS)
    if not callable(method):
        raise TypeError(f"the guide's fit_defaults must be a method, got {method!r}")
    asked = method(*args, **kwargs)
    if not isinstance(asked, dict) or not set(asked) <= set(FIT_DEFAULTS):
        raise TypeError(
            f"the guide's fit_defaults() must return a dict with keys from "
            f"{sorted(FIT_DEFAULTS)}, got {asked!r}"
        )
    for name, value in asked.items():
        positive_int(f"the guide's fit_defaults()[{name!r}]", value)
    return {**FIT_DEFAULTS, **asked}


def _check(
    steps: int | None,
    lr: float,
    lr_end: float,
    num_particles: int | None,
    patience: int | None,
    min_delta: float,
    smoothing: float,
    flags: dict[str, Any],
) -> None:
    if steps is not None:
        positive_int("steps", steps)
    positive_float("lr", lr)
    positive_float("lr_end", lr_end)
    if num_particles is not None:
        positive_int("num_particles", num_particles)
    if patience is not None:
        positive_int("patience", patience)
    positive_float("min_delta", min_delta, allow_zero=True)
    positive_float("smoothing", smoothing, allow_zero=True)
    if smoothing >= 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    for name, value in flags.items():
        check_bool(name, value)


def fit_guide(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    steps: int | None = None,
    lr: float = 5e-2,
    lr_end: float = 1e-4,
    num_particles: int | None = None,
    vectorize_particles: bool = True,
    patience: int | None = None,
    cooldown: int | None = None,
    min_delta: float = 1e-2,
    smoothing: float = 0.95,
    max_plate_nesting: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    lazy: bool = True,
    average: float = 0.0,
    **kwargs: Any,
) -> History:
    """Fit ``guide`` to ``model`` by SVI with the recommended protocol (module docstring).

    Args:
        model, guide: a Pyro model and a guide for it (any: ``AutoNormal``,
            :class:`~pyro_flows_ext.infer.AutoCouplingFlow`, ...), both called with
            ``*args, **kwargs`` (so the model cannot take keywords named like the options
            below). Its parameters live in Pyro's param store, as with ``SVI``.
        steps: optimisation steps at most; the step-size schedule spans them. ``None``
            (default): the guide's recommendation, ``guide.fit_defaults(*args,
            **kwargs)["steps"]`` where it has that method
            (:meth:`AutoCouplingFlow.fit_defaults
            <pyro_flows_ext.infer.AutoCouplingFlow.fit_defaults>` builds the guide and asks
            for 1,000 steps of 32 particles when it starts at the Laplace approximation),
            else :data:`FIT_DEFAULTS` (3,000).
        lr, lr_end: the step size decays exponentially from ``lr`` to ``lr_end``.
        num_particles: ELBO particles per step; ``None`` (default): with ``steps`` left
            ``None`` the guide's recommendation as for ``steps``, else 16.
        vectorize_particles: draw the particles under one particle plate (the model and
            guide must vectorise); ``False`` loops.
        patience: stop when the smoothed ELBO has not improved on its best by more than
            ``min_delta`` nats for this many steps; ``None`` (default) runs all ``steps``.
        cooldown: with ``patience``, do not stop at once: decay the step size from where
            it stands to ``lr_end`` over this many more steps (within ``steps``), then stop.
            ``None`` (default) stops at once.
        smoothing: weight of the moving average of the ELBO, in ``[0, 1)``.
        max_plate_nesting: the model's plate nesting for the particle plate (``None``: Pyro
            guesses it by tracing the model, and logs that it did).
        progress: show a tqdm bar with the smoothed ELBO.
        callback: ``callback(steps_taken, loss)`` after every step (its time counts in the
            history's seconds).
        lazy: update the per-element rows of subsampled plates lazily (module docstring);
            ``False``: :class:`pyro.optim.ClippedAdam` for every parameter (every row's
            moments and value move at every step).
        average: the share of the steps, at the end, over which the parameters are averaged
            (those of the last ``round(average * steps)`` steps; the per-element rows of
            subsampled plates are not averaged), written into the parameters when the fit
            ends (also when early stopping ends it inside that window; a fit that raises
            keeps its last good step's parameters). 0 (default): no averaging.

    Returns:
        the :class:`~pyro_flows_ext.train.History` (``loss``: the negative ELBO estimate of
        every step; ``smoothed``: its moving average; ``elbo``: the last smoothed ELBO;
        ``averaged_from``: the step after which the parameters were averaged, or ``None``).

    Raises:
        TrainingDivergedError: (a ``FloatingPointError``) naming the step (from 1) whose
            loss or gradient was not finite (or, with Pyro's validation on, whose model or
            guide computed a NaN), with the history before it. That step is not applied: the
            guide keeps the parameters of the last good step.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 2.0))
        >>> guide = AutoNormal(model)
        >>> history = fit_guide(model, guide, steps=200, num_particles=4, progress=False)
        >>> len(history.loss), round(guide.median()["x"].item())
        (200, 1)
    """
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")
    flags = {"vectorize_particles": vectorize_particles, "progress": progress, "lazy": lazy}
    _check(steps, lr, lr_end, num_particles, patience, min_delta, smoothing, flags)
    if cooldown is not None:
        positive_int("cooldown", cooldown)
        if patience is None:
            raise ValueError(
                f"cooldown={cooldown} needs patience (it starts when patience runs out)"
            )
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(steps_taken, loss), got {callback!r}")
    if max_plate_nesting is not None:
        positive_int("max_plate_nesting", max_plate_nesting, minimum=0)
    positive_float("average", average, allow_zero=True)
    if average > 1:
        raise ValueError(f"average must be a share of the steps in [0, 1], got {average!r}")
    clock = time.perf_counter(), time.process_time()  # a guide's start counts in the fit
    # the guide recommends steps and particles together: with ``steps`` given, 16 particles
    defaults = FIT_DEFAULTS if steps is not None else _guide_defaults(guide, args, kwargs)
    steps = defaults["steps"] if steps is None else steps
    num_particles = defaults["num_particles"] if num_particles is None else num_particles
    options = {"lr": lr, "lrd": (lr_end / lr) ** (1.0 / steps), "clip_norm": math.inf}
    optim = lazy_clipped_adam(options) if lazy else pyro.optim.ClippedAdam(options)
    nesting = math.inf if max_plate_nesting is None else max_plate_nesting
    vectorize = vectorize_particles and num_particles > 1
    elbo = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=nesting
    )
    svi = SVI(model, guide, optim, elbo)
    stop = _AfterStep(patience, cooldown, lr_end, callback)
    smoother = _Smoother(smoothing, min_delta)
    averager = _TailAverage(steps, average)
    return _run(svi, steps, smoother, stop, averager, progress, clock, (args, kwargs))


class _TailAverage:
    """Running means of the parameters over the last ``round(share * steps)`` steps,
    per-element parameters left out."""

    def __init__(self, steps: int, share: float) -> None:
        self.start = steps - round(share * steps)
        self.means: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def update(self, step: int, params: set[torch.Tensor]) -> None:
        """After step ``step`` (from 0) with the parameters it touched."""
        if step < self.start:
            return
        for p in params:
            if is_per_element(p) or not p.is_floating_point():
                continue
            mean, count = self.means.get(p, (p.detach().clone(), 0))
            mean += (p.detach() - mean) / (count + 1)
            self.means[p] = (mean, count + 1)

    @torch.no_grad()
    def apply(self, history: History) -> None:
        """Write the means into the parameters (the first averaged step into ``history``)."""
        for p, (mean, _) in self.means.items():
            p.copy_(mean)
        if self.means:
            history.averaged_from = self.start


class _AfterStep:
    """What follows each step: the user's ``callback``, then whether to stop (after
    ``patience`` steps without improvement, at once or after a ``cooldown`` of steps whose
    step size decays to ``lr_end``)."""

    def __init__(
        self,
        patience: int | None,
        cooldown: int | None,
        lr_end: float,
        callback: Callable[[int, float], None] | None = None,
    ) -> None:
        self.patience, self.cooldown, self.lr_end = patience, cooldown, lr_end
        self.callback = callback
        self.end: int | None = None  # the step count at which the cool-down ends

    def __call__(self, svi: SVI, smoother: _Smoother, history: History) -> bool:
        taken = len(history.loss)
        if self.callback is not None:
            self.callback(taken, history.loss[-1])
        if self.end is not None:
            return taken >= self.end
        if self.patience is None or smoother.since_best < self.patience:
            return False
        if self.cooldown is None:
            return True
        history.cooldown_from, self.end = taken, taken + self.cooldown
        for optimizer in svi.optim.optim_objs.values():  # lr *= lrd each step
            for group in optimizer.param_groups:
                group["lrd"] = min(1.0, (self.lr_end / group["lr"]) ** (1.0 / self.cooldown))
        return False


def _run(
    svi: SVI,
    steps: int,
    smoother: _Smoother,
    stop: _AfterStep,
    averager: _TailAverage,
    progress: bool,
    clock: tuple[float, float],
    arguments: tuple[tuple, dict],
) -> History:
    """The loop; ``clock``: the wall and CPU times at which the fit started."""
    from tqdm.auto import tqdm

    history = History()
    args, kwargs = arguments
    every = max(1, steps // 200)
    with tqdm(total=steps, disable=not progress, unit="step", desc="fit_guide") as bar:
        for step in range(steps):
            tick = time.perf_counter()
            loss, params = _step(svi, step, history, args, kwargs)
            averager.update(step, params)
            history.record(loss, time.perf_counter() - tick)
            history.smoothed.append(-smoother.update(-loss))
            if (step + 1) % every == 0 or step + 1 == steps:
                bar.update(step + 1 - bar.n)
                bar.set_postfix(elbo=f"{history.elbo:.4g}", refresh=False)
            if stop(svi, smoother, history):
                history.stopped_early = True
                break
        bar.update(len(history.loss) - bar.n)
    averager.apply(history)
    history.seconds = time.perf_counter() - clock[0]
    history.cpu_seconds = time.process_time() - clock[1]
    return history


def _step(
    svi: SVI, step: int, history: History, args: tuple, kwargs: dict
) -> tuple[float, set[torch.Tensor]]:
    """One SVI step (``step`` from 0) and the parameters it touched, applied only when its loss
    and every gradient are finite
    (``SVI.step`` applies it whatever they are): else
    :class:`~pyro_flows_ext.train.TrainingDivergedError`, and the parameters are those the
    previous step left. With Pyro's validation on, a distribution that receives a NaN or
    infinite argument (reported as "invalid values") is the same failure."""
    capture = poutine.trace(param_only=True)
    try:
        with capture:
            loss = float(svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs))
        if not math.isfinite(loss):
            raise _diverged(step + 1, loss, history, "; the step was not applied")
        params = _params(capture)
        grads = [(p, p.grad) for p in params if p.grad is not None]
        finite = [torch.isfinite(g).all() for _, g in grads]
        if finite and not bool(torch.stack(finite).all()):  # one device sync per step
            names = _names([p for (p, _), ok in zip(grads, finite, strict=True) if not ok])
            detail = f"; the gradient of {names} is not finite, so the step was not applied"
            raise _diverged(step + 1, loss, history, detail)
        svi.optim(params)
    except ValueError as err:
        if "invalid values" not in str(err) or not _NON_FINITE.search(str(err)):
            raise
        raise _diverged(step + 1, math.nan, history, _invalid_value(err)) from err
    finally:
        zero_grads(_params(capture))  # a step that failed part-way leaves no gradient behind
    return loss, params


def _params(capture: Any) -> set[torch.Tensor]:
    """The unconstrained parameters a (possibly interrupted) traced step touched."""
    return {site["value"].unconstrained() for site in capture.trace.nodes.values()}


_NON_FINITE = re.compile(r"\b(nan|inf)\b")


def _names(tensors: list[torch.Tensor], limit: int = 3) -> str:
    store = pyro.get_param_store()
    names = [store.param_name(t) or f"a tensor of shape {tuple(t.shape)}" for t in tensors]
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def _invalid_value(err: ValueError) -> str:
    """What a validation error's NaN means: the parameters when they are not finite, else
    the model or guide computed a non-finite value from finite parameters."""
    store = pyro.get_param_store()
    bad = [t for _, t in store.named_parameters() if not bool(torch.isfinite(t).all())]
    first = " ".join(str(err).splitlines()[:2])  # the message and the offending value
    if bad:
        return f": the parameters {_names(bad)} are not finite ({first})"
    return (
        f": the model or guide computed a non-finite value from finite parameters ({first}); "
        f"the step was not applied"
    )


def _diverged(step: int, loss: float, history: History, detail: str = "") -> TrainingDivergedError:
    what = "is not finite" if not math.isfinite(loss) else "has a non-finite gradient"
    message = (
        f"the ELBO loss {what} at step {step} (loss {loss}){detail}; lower lr, use more "
        f"particles, or check the model and the guide's start"
    )
    return TrainingDivergedError(message, step, loss, history)
