import pytest
import torch

import sae_fast
from sae_fast import JumpReLUSAE, JumpReLUTranscoder, SparseActs, reference
from sae_fast._ext import extension_error, load_extension

from helpers import (ALL, DTYPES, EXACT_BANDWIDTH, IMPLEMENTATIONS, assert_close_as_dense, exact_pre_case, impls,
                     make_params)

# The module on CPU tensors with ordinary random weights, where encode must give the reference's
# bits: the backends that form pre as the reference does (the fused Triton GEMM does not; every
# backend's module paths on exact inputs: test_module_paths_on_exact_inputs).
MODULE_IMPLS = impls(device="cpu", where=lambda i: i.selectable and i.name != "triton")
SELECTABLE = impls(where=lambda i: i.selectable)


def make_sae(d_in=24, d_sae=50, dtype=torch.float32, backend="torch", **kw):
    sae = JumpReLUSAE(d_in, d_sae, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():
        for k, v in make_params(d_in, d_sae, dtype).items():
            getattr(sae, k).copy_(v)
    return sae


def test_parameters_have_gemma_scope_names_and_shapes():
    sae = JumpReLUSAE(16, 40)
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (16, 40), "b_enc": (40, ), "threshold": (40, ), "W_dec": (40, 16), "b_dec": (16, )}
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


def _module(kind, **kw):
    if kind == "sae":
        return JumpReLUSAE(12, 40, backend="torch", **kw)
    return JumpReLUTranscoder(12, 40, 10, affine_skip=True, backend="torch", **kw)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_device_init_then_to_empty(kind, dtype):
    # build without memory, then materialise: the usual way to set up a large module
    m = _module(kind, device="meta", dtype=dtype)
    assert m.W_enc.is_meta and m.threshold.is_meta and m.threshold.dtype == torch.float32
    m.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert m.W_enc.dtype == dtype and m.threshold.dtype == torch.float32
    m.reset_parameters(threshold_init=0.02)
    assert torch.all(m.threshold == 0.02) and not m.b_enc.any() and not m.b_dec.any()
    torch.testing.assert_close(m.W_dec.float().norm(dim=1), torch.ones(40), rtol=1e-2, atol=0)
    # usable: the module's output is the reference's on its (now real) weights
    x = torch.randn(7, 12).to(dtype)
    with torch.no_grad():
        acts = reference.jumprelu_encode(x, m.W_enc, m.b_enc, m.threshold)
        want = acts @ m.W_dec + m.b_dec + (x @ m.W_skip if kind == "transcoder" else 0)
        assert acts.any()
        torch.testing.assert_close(m(x), want)
    # threshold stays float32 through a later cast, its value kept exactly
    m.threshold.data.fill_(0.0012345)
    m.to(torch.bfloat16)
    assert m.W_dec.dtype == torch.bfloat16 and m.threshold.dtype == torch.float32
    assert m.threshold[0].item() == torch.tensor(0.0012345).item()


def test_threshold_gradient_stays_float32_through_a_cast():
    sae = JumpReLUSAE(8, 12)
    g = torch.full((12, ), 1e-5 + 1e-9)  # not a float16 value
    sae.threshold.grad = g.clone()
    sae.half()
    assert sae.threshold.grad.dtype == torch.float32 and torch.equal(sae.threshold.grad, g)


def test_decode_names_the_dimension_it_checks():
    sae = JumpReLUSAE(8, 16)
    with pytest.raises(ValueError, match=r"acts must have last dimension d_sae=16, got shape \[3, 8\]"):
        sae.decode(torch.zeros(3, 8))
    tc = JumpReLUTranscoder(8, 16, 5)
    with pytest.raises(ValueError, match=r"acts must have last dimension d_sae=16, got shape \[2, 5\]"):
        tc.decode(torch.zeros(2, 5))
    assert sae.decode(torch.zeros(3, 16)).shape == (3, 8)


@pytest.mark.parametrize("impl", MODULE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_forward(impl, dtype):
    sae = make_sae(dtype=dtype, backend=impl.name)
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


@pytest.mark.parametrize("impl", MODULE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_matches_reference(impl, dtype):
    # exact-pre inputs: every dtype sees the float64 active set and band (see helpers)
    x, p = exact_pre_case(37, 24, 50, dtype)
    sae = JumpReLUSAE(24, 50, dtype=dtype, backend=impl.name)
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


def test_extension_is_built_and_every_backend_is_here():
    # CI installs with --no-build-isolation, so the extension must be there.
    assert load_extension() is not None, extension_error()
    assert sae_fast.backends.resolve("auto", "cpu") == "cpu"
    here = {(name, device.type) for name, device in IMPLEMENTATIONS}
    assert {("torch", "cpu"), ("cpu", "cpu")} <= here
    if torch.cuda.is_available():
        # a GPU is here: sae_fast._C must carry the CUDA kernels, and Triton runs on it
        assert ("cuda", "cuda") in here, sae_fast.backends.unavailable_reason("cuda", "cuda")
        assert ("triton", "cuda") in here, sae_fast.backends.unavailable_reason("triton", "cuda")
    else:
        # the Triton kernels through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
        assert ("triton", "cpu") in here, sae_fast.backends.unavailable_reason("triton", "cpu")
        from cuda_emu import harness

        assert (("cuda-emu", "cpu") in here) == (harness.available() is None)


def test_backend_selection_and_env(monkeypatch):
    sae = JumpReLUSAE(8, 16)
    expect = "cpu" if any(i.name == "cpu" for i in ALL) else "torch"
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


def _exact_sae(impl, dtype, p, d_in, d_sae):
    sae = JumpReLUSAE(d_in, d_sae, dtype=dtype, device=impl.device, backend=impl.name)
    with torch.no_grad():
        for k, v in p.items():
            getattr(sae, k).copy_(v)
    return sae


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", SELECTABLE)
def test_module_paths_on_exact_inputs(impl, dtype):
    x, p = exact_pre_case(11, 13, 37, dtype)
    sae = _exact_sae(impl, dtype, p, 13, 37)
    xd = impl.to(x)
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(sae.encode(xd).cpu(), want)
    assert torch.equal(sae.encode_sparse(xd).to_dense().cpu(), want)
    truth = want.double() @ p["W_dec"].double() + p["b_dec"].double()
    with torch.no_grad():
        assert_close_as_dense(sae(xd).cpu(), truth, want @ p["W_dec"] + p["b_dec"], what="forward")


@pytest.mark.parametrize("impl", SELECTABLE)
def test_torch_compile(impl):
    x, p = exact_pre_case(8, 12, 40, torch.float32)
    sae = _exact_sae(impl, torch.float32, p, 12, 40)
    x = impl.to(x)
    compiled = torch.compile(sae)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), sae(x))
    torch.testing.assert_close(torch.compile(sae.decode, fullgraph=False)(sae.encode_sparse(x)), sae(x))
    loss = torch.compile(lambda t: sae.training_forward(t, l0_coefficient=0.1, bandwidth=EXACT_BANDWIDTH).loss)(x)
    loss.backward()
    ref = sae.training_forward(x, l0_coefficient=0.1, bandwidth=EXACT_BANDWIDTH).loss
    torch.testing.assert_close(loss, ref)
    assert sae.threshold.grad is not None and sae.W_enc.grad is not None


@pytest.mark.parametrize("impl", impls(where=lambda i: i.selectable and i.name != "torch"))
def test_forward_with_autograd_keeps_every_gradient(impl):
    # A fused encoder has no autograd of its own: under grad the module must run a path that
    # gives W_enc and b_enc their gradients, never drop them.
    x, p = exact_pre_case(7, 10, 30, torch.float32)
    sae = _exact_sae(impl, torch.float32, p, 10, 30)
    sae(impl.to(x)).pow(2).sum().backward()
    ref = _exact_sae(next(i for i in ALL if i.name == "torch"), torch.float32, p, 10, 30)
    ref(x).pow(2).sum().backward()
    for (n, a), b in zip(sae.named_parameters(), ref.parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), n
        else:
            torch.testing.assert_close(a.grad.cpu(), b.grad, msg=n)
    assert sae.W_enc.grad.abs().sum() > 0
