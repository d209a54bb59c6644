"""sae_fast::jumprelu_select (the fused selection of the chunked encoder) against its
PyTorch definition, bit for bit, on fresh random inputs; and the cpu backend's encoder
built on it against the PyTorch chunked encoder. The CUDA kernels run through the
emulator in test_cuda_emu.py (and on a GPU in the gpu-marked test here)."""

import pytest
import torch

from sae_fast import select_ops
from sae_fast._ext import extension_error, load_extension
from sae_fast.sparse import compact
from sae_fast.sparse_train import chunked_pre_encoder, fused_pre_encoder

from helpers import DTYPES, EXACT_BANDWIDTH, exact_pre_case

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"sae_fast._C not built: {extension_error()}")
NAMES = ("a_idx", "a_val", "a_cnt", "n_idx", "n_cnt", "steps")


def _truth(pre, thr, hb, band, col_offset):
    """The masks of chunked_pre_encoder's PyTorch path, compacted; indices + col_offset."""
    p = pre.float()
    a_idx, a_val, a_cnt = compact(((p > thr) & (p > 0)) | torch.isnan(p), pre)
    if band:
        n_idx, _, n_cnt = compact((p - thr).abs() < torch.tensor(hb, dtype=torch.float32, device=pre.device))
    else:
        n_idx = torch.zeros(pre.shape[0], 0, dtype=torch.int64, device=pre.device)
        n_cnt = torch.zeros(pre.shape[0], dtype=torch.int32, device=pre.device)

    def shift(idx, cnt):
        valid = torch.arange(idx.shape[1], device=idx.device)[None] < cnt[:, None].long()
        return torch.where(valid, idx + col_offset, 0)

    return shift(a_idx, a_cnt), a_val, a_cnt, shift(n_idx, n_cnt), n_cnt, (p > thr).sum(1)


def _assert_same(got, want):
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.device == w.device, name
        if g.is_floating_point():  # the same bits, NaN included
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name
        else:
            assert torch.equal(g, w), name


def _case(n, c, dtype, mode, device="cpu"):
    pre = torch.randn(n, c)
    thr = 0.5 * torch.rand(c) + 0.05
    if mode == "all":
        pre = pre.abs() + 0.5
        thr = torch.full((c,), -1.0)
    elif mode == "none":
        thr = torch.full((c,), 100.0)
    elif mode == "dense":  # about half active: many nonzero flag words, long rows of entries
        thr = 0.01 * torch.rand(c)
    pre = pre.to(dtype)
    if mode == "edges" and n and c:
        hb = 0.125
        k = min(c, 8)
        # row 0: exactly at the threshold (not active, not a step, in the band), at the band's
        # edges (|pre - thr| == hb: outside), just inside them, NaN, +-inf, 0 and -0
        vals = torch.tensor([0.25, 0.25 + hb, 0.25 - hb, float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
        pre[0, :k] = vals[:k].to(dtype)
        thr[:k] = 0.25
        # row n-1: thresholds tied to pre's own values (exact in float32 for every dtype)
        thr[-k:] = pre[-1, -k:].float()
        if n > 2:
            pre[1, c // 2] = float("nan")  # a NaN mid-row
            row = pre[2].float()
            inside = torch.nextafter(row + hb, row)  # thresholds just inside the band's upper edge
            thr[k: c - k] = inside[k: c - k]
    return pre.to(device), thr.to(device)


SHAPES = [(13, 301), (1, 300), (0, 7), (5, 0), (3, 1), (9, 8), (7, 256 * 3 + 13), (2, 4100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("mode", ["mixed", "all", "none", "dense", "edges"])
@pytest.mark.parametrize("band", [True, False])
def test_matches_reference(dtype, n, c, mode, band):
    pre, thr = _case(n, c, dtype, mode)
    hb, off = 0.125, 1000
    got = select_ops.jumprelu_select(pre, thr, hb, band=band, col_offset=off)
    _assert_same(got, _truth(pre, thr, hb, band, off))
    if mode == "all" and n and c:
        assert int(got[2].min()) == c and got[0].shape == (n, c)
    if mode == "none":
        assert got[0].shape == (n, 0) and not got[2].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hb", [0.0, 1e-3, 0.3, float("inf")])
@pytest.mark.parametrize("off", [0, 7, 2**40])
def test_half_bandwidths_and_offsets(dtype, hb, off):
    # hb = 0: an empty band; inf: every non-NaN entry; 2^40: ids past int32 (chunks of a wide SAE)
    pre, thr = _case(11, 517, dtype, "edges")
    got = select_ops.jumprelu_select(pre, thr, hb, col_offset=off)
    _assert_same(got, _truth(pre, thr, hb, True, off))
    if hb == 0.0:
        assert got[3].shape == (11, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_precision_value(dtype):
    # all 2^16 bit patterns (subnormals, +-0, +-inf, NaNs) against thresholds among them:
    # the kernel's own float32 conversion must compare exactly as PyTorch's does
    pre = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    vals = pre.float().flatten()
    vals = vals[torch.isfinite(vals)]
    for thr in (torch.zeros(256), vals[torch.randint(0, vals.numel(), (256,))],
                vals[torch.randint(0, vals.numel(), (256,))].abs() * 1e-3):
        for hb in (0.0, 2.0**-20, 0.5):
            for rows in (pre, pre.t().contiguous()):
                got = select_ops.jumprelu_select(rows, thr, hb, col_offset=3)
                _assert_same(got, _truth(rows, thr, hb, True, 3))


def test_many_threads_and_long_rows():
    # enough work for every thread's part, rows of unequal counts, widely varying capacity
    pre, thr = _case(301, 2053, torch.bfloat16, "mixed")
    pre[17] = 5.0  # one row all active: the capacity is the whole row
    pre[18] = float("nan")
    got = select_ops.jumprelu_select(pre, thr, 0.01)
    _assert_same(got, _truth(pre, thr, 0.01, True, 0))
    assert got[0].shape == (301, 2053)


def test_errors_name_the_argument():
    op = select_ops.jumprelu_select
    pre, thr = torch.randn(4, 6), torch.rand(6)
    cases = [
        (lambda: op(pre[0], thr, 0.1), "pre must be 2-D"),
        (lambda: op(pre.double(), thr, 0.1), "pre must be float32, bfloat16 or float16"),
        (lambda: op(pre.long(), thr, 0.1), "pre must be float32, bfloat16 or float16"),
        (lambda: op(torch.randn(6, 4).t(), thr, 0.1), "pre must be contiguous"),
        (lambda: op(pre, thr.bfloat16(), 0.1), "threshold must be float32"),
        (lambda: op(pre, thr[:5], 0.1), r"threshold must be \[n_features\]=\[6\]"),
        (lambda: op(pre, thr[None], 0.1), r"threshold must be \[n_features\]"),
        (lambda: op(pre, torch.rand(12)[::2], 0.1), "threshold must be contiguous"),
        (lambda: op(pre, thr, -0.1), "half_bandwidth must be >= 0"),
        (lambda: op(pre, thr, float("nan")), "half_bandwidth must be >= 0"),
        (lambda: op(pre, thr, 0.1, col_offset=-1), "col_offset must be >= 0"),
        (lambda: op(pre, thr, 0.1, col_offset=2**63 - 3), "col_offset must be >= 0 and col_offset \\+ n_features"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


def test_fake_impl_has_dynamic_capacities():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    select_ops.jumprelu_select(torch.randn(2, 3), torch.rand(3), 0.1)  # registers the fake impl
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        pre = mode.from_tensor(torch.randn(5, 9, dtype=torch.bfloat16))
        thr = mode.from_tensor(torch.rand(9))
        a_idx, a_val, a_cnt, n_idx, n_cnt, steps = torch.ops.sae_fast.jumprelu_select(pre, thr, 0.1, True, 0)
        assert a_idx.shape[0] == 5 and a_idx.dtype == torch.int64 and a_val.dtype == torch.bfloat16
        assert str(a_val.shape[1]) == str(a_idx.shape[1]) and a_cnt.dtype == n_cnt.dtype == torch.int32
        assert n_idx.dtype == steps.dtype == torch.int64 and steps.shape == (5,)
        _, _, _, n_idx, _, _ = torch.ops.sae_fast.jumprelu_select(pre, thr, 0.1, False, 0)
        assert n_idx.shape == (5, 0)


# --------------------------------------------------- the cpu backend's encoder
def test_available_where_built():
    assert select_ops.available("cpu")
    assert select_ops.available("cuda") == bool(ext.has_cuda())
    assert not select_ops.available("meta")


def test_cpu_backend_uses_the_fused_encoder(monkeypatch):
    from sae_fast import backends

    calls = []
    real = select_ops.jumprelu_select

    def spy(pre, *a, **k):
        calls.append((tuple(pre.shape), k["col_offset"]))
        return real(pre, *a, **k)

    monkeypatch.setattr(select_ops, "jumprelu_select", spy)
    x, p = exact_pre_case(6, 11, 40, torch.float32)
    impl = backends.get("cpu")
    sp = impl.encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"], p["b_dec"], False, None)
    assert calls == [((6, 40), 0)]
    want = chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.0, band=False)
    assert torch.equal(sp.indices, want.a_idx) and torch.equal(sp.counts, want.a_cnt)
    calls.clear()
    fused_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.01, chunk_features=16)
    assert calls == [((6, 16), 0), ((6, 16), 16), ((6, 8), 32)]
    calls.clear()
    chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.01)  # the torch backend's: plain PyTorch
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,mode", [(13, "mixed"), (13, "all"), (13, "none"), (1, "mixed"), (0, "mixed")])
@pytest.mark.parametrize("chunk", [1, 7, 128, None])
@pytest.mark.parametrize("band", [True, False])
def test_fused_encoder_equals_pytorch_encoder(dtype, n, mode, chunk, band):
    x, p = exact_pre_case(n, 11, 301, dtype, mode)
    if n > 2:
        x[2, 0] = float("nan")  # a NaN pre row: every feature of token 2 is active, in every chunk
    args = (x, p["W_enc"], p["b_enc"], p["threshold"], EXACT_BANDWIDTH / 2)
    want = chunked_pre_encoder(*args, band=band, chunk_features=chunk)
    got = fused_pre_encoder(*args, band=band, chunk_features=chunk)
    _assert_same((got.a_idx, got.a_val, got.a_cnt, got.n_idx, got.n_cnt),
                 (want.a_idx, want.a_val, want.a_cnt, want.n_idx, want.n_cnt))
    assert got.step_sum.dtype == torch.float32 and got.step_sum.item() == want.step_sum.item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_encoder_on_random_pre(dtype):
    # ordinary random weights (pre not exact): both paths form pre with the same ops
    n, d, s = 37, 24, 700
    x = torch.randn(n, d).to(dtype)
    W = (torch.randn(d, s) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(s)).to(dtype)
    thr = 0.3 * torch.rand(s)
    for chunk in (128, 300, None):
        want = chunked_pre_encoder(x, W, b, thr, 0.05, chunk_features=chunk)
        got = fused_pre_encoder(x, W, b, thr, 0.05, chunk_features=chunk)
        _assert_same((got.a_idx, got.a_val, got.a_cnt, got.n_idx, got.n_cnt),
                     (want.a_idx, want.a_val, want.a_cnt, want.n_idx, want.n_cnt))
        assert got.step_sum.item() == want.step_sum.item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(13, 301), (1, 70000), (0, 5), (3000, 129), (9, 4100)])
def test_cuda_matches_reference(dtype, n, c):
    if not select_ops.available("cuda"):
        pytest.skip("sae_fast._C has no CUDA kernels")
    for mode in ("mixed", "all", "none", "edges"):
        pre, thr = _case(n, c, dtype, mode, device="cuda")
        for band in (True, False):
            got = select_ops.jumprelu_select(pre, thr, 0.125, band=band, col_offset=2**33)
            _assert_same(got, _truth(pre, thr, 0.125, band, 2**33))
