"""Triton kernels and their launchers (the `triton` backend).

Kernels:
  _jumprelu_encode_kernel    pre = x @ W_enc + b_enc tile by tile; the JumpReLU threshold in the
                             epilogue; writes the active (index, value) pairs and the band indices
                             straight into per-row slots, or dense acts (encode()). Never the dense
                             pre for the sparse output.
  _sparse_decode_kernel      out[b] = sum_k values[b,k] * W[indices[b,k]] (+ bias), fp32 accumulation
  _sparse_gather_dot_kernel  r[b,k] = <grad[b], W[indices[b,k]]>
  _sparse_scatter_rows_kernel G[j] = sum over entries of feature j of coef * grad[b], as a segmented
                             reduction over entries sorted by feature: a fixed summation order,
                             so results are deterministic (no float atomics).
  _adam_b1zero_rows_kernel   the fused optimizer step (reference.adam_b1zero_rows_): lazy beta2^k
                             decay, second moment, update and optional row renormalisation (a
                             second sweep over the row) on the touched rows of a parameter.

Offsets are int64 wherever tokens x d_sae or d_sae x d_in can pass 2^31.
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).

Memory safety: no input makes a kernel touch memory out of bounds. Feature indices
outside [0, S) and counts outside [0, K] are masked inside the kernels (such entries
contribute nothing); the encoder never stores past a row's capacity.

Resources: every configuration the launchers and autotune spaces below can run on a
GPU is listed by gpu_configs(), and `python -m benchmarks.kernel_resources` compiles
each for sm_80 and sm_90a (no GPU needed) and fails on any register spill or shared
memory overflow. Register counts quoted in comments come from that tool (ptxas of
triton 3.9) and are per thread.

The encoder autotunes its tiles on a GPU (keyed on d_in, d_sae, the token count's
power-of-two bucket, the dtypes and the output mode); SAE_FAST_TRITON_AUTOTUNE=0
turns that off and uses a fixed tile per (architecture, dtype).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..dtypes import NAME_OF
from ..sparse import segment_by_feature, valid_slots

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotune() -> bool:
    return os.environ.get("SAE_FAST_TRITON_AUTOTUNE", "1") not in ("", "0") and not _interpret()


# Triton 3.9's interpreter converts float32 -> bfloat16 by truncation, even with
# fp_downcast_rounding="rtne" (2037 of 4096 randn values differ from torch's
# round-to-nearest-even; mean |error| 2x, biased toward zero, which a sum over the
# STE band turns into a 3x larger threshold-gradient error). GPUs round to nearest
# even. Under the interpreter (RNE_FIX) we round the bits ourselves first, so the
# conversion that follows is exact; on a GPU this compiles away.
@triton.jit
def _cast_out(v, OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr):
    if RNE_FIX:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))
    return v.to(OUT_DTYPE)


def _rne_fix(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpret()


# ------------------------------------------------------------------ encoder
@triton.jit(do_not_specialize=["N_BUCKET"])
def _jumprelu_encode_kernel(x_ptr, w_ptr, b_ptr, thr_ptr, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr, band_cnt_ptr,
                            step_cnt_ptr, dense_ptr, N, D, S, SW, a_cap, band_cap, half_bw, N_BUCKET,
                            OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            RNE_FIX: tl.constexpr, WRITE_DENSE: tl.constexpr, WRITE_BAND: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # N_BUCKET: unused here, the autotune key (the token count's power of two).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int32 row and column indices (tokens, d_sae < 2^31); int64 only where they
    # become element offsets: per row (rm64 * row length) and per k (rk * SW).
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < N
    n_ok = rn < S
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + rk
        k_ok = kk < D
        xa = tl.load(x_ptr + (rm64 * D)[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + (kk.to(tl.int64) * SW)[:, None] + rn[None, :], mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if UPCAST:
            xa = xa.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(xa, wb, acc, input_precision=PRECISION)
    # Round exactly as the dense reference does: (x @ W) to the dtype, then + b_enc in the dtype.
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    pre = _cast_out(_cast_out(acc, OUT_DTYPE, RNE_FIX).to(tl.float32) + bias[None, :], OUT_DTYPE,
                    RNE_FIX).to(tl.float32)
    thr = tl.load(thr_ptr + rn, mask=n_ok, other=0.0)
    ok = m_ok[:, None] & n_ok[None, :]
    above = (pre > thr[None, :]) & ok
    if WRITE_DENSE:
        # relu(pre) * (pre > thr), NaN propagating like the reference
        acts = tl.where(pre != pre, pre, tl.where(above & (pre > 0), pre, 0.0))
        tl.store(dense_ptr + (rm64 * S)[:, None] + rn[None, :], acts.to(OUT_DTYPE), mask=ok)  # exact: pre is rounded
    else:
        # Sparse output. Per element, everything the stores need: one int32 word
        # (bit 0 active, bit 1 in the band; for bf16/fp16 the value's bits in 16..31)
        # and, for float32, the value. Their scattered stores and atomics run in a
        # blocked layout, not the accumulator's: the tile crosses over (through shared
        # memory) a quarter at a time, so only a quarter of the slots is live at once.
        # (Carrying the value in the word: 113 registers instead of 128, the cap at 16
        # warps, at 128x128x64 with the band on sm_90a.)
        act = ((above & (pre > 0)) | (pre != pre)) & ok
        word = act.to(tl.int32)
        if WRITE_BAND:
            word = word | ((tl.abs(pre - thr[None, :]) < half_bw) & ok).to(tl.int32) * 2
            # the above-threshold count now: `above` is dead before the stores
            h = tl.sum(above.to(tl.int32), axis=1)
            tl.atomic_add(step_cnt_ptr + rm, h, mask=m_ok & (h > 0), sem="relaxed")
        val = pre.to(OUT_DTYPE)  # exact: pre is rounded
        if OUT_DTYPE.primitive_bitwidth == 16:
            word = word | (val.to(tl.int16, bitcast=True).to(tl.int32) << 16)
        # Even and odd columns (a thread of the MMA layout holds column pairs, so the
        # split moves no data), then the first and second half of each.
        w_e, w_o = tl.split(tl.reshape(word, (BM, BN // 2, 2)))
        v_e, v_o = tl.split(tl.reshape(val, (BM, BN // 2, 2)))
        cols = pid_n * BN + 2 * tl.arange(0, BN // 2)
        _store_half(w_e, v_e, cols, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr, band_cnt_ptr, a_cap,
                    band_cap, OUT_DTYPE, WRITE_BAND, BM, BN // 2)
        _store_half(w_o, v_o, cols + 1, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr, band_cnt_ptr, a_cap,
                    band_cap, OUT_DTYPE, WRITE_BAND, BM, BN // 2)


@triton.jit
def _store_half(word, val, cols, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr, band_cnt_ptr, a_cap, band_cap,
                OUT_DTYPE: tl.constexpr, WRITE_BAND: tl.constexpr, BM: tl.constexpr, H: tl.constexpr):
    # the first and second half of these H columns (again held by the same thread)
    w_lo, w_hi = tl.split(tl.permute(tl.reshape(word, (BM, 2, H // 2)), (0, 2, 1)))
    c_lo, c_hi = tl.split(tl.permute(tl.reshape(cols, (2, H // 2)), (1, 0)))
    if OUT_DTYPE.primitive_bitwidth == 16:
        v_lo = w_lo  # the value travels in the word
        v_hi = w_hi
    else:
        v_lo, v_hi = tl.split(tl.permute(tl.reshape(val, (BM, 2, H // 2)), (0, 2, 1)))
    # Transposed ([columns, rows]): the blocked layout puts the threads along the
    # last dimension, the row, so a thread's elements share a row (its counter and
    # int64 row offset) instead of each bringing its own.
    _claim_and_store(tl.trans(w_lo), tl.trans(v_lo), c_lo, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr,
                     band_cnt_ptr, a_cap, band_cap, OUT_DTYPE, WRITE_BAND)
    _claim_and_store(tl.trans(w_hi), tl.trans(v_hi), c_hi, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr,
                     band_cnt_ptr, a_cap, band_cap, OUT_DTYPE, WRITE_BAND)


@triton.jit
def _claim_and_store(word, val, cols, rm, rm64, a_idx_ptr, a_val_ptr, a_cnt_ptr, band_idx_ptr, band_cnt_ptr, a_cap,
                     band_cap, OUT_DTYPE: tl.constexpr, WRITE_BAND: tl.constexpr):
    # word, val: [columns, rows]. Each active (band) element claims its slot with one
    # atomic increment of its row's counter, right where it is stored: no prefix sum
    # over the tile (a tt.scan only runs in a blocked layout; with int64 index tiles
    # that design took 255 registers and 1,516 bytes of spills), no index tile.
    # Entries are few (the output is sparse), so are the atomics; a row's order is
    # arbitrary, as it was across tiles. The counter address is where(mask, row, 0),
    # not a broadcast of the row: Triton 3.9 aborts (RemoveLayoutConversions) on an
    # atomic whose pointer is a broadcast and whose mask comes from the accumulator.
    # Masked lanes are never touched.
    if OUT_DTYPE.primitive_bitwidth == 16:
        val = (word >> 16).to(tl.int16).to(OUT_DTYPE, bitcast=True)
    active = (word & 1) != 0
    a_slot = tl.atomic_add(a_cnt_ptr + tl.where(active, rm[None, :], 0), 1, mask=active, sem="relaxed")
    # Slots past the capacity are not stored, but the counter still counts
    # them: the launcher sees counts > capacity and reruns. Never truncation.
    a_st = active & (a_slot < a_cap)
    a_off = (rm64 * a_cap)[None, :] + a_slot
    tl.store(a_idx_ptr + a_off, cols[:, None], mask=a_st)  # int32 column, widened at the store
    tl.store(a_val_ptr + a_off, val, mask=a_st)
    if WRITE_BAND:
        band = (word & 2) != 0
        band_slot = tl.atomic_add(band_cnt_ptr + tl.where(band, rm[None, :], 0), 1, mask=band, sem="relaxed")
        tl.store(band_idx_ptr + (rm64 * band_cap)[None, :] + band_slot, cols[:, None],
                 mask=band & (band_slot < band_cap))


# Tiles (BM, BN, BK, num_warps, num_stages) by architecture, operand kind and
# alignment. Every entry compiles without spills in all three output modes (dense,
# sparse, sparse + band) and all dtypes; the comments give registers per thread (the
# range over modes and dtypes) and theoretical occupancy, measured with
# benchmarks/kernel_resources.py (ptxas of triton 3.9). The first entry is the fixed
# tile used when autotune is off.
#   "mma": bf16/fp16 operands on tensor cores (wgmma on sm_90a, mma.sync on sm_80);
#   "tf32": float32 with TF32 allowed (tensor cores); "fma": float32 in IEEE precision.
#   aligned (True): x and W_enc 16-byte aligned, d_in and W_enc's row stride multiples
#   of 16, so Triton copies tiles with 16-byte cp.async; otherwise (False) the tiles are
#   staged through registers and the tiles are smaller.
# Left out, measured: 128x256x64 (8 warps: 233 registers dense, 255 and 1.8-6 KB of
# spills sparse; 16 warps: capped at 128 registers, 0.1-1 KB of spills); 128x128x64 at
# 8 warps (222 sparse, 255 and 8-16 bytes of spills with the band); 128x128x32 TF32 at
# 16 warps (128, 8 bytes of spills with the band); on sm_80 64x128x64 at 8 warps
# (ptxas holds sm_80 kernels of 8 warps to 128 registers: 6 bytes of spills with the
# band) and 64x64x64 unaligned (255 registers, occupancy 12.5%).
_ENCODE_SPACE = {
    (90, "mma", True): [
        (128, 128, 64, 16, 3),  # 80-113 regs, occupancy 25% (one block of 16 warps)
        (128, 128, 64, 16, 4),  # 80-113 regs, 25%
        (64, 128, 64, 8, 4),  # 92-129 regs, 12.5-25%
        (128, 64, 64, 8, 4),  # 84-138 regs, 12.5-25%
        (64, 64, 64, 4, 3)  # 100-142 regs, 18.75-25%: small batches
    ],
    (80, "mma", True): [
        (128, 128, 64, 16, 3),  # 124-128 regs, 25%
        (128, 64, 64, 8, 3),  # 127-128 regs, 25%
        (64, 128, 32, 8, 3),  # 102-126 regs, 25%
        (64, 64, 64, 4, 3)  # 128 regs, 25%
    ],
    (90, "tf32", True): [
        (64, 128, 32, 8, 3),  # 94-138 regs, 12.5-25%
        (64, 64, 32, 4, 3)
    ],  # 92-158 regs, 18.75-25%
    (80, "tf32", True): [
        (64, 128, 32, 8, 3),  # 108-124 regs, 25%
        (64, 64, 32, 4, 3)
    ],  # 110-128 regs, 25%
    (90, "fma", True): [
        (64, 64, 32, 8, 3),  # 80 regs, 37.5%
        (32, 64, 32, 4, 3)
    ],  # 72-80 regs, 37.5-43.75%
    (80, "fma", True): [
        (32, 64, 32, 4, 3),  # 70-80 regs, 37.5% (64x64x32 at 8 warps: 207)
        (64, 64, 16, 4, 3)
    ],  # 133-144 regs, 18.75%
    (90, "mma", False): [
        (64, 128, 32, 8, 3),  # 113-128 regs, 25%
        (64, 64, 64, 4, 3)
    ],  # 168 regs, 18.75%
    (80, "mma", False): [(64, 128, 32, 8, 3)],  # 122-128 regs, 25%
    (90, "tf32", False): [(64, 64, 32, 4, 3)],  # 142-168 regs, 18.75%
    (80, "tf32", False): [(64, 64, 32, 4, 3)],  # 148-152 regs, 18.75%
    (90, "fma", False): [(32, 64, 32, 4, 3)],  # 112-116 regs, 25%
    (80, "fma", False): [(32, 64, 32, 4, 3)]  # 80-96 regs, 31.25-37.5%
}
_INTERPRET_TILE = (16, 32, 32, 4, 1)  # the interpreter runs numpy per program: big tiles, few programs


def _encode_kind(dtype: torch.dtype, precision: str) -> str:
    if dtype != torch.float32:
        return "mma"
    return "tf32" if precision == "tf32" else "fma"


def _arch_family(cc: int) -> int:
    # sm_90 (H100/H200) tiles for 9.x; the sm_80 (A100) space for every other GPU,
    # pruned by its shared memory (sm_86/89 have 99 KiB per block, not 163). Only
    # sm_80 and sm_90a are compiled by benchmarks/kernel_resources.py.
    return 90 if 90 <= cc < 100 else 80


def _encode_smem(tile, elem_bytes: int) -> int:
    # Shared memory of a tile, estimated as `stages` pairs of operand tiles: at or
    # above what Triton allocated for every entry of _ENCODE_SPACE on sm_80 and sm_90a
    # (stages - 1 pairs mostly; TF32 on sm_90a takes all of them).
    bm, bn, bk, _, stages = tile
    return (bm * bk + bk * bn) * elem_bytes * stages


def _aligned(tensors, ints) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(i % 16 == 0 for i in ints)


def _encode_space(dev: torch.device, dtype: torch.dtype, precision: str, aligned: bool) -> list:
    cc = torch.cuda.get_device_capability(dev)
    space = _ENCODE_SPACE[(_arch_family(cc[0] * 10 + cc[1]), _encode_kind(dtype, precision), aligned)]
    limit = getattr(torch.cuda.get_device_properties(dev), "shared_memory_per_block_optin", 99 * 1024)
    elem = torch.finfo(dtype).bits // 8
    fits = [t for t in space if _encode_smem(t, elem) <= limit]
    return fits or [min(space, key=lambda t: _encode_smem(t, elem))]


_TUNERS: dict = {}


def _encode_tuner(space: tuple):
    # One autotuner per candidate list. The kernel claims slots with atomics on the
    # counters: every benchmark launch of the search starts from zeroed counters
    # (reset_to_zero), and so does the real launch after it, so the outputs are those
    # of one launch. Outputs are only ever written below capacity.
    if space not in _TUNERS:
        configs = [
            triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in space
        ]
        _TUNERS[space] = triton.autotune(configs, key=["N_BUCKET", "D", "S", "WRITE_DENSE", "WRITE_BAND", "PRECISION"],
                                         reset_to_zero=["a_cnt_ptr", "band_cnt_ptr",
                                                        "step_cnt_ptr"])(_jumprelu_encode_kernel)
    return _TUNERS[space]


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting (TF32 off by default) so the kernel
    # matches the dense path it replaces; bf16/fp16 products are exact either way.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpret():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # Triton 3.9's interpreter returns garbage from tl.dot on bf16 operands (max
    # error 2.8e10 on a 16x16 product; fp16 and fp32 are exact). bf16 -> fp32 is
    # exact and so are bf16 products in fp32, so the upcast dot equals the GPU's
    # bf16 MMA with fp32 accumulation. Interpreter only.
    return dtype == torch.bfloat16 and _interpret()


def _run_encode(args, n, s, dtype, **const):
    """Launches the encoder: autotuned on a GPU, a fixed tile otherwise."""
    precision = _precision(dtype)
    const.update(OUT_DTYPE=_TL_DTYPE[dtype], PRECISION=precision, UPCAST=_upcast(dtype), RNE_FIX=_rne_fix(dtype))
    if _interpret():
        space = [_INTERPRET_TILE]
    else:
        x, W = args[0], args[1]
        aligned = _aligned((x, W), (args[12], args[14]))  # D, SW
        space = _encode_space(x.device, dtype, precision, aligned)
    if _autotune() and len(space) > 1:

        def grid(meta):
            return (triton.cdiv(n, meta["BM"]), triton.cdiv(s, meta["BN"]))

        _encode_tuner(tuple(space))[grid](*args, **const)
        return
    bm, bn, bk, w, st = space[0]
    _jumprelu_encode_kernel[(triton.cdiv(n, bm), triton.cdiv(s, bn))](*args, BM=bm, BN=bn, BK=bk, num_warps=w,
                                                                      num_stages=st, **const)


def _launch_encode(x, W_enc, b_enc, threshold, *, dense, a_cap=0, band_cap=0, half_bw=0.0, band=False, out=None):
    # W_enc may be a column slice W[:, c0:c1] of a wider matrix (row stride SW > s):
    # a chunk of features, encoded without copying it out.
    n, d = x.shape
    s = W_enc.shape[1]
    if s and W_enc.stride(1) != 1:
        raise ValueError(f"jumprelu_encode: W_enc must have unit column stride, got strides {W_enc.stride()}")
    sw = W_enc.stride(0) if d > 1 else s
    dev = x.device
    n_bucket = triton.next_power_of_2(max(n, 1))
    if dense:
        acts = out if out is not None else torch.empty(n, s, dtype=x.dtype, device=dev)
        if n and s:
            _run_encode((x, W_enc, b_enc, threshold, acts, acts, acts, acts, acts, acts, acts, n, d, s, sw, 0, 0, 0.0,
                         n_bucket), n, s, x.dtype, WRITE_DENSE=True, WRITE_BAND=False)
        return acts
    o = out or {}
    a_idx = o.get("a_idx", torch.empty(n, a_cap, dtype=torch.int64, device=dev))
    a_val = o.get("a_val", torch.empty(n, a_cap, dtype=x.dtype, device=dev))
    a_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    band_idx = o.get("band_idx", torch.empty(n, band_cap, dtype=torch.int64, device=dev))
    band_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    step_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    if n and s:
        _run_encode((x, W_enc, b_enc, threshold, a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt, a_val, n, d, s, sw,
                     a_cap, band_cap, float(half_bw), n_bucket), n, s, x.dtype, WRITE_DENSE=False, WRITE_BAND=band)
    return a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt


def _round_cap(c: int) -> int:
    return max(16, (c + 15) // 16 * 16)


# Last capacity that fitted, per (device, d_sae): training steps repeat their L0,
# so after the first step the encoder runs once per call.
_CAP_HINT: dict = {}


def jumprelu_encode_sets(x, W_enc, b_enc, threshold, *, band: bool, half_bw: float = 0.0, capacity=None, out=None):
    """Fused encoder, sparse output. Returns (a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt) with
    padding slots zeroed; reruns with the exact capacity when a row overflows."""
    n, s = x.shape[0], W_enc.shape[1]
    key = (x.device, s)
    a_cap, band_cap = capacity or _CAP_HINT.get(key, (64, 64))
    a_cap, band_cap = min(a_cap, s), min(band_cap, s)
    for _ in range(2):
        res = _launch_encode(x, W_enc, b_enc, threshold, dense=False, a_cap=a_cap, band_cap=band_cap if band else 0,
                             half_bw=half_bw, band=band, out=out)
        a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt = res
        a_max = int(a_cnt.max()) if n else 0
        band_max = int(band_cnt.max()) if n and band else 0
        if a_max <= a_cap and band_max <= (band_cap if band else 0):
            break
        # Overflow: the counters hold the exact per-row totals; rerun with room for all.
        a_cap, band_cap = max(a_cap, a_max), max(band_cap, band_max)
        out = None
    else:  # pragma: no cover - the second pass always fits: capacities equal the exact maxima
        raise RuntimeError("jumprelu_encode: capacity retry did not converge")
    _CAP_HINT[key] = (_round_cap(a_max + a_max // 4), _round_cap(band_max + band_max // 4))
    # Padding contract of SparseActs: slots k >= counts[b] hold index 0 and value 0.
    a_valid = valid_slots(a_idx, a_cnt)
    a_idx = torch.where(a_valid, a_idx, 0)
    a_val = torch.where(a_valid, a_val, torch.zeros((), dtype=a_val.dtype, device=x.device))
    if band:
        band_valid = valid_slots(band_idx, band_cnt)
        band_idx = torch.where(band_valid, band_idx, 0)
    return a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt


# ------------------------------------------------------------ decode / gather
# Memory-bound: one program per (token, BD columns), KB slots at a time, 4 warps.
# A slot is read only when k < clamp(count, 0, K) and its feature j is in [0, S).
@triton.jit
def _slot_features(idx_ptr, b, rk, c, K, S):
    """(features j of row b's slots rk, which of them may be read): slots below the
    clamped count c whose feature lies in [0, S)."""
    k_ok = rk < c
    j = tl.load(idx_ptr + b * K + rk, mask=k_ok, other=0)
    return j, k_ok & (j >= 0) & (j < S)


@triton.jit
def _feature_rows(w_ptr, j, j_ok, rd, d_ok, D):
    """W[j, rd] as float32 [slots, columns], 0 where a slot or a column may not be read."""
    return tl.load(w_ptr + j[:, None] * D + rd[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _sparse_decode_kernel(idx_ptr, val_ptr, cnt_ptr, w_ptr, bias_ptr, out_ptr, K, D, S, HAS_BIAS: tl.constexpr,
                          OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    if HAS_BIAS:
        acc = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BD, ), dtype=tl.float32)
    c = tl.minimum(tl.maximum(tl.load(cnt_ptr + b), 0), K)
    for k0 in range(0, c, KB):
        rk = k0 + tl.arange(0, KB)
        j, j_ok = _slot_features(idx_ptr, b, rk, c, K, S)
        v = tl.load(val_ptr + b * K + rk, mask=j_ok, other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * _feature_rows(w_ptr, j, j_ok, rd, d_ok, D), axis=0)
    tl.store(out_ptr + b * D + rd, _cast_out(acc, OUT_DTYPE, RNE_FIX), mask=d_ok)


@triton.jit
def _sparse_gather_dot_kernel(g_ptr, idx_ptr, cnt_ptr, w_ptr, out_ptr, K, D, S, OUT_DTYPE: tl.constexpr,
                              RNE_FIX: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * KB + tl.arange(0, KB)
    c = tl.minimum(tl.maximum(tl.load(cnt_ptr + b), 0), K)
    j, j_ok = _slot_features(idx_ptr, b, rk, c, K, S)
    acc = tl.zeros((KB, ), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        g = tl.load(g_ptr + b * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        acc += tl.sum(_feature_rows(w_ptr, j, j_ok, rd, d_ok, D) * g[None, :], axis=1)
    tl.store(out_ptr + b * K + rk, _cast_out(tl.where(rk < c, acc, 0.0), OUT_DTYPE, RNE_FIX), mask=rk < K)


# Entries e in [start[j], start[j+1]) clamped to [0, E) (E = tokens x K): a slot
# read from `order` is used only when it lies in [0, E), so grad rows stay < tokens.
@triton.jit
def _sparse_scatter_rows_kernel(order_ptr, start_ptr, coef_ptr, g_ptr, out_ptr, K, D, E, OUT_DTYPE: tl.constexpr,
                                RNE_FIX: tl.constexpr, EB: tl.constexpr, BD: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    e0 = tl.minimum(tl.maximum(tl.load(start_ptr + j), 0), E)
    e1 = tl.minimum(tl.maximum(tl.load(start_ptr + j + 1), e0), E)
    acc = tl.zeros((BD, ), dtype=tl.float32)
    for e in range(e0, e1, EB):
        re = e + tl.arange(0, EB)
        slot = tl.load(order_ptr + re, mask=re < e1, other=-1)
        s_ok = (slot >= 0) & (slot < E)
        c = tl.load(coef_ptr + slot, mask=s_ok, other=0.0).to(tl.float32)
        row = slot // K
        g = tl.load(g_ptr + row[:, None] * D + rd[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(c[:, None] * g.to(tl.float32), axis=0)
    tl.store(out_ptr + j * D + rd, _cast_out(acc, OUT_DTYPE, RNE_FIX), mask=d_ok)


_KB = 16  # slots per iteration of decode / gather-dot, entries per iteration of scatter


def _bd_gpu(d: int) -> int:
    # Two tiles only, so gpu_configs() stays small: 256 columns (32 elements of W per
    # thread at 4 warps) for real widths, 128 for d <= 128. Measured over dtypes and
    # alignments, sm_80 / sm_90a: decode 39-76 registers (occupancy 37.5-75%),
    # gather-dot 38-96 (31-75%), scatter 44-94 (31-62.5%). 512 columns took up to 128
    # registers (gather-dot) and spilled (decode) when d_in is not a multiple of 16.
    return 128 if d <= 128 else 256


def _bd(d: int) -> int:
    """Columns per program (decode, scatter) or per iteration (gather-dot)."""
    if _interpret():
        return min(triton.next_power_of_2(max(d, 16)), 256)
    return _bd_gpu(d)


def sparse_decode(indices, values, counts, W, bias, out=None, out_dtype=None):
    n, k = indices.shape
    s, d = W.shape
    out_dtype = out_dtype or W.dtype
    if out_dtype not in (W.dtype, torch.float32):
        raise TypeError(f"sparse_decode: out_dtype must be W's dtype ({W.dtype}) or float32, got {out_dtype}")
    out = out if out is not None else torch.empty(n, d, dtype=out_dtype, device=W.device)
    if n and d:
        BD = _bd(d)
        _sparse_decode_kernel[(n, triton.cdiv(d,
                                              BD))](indices, values, counts, W, bias if bias is not None else W, out, k,
                                                    d, s, HAS_BIAS=bias is not None, OUT_DTYPE=_TL_DTYPE[out.dtype],
                                                    RNE_FIX=_rne_fix(out.dtype), KB=_KB, BD=BD)
    return out


def sparse_gather_dot(grad, indices, counts, W, out=None):
    n, k = indices.shape
    s, d = W.shape
    # Output in grad's dtype: W's, or float32 when the caller wants the dots unrounded.
    out = out if out is not None else torch.empty(n, k, dtype=grad.dtype, device=W.device)
    if n and k:
        _sparse_gather_dot_kernel[(n, triton.cdiv(k, _KB))](grad, indices, counts, W, out, k, d, s,
                                                            OUT_DTYPE=_TL_DTYPE[grad.dtype],
                                                            RNE_FIX=_rne_fix(grad.dtype), KB=_KB, BD=_bd(d))
    return out


def sparse_scatter_rows(coef, indices, counts, grad, d_sae, out=None):
    n, k = indices.shape
    d = grad.shape[1]
    out = out if out is not None else torch.empty(d_sae, d, dtype=grad.dtype, device=grad.device)
    # entries grouped by feature (padding and indices outside [0, d_sae) in no group)
    order, start = segment_by_feature(indices, counts, d_sae)
    if d_sae == 0 or d == 0:
        return out
    BD = _bd(d)
    _sparse_scatter_rows_kernel[(d_sae, triton.cdiv(d, BD))](order, start, coef, grad, out, max(k, 1), d, n * k,
                                                             OUT_DTYPE=_TL_DTYPE[grad.dtype],
                                                             RNE_FIX=_rne_fix(grad.dtype), EB=_KB, BD=BD)
    return out


# ----------------------------------------------------- range check on the device
# check_sparse_ranges of the Triton ops, where it defers (CUDA tensors): one pass over
# counts and the valid slots' indices finds the first bad count row and the first bad
# slot (atomic min over programs), a one-program kernel reads their values; 3 launches,
# no sync. The summary [row, counts[row], slot, indices[slot]] ("none" = max(N, N*K))
# is what _checks._locate_sparse computes with torch ops.
@triton.jit
def _first_bad_slot_kernel(idx_ptr, cnt_ptr, out_ptr, N, K, S, NONE, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    rows64 = rows.to(tl.int64)
    c = tl.load(cnt_ptr + rows, mask=r_ok, other=0).to(tl.int64)
    bad_c = r_ok & ((c < 0) | (c > K))
    tl.atomic_min(out_ptr, tl.min(tl.where(bad_c, rows64, NONE), axis=0))
    first = tl.zeros((BN, BK), dtype=tl.int64) + NONE
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        valid = r_ok[:, None] & (ks[None, :] < K) & (ks[None, :] < c[:, None])
        off = rows64[:, None] * K + ks[None, :]
        j = tl.load(idx_ptr + off, mask=valid, other=0)  # valid slots only: never out of bounds
        first = tl.minimum(first, tl.where(valid & ((j < 0) | (j >= S)), off, NONE))
    tl.atomic_min(out_ptr + 2, tl.min(tl.min(first, axis=1), axis=0))


@triton.jit
def _bad_values_kernel(idx_ptr, cnt_ptr, out_ptr, N, NK):
    r = tl.load(out_ptr)
    p = tl.load(out_ptr + 2)
    tl.store(out_ptr + 1, tl.load(cnt_ptr + r, mask=r < N, other=0).to(tl.int64))
    tl.store(out_ptr + 3, tl.load(idx_ptr + p, mask=p < NK, other=0))


def locate_sparse(indices, counts, d_sae: int):
    n, k = indices.shape
    none = max(n, n * k)
    out = torch.full((4, ), none, dtype=torch.int64, device=indices.device)
    indices, counts = indices.contiguous(), counts.contiguous()
    BN = 64 if _interpret() else 16  # the interpreter: few programs
    BK = min(triton.next_power_of_2(max(k, 1)), 64)
    _first_bad_slot_kernel[(triton.cdiv(n, BN), )](indices, counts, out, n, k, d_sae, none, BN=BN, BK=BK)
    _bad_values_kernel[(1, )](indices, counts, out, n, n * k)
    return out


# ---------------------------------------------------------------- optimizer
# Row j = rows[r] is used only when it lies in [0, S) (S = rows of the parameter).
# With RENORM the row is swept twice: the first sweep writes v and sums the squares
# of the new values, the second recomputes each new value from the same inputs (v
# read back: this step's) and writes it scaled. The same math as one tile holding the
# row, one rounding, any row length, and a tile of BR x BL elements in registers.
@triton.jit
def _adam_b1zero_rows_kernel(p_ptr, v_ptr, last_ptr, rows_ptr, g_ptr, n, S, L, s_row, s_col, step, lr, beta2,
                             one_m_beta2, log2_beta2, eps, bc2_sqrt, HAS_ROWS: tl.constexpr, RENORM: tl.constexpr,
                             OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < n
    r64 = r.to(tl.int64)
    if HAS_ROWS:
        j = tl.load(rows_ptr + r64, mask=r_ok, other=0)
    else:
        j = r64
    j_ok = r_ok & (j >= 0) & (j < S)
    last = tl.load(last_ptr + j, mask=j_ok, other=0)
    missed = (step - 1 - last).to(tl.float32)
    # beta2^missed; exactly 1 for a row updated last step
    decay = tl.where(missed == 0.0, 1.0, tl.exp2(missed * log2_beta2))
    base = j * s_row
    g_base = r64 * L
    if RENORM:
        sq = tl.zeros((BR, ), dtype=tl.float32)
    for c0 in range(0, L, BL):
        c = c0 + tl.arange(0, BL)
        ok = j_ok[:, None] & (c < L)[None, :]
        off = base[:, None] + c.to(tl.int64)[None, :] * s_col
        g = tl.load(g_ptr + g_base[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=ok, other=0.0) * decay[:, None]
        v = v * beta2 + one_m_beta2 * g * g
        tl.store(v_ptr + off, v, mask=ok)
        p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32) - lr * (g / (tl.sqrt(v) / bc2_sqrt + eps))
        if RENORM:
            sq += tl.sum(p * p, axis=1)  # 0 where masked: g = 0 gives p = 0
        else:
            tl.store(p_ptr + off, _cast_out(p, OUT_DTYPE, RNE_FIX), mask=ok)
    if RENORM:
        nrm = tl.maximum(tl.sqrt(sq), 1e-12)
        tl.debug_barrier()  # the v written above is visible to every thread of the program
        for c0 in range(0, L, BL):
            c = c0 + tl.arange(0, BL)
            ok = j_ok[:, None] & (c < L)[None, :]
            off = base[:, None] + c.to(tl.int64)[None, :] * s_col
            g = tl.load(g_ptr + g_base[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + off, mask=ok, other=0.0)
            p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32) - lr * (g / (tl.sqrt(v) / bc2_sqrt + eps))
            tl.store(p_ptr + off, _cast_out(p / nrm[:, None], OUT_DTYPE, RNE_FIX), mask=ok)
    tl.store(last_ptr + j, step + tl.zeros_like(last), mask=j_ok)


def _adam_blocks_gpu(L: int) -> tuple[int, int]:
    # 512 elements a program (4 per thread at 4 warps): 23-72 registers, occupancy
    # 44-100% on sm_80 / sm_90a, renorm included. With no alignment to vectorise on
    # (W_enc's columns are strided rows) each element brings three 64-bit addresses:
    # 2048 elements a program took 241 registers, 1024 took 134.
    if L == 1:
        return 512, 1  # b_enc, threshold
    bl = 64 if L <= 64 else 512  # three tiles in all: short rows, and every real row
    return 512 // bl, bl


def _adam_blocks(L: int) -> tuple[int, int]:
    """(BR rows, BL elements) per program; at 4 warps."""
    if _interpret():
        bl = min(triton.next_power_of_2(L), 1024)
        return max(1, min(64, 4096 // bl)), bl
    return _adam_blocks_gpu(L)


def adam_b1zero_rows_(param, v, last, rows, grad, *, step, lr, beta2, eps, sparse_dim, renorm=False):
    """Launcher of the fused step; same contract as reference.adam_b1zero_rows_."""
    import math

    from ..reference import row_view

    P = row_view(param, sparse_dim)
    n = rows.numel() if rows is not None else 1
    S, L = P.shape
    if n == 0 or L == 0:
        return
    s_row, s_col = P.stride()
    g = grad.reshape(n, L).contiguous()
    BR, BL = _adam_blocks(L)
    _adam_b1zero_rows_kernel[(triton.cdiv(n, BR), )](
        param,
        v,
        last,
        rows if rows is not None else last,
        g,
        n,
        S,
        L,
        s_row,
        s_col,
        int(step),
        float(lr),
        float(beta2),
        float(1 - beta2),
        # beta2 = 0: 2^(-200 k) is 0 in float32 for every k >= 1 (and -inf * 0 would be NaN)
        math.log2(beta2) if beta2 > 0 else -200.0,
        float(eps),
        float((1 - beta2**step)**0.5),
        HAS_ROWS=rows is not None,
        RENORM=bool(renorm),
        OUT_DTYPE=_TL_DTYPE[param.dtype],
        RNE_FIX=_rne_fix(param.dtype),
        BR=BR,
        BL=BL)


# ------------------------------------------------------- the compile space
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(kernel, dtype, config, ptrs, ints, floats=(), ones=(), num_warps=4, num_stages=3, divisible=(), **constexprs):
    """One compile: argument types as the launcher passes them on a GPU; `divisible`
    the pointers (16-byte aligned) and integers (multiples of 16) Triton sees as such."""
    sig = dict(ptrs)
    sig.update({a: "i32" for a in ints})
    sig.update({a: "fp32" for a in floats})
    # integer arguments the layout fixes at 1: Triton specialises them as constants
    sig.update({a: "constexpr" for a in ones})
    sig.update({a: "constexpr" for a in constexprs})
    consts = dict(constexprs)
    consts.update({a: 1 for a in ones})
    return {
        "kernel": kernel, "dtype": NAME_OF[dtype], "config": dict(config, warps=num_warps, stages=num_stages),
        "signature": sig, "constexprs": consts, "num_warps": num_warps, "num_stages": num_stages,
        "divisible": tuple(d for d in divisible if d in sig and sig[d] != "constexpr")
    }


def gpu_configs(cc: int) -> list[dict]:
    """Every compile the launchers and autotune spaces of this module can ask for on a
    GPU of compute capability family cc (80 or 90), for benchmarks/kernel_resources.py.

    Each entry: kernel (a function name in this module), dtype (of the data), config
    (what the launcher chose, for the table), signature and constexprs (for
    triton.compiler.ASTSource), num_warps, num_stages, divisible (the arguments to
    compile as 16-divisible). Triton specialises every launch on which pointers are
    16-byte aligned and which integers are multiples of 16 (and on integers equal to
    1, which only removes work; strides a layout fixes at 1 are listed as such):
    the encoder is compiled as its launcher picks tiles (its "aligned" space with x,
    W_enc, d_in and the row stride divisible, nothing else; its "unaligned" space with
    nothing); the memory-bound kernels both with everything aligned ("aligned", the
    usual case) and with nothing ("unaligned").
    """
    fam = _arch_family(cc)
    out = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # encoder: dense acts, the active set, the active set and the band
    modes = (("dense", True, False), ("sparse", False, False), ("sparse+band", False, True))
    for dt in dtypes:
        t = _TL_NAME[dt]
        for precision in ("ieee", "tf32") if dt == torch.float32 else ("ieee", ):
            for aligned in (True, False):
                for bm, bn, bk, w, st in _ENCODE_SPACE[(fam, _encode_kind(dt, precision), aligned)]:
                    for mode, dense, band in modes:
                        out.append(
                            _case(
                                "_jumprelu_encode_kernel", dt, {
                                    "BM": bm, "BN": bn, "BK": bk, "mode": mode, "precision": precision,
                                    "spec": "aligned" if aligned else "unaligned"
                                }, {
                                    "x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "thr_ptr": "*fp32",
                                    "a_idx_ptr": "*i64", "a_val_ptr": f"*{t}", "a_cnt_ptr": "*i32",
                                    "band_idx_ptr": "*i64", "band_cnt_ptr": "*i32", "step_cnt_ptr": "*i32",
                                    "dense_ptr": f"*{t}"
                                }, ("N", "D", "S", "SW", "a_cap", "band_cap", "N_BUCKET"), ("half_bw", ), (), w, st,
                                ("x_ptr", "w_ptr", "D", "SW") if aligned else (), OUT_DTYPE=_TL_DTYPE[dt],
                                PRECISION=precision, UPCAST=False, RNE_FIX=False, WRITE_DENSE=dense, WRITE_BAND=band,
                                BM=bm, BN=bn, BK=bk))
    bds = sorted({_bd_gpu(d) for d in (1, 128, 129, 1 << 20)})
    specs = (("aligned", True), ("unaligned", False))

    def small(kernel, dt, config, ptrs, ints, floats=(), ones=(), **constexprs):
        for spec, aligned in specs:
            div = tuple(ptrs) + tuple(ints) if aligned else ()
            out.append(_case(kernel, dt, dict(config, spec=spec), ptrs, ints, floats, ones, divisible=div,
                             **constexprs))

    for dt in dtypes:
        t = _TL_NAME[dt]
        for odt in sorted({dt, torch.float32}, key=str):
            o = _TL_NAME[odt]
            for bd in bds:
                for has_bias in (False, True):
                    small("_sparse_decode_kernel", dt, {"KB": _KB, "BD": bd, "bias": has_bias, "out": o}, {
                        "idx_ptr": "*i64", "val_ptr": f"*{t}", "cnt_ptr": "*i32", "w_ptr": f"*{t}", "bias_ptr": f"*{t}",
                        "out_ptr": f"*{o}"
                    }, ("K", "D", "S"), HAS_BIAS=has_bias, OUT_DTYPE=_TL_DTYPE[odt], RNE_FIX=False, KB=_KB, BD=bd)
                small("_sparse_gather_dot_kernel", dt, {"KB": _KB, "BD": bd, "grad": o},
                      {"g_ptr": f"*{o}", "idx_ptr": "*i64", "cnt_ptr": "*i32", "w_ptr": f"*{t}", "out_ptr": f"*{o}"},
                      ("K", "D", "S"), OUT_DTYPE=_TL_DTYPE[odt], RNE_FIX=False, KB=_KB, BD=bd)
        for bd in bds:
            small("_sparse_scatter_rows_kernel", dt, {"EB": _KB, "BD": bd},
                  {"order_ptr": "*i64", "start_ptr": "*i64", "coef_ptr": f"*{t}", "g_ptr": f"*{t}", "out_ptr": f"*{t}"},
                  ("K", "D", "E"), OUT_DTYPE=_TL_DTYPE[dt], RNE_FIX=False, EB=_KB, BD=bd)
    # optimizer: layouts of the parameters SparseAdamB1Zero updates
    lengths = sorted({_adam_blocks_gpu(L) for L in [1 << i for i in range(21)] + [3, 33, 65, 4097]})
    layouts = (
        ("rows", True, ("s_col", )),  # W_dec [d_sae, d_in] by rows: s_col = 1
        ("columns", True, ("s_row", )),  # W_enc [d_in, d_sae] by columns: s_row = 1
        ("whole", False, ("s_col", )))  # b_dec: the whole tensor as one row
    for dt in dtypes:
        t = _TL_NAME[dt]
        for gdt in sorted({dt, torch.float32}, key=str):
            for layout, has_rows, ones in layouts:
                for br, bl in lengths:
                    if bl == 1 and layout != "rows":
                        continue  # L = 1 (b_enc, threshold) only comes as [d_sae, 1] rows
                    one = ("s_row", "s_col", "L") if bl == 1 else ones  # a [d_sae, 1] view: strides (1, 1)
                    for renorm in (False, True) if has_rows else (False, ):
                        small("_adam_b1zero_rows_kernel", dt,
                              {"BR": br, "BL": bl, "layout": layout, "renorm": renorm, "grad": _TL_NAME[gdt]}, {
                                  "p_ptr": f"*{t}", "v_ptr": "*fp32", "last_ptr": "*i64", "rows_ptr": "*i64",
                                  "g_ptr": f"*{_TL_NAME[gdt]}"
                              }, tuple(a for a in ("n", "S", "L", "s_row", "s_col", "step") if a not in one),
                              ("lr", "beta2", "one_m_beta2", "log2_beta2", "eps", "bc2_sqrt"), one, HAS_ROWS=has_rows,
                              RENORM=renorm, OUT_DTYPE=_TL_DTYPE[dt], RNE_FIX=False, BR=br, BL=bl)
    # the range check of the sae_fast_triton ops (locate_sparse): no float data, listed
    # under each dtype like the kernels it guards
    for dt in dtypes:
        for bk in (1, 2, 4, 8, 16, 32, 64):
            small("_first_bad_slot_kernel", dt, {"BN": 16, "BK": bk},
                  {"idx_ptr": "*i64", "cnt_ptr": "*i32", "out_ptr": "*i64", "NONE": "i64"}, ("N", "K", "S"), BN=16,
                  BK=bk)
        small("_bad_values_kernel", dt, {}, {"idx_ptr": "*i64", "cnt_ptr": "*i32", "out_ptr": "*i64", "NK": "i64"},
              ("N", ))
    return out
