"""Fixtures shared by the whole test suite."""

from collections.abc import Callable, Iterator

import pyro
import pyro.distributions as dist
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small flows run fastest on one thread, and a busy machine makes more threads much
    slower; the CLI also sets the thread count, which is restored here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def default_dtype(request: pytest.FixtureRequest) -> Iterator[torch.dtype]:
    """Run the test under torch's default dtype float32, then float64 (restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


def _eight_schools(y: torch.Tensor, sigma: torch.Tensor, batch: int | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y), subsample_size=batch) as i:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma[i]), obs=y[i])


@pytest.fixture
def eight_schools() -> tuple[Callable[..., None], torch.Tensor, torch.Tensor]:
    """The centred eight-schools model (its last argument a subsample size, default none) and
    its data (float64): ``(model, y, sigma)``."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
    return _eight_schools, y, sigma
