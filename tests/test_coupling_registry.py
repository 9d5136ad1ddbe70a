"""Adding a coupling kind is one map class and one registry line: the new kind then works in
every builder and guide that takes ``coupling=``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

import pyro_flows_ext as pfe
from pyro_flows_ext.infer import AutoCouplingFlow, AutoHierarchicalFlow
from pyro_flows_ext.transforms import COUPLINGS, Coupling, ElementwiseMap, register_coupling


class SinhShift(ElementwiseMap):
    """``y = x + a * tanh(x) + t`` with ``a = tanh(h) / 2`` in ``(-1/2, 1/2)``: monotone, the
    identity at zero parameters; its inverse is found by Newton steps."""

    num_params = 2

    def forward(self, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        t, h = params
        a = torch.tanh(h) / 2
        return x + a * torch.tanh(x) + t, self._log_det(x, a)

    def inverse(self, y: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        t, h = params
        a = torch.tanh(h) / 2
        x = y - t
        for _ in range(30):
            x = x - (x + a * torch.tanh(x) + t - y) / (1 + a / torch.cosh(x) ** 2)
        return x, self._log_det(x, a)

    @staticmethod
    def _log_det(x: Tensor, a: Tensor) -> Tensor:
        return torch.log1p(a / torch.cosh(x) ** 2)


@pytest.fixture
def registered() -> Iterator[str]:
    register_coupling("sinh_shift", SinhShift)  # the one line
    yield "sinh_shift"
    del COUPLINGS["sinh_shift"]


def _kinds(module: torch.nn.Module) -> set[type]:
    return {type(m.transformer) for m in module.modules() if isinstance(m, Coupling)}


@pytest.mark.parametrize("builder", [pfe.glow, pfe.realnvp])
@pytest.mark.parametrize("shape", [4, (1, 4, 4)], ids=["vector", "image"])
def test_builders_take_the_new_kind(registered: str, builder, shape) -> None:
    torch.manual_seed(0)
    small = {"hidden_dims": [8]} if isinstance(shape, int) else {"hidden_channels": 4}
    flow = builder(shape, depth=2, coupling=registered, **small)
    assert _kinds(flow) == {SinhShift}
    x = torch.randn((5,) + ((shape,) if isinstance(shape, int) else shape))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    log_p = flow.log_prob(x)
    assert log_p.shape == (5,) and torch.isfinite(log_p).all()
    rebuilt = pfe.flows.build_flow(flow.config)  # checkpoints rebuild by name
    assert _kinds(rebuilt) == {SinhShift}


def _model(y: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.0))
    with pyro.plate("g", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, log_tau.exp()))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


@pytest.mark.parametrize("guide_cls", [AutoCouplingFlow, AutoHierarchicalFlow])
def test_guides_take_the_new_kind(registered: str, guide_cls) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    y = torch.randn(6)
    guide = guide_cls(_model, coupling=registered)
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(5)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert SinhShift in _kinds(guide)


def test_unknown_kind_names_the_registry() -> None:
    with pytest.raises(ValueError, match="coupling must be one of"):
        pfe.glow(4, coupling="sinh_shift")
    with pytest.raises(TypeError, match="ElementwiseMap subclass"):
        register_coupling("bad", object)  # type: ignore[arg-type]
