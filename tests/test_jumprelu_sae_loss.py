"""jumprelu_sae_loss: the training loss with straight-through gradients (the autograd form
of the training step).

Every implementation (helpers.impls): the public sae_fast.jumprelu_sae_loss where users can
select it, sae_fast.step.loss over its Backend else; the loss, the reconstruction and every
gradient (threshold and x included) against the float64 truth with the tolerance of the
dense path in the same dtype, on exact-pre inputs (every implementation sees the float64
active set and band). The reference against hand-computed gradients at the end. The
row-grads form of the step is in test_jumprelu_sae_row_grads.py.
"""

import pytest
import torch

import sae_fast
from sae_fast import reference, step

from helpers import (DTYPES, STEP_CASES, STEP_D_IN, STEP_D_SAE, STEP_FEW_CASES, STEP_KW, assert_close_as_dense,
                     dtype_id, exact_pre_case, impl_cases, impls, make_params)


def _loss(impl, x, params, apply_b_dec, **kw):
    """impl's TrainingOutput after loss.backward(), the gradients by name and x's gradient (on the CPU)."""
    kw = kw or STEP_KW
    xin = x.to(impl.device).clone().requires_grad_()
    ps = {k: v.to(impl.device).clone().requires_grad_() for k, v in params.items()}
    if impl.selectable:
        out = sae_fast.jumprelu_sae_loss(xin, **ps, apply_b_dec_to_input=apply_b_dec, backend=impl.name, **kw)
    else:
        out = step.loss(impl.backend, xin, step.SAEParams(**ps, apply_b_dec_to_input=apply_b_dec), **kw)
    out.loss.backward()
    return out, {k: v.grad.cpu() for k, v in ps.items()}, xin.grad.cpu()


def _reference(x, params, apply_b_dec):
    xin = x.clone().requires_grad_()
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = reference.jumprelu_sae_loss(xin, **ps, apply_b_dec_to_input=apply_b_dec, **STEP_KW)
    out.loss.backward()
    return out, {k: v.grad.cpu() for k, v in ps.items()}, xin.grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,mode,apply_b_dec", impl_cases(STEP_CASES, STEP_FEW_CASES))
def test_matches_reference(impl, n, mode, apply_b_dec, dtype):
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, dtype, mode)
    if apply_b_dec:
        p["b_dec"] = torch.zeros_like(p["b_dec"])  # keeps x - b_dec on the exact grid
    got, gg, gx = _loss(impl, x, p, apply_b_dec)
    truth, tg, tx = _reference(x.double(), {k: v.double() for k, v in p.items()}, apply_b_dec)
    # the dense path in the same dtype, on the implementation's device
    dense, dg, dx = _reference(impl.to(x), {k: impl.to(v) for k, v in p.items()}, apply_b_dec)
    assert got.l0.item() == truth.l0.item() == dense.l0.item()
    assert got.l0_loss.item() == pytest.approx(truth.l0_loss.item())
    assert torch.equal(got.fired.cpu(), truth.fired)
    assert_close_as_dense(got.reconstruction.detach().cpu(), truth.reconstruction,
                          dense.reconstruction.detach().cpu(), what="reconstruction")
    assert_close_as_dense(got.mse_loss.detach().cpu(), truth.mse_loss, dense.mse_loss.cpu(), what="mse",
                          ulp_dtype=dtype)
    assert_close_as_dense(got.loss.detach().cpu(), truth.loss, dense.loss.cpu(), what="loss", ulp_dtype=dtype)
    for k in gg:
        assert gg[k].dtype == dg[k].dtype, k
        assert_close_as_dense(gg[k], tg[k], dg[k], what=f"grad {k}")
    assert_close_as_dense(gx, tx, dx, what="grad x")
    if n > 1 and mode == "mixed":
        assert gg["threshold"].abs().sum() > 0  # the band is exercised


# ------------------------------------------------------ hand-computed gradients
def _tiny_case(dtype, device="cpu"):
    # One token, d_in = 1, two features; worked by hand below.
    t = lambda v: torch.tensor(v, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return t([[1.0]]), t([[0.5, 2.0]]), t([0.0, 0.0]), t([0.5005, 1.0]), t([[3.0], [1.0]]), t([0.0])


# the reference in float64, and every implementation in float32
HAND = [pytest.param(None, id="reference-fp64")] + impls()


def _hand_loss(impl, x, W_enc, b_enc, thr, W_dec, b_dec, **kw):
    if impl is None:
        return reference.jumprelu_sae_loss(x, W_enc, b_enc, thr, W_dec, b_dec, **kw)
    if impl.selectable:
        return sae_fast.jumprelu_sae_loss(x, W_enc, b_enc, thr, W_dec, b_dec, backend=impl.name, **kw)
    return step.loss(impl.backend, x, step.SAEParams(W_enc, b_enc, thr, W_dec, b_dec), **kw)


@pytest.mark.parametrize("impl", HAND)
def test_straight_through_gradients_by_hand(impl):
    """pre = [0.5, 2.0]; eps = 0.002, lambda = 0.1.

    Feature 0 is inactive but in the band (|0.5 - 0.5005| = 0.0005 < eps/2);
    feature 1 is active and far from its threshold. acts = [0, 2], x_hat = 2,
    mse = (2 - 1)^2 = 1, g = dL/dx_hat = 2 (x_hat - x) = 2,
    dacts = g * W_dec = [6, 2], dpre = [0, 2] (active set only),
    dthr_0 = -(thr_0/eps) * dacts_0 - lambda/eps = -(0.5005/0.002)*6 - 50 = -1551.5,
    dthr_1 = 0 (outside the band),
    dW_enc = x * dpre = [[0, 2]], db_enc = [0, 2], dW_dec = acts * g = [[0], [4]],
    db_dec = 2, dx = -g + dpre . W_enc[0] = -2 + 4 = 2 (x is also the target).
    """
    dtype, device = (torch.float64, "cpu") if impl is None else (torch.float32, impl.device)
    x, W_enc, b_enc, thr, W_dec, b_dec = _tiny_case(dtype, device)
    out = _hand_loss(impl, x, W_enc, b_enc, thr, W_dec, b_dec, l0_coefficient=0.1, bandwidth=0.002)
    assert out.mse_loss.item() == pytest.approx(1.0)
    assert out.l0_loss.item() == pytest.approx(0.1)  # one feature above threshold
    assert out.l0.item() == 1.0
    out.loss.backward()
    assert thr.grad.tolist() == pytest.approx([-1551.5, 0.0])
    assert W_enc.grad.flatten().tolist() == pytest.approx([0.0, 2.0])
    assert b_enc.grad.tolist() == pytest.approx([0.0, 2.0])
    assert W_dec.grad.flatten().tolist() == pytest.approx([0.0, 4.0])
    assert b_dec.grad.tolist() == pytest.approx([2.0])
    assert x.grad.flatten().tolist() == pytest.approx([2.0])


@pytest.mark.parametrize("impl", HAND)
def test_threshold_gradient_of_active_feature_in_band(impl):
    # An active feature inside the band gets both the JumpReLU term and the step term.
    dtype, device = (torch.float64, "cpu") if impl is None else (torch.float32, impl.device)
    t = lambda v, g=False: torch.tensor(v, dtype=dtype, device=device, requires_grad=g)  # noqa: E731
    thr = t([0.4995], True)
    out = _hand_loss(impl, t([[1.0]]), t([[0.5]]), t([0.0]), thr, t([[3.0]]), t([0.0]), l0_coefficient=0.2,
                     bandwidth=0.002)
    out.loss.backward()
    # acts = 0.5, x_hat = 1.5, g = 1, dacts = 3: -(0.4995/0.002)*3 - 0.2/0.002
    assert thr.grad.item() == pytest.approx(-(0.4995 / 0.002) * 3 - 100.0)


# ------------------------------------------------------------- the reference
def test_reference_gradients_match_finite_differences_off_threshold():
    """Away from every threshold the STE gradients of the smooth parameters are the true gradients."""
    p = {k: v.double() for k, v in make_params(5, 9).items()}
    x = torch.randn(4, 5, dtype=torch.float64)
    pre = x @ p["W_enc"] + p["b_enc"]
    # push thresholds away from pre so small perturbations never flip a feature
    p["threshold"] = torch.where((pre - p["threshold"]).abs().min(0).values < 0.05,
                                 pre.min(0).values - 0.1, p["threshold"])
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]

    def f(*ts):
        kw = dict(p, **dict(zip(names, ts)))
        return reference.jumprelu_sae_loss(x, kw["W_enc"], kw["b_enc"], kw["threshold"], kw["W_dec"], kw["b_dec"],
                                           l0_coefficient=0.3, bandwidth=1e-3).loss

    ts = [p[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-6)


def test_reference_band_is_measured_on_pre_not_relu():
    # threshold negative and pre negative inside the band: relu(pre) = 0 but the band counts it.
    pre = torch.tensor([[-0.0104]], requires_grad=True)
    thr = torch.tensor([-0.0100], requires_grad=True)
    step_ = reference.StepFunction.apply(pre, thr, 0.002)
    step_.sum().backward()
    assert thr.grad.item() == pytest.approx(-1 / 0.002)
    assert pre.grad is None or pre.grad.abs().sum() == 0


def test_reference_zero_tokens():
    p = make_params(7, 13)
    out = reference.jumprelu_sae_loss(torch.zeros(0, 7), **p, l0_coefficient=1.0, bandwidth=1e-3)
    assert out.loss.item() == 0.0 and out.reconstruction.shape == (0, 7)
