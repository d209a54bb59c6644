"""Triton kernels against the reference (CPU through TRITON_INTERPRET=1 in CI; the GPU when present).

Outputs are poisoned with NaN before the kernels run, so an unwritten element fails.
"""

import pytest
import torch

import sae_fast
from sae_fast import reference, triton_kernels as tk

from helpers import DTYPES, EXACT_BANDWIDTH, assert_close_as_dense, exact_pre_case, random_sparse_case

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# odd sizes, not multiples of any block; one token; zero tokens
SHAPES = [(9, 19, 70), (1, 5, 33), (0, 7, 20)]


def _case(n, d_in, d_sae, dtype, mode="mixed"):
    x, p = exact_pre_case(n, d_in, d_sae, dtype, mode)
    return x.to(DEV), {k: v.to(DEV) for k, v in p.items()}


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
@pytest.mark.parametrize("mode", ["mixed", "all", "none"])
def test_jumprelu_encode(dtype, n, d_in, d_sae, mode):
    x, p = _case(n, d_in, d_sae, dtype, mode)
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    # dense output: poisoned buffer, every element written
    dense = tk._launch_encode(x, p["W_enc"], p["b_enc"], p["threshold"], dense=True, out=_nan((n, d_sae), dtype))
    assert torch.equal(dense, want)  # pre is exact on these inputs: bit-identical
    # sparse output, poisoned: capacity large enough for one pass
    cap = d_sae
    out = {"a_idx": torch.full((n, cap), -7, dtype=torch.int64, device=DEV), "a_val": _nan((n, cap), dtype),
           "n_idx": torch.full((n, cap), -7, dtype=torch.int64, device=DEV)}
    a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt = tk.jumprelu_encode_sets(
        x, p["W_enc"], p["b_enc"], p["threshold"], band=True, half_bw=EXACT_BANDWIDTH / 2, capacity=(cap, cap), out=out
    )
    sp = sae_fast.SparseActs(a_idx, a_val, a_cnt, d_sae).validate()
    assert torch.equal(sp.to_dense(), want)
    pre = x.double() @ p["W_enc"].double() + p["b_enc"].double()
    band = (pre - p["threshold"].double()).abs() < EXACT_BANDWIDTH / 2
    n_valid = (torch.arange(n_idx.shape[1], device=DEV)[None, :] < n_cnt[:, None]).float()
    nb = sae_fast.SparseActs(n_idx, n_valid, n_cnt, d_sae).validate()
    assert torch.equal(nb.to_dense().bool(), band)
    assert torch.equal(h_cnt.long(), (pre > p["threshold"].double()).sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_overflow_grows_capacity(dtype):
    # every one of 150 features active: more than the default capacity of 64
    x, p = _case(5, 11, 150, dtype, "all")
    tk._CAP_HINT.clear()
    sp = sae_fast.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"], backend="triton")
    assert sp.counts.tolist() == [150] * 5
    assert torch.equal(sp.to_dense(), reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"]))


def test_encode_sparse_nan_propagates():
    x, p = _case(3, 8, 20, torch.float32)
    x[1, 0] = float("nan")
    sp = sae_fast.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"], backend="triton")
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(torch.isnan(sp.to_dense()), torch.isnan(want))
    assert sp.counts[1] == 20


def test_deterministic_mode_sorts_rows():
    x, p = _case(6, 9, 90, torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        sp = sae_fast.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"], backend="triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    s = sp.sorted()
    assert torch.equal(sp.indices, s.indices) and torch.equal(sp.values, s.values)


def _sparse_case(n, s, d, dtype, all_active=False):
    return random_sparse_case(n, s, 2, dtype, all_active, (0,) if n > 1 else (), DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,s,d", [(7, 23, 37), (1, 5, 3), (0, 6, 4), (4, 40, 300)])
@pytest.mark.parametrize("all_active", [False, True])
def test_sparse_primitives(dtype, n, s, d, all_active):
    idx, val, cnt = _sparse_case(n, s, d, dtype, all_active)
    W = torch.randn(s, d, device=DEV).to(dtype)
    bias = torch.randn(d, device=DEV).to(dtype)
    g = torch.randn(n, d, device=DEV).to(dtype)
    f64 = lambda t: t.double()  # noqa: E731
    out = tk.sparse_decode(idx, val, cnt, W, bias, out=_nan((n, d), dtype))
    assert_close_as_dense(out, reference.sparse_decode_raw(idx, f64(val), cnt, f64(W), f64(bias)),
                          reference.sparse_decode_raw(idx, val, cnt, W, bias), what="sparse_decode")
    out = tk.sparse_gather_dot(g, idx, cnt, W, out=_nan(tuple(idx.shape), dtype))
    assert_close_as_dense(out, reference.sparse_gather_dot(f64(g), idx, cnt, f64(W)),
                          reference.sparse_gather_dot(g, idx, cnt, W), what="sparse_gather_dot")
    out = tk.sparse_scatter_rows(val, idx, cnt, g, s, out=_nan((s, d), dtype))
    assert_close_as_dense(out, reference.sparse_scatter_rows(f64(val), idx, cnt, f64(g), s),
                          reference.sparse_scatter_rows(val, idx, cnt, g, s), what="sparse_scatter_rows")


def _sae(d_in, d_sae, dtype, p, backend, apply_b_dec=False):
    sae = sae_fast.JumpReLUSAE(d_in, d_sae, dtype=dtype, device=DEV, backend=backend, apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        for k, v in p.items():
            getattr(sae, k).copy_(v)
    return sae


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [13, 1, 0])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_training_forward_matches_reference(dtype, n, apply_b_dec):
    d_in, d_sae = 17, 45
    x, p = _case(n, d_in, d_sae, dtype)
    if apply_b_dec:
        p["b_dec"] = torch.zeros_like(p["b_dec"])  # keeps x - b_dec on the exact grid
    kw = dict(l0_coefficient=0.3, bandwidth=EXACT_BANDWIDTH)

    def run(params, xin, backend):
        xin = xin.clone().requires_grad_()
        if backend == "truth":
            ps = {k: v.clone().requires_grad_() for k, v in params.items()}
            out = reference.jumprelu_sae_loss(xin, **ps, apply_b_dec_to_input=apply_b_dec, **kw)
            out.loss.backward()
            return out, {k: v.grad for k, v in ps.items()}, xin.grad
        sae = _sae(d_in, d_sae, params["W_enc"].dtype, params, backend, apply_b_dec)
        out = sae.training_forward(xin, **kw)
        out.loss.backward()
        return out, {k: v.grad for k, v in sae.named_parameters()}, xin.grad

    got, gg, gx = run(p, x, "triton")
    truth, tg, tx = run({k: v.double() for k, v in p.items()}, x.double(), "truth")
    dense, dg, dx = run(p, x, "torch")
    assert got.l0.item() == truth.l0.item() and got.l0_loss.item() == pytest.approx(truth.l0_loss.item())
    assert torch.equal(got.fired.cpu(), truth.fired.cpu())
    assert_close_as_dense(got.reconstruction, truth.reconstruction, dense.reconstruction, what="reconstruction")
    assert_close_as_dense(got.mse_loss, truth.mse_loss, dense.mse_loss, what="mse", ulp_dtype=dtype)
    for k in gg:
        assert gg[k].dtype == dg[k].dtype, k
        assert_close_as_dense(gg[k], tg[k], dg[k], what=f"grad {k}")
    assert_close_as_dense(gx, tx, dx, what="grad x")
    if n > 1:
        assert gg["threshold"].abs().sum() > 0  # the band is exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_paths_on_triton(dtype):
    x, p = _case(11, 13, 37, dtype)
    sae = _sae(13, 37, dtype, p, "triton")
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(sae.encode(x), want)
    assert torch.equal(sae.encode_sparse(x).to_dense(), want)
    truth = want.double() @ p["W_dec"].double() + p["b_dec"].double()
    with torch.no_grad():
        assert_close_as_dense(sae(x), truth, want @ p["W_dec"] + p["b_dec"], what="forward")


def test_opcheck_triton_ops():
    x, p = _case(6, 9, 30, torch.float32)
    ops = torch.ops.sae_fast_triton
    torch.library.opcheck(ops.jumprelu_encode.default, (x, p["W_enc"], p["b_enc"], p["threshold"]))
    # data-dependent capacity: the fake impl returns unbacked sizes
    torch.library.opcheck(ops.jumprelu_encode_sparse.default, (x, p["W_enc"], p["b_enc"], p["threshold"], 0.125, True))
    idx, val, cnt = _sparse_case(6, 12, 5, torch.float32)
    W = torch.randn(12, 5, device=DEV, requires_grad=True)
    g = torch.randn(6, 5, device=DEV, requires_grad=True)
    v = val.clone().requires_grad_()
    torch.library.opcheck(ops.sparse_decode.default, (idx, v, cnt, W, torch.randn(5, device=DEV, requires_grad=True)))
    torch.library.opcheck(ops.sparse_gather_dot.default, (g, idx, cnt, W))
    torch.library.opcheck(ops.sparse_scatter_rows.default, (v, idx, cnt, g, 12, True))


def test_torch_compile_sae():
    x, p = _case(8, 12, 40, torch.float32)
    sae = _sae(12, 40, torch.float32, p, "triton")
    compiled = torch.compile(sae)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), sae(x))
    loss = torch.compile(lambda t: sae.training_forward(t, l0_coefficient=0.1, bandwidth=EXACT_BANDWIDTH).loss)(x)
    loss.backward()
    ref = sae.training_forward(x, l0_coefficient=0.1, bandwidth=EXACT_BANDWIDTH).loss
    torch.testing.assert_close(loss, ref)
    assert sae.threshold.grad is not None and sae.W_enc.grad is not None


def test_forward_with_autograd_keeps_every_gradient():
    # The fused encoder has no autograd of its own: under grad the module must
    # run a path that gives W_enc and b_enc their gradients, never drop them.
    x, p = _case(7, 10, 30, torch.float32)
    sae = _sae(10, 30, torch.float32, p, "triton")
    sae(x).pow(2).sum().backward()
    ref = _sae(10, 30, torch.float32, p, "torch")
    ref(x).pow(2).sum().backward()
    for (n, a), b in zip(sae.named_parameters(), ref.parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), n
        else:
            torch.testing.assert_close(a.grad, b.grad, msg=n)
    assert sae.W_enc.grad.abs().sum() > 0
