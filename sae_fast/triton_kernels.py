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
                             decay, second moment, update and optional row renormalisation in
                             one pass over the touched rows of a parameter.

Offsets are int64 wherever tokens x d_sae or d_sae x d_in can pass 2^31.
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse import valid_slots

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
@triton.jit
def _jumprelu_encode_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr,
    a_idx_ptr, a_val_ptr, a_cnt_ptr, n_idx_ptr, n_cnt_ptr, h_cnt_ptr, dense_ptr,
    N, D, S, SW, a_cap, n_cap, half_bw,
    OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, RNE_FIX: tl.constexpr,
    WRITE_DENSE: tl.constexpr, WRITE_BAND: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    m_ok = rm < N
    n_ok = rn < S
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < D
        xa = tl.load(x_ptr + rm64[:, None] * D + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + rk.to(tl.int64)[:, None] * SW + rn64[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            xa = xa.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(xa, wb, acc, input_precision=PRECISION)
    # Round exactly as the dense reference does: (x @ W) to the dtype, then + b_enc in the dtype.
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    pre = _cast_out(_cast_out(acc, OUT_DTYPE, RNE_FIX).to(tl.float32) + bias[None, :], OUT_DTYPE, RNE_FIX).to(tl.float32)
    thr = tl.load(thr_ptr + rn, mask=n_ok, other=0.0)
    ok = m_ok[:, None] & n_ok[None, :]
    is_nan = pre != pre
    above = (pre > thr[None, :]) & ok
    if WRITE_DENSE:
        # relu(pre) * (pre > thr), NaN propagating like the reference
        acts = tl.where(is_nan, pre, tl.where(above & (pre > 0), pre, 0.0))
        tl.store(dense_ptr + rm64[:, None] * S + rn64[None, :], acts.to(OUT_DTYPE), mask=ok)  # exact: pre is already rounded
    else:
        active = ((above & (pre > 0)) | is_nan) & ok
        a_i = active.to(tl.int32)
        a_pos = tl.cumsum(a_i, axis=1) - a_i
        a_base = tl.atomic_add(a_cnt_ptr + rm, tl.sum(a_i, axis=1), mask=m_ok)
        a_slot = a_base[:, None] + a_pos
        # Slots past the capacity are not stored, but the counter still counts
        # them: the launcher sees counts > capacity and reruns. Never truncation.
        a_st = active & (a_slot < a_cap)
        a_off = rm64[:, None] * a_cap + a_slot
        tl.store(a_idx_ptr + a_off, rn64[None, :] + tl.zeros((BM, BN), dtype=tl.int64), mask=a_st)
        tl.store(a_val_ptr + a_off, pre.to(OUT_DTYPE), mask=a_st)
        if WRITE_BAND:
            band = (tl.abs(pre - thr[None, :]) < half_bw) & ok
            n_i = band.to(tl.int32)
            n_pos = tl.cumsum(n_i, axis=1) - n_i
            n_base = tl.atomic_add(n_cnt_ptr + rm, tl.sum(n_i, axis=1), mask=m_ok)
            n_slot = n_base[:, None] + n_pos
            tl.store(n_idx_ptr + rm64[:, None] * n_cap + n_slot, rn64[None, :] + tl.zeros((BM, BN), dtype=tl.int64),
                     mask=band & (n_slot < n_cap))
            tl.atomic_add(h_cnt_ptr + rm, tl.sum(above.to(tl.int32), axis=1), mask=m_ok)


def _encode_blocks(n: int, d: int, s: int):
    if _interpret():
        # The interpreter runs numpy per program: big tiles, few programs.
        return 16, 32, 32
    return 64, 128, 32


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


def _launch_encode(x, W_enc, b_enc, threshold, *, dense, a_cap=0, n_cap=0, half_bw=0.0, band=False, out=None):
    # W_enc may be a column slice W[:, c0:c1] of a wider matrix (row stride SW > s):
    # a chunk of features, encoded without copying it out.
    n, d = x.shape
    s = W_enc.shape[1]
    if s and W_enc.stride(1) != 1:
        raise ValueError(f"jumprelu_encode: W_enc must have unit column stride, got strides {W_enc.stride()}")
    sw = W_enc.stride(0) if d > 1 else s
    BM, BN, BK = _encode_blocks(n, d, s)
    grid = (triton.cdiv(n, BM), triton.cdiv(s, BN))
    dev = x.device
    if dense:
        acts = out if out is not None else torch.empty(n, s, dtype=x.dtype, device=dev)
        if n:
            _jumprelu_encode_kernel[grid](
                x, W_enc, b_enc, threshold, acts, acts, acts, acts, acts, acts, acts,
                n, d, s, sw, 0, 0, 0.0,
                OUT_DTYPE=_TL_DTYPE[x.dtype], PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), RNE_FIX=_rne_fix(x.dtype), WRITE_DENSE=True, WRITE_BAND=False,
                BM=BM, BN=BN, BK=BK,
            )
        return acts
    o = out or {}
    a_idx = o.get("a_idx", torch.empty(n, a_cap, dtype=torch.int64, device=dev))
    a_val = o.get("a_val", torch.empty(n, a_cap, dtype=x.dtype, device=dev))
    a_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    n_idx = o.get("n_idx", torch.empty(n, n_cap, dtype=torch.int64, device=dev))
    n_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    h_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    if n:
        _jumprelu_encode_kernel[grid](
            x, W_enc, b_enc, threshold, a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt, a_val,
            n, d, s, sw, a_cap, n_cap, float(half_bw),
            OUT_DTYPE=_TL_DTYPE[x.dtype], PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), RNE_FIX=_rne_fix(x.dtype), WRITE_DENSE=False, WRITE_BAND=band,
            BM=BM, BN=BN, BK=BK,
        )
    return a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt


def _round_cap(c: int) -> int:
    return max(16, (c + 15) // 16 * 16)


# Last capacity that fitted, per (device, d_sae): training steps repeat their L0,
# so after the first step the encoder runs once per call.
_CAP_HINT: dict = {}


def jumprelu_encode_sets(x, W_enc, b_enc, threshold, *, band: bool, half_bw: float = 0.0, capacity=None, out=None):
    """Fused encoder, sparse output. Returns (a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt) with
    padding slots zeroed; reruns with the exact capacity when a row overflows."""
    n, s = x.shape[0], W_enc.shape[1]
    key = (x.device, s)
    a_cap, n_cap = capacity or _CAP_HINT.get(key, (64, 64))
    a_cap, n_cap = min(a_cap, s), min(n_cap, s)
    for _ in range(2):
        res = _launch_encode(x, W_enc, b_enc, threshold, dense=False, a_cap=a_cap, n_cap=n_cap if band else 0,
                             half_bw=half_bw, band=band, out=out)
        a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt = res
        a_max = int(a_cnt.max()) if n else 0
        n_max = int(n_cnt.max()) if n and band else 0
        if a_max <= a_cap and n_max <= (n_cap if band else 0):
            break
        # Overflow: the counters hold the exact per-row totals; rerun with room for all.
        a_cap, n_cap = max(a_cap, a_max), max(n_cap, n_max)
        out = None
    else:  # pragma: no cover - the second pass always fits: capacities equal the exact maxima
        raise RuntimeError("jumprelu_encode: capacity retry did not converge")
    _CAP_HINT[key] = (_round_cap(a_max + a_max // 4), _round_cap(n_max + n_max // 4))
    # Padding contract of SparseActs: slots k >= counts[b] hold index 0 and value 0.
    a_valid = valid_slots(a_idx, a_cnt)
    a_idx = torch.where(a_valid, a_idx, 0)
    a_val = torch.where(a_valid, a_val, torch.zeros((), dtype=a_val.dtype, device=x.device))
    if band:
        n_valid = valid_slots(n_idx, n_cnt)
        n_idx = torch.where(n_valid, n_idx, 0)
    return a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt


# ------------------------------------------------------------ decode / gather
@triton.jit
def _sparse_decode_kernel(
    idx_ptr, val_ptr, cnt_ptr, w_ptr, bias_ptr, out_ptr, K, D,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    if HAS_BIAS:
        acc = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BD,), dtype=tl.float32)
    c = tl.load(cnt_ptr + b)
    for k0 in range(0, c, KB):
        rk = k0 + tl.arange(0, KB)
        k_ok = rk < c
        j = tl.load(idx_ptr + b * K + rk, mask=k_ok, other=0)
        v = tl.load(val_ptr + b * K + rk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + j[:, None] * D + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    tl.store(out_ptr + b * D + rd, _cast_out(acc, OUT_DTYPE, RNE_FIX), mask=d_ok)


@triton.jit
def _sparse_gather_dot_kernel(
    g_ptr, idx_ptr, cnt_ptr, w_ptr, out_ptr, K, D,
    OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * KB + tl.arange(0, KB)
    c = tl.load(cnt_ptr + b)
    k_ok = rk < c
    j = tl.load(idx_ptr + b * K + rk, mask=k_ok, other=0)
    acc = tl.zeros((KB,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        g = tl.load(g_ptr + b * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + j[:, None] * D + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + b * K + rk, _cast_out(tl.where(k_ok, acc, 0.0), OUT_DTYPE, RNE_FIX), mask=rk < K)


@triton.jit
def _sparse_scatter_rows_kernel(
    order_ptr, start_ptr, coef_ptr, g_ptr, out_ptr, K, D,
    OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr, EB: tl.constexpr, BD: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    e0 = tl.load(start_ptr + j)
    e1 = tl.load(start_ptr + j + 1)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for e in range(e0, e1, EB):
        re = e + tl.arange(0, EB)
        e_ok = re < e1
        slot = tl.load(order_ptr + re, mask=e_ok, other=0)
        c = tl.load(coef_ptr + slot, mask=e_ok, other=0.0).to(tl.float32)
        row = slot // K
        g = tl.load(g_ptr + row[:, None] * D + rd[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(c[:, None] * g.to(tl.float32), axis=0)
    tl.store(out_ptr + j * D + rd, _cast_out(acc, OUT_DTYPE, RNE_FIX), mask=d_ok)


def _bd(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 16)), 256 if _interpret() else 512)


def sparse_decode(indices, values, counts, W, bias, out=None, out_dtype=None):
    n, k = indices.shape
    d = W.shape[1]
    out_dtype = out_dtype or W.dtype
    if out_dtype not in (W.dtype, torch.float32):
        raise TypeError(f"sparse_decode: out_dtype must be W's dtype ({W.dtype}) or float32, got {out_dtype}")
    out = out if out is not None else torch.empty(n, d, dtype=out_dtype, device=W.device)
    if n:
        BD = _bd(d)
        _sparse_decode_kernel[(n, triton.cdiv(d, BD))](
            indices, values, counts, W, bias if bias is not None else W, out, k, d,
            HAS_BIAS=bias is not None, OUT_DTYPE=_TL_DTYPE[out.dtype], RNE_FIX=_rne_fix(out.dtype), KB=16, BD=BD,
        )
    return out


def sparse_gather_dot(grad, indices, counts, W, out=None):
    n, k = indices.shape
    d = W.shape[1]
    # Output in grad's dtype: W's, or float32 when the caller wants the dots unrounded.
    out = out if out is not None else torch.empty(n, k, dtype=grad.dtype, device=W.device)
    if n and k:
        KB = 16
        _sparse_gather_dot_kernel[(n, triton.cdiv(k, KB))](
            grad, indices, counts, W, out, k, d, OUT_DTYPE=_TL_DTYPE[grad.dtype], RNE_FIX=_rne_fix(grad.dtype),
            KB=KB, BD=_bd(d),
        )
    return out


def sparse_scatter_rows(coef, indices, counts, grad, d_sae, out=None):
    n, k = indices.shape
    d = grad.shape[1]
    out = out if out is not None else torch.empty(d_sae, d, dtype=grad.dtype, device=grad.device)
    # Group entries by feature: padding slots get the key d_sae and sort last.
    key = torch.where(valid_slots(indices, counts), indices, d_sae).reshape(-1)
    order = torch.sort(key, stable=True).indices  # stable: (b, k) order inside a feature
    start = torch.zeros(d_sae + 1, dtype=torch.int64, device=grad.device)
    start[1:] = torch.cumsum(torch.bincount(key, minlength=d_sae + 1)[:d_sae], 0)
    if d_sae == 0 or d == 0:
        return out
    BD = _bd(d)
    _sparse_scatter_rows_kernel[(d_sae, triton.cdiv(d, BD))](
        order, start, coef, grad, out, max(k, 1), d, OUT_DTYPE=_TL_DTYPE[grad.dtype], RNE_FIX=_rne_fix(grad.dtype),
        EB=16, BD=BD,
    )
    return out


# ---------------------------------------------------------------- optimizer
@triton.jit
def _adam_b1zero_rows_kernel(
    p_ptr, v_ptr, last_ptr, rows_ptr, g_ptr, n, L, s_row, s_col,
    step, lr, beta2, one_m_beta2, log2_beta2, eps, bc2_sqrt,
    HAS_ROWS: tl.constexpr, RENORM: tl.constexpr, OUT_DTYPE: tl.constexpr, RNE_FIX: tl.constexpr,
    BR: tl.constexpr, BL: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < n
    r64 = r.to(tl.int64)
    if HAS_ROWS:
        j = tl.load(rows_ptr + r64, mask=r_ok, other=0)
    else:
        j = r64
    last = tl.load(last_ptr + j, mask=r_ok, other=0)
    missed = (step - 1 - last).to(tl.float32)
    # beta2^missed; exactly 1 for a row updated last step
    decay = tl.where(missed == 0.0, 1.0, tl.exp2(missed * log2_beta2))
    base = j * s_row
    if RENORM:
        sq = tl.zeros((BR,), dtype=tl.float32)
    for c0 in range(0, L, BL):
        c = c0 + tl.arange(0, BL)
        ok = r_ok[:, None] & (c < L)[None, :]
        off = base[:, None] + c.to(tl.int64)[None, :] * s_col
        g = tl.load(g_ptr + r64[:, None] * L + c[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=ok, other=0.0) * decay[:, None]
        v = v * beta2 + one_m_beta2 * g * g
        tl.store(v_ptr + off, v, mask=ok)
        p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32) - lr * (g / (tl.sqrt(v) / bc2_sqrt + eps))
        if RENORM:
            # one tile holds the whole row (BL >= L): normalise before the one rounding
            sq += tl.sum(p * p, axis=1)
            p = p / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]
        tl.store(p_ptr + off, _cast_out(p, OUT_DTYPE, RNE_FIX), mask=ok)
    tl.store(last_ptr + j, step + tl.zeros_like(last), mask=r_ok)


def adam_b1zero_rows_(param, v, last, rows, grad, *, step, lr, beta2, eps, sparse_dim, renorm=False):
    """Launcher of the fused step; same contract as reference.adam_b1zero_rows_."""
    import math

    from .reference import row_view

    P = row_view(param, sparse_dim)
    n = rows.numel() if rows is not None else 1
    L = P.shape[1]
    if n == 0 or L == 0:
        return
    s_row, s_col = P.stride()
    g = grad.reshape(n, L).contiguous()
    BL = triton.next_power_of_2(L) if renorm else min(triton.next_power_of_2(L), 1024)
    if renorm and BL > 16384:
        raise ValueError(f"renorm needs a row of at most 16384 elements in one tile, got {L}")
    # Short rows (b_enc, threshold: L = 1) go many to a program; long rows one each.
    BR = max(1, min(64, 4096 // BL))
    _adam_b1zero_rows_kernel[(triton.cdiv(n, BR),)](
        param, v, last, rows if rows is not None else last, g, n, L, s_row, s_col,
        int(step), float(lr), float(beta2), float(1 - beta2),
        # beta2 = 0: 2^(-200 k) is 0 in float32 for every k >= 1 (and -inf * 0 would be NaN)
        math.log2(beta2) if beta2 > 0 else -200.0, float(eps), float((1 - beta2**step) ** 0.5),
        HAS_ROWS=rows is not None, RENORM=bool(renorm), OUT_DTYPE=_TL_DTYPE[param.dtype],
        RNE_FIX=_rne_fix(param.dtype), BR=BR, BL=BL,
    )
