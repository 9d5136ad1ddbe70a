"""Flow-level tests of ``Flow`` and the ``realnvp``/``glow`` builders."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import pyro_flows_ext
from pyro_flows_ext.flows import Flow, build_flow, glow, realnvp
from pyro_flows_ext.transforms import (
    ActNorm,
    actnorm,
    affine_coupling,
    conditional_affine_coupling,
    invertible_linear,
    split_prior,
)

# small configurations of every builder, one test id each
CASES = {
    "glow-image": lambda: glow((1, 8, 8), depth=2, hidden_channels=8),
    "glow-image-3levels": lambda: glow((2, 8, 8), levels=3, depth=1, hidden_channels=4),
    "glow-image-no-top": lambda: glow((3, 4, 4), depth=1, hidden_channels=4, learn_top=False),
    "glow-vector": lambda: glow(3, depth=2, hidden_dims=[16]),
    "realnvp-image": lambda: realnvp((1, 8, 8), depth=1, hidden_channels=8),
    "realnvp-image-split-prior": lambda: realnvp(
        (1, 4, 4), levels=2, depth=1, hidden_channels=4, split_prior=True
    ),
    "realnvp-vector": lambda: realnvp(3, depth=3, hidden_dims=[16]),
    "glow-image-spline": lambda: glow((1, 4, 4), depth=1, hidden_channels=4, coupling="spline"),
    "realnvp-vector-spline": lambda: realnvp(3, depth=2, hidden_dims=[16], coupling="spline"),
}


def _make(name: str) -> Flow:
    torch.manual_seed(0)
    flow = CASES[name]().double()
    x = torch.randn(16, *flow.event_shape, dtype=torch.float64)
    flow.log_prob(x)  # data-dependent initialisation (ActNorm)
    with torch.no_grad():  # move away from the identity so that every part matters
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


@pytest.fixture(params=sorted(CASES))
def flow(request: pytest.FixtureRequest) -> Flow:
    return _make(request.param)


def test_shapes(flow: Flow) -> None:
    x = torch.randn(2, 3, *flow.event_shape, dtype=torch.float64)
    assert flow.log_prob(x).shape == (2, 3)
    assert flow.sample().shape == flow.event_shape
    assert flow.sample((4,)).shape == (4, *flow.event_shape)
    assert flow.sample(5, temperature=0.5).shape == (5, *flow.event_shape)
    assert flow.rsample((2, 2)).shape == (2, 2, *flow.event_shape)
    assert flow.dist.event_shape == flow.event_shape


def test_log_prob_against_autograd_jacobian(flow: Flow) -> None:
    d = flow.num_dims
    x = torch.randn(2, *flow.event_shape, dtype=torch.float64)
    log_prob = flow.log_prob(x)
    for i in range(2):

        def inverse(v: torch.Tensor) -> torch.Tensor:
            return flow.transform.inv(v.reshape(flow.event_shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(inverse, x[i])
        z = inverse(x[i])
        ref = Normal(0.0, 1.0).log_prob(z).sum() + torch.linalg.slogdet(jac.reshape(d, d))[1]
        assert torch.allclose(log_prob[i], ref, atol=1e-8)


def test_round_trip(flow: Flow) -> None:
    z = torch.randn(3, *flow.event_shape, dtype=torch.float64)
    x = flow.transform(z)
    assert torch.allclose(flow.transform.inv(x.clone()), z, atol=1e-9)


def test_dist_matches_log_prob(flow: Flow) -> None:
    x = torch.randn(4, *flow.event_shape, dtype=torch.float64)
    assert torch.equal(flow.dist.log_prob(x.clone()), flow.log_prob(x.clone()))


def test_every_parameter_gets_a_gradient(flow: Flow) -> None:
    x = torch.randn(8, *flow.event_shape, dtype=torch.float64)
    flow.log_prob(x).mean().backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None]
    assert not missing
    flow.zero_grad()
    flow.rsample((3,)).square().sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_state_dict_round_trip(flow: Flow, tmp_path) -> None:
    path = tmp_path / "flow.pt"
    torch.save(flow.state_dict(), path)
    other = build_flow(flow.config).double()
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(5, *flow.event_shape, dtype=torch.float64)
    assert torch.equal(other.log_prob(x.clone()), flow.log_prob(x.clone()))


def test_deepcopy_and_pickle_after_backward(flow: Flow) -> None:
    import copy
    import io

    x = torch.randn(3, *flow.event_shape, dtype=torch.float64)
    flow.log_prob(x).sum().backward()  # caches now hold tensors with graphs
    clone = copy.deepcopy(flow)
    assert torch.equal(clone.log_prob(x.clone()), flow.log_prob(x.clone()))
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    assert buffer.tell() > 0


def test_no_grad_evaluation_then_training_on_the_same_tensor(flow: Flow) -> None:
    x = torch.randn(4, *flow.event_shape, dtype=torch.float64)
    with torch.no_grad():
        flow.log_prob(x)
    assert flow.log_prob(x).requires_grad  # the cache must not hand back a graph-less result


def test_repr_and_config(flow: Flow) -> None:
    assert "Flow" in repr(flow)
    assert flow.config is not None and flow.config["builder"] in ("glow", "realnvp")
    assert build_flow(flow.config).config == flow.config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_dtype_follows(dtype: torch.dtype) -> None:
    flow = glow((1, 4, 4), depth=1, hidden_channels=4).to(dtype)
    assert flow.dist.base_dist.base_dist.loc.dtype == dtype
    assert flow.log_prob(torch.randn(2, 1, 4, 4, dtype=dtype)).dtype == dtype
    assert flow.sample((2,)).dtype == dtype


def test_identity_at_initialisation() -> None:
    flow = realnvp(4, depth=2, actnorm=False)
    x = torch.randn(6, 4)
    assert torch.allclose(flow.log_prob(x), Normal(0.0, 1.0).log_prob(x).sum(-1), atol=1e-6)


def test_temperature_scales_the_base() -> None:
    flow = realnvp(2, depth=2, actnorm=False)  # the identity at initialisation
    torch.manual_seed(0)
    std = flow.sample((20000,), temperature=0.5).std(0)
    assert torch.allclose(std, torch.full((2,), 0.5), atol=0.02)
    with pytest.raises(ValueError, match="temperature"):
        flow.sample((2,), temperature=0.0)


def test_actnorm_initialised_on_first_log_prob_batch() -> None:
    flow = glow((1, 8, 8), depth=2, hidden_channels=4)
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert norms and not any(bool(m.initialized) for m in norms)
    x = 3 + 2 * torch.randn(64, 1, 8, 8)
    flow.log_prob(x)
    assert all(bool(m.initialized) for m in norms)
    first = flow.transform.parts[-1].inv(x)  # the squeeze of the first level
    out = glow_first_actnorm(flow).inv(first)
    assert out.mean((0, 2, 3)).abs().max() < 1e-4
    assert (out.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3


def glow_first_actnorm(flow: Flow) -> ActNorm:
    """The ActNorm that sees the data first in the density direction."""
    step = flow.transform.parts[-2]  # steps are stored in forward order; the last is the first
    return step.parts[-1]


@pytest.mark.parametrize(
    ("shape", "levels"), [((1, 8, 8), 2), ((1, 28, 28), 2), ((3, 32, 32), 3), ((1, 6, 6), 1)]
)
def test_default_levels(shape: tuple[int, int, int], levels: int) -> None:
    assert glow(shape, depth=1, hidden_channels=2).config["levels"] == levels
    assert realnvp(shape, depth=1, hidden_channels=2).config["levels"] == levels + 1


def test_builders_need_only_the_event_shape() -> None:
    for shape in (2, 5, (1, 8, 8)):
        for builder in (pyro_flows_ext.glow, pyro_flows_ext.realnvp):
            flow = builder(shape)
            assert isinstance(flow, pyro_flows_ext.Flow)
            n = 1 if isinstance(shape, int) else 3
            assert flow.log_prob(torch.randn(2, *flow.event_shape)).shape == (2,)
            assert len(flow.event_shape) == n


def test_multiscale_split_prior_is_learned() -> None:
    flow = glow((1, 8, 8), depth=1, hidden_channels=4)
    names = [n for n, _ in flow.named_parameters()]
    assert any("split" not in n and "conditioner" in n for n in names)
    from pyro_flows_ext.transforms import ElementwiseAffine, SplitPrior

    assert sum(isinstance(m, SplitPrior) for m in flow.modules()) == 1
    assert sum(isinstance(m, ElementwiseAffine) for m in flow.modules()) == 1


# every public argument of the builders, and of the factories they use, with a bad value
BAD_ARGUMENTS = {
    "glow-odd-image": (lambda: glow((1, 7, 8)), ValueError, "divisible"),
    "glow-too-many-levels": (lambda: glow((1, 8, 8), levels=4), ValueError, "divisible"),
    "glow-levels-zero": (lambda: glow((1, 8, 8), levels=0), ValueError, "levels"),
    "glow-vector-levels": (lambda: glow(4, levels=2), ValueError, "one level"),
    "glow-depth-zero": (lambda: glow((1, 8, 8), depth=0), ValueError, "depth"),
    "glow-depth-float": (lambda: glow(4, depth=2.0), TypeError, "depth"),
    "glow-hidden-channels-zero": (lambda: glow((1, 8, 8), hidden_channels=0), ValueError,
                                  "hidden_channels"),
    "glow-hidden-dims-negative": (lambda: glow(4, hidden_dims=[8, -1]), ValueError,
                                  "hidden_dims"),
    "glow-hidden-dims-int": (lambda: glow(4, hidden_dims=8), TypeError, "hidden_dims"),
    "glow-learn-top-str": (lambda: glow(4, learn_top="yes"), TypeError, "learn_top"),
    "glow-lu-int": (lambda: glow(4, lu=1), TypeError, "lu"),
    "glow-scale-unknown": (lambda: glow(4, scale="softplus"), ValueError, "scale"),
    "glow-coupling-unknown": (lambda: glow(4, coupling="maf"), ValueError, "coupling"),
    "realnvp-coupling-none": (lambda: realnvp(4, coupling=None), TypeError, "coupling"),
    "glow-event-shape-str": (lambda: glow("8"), TypeError, "event shape"),
    "glow-event-shape-2d": (lambda: glow((8, 8)), ValueError, "event shape"),
    "glow-event-shape-zero": (lambda: glow(0), ValueError, "event shape"),
    "realnvp-image-mask": (lambda: realnvp((1, 8, 8), mask="half"), ValueError, "mask"),
    "realnvp-vector-mask": (lambda: realnvp(4, mask="checkerboard"), ValueError, "mask"),
    "realnvp-depth-negative": (lambda: realnvp(4, depth=-1), ValueError, "depth"),
    "realnvp-levels-str": (lambda: realnvp((1, 8, 8), levels="2"), TypeError, "levels"),
    "realnvp-num-blocks-negative": (lambda: realnvp(3, num_blocks=-1), ValueError,
                                    "num_blocks"),
    "realnvp-clamp-zero": (lambda: realnvp(3, clamp=0.0), ValueError, "clamp"),
    "realnvp-clamp-str": (lambda: realnvp(3, clamp="3"), TypeError, "clamp"),
    "realnvp-actnorm-none": (lambda: realnvp(3, actnorm=None), TypeError, "actnorm"),
    "realnvp-split-prior-int": (lambda: realnvp((1, 8, 8), split_prior=1), TypeError,
                                "split_prior"),
    "build-flow-unknown": (lambda: build_flow({"builder": "maf"}), ValueError, "builder"),
    "flow-not-a-transform": (lambda: Flow(2, [object()]), TypeError, "Transform"),
    "coupling-parity": (lambda: affine_coupling(4, parity=2), ValueError, "parity"),
    "coupling-context-dim": (lambda: conditional_affine_coupling(4, 0), ValueError,
                             "context_dim"),
    "coupling-cache-size": (lambda: affine_coupling(4, cache_size=2), ValueError, "cache_size"),
    "actnorm-data-init": (lambda: actnorm(4, data_init="no"), TypeError, "data_init"),
    "invertible-zero": (lambda: invertible_linear(0), ValueError, "event shape"),
    "split-prior-even-kernel": (lambda: split_prior((4, 4, 4), kernel_size=2), ValueError,
                                "kernel_size"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments(case: str) -> None:
    call, error, match = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=match):
        call()


def test_log_prob_input_checks() -> None:
    flow = glow(3, depth=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        flow.log_prob([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        flow.log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="float64"):
        flow.log_prob(torch.zeros(2, 3, dtype=torch.float64))


def test_flow_with_plain_transforms_and_shape_check() -> None:
    from pyro_flows_ext.transforms import SqueezeTransform

    with pytest.raises(ValueError, match="to itself"):
        Flow((1, 4, 4), [SqueezeTransform()])
    flow = Flow(4, affine_coupling(4))
    assert math.isclose(
        flow.log_prob(torch.zeros(1, 4)).item(), -2 * math.log(2 * math.pi), rel_tol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    from pyro_flows_ext.datasets import load_digits_split
    from pyro_flows_ext.train import fit

    flow = glow((1, 8, 8), depth=2, hidden_channels=16).to("cuda")
    x = torch.randn(8, 1, 8, 8, device="cuda")
    assert flow.log_prob(x).device.type == "cuda"
    assert flow.sample((4,), temperature=0.7).device.type == "cuda"
    split = load_digits_split()
    history = fit(flow, split.train, valid=split.valid, steps=20, eval_every=10,
                  dequantize=split.levels, device="cuda", progress=False, bf16=True)  # fmt: skip
    assert len(history.step) == 20 and history.valid_loss
    assert next(flow.parameters()).device.type == "cuda"
