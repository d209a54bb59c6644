"""The pure-PyTorch definition of every sae_fast op (docs/DESIGN.md, "The math").

This module is the semantics: every kernel is tested against it, and it is the
dense baseline the benchmarks beat. It runs anywhere PyTorch runs.

Conventions shared by every backend:
- x is [..., d_in]; ops flatten the leading dims to tokens and restore them.
- `threshold` may be float32 while the weights are bf16/fp16 (docs/DESIGN.md,
  "The math", keeps it fp32); comparisons against it happen in float32, which is exact because
  bf16/fp16 -> fp32 is exact.
- The band of the straight-through estimator is
  |float32(pre) - threshold| < float32(bandwidth / 2), the rectangle kernel
  K(u) = 1 on -1/2 < u < 1/2 with u = (pre - threshold) / bandwidth.
- Losses and L0 are computed and returned in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import FLOAT_DTYPES, check_bandwidth
from .outputs import TrainingOutput
from .sparse import SparseActs, valid_slots


# ---------------------------------------------------------------- forward ops
def encoder_input(x: torch.Tensor, b_dec: torch.Tensor | None, apply_b_dec_to_input: bool) -> torch.Tensor:
    """x', what W_enc multiplies: x - b_dec where the SAE applies b_dec to its input, else x."""
    if not apply_b_dec_to_input:
        return x
    if b_dec is None:
        raise ValueError("b_dec is required when apply_b_dec_to_input=True")
    return x - b_dec


def jumprelu_pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """pre = x' @ W_enc + b_enc (x' = encoder_input(x, ...))."""
    return x @ W_enc + b_enc


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """relu(pre) * (pre > threshold), exactly as the Gemma Scope reference."""
    return torch.relu(pre) * (pre > threshold).to(pre.dtype)


def active_mask(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The active set A: pre > threshold and pre > 0 (NaN excluded)."""
    return (pre > threshold) & (pre > 0)


def band_mask(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The band N: |pre - threshold| < bandwidth/2, measured in float32 on pre itself
    (float64 for a float64 truth)."""
    acc = torch.promote_types(pre.dtype, torch.float32)
    half = torch.tensor(check_bandwidth(bandwidth) / 2, dtype=acc)
    return (pre.to(acc) - threshold.to(acc)).abs() < half.to(pre.device)


def jumprelu_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                    b_dec: torch.Tensor | None = None, apply_b_dec_to_input: bool = False) -> torch.Tensor:
    """Dense JumpReLU activations [..., d_sae]."""
    return jumprelu(jumprelu_pre(encoder_input(x, b_dec, apply_b_dec_to_input), W_enc, b_enc), threshold)


def jumprelu_encode_sparse(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                           b_dec: torch.Tensor | None = None, apply_b_dec_to_input: bool = False,
                           capacity: int | None = None) -> SparseActs:
    """Sparse JumpReLU activations: the nonzeros (and NaNs) of jumprelu_encode."""
    return SparseActs.from_dense(jumprelu_encode(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input), capacity)


def dense_decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """x_hat = acts @ W_dec + b_dec."""
    return acts @ W_dec + b_dec


def sparse_decode(acts: SparseActs, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """x_hat_b = sum_k values[b,k] * W_dec[indices[b,k]] + b_dec, accumulated in float32.

    Padding slots hold value 0 and add exact zeros. Returns [*batch_shape, d_in]
    in W_dec's dtype.
    """
    d_in = W_dec.shape[1]
    rows = W_dec.index_select(0, acts.indices.reshape(-1)).reshape(acts.n_tokens, acts.capacity, d_in)
    acc = torch.promote_types(W_dec.dtype, torch.float32)
    out = torch.einsum("nk,nkd->nd", acts.values.to(acc), rows.to(acc)) + b_dec.to(acc)
    return out.to(W_dec.dtype).reshape(*acts.batch_shape, d_in)


# ------------------------------------------------- straight-through estimators
class _StraightThrough(torch.autograd.Function):
    """A function of (pre, threshold) whose threshold gradient comes from the band
    |pre - threshold| < eps/2 (the rectangle kernel K((pre - threshold) / eps))."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pre, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def band_sum(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
        """(pre, threshold, sum over tokens of grad on the band, the sum's dtype): float32
        sums, float64 for a float64 truth (never round the truth to float32)."""
        pre, threshold = ctx.saved_tensors
        acc = torch.promote_types(grad.dtype, torch.float32)
        band = band_mask(pre, threshold, ctx.bandwidth).to(acc)
        return pre, threshold, (grad.to(acc) * band).reshape(-1, pre.shape[-1]).sum(0), acc


class JumpReLUFunction(_StraightThrough):
    """acts = relu(pre) * (pre > threshold) with the JumpReLU paper's pseudo-derivatives:

    d acts / d pre       = 1 on the active set A, else 0
    d acts / d threshold = -(threshold / eps) * K((pre - threshold) / eps)
    """

    @staticmethod
    def forward(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return jumprelu(pre, threshold)

    @staticmethod
    def backward(ctx: Any, grad_acts: torch.Tensor):
        pre, threshold, g, acc = _StraightThrough.band_sum(ctx, grad_acts)
        d_pre = grad_acts * active_mask(pre, threshold).to(grad_acts.dtype)
        d_thr = -(threshold.to(acc) / ctx.bandwidth) * g
        return d_pre, d_thr.to(threshold.dtype), None


class StepFunction(_StraightThrough):
    """H(pre - threshold) as float32 (float64 for float64 pre), with
    d/d threshold = -(1/eps) K((pre - threshold)/eps), d/d pre = 0."""

    @staticmethod
    def forward(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (pre > threshold).to(torch.promote_types(pre.dtype, torch.float32))  # float64 for a float64 truth

    @staticmethod
    def backward(ctx: Any, grad_step: torch.Tensor):
        _, threshold, g, _ = _StraightThrough.band_sum(ctx, grad_step)
        return None, (-(1.0 / ctx.bandwidth) * g).to(threshold.dtype), None


def jumprelu_sae_loss(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                      W_dec: torch.Tensor, b_dec: torch.Tensor, *, l0_coefficient: float, bandwidth: float,
                      apply_b_dec_to_input: bool = False, target: torch.Tensor | None = None,
                      W_skip: torch.Tensor | None = None, target_l0: float | None = None) -> TrainingOutput:
    """The JumpReLU training loss, dense, with autograd through the STE functions.

    loss     = mse_loss + l0_loss
    mse_loss = mean_b ||y_b - y_hat_b||^2              (sum over d_out, mean over tokens)
    l0_loss  = l0_coefficient * mean_b sum_j H(pre[b,j] - threshold[j])
    l0       = mean_b |A_b| (detached; the number of nonzero activations)

    An SAE reconstructs its input: y = x, y_hat = acts @ W_dec + b_dec. A transcoder
    predicts `target` y [..., d_out] from x: y_hat = acts @ W_dec + b_dec (+ x @ W_skip).
    target_l0: the quadratic L0 loss (Gemma Scope 2) instead,
    l0_loss = l0_coefficient * mean_b 2 / target_l0 * (sum_j H(pre[b,j] - threshold[j]) - target_l0)^2.
    """
    bw = check_bandwidth(bandwidth)
    d_in = x.shape[-1]
    xf = x.reshape(-1, d_in)
    yf = xf if target is None else target.reshape(-1, target.shape[-1])
    pre = jumprelu_pre(encoder_input(xf, b_dec, apply_b_dec_to_input), W_enc, b_enc)
    acts = JumpReLUFunction.apply(pre, threshold, bw)
    recon = acts @ W_dec + b_dec
    if W_skip is not None:
        recon = recon + xf @ W_skip
    n = max(xf.shape[0], 1)
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 checks
    mse_loss = (recon.to(acc) - yf.to(acc)).pow(2).sum() / n
    step = StepFunction.apply(pre, threshold, bw)
    with torch.no_grad():
        active = active_mask(pre, threshold)
        fired = active.any(0)
    out_shape = x.shape if target is None else target.shape
    return TrainingOutput.assemble(mse_loss=mse_loss, step_sum=step.sum(), l0_coefficient=l0_coefficient,
                                   active=active.sum(dtype=torch.float32), n=n, l0_per_token=step.sum(-1),
                                   target_l0=target_l0, reconstruction=recon.reshape(out_shape), fired=fired,
                                   acts=_sparse_or_none(acts.detach()))


def _sparse_or_none(acts: torch.Tensor) -> SparseActs | None:
    """The active set as SparseActs; None for a float64 truth (SparseActs holds SAE dtypes only)."""
    return SparseActs.from_dense(acts) if acts.dtype in FLOAT_DTYPES else None


# ---------------------------------------------------------- sparse primitives
# The three primitives every compiled backend implements (csrc/, kernels/,
# sae_fast/backends/triton_kernels.py). Padding slots (k >= counts[b]) contribute nothing.
def sparse_gather_dot(grad: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, W: torch.Tensor,
                      acc: torch.dtype | None = None) -> torch.Tensor:
    """r[b, k] = <grad[b], W[indices[b, k]]> on valid slots, 0 on padding; float32 accumulation
    (or `acc`: float64 where the torch backend runs on CPU, like the C++ CPU kernels).

    The result has grad's dtype: W's, or float32 for unrounded dot products.
    """
    n, k = indices.shape
    rows = W.index_select(0, indices.reshape(-1)).reshape(n, k, W.shape[1])
    acc = acc or torch.promote_types(W.dtype, torch.float32)  # float32, or float64 for float64 truth
    r = torch.einsum("nd,nkd->nk", grad.to(acc), rows.to(acc))
    return (r * valid_slots(indices, counts)).to(grad.dtype)


def sparse_scatter_rows(coef: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, grad: torch.Tensor, d_sae: int,
                        acc: torch.dtype | None = None) -> torch.Tensor:
    """G[j] = sum over (b, k) with indices[b, k] == j of coef[b, k] * grad[b]; float32 accumulation (or `acc`)."""
    acc = acc or torch.promote_types(grad.dtype, torch.float32)
    if d_sae == 0:  # a compact step that touched no feature (padding slots name index 0)
        return torch.zeros(0, grad.shape[1], dtype=grad.dtype, device=grad.device)
    c = coef.to(acc) * valid_slots(indices, counts)
    contrib = c[:, :, None] * grad.to(acc)[:, None, :]
    out = torch.zeros(d_sae, grad.shape[1], dtype=acc, device=grad.device)
    out.index_add_(0, indices.reshape(-1), contrib.reshape(-1, grad.shape[1]))
    return out.to(grad.dtype)


def sparse_decode_raw(indices: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, W: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype | None = None,
                      acc: torch.dtype | None = None) -> torch.Tensor:
    """out[b] = sum_k values[b, k] * W[indices[b, k]] (+ bias) over valid slots; float32 accumulation
    (or `acc`). Returned in W's dtype, or unrounded with out_dtype=torch.float32.
    """
    n, k = indices.shape
    rows = W.index_select(0, indices.reshape(-1)).reshape(n, k, W.shape[1])
    acc = acc or torch.promote_types(W.dtype, torch.float32)
    v = values.to(acc) * valid_slots(indices, counts)
    out = torch.einsum("nk,nkd->nd", v, rows.to(acc))
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(out_dtype or W.dtype)


# ---------------------------------------------------------------- optimizer
def row_view(t: torch.Tensor, sparse_dim: int | None) -> torch.Tensor:
    """t as [rows, row length]: slices along sparse_dim become rows (a view, never a copy).
    sparse_dim None: the whole tensor is one row."""
    if sparse_dim is None:
        return t.view(1, -1)
    if t.dim() == 1:
        return t.view(-1, 1)
    if t.dim() != 2 or sparse_dim not in (0, 1):
        raise ValueError(
            f"sparse_dim must be None, or 0/1 of a 1-D or 2-D tensor; got {sparse_dim} for shape {list(t.shape)}")
    return t if sparse_dim == 0 else t.t()


def adam_b1zero_rows_(param: torch.Tensor, v: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None,
                      grad: torch.Tensor, *, step: int, lr: float, beta2: float, eps: float, sparse_dim: int | None,
                      renorm: bool = False) -> None:
    """Adam with beta1 = 0 on the rows `rows` of param (slices along sparse_dim), in place.

    grad [n, row length] holds those rows' gradients (float32 or param's dtype);
    v (float32, param's shape) is the second moment and last[j] the step row j's v is
    up to date with. A row that sat out k steps had zero gradient then: its v
    decays by beta2^k first, exactly as dense Adam would have done step by step.
    Then v <- beta2 v + (1 - beta2) g², p <- p - lr g / (sqrt(v / (1 - beta2^step)) + eps),
    and with renorm p's row is scaled to unit L2 norm before its one rounding to
    param's dtype (the decoder constraint, on the changed rows only).
    rows None (with sparse_dim None): the whole tensor is one row, last has 1 entry.
    """
    P, V = row_view(param, sparse_dim), row_view(v, sparse_dim)
    idx = rows if rows is not None else torch.zeros(1, dtype=torch.int64, device=param.device)
    if idx.numel() == 0:
        return
    acc = torch.promote_types(v.dtype, torch.float32)  # float32; float64 for a float64 truth
    G = grad.reshape(idx.numel(), P.shape[1]).to(acc)
    missed = (step - 1 - last[idx]).to(torch.float64)
    decay = torch.pow(torch.tensor(beta2, dtype=torch.float64, device=param.device), missed).to(acc)
    vr = V[idx].to(acc) * decay[:, None]
    vr = vr * beta2 + (1 - beta2) * G * G
    V[idx] = vr.to(V.dtype)
    bc2_sqrt = (1 - beta2**step)**0.5
    pr = P[idx].to(acc) - lr * (G / (vr.sqrt() / bc2_sqrt + eps))
    if renorm:
        pr = pr / pr.norm(dim=1, keepdim=True).clamp_min(1e-12)
    P[idx] = pr.to(P.dtype)
    last[idx] = step
