"""The CUDA launchers of kernels/ under the emulator, with the signatures of the
torch ops (torch.ops.sae_fast.*), doing what the host entries of csrc/cuda/*.cu
do around the launch. Outputs are poisoned with NaN before the kernels run.

Every function takes `emu` options (order, max_blocks, offsets) for harness.run.
"""

from __future__ import annotations

import torch

from sae_fast import reference
from sae_fast.sparse import segment_by_feature

from .harness import CODE, run_ok


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def sparse_decode(indices, values, counts, W, bias, out_dtype=None, **emu):
    n, k = indices.shape
    s, d = W.shape
    ot = out_dtype or W.dtype
    a = run_ok("sparse_decode", dict(w=CODE[W.dtype], out_dtype=CODE[ot], N=n, K=k, S=s, D=d),
               arrays=dict(indices=indices, values=values, counts=counts, W=W, bias=bias, out=_nan((n, d), ot)), **emu)
    return a["out"]


def sparse_gather_dot(grad, indices, counts, W, **emu):
    n, k = indices.shape
    s, d = W.shape
    a = run_ok("sparse_gather_dot", dict(w=CODE[W.dtype], g=CODE[grad.dtype], N=n, K=k, S=s, D=d),
               arrays=dict(grad=grad, indices=indices, counts=counts, W=W, out=_nan((n, k), grad.dtype)), **emu)
    return a["out"]


def sparse_scatter_rows(coef, indices, counts, grad, d_sae, **emu):
    n, k = indices.shape
    d = grad.shape[1]
    order, start = segment_by_feature(indices, counts, d_sae)
    a = run_ok("sparse_scatter_rows_segmented", dict(t=CODE[grad.dtype], S=d_sae, N=n, K=k, D=d),
               arrays=dict(order=order, start=start, coef=coef, grad=grad, out=_nan((d_sae, d), grad.dtype)), **emu)
    return a["out"]


def adam_b1zero_rows_(param, v, last, rows, grad, *, step, lr, beta2, eps, sparse_dim, renorm=False, **emu):
    """In place, like reference.adam_b1zero_rows_ (param must be contiguous: the
    row geometry is that of csrc/checks.h check_adam_rows_args)."""
    assert grad.dtype == param.dtype, "the launcher takes grad in param's dtype (the host entry checks it)"
    P = reference.row_view(param, sparse_dim)
    n_rows, L = P.shape
    s_row, s_col = P.stride()
    if sparse_dim is None:
        n_rows, s_row, s_col = 1, 0, 1
    n = rows.numel() if rows is not None else 1
    a = run_ok(
        "adam_b1zero_rows",
        dict(t=CODE[param.dtype], n=n, n_rows=n_rows, L=L, s_row=s_row, s_col=s_col, step=step, renorm=int(renorm)),
        dict(lr=lr, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps, bc2_sqrt=(1.0 - beta2**step)**0.5),
        dict(param=param, v=v, last=last, rows=rows, grad=grad.reshape(n, L).contiguous()), **emu)
    param.copy_(a["param"])
    v.copy_(a["v"])
    last.copy_(a["last"])


def jumprelu_select(pre, threshold, half_bandwidth, band, col_offset, *, plan=None, **emu):
    """sae_fast::jumprelu_select's launch sequence (csrc/cuda/jumprelu_select.cu). plan:
    (segments, seg_len) to force the pieces of a row; default the entry's plan."""
    n, c = pre.shape
    ints = dict(t=CODE[pre.dtype], N=n, C=c, band=int(band), col_offset=col_offset)
    if plan is not None:
        ints.update(segments=plan[0], seg_len=plan[1])
    a = run_ok("jumprelu_select", ints, dict(half_bandwidth=half_bandwidth), dict(pre=pre, threshold=threshold.float()),
               **emu)
    return a["a_idx"], a["a_val"], a["a_cnt"], a["band_idx"], a["band_cnt"], a["steps"]
