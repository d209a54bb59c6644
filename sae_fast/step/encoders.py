"""The training encoders: one pass over pre gives the active set, the band and the step
count of every token (docs/DESIGN.md, "The training step").

    encoder(x', W_enc, b_enc, threshold, half_bandwidth, *, band=True) -> EncodedSets

The backends whose forward GEMM is dense (torch, cpu, cuda) use `chunked_pre_encoder`:
pre is formed one chunk of features at a time, within a fixed workspace, and each
chunk is compacted before the next (the cpu/cuda backends select each chunk with the
compiled sae_fast::jumprelu_select, one read of pre). The Triton encoder
(sae_fast.backends.triton) never forms pre at all. Nothing of shape [tokens, d_sae]
is created here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparse import compact, valid_slots


@dataclass
class EncodedSets:
    a_idx: torch.Tensor  # int64 [N, capA]  active set A (NaN pre included)
    a_val: torch.Tensor  # T     [N, capA]  pre on A (= acts), 0 on padding
    a_cnt: torch.Tensor  # int32 [N]
    band_idx: torch.Tensor  # int64 [N, capN]  band N = {|pre - threshold| < bandwidth / 2}
    band_cnt: torch.Tensor  # int32 [N]
    step_sum: torch.Tensor  # float32 scalar: sum_b sum_j H(pre - threshold)


# Workspace of the chunked encoder, per (token, feature) of a chunk at its peak:
# pre in the SAE dtype, its float32 copy, the float32 |pre - threshold| of the band
# test and three bool masks (dtype + 11 bytes). 1 GiB holds 4096 tokens x 20096
# bf16 features; an unchunked pre at 4096 x 2^20 would take 4096 * 2^20 * 13 B = 52 GiB.
ENCODE_WORKSPACE_BYTES = 1 << 30


def encode_chunk_features(n_tokens: int, d_sae: int, dtype: torch.dtype, workspace_bytes: int | None = None) -> int:
    """Features per chunk so that the chunk's workspace stays within workspace_bytes."""
    ws = ENCODE_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    if ws <= 0:
        raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes!r}")
    per_feature = max(n_tokens, 1) * (torch.finfo(dtype).bits // 8 + 11)
    c = max(1, ws // per_feature)
    if c >= d_sae:
        return d_sae
    return max(128, c // 128 * 128)  # whole GEMM tiles


def _merge_rows(parts):
    """Join per-chunk (idx [N, c_i], val [N, c_i] or None, cnt [N]) lists row by row,
    keeping increasing feature order (chunks are in feature order)."""
    if len(parts) == 1:
        return parts[0]
    idx = torch.cat([p[0] for p in parts], 1)
    valid = torch.cat([valid_slots(p[0], p[2]) for p in parts], 1)
    pos, _, cnt = compact(valid)  # where each row's valid slots sit in the concatenation
    keep = valid_slots(pos, cnt)
    out_idx = torch.where(keep, idx.gather(1, pos), 0)
    out_val = None
    if parts[0][1] is not None:
        val = torch.cat([p[1] for p in parts], 1)
        out_val = torch.where(keep, val.gather(1, pos), torch.zeros((), dtype=val.dtype, device=val.device))
    return out_idx, out_val, cnt


def chunk_pre(xin, W_enc, b_enc, threshold, c0, c1):
    """pre of features [c0, c1) (the SAE dtype and float32), their thresholds (float32)
    and the active mask (NaN pre counts as active)."""
    pre = xin @ W_enc[:, c0:c1] + b_enc[c0:c1]
    thr = threshold[c0:c1].float()
    pre32 = pre.float()
    return pre, pre32, thr, ((pre32 > thr) & (pre32 > 0)) | torch.isnan(pre32)


def chunked_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth: float, *, band: bool = True,
                        chunk_features: int | None = None, select=None) -> EncodedSets:
    """The encoder of the backends whose forward GEMM is dense (torch, cpu, cuda): pre for
    one chunk of features at a time, compacted before the next; the sets are merged per
    row. With band=False the band is left empty (inference). Indices are int64
    throughout: tokens x d_sae passes 2^31 at 4096 x 2^20.

    select: an implementation of sae_fast::jumprelu_select (the cpu/cuda backends' compiled
    op, or the tests' emulated CUDA kernel) that selects each chunk in one read of pre;
    None runs the PyTorch definition. The two give the same sets bit for bit; the op's
    a_val carries no autograd graph."""
    n, s = x.shape[0], W_enc.shape[1]
    c = chunk_features or encode_chunk_features(n, s, x.dtype)
    if select is not None:
        return _selected_chunks(x, W_enc, b_enc, threshold, half_bandwidth, band, c, select)
    hb = torch.tensor(half_bandwidth, dtype=torch.float32)
    a_parts, band_parts = [], []
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    for c0 in range(0, s, c):
        pre, pre32, thr, a_mask = chunk_pre(x, W_enc, b_enc, threshold, c0, min(s, c0 + c))
        ai, av, ac = compact(a_mask, pre)
        a_parts.append((ai + c0, av, ac))
        if band:
            bi, _, bc = compact((pre32 - thr).abs() < hb)
            band_parts.append((bi + c0, None, bc))
        step_sum += (pre32 > thr).sum().float()  # exact: int64 count, one rounding per chunk
        del pre, pre32, a_mask
    if not a_parts:  # d_sae >= 1 always; kept for clarity
        raise ValueError("W_enc has no features")
    a_idx, a_val, a_cnt = _merge_rows(a_parts)
    a_idx = torch.where(valid_slots(a_idx, a_cnt), a_idx, 0)
    if band:
        band_idx, _, band_cnt = _merge_rows(band_parts)
        band_idx = torch.where(valid_slots(band_idx, band_cnt), band_idx, 0)
    else:
        band_idx = torch.zeros(n, 0, dtype=torch.int64, device=x.device)
        band_cnt = torch.zeros(n, dtype=torch.int32, device=x.device)
    return EncodedSets(a_idx, a_val, a_cnt, band_idx, band_cnt, step_sum)


@torch.no_grad()
def _selected_chunks(x, W_enc, b_enc, threshold, half_bandwidth, band, c, select) -> EncodedSets:
    """chunked_pre_encoder's loop with the selection in one op per chunk: the chunk's GEMM
    (pre formed exactly as chunk_pre forms it), then `select`, whose indices already
    carry the chunk's offset and whose padding is already 0."""
    s = W_enc.shape[1]
    thr = threshold.float().contiguous()
    a_parts, band_parts = [], []
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    for c0 in range(0, s, c):
        c1 = min(s, c0 + c)
        pre = x @ W_enc[:, c0:c1]
        pre += b_enc[c0:c1]  # in place: the same rounding as `x @ W + b`, one [tokens, c] buffer less
        ai, av, ac, bi, bc, steps = select(pre, thr[c0:c1], half_bandwidth, band=band, col_offset=c0)
        del pre
        a_parts.append((ai, av, ac))
        band_parts.append((bi, None, bc))
        step_sum += steps.sum().float()  # exact: int64 count, one rounding per chunk (as the PyTorch path)
    if not a_parts:
        raise ValueError("W_enc has no features")
    a_idx, a_val, a_cnt = _merge_rows(a_parts)
    if band:
        band_idx, _, band_cnt = _merge_rows(band_parts)
    else:  # every chunk gave [N, 0] and zero counts
        band_idx, _, band_cnt = band_parts[0]
    return EncodedSets(a_idx, a_val, a_cnt, band_idx, band_cnt, step_sum)
