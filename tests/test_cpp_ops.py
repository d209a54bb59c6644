"""The compiled CPU kernels (sae_fast._C) against the reference primitives."""

import pytest
import torch

import sae_fast
from sae_fast import reference
from sae_fast._ext import extension_error, load_extension

from helpers import DTYPES, assert_close_as_dense, random_sparse_case

ext = load_extension()


def test_extension_is_built():
    # CI installs with --no-build-isolation, so the extension must be there.
    assert ext is not None, extension_error()
    assert sae_fast.backends.resolve("auto", "cpu") == "cpu"


def _case(n, s, d, cap_extra=0, dtype=torch.float32, all_active=False, empty_rows=()):
    return random_sparse_case(n, s, cap_extra, dtype, all_active, empty_rows)


SHAPES = [(1, 5, 3), (0, 7, 5), (13, 37, 19), (33, 64, 130)]


def _ops():
    from sae_fast.cpp_ops import _register_ops

    _register_ops()
    return torch.ops.sae_fast


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,s,d", SHAPES)
@pytest.mark.parametrize("mode", ["random", "all_active", "padded"])
def test_primitives_match_reference(dtype, n, s, d, mode):
    ops = _ops()
    idx, val, cnt = _case(n, s, d, cap_extra=3 if mode == "padded" else 0, dtype=dtype,
                          all_active=mode == "all_active", empty_rows=(0,) if n > 1 else ())
    W = torch.randn(s, d).to(dtype)
    bias = torch.randn(d).to(dtype)
    g = torch.randn(n, d).to(dtype)
    i64 = lambda t: t.double()  # noqa: E731
    # decode
    out = ops.sparse_decode(idx, val, cnt, W, bias)
    truth = reference.sparse_decode_raw(idx, i64(val), cnt, i64(W), i64(bias))
    dense_path = reference.sparse_decode_raw(idx, val, cnt, W, bias)
    assert_close_as_dense(out, truth, dense_path, what="sparse_decode")
    # gather-dot
    out = ops.sparse_gather_dot(g, idx, cnt, W)
    assert_close_as_dense(out, reference.sparse_gather_dot(i64(g), idx, cnt, i64(W)),
                          reference.sparse_gather_dot(g, idx, cnt, W), what="sparse_gather_dot")
    valid = torch.arange(idx.shape[1])[None] < cnt[:, None].long()
    assert (out[~valid] == 0).all()
    # scatter-rows
    out = ops.sparse_scatter_rows(val, idx, cnt, g, s, True)
    assert_close_as_dense(out, reference.sparse_scatter_rows(i64(val), idx, cnt, i64(g), s),
                          reference.sparse_scatter_rows(val, idx, cnt, g, s), what="sparse_scatter_rows")


def test_scatter_rows_is_deterministic():
    ops = _ops()
    idx, val, cnt = _case(200, 8, 33)  # many tokens per feature
    g = torch.randn(200, 33)
    a = ops.sparse_scatter_rows(val, idx, cnt, g, 8, True)
    for _ in range(3):
        assert torch.equal(a, ops.sparse_scatter_rows(val, idx, cnt, g, 8, True))


def test_out_of_range_and_bad_inputs_rejected():
    ops = _ops()
    idx, val, cnt = _case(4, 10, 6)
    cnt[1] = max(int(cnt[1]), 1)
    idx = torch.zeros(4, max(idx.shape[1], 1), dtype=torch.int64)
    val = torch.ones(4, idx.shape[1])
    W = torch.randn(10, 6)
    bad = idx.clone()
    bad[1, 0] = 10
    with pytest.raises(RuntimeError, match=r"indices\[1, 0\]=10 outside \[0, d_sae=10\)"):
        ops.sparse_decode(bad, val, cnt, W, None)
    bad[1, 0] = -1
    with pytest.raises(RuntimeError, match="outside"):
        ops.sparse_gather_dot(torch.randn(4, 6), bad, cnt, W)
    with pytest.raises(RuntimeError, match="outside"):
        ops.sparse_scatter_rows(val, bad, cnt, torch.randn(4, 6), 10, True)
    c2 = cnt.clone()
    c2[0] = idx.shape[1] + 1
    with pytest.raises(RuntimeError, match=r"counts\[0\]"):
        ops.sparse_decode(idx, val, c2, W, None)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        ops.sparse_decode(idx.int(), val, cnt, W, None)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.sparse_decode(idx, val.half(), cnt, W, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.sparse_decode(idx, val, cnt, torch.randn(6, 10).t(), None)


@pytest.mark.parametrize("op", ["sparse_decode", "sparse_gather_dot", "sparse_scatter_rows"])
def test_opcheck(op):
    ops = _ops()
    idx, val, cnt = _case(6, 9, 5)
    W = torch.randn(9, 5, requires_grad=True)
    g = torch.randn(6, 5, requires_grad=True)
    v = val.clone().requires_grad_()
    args = {
        "sparse_decode": (idx, v, cnt, W, torch.randn(5, requires_grad=True)),
        "sparse_gather_dot": (g, idx, cnt, W),
        "sparse_scatter_rows": (v, idx, cnt, g, 9, True),
    }[op]
    torch.library.opcheck(getattr(ops, op).default, args)


def test_decode_autograd_matches_reference():
    ops = _ops()
    idx, val, cnt = _case(7, 11, 6)
    W = torch.randn(11, 6, dtype=torch.float32)
    b = torch.randn(6)
    leaves = [t.clone().requires_grad_() for t in (val, W, b)]
    ops.sparse_decode(idx, leaves[0], cnt, leaves[1], leaves[2]).pow(2).sum().backward()
    ref = [t.clone().requires_grad_() for t in (val, W, b)]
    reference.sparse_decode_raw(idx, ref[0], cnt, ref[1], ref[2]).pow(2).sum().backward()
    for a, r in zip(leaves, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


def test_compiled_sae_on_cpu_backend():
    sae = sae_fast.JumpReLUSAE(16, 40, backend="cpu")
    x = torch.randn(5, 16)
    want = sae(x)
    compiled = torch.compile(sae.decode, fullgraph=False)
    sp = sae.encode_sparse(x)
    torch.testing.assert_close(compiled(sp), want)


def _cuda_ops():
    if ext is None or not ext.has_cuda():
        pytest.fail("a GPU is present but sae_fast._C was built without CUDA kernels")
    return _ops()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,s,d", [(13, 37, 19), (64, 512, 2304), (1, 5, 3), (0, 7, 8)])
def test_cuda_primitives_match_reference(dtype, n, s, d):
    ops = _cuda_ops()
    idx, val, cnt = random_sparse_case(n, s, 3, dtype, False, (0,) if n > 1 else (), "cuda")
    W = torch.randn(s, d, device="cuda").to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype)
    g = torch.randn(n, d, device="cuda").to(dtype)
    f64 = lambda t: t.double()  # noqa: E731
    for out_dtype in (None, torch.float32):
        out = ops.sparse_decode(idx, val, cnt, W, bias, out_dtype)
        assert_close_as_dense(out, reference.sparse_decode_raw(idx, f64(val), cnt, f64(W), f64(bias)),
                              reference.sparse_decode_raw(idx, val, cnt, W, bias, out_dtype), what="cuda sparse_decode")
    for gg in (g, g.float()):
        out = ops.sparse_gather_dot(gg, idx, cnt, W)
        assert out.dtype == gg.dtype
        assert_close_as_dense(out, reference.sparse_gather_dot(f64(gg), idx, cnt, f64(W)),
                              reference.sparse_gather_dot(gg, idx, cnt, W), what="cuda sparse_gather_dot")
    det = ops.sparse_scatter_rows(val, idx, cnt, g, s, True)
    fast = ops.sparse_scatter_rows(val, idx, cnt, g, s, False)
    truth = reference.sparse_scatter_rows(f64(val), idx, cnt, f64(g), s)
    dense = reference.sparse_scatter_rows(val, idx, cnt, g, s)
    assert_close_as_dense(det, truth, dense, what="cuda scatter (deterministic)")
    assert_close_as_dense(fast, truth, dense, what="cuda scatter (atomic)")
    assert torch.equal(det, ops.sparse_scatter_rows(val, idx, cnt, g, s, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backend_training_matches_reference(dtype):
    from helpers import EXACT_BANDWIDTH, exact_pre_case

    _cuda_ops()
    x, p = exact_pre_case(33, 24, 70, dtype)
    kw = dict(l0_coefficient=0.3, bandwidth=EXACT_BANDWIDTH)
    sae = sae_fast.JumpReLUSAE(24, 70, dtype=dtype, device="cuda", backend="cuda")
    with torch.no_grad():
        for k, v in p.items():
            getattr(sae, k).copy_(v)
    out = sae.training_forward(x.cuda(), **kw)
    out.loss.backward()
    p64 = {k: v.double().requires_grad_() for k, v in p.items()}
    reference.jumprelu_sae_loss(x.double(), **p64, **kw).loss.backward()
    pd = {k: v.cuda().requires_grad_() for k, v in p.items()}
    dense = reference.jumprelu_sae_loss(x.cuda(), **pd, **kw)
    dense.loss.backward()
    assert out.l0.item() == dense.l0.item()
    for k, prm in sae.named_parameters():
        assert_close_as_dense(prm.grad.cpu(), p64[k].grad, pd[k].grad.cpu(), what=f"cuda grad {k}")
