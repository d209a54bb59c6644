"""The dense phase of the row-grads step: the same outputs as the sparse kernels, computed
with dense GEMMs one chunk of features at a time, for steps where a large fraction of
the (token, feature) pairs is active (a fresh init). docs/DESIGN.md, "Dense phase"."""

from __future__ import annotations

import torch

from ..outputs import TrainingOutput
from .encoders import chunk_pre, chunked_pre_encoder, encode_chunk_features
from .params import RowGrads, SAEParams
from .sparse import mse, mse_grad, quadratic_l0_grad

# Above this fraction of active (token, feature) pairs the row-grads step runs densely, a
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
def chunked_dense_row_grads(x, p: SAEParams, *, l0_coefficient, bandwidth, chunk_features: int | None = None,
                            target=None, target_l0=None) -> tuple[TrainingOutput, RowGrads]:
    """The row-grads step's contract (same outputs as step.sparse_row_grads), computed
    with dense GEMMs over one chunk of features at a time: for dense phases such as a fresh
    init. Two sweeps (x_hat first, then the gradients, pre recomputed): the workspace
    is one chunk's [tokens, chunk] tensors, never [tokens, d_sae]."""
    W_enc, b_enc, threshold, W_dec, b_dec = p.tensors()
    n_tok, d_sae = x.shape[0], W_enc.shape[1]
    xin = p.encoder_input(x)
    c = chunk_features or encode_chunk_features(n_tok, d_sae, x.dtype)
    hb = torch.tensor(float(bandwidth) / 2, dtype=torch.float32)
    eps = float(bandwidth)
    chunks = [(c0, min(d_sae, c0 + c)) for c0 in range(0, d_sae, c)]
    recon = b_dec.float().expand(n_tok, -1).clone()
    step_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    active_n = torch.zeros((), dtype=torch.int64, device=x.device)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    l0_tok = torch.zeros(n_tok, dtype=torch.float32, device=x.device)
    for c0, c1 in chunks:
        pre, pre32, thr, active = chunk_pre(xin, W_enc, b_enc, threshold, c0, c1)
        acts = torch.where(active, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        recon += _mm32(acts, W_dec[c0:c1])
        above = pre32 > thr
        step_sum += above.sum().float()
        l0_tok += above.sum(1).float()
        active_n += active.sum()
        fired[c0:c1] = active.any(0)
    if p.W_skip is not None:
        recon += x.float() @ p.W_skip.float()
    n = max(n_tok, 1)
    diff = recon - (x if target is None else target).float()
    g32 = mse_grad(diff, n)
    g_step = float(l0_coefficient) / n  # unrounded, as in the sparse path
    g_tok = None if target_l0 is None else quadratic_l0_grad(l0_tok, l0_coefficient, target_l0, n)
    g = g32.to(W_dec.dtype)
    parts = {k: [] for k in ("rows", "W_enc", "b_enc", "threshold", "W_dec")}
    db_dec = g32.sum(0)
    for c0, c1 in chunks:
        pre, pre32, thr, active = chunk_pre(xin, W_enc, b_enc, threshold, c0, c1)
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
        if g_tok is None:
            d_thr = -(thr.double() / eps) * band_sum - (g_step / eps) * band_f.sum(0).double()
        else:  # each band entry weighs its token's dL/d l0_b
            d_thr = -(thr.double() / eps) * band_sum - (g_tok[:, None] * band_f.double()).sum(0) / eps
        if p.apply_b_dec_to_input:
            db_dec = db_dec - W_enc[:, c0:c1].float() @ db_enc32
        parts["rows"].append(touched + c0)
        parts["W_dec"].append((acts.t() @ g)[touched])
        parts["W_enc"].append((dpre.t() @ xin)[touched])
        parts["b_enc"].append(db_enc32[touched].to(W_enc.dtype))
        parts["threshold"].append(d_thr[touched].to(threshold.dtype))
    if parts["rows"]:
        cat = {k: torch.cat(v) for k, v in parts.items()}
    else:
        cat = {
            "rows": torch.zeros(0, dtype=torch.int64,
                                device=x.device), "W_enc": x.new_zeros(0, x.shape[1]), "b_enc": x.new_zeros(0),
            "W_dec": x.new_zeros(0, W_dec.shape[1]), "threshold": torch.zeros(0, dtype=threshold.dtype, device=x.device)
        }
    dW_skip = x.t() @ g if p.W_skip is not None else None
    out = TrainingOutput.assemble(mse_loss=mse(diff, n), step_sum=step_sum, l0_coefficient=l0_coefficient,
                                  active=active_n.float(), n=n, reconstruction=recon.to(x.dtype), fired=fired,
                                  acts=None, l0_per_token=l0_tok,
                                  target_l0=target_l0)  # the dense phase never forms the active set (its point)
    return out, RowGrads(cat["rows"], cat["W_enc"], cat["b_enc"], cat["threshold"], cat["W_dec"],
                         db_dec.to(W_dec.dtype), dW_skip)


def active_density(x, p: SAEParams) -> float:
    """Fraction of (token, feature) pairs active, from the first PROBE_TOKENS tokens."""
    xp = x[:PROBE_TOKENS]
    if xp.shape[0] == 0:
        return 0.0
    sets = chunked_pre_encoder(p.encoder_input(xp), p.W_enc, p.b_enc, p.threshold, 0.0, band=False)
    return float(sets.a_cnt.sum()) / (xp.shape[0] * p.d_sae)
