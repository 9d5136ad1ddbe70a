"""Fixtures for every test, the doctests of the package included."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _empty_param_store() -> None:
    """Every test starts with an empty param store: guides of one class share their names
    there (as Pyro's autoguides do), and a guide adopts the values it finds under its name."""
    pyro.clear_param_store()
