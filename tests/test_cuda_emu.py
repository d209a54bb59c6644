"""Every CUDA kernel of kernels/, executed on the CPU by the emulator of
tests/cuda_emu (g++, ASan + UBSan), against the reference on fresh random cases,
with threads and blocks run in forward and in reversed order.

A sanitizer report, an emulator abort (divergent barrier, bad shuffle mask,
deadlock) or a launch error fails the test. Every kernel is deterministic: it must
give the same bits in both orders. The planted kernels show the emulator catches
what it claims to. Run them all with `pytest -m cuda_emu`.
"""

from __future__ import annotations

import pytest
import torch

from sae_fast import reference
from sae_fast.sparse import segment_by_feature

from cuda_emu import harness
from cuda_emu import ops as emu
from helpers import DTYPES, adam_case, assert_close_as_dense, check_adam_rows, random_sparse_case

_why = harness.available()
pytestmark = [pytest.mark.cuda_emu, pytest.mark.skipif(_why is not None, reason=f"CUDA emulator: {_why}")]

ORDERS = ("forward", "reverse")
# odd sizes, one token, zero tokens; D = 130 is a multiple of no vector width
# except 2 (scalar path for fp32), 64 vectorises every dtype
SHAPES = [(1, 5, 3), (0, 7, 5), (13, 37, 130), (9, 20, 64)]
MODES = ["random", "all_active", "none_active", "padded"]


def _case(n, s, d, dtype, mode):
    empty = range(n) if mode == "none_active" else (0, ) if n > 1 else ()
    idx, val, cnt = random_sparse_case(n, s, cap_extra=3 if mode in ("padded", "none_active") else 0, dtype=dtype,
                                       all_active=mode == "all_active", empty_rows=empty)
    return idx, val, cnt, torch.randn(s, d).to(dtype), torch.randn(d).to(dtype), torch.randn(n, d).to(dtype)


def sparse_cases(test):
    """Every dtype x shape x mode: the random cases of the primitives' tests."""
    for name, values in (("mode", MODES), ("n,s,d", SHAPES), ("dtype", DTYPES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _both_orders(fn):
    a, b = (fn(order=o) for o in ORDERS)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "result depends on thread/block order"
    return a, b


def test_driver_builds():
    assert harness.build()


# ------------------------------------------------------------------ decode
@sparse_cases
@pytest.mark.parametrize("out32", [False, True], ids=["out_w", "out_f32"])
def test_sparse_decode(dtype, n, s, d, mode, out32):
    idx, val, cnt, W, bias, _ = _case(n, s, d, dtype, mode)
    ot = torch.float32 if out32 else None
    outs = _both_orders(lambda order: emu.sparse_decode(idx, val, cnt, W, bias, ot, order=order))
    truth = reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), bias.double())
    dense = reference.sparse_decode_raw(idx, val, cnt, W, bias, ot)
    for out in outs:
        assert out.dtype == (ot or dtype)
        # float32 accumulation over a row's slots, bias first: one rounding per slot
        assert_close_as_dense(out, truth, dense, what="sparse_decode", ulp_dtype=dtype, roundings=idx.shape[1] + 1)


# -------------------------------------------------------------- gather-dot
@sparse_cases
@pytest.mark.parametrize("g32", [False, True], ids=["grad_w", "grad_f32"])
def test_sparse_gather_dot(dtype, n, s, d, mode, g32):
    idx, val, cnt, W, _, g = _case(n, s, d, dtype, mode)
    if g32:
        g = g.float()
    outs = _both_orders(lambda order: emu.sparse_gather_dot(g, idx, cnt, W, order=order))
    truth = reference.sparse_gather_dot(g.double(), idx, cnt, W.double())
    dense = reference.sparse_gather_dot(g, idx, cnt, W)
    valid = torch.arange(idx.shape[1])[None] < cnt[:, None].long()
    for out in outs:
        # a lane's strided float32 fma chain over d / 32 terms, then a 5-step shuffle tree
        assert_close_as_dense(out, truth, dense, what="sparse_gather_dot", ulp_dtype=dtype,
                              roundings=min(d, -(-d // 32) + 5))
        assert (out[~valid] == 0).all()


# ------------------------------------------------------------ scatter-rows
@sparse_cases
def test_sparse_scatter_rows(dtype, n, s, d, mode):
    idx, val, cnt, _, _, g = _case(n, s, d, dtype, mode)
    outs = _both_orders(lambda order: emu.sparse_scatter_rows(val, idx, cnt, g, s, order=order))
    truth = reference.sparse_scatter_rows(val.double(), idx, cnt, g.double(), s)
    dense = reference.sparse_scatter_rows(val, idx, cnt, g, s)
    for out in outs:  # float32 accumulation over a feature's entries, at most one per token
        assert_close_as_dense(out, truth, dense, what="sparse_scatter_rows", roundings=max(n, 1))


def test_scatter_rows_with_no_entries_writes_zeros():
    idx = torch.zeros(4, 0, dtype=torch.int64)
    cnt = torch.zeros(4, dtype=torch.int32)
    out = emu.sparse_scatter_rows(torch.zeros(4, 0), idx, cnt, torch.randn(4, 6), 5)
    assert torch.equal(out, torch.zeros(5, 6))


# ---------------------------------------------------------------- optimizer
ADAM_LAYOUTS = [  # (shape, sparse_dim, renorm): W_dec rows, W_enc columns, b_enc, b_dec; long rows take a block each
    ((23, 9), 0, True), ((23, 9), 0, False), ((9, 23), 1, False), ((23, ), 0, False), ((11, ), None, False),
    ((5, 300), 0, True), ((300, 5), 1, False), ((5, 300), 0, False)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,sd,renorm,touch",
    [  # a dense parameter (sd None) is always touched whole
        (*layout, touch) for layout in ADAM_LAYOUTS
        for touch in ("some", "all", "none") if layout[1] is not None or touch == "all"
    ])
def test_adam_b1zero_rows(dtype, shape, sd, renorm, touch):
    p, v, last, rows, grad = adam_case(shape, sd, dtype, touch)
    kw = dict(step=7, lr=3e-2, beta2=0.99, eps=1e-8, sparse_dim=sd, renorm=renorm)
    results = [
        check_adam_rows(lambda *a, o=order, **k: emu.adam_b1zero_rows_(*a, order=o, **k), p, v, last, rows, grad, **kw)
        for order in ORDERS
    ]
    for a, b in zip(*results):
        assert torch.equal(a, b), "optimizer result depends on thread/block order"


# ------------------------------------------------------ grids and alignment
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_stride_loops(dtype):
    """With the launchers' grid capped at 2 blocks, every kernel loops over the rest
    of its work (the path that keeps grids within CUDA's limits at any size) and gives
    the bits of the uncapped run."""
    idx, val, cnt, W, bias, g = _case(13, 37, 130, dtype, "random")
    for fn in (lambda **e: emu.sparse_decode(idx, val, cnt, W, bias, **e),
               lambda **e: emu.sparse_gather_dot(g, idx, cnt, W, **e),
               lambda **e: emu.sparse_scatter_rows(val, idx, cnt, g, 37, **e)):
        assert torch.equal(fn(max_blocks=2).view(torch.uint8), fn().view(torch.uint8))
    for shape, sd, renorm in ADAM_LAYOUTS[:3] + ADAM_LAYOUTS[5:6]:
        p, v, last, rows, grad = adam_case(shape, sd, dtype, "all")
        grad = grad.to(dtype)
        kw = dict(step=3, lr=1e-2, beta2=0.99, eps=1e-8, sparse_dim=sd, renorm=renorm)
        outs = []
        for mb in (1, None):
            pk, vk, lk = p.clone(), v.clone(), last.clone()
            emu.adam_b1zero_rows_(pk, vk, lk, rows, grad, max_blocks=mb, **kw)
            outs.append((pk, vk, lk))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    pre, thr = torch.randn(13, 700).to(dtype), 0.5 * torch.rand(700)
    for plan in (None, (3, 256)):
        capped = emu.jumprelu_select(pre, thr, 0.125, True, 0, plan=plan, max_blocks=1)
        for a, b in zip(capped, emu.jumprelu_select(pre, thr, 0.125, True, 0, plan=plan)):
            assert torch.equal(a, b)


def test_grid_past_cuda_limits_is_refused_by_the_emulator():
    # the emulator enforces CUDA's launch limits, so a launcher that asked for too
    # big a grid would fail the tests above with cudaErrorInvalidConfiguration
    r = harness.run("planted_bad_grid", dict(threads=32, grid_y=70000), arrays=dict(out=torch.zeros(32)))
    assert r.returncode == 0 and r.cuda_error == 9  # cudaErrorInvalidConfiguration


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_pointers_take_the_scalar_path(dtype):
    """16-byte loads need 16-byte aligned rows; a W or grad that starts 2 bytes past a
    boundary must go through the scalar kernels (UBSan's alignment check and ASan
    watch every load)."""
    idx, val, cnt, W, bias, g = _case(9, 20, 64, dtype, "random")
    off = {"W": 2 * W.element_size(), "grad": 2 * W.element_size(), "out": 0}
    out = emu.sparse_decode(idx, val, cnt, W, bias, offsets={"W": off["W"]})
    assert_close_as_dense(out, reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), bias.double()),
                          reference.sparse_decode_raw(idx, val, cnt, W, bias))
    out = emu.sparse_gather_dot(g, idx, cnt, W, offsets=off)
    assert_close_as_dense(out, reference.sparse_gather_dot(g.double(), idx, cnt, W.double()),
                          reference.sparse_gather_dot(g, idx, cnt, W))
    out = emu.sparse_scatter_rows(val, idx, cnt, g, 20, offsets={"grad": off["grad"]})
    assert_close_as_dense(out, reference.sparse_scatter_rows(val.double(), idx, cnt, g.double(), 20),
                          reference.sparse_scatter_rows(val, idx, cnt, g, 20))


# ------------------------------------------------------------ memory safety
def _corrupt(idx, cnt, what):
    idx, cnt = idx.clone(), cnt.clone()
    b = int(torch.nonzero(cnt > 0)[0, 0])
    if what == "index_negative":
        idx[b, 0] = -1
    elif what == "index_d_sae":
        idx[b, 0] = 20
    elif what == "index_huge":
        idx[b, 0] = 10**12
    elif what == "count_negative":
        cnt[b] = -1
    elif what == "count_over_capacity":
        cnt[b] = idx.shape[1] + 5
    elif what == "count_huge":
        cnt[b] = 100000
    return idx, cnt


def _sanitised(idx, cnt, s):
    """What the guards make of bad input: counts clamped to [0, K], slots with an index
    outside [0, s) dropped."""
    k = idx.shape[1]
    cnt = cnt.clamp(0, k)
    keep = (torch.arange(k)[None] < cnt[:, None].long()) & (idx >= 0) & (idx < s)
    return keep


BAD = ["index_negative", "index_d_sae", "index_huge", "count_negative", "count_over_capacity", "count_huge"]


@pytest.mark.parametrize("what", BAD)
def test_bad_indices_and_counts_never_reach_memory(what):
    """Called unchecked (the host entries refuse these first), the kernels stay in
    bounds: ASan watches every access; an invalid slot contributes nothing."""
    idx, val, cnt, W, bias, g = _case(7, 20, 64, torch.float32, "padded")
    idx, cnt = _corrupt(idx, cnt, what)
    keep = _sanitised(idx, cnt, 20)
    # the sanitised equivalent: every slot valid where kept, padding elsewhere
    cidx = torch.where(keep, idx, 0)
    cval = torch.where(keep, val, 0.0)
    full = torch.full_like(cnt, idx.shape[1])
    want = reference.sparse_decode_raw(cidx, cval, full, W, bias)
    torch.testing.assert_close(emu.sparse_decode(idx, val, cnt, W, bias), want)
    dots = emu.sparse_gather_dot(g, idx, cnt, W)
    torch.testing.assert_close(dots, reference.sparse_gather_dot(g, cidx, full, W) * keep)
    want = reference.sparse_scatter_rows(cval, cidx, full, g, 20)
    torch.testing.assert_close(emu.sparse_scatter_rows(val, idx, cnt, g, 20), want)


@pytest.mark.parametrize("what", ["order", "start"])
def test_bad_segments_never_reach_memory(what):
    """The segmented scatter reads the host's (order, start), never indices or counts:
    called with a corrupted one, it stays in bounds (start clamped to [0, N*K], an
    order entry outside [0, N*K) skipped), which ASan watches."""
    idx, val, cnt, _, _, g = _case(7, 20, 64, torch.float32, "padded")
    n, k = idx.shape
    order, start = segment_by_feature(idx, cnt, 20)
    order, start = order.clone(), start.clone()
    if what == "order":
        j = int(torch.nonzero(start[1:] > start[:-1])[0, 0])  # a feature with entries
        order[start[j]] = -1
        order[start[j + 1] - 1] = 10**12
    else:
        start[0], start[5], start[-1] = -3, 10**12, n * k + 100
    out = harness.run_ok("sparse_scatter_rows_segmented", dict(t=0, S=20, N=n, K=k, D=64),
                         arrays=dict(order=order, start=start, coef=val, grad=g, out=torch.zeros(20, 64)))["out"]
    want = torch.zeros(20, 64, dtype=torch.float64)
    for j in range(20):  # what the clamps make of the corrupted segments
        for e in range(max(int(start[j]), 0), min(int(start[j + 1]), n * k)):
            slot = int(order[e])
            if 0 <= slot < n * k:
                want[j] += val.reshape(-1)[slot].double() * g[slot // k].double()
    torch.testing.assert_close(out, want.float())


@pytest.mark.parametrize("bad_row", [-1, 23, 999])
def test_bad_optimizer_rows_never_reach_memory(bad_row):
    p, v, last, rows, grad = adam_case((23, 9), 0, torch.float32, "some")
    rows = rows.clone()
    rows[0] = bad_row
    pk, vk, lk = p.clone(), v.clone(), last.clone()
    emu.adam_b1zero_rows_(pk, vk, lk, rows, grad, step=7, lr=3e-2, beta2=0.99, eps=1e-8, sparse_dim=0, renorm=True)
    pr, vr, lr_ = p.clone(), v.clone(), last.clone()  # the valid rows update as if alone
    reference.adam_b1zero_rows_(pr, vr, lr_, rows[1:], grad[1:], step=7, lr=3e-2, beta2=0.99, eps=1e-8, sparse_dim=0,
                                renorm=True)
    torch.testing.assert_close(pk, pr)
    torch.testing.assert_close(vk, vr)
    assert torch.equal(lk, lr_)


# ------------------------------------------- the emulator catches planted bugs
def _planted(name, threads=32, **ints):
    return harness.run(f"planted_{name}", dict(threads=threads, **ints),
                       arrays=dict(out=torch.full((threads, ), float("nan")), **{"in": torch.arange(threads).float()}))


def test_planted_correct_reduction_runs():
    for order in ORDERS:
        r = harness.run("planted_block_sum", dict(threads=96), arrays=dict(out=torch.full(
            (96, ), float("nan")), **{"in": torch.arange(96).float()}), order=order)
        assert r.returncode == 0, r.stderr
        assert r.arrays["out"][0] == sum(range(96))


@pytest.mark.parametrize(
    "name,message",
    [("divergent_sync", r"divergent __syncthreads: .* waits at .*planted\.cu:\d+ while .* waits at .*planted\.cu:\d+"),
     ("exited_sync", r"divergent __syncthreads: .*planted\.cu:\d+ but thread \(3, 0, 0\) .* has exited"),
     ("shfl_exited_lane", r"__shfl_down_sync: mask 0xffffffff names lane 5, which has exited"),
     ("shfl_outside_mask", r"__shfl_sync: lane 0 reads lane 20, which is not in the mask 0x0000ffff"),
     ("deadlock", r"deadlock: no thread can run(.|\n)*__syncthreads at .*planted\.cu:\d+")])
def test_planted_sync_bugs_abort_with_file_and_line(name, message):
    import re

    r = _planted(name, threads=64)
    assert r.returncode != 0
    assert re.search(r"cuda_emu: error at .*planted\.cu:\d+", r.stderr), r.stderr
    assert re.search(message, r.stderr), r.stderr
    assert f"in kernel {name} (launched at" in r.stderr


def test_planted_thread_order_dependence_is_caught():
    outs = {}
    for synced in (0, 1):
        for order in ORDERS:
            r = harness.run("planted_neighbour", dict(threads=8, synced=synced),
                            arrays=dict(out=torch.full((8, ), float("nan"))), order=order)
            assert r.returncode == 0, r.stderr
            outs[synced, order] = r.arrays["out"]
    assert not torch.equal(outs[0, "forward"], outs[0, "reverse"])  # the race shows as an order dependence
    assert torch.equal(outs[1, "forward"], outs[1, "reverse"])
    assert torch.equal(outs[1, "forward"], torch.tensor([2.0, 3, 4, 5, 6, 7, 8, 1]))


@pytest.mark.parametrize("name,report", [("global_overflow", "AddressSanitizer: heap-buffer-overflow"),
                                         ("shared_overflow", "index 32 out of bounds for type 'float [32]'")])
def test_planted_out_of_bounds_access_is_caught(name, report):
    r = _planted(name, threads=64 if name == "shared_overflow" else 32)
    assert r.returncode != 0
    assert report in r.stderr, r.stderr


# ------------------------------------------------------- the fused selection
def _select_truth(pre, thr, hb, band, col_offset):
    from sae_fast.sparse import compact

    p = pre.float()
    a_idx, a_val, a_cnt = compact(((p > thr) & (p > 0)) | torch.isnan(p), pre)
    band_idx, _, band_cnt = compact((p - thr).abs() < torch.tensor(hb, dtype=torch.float32)) if band else (torch.zeros(
        pre.shape[0], 0, dtype=torch.int64), None, torch.zeros(pre.shape[0], dtype=torch.int32))
    a_idx = torch.where(torch.arange(a_idx.shape[1])[None] < a_cnt[:, None].long(), a_idx + col_offset, 0)
    band_idx = torch.where(torch.arange(band_idx.shape[1])[None] < band_cnt[:, None].long(), band_idx + col_offset, 0)
    return a_idx, a_val, a_cnt, band_idx, band_cnt, (p > thr).sum(1)


def _select_case(n, c, dtype, mode):
    pre = torch.randn(n, c).to(dtype)
    thr = (0.5 * torch.rand(c) + 0.05)
    if mode == "all":
        thr = torch.full((c, ), -1.0)
        pre = pre.abs() + 0.5
    elif mode == "none":
        thr = torch.full((c, ), 100.0)
    if n and c and mode == "edges":
        # exactly at the threshold (not active, in the band), at the band's edges, NaN, -inf, 0
        edge = torch.tensor([0.25, 0.25 + 0.125, 0.25 - 0.125, float("nan"), -float("inf"), 0.0])[:c]
        pre[0, :edge.numel()] = edge.to(dtype)
        thr[:edge.numel()] = 0.25
    return pre, thr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,plan", [(1, 33, None), (0, 50, None), (7, 300, None), (5, 700, (3, 256)), (3, 5000, None),
                                      (4, 1, None)])
@pytest.mark.parametrize("mode", ["mixed", "all", "none", "edges"])
@pytest.mark.parametrize("band", [True, False])
def test_jumprelu_select(dtype, n, c, plan, mode, band):
    pre, thr = _select_case(n, c, dtype, mode)
    hb, off = 0.125, 1000
    want = _select_truth(pre, thr, hb, band, off)
    got_f = emu.jumprelu_select(pre, thr, hb, band, off, plan=plan, order="forward")
    got_r = emu.jumprelu_select(pre, thr, hb, band, off, plan=plan, order="reverse")
    names = ("a_idx", "a_val", "a_cnt", "band_idx", "band_cnt", "steps")
    for got in (got_f, got_r):
        for name, g, w in zip(names, got, want):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            if name == "a_val":
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) or torch.equal(
                    torch.nan_to_num(g.float(), 7.0), torch.nan_to_num(w.float(), 7.0)), name
            else:
                assert torch.equal(g.long(), w.long()), name
