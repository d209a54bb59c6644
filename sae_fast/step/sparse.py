"""The sparse training step, written once over any backend (docs/DESIGN.md, "The training step").

Forward: an encoder (sae_fast.step.encoders) gives the active set A (indices, pre
values) and the band N = {|pre - threshold| < eps/2} per token; the decoder is a sparse
gather-sum. Backward touches only A and N:

    dW_dec   = scatter_rows(acts_A, g)                 db_dec = sum_b g_b
    dacts    = gather_dot(g, W_dec) on A and on N      dpre   = dacts on A
    dthr_j   = -(thr_j/eps) sum_{b: j in N_b} dacts[b,j]  -  (1/eps) sum_{b: j in N_b} g_step_b
    dW_encᵀ  = scatter_rows(dpre_A, x')                db_enc = scatter_rows(dpre_A, 1)
    dx'      = decode(dpre_A, W_encᵀ)                  (and db_dec -= sum dx' if b_dec is applied to x)

Two ways to run it:

- `sparse_loss`: an autograd Function; `loss.backward()` fills full-size `.grad`
  tensors (zero outside the touched rows), for any optimizer.
- `sparse_row_grads`: the row-grads step. Forward and backward in one call, no
  autograd graph, and gradients only for the touched features U = A ∪ N (`RowGrads`):
  at d_sae = 2^20 a full-size bf16 W_enc + W_dec gradient is 9.7 GB, the compact one
  min(d_sae, tokens x (L0 + band)) rows. SparseAdamB1Zero.step_rows applies it.

A backend supplies the encoder and a `Prims` (decode / gather_dot / scatter_rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import reference
from ..outputs import TrainingOutput
from ..sparse import SparseActs, valid_slots
from .encoders import EncodedSets
from .params import RowGrads, SAEParams, touched_features


@dataclass(frozen=True)
class Prims:
    """The three sparse primitives of the step (docs/DESIGN.md, "Primitives")."""

    decode: Callable  # (indices, values, counts, W, bias, out_dtype=None) -> [N, D]
    gather_dot: Callable  # (grad, indices, counts, W) -> [N, K]
    scatter_rows: Callable  # (coef, indices, counts, grad, d_sae) -> [d_sae, D]


REFERENCE_PRIMS = Prims(reference.sparse_decode_raw, reference.sparse_gather_dot, reference.sparse_scatter_rows)
# The torch backend's step on CPU: the same primitives accumulating in float64, as the
# C++ CPU kernels do (cheap on a CPU; its float32 sums were up to 4x the dense path's
# error on some inputs). On CUDA the torch backend uses REFERENCE_PRIMS.
REFERENCE_PRIMS_F64_ACC = Prims(
    lambda i, v, c, W, b, out_dtype=None: reference.sparse_decode_raw(i, v, c, W, b, out_dtype, acc=torch.float64),
    lambda g, i, c, W: reference.sparse_gather_dot(g, i, c, W, acc=torch.float64),
    lambda co, i, c, g, s: reference.sparse_scatter_rows(co, i, c, g, s, acc=torch.float64))


def _remap(idx, cnt, pos):
    return torch.where(valid_slots(idx, cnt), pos[idx], 0)


# ---------------------------------------------------------------- the step
def _forward(x, p: SAEParams, bandwidth, encoder, prims):
    xin = p.encoder_input(x)
    W_dec = p.W_dec
    sets = encoder(xin, p.W_enc, p.b_enc, p.threshold, float(bandwidth) / 2)
    # float32 reconstruction: the loss is float32, so its gradient g stays
    # unrounded (the dense path rounds x_hat to the SAE dtype first, which
    # puts ~1% relative error on g = 2(x_hat - x) in bf16).
    recon = prims.decode(sets.a_idx, sets.a_val, sets.a_cnt, W_dec, p.b_dec, torch.float32)
    active = sets.a_cnt.sum(dtype=torch.float32)
    fired = torch.zeros(W_dec.shape[0], dtype=torch.bool, device=W_dec.device)
    fired[sets.a_idx[valid_slots(sets.a_idx, sets.a_cnt)]] = True
    return xin, sets, recon, active, fired


def _backward(xin, W_enc, threshold, W_dec, sets: EncodedSets, g32, g_step, *, eps, apply_b_dec, prims, need, rows=None,
              pos=None, g_tok=None):
    """The gradients above from g32 = dL/dx_hat (float32) and g_step_b = g_step + g_tok[b]:
    g_step = dL/d step_sum (a scalar, the linear L0 loss), g_tok [N] = dL/d l0_b (the
    quadratic one; None without it).
    need: (x, W_enc, b_enc, threshold, W_dec, b_dec) flags. With rows/pos, the
    feature-indexed gradients come out compact (RowGrads layout), else full size."""
    a_idx, a_val, a_cnt, band_idx, band_cnt = sets.a_idx, sets.a_val, sets.a_cnt, sets.band_idx, sets.band_cnt
    if rows is not None:
        n_out, a_out, band_out = rows.numel(), _remap(a_idx, a_cnt, pos), _remap(band_idx, band_cnt, pos)
    else:
        n_out, a_out, band_out = W_dec.shape[0], a_idx, band_idx
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
        dacts_band = p.gather_dot(g32, band_idx, band_cnt, W_dec)
        band_sum = p.scatter_rows(dacts_band, band_out, band_cnt, ones, n_out)[:, 0]
        # The per-feature combination in float64 (vectors of d_sae, cheap): one rounding
        # at the end instead of five, where the two terms can cancel.
        thr = (threshold if rows is None else threshold[rows]).double()
        d_thr = -(thr / eps) * band_sum.double()
        if g_step is not None:
            band_count = p.scatter_rows(torch.ones_like(dacts_band), band_out, band_cnt, ones, n_out)[:, 0]
            d_thr = d_thr - (g_step.double() / eps) * band_count.double()
        if g_tok is not None:  # each band slot weighs its token's dL/d l0_b
            w = g_tok.float()[:, None].expand_as(dacts_band).contiguous()
            d_thr = d_thr - p.scatter_rows(w, band_out, band_cnt, ones, n_out)[:, 0].double() / eps
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


def quadratic_l0_grad(l0_tok, l0_coefficient, target_l0, n):
    """d l0_loss / d l0_b of the quadratic L0 loss: l0_coefficient * (4 / t) * (l0_b - t) / n (float64)."""
    t = float(target_l0)
    return float(l0_coefficient) * (4.0 / t) * (l0_tok.double() - t) / n


def mse(diff, n):
    """sum(diff²) / n, summed in float64 (tokens x d_in terms; one rounding at the end)."""
    return (diff.double().pow(2).sum() / n).float()


def mse_grad(diff, n):
    """d mse / d diff, formed exactly as autograd forms it: ((1/n) * (2 diff)) in float64."""
    return (torch.tensor(1.0 / n, dtype=torch.float64, device=diff.device) * (2 * diff.double())).float()


class SparseJumpReLUSAEFunction(torch.autograd.Function):
    """(recon [N, d_out], step_sum, active_count, fired [d_sae], the active set a_idx,
    a_val, a_cnt, and l0_tok [N]) with the sparse backward above. The five parameters are
    separate inputs here, as autograd needs them.

    l0_tok = each token's sum_j H(pre - threshold), differentiable through the band: the
    active count, which is that sum wherever threshold >= 0 (pre > threshold >= 0 implies
    pre > 0); sparse_loss checks threshold >= 0 before it uses l0_tok."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, apply_b_dec_to_input, encoder, prims):
        p = SAEParams(W_enc, b_enc, threshold, W_dec, b_dec, apply_b_dec_to_input)
        xin, sets, recon, active, fired = _forward(x, p, bandwidth, encoder, prims)
        ctx.save_for_backward(xin, W_enc, threshold, W_dec, sets.a_idx, sets.a_val, sets.a_cnt, sets.band_idx,
                              sets.band_cnt)
        ctx.bandwidth = float(bandwidth)
        ctx.apply_b_dec = apply_b_dec_to_input
        ctx.prims = prims
        ctx.mark_non_differentiable(active, fired, sets.a_idx, sets.a_val, sets.a_cnt)
        # an output the loss does not use (step_sum or l0_tok, by L0 loss) gets None, not zeros:
        # no band pass for a term that is not there
        ctx.set_materialize_grads(False)
        return recon, sets.step_sum, active, fired, sets.a_idx, sets.a_val, sets.a_cnt, sets.a_cnt.float()

    @staticmethod
    def backward(ctx, g, g_step, _g_active, _g_fired, _g_idx, _g_val, _g_cnt, g_tok):
        xin, W_enc, threshold, W_dec, a_idx, a_val, a_cnt, band_idx, band_cnt = ctx.saved_tensors
        if g is None:
            g = torch.zeros(xin.shape[0], W_dec.shape[1], dtype=torch.float32, device=W_dec.device)
        sets = EncodedSets(a_idx, a_val, a_cnt, band_idx, band_cnt, None)
        dx, dW_enc_t, db_enc, d_thr, dW_dec, db_dec = _backward(xin, W_enc, threshold, W_dec, sets,
                                                                g.float().contiguous(), g_step, eps=ctx.bandwidth,
                                                                apply_b_dec=ctx.apply_b_dec, prims=ctx.prims,
                                                                need=ctx.needs_input_grad[:6], g_tok=g_tok)
        dW_enc = dW_enc_t.t() if dW_enc_t is not None else None
        return dx, dW_enc, db_enc, d_thr, dW_dec, db_dec, None, None, None, None


def _skip(x, p: SAEParams):
    """x @ W_skip computed and kept in float32 (never rounded to the SAE dtype, like the float32
    reconstruction it is added to), or None without a skip connection. A [d_in, d_out] GEMM:
    d_sae / d_out times smaller than the encoder's, so its float32 cost is small."""
    return None if p.W_skip is None else x.float() @ p.W_skip.float()


def check_quadratic(p: SAEParams, target_l0) -> None:
    """The sparse paths' quadratic L0 loss counts l0_b as the active count: exact for threshold >= 0."""
    if target_l0 is not None and p.d_sae and bool((p.threshold < 0).any()):
        raise ValueError("target_l0 (the quadratic L0 loss) needs every threshold >= 0 on the sparse step: its "
                         "per-token L0 is the active count; clamp the threshold at 0 first (as SAELens does)")


def sparse_loss(x, p: SAEParams, *, l0_coefficient, bandwidth, encoder, prims, target=None,
                target_l0=None) -> TrainingOutput:
    """Same contract as reference.jumprelu_sae_loss, computed sparsely. x is [N, d_in],
    target [N, d_out] (a transcoder's; None: x itself), target_l0 the quadratic L0 loss's."""
    check_quadratic(p, target_l0)
    recon, step_sum, active, fired, a_idx, a_val, a_cnt, l0_tok = SparseJumpReLUSAEFunction.apply(
        x, *p.tensors(), bandwidth, p.apply_b_dec_to_input, encoder, prims)
    skip = _skip(x, p)
    pred = recon if skip is None else recon + skip
    y = x if target is None else target
    n = max(x.shape[0], 1)
    return TrainingOutput.assemble(mse_loss=mse(pred - y.float(), n), step_sum=step_sum, l0_coefficient=l0_coefficient,
                                   active=active, n=n, reconstruction=pred.to(x.dtype), fired=fired,
                                   acts=SparseActs(a_idx, a_val, a_cnt,
                                                   p.d_sae), l0_per_token=l0_tok, target_l0=target_l0)


@torch.no_grad()
def sparse_row_grads(x, p: SAEParams, *, l0_coefficient, bandwidth, encoder, prims, target=None,
                     target_l0=None) -> tuple[TrainingOutput, RowGrads]:
    """The row-grads step on the sparse kernels: sparse_loss's outputs (no graph) and its
    gradients on the touched features only (and a transcoder's whole W_skip gradient)."""
    check_quadratic(p, target_l0)
    xin, sets, recon, active, fired = _forward(x, p, bandwidth, encoder, prims)
    n = max(x.shape[0], 1)
    skip = _skip(x, p)
    if skip is not None:
        recon = recon + skip
    diff = recon - (x if target is None else target).float()
    # dL/dx_hat as autograd forms it for the loss; dL/d step_sum unrounded (float64):
    # the threshold gradient subtracts it from the band sum, where they can cancel
    g32 = mse_grad(diff, n)
    g_step = torch.tensor(float(l0_coefficient) / n, dtype=torch.float64, device=x.device)
    l0_tok, g_tok = sets.a_cnt.float(), None
    if target_l0 is not None:  # d/d l0_b of l0_coefficient * mean_b 2 / t * (l0_b - t)^2
        g_step, g_tok = None, quadratic_l0_grad(l0_tok, l0_coefficient, target_l0, n)
    rows, pos = touched_features(p.d_sae, (sets.a_idx, sets.a_cnt), (sets.band_idx, sets.band_cnt))
    _, dW_enc_t, db_enc, d_thr, dW_dec, db_dec = _backward(xin, p.W_enc, p.threshold, p.W_dec, sets, g32, g_step,
                                                           eps=float(bandwidth), apply_b_dec=p.apply_b_dec_to_input,
                                                           prims=prims, need=(False, True, True, True, True, True),
                                                           rows=rows, pos=pos, g_tok=g_tok)
    dW_skip = x.t() @ g32.to(p.W_skip.dtype) if p.W_skip is not None else None
    out = TrainingOutput.assemble(mse_loss=mse(diff, n), step_sum=sets.step_sum, l0_coefficient=l0_coefficient,
                                  active=active, n=n, reconstruction=recon.to(x.dtype), fired=fired,
                                  acts=SparseActs(sets.a_idx, sets.a_val, sets.a_cnt,
                                                  p.d_sae), l0_per_token=l0_tok, target_l0=target_l0)
    return out, RowGrads(rows, dW_enc_t, db_enc, d_thr, dW_dec, db_dec, dW_skip)
