"""What is special to each family of transforms, beyond the shared table."""

from __future__ import annotations

import copy
import math
import pickle

import pyro.distributions as dist
import pytest
import torch

from pyro_flows_ext import transforms as T


@pytest.mark.parametrize(
    "build",
    [
        lambda: T.affine_coupling(6),
        lambda: T.affine_coupling(6, mask="alternating", scale="sigmoid"),
        lambda: T.additive_coupling(6, parity=1),
        lambda: T.affine_coupling((2, 4, 4), mask="checkerboard", hidden_channels=4),
        lambda: T.affine_coupling((2, 4, 4), scale="sigmoid", hidden_channels=4),
        lambda: T.conditional_affine_coupling(6, context_dim=2).condition(torch.ones(2)),
        lambda: T.split_prior((4, 4, 4)),
        lambda: T.split_prior(6),
    ],
    ids=[
        "affine-vec",
        "affine-vec-sigmoid",
        "additive-vec",
        "affine-img-checker",
        "affine-img-sigmoid",
        "conditional",
        "split-img",
        "split-vec",
    ],
)
def test_couplings_start_at_identity(build) -> None:
    t = build()
    shape = (3,) + t.event_shape
    x = torch.randn(shape)
    assert torch.equal(t(x), x)
    assert torch.equal(t.inv(x.clone()), x)
    assert torch.equal(t.log_abs_det_jacobian(x, t(x)), torch.zeros(3))


def test_sigmoid_scale_never_expands_in_the_density_direction() -> None:
    """Glow's parameterisation: the inverse multiplies by sigmoid(h + 2) / sigmoid(2) <= 1.14,
    so the data cannot blow up on its way to the base (MNIST diverged the other way round)."""
    t = T.affine_coupling(6, hidden_dims=[8], scale="sigmoid")
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0.0, 5.0)
    y = torch.randn(256, 6)
    x = t.inv(y)
    inverse_log_det = -t.log_abs_det_jacobian(x, y)
    assert inverse_log_det.max() <= 3 * math.log(1 / torch.sigmoid(torch.tensor(2.0))) + 1e-6
    assert inverse_log_det.min() < -1.0  # and it does contract


def test_coupling_leaves_identity_part_unchanged() -> None:
    t = T.affine_coupling((2, 4, 4), mask="checkerboard", parity=1, hidden_channels=4)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    x = torch.randn(5, 2, 4, 4)
    y = t(x)
    keep = t.partition.mask
    assert torch.equal(y[..., keep], x[..., keep])
    assert not torch.allclose(y[..., ~keep], x[..., ~keep])


@pytest.mark.parametrize("shape", [(3,), (3, 5, 4)], ids=["vec", "img"])
def test_actnorm_initialises_to_zero_mean_unit_variance(shape) -> None:
    t = T.ActNorm(shape if len(shape) == 3 else shape[0])
    data = 4.0 + 3.0 * torch.randn((64,) + shape)
    z = t.inv(data)
    dims = [0] if len(shape) == 1 else [0, 2, 3]
    torch.testing.assert_close(z.mean(dims), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dims, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert bool(t.initialized)
    # a second batch does not re-initialise
    loc = t.loc.detach().clone()
    t.inv(torch.randn((8,) + shape))
    assert torch.equal(t.loc, loc)


def test_actnorm_batch_of_one_and_constant_channel_are_finite() -> None:
    t = T.ActNorm(4)
    z = t.inv(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.isfinite(z).all() and torch.equal(z, torch.zeros(1, 4))
    img = T.ActNorm((2, 3, 3))
    data = torch.randn(5, 2, 3, 3)
    data[:, 1] = 7.0
    z = img.inv(data)
    assert torch.isfinite(z).all()
    assert torch.isfinite(img.log_abs_det_jacobian(z, data)).all()
    torch.testing.assert_close(z[:, 1], torch.zeros(5, 3, 3))


def test_actnorm_loaded_is_not_reinitialised() -> None:
    t = T.ActNorm(3)
    t.inv(2 + torch.randn(10, 3))
    fresh = T.ActNorm(3)
    fresh.load_state_dict(t.state_dict())
    y = torch.randn(4, 3) * 100
    assert torch.equal(fresh.inv(y), t.inv(y.clone()))


def test_a_batch_with_nan_does_not_initialise_actnorm() -> None:
    """A NaN (or inf) in the first batch a flow scores must not become its data-dependent
    state: the layer waits for a finite batch (issue 17, item 5)."""
    t = T.ActNorm(3)
    bad = 2 + torch.randn(10, 3)
    bad[0, 1] = math.nan
    t.inv(bad)
    assert not t.initialized
    y = 2 + 3 * torch.randn(50, 3)
    z = t.inv(y)
    assert t.initialized and torch.isfinite(z).all()
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5)


def test_a_flow_that_scored_a_nan_batch_still_trains() -> None:
    from pyro_flows_ext import fit, realnvp

    torch.manual_seed(0)
    flow = realnvp(2, depth=2, hidden_dims=[8])
    x = torch.randn(64, 2)
    bad = x.clone()
    bad[0, 0] = math.inf
    assert not torch.isfinite(flow.log_prob(bad)[0])  # the bad row scores non-finite
    assert torch.isfinite(flow.log_prob(x)).all()  # clean data scores finite
    history = fit(flow, x, steps=5, batch_size=32, progress=False)
    assert len(history.loss) == 5


def test_actnorm_without_data_init_stays_identity() -> None:
    t = T.ActNorm(3, data_init=False)
    y = 5 + torch.randn(4, 3)
    assert torch.equal(t.inv(y), y)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
@pytest.mark.parametrize("cls", [T.InvertibleLinear, T.InvertibleConv1x1])
def test_mixing_log_det_and_inverse(cls, lu) -> None:
    t = cls(5, lu=lu).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    w = t.weight_matrix()
    torch.testing.assert_close(t.inverse_matrix() @ w, torch.eye(5, dtype=torch.float64))
    x = torch.randn((2, 5) if cls is T.InvertibleLinear else (2, 5, 3, 2), dtype=torch.float64)
    pixels = 1 if cls is T.InvertibleLinear else 6
    expected = torch.linalg.slogdet(w)[1] * pixels
    torch.testing.assert_close(t.log_abs_det_jacobian(x, t(x)), expected.expand(2))


def test_lu_diagonal_never_crosses_zero() -> None:
    t = T.InvertibleLinear(4)
    with torch.no_grad():
        t.log_s.fill_(-50.0)  # any value of log|s| keeps W invertible
    assert torch.all(torch.linalg.svdvals(t.weight_matrix().double()) > 0)


def test_cache_is_not_stale_after_an_optimizer_step() -> None:
    """Pyro #2564: the same input object after an in-place parameter update."""
    t = T.affine_coupling(4, hidden_dims=[8])
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    x = torch.randn(16, 4)
    y = t(x)
    (y.square().sum() - t.log_abs_det_jacobian(x, y).sum()).backward()
    opt.step()
    y_after = t(x)
    with torch.no_grad():
        fresh = T.Coupling(4, t.transformer, t.conditioner, t.partition, cache_size=0)
        expected = fresh(x)
    assert not torch.equal(y_after, y)
    torch.testing.assert_close(y_after, expected)
    torch.testing.assert_close(
        t.log_abs_det_jacobian(x, y_after), fresh.log_abs_det_jacobian(x, expected)
    )
    # the cached log-det of the previous output is not handed back for the new parameters
    torch.testing.assert_close(
        t.log_abs_det_jacobian(x, y), fresh.log_abs_det_jacobian(x, expected)
    )


def test_cache_is_not_stale_after_a_parameter_is_replaced() -> None:
    t = T.ActNorm(3, data_init=False)
    x = torch.randn(2, 3)
    assert torch.equal(t(x), x)
    t.loc = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(t(x), x + 1)
    t.double()
    xd = x.double()
    assert torch.equal(t(xd), xd + 1)


def test_cache_makes_log_det_free() -> None:
    t = T.affine_coupling(4, hidden_dims=[8])
    calls = []
    t.conditioner.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 4)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    x2 = t.inv(y)
    assert x2 is x and len(calls) == 1
    y_new = torch.randn(3, 4)
    t.log_abs_det_jacobian(t.inv(y_new), y_new)
    assert len(calls) == 2


def test_deep_glow_stack_is_invertible_in_float32() -> None:
    torch.manual_seed(0)
    steps = [T.glow_step((3, 16, 16), hidden_channels=8, parity=i % 2) for i in range(32)]
    flow = dist.transforms.ComposeTransformModule(steps)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in flow.modules():
            if isinstance(m, T.ActNorm):
                m.initialized.fill_(True)
        x = torch.randn(4, 3, 16, 16)
        y = flow(x)
        err = (flow.inv(y.clone()) - x).abs().max()
    assert torch.isfinite(y).all()
    assert err < 1e-3, err


def test_pickle_and_deepcopy_with_a_filled_cache() -> None:
    t = T.glow_step(4, hidden_dims=[8])
    x = torch.randn(2, 4, requires_grad=True)
    t(x)
    for clone in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        torch.testing.assert_close(clone(x.detach()), t(x.detach()))
    assert "AffineMap" in repr(t) and "ActNorm" in repr(t)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, x, match",
    [
        (T.affine_coupling(4), torch.randn(3, 5), r"event shape \(4\).*\(3, 5\)"),
        (T.affine_coupling((2, 4, 4), hidden_channels=4), torch.randn(2, 3, 4, 4), r"\(2, 4, 4\)"),
        (T.InvertibleConv1x1(3), torch.randn(2, 4, 4, 4), r"\(3, \*, \*\).*\(2, 4, 4, 4\)"),
        (T.ActNorm((3, 4, 4)), torch.randn(2, 2, 4, 4), r"\(3, \*, \*\)"),
        (T.SqueezeTransform(), torch.randn(2, 3, 5, 4), "even H and W"),
        (T.SqueezeTransform().inv, torch.randn(2, 3, 5, 4), r"\(4C, H, W\)"),
        (T.affine_coupling(4), torch.randn(4), None),
    ],
    ids=[
        "vec-size",
        "img-channels",
        "conv-channels",
        "actnorm-channels",
        "odd-squeeze",
        "unsqueeze",
        "ok",
    ],
)
def test_wrong_shapes_raise_value_error(t, x, match) -> None:
    if match is None:
        assert t(x).shape == x.shape
        return
    with pytest.raises(ValueError, match=match):
        t(x)
    if isinstance(t, T.CachedTransformModule):
        with pytest.raises(ValueError, match=match):
            t.inv(x)


@pytest.mark.parametrize(
    "t, x",
    [
        (T.affine_coupling(4), torch.ones(2, 4, dtype=torch.long)),
        (T.InvertibleLinear(4), torch.ones(2, 4, dtype=torch.int32)),
        (T.SqueezeTransform(), torch.ones(1, 2, 2, 2, dtype=torch.uint8)),
        (T.ActNorm(4), [[1.0, 2.0, 3.0, 4.0]]),
    ],
    ids=["coupling-long", "linear-int", "squeeze-uint8", "list"],
)
def test_non_floating_input_raises_type_error(t, x) -> None:
    with pytest.raises(TypeError, match="floating dtype|torch.Tensor"):
        t(x)


def test_context_of_wrong_size() -> None:
    t = T.conditional_affine_coupling(4, context_dim=3)
    with pytest.raises(ValueError, match=r"context must have event shape \(3\).*\(2, 2\)"):
        t.condition(torch.ones(2, 2))
    with pytest.raises(TypeError, match="context must have a floating dtype"):
        t.condition(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: T.affine_coupling((3, 4)), ValueError, r"\(C, H, W\)"),
        (lambda: T.affine_coupling("4"), TypeError, "int D or a tuple"),
        (lambda: T.affine_coupling(1), ValueError, "at least 2 features"),
        (lambda: T.affine_coupling(4, mask="checkerboard"), ValueError, "half.*alternating"),
        (lambda: T.affine_coupling((1, 4, 4)), ValueError, "at least 2 channels"),
        (lambda: T.affine_coupling(4, scale="softplus"), ValueError, "exp.*sigmoid"),
        (lambda: T.affine_coupling(4, parity=2), ValueError, "parity must be one of"),
        (lambda: T.conditional_affine_coupling(4, context_dim=0), ValueError, "context_dim"),
        (lambda: T.InvertibleLinear(0), ValueError, "int >= 1"),
        (lambda: T.ActNorm((0, 2, 2)), ValueError, "positive"),
    ],
    ids=[
        "2d-shape",
        "str-shape",
        "one-feature",
        "image-mask",
        "one-channel",
        "scale",
        "parity",
        "ctx",
        "dim0",
        "zero-ch",
    ],
)
def test_bad_constructor_arguments(call, err, match) -> None:
    with pytest.raises(err, match=match):
        call()


def test_exponential_tails_give_each_side_its_own_exponential_tail() -> None:
    t = T.ExponentialTails(2)
    with torch.no_grad():
        t.rho.copy_(torch.tensor([[2.0, 1e-9], [1e-9, 0.5]]).log())  # (left, right) x dims
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    t = t.double()
    # P(y < -s) for dim 0 (left weight 2) decays like exp(-s / 2): the slope of its log
    x_at = t.inv(torch.tensor([[-400.0, 400.0], [-600.0, 600.0]], dtype=torch.float64))
    log_tail = torch.special.log_ndtr(-x_at.abs())
    slopes = (log_tail[1] - log_tail[0]) / 200.0
    assert slopes[0].item() == pytest.approx(-1 / 2.0, rel=0.05)  # log-corrections fade
    assert slopes[1].item() == pytest.approx(-1 / 0.5, rel=0.05)
    # the other sides stay Gaussian (weight ~0: the identity there), these do not
    three = torch.tensor([[3.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(t(three)[0], torch.tensor([3.0, 3.0 + 0.25 * 9]).double())
    assert torch.allclose(t(-three)[0], torch.tensor([-3.0 - 9.0, -3.0]).double())
    q = dist.TransformedDistribution(base, [t])
    assert torch.isfinite(q.log_prob(torch.tensor([[-1e4, 1e4]], dtype=torch.float64))).all()
    with pytest.raises(ValueError, match="init"):
        T.ExponentialTails(2, init=0.0)
