"""jumprelu_select, the fused selection of the chunked encoder, and the training encoders.

sae_fast::jumprelu_select (helpers.Impl.select: the C++ op on CPU and CUDA tensors, the
CUDA kernels on the emulator) against its PyTorch definition, bit for bit, on fresh
random inputs. Then every implementation's training encoder (Backend.encoder: active set,
band and step count in one pass) against the float64 truth on exact-pre inputs, and the
chunked encoders (every backend's but Triton's, which never forms pre) against one
unchunked pass and against the PyTorch chunked encoder. The emulator-specific checks of
the selection kernels (both thread orders, forced row plans, capped grids) are in
test_cuda_emu.py.
"""

import pytest
import torch

from sae_fast import reference
from sae_fast._ext import extension_error, load_extension
from sae_fast.backends import cpp as select_ops
from sae_fast.sparse import SparseActs, compact
from sae_fast.step import chunked_pre_encoder, encode_chunk_features

from helpers import DTYPES, EXACT_BANDWIDTH, dtype_id, exact_pre_case, impl_cases, impls, nan_filled_outputs

ext = load_extension()
needs_ext = pytest.mark.skipif(ext is None, reason=f"sae_fast._C not built: {extension_error()}")
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
        thr = torch.full((c, ), -1.0)
    elif mode == "none":
        thr = torch.full((c, ), 100.0)
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
            thr[k:c - k] = inside[k:c - k]
    return pre.to(device), thr.to(device)


# (tokens, features): odd sizes, one token, zero tokens, zero features, a feature per row,
# a row of 256 * 3 + 13, rows past 4096; on CUDA (from its own test) 70000 features of one
# token and 3000 tokens
SHAPES = [(13, 301), (1, 300), (0, 7), (5, 0), (3, 1), (9, 8), (7, 256 * 3 + 13), (2, 4100), (1, 70000), (3000, 129),
          (9, 4100)]
# the emulator: the same categories without the last three (3000 tokens take 2 s a call there)
FEW_SHAPES = SHAPES[:8]
MODES = ["mixed", "all", "none", "dense", "edges"]
SELECT = dict(where=lambda i: i.select is not None, slow=lambda i: i.name == "cuda-emu")


# ------------------------------------------------------------ the selection op
@pytest.mark.parametrize("band", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,c", impl_cases(SHAPES, FEW_SHAPES, **SELECT))
def test_matches_reference(impl, n, c, dtype, mode, band):
    pre, thr = _case(n, c, dtype, mode, impl.device)
    hb, off = 0.125, 1000
    with nan_filled_outputs():
        got = impl.select(pre, thr, hb, band=band, col_offset=off)
    _assert_same(got, _truth(pre, thr, hb, band, off))
    if mode == "all" and n and c:
        assert int(got[2].min()) == c and got[0].shape == (n, c)
    if mode == "none":
        assert got[0].shape == (n, 0) and not got[2].any()


@pytest.mark.parametrize("off", [0, 7, 2**40])
@pytest.mark.parametrize("hb", [0.0, 1e-3, 0.3, float("inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls(where=SELECT["where"]))
def test_half_bandwidths_and_offsets(impl, dtype, hb, off):
    # hb = 0: an empty band; inf: every non-NaN entry; 2^40: ids past int32 (chunks of a wide SAE)
    pre, thr = _case(11, 517, dtype, "edges", impl.device)
    got = impl.select(pre, thr, hb, col_offset=off)
    _assert_same(got, _truth(pre, thr, hb, True, off))
    if hb == 0.0:
        assert got[3].shape == (11, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("impl", impls(where=SELECT["where"]))
def test_every_half_precision_value(impl, dtype):
    # all 2^16 bit patterns (subnormals, +-0, +-inf, NaNs) against thresholds among them:
    # the kernel's own float32 conversion must compare exactly as PyTorch's does
    pre = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    vals = pre.float().flatten()
    vals = vals[torch.isfinite(vals)]
    for thr in (torch.zeros(256), vals[torch.randint(0, vals.numel(),
                                                     (256, ))], vals[torch.randint(0, vals.numel(),
                                                                                   (256, ))].abs() * 1e-3):
        for hb in (0.0, 2.0**-20, 0.5):
            for rows in (pre, pre.t().contiguous()):
                rows, t = impl.to(rows, thr)
                got = impl.select(rows, t, hb, col_offset=3)
                _assert_same(got, _truth(rows, t, hb, True, 3))


@pytest.mark.parametrize("impl", impls(where=SELECT["where"]))
def test_many_threads_and_long_rows(impl):
    # enough work for every thread's part, rows of unequal counts, widely varying capacity
    pre, thr = _case(301, 2053, torch.bfloat16, "mixed")
    pre[17] = 5.0  # one row all active: the capacity is the whole row
    pre[18] = float("nan")
    pre, thr = impl.to(pre, thr)
    got = impl.select(pre, thr, 0.01)
    _assert_same(got, _truth(pre, thr, 0.01, True, 0))
    assert got[0].shape == (301, 2053)


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_errors_name_the_argument(impl):
    op = impl.select
    pre, thr = impl.to(torch.randn(4, 6), torch.rand(6))
    dev = impl.device
    cases = [(lambda: op(pre[0], thr, 0.1), "pre must be 2-D"),
             (lambda: op(pre.double(), thr, 0.1), "pre must be float32, bfloat16 or float16"),
             (lambda: op(pre.long(), thr, 0.1), "pre must be float32, bfloat16 or float16"),
             (lambda: op(torch.randn(6, 4, device=dev).t(), thr, 0.1), "pre must be contiguous"),
             (lambda: op(pre, thr.bfloat16(), 0.1), "threshold must be float32"),
             (lambda: op(pre, thr[:5], 0.1), r"threshold must be \[n_features\]=\[6\]"),
             (lambda: op(pre, thr[None], 0.1), r"threshold must be \[n_features\]"),
             (lambda: op(pre,
                         torch.rand(12, device=dev)[::2], 0.1), "threshold must be contiguous"),
             (lambda: op(pre, thr, -0.1), "half_bandwidth must be >= 0"),
             (lambda: op(pre, thr, float("nan")), "half_bandwidth must be >= 0"),
             (lambda: op(pre, thr, 0.1, col_offset=-1), "col_offset must be >= 0"),
             (lambda: op(pre, thr, 0.1, col_offset=2**63 - 3), "col_offset must be >= 0 and col_offset \\+ n_features")]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_opcheck_select(impl):
    pre, thr = _case(6, 30, torch.float32, "mixed", impl.device)
    # data-dependent capacities: the fake impl returns unbacked sizes
    torch.library.opcheck(impl.ops.jumprelu_select.default, (pre, thr, 0.125, True, 0))


@needs_ext
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
        assert n_idx.dtype == steps.dtype == torch.int64 and steps.shape == (5, )
        _, _, _, n_idx, _, _ = torch.ops.sae_fast.jumprelu_select(pre, thr, 0.1, False, 0)
        assert n_idx.shape == (5, 0)


@needs_ext
def test_available_where_built():
    assert select_ops.select_available("cpu")
    assert select_ops.select_available("cuda") == bool(ext.has_cuda())
    assert not select_ops.select_available("meta")


# ---------------------------------------------------------- the training encoder
@pytest.mark.parametrize("mode", ["mixed", "all", "none"])
@pytest.mark.parametrize("n,d_in,d_sae", [(9, 19, 70), (1, 5, 33), (0, 7, 20)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls())
def test_encoder_sets_match_truth(impl, dtype, n, d_in, d_sae, mode):
    # active set, band and step count of every implementation's encoder against float64 pre
    # (exact on these inputs); compared as sets, whatever the order of a row's slots
    x, p = exact_pre_case(n, d_in, d_sae, dtype, mode)
    args = impl.to(x, p["W_enc"], p["b_enc"], p["threshold"])
    with nan_filled_outputs():
        sets = impl.backend.encoder(*args, EXACT_BANDWIDTH / 2, band=True)
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    sp = SparseActs(sets.a_idx, sets.a_val, sets.a_cnt, d_sae).validate()
    assert torch.equal(sp.to_dense().cpu(), want)
    pre = x.double() @ p["W_enc"].double() + p["b_enc"].double()
    band = (pre - p["threshold"].double()).abs() < EXACT_BANDWIDTH / 2
    n_valid = (torch.arange(sets.band_idx.shape[1], device=impl.device)[None, :] < sets.band_cnt[:, None]).float()
    nb = SparseActs(sets.band_idx, n_valid, sets.band_cnt, d_sae).validate()
    assert torch.equal(nb.to_dense().bool().cpu(), band)
    steps = (pre > p["threshold"].double()).sum(1)
    assert sets.step_sum.dtype == torch.float32 and sets.step_sum.item() == steps.sum().item()
    if impl.name == "triton":  # its op also returns the per-row step counts
        *_, step_cnt = impl.ops.jumprelu_encode_sets(*args, EXACT_BANDWIDTH / 2, True)
        assert torch.equal(step_cnt.long().cpu(), steps)


@pytest.mark.parametrize("impl", impls())
def test_band_off_for_inference(impl):
    x, p = exact_pre_case(9, 11, 301, torch.float32)
    chunk = {} if impl.name == "triton" else dict(chunk_features=50)  # Triton never forms pre
    sets = impl.backend.encoder(*impl.to(x, p["W_enc"], p["b_enc"], p["threshold"]), 0.0, band=False, **chunk)
    assert sets.band_idx.shape == (9, 0) and not sets.band_cnt.any()
    assert torch.equal(sets.a_cnt.cpu(), _chunk_truth(x, p, 0.0)[2])


@pytest.mark.parametrize("impl", impls("triton"))
def test_opcheck_encode_sets(impl):
    x, p = exact_pre_case(6, 9, 30, torch.float32)
    # data-dependent capacity: the fake impl returns unbacked sizes
    torch.library.opcheck(impl.ops.jumprelu_encode_sets.default,
                          (*impl.to(x, p["W_enc"], p["b_enc"], p["threshold"]), 0.125, True))


# ------------------------------------------------------------ chunked encoders
D_IN, D_SAE = 11, 301
CHUNKS = [1, 7, 128, None]
# the emulator: chunks of 1 and 7 features launch its selection 301 and 43 times a call (2.5 s);
# chunks of 128 still split the features into unequal chunks, the C=1 and C=7 selections are above
EMU_CHUNKS = [128, None]
ENCODER_CASES = [(13, "mixed"), (13, "all"), (13, "none"), (1, "mixed"), (0, "mixed")]
# every encoder that forms pre a chunk at a time (Triton's never forms pre)
CHUNKED = dict(where=lambda i: i.name != "triton", slow=lambda i: i.name == "cuda-emu")


def _chunk_truth(x, p, half_bw):
    pre = reference.jumprelu_pre(x, p["W_enc"], p["b_enc"])
    pre32, thr = pre.float(), p["threshold"]
    a_idx, a_val, a_cnt = compact(((pre32 > thr) & (pre32 > 0)) | torch.isnan(pre32), pre)
    n_idx, _, n_cnt = compact((pre32 - thr).abs() < half_bw)
    return a_idx, a_val, a_cnt, n_idx, n_cnt, (pre32 > thr).sum()


@pytest.mark.parametrize("n,mode", ENCODER_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,chunk", impl_cases(CHUNKS, EMU_CHUNKS, **CHUNKED))
def test_chunks_give_the_unchunked_sets(impl, chunk, dtype, n, mode):
    x, p = exact_pre_case(n, D_IN, D_SAE, dtype, mode)
    if n > 2:
        x[2, 0] = float("nan")  # a NaN pre row: every feature of token 2 is active, in every chunk
    args = impl.to(x, p["W_enc"], p["b_enc"], p["threshold"])
    sets = impl.backend.encoder(*args, EXACT_BANDWIDTH / 2, chunk_features=chunk)
    a_idx, a_val, a_cnt, n_idx, n_cnt, steps = _chunk_truth(x, p, EXACT_BANDWIDTH / 2)
    assert torch.equal(sets.a_cnt.cpu(), a_cnt) and torch.equal(sets.band_cnt.cpu(), n_cnt)
    assert torch.equal(sets.a_idx.cpu(), a_idx) and torch.equal(sets.band_idx.cpu(), n_idx)
    assert torch.equal(sets.a_val.isnan().cpu(), a_val.isnan())
    assert torch.equal(sets.a_val.nan_to_num().cpu(), a_val.nan_to_num())
    assert sets.step_sum.item() == steps.item()
    if mode == "all" and n:
        assert int(sets.a_cnt.min()) == D_SAE


@pytest.mark.parametrize("band", [True, False])
@pytest.mark.parametrize("n,mode", ENCODER_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,chunk", impl_cases(CHUNKS, EMU_CHUNKS, **SELECT))
def test_fused_encoder_equals_pytorch_encoder(impl, chunk, dtype, n, mode, band):
    x, p = exact_pre_case(n, D_IN, D_SAE, dtype, mode)
    if n > 2:
        x[2, 0] = float("nan")  # a NaN pre row: every feature of token 2 is active, in every chunk
    args = impl.to(x, p["W_enc"], p["b_enc"], p["threshold"]) + (EXACT_BANDWIDTH / 2, )
    want = chunked_pre_encoder(*args, band=band, chunk_features=chunk)
    got = impl.backend.encoder(*args, band=band, chunk_features=chunk)
    _assert_same((got.a_idx, got.a_val, got.a_cnt, got.band_idx, got.band_cnt),
                 (want.a_idx, want.a_val, want.a_cnt, want.band_idx, want.band_cnt))
    assert got.step_sum.dtype == torch.float32 and got.step_sum.item() == want.step_sum.item()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls(where=SELECT["where"]))
def test_fused_encoder_on_random_pre(impl, dtype):
    # ordinary random weights (pre not exact): both paths form pre with the same ops
    n, d, s = 37, 24, 700
    x = torch.randn(n, d).to(dtype)
    W = (torch.randn(d, s) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(s)).to(dtype)
    args = impl.to(x, W, b, 0.3 * torch.rand(s))
    for chunk in (128, 300, None):
        want = chunked_pre_encoder(*args, 0.05, chunk_features=chunk)
        got = impl.backend.encoder(*args, 0.05, chunk_features=chunk)
        _assert_same((got.a_idx, got.a_val, got.a_cnt, got.band_idx, got.band_cnt),
                     (want.a_idx, want.a_val, want.a_cnt, want.band_idx, want.band_cnt))
        assert got.step_sum.item() == want.step_sum.item()


@pytest.mark.parametrize("impl", impls("cpu"))
def test_cpu_backend_uses_the_fused_encoder(impl, monkeypatch):
    calls = []
    real = select_ops.jumprelu_select

    def spy(pre, *a, **k):
        calls.append((tuple(pre.shape), k["col_offset"]))
        return real(pre, *a, **k)

    monkeypatch.setattr(select_ops, "jumprelu_select", spy)
    x, p = exact_pre_case(6, 11, 40, torch.float32)
    indices, _, counts = impl.backend.encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert calls == [((6, 40), 0)]
    want = chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.0, band=False)
    assert torch.equal(indices, want.a_idx) and torch.equal(counts, want.a_cnt)
    calls.clear()
    impl.backend.encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.01, chunk_features=16)
    assert calls == [((6, 16), 0), ((6, 16), 16), ((6, 8), 32)]
    calls.clear()
    chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.01)  # the torch backend's: plain PyTorch
    assert calls == []


def test_chunk_size_bounds_the_workspace():
    for n, s, dtype, ws in ((4096, 2**20, torch.bfloat16, 1 << 30), (4096, 2**20, torch.float32, 1 << 28),
                            (7, 300, torch.float32, 1 << 30), (4096, 2**20, torch.float32, 1)):
        c = encode_chunk_features(n, s, dtype, ws)
        per = n * (torch.finfo(dtype).bits // 8 + 11)
        assert c == s or (c % 128 == 0 and (c * per <= ws or c == 128)), (n, s, dtype, ws, c)
    assert encode_chunk_features(4096, 2**20, torch.bfloat16, 1 << 30) == 20096  # 53 chunks at 2^20
    with pytest.raises(ValueError, match="workspace_bytes must be positive"):
        encode_chunk_features(4, 4, torch.float32, 0)
