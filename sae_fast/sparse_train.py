"""The sparse training step (DESIGN.md, "Training"), written once over any backend.

Forward: an encoder gives the active set A (indices, pre values) and the band
N = {|pre - threshold| < eps/2} per token; the decoder is a sparse gather-sum.
Backward touches only A and N:

    dW_dec   = scatter_rows(acts_A, g)                 db_dec = sum_b g_b
    dacts    = gather_dot(g, W_dec) on A and on N      dpre   = dacts on A
    dthr_j   = -(thr_j/eps) sum_{b: j in N_b} dacts[b,j]  -  (g_step/eps) |{b: j in N_b}|
    dW_encᵀ  = scatter_rows(dpre_A, x')                db_enc = scatter_rows(dpre_A, 1)
    dx'      = decode(dpre_A, W_encᵀ)                  (and db_dec -= sum dx' if b_dec is applied to x)

A backend supplies `encoder(x', W_enc, b_enc, threshold, half_bandwidth) -> EncodedSets`
and a `Prims` with decode / gather_dot / scatter_rows. Nothing of shape
[tokens, d_sae] is created here (the dense-pre encoder of the cpu/cuda
backends creates one transiently; the Triton encoder never does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
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


def dense_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth: float) -> EncodedSets:
    """Encoder for backends whose forward GEMM is dense: pre in full, then compaction."""
    pre = x @ W_enc + b_enc
    thr = threshold.float()
    pre32 = pre.float()
    a_mask = ((pre32 > thr) & (pre32 > 0)) | torch.isnan(pre32)
    n_mask = (pre32 - thr).abs() < torch.tensor(half_bandwidth, dtype=torch.float32)
    a_idx, a_val, a_cnt = compact(a_mask, pre)
    n_idx, _, n_cnt = compact(n_mask)
    step_sum = (pre32 > thr).sum().float()  # int64 count, one rounding
    return EncodedSets(a_idx, a_val, a_cnt, n_idx, n_cnt, step_sum)


class SparseJumpReLUSAEFunction(torch.autograd.Function):
    """(recon [N, d_in], step_sum, active_count, fired [d_sae]) with the sparse backward above."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims):
        xin = x - b_dec if apply_b_dec_to_input else x
        sets = encoder(xin, W_enc, b_enc, threshold, float(bandwidth) / 2)
        # float32 reconstruction: the loss is float32, so its gradient g stays
        # unrounded (the dense path rounds x_hat to the SAE dtype first, which
        # puts ~1% relative error on g = 2(x_hat - x) in bf16).
        recon = prims.decode(sets.a_idx, sets.a_val, sets.a_cnt, W_dec, b_dec, torch.float32)
        active = sets.a_cnt.sum(dtype=torch.float32)
        fired = torch.zeros(W_dec.shape[0], dtype=torch.bool, device=W_dec.device)
        fired[sets.a_idx[valid_slots(sets.a_idx, sets.a_cnt)]] = True
        ctx.save_for_backward(xin, W_enc, threshold, W_dec, sets.a_idx, sets.a_val, sets.a_cnt, sets.n_idx, sets.n_cnt)
        ctx.bandwidth = float(bandwidth)
        ctx.apply_b_dec = apply_b_dec_to_input
        ctx.prims = prims
        ctx.mark_non_differentiable(active, fired)
        return recon, sets.step_sum, active, fired

    @staticmethod
    def backward(ctx, g, g_step, _g_active, _g_fired):
        xin, W_enc, threshold, W_dec, a_idx, a_val, a_cnt, n_idx, n_cnt = ctx.saved_tensors
        p, eps = ctx.prims, ctx.bandwidth
        d_sae = W_dec.shape[0]
        need = ctx.needs_input_grad
        if g is None:
            g = torch.zeros(xin.shape[0], W_dec.shape[1], dtype=torch.float32, device=W_dec.device)
        g32 = g.float().contiguous()
        g = g32.to(W_dec.dtype)  # the weight-gradient paths run in the SAE dtype, like the dense path
        dW_dec = p.scatter_rows(a_val, a_idx, a_cnt, g, d_sae) if need[4] else None
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
            band_sum = p.scatter_rows(dacts_n, n_idx, n_cnt, ones, d_sae)[:, 0]
            d_thr = -(threshold.float() / eps) * band_sum
            if g_step is not None:
                band_count = p.scatter_rows(torch.ones_like(dacts_n), n_idx, n_cnt, ones, d_sae)[:, 0]
                d_thr = d_thr - (g_step.float() / eps) * band_count
            d_thr = d_thr.to(threshold.dtype)
        dW_enc = p.scatter_rows(dpre_a, a_idx, a_cnt, xin.contiguous(), d_sae).t() if need[1] else None
        db_enc = None
        if need[2]:
            db_enc = p.scatter_rows(dpre_a.float(), a_idx, a_cnt, ones, d_sae)[:, 0].to(W_enc.dtype)
        dx = None
        if need[0] or (ctx.apply_b_dec and need[5]):
            dxin = p.decode(a_idx, dpre_a, a_cnt, W_enc.t().contiguous(), None)
            if ctx.apply_b_dec and need[5]:
                db_dec = db_dec - dxin.sum(0, dtype=torch.float32)
            dx = dxin if need[0] else None
        if db_dec is not None:
            db_dec = db_dec.to(W_dec.dtype)
        return dx, dW_enc, db_enc, d_thr, dW_dec, db_dec, None, None, None, None


def sparse_jumprelu_sae_loss(
    x, W_enc, b_enc, threshold, W_dec, b_dec, *, l0_coefficient, bandwidth, apply_b_dec_to_input, encoder, prims
) -> TrainingOutput:
    """Same contract as reference.jumprelu_sae_loss, computed sparsely. x is [N, d_in]."""
    recon, step_sum, active, fired = SparseJumpReLUSAEFunction.apply(
        x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims
    )
    n = max(x.shape[0], 1)
    mse_loss = (recon - x.float()).pow(2).sum() / n
    l0_loss = float(l0_coefficient) * step_sum / n
    return TrainingOutput(
        loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active / n, reconstruction=recon.to(x.dtype),
        fired=fired,
    )
