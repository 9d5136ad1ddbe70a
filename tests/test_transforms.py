"""One table of every exported transform, each checked for the contract of a bijection."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn
from torch.distributions import Transform

from pyro_flows_ext import transforms as T

VEC = 5
IMG = (4, 4, 6)
CTX = 3


@dataclass
class Case:
    """``build()`` returns ``(transform, module owning its parameters)``."""

    build: Callable[[], tuple[Transform, nn.Module | None]]
    event_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None = None

    @property
    def y_shape(self) -> tuple[int, ...]:
        return self.out_shape or self.event_shape


def _m(t: Transform) -> tuple[Transform, nn.Module | None]:
    return t, t if isinstance(t, nn.Module) else None


def _conditioned(module: T.ConditionalCoupling) -> tuple[Transform, nn.Module]:
    context = torch.linspace(-1.0, 1.0, CTX, dtype=torch.float64)
    return module.double().condition(context), module


CASES: dict[str, Case] = {
    "affine-vec-half": Case(lambda: _m(T.affine_coupling(VEC, hidden_dims=[8])), (VEC,)),
    "affine-vec-alternating-sigmoid": Case(
        lambda: _m(T.affine_coupling(VEC, [8], mask="alternating", parity=1, scale="sigmoid")),
        (VEC,),
    ),
    "affine-img-channel": Case(lambda: _m(T.affine_coupling(IMG, hidden_channels=4)), IMG),
    "affine-img-checkerboard-sigmoid": Case(
        lambda: _m(
            T.affine_coupling(
                IMG, mask="checkerboard", parity=1, hidden_channels=4, scale="sigmoid"
            )
        ),
        IMG,
    ),
    "affine-img-resnet": Case(
        lambda: _m(T.affine_coupling(IMG, parity=1, hidden_channels=4, num_blocks=1)), IMG
    ),
    "spline-vec-half": Case(lambda: _m(T.spline_coupling(VEC, [8], bins=4)), (VEC,)),
    "spline-vec-alternating": Case(
        lambda: _m(T.spline_coupling(VEC, [8], mask="alternating", parity=1, bound=2.0)), (VEC,)
    ),
    "spline-img-channel": Case(lambda: _m(T.spline_coupling(IMG, hidden_channels=4)), IMG),
    "spline-img-checkerboard": Case(
        lambda: _m(T.spline_coupling(IMG, mask="checkerboard", parity=1, hidden_channels=4)),
        IMG,
    ),
    "additive-vec": Case(lambda: _m(T.additive_coupling(VEC, [8], mask="alternating")), (VEC,)),
    "additive-img": Case(lambda: _m(T.additive_coupling(IMG, hidden_channels=4)), IMG),
    "conditional-affine-vec": Case(
        lambda: _conditioned(T.conditional_affine_coupling(VEC, CTX, [8])), (VEC,)
    ),
    "conditional-affine-img": Case(
        lambda: _conditioned(
            T.conditional_affine_coupling(IMG, CTX, mask="checkerboard", hidden_channels=4)
        ),
        IMG,
    ),
    "conditional-spline-vec": Case(
        lambda: _conditioned(T.conditional_spline_coupling(VEC, CTX, [8], bins=3)), (VEC,)
    ),
    "conditional-spline-img": Case(
        lambda: _conditioned(
            T.conditional_spline_coupling(IMG, CTX, mask="checkerboard", hidden_channels=4)
        ),
        IMG,
    ),
    "lower-affine": Case(lambda: _m(T.LowerAffine(VEC, torch.ones(VEC), init_scale=0.5)), (VEC,)),
    "low-rank-affine": Case(
        lambda: _m(T.LowRankAffine(VEC, 2, torch.ones(VEC), init_scale=0.5)), (VEC,)
    ),
    "permute": Case(lambda: _m(T.PermuteTransform(VEC)), (VEC,)),
    "exponential-tails": Case(lambda: _m(T.ExponentialTails(VEC, init=0.5)), (VEC,)),
    "conditional-shift": Case(lambda: _conditioned(T.ConditionalShift(VEC, CTX)), (VEC,)),
    "actnorm-vec": Case(lambda: _m(T.actnorm(VEC)), (VEC,)),
    "actnorm-img": Case(lambda: _m(T.actnorm(IMG)), IMG),
    "invertible-linear-lu": Case(lambda: _m(T.invertible_linear(VEC)), (VEC,)),
    "invertible-linear-plain": Case(lambda: _m(T.InvertibleLinear(VEC, lu=False)), (VEC,)),
    "invertible-conv1x1-lu": Case(lambda: _m(T.invertible_conv1x1(IMG)), IMG),
    "invertible-conv1x1-plain": Case(lambda: _m(T.InvertibleConv1x1(IMG[0], lu=False)), IMG),
    "squeeze": Case(lambda: _m(T.SqueezeTransform()), IMG, (16, 2, 3)),
    "squeeze-inv": Case(lambda: _m(T.SqueezeTransform().inv), (16, 2, 3), IMG),
    "top-prior-vec": Case(lambda: _m(T.top_prior(VEC)), (VEC,)),
    "top-prior-img": Case(lambda: _m(T.ElementwiseAffine(IMG)), IMG),
    "split-prior-img": Case(lambda: _m(T.split_prior(IMG)), IMG),
    "split-prior-vec": Case(lambda: _m(T.split_prior(VEC)), (VEC,)),
    "factor-out": Case(
        lambda: _m(T.FactorOut(T.glow_step((2, 4, 6), hidden_channels=4), IMG)), IMG
    ),
    "glow-step-vec": Case(lambda: _m(T.glow_step(VEC, hidden_dims=[8])), (VEC,)),
    "glow-step-img": Case(lambda: _m(T.glow_step(IMG, hidden_channels=4)), IMG),
}
BATCHES = [(), (3,), (2, 3)]


def randomize_(module: nn.Module | None, seed: int = 0) -> None:
    """Move every parameter off its initial value (zero heads, identity ActNorm...)."""
    if module is None:
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, T.ActNorm):
                m.initialized.fill_(True)


def make(name: str, seed: int = 0) -> tuple[Transform, nn.Module | None]:
    torch.manual_seed(seed)
    t, module = CASES[name].build()
    if module is not None:
        module.double()
    randomize_(module, seed)
    return t, module


def no_cache(t: Transform) -> None:
    """Switch off the caches of ``t`` and of everything inside it."""
    parts = [t, getattr(t, "_inv", None)] + (list(t.modules()) if isinstance(t, nn.Module) else [])
    for part in parts:
        if isinstance(part, Transform):
            part._cache_size = 0


def flat_jacobian_logdet(t: Transform, x: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
    """``log|det J|`` of one un-batched input by autograd and ``slogdet``."""
    jac = torch.autograd.functional.jacobian(
        lambda v: t(v.reshape(event)).reshape(-1), x.reshape(-1)
    )
    return torch.linalg.slogdet(jac)[1]


def base_of(shape: tuple[int, ...], device: str = "cpu") -> dist.Distribution:
    zeros = torch.zeros(shape, dtype=torch.float64, device=device)
    return dist.Normal(zeros, 1.0).to_event(len(shape))


@pytest.fixture(params=list(CASES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("batch", BATCHES, ids=["b()", "b(3)", "b(2,3)"])
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "nocache"])
def test_round_trip(name: str, batch: tuple[int, ...], cached: bool) -> None:
    t, _ = make(name)
    if not cached:
        no_cache(t)
    case = CASES[name]
    x = torch.randn(batch + case.event_shape, dtype=torch.float64)
    y = t(x)
    assert y.shape == batch + case.y_shape
    torch.testing.assert_close(t.inv(y), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-6, rtol=0)
    y2 = torch.randn(batch + case.y_shape, dtype=torch.float64)
    torch.testing.assert_close(t(t.inv(y2)), y2, atol=1e-6, rtol=0)
    torch.testing.assert_close(t(t.inv(y2).clone()), y2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_log_det_matches_autograd(name: str, direction: str) -> None:
    t, _ = make(name)
    case = CASES[name]
    x = torch.randn((2,) + case.event_shape, dtype=torch.float64)
    if direction == "inverse":  # log-det right after the inverse (cache hit)
        y = torch.randn((2,) + case.y_shape, dtype=torch.float64)
        x = t.inv(y)
    else:
        y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == (2,)
    for i in range(2):
        expected = flat_jacobian_logdet(t, x[i].clone(), case.event_shape)
        torch.testing.assert_close(log_det[i], expected, atol=1e-6, rtol=0)
    # a fresh pair of tensors (cache miss) gives the same values
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y.clone()), log_det)
    torch.testing.assert_close(t.inv.log_abs_det_jacobian(y, x), -log_det)


def test_shapes(name: str) -> None:
    t, _ = make(name)
    case = CASES[name]
    for batch in BATCHES:
        assert tuple(t.forward_shape(batch + case.event_shape)) == batch + case.y_shape
        assert tuple(t.inverse_shape(batch + case.y_shape)) == batch + case.event_shape
    assert t.bijective
    assert t.domain.event_dim == len(case.event_shape)
    assert t.codomain.event_dim == len(case.y_shape)


def test_transformed_distribution(name: str) -> None:
    t, _ = make(name)
    case = CASES[name]
    base = base_of(case.event_shape)
    d = dist.TransformedDistribution(base, [t])
    y = torch.randn((4,) + case.y_shape, dtype=torch.float64)
    x = t.inv(y.clone())
    expected = base.log_prob(x) - t.log_abs_det_jacobian(x, y.clone())
    torch.testing.assert_close(d.log_prob(y), expected, atol=1e-8, rtol=1e-8)
    assert d.rsample((2, 3)).shape == (2, 3) + case.y_shape


def test_rsample_reaches_every_parameter(name: str) -> None:
    t, module = make(name)
    if module is None or not list(module.parameters()):
        pytest.skip("no parameters")
    case = CASES[name]
    d = dist.TransformedDistribution(base_of(case.event_shape), [t])
    y = d.rsample((8,))
    (y.square().sum() + d.log_prob(y.detach()).sum()).backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_state_dict_round_trip(name: str) -> None:
    t, module = make(name, seed=0)
    if module is None:
        pytest.skip("no parameters")
    t2, module2 = make(name, seed=1)
    assert module2 is not None
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    module2.load_state_dict(torch.load(buf))
    x = torch.randn((3,) + CASES[name].event_shape, dtype=torch.float64)
    assert torch.equal(t(x), t2(x))
    y = t(x)
    assert torch.equal(t.log_abs_det_jacobian(x, y), t2.log_abs_det_jacobian(x, t2(x)))


def test_svi_with_pyro_module(name: str) -> None:
    pyro.clear_param_store()
    t, module = make(name)
    case = CASES[name]
    base = base_of(case.event_shape)
    target = torch.full(case.y_shape, 0.5, dtype=torch.float64)

    def model() -> None:
        pyro.sample("z", dist.Normal(target, 1.0).to_event(len(case.y_shape)))

    def guide() -> None:
        if module is not None:
            pyro.module("flow", module)
        pyro.sample("z", dist.TransformedDistribution(base, [t]))

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    if module is not None:
        assert set(pyro.get_param_store().keys()) == {
            f"flow$$${n}" for n, _ in module.named_parameters()
        }


def test_sign_is_hasattr_safe_and_matches_the_jacobian(name: str) -> None:
    """``hasattr(t, "sign")`` never raises (TorchScript's ``trace_module`` asks every module
    attribute that way; torch's ``Transform.sign`` raises ``NotImplementedError``, which stops
    the trace); where a transform reports a sign it is that of ``det J``."""
    t, _ = make(name)
    case = CASES[name]
    if not hasattr(t, "sign"):
        with pytest.raises(AttributeError):  # an nn.Module's own, or NoSignError
            t.sign  # noqa: B018
        return
    x = torch.randn(case.event_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda v: t(v.reshape(case.event_shape)).reshape(-1), x.reshape(-1)
    )
    assert int(t.sign) == int(torch.linalg.slogdet(jac)[0])


class _Calls(nn.Module):
    """``forward(x) = t(x)``, ``inverse(y) = t.inv(y)``: a transform inside a module, as a
    guide or a flow holds it, for ``torch.jit.trace_module``."""

    def __init__(self, t: Transform) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.t.inv(y)


def test_torchscript_trace(name: str) -> None:
    """Both directions traced with ``torch.jit.trace_module`` (every attribute of every
    submodule is read on the way) give the eager values on new inputs; a transform without
    parameters traces as a plain function too."""
    t, module = make(name)
    no_cache(t)
    case = CASES[name]
    x = torch.randn((3,) + case.event_shape, dtype=torch.float64)
    y = torch.randn((3,) + case.y_shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        traced = torch.jit.trace_module(_Calls(t), {"forward": x, "inverse": y})
        if module is None or not list(module.parameters()):
            fn = torch.jit.trace(lambda v: t(v), x)
            x2 = torch.randn_like(x)
            torch.testing.assert_close(fn(x2), t(x2))
    x2, y2 = torch.randn_like(x), torch.randn_like(y)
    torch.testing.assert_close(traced(x2), t(x2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(traced.inverse(y2), t.inv(y2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy(name: str, how: str) -> None:
    t, _ = make(name)
    case = CASES[name]
    x = torch.randn((3,) + case.event_shape, dtype=torch.float64)
    y = t(x)  # fill the cache: a copy must not carry it
    t2 = pickle.loads(pickle.dumps(t)) if how == "pickle" else copy.deepcopy(t)
    torch.testing.assert_close(t2(x.clone()), y)
    torch.testing.assert_close(t2.inv(y.clone()), x, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_and_log_det(name: str) -> None:
    t, module = make(name)
    if module is not None:
        module.cuda()
        if isinstance(t, T.Coupling) and hasattr(t.conditioner, "context"):
            t.conditioner.context = t.conditioner.context.cuda()
    case = CASES[name]
    x = torch.randn((3,) + case.event_shape, dtype=torch.float64, device="cuda")
    y = t(x)
    assert y.device.type == "cuda"
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-6, rtol=0)
    d = dist.TransformedDistribution(base_of(case.event_shape, "cuda"), [t])
    log_prob = d.log_prob(y.clone())
    assert log_prob.device.type == "cuda" and log_prob.shape == (3,)
