"""Fixtures shared by the whole test suite."""

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
