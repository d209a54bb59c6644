"""The reference ops against hand-written formulas and hand-computed gradients."""

import pytest
import torch

from sae_fast import reference
from sae_fast.sparse import SparseActs

from helpers import make_params


def _params64(d_in=7, d_sae=13):
    return {k: v.double() for k, v in make_params(d_in, d_sae).items()}


def test_encode_matches_gemma_scope_formula():
    p = _params64()
    x = torch.randn(5, 7, dtype=torch.float64)
    pre = x @ p["W_enc"] + p["b_enc"]
    mask = pre > p["threshold"]
    expect = torch.nn.functional.relu(pre) * mask
    got = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(got, expect)
    assert 0 < int((got != 0).sum()) < got.numel()  # a real mix of active and inactive


def test_apply_b_dec_to_input_subtracts_b_dec():
    p = _params64()
    x = torch.randn(4, 7, dtype=torch.float64)
    got = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"], p["b_dec"], True)
    want = reference.jumprelu_encode(x - p["b_dec"], p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(got, want)


def test_negative_threshold_needs_positive_pre():
    # relu(pre) * (pre > thr): with thr < pre <= 0 the activation is 0, and the
    # feature is not in the active set.
    pre = torch.tensor([[-0.5, 0.0, 0.3]])
    thr = torch.tensor([-1.0, -1.0, -1.0])
    assert torch.equal(reference.jumprelu(pre, thr), torch.tensor([[0.0, 0.0, 0.3]]))
    assert reference.active_mask(pre, thr).tolist() == [[False, False, True]]


def test_sparse_and_dense_decode_agree_with_formula():
    p = _params64()
    x = torch.randn(6, 7, dtype=torch.float64)
    acts = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    sp = SparseActs.from_dense(acts.float()).to(dtype=torch.float32)
    W_dec, b_dec = p["W_dec"].float(), p["b_dec"].float()
    want = acts @ p["W_dec"] + p["b_dec"]
    # hand loop: x_hat_b = sum over active j of acts[b,j] * W_dec[j] + b_dec
    loop = torch.stack([sum((acts[b, j] * p["W_dec"][j] for j in range(13) if acts[b, j] != 0), p["b_dec"].clone()) for b in range(6)])
    assert torch.allclose(loop, want)
    assert torch.allclose(reference.sparse_decode(sp, W_dec, b_dec).double(), want, atol=1e-5)
    assert torch.allclose(reference.dense_decode(acts.float(), W_dec, b_dec).double(), want, atol=1e-5)


def test_nan_input_propagates_like_dense():
    p = make_params(7, 13)
    x = torch.randn(3, 7)
    x[1, 2] = float("nan")
    dense = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.isnan(dense[1]).all() and not torch.isnan(dense[[0, 2]]).any()
    sp = reference.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(torch.isnan(sp.to_dense()), torch.isnan(dense))
    out = reference.sparse_decode(sp, p["W_dec"], p["b_dec"])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()


def _tiny_case():
    # One token, d_in = 1, two features; worked by hand below.
    x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    W_enc = torch.tensor([[0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    b_enc = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    thr = torch.tensor([0.5005, 1.0], dtype=torch.float64, requires_grad=True)
    W_dec = torch.tensor([[3.0], [1.0]], dtype=torch.float64, requires_grad=True)
    b_dec = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    return x, W_enc, b_enc, thr, W_dec, b_dec


def test_straight_through_gradients_by_hand():
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
    x, W_enc, b_enc, thr, W_dec, b_dec = _tiny_case()
    out = reference.jumprelu_sae_loss(x, W_enc, b_enc, thr, W_dec, b_dec, l0_coefficient=0.1, bandwidth=0.002)
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


def test_threshold_gradient_of_active_feature_in_band():
    # An active feature inside the band gets both the JumpReLU term and the step term.
    x = torch.tensor([[1.0]], dtype=torch.float64)
    W_enc = torch.tensor([[0.5]], dtype=torch.float64)
    b_enc = torch.zeros(1, dtype=torch.float64)
    thr = torch.tensor([0.4995], dtype=torch.float64, requires_grad=True)
    W_dec = torch.tensor([[3.0]], dtype=torch.float64)
    b_dec = torch.zeros(1, dtype=torch.float64)
    out = reference.jumprelu_sae_loss(x, W_enc, b_enc, thr, W_dec, b_dec, l0_coefficient=0.2, bandwidth=0.002)
    out.loss.backward()
    # acts = 0.5, x_hat = 1.5, g = 1, dacts = 3: -(0.4995/0.002)*3 - 0.2/0.002
    assert thr.grad.item() == pytest.approx(-(0.4995 / 0.002) * 3 - 100.0)


def test_gradients_match_finite_differences_off_threshold():
    """Away from every threshold the STE gradients of the smooth parameters are the true gradients."""
    p = _params64(5, 9)
    x = torch.randn(4, 5, dtype=torch.float64)
    pre = x @ p["W_enc"] + p["b_enc"]
    # push thresholds away from pre so small perturbations never flip a feature
    p["threshold"] = torch.where((pre - p["threshold"]).abs().min(0).values < 0.05, pre.min(0).values - 0.1, p["threshold"])
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]

    def f(*ts):
        kw = dict(p, **dict(zip(names, ts)))
        return reference.jumprelu_sae_loss(x, kw["W_enc"], kw["b_enc"], kw["threshold"], kw["W_dec"], kw["b_dec"], l0_coefficient=0.3, bandwidth=1e-3).loss

    ts = [p[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-6)


def test_band_is_measured_on_pre_not_relu():
    # threshold negative and pre negative inside the band: relu(pre) = 0 but the band counts it.
    pre = torch.tensor([[-0.0104]], requires_grad=True)
    thr = torch.tensor([-0.0100], requires_grad=True)
    step = reference.StepFunction.apply(pre, thr, 0.002)
    step.sum().backward()
    assert thr.grad.item() == pytest.approx(-1 / 0.002)
    assert pre.grad is None or pre.grad.abs().sum() == 0


def test_zero_tokens():
    p = make_params(7, 13)
    x = torch.zeros(0, 7)
    out = reference.jumprelu_sae_loss(x, **p, l0_coefficient=1.0, bandwidth=1e-3)
    assert out.loss.item() == 0.0 and out.reconstruction.shape == (0, 7)
    sp = reference.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert sp.n_tokens == 0 and sp.to_dense().shape == (0, 13)
