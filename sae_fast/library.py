"""Fake (meta) implementations and autograd formulas of every compiled op, for every backend.

The ops, by namespace (schemas: csrc/ops.cpp for sae_fast::, sae_fast/backends/triton.py
for sae_fast_triton::; docs/DESIGN.md, "Ops", maps each to its reference, kernels and tests):

    sparse_decode(Tensor indices, Tensor values, Tensor counts, Tensor W, Tensor? bias,
                  ScalarType? out_dtype=None) -> Tensor                     sae_fast, sae_fast_triton
    sparse_gather_dot(Tensor grad, Tensor indices, Tensor counts, Tensor W) -> Tensor   both
    sparse_scatter_rows(Tensor coef, Tensor indices, Tensor counts, Tensor grad,
                        SymInt d_sae) -> Tensor                               both
    adam_b1zero_rows_(Tensor(a!) param, Tensor(b!) v, Tensor(c!) last, Tensor? rows,
                      Tensor grad, int step, float lr, float beta2, float eps,
                      int? sparse_dim, bool renorm) -> ()                     both
    jumprelu_select(Tensor pre, Tensor threshold, float half_bandwidth, bool band=True,
                    int col_offset=0) -> (Tensor x6)                          sae_fast
    jumprelu_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold) -> Tensor   sae_fast_triton
    jumprelu_encode_sets(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold,
                         float half_bandwidth, bool band) -> (Tensor x6)      sae_fast_triton

(sae_fast_triton_unchecked:: repeats the four sparse ops without argument checks, for
sae_fast's own callers.) The three primitives are bilinear and their gradients close
over each other, in whichever namespace:

    decode(v, W):        dv = gather_dot(g, W)      dW = scatter_rows(v, g)     dbias = sum g
    gather_dot(g, W):    dg = decode(dr, W)         dW = scatter_rows(dr, g)
    scatter_rows(c, g):  dc = gather_dot(g, dG)     dg = decode(c, dG)

No backend module registers a fake or a formula itself: they call `register_prims` and
the other register_* functions here.
"""

from __future__ import annotations

import torch

_DONE: set = set()


def register_prims(ns: str) -> None:
    """Fakes and autograd of ns::sparse_decode / sparse_gather_dot / sparse_scatter_rows and
    the fake of ns::adam_b1zero_rows_ (once per namespace)."""
    if ns in _DONE:
        return
    _DONE.add(ns)
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::sparse_decode")
    def _(indices, values, counts, W, bias, out_dtype=None):
        return W.new_empty(indices.shape[0], W.shape[1], dtype=out_dtype or W.dtype)

    @torch.library.register_fake(f"{ns}::sparse_gather_dot")
    def _(grad, indices, counts, W):
        return grad.new_empty(indices.shape)  # grad's dtype: W's, or float32

    @torch.library.register_fake(f"{ns}::sparse_scatter_rows")
    def _(coef, indices, counts, grad, d_sae):
        return grad.new_empty(d_sae, grad.shape[1])

    @torch.library.register_fake(f"{ns}::adam_b1zero_rows_")
    def _(param, v, last, rows, grad, step, lr, beta2, eps, sparse_dim, renorm):
        return None

    def _setup_decode(ctx, inputs, output):
        indices, values, counts, W, bias, out_dtype = inputs
        ctx.save_for_backward(indices, values, counts, W)
        ctx.has_bias = bias is not None

    def _backward_decode(ctx, g):
        indices, values, counts, W = ctx.saved_tensors
        g = g.contiguous()  # float32 when out_dtype was float32
        dv = ops.sparse_gather_dot(g, indices, counts, W).to(values.dtype) if ctx.needs_input_grad[1] else None
        dW = (ops.sparse_scatter_rows(values, indices, counts, g.to(W.dtype), W.shape[0])
              if ctx.needs_input_grad[3] else None)
        db = g.sum(0).to(W.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return None, dv, None, dW, db, None

    torch.library.register_autograd(f"{ns}::sparse_decode", _backward_decode, setup_context=_setup_decode)

    def _setup_gather_dot(ctx, inputs, output):
        grad, indices, counts, W = inputs
        ctx.save_for_backward(grad, indices, counts, W)

    def _backward_gather_dot(ctx, dr):
        grad, indices, counts, W = ctx.saved_tensors
        dr = dr.contiguous()
        dg = (ops.sparse_decode(indices, dr.to(W.dtype), counts, W, None, grad.dtype)
              if ctx.needs_input_grad[0] else None)
        dW = (ops.sparse_scatter_rows(dr.to(W.dtype), indices, counts, grad.to(W.dtype), W.shape[0])
              if ctx.needs_input_grad[3] else None)
        return dg, None, None, dW

    torch.library.register_autograd(f"{ns}::sparse_gather_dot", _backward_gather_dot, setup_context=_setup_gather_dot)

    def _setup_scatter_rows(ctx, inputs, output):
        coef, indices, counts, grad, d_sae = inputs
        ctx.save_for_backward(coef, indices, counts, grad)

    def _backward_scatter_rows(ctx, dG):
        coef, indices, counts, grad = ctx.saved_tensors
        dG = dG.contiguous()
        dc = ops.sparse_gather_dot(grad, indices, counts, dG) if ctx.needs_input_grad[0] else None
        dg = ops.sparse_decode(indices, coef, counts, dG, None) if ctx.needs_input_grad[3] else None
        return dc, None, None, dg, None

    torch.library.register_autograd(f"{ns}::sparse_scatter_rows", _backward_scatter_rows,
                                    setup_context=_setup_scatter_rows)


def _sets_fake(src, band: bool, step_dtype):
    """(a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt) with data-dependent capacities."""
    ctx = torch.library.get_ctx()
    n = src.shape[0]
    cap_a = ctx.new_dynamic_size()
    cap_band = ctx.new_dynamic_size() if band else 0
    return (src.new_empty(n, cap_a, dtype=torch.int64), src.new_empty(n, cap_a), src.new_empty(n, dtype=torch.int32),
            src.new_empty(n, cap_band,
                          dtype=torch.int64), src.new_empty(n, dtype=torch.int32), src.new_empty(n, dtype=step_dtype))


def register_select_fake() -> None:
    """The fake of sae_fast::jumprelu_select (steps int64)."""
    if "select" in _DONE:
        return
    _DONE.add("select")

    @torch.library.register_fake("sae_fast::jumprelu_select")
    def _(pre, threshold, half_bandwidth, band=True, col_offset=0):
        return _sets_fake(pre, band, torch.int64)


def register_triton_encode_fakes(ns: str) -> None:
    """Fakes of ns::jumprelu_encode (dense acts) and ns::jumprelu_encode_sets (step counts int32)."""
    if ns + "::encode" in _DONE:
        return
    _DONE.add(ns + "::encode")

    @torch.library.register_fake(f"{ns}::jumprelu_encode")
    def _(x, W_enc, b_enc, threshold):
        return x.new_empty(x.shape[0], W_enc.shape[1])

    @torch.library.register_fake(f"{ns}::jumprelu_encode_sets")
    def _(x, W_enc, b_enc, threshold, half_bandwidth, band):
        return _sets_fake(x, band, torch.int32)
