"""Pyro versions of posteriordb posteriors with gold-standard reference draws.

``models`` holds the Pyro models, the data and reference-draw loaders, the registry
``POSTERIORS`` and the Stein-identity check; ``metrics`` compares guide draws with the
reference draws. Run ``python -m benchmarks.posteriors.models`` from the repository root for
a one-line summary per posterior.
"""

__all__: list[str] = []
