"""Gold references for :mod:`benchmarks.hierarchical_real`: NUTS on the non-centred form of
each posterior of :mod:`benchmarks.hierarchical_models`, or exact ones where they exist.

* ``radon_mn``, ``glm``, ``counts`` (and the held-out ``radon_all``, ``election88``): NumPyro
  NUTS (JAX on the CPU, float64) on the NumPyro twin of the Pyro model below, every local made
  non-centred by ``LocScaleReparam(0)`` (``a = mu + sigma a_decentered``), ``--chains`` chains
  of ``--warmup`` + ``--samples``, target acceptance 0.9;
* ``eight_schools``: posteriordb's reference draws (rstan NUTS, non-centred, 10 chains of 1,000
  thinned draws);
* ``funnel``, ``funnel10k``: the exact moments of :func:`benchmarks.hierarchical.exact_moments`.

Every sampled reference is checked: rank-normalised split r-hat at most 1.01 and bulk and tail
ESS at least 1,000 for every global (ArviZ), no divergences. Written to ``--out``
(``benchmarks/results/references/``): ``<name>.npz`` with the means and sds of every latent on
the unconstrained scale (``log_sigma`` for a positive ``sigma``: ``<name>_mean``,
``<name>_sd``) and the globals' draws thinned to 4,000 (``draws_<name>``); ``<name>.json``
with the command, the settings and the diagnostics; ``README.md`` listing them all.

The held-out data sets are read only with ``--held-out``, for one final evaluation::

    python -m benchmarks.hierarchical_references                    # the dev suite
    python -m benchmarks.hierarchical_references --posteriors radon_mn --samples 4000
    python -m benchmarks.hierarchical_references --held-out         # radon_all, election88

NumPyro and JAX come with the ``bench`` extra (``pip install -e .[bench]``); they are used
here only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import hierarchical, hierarchical_models, hierarchical_references_io
from benchmarks.hierarchical_models import DEV, HELD_OUT, Posterior
from benchmarks.hierarchical_references_io import REFERENCES, THINNED

# The NumPyro twins: the same priors and likelihoods as the Pyro models, centred; non-centring
# is the reparameterisation applied in ``nuts``.


def _numpyro_models() -> dict[str, Any]:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    def radon(floor: Any, y: Any, mask: Any) -> None:
        mu_a = numpyro.sample("mu_a", nd.Normal(0.0, 10.0))
        mu_b = numpyro.sample("mu_b", nd.Normal(0.0, 10.0))
        sigma_a = numpyro.sample("sigma_a", nd.HalfNormal(1.0))
        sigma_b = numpyro.sample("sigma_b", nd.HalfNormal(1.0))
        sigma_y = numpyro.sample("sigma_y", nd.HalfNormal(1.0))
        with numpyro.plate("county", y.shape[-1]):
            a = numpyro.sample("a", nd.Normal(mu_a, sigma_a))
            b = numpyro.sample("b", nd.Normal(mu_b, sigma_b))
        like = nd.Normal(a + b * floor, sigma_y).mask(mask).to_event(2)
        numpyro.sample("y", like, obs=y)

    def glm(x: Any, y: Any) -> None:
        mu = numpyro.sample("mu", nd.Normal(0.0, 2.0))
        sigma = numpyro.sample("sigma", nd.HalfNormal(2.0))
        beta = numpyro.sample("beta", nd.Normal(0.0, 2.0))
        with numpyro.plate("groups", y.shape[-1]):
            a = numpyro.sample("a", nd.Normal(mu, sigma))
        numpyro.sample("y", nd.Bernoulli(logits=a + beta * x).to_event(2), obs=y)

    def counts(x: Any, y: Any) -> None:
        mu = numpyro.sample("mu", nd.Normal(0.0, 2.0))
        sigma = numpyro.sample("sigma", nd.HalfNormal(1.0))
        beta = numpyro.sample("beta", nd.Normal(0.0, 1.0))
        phi = numpyro.sample("phi", nd.HalfNormal(10.0))
        with numpyro.plate("groups", y.shape[-1]):
            u = numpyro.sample("u", nd.Normal(mu, sigma))
        mean = jnp.exp(u + beta * x)
        numpyro.sample("y", nd.NegativeBinomial2(mean, phi).to_event(2), obs=y)

    def effects(x: Any, state: Any, region: Any, age_edu: Any, sizes: Any) -> Any:
        effect = numpyro.sample("b0", nd.Normal(0.0, 5.0))
        for k, name in enumerate(("female", "black", "v_prev")):
            effect = effect + numpyro.sample(f"b_{name}", nd.Normal(0.0, 5.0)) * x[:, k]
        for name, index, size in zip(
            ("state", "region", "age_edu"), (state, region, age_edu), sizes, strict=True
        ):
            sigma = numpyro.sample(f"sigma_{name}", nd.HalfNormal(1.0))
            with numpyro.plate(name, int(size)):
                e = numpyro.sample(f"e_{name}", nd.Normal(0.0, sigma))
            effect = effect + e[index]
        return effect

    def election88(x: Any, y: Any, *index: Any) -> None:
        effect = effects(x, *index)
        numpyro.sample("y", nd.Bernoulli(logits=effect).to_event(1), obs=y)

    def crossed_lm(x: Any, y: Any, *index: Any) -> None:
        effect = effects(x, *index)
        noise = hierarchical_models.CROSSED_NOISE
        numpyro.sample("y", nd.Normal(effect, noise).to_event(1), obs=y)

    return {
        "radon": radon, "glm": glm, "counts": counts, "election88": election88,
        "crossed_lm": crossed_lm,
    }  # fmt: skip


TWINS = {"radon_mn": "radon", "radon_all": "radon", "glm": "glm", "counts": "counts"}
TWINS |= {"election88": "election88", "crossed_logit": "election88", "crossed_lm": "crossed_lm"}


def nuts(post: Posterior, opts: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict]:
    """NumPyro NUTS on the non-centred twin of ``post``: draws ``site -> (chains, draws,
    *shape)`` and the run's facts."""
    import jax
    import numpyro
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.reparam import LocScaleReparam

    jax.config.update("jax_enable_x64", True)
    twin = _numpyro_models()[TWINS[post.name]]
    config = {site: LocScaleReparam(0) for site in post.locals_}
    model = numpyro.handlers.reparam(twin, config=config)
    args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in post.args]
    kernel = NUTS(model, target_accept_prob=opts.target_accept)
    mcmc = MCMC(
        kernel,
        num_warmup=opts.warmup,
        num_samples=opts.samples,
        num_chains=opts.chains,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(opts.seed), *args, extra_fields=("diverging",))
    seconds = time.perf_counter() - start
    draws = {k: np.array(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    facts = {
        "method": "numpyro NUTS, non-centred (LocScaleReparam(0) on every local)",
        "chains": opts.chains,
        "warmup": opts.warmup,
        "samples_per_chain": opts.samples,
        "target_accept": opts.target_accept,
        "seed": opts.seed,
        "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
        "seconds": round(seconds, 1),
        "versions": {"numpyro": numpyro.__version__, "jax": jax.__version__},
    }
    return draws, facts


def posteriordb_draws(post: Posterior) -> tuple[dict[str, np.ndarray], dict]:
    """posteriordb's reference draws of the centred eight schools, ``(10, 1000, *shape)``."""
    from benchmarks.posteriors import models

    ref = models.load_reference("eight_schools-eight_schools_centered")
    draws = {k: v.reshape(10, -1, *v.shape[1:]) for k, v in ref.items()}
    facts = {
        "method": "posteriordb reference draws (rstan NUTS on the non-centred model, "
        "10 chains, 10,000 + 10,000 iterations thinned by 10, adapt_delta 0.95)",
        "chains": 10,
        "samples_per_chain": 1000,
        "divergences": 0,
    }
    return draws, facts


def sampled_reference(post: Posterior, draws: dict[str, np.ndarray], facts: dict) -> dict:
    """Moments, thinned global draws and diagnostics of chain-grouped ``draws``."""
    import arviz as az

    chains, num = next(iter(draws.values())).shape[:2]
    flat = post.unconstrained(
        {k: v.reshape(chains * num, *v.shape[2:]) for k, v in draws.items()}, chains * num
    )
    arrays: dict[str, np.ndarray] = {}
    diagnostics: dict[str, dict[str, float]] = {}
    keep = np.linspace(0, chains * num - 1, min(THINNED, chains * num)).round().astype(int)
    for name, value in flat.items():
        v = value.numpy()
        arrays[name + "_mean"], arrays[name + "_sd"] = v.mean(0), v.std(0, ddof=1)
        data = az.convert_to_dataset({name: v.reshape(chains, num, -1)})
        stats = {
            "r_hat": float(az.rhat(data)[name].max()),
            "ess_bulk": float(az.ess(data, method="bulk")[name].min()),
            "ess_tail": float(az.ess(data, method="tail")[name].min()),
        }
        if name in post.global_names:
            arrays["draws_" + name] = v[keep, 0]
            diagnostics[name] = stats
        else:
            diagnostics[name] = {
                "max_" + k if k == "r_hat" else "min_" + k: s for k, s in stats.items()
            }
    facts = facts | {"diagnostics": diagnostics}
    return {
        "arrays": arrays,
        "facts": facts | {"ok": hierarchical_references_io.meets_target(facts)},
    }


def exact_reference(post: Posterior) -> dict:
    """The funnel's exact moments (quadrature in ``log tau``)."""
    y, s = post.args
    exact = hierarchical.exact_moments(y, s)
    arrays = {k: v.reshape(-1).numpy() for k, v in exact.items()}
    facts = {
        "method": "exact (quadrature in log tau, closed-form Gaussian conditionals)",
        "ok": True,
    }
    return {"arrays": arrays, "facts": facts}


def reference(name: str, opts: argparse.Namespace) -> dict:
    post = hierarchical_models.load(name)
    if name.startswith("funnel"):
        return exact_reference(post)
    draws, facts = posteriordb_draws(post) if name == "eight_schools" else nuts(post, opts)
    return sampled_reference(post, draws, facts)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--posteriors",
        default=None,
        help=f"of {', '.join(TWINS)}, eight_schools, funnel, funnel10k",
    )
    p.add_argument(
        "--held-out", action="store_true", help=f"allow (and default to) {', '.join(HELD_OUT)}"
    )
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--target-accept", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REFERENCES)
    opts = p.parse_args(argv)
    names = (opts.posteriors or ",".join(HELD_OUT if opts.held_out else DEV)).split(",")
    unknown = set(names) - set(hierarchical_models.LOADERS)
    if unknown:
        p.error(
            f"unknown posteriors {sorted(unknown)}; "
            f"choose from {sorted(hierarchical_models.LOADERS)}"
        )
    if set(names) & set(HELD_OUT) and not opts.held_out:
        p.error(f"{sorted(set(names) & set(HELD_OUT))} are held out: pass --held-out to run them")
    opts.names = names
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    command = "python -m benchmarks.hierarchical_references " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    for name in opts.names:
        ref = reference(name, opts)
        ref["facts"] |= {"name": name, "command": command.strip()}
        hierarchical_references_io.save(opts.out, name, ref["arrays"], ref["facts"])
        print(json.dumps(ref["facts"], indent=1), flush=True)
    hierarchical_references_io.write_readme(opts.out)


if __name__ == "__main__":
    main()
