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

from helpers import (DTYPES, STEP_CASES, STEP_D_IN, STEP_D_OUT, STEP_D_SAE, STEP_FEW_CASES, STEP_KW, TRANSCODER_CASES,
                     TRANSCODER_FEW_CASES, assert_close_as_dense, dtype_id, exact_pre_case, impl_cases, impls,
                     make_params, reference_grads, transcoder_case)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,mode", impl_cases([c[:2] for c in STEP_CASES if not c[2]], [(13, "mixed")]))
def test_active_set_output(impl, n, mode, dtype):
    # TrainingOutput.acts: exactly the dense path's nonzero activations, as SparseActs
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, dtype, mode)
    got, _, _ = _loss(impl, x, p, False)
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert got.acts.values.dtype == dtype and got.acts.d_sae == STEP_D_SAE
    assert torch.equal(got.acts.cpu().to_dense(), want)
    assert torch.equal(got.acts.cpu().to_sparse_coo().to_dense(), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,mode", impl_cases([c[:2] for c in STEP_CASES if not c[2]], [(13, "mixed")]))
def test_quadratic_l0_loss_matches_reference(impl, n, mode, dtype):
    """Gemma Scope 2's quadratic L0 loss (target_l0): the loss and every gradient, the
    threshold's per-token weighted band sum included, as close to the float64 truth as the
    dense path."""
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, dtype, mode)
    kw = dict(STEP_KW, target_l0=5.0)
    got, gg, _ = _loss(impl, x, p, False, **kw)
    ps = {k: v.double().requires_grad_() for k, v in p.items()}
    truth = reference.jumprelu_sae_loss(x.double(), **ps, **kw)
    truth.loss.backward()
    pd = {k: v.clone().requires_grad_() for k, v in p.items()}
    dense = reference.jumprelu_sae_loss(x, **pd, **kw)
    dense.loss.backward()
    l0_tok = (reference.jumprelu_pre(x.double(), ps["W_enc"], ps["b_enc"]) > ps["threshold"]).sum(-1).double()
    want = 0.3 * (2 / 5.0) * (l0_tok - 5.0).pow(2).sum() / max(n, 1)
    assert truth.l0_loss.item() == pytest.approx(want.item())
    assert got.l0_loss.item() == pytest.approx(want.item(), rel=1e-6)
    for k in gg:
        assert_close_as_dense(gg[k], ps[k].grad, pd[k].grad, what=f"grad {k}")
    if n > 1 and mode == "mixed":
        assert gg["threshold"].abs().sum() > 0


@pytest.mark.parametrize("impl", impls(where=lambda i: i.backend.loss is None))
def test_quadratic_l0_loss_needs_nonnegative_thresholds_on_sparse_steps(impl):
    # the sparse step counts each token's L0 as its active count: exact only for threshold >= 0
    x, p = exact_pre_case(5, STEP_D_IN, STEP_D_SAE, torch.float32, "mixed")
    p["threshold"][3] = -0.5
    with pytest.raises(ValueError, match="target_l0 .* needs every threshold >= 0"):
        _loss(impl, x, p, False, **STEP_KW, target_l0=5.0)
    with pytest.raises(ValueError, match=r"target_l0 must be in \(0, d_sae=45\], got 0"):
        sae_fast.jumprelu_sae_loss(x, **p, **STEP_KW, target_l0=0)


# ------------------------------------------------------------------ transcoders
def _transcoder_loss(impl, x, params, target):
    xin = x.to(impl.device).clone().requires_grad_()
    ps = {k: v.to(impl.device).clone().requires_grad_() for k, v in params.items()}
    y = target.to(impl.device)
    if impl.selectable:
        out = sae_fast.jumprelu_sae_loss(xin, **ps, target=y, backend=impl.name, **STEP_KW)
    else:
        out = step.loss(impl.backend, xin, step.SAEParams(**ps), target=y, **STEP_KW)
    out.loss.backward()
    return out, {k: v.grad.cpu() for k, v in ps.items()}, xin.grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,mode,skip", impl_cases(TRANSCODER_CASES, TRANSCODER_FEW_CASES))
def test_transcoder_matches_reference(impl, n, mode, skip, dtype):
    """A transcoder's loss: mse against a target in d_out (odd, unlike d_in), the decoder and
    skip connection into d_out; every gradient (W_skip and x included) as close to the float64
    truth as the dense path in the same dtype."""
    x, p, y = transcoder_case(n, dtype, mode, skip)
    got, gg, gx = _transcoder_loss(impl, x, p, y)
    xt = x.double().requires_grad_()
    truth, tg = reference_grads(xt, {k: v.double() for k, v in p.items()}, False, target=y.double())
    xd = x.clone().requires_grad_()
    dense, dg = reference_grads(xd, p, False, target=y)
    assert got.reconstruction.shape == (n, STEP_D_OUT)
    assert got.l0.item() == truth.l0.item() and got.l0_loss.item() == pytest.approx(truth.l0_loss.item())
    assert_close_as_dense(got.reconstruction.detach().cpu(), truth.reconstruction, dense.reconstruction.detach(),
                          what="prediction")
    assert_close_as_dense(got.mse_loss.detach().cpu(), truth.mse_loss, dense.mse_loss.detach(), what="mse",
                          ulp_dtype=dtype)
    assert set(gg) == set(p)
    for k in gg:
        assert_close_as_dense(gg[k], tg[k], dg[k], what=f"grad {k}")
    assert_close_as_dense(gx, xt.grad, xd.grad, what="grad x")


def test_transcoder_argument_errors():
    x, p, y = transcoder_case(3, torch.float32, "mixed", True)
    kw = dict(STEP_KW)
    with pytest.raises(ValueError, match="W_skip .* needs a target"):
        sae_fast.jumprelu_sae_loss(x, **{**p, "W_dec": torch.randn(STEP_D_SAE, STEP_D_IN), "b_dec": x[0]}, **kw)
    with pytest.raises(ValueError, match=r"target must have last dimension d_out=11, got shape \[3, 4\]"):
        sae_fast.jumprelu_sae_loss(x, **p, target=y[:, :4], **kw)
    with pytest.raises(ValueError, match=r"target must have x's leading \(token\) shape \[3\]"):
        sae_fast.jumprelu_sae_loss(x, **p, target=y[:2], **kw)
    with pytest.raises(ValueError, match=r"W_skip must have shape \[17, 11\], got \[11, 17\]"):
        sae_fast.jumprelu_sae_loss(x, **{**p, "W_skip": p["W_skip"].t()}, target=y, **kw)
    with pytest.raises(TypeError, match="target has dtype torch.float16 but the SAE weights are torch.float32"):
        sae_fast.jumprelu_sae_loss(x, **p, target=y.half(), **kw)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[17\], got \[11\]"):  # b_dec can't apply to x
        sae_fast.jumprelu_sae_loss(x, **p, target=y, apply_b_dec_to_input=True, **kw)


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
