import pytest
import torch

import sae_fast
from sae_fast import JumpReLUSAE, SparseActs, reference

from helpers import DTYPES, EXACT_BANDWIDTH, assert_close_as_dense, exact_pre_case, make_params

BACKENDS_HERE = [b for b in ("torch", "cpu") if sae_fast.backends.unavailable_reason(b, "cpu") is None]


def make_sae(d_in=24, d_sae=50, dtype=torch.float32, backend="torch", **kw):
    sae = JumpReLUSAE(d_in, d_sae, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():
        for k, v in make_params(d_in, d_sae, dtype).items():
            getattr(sae, k).copy_(v)
    return sae


def test_parameters_have_gemma_scope_names_and_shapes():
    sae = JumpReLUSAE(16, 40)
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (16, 40), "b_enc": (40,), "threshold": (40,), "W_dec": (40, 16), "b_dec": (16,)}
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.all(sae.threshold == 0.001)


def test_threshold_stays_float32():
    sae = JumpReLUSAE(8, 12, dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    sae.threshold.data.fill_(0.0012345)
    sae.half()
    assert sae.W_dec.dtype == torch.float16 and sae.threshold.dtype == torch.float32
    assert sae.threshold[0].item() == pytest.approx(0.0012345, rel=1e-7)  # no lossy round trip


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_forward(backend, dtype):
    sae = make_sae(dtype=dtype, backend=backend)
    x = torch.randn(3, 5, 24).to(dtype)
    acts = sae.encode(x)
    assert acts.shape == (3, 5, 50)
    assert torch.equal(acts, reference.jumprelu_encode(x, sae.W_enc, sae.b_enc, sae.threshold))
    sp = sae.encode_sparse(x)
    assert isinstance(sp, SparseActs) and sp.shape == (3, 5, 50)
    assert torch.equal(sp.to_dense(), acts)
    p64 = {k: v.detach().double() for k, v in sae.named_parameters()}
    truth = acts.double() @ p64["W_dec"] + p64["b_dec"]
    dense = acts @ sae.W_dec + sae.b_dec
    assert_close_as_dense(sae.decode(sp).detach(), truth, dense.detach(), what="decode(SparseActs)")
    assert torch.equal(sae.decode(acts), dense)
    assert_close_as_dense(sae(x).detach(), truth, dense.detach(), what="forward")
    assert sae(x).shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_matches_reference(backend, dtype):
    # exact-pre inputs: every dtype sees the float64 active set and band (see helpers)
    x, p = exact_pre_case(37, 24, 50, dtype)
    sae = JumpReLUSAE(24, 50, dtype=dtype, backend=backend)
    with torch.no_grad():
        for k, v in p.items():
            getattr(sae, k).copy_(v)
    bw = EXACT_BANDWIDTH
    out = sae.training_forward(x, l0_coefficient=0.3, bandwidth=bw)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    # float64 truth and the dense path in the same dtype
    p64 = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    ref = reference.jumprelu_sae_loss(x.double(), **p64, l0_coefficient=0.3, bandwidth=bw)
    ref.loss.backward()
    pd = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    dense = reference.jumprelu_sae_loss(x, **pd, l0_coefficient=0.3, bandwidth=bw)
    dense.loss.backward()
    assert out.l0.item() == dense.l0.item() == ref.l0.item()
    assert torch.equal(out.fired, ref.fired) and out.fired.any()
    assert out.l0_loss.item() == pytest.approx(dense.l0_loss.item())
    assert_close_as_dense(out.reconstruction, ref.reconstruction, dense.reconstruction, what="reconstruction")
    assert_close_as_dense(out.mse_loss, ref.mse_loss, dense.mse_loss, what="mse", ulp_dtype=dtype)
    for n in got:
        assert got[n].dtype == pd[n].grad.dtype, n
        assert_close_as_dense(got[n], p64[n].grad, pd[n].grad, what=f"grad {n}")
    assert got["threshold"].abs().sum() > 0  # the band is not empty in this case


def test_backend_selection_and_env(monkeypatch):
    sae = JumpReLUSAE(8, 16)
    expect = "cpu" if "cpu" in BACKENDS_HERE else "torch"
    assert sae.resolved_backend() == expect
    monkeypatch.setenv("SAE_FAST_BACKEND", "torch")
    assert sae.resolved_backend() == "torch"
    monkeypatch.setenv("SAE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAE_FAST_BACKEND"):
        sae.resolved_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        JumpReLUSAE(8, 16, backend="fast")
    with pytest.raises(RuntimeError, match="cuda"):
        sae_fast.backends.resolve("cuda", "cpu")


def test_apply_b_dec_to_input_in_module():
    sae = make_sae(apply_b_dec_to_input=True)
    x = torch.randn(4, 24)
    assert torch.equal(sae.encode(x), reference.jumprelu_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, sae.threshold))


def test_one_token_and_zero_tokens():
    sae = make_sae()
    assert sae(torch.randn(1, 24)).shape == (1, 24)
    empty = torch.zeros(0, 24)
    assert sae.encode(empty).shape == (0, 50) and sae(empty).shape == (0, 24)
    out = sae.training_forward(empty, l0_coefficient=1.0)
    assert out.loss.item() == 0.0
