"""The sparse training step (DESIGN.md, "Training"), written once over any backend.

Forward: an encoder gives the active set A (indices, pre values) and the band
N = {|pre - threshold| < eps/2} per token; the decoder is a sparse gather-sum.
Backward touches only A and N:

    dW_dec   = scatter_rows(acts_A, g)                 db_dec = sum_b g_b
    dacts    = gather_dot(g, W_dec) on A and on N      dpre   = dacts on A
    dthr_j   = -(thr_j/eps) sum_{b: j in N_b} dacts[b,j]  -  (g_step/eps) |{b: j in N_b}|
    dW_encᵀ  = scatter_rows(dpre_A, x')                db_enc = scatter_rows(dpre_A, 1)
    dx'      = decode(dpre_A, W_encᵀ)                  (and db_dec -= sum dx' if b_dec is applied to x)

Two ways to run it:

- `sparse_jumprelu_sae_loss`: an autograd Function; `loss.backward()` fills
  full-size `.grad` tensors (zero outside the touched rows), for any optimizer.
- `sparse_jumprelu_sae_row_grads`: the lean step. Forward and backward in one
  call, no autograd graph, and gradients only for the touched features
  U = A ∪ N (`RowGrads`): at d_sae = 2^20 a full-size bf16 W_enc + W_dec
  gradient is 9.7 GB, the compact one min(d_sae, tokens x (L0 + band)) rows.
  sae_fast.optim.SparseAdamB1Zero.step_rows applies it.

A backend supplies `encoder(x', W_enc, b_enc, threshold, half_bandwidth) -> EncodedSets`
and a `Prims` with decode / gather_dot / scatter_rows. Nothing of shape
[tokens, d_sae] is created here; the dense-GEMM encoder of the torch/cpu/cuda
backends (`chunked_pre_encoder`) forms pre one chunk of features at a time,
within a fixed workspace (the cpu/cuda backends select each chunk with the fused
op sae_fast::jumprelu_select, `fused_pre_encoder`); the Triton encoder never forms it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference, select_ops
from .outputs import TrainingOutput
from .sparse import compact, valid_slots


@dataclass
class EncodedSets:
    a_idx: torch.Tensor  # int64 [N, capA]  active set A (NaN pre included)
    a_val: torch.Tensor  # T     [N, capA]  pre on A (= acts), 0 on padding
    a_cnt: torch.Tensor  # int32 [N]
    n_idx: torch.Tensor  # int64 [N, capN]  band N
    n_cnt: torch.Tensor  # int32 [N]
    step_sum: torch.Tensor  # float32 scalar: sum_b sum_j H(pre - threshold)


@dataclass
class Prims:
    decode: Callable  # (indices, values, counts, W, bias) -> [N, D]
    gather_dot: Callable  # (grad, indices, counts, W) -> [N, K]
    scatter_rows: Callable  # (coef, indices, counts, grad, d_sae) -> [d_sae, D]


REFERENCE_PRIMS = Prims(reference.sparse_decode_raw, reference.sparse_gather_dot, reference.sparse_scatter_rows)
# The torch backend's lean step on CPU: the same primitives accumulating in float64,
# as the C++ CPU kernels do (cheap on a CPU; its float32 sums were up to 4x the dense
# path's error on some inputs). On CUDA the torch backend uses REFERENCE_PRIMS.
REFERENCE_PRIMS_F64_ACC = Prims(
    lambda i, v, c, W, b, out_dtype=None: reference.sparse_decode_raw(i, v, c, W, b, out_dtype, acc=torch.float64),
    lambda g, i, c, W: reference.sparse_gather_dot(g, i, c, W, acc=torch.float64),
    lambda co, i, c, g, s: reference.sparse_scatter_rows(co, i, c, g, s, acc=torch.float64),
)

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


def _chunk_pre(xin, W_enc, b_enc, threshold, c0, c1):
    """pre of features [c0, c1) (the SAE dtype and float32), their thresholds (float32)
    and the active mask (NaN pre counts as active)."""
    pre = xin @ W_enc[:, c0:c1] + b_enc[c0:c1]
    thr = threshold[c0:c1].float()
    pre32 = pre.float()
    return pre, pre32, thr, ((pre32 > thr) & (pre32 > 0)) | torch.isnan(pre32)


def chunked_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth: float, *, band: bool = True,
                        chunk_features: int | None = None, fused: bool = False) -> EncodedSets:
    """Encoder for backends whose forward GEMM is dense (torch, cpu, cuda): pre for one
    chunk of features at a time, compacted before the next; the sets are merged per row.
    With band=False the band is left empty (inference). Indices are int64 throughout:
    tokens x d_sae passes 2^31 at 4096 x 2^20.

    fused=True (the cpu/cuda backends, `fused_pre_encoder`) selects each chunk with the
    compiled sae_fast::jumprelu_select (one read of pre) where x's device has it, and
    falls back to this PyTorch path, the definition, elsewhere. The two give the same
    sets bit for bit; the op's a_val carries no autograd graph."""
    n, s = x.shape[0], W_enc.shape[1]
    c = chunk_features or encode_chunk_features(n, s, x.dtype)
    if fused and select_ops.available(x.device):
        return _fused_chunks(x, W_enc, b_enc, threshold, half_bandwidth, band, c)
    hb = torch.tensor(half_bandwidth, dtype=torch.float32)
    a_parts, n_parts = [], []
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    for c0 in range(0, s, c):
        pre, pre32, thr, a_mask = _chunk_pre(x, W_enc, b_enc, threshold, c0, min(s, c0 + c))
        ai, av, ac = compact(a_mask, pre)
        a_parts.append((ai + c0, av, ac))
        if band:
            ni, _, nc = compact((pre32 - thr).abs() < hb)
            n_parts.append((ni + c0, None, nc))
        step_sum += (pre32 > thr).sum().float()  # exact: int64 count, one rounding per chunk
        del pre, pre32, a_mask
    if not a_parts:  # d_sae >= 1 always; kept for clarity
        raise ValueError("W_enc has no features")
    a_idx, a_val, a_cnt = _merge_rows(a_parts)
    a_idx = torch.where(valid_slots(a_idx, a_cnt), a_idx, 0)
    if band:
        n_idx, _, n_cnt = _merge_rows(n_parts)
        n_idx = torch.where(valid_slots(n_idx, n_cnt), n_idx, 0)
    else:
        n_idx = torch.zeros(n, 0, dtype=torch.int64, device=x.device)
        n_cnt = torch.zeros(n, dtype=torch.int32, device=x.device)
    return EncodedSets(a_idx, a_val, a_cnt, n_idx, n_cnt, step_sum)


@torch.no_grad()
def _fused_chunks(x, W_enc, b_enc, threshold, half_bandwidth, band, c, select=None) -> EncodedSets:
    """chunked_pre_encoder's loop with the selection in one op per chunk: the chunk's GEMM
    (pre formed exactly as _chunk_pre forms it), then sae_fast::jumprelu_select (or
    `select`, another implementation of it: the tests' emulated CUDA kernel), whose
    indices already carry the chunk's offset and whose padding is already 0."""
    select = select or select_ops.jumprelu_select
    s = W_enc.shape[1]
    thr = threshold.float().contiguous()
    a_parts, n_parts = [], []
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    for c0 in range(0, s, c):
        c1 = min(s, c0 + c)
        pre = x @ W_enc[:, c0:c1]
        pre += b_enc[c0:c1]  # in place: the same rounding as `x @ W + b`, one [tokens, c] buffer less
        ai, av, ac, ni, nc, steps = select(pre, thr[c0:c1], half_bandwidth, band=band, col_offset=c0)
        del pre
        a_parts.append((ai, av, ac))
        n_parts.append((ni, None, nc))
        step_sum += steps.sum().float()  # exact: int64 count, one rounding per chunk (as the PyTorch path)
    if not a_parts:
        raise ValueError("W_enc has no features")
    a_idx, a_val, a_cnt = _merge_rows(a_parts)
    if band:
        n_idx, _, n_cnt = _merge_rows(n_parts)
    else:  # every chunk gave [N, 0] and zero counts
        n_idx, _, n_cnt = n_parts[0]
    return EncodedSets(a_idx, a_val, a_cnt, n_idx, n_cnt, step_sum)


def fused_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth: float, *, band: bool = True,
                      chunk_features: int | None = None, select=None) -> EncodedSets:
    """The cpu/cuda backends' encoder: chunked_pre_encoder with fused=True. select: another
    implementation of sae_fast::jumprelu_select to run instead (always used when given)."""
    if select is not None:
        c = chunk_features or encode_chunk_features(x.shape[0], W_enc.shape[1], x.dtype)
        return _fused_chunks(x, W_enc, b_enc, threshold, half_bandwidth, band, c, select)
    return chunked_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth, band=band,
                               chunk_features=chunk_features, fused=True)


# ------------------------------------------------------------------ compact rows
@dataclass
class RowGrads:
    """One step's gradients on the features it touched, U = A ∪ N (sorted, unique).

    Every feature outside `rows` has an exactly zero gradient in W_dec, W_enc,
    b_enc and threshold. W_enc holds the touched *columns* of dW_enc as rows
    ([n, d_in] = dW_enc[:, rows]ᵀ), so both matrices update row-contiguously.
    """

    rows: torch.Tensor  # int64 [n]
    W_enc: torch.Tensor  # [n, d_in], SAE dtype
    b_enc: torch.Tensor  # [n], SAE dtype
    threshold: torch.Tensor  # [n], float32
    W_dec: torch.Tensor  # [n, d_in], SAE dtype
    b_dec: torch.Tensor  # [d_in], SAE dtype

    def dense(self, d_sae: int) -> dict:
        """Full-size gradients by parameter name (tests, and handing over to dense optimizers)."""
        def rows_of(v, shape):
            out = torch.zeros(shape, dtype=v.dtype, device=v.device)
            out[self.rows] = v
            return out

        d_in = self.b_dec.shape[0]
        return {
            "W_enc": rows_of(self.W_enc, (d_sae, d_in)).t(),
            "b_enc": rows_of(self.b_enc, (d_sae,)),
            "threshold": rows_of(self.threshold, (d_sae,)),
            "W_dec": rows_of(self.W_dec, (d_sae, d_in)),
            "b_dec": self.b_dec.clone(),
        }

    def tensors(self) -> tuple:
        return (self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec)

    def norm(self) -> torch.Tensor:
        """L2 norm over every gradient entry (float32), as torch.nn.utils.clip_grad_norm_ measures it."""
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in self.tensors()]).norm()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_'s rule, in place: scale by min(1, max_norm / (norm + 1e-6)),
        the factor cast to each gradient's dtype first, as torch does. Returns the norm."""
        total = self.norm()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for t in self.tensors():
            t.mul_(coef.to(t.dtype))
        return total


def touched_features(d_sae: int, *sets) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, pos): the sorted features named on valid slots of any (idx, cnt) set, and
    for every feature its position in `rows` (int64; only meaningful for touched ones).
    A mark-and-count over d_sae (8 MB at 2^20), no sort: deterministic."""
    dev = sets[0][0].device
    mark = torch.zeros(d_sae, dtype=torch.bool, device=dev)
    for idx, cnt in sets:
        mark[idx[valid_slots(idx, cnt)]] = True
    pos = torch.cumsum(mark, 0, dtype=torch.int64) - 1
    return mark.nonzero().squeeze(1), pos


def _remap(idx, cnt, pos):
    return torch.where(valid_slots(idx, cnt), pos[idx], 0)


# ---------------------------------------------------------------- the step
def _forward(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims):
    xin = x - b_dec if apply_b_dec_to_input else x
    sets = encoder(xin, W_enc, b_enc, threshold, float(bandwidth) / 2)
    # float32 reconstruction: the loss is float32, so its gradient g stays
    # unrounded (the dense path rounds x_hat to the SAE dtype first, which
    # puts ~1% relative error on g = 2(x_hat - x) in bf16).
    recon = prims.decode(sets.a_idx, sets.a_val, sets.a_cnt, W_dec, b_dec, torch.float32)
    active = sets.a_cnt.sum(dtype=torch.float32)
    fired = torch.zeros(W_dec.shape[0], dtype=torch.bool, device=W_dec.device)
    fired[sets.a_idx[valid_slots(sets.a_idx, sets.a_cnt)]] = True
    return xin, sets, recon, active, fired


def _backward(xin, W_enc, threshold, W_dec, sets: EncodedSets, g32, g_step, *, eps, apply_b_dec, prims, need,
              rows=None, pos=None):
    """The gradients of DESIGN.md from g32 = dL/dx_hat (float32) and g_step = dL/d step_sum.
    need: (x, W_enc, b_enc, threshold, W_dec, b_dec) flags. With rows/pos, the
    feature-indexed gradients come out compact (RowGrads layout), else full size."""
    a_idx, a_val, a_cnt, n_idx, n_cnt = sets.a_idx, sets.a_val, sets.a_cnt, sets.n_idx, sets.n_cnt
    if rows is not None:
        n_out, a_out, n_out_idx = rows.numel(), _remap(a_idx, a_cnt, pos), _remap(n_idx, n_cnt, pos)
    else:
        n_out, a_out, n_out_idx = W_dec.shape[0], a_idx, n_idx
    p = prims
    g = g32.to(W_dec.dtype)  # the weight-gradient paths run in the SAE dtype, like the dense path
    dW_dec = p.scatter_rows(a_val, a_out, a_cnt, g, n_out) if need[4] else None
    db_dec = g32.sum(0) if need[5] else None
    dpre_a = p.gather_dot(g32, a_idx, a_cnt, W_dec).to(W_dec.dtype)  # dacts on A == dpre on A
    # Per-feature sums go through scatter_rows with a ones column (D = 1):
    # a fixed summation order on every backend, where index_add_ on CUDA
    # would use order-dependent float atomics.
    ones = torch.ones(g.shape[0], 1, dtype=torch.float32, device=g.device)
    d_thr = None
    if need[3]:
        # float32 grad in, float32 dots out: the band sum below then adds
        # unrounded terms (one bf16 rounding less per term than the dense path).
        dacts_n = p.gather_dot(g32, n_idx, n_cnt, W_dec)
        band_sum = p.scatter_rows(dacts_n, n_out_idx, n_cnt, ones, n_out)[:, 0]
        # The per-feature combination in float64 (vectors of d_sae, cheap): one rounding
        # at the end instead of five, where the two terms can cancel.
        thr = (threshold if rows is None else threshold[rows]).double()
        d_thr = -(thr / eps) * band_sum.double()
        if g_step is not None:
            band_count = p.scatter_rows(torch.ones_like(dacts_n), n_out_idx, n_cnt, ones, n_out)[:, 0]
            d_thr = d_thr - (g_step.double() / eps) * band_count.double()
        d_thr = d_thr.to(threshold.dtype)
    dW_enc_t = p.scatter_rows(dpre_a, a_out, a_cnt, xin.contiguous(), n_out) if need[1] else None
    db_enc32 = None
    if need[2] or (rows is not None and apply_b_dec and need[5]):
        db_enc32 = p.scatter_rows(dpre_a.float(), a_out, a_cnt, ones, n_out)[:, 0]
    dx = None
    if rows is not None and apply_b_dec and need[5]:
        # sum_b dx'_b = sum_j (sum_b dpre[b,j]) W_enc[:, j]: the touched columns only,
        # no transposed copy of W_enc
        db_dec = db_dec - W_enc[:, rows].float() @ db_enc32
    elif need[0] or (apply_b_dec and need[5]):
        dxin = p.decode(a_idx, dpre_a, a_cnt, W_enc.t().contiguous(), None)
        if apply_b_dec and need[5]:
            db_dec = db_dec - dxin.sum(0, dtype=torch.float32)
        dx = dxin if need[0] else None
    db_enc = db_enc32.to(W_enc.dtype) if need[2] else None
    if db_dec is not None:
        db_dec = db_dec.to(W_dec.dtype)
    return dx, dW_enc_t, db_enc, d_thr, dW_dec, db_dec


def _mse(diff, n):
    """sum(diff²) / n, summed in float64 (tokens x d_in terms; one rounding at the end)."""
    return (diff.double().pow(2).sum() / n).float()


def _mse_grad(diff, n):
    """d _mse / d diff, formed exactly as autograd forms it: ((1/n) * (2 diff)) in float64."""
    return (torch.tensor(1.0 / n, dtype=torch.float64, device=diff.device) * (2 * diff.double())).float()


class SparseJumpReLUSAEFunction(torch.autograd.Function):
    """(recon [N, d_in], step_sum, active_count, fired [d_sae]) with the sparse backward above."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims):
        xin, sets, recon, active, fired = _forward(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth,
                                                   apply_b_dec_to_input, encoder, prims)
        ctx.save_for_backward(xin, W_enc, threshold, W_dec, sets.a_idx, sets.a_val, sets.a_cnt, sets.n_idx, sets.n_cnt)
        ctx.bandwidth = float(bandwidth)
        ctx.apply_b_dec = apply_b_dec_to_input
        ctx.prims = prims
        ctx.mark_non_differentiable(active, fired)
        return recon, sets.step_sum, active, fired

    @staticmethod
    def backward(ctx, g, g_step, _g_active, _g_fired):
        xin, W_enc, threshold, W_dec, a_idx, a_val, a_cnt, n_idx, n_cnt = ctx.saved_tensors
        if g is None:
            g = torch.zeros(xin.shape[0], W_dec.shape[1], dtype=torch.float32, device=W_dec.device)
        sets = EncodedSets(a_idx, a_val, a_cnt, n_idx, n_cnt, None)
        dx, dW_enc_t, db_enc, d_thr, dW_dec, db_dec = _backward(
            xin, W_enc, threshold, W_dec, sets, g.float().contiguous(), g_step, eps=ctx.bandwidth,
            apply_b_dec=ctx.apply_b_dec, prims=ctx.prims, need=ctx.needs_input_grad[:6],
        )
        dW_enc = dW_enc_t.t() if dW_enc_t is not None else None
        return dx, dW_enc, db_enc, d_thr, dW_dec, db_dec, None, None, None, None


def sparse_jumprelu_sae_loss(
    x, W_enc, b_enc, threshold, W_dec, b_dec, *, l0_coefficient, bandwidth, apply_b_dec_to_input, encoder, prims
) -> TrainingOutput:
    """Same contract as reference.jumprelu_sae_loss, computed sparsely. x is [N, d_in]."""
    recon, step_sum, active, fired = SparseJumpReLUSAEFunction.apply(
        x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims
    )
    n = max(x.shape[0], 1)
    mse_loss = _mse(recon - x.float(), n)
    l0_loss = float(l0_coefficient) * step_sum / n
    return TrainingOutput(
        loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active / n, reconstruction=recon.to(x.dtype),
        fired=fired,
    )


# Above this fraction of active (token, feature) pairs the lean step runs densely, a
# chunk of features at a time (chunked_dense_row_grads): the active set would take
# 10+ bytes per pair (a fresh Gemma Scope init, threshold 0.001, starts near 1/2:
# 4096 x 2^20 / 2 pairs = 21 GB), and three tensor-core GEMMs per chunk beat
# gathers at that density. The crossover on a GPU is not measured yet (no GPU was
# lent when this was written); 1/32 bounds the active set at 4096 x 2^20 to 1.3 GB.
DENSE_FALLBACK_DENSITY = 1 / 32
PROBE_TOKENS = 64
# The last measured density is kept on the W_enc tensor itself (attribute
# _DENSITY_ATTR): steps follow each other closely, so only the first step of a
# matrix pays for a probe, and no other tensor can inherit the value.
_DENSITY_ATTR = "_sae_fast_active_density"


def _mm32(a, b):
    """a @ b with a float32 result (fp32 accumulation is what the GEMM did anyway)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            pass
    return a.float() @ b.float()


def _dot_rows_f32(g32, W):
    """g32 @ Wᵀ, float32 result, with g32 kept to ~16 significant bits for bf16/fp16 W:
    g32 = hi + lo, both in W's dtype, two tensor-core GEMMs (what the sparse path's
    gather-dot gets from float32 g, at GEMM speed)."""
    Wt = W.t()
    if W.dtype == torch.float32:
        return g32 @ Wt
    hi = g32.to(W.dtype)
    lo = (g32 - hi.float()).to(W.dtype)
    return _mm32(hi, Wt) + _mm32(lo, Wt)


@torch.no_grad()
def chunked_dense_row_grads(
    x, W_enc, b_enc, threshold, W_dec, b_dec, *, l0_coefficient, bandwidth, apply_b_dec_to_input,
    chunk_features: int | None = None,
) -> tuple[TrainingOutput, RowGrads]:
    """The lean step's contract (same outputs as sparse_jumprelu_sae_row_grads), computed
    with dense GEMMs over one chunk of features at a time: for dense phases such as a fresh
    init. Two sweeps (x_hat first, then the gradients, pre recomputed): the workspace
    is one chunk's [tokens, chunk] tensors, never [tokens, d_sae]."""
    n_tok, d_sae = x.shape[0], W_enc.shape[1]
    xin = x - b_dec if apply_b_dec_to_input else x
    c = chunk_features or encode_chunk_features(n_tok, d_sae, x.dtype)
    hb = torch.tensor(float(bandwidth) / 2, dtype=torch.float32)
    eps = float(bandwidth)
    chunks = [(c0, min(d_sae, c0 + c)) for c0 in range(0, d_sae, c)]
    recon = b_dec.float().expand(n_tok, -1).clone()
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    active_n = torch.zeros((), dtype=torch.int64, device=x.device)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    for c0, c1 in chunks:
        pre, pre32, thr, active = _chunk_pre(xin, W_enc, b_enc, threshold, c0, c1)
        acts = torch.where(active, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        recon += _mm32(acts, W_dec[c0:c1])
        step_sum += (pre32 > thr).sum().float()
        active_n += active.sum()
        fired[c0:c1] = active.any(0)
    n = max(n_tok, 1)
    diff = recon - x.float()
    mse_loss = _mse(diff, n)
    l0_loss = float(l0_coefficient) * step_sum / n
    g32 = _mse_grad(diff, n)
    g_step = float(l0_coefficient) / n  # unrounded, as in the sparse path
    g = g32.to(W_dec.dtype)
    parts = {k: [] for k in ("rows", "W_enc", "b_enc", "threshold", "W_dec")}
    db_dec = g32.sum(0)
    for c0, c1 in chunks:
        pre, pre32, thr, active = _chunk_pre(xin, W_enc, b_enc, threshold, c0, c1)
        band = (pre32 - thr).abs() < hb
        touched = (active | band).any(0).nonzero().squeeze(1)
        if touched.numel() == 0:
            continue
        acts = torch.where(active, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        dacts = _dot_rows_f32(g32, W_dec[c0:c1])  # float32 [tokens, chunk]
        dpre = torch.where(active, dacts, 0.0).to(W_dec.dtype)
        db_enc32 = dpre.float().sum(0)
        band_f = band.float()
        band_sum = (dacts * band_f).sum(0).double()
        d_thr = -(thr.double() / eps) * band_sum - (g_step / eps) * band_f.sum(0).double()
        if apply_b_dec_to_input:
            db_dec = db_dec - W_enc[:, c0:c1].float() @ db_enc32
        parts["rows"].append(touched + c0)
        parts["W_dec"].append((acts.t() @ g)[touched])
        parts["W_enc"].append((dpre.t() @ xin)[touched])
        parts["b_enc"].append(db_enc32[touched].to(W_enc.dtype))
        parts["threshold"].append(d_thr[touched].to(threshold.dtype))
    if parts["rows"]:
        cat = {k: torch.cat(v) for k, v in parts.items()}
    else:
        d_in = x.shape[1]
        cat = {"rows": torch.zeros(0, dtype=torch.int64, device=x.device),
               "W_enc": x.new_zeros(0, d_in), "b_enc": x.new_zeros(0), "W_dec": x.new_zeros(0, d_in),
               "threshold": torch.zeros(0, dtype=threshold.dtype, device=x.device)}
    out = TrainingOutput(
        loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active_n.float() / n,
        reconstruction=recon.to(x.dtype), fired=fired,
    )
    return out, RowGrads(cat["rows"], cat["W_enc"], cat["b_enc"], cat["threshold"], cat["W_dec"],
                         db_dec.to(W_dec.dtype))


def active_density(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input) -> float:
    """Fraction of (token, feature) pairs active, from the first PROBE_TOKENS tokens."""
    xp = x[:PROBE_TOKENS]
    if xp.shape[0] == 0:
        return 0.0
    if apply_b_dec_to_input:
        xp = xp - b_dec
    sets = chunked_pre_encoder(xp, W_enc, b_enc, threshold, 0.0, band=False)
    return float(sets.a_cnt.sum()) / (xp.shape[0] * W_enc.shape[1])


@torch.no_grad()
def sparse_jumprelu_sae_row_grads(
    x, W_enc, b_enc, threshold, W_dec, b_dec, *, l0_coefficient, bandwidth, apply_b_dec_to_input, encoder, prims,
    dense: bool | None = None,
) -> tuple[TrainingOutput, RowGrads]:
    """The lean step: the loss of sparse_jumprelu_sae_loss (no graph) and its gradients
    on the touched features only, the ones loss.backward() would give (to rounding).

    dense: None picks by density: above DENSE_FALLBACK_DENSITY active pairs (last
    step's density for this W_enc, or a PROBE_TOKENS probe on the first step) the
    step runs as chunked_dense_row_grads; True/False force one path."""
    if dense is None:
        density = getattr(W_enc, _DENSITY_ATTR, None)
        if density is None:
            density = active_density(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)
        dense = density > DENSE_FALLBACK_DENSITY
    kw = dict(l0_coefficient=l0_coefficient, bandwidth=bandwidth, apply_b_dec_to_input=apply_b_dec_to_input)
    if dense:
        out, grads = chunked_dense_row_grads(x, W_enc, b_enc, threshold, W_dec, b_dec, **kw)
    else:
        out, grads = _sparse_row_grads(x, W_enc, b_enc, threshold, W_dec, b_dec, encoder=encoder, prims=prims, **kw)
    if x.shape[0]:
        setattr(W_enc, _DENSITY_ATTR, float(out.l0) / W_enc.shape[1])
    return out, grads


def _sparse_row_grads(x, W_enc, b_enc, threshold, W_dec, b_dec, *, l0_coefficient, bandwidth, apply_b_dec_to_input,
                      encoder, prims):
    xin, sets, recon, active, fired = _forward(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth,
                                               apply_b_dec_to_input, encoder, prims)
    n = max(x.shape[0], 1)
    diff = recon - x.float()
    mse_loss = _mse(diff, n)
    l0_loss = float(l0_coefficient) * sets.step_sum / n
    # dL/dx_hat as autograd forms it for the loss; dL/d step_sum unrounded (float64):
    # the threshold gradient subtracts it from the band sum, where they can cancel
    g32 = _mse_grad(diff, n)
    g_step = torch.tensor(float(l0_coefficient) / n, dtype=torch.float64, device=x.device)
    rows, pos = touched_features(W_dec.shape[0], (sets.a_idx, sets.a_cnt), (sets.n_idx, sets.n_cnt))
    _, dW_enc_t, db_enc, d_thr, dW_dec, db_dec = _backward(
        xin, W_enc, threshold, W_dec, sets, g32, g_step, eps=float(bandwidth), apply_b_dec=apply_b_dec_to_input,
        prims=prims, need=(False, True, True, True, True, True), rows=rows, pos=pos,
    )
    out = TrainingOutput(
        loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active / n, reconstruction=recon.to(x.dtype),
        fired=fired,
    )
    return out, RowGrads(rows, dW_enc_t, db_enc, d_thr, dW_dec, db_dec)
