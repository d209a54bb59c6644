"""Python side of the compiled ops in sae_fast._C: fake impls, autograd, backends.

The C++ library (csrc/sparse_ops.cpp) defines the schemas and the CPU/CUDA
kernels of sae_fast::sparse_decode, ::sparse_gather_dot and
::sparse_scatter_rows. Here each op gets a fake (meta) implementation for
torch.compile and an autograd formula. The three are bilinear and their
gradients close over each other:

    decode(v, W):        dv = gather_dot(g, W)      dW = scatter_rows(v, g)     dbias = sum g
    gather_dot(g, W):    dg = decode(dr, W)         dW = scatter_rows(dr, g)
    scatter_rows(c, g):  dc = gather_dot(g, dG)     dg = decode(c, dG)
"""

from __future__ import annotations

import torch

from . import backends, reference
from .sparse import SparseActs
from .sparse_train import Prims, fused_pre_encoder, sparse_jumprelu_sae_loss, sparse_jumprelu_sae_row_grads

_OPS_READY = False


def register_sparse_prims_meta(ns: str) -> None:
    """Fake impls and autograd for ns::sparse_decode / sparse_gather_dot / sparse_scatter_rows.

    Shared by the C++ ops (ns="sae_fast") and the Triton ops (ns="sae_fast_triton"):
    same schemas, same formulas.
    """
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::sparse_decode")
    def _(indices, values, counts, W, bias, out_dtype=None):
        return W.new_empty(indices.shape[0], W.shape[1], dtype=out_dtype or W.dtype)

    @torch.library.register_fake(f"{ns}::sparse_gather_dot")
    def _(grad, indices, counts, W):
        return grad.new_empty(indices.shape)  # grad's dtype: W's, or float32

    @torch.library.register_fake(f"{ns}::sparse_scatter_rows")
    def _(coef, indices, counts, grad, d_sae, deterministic=True):
        return grad.new_empty(d_sae, grad.shape[1])

    def _setup_decode(ctx, inputs, output):
        indices, values, counts, W, bias, out_dtype = inputs
        ctx.save_for_backward(indices, values, counts, W)
        ctx.has_bias = bias is not None

    def _backward_decode(ctx, g):
        indices, values, counts, W = ctx.saved_tensors
        g = g.contiguous()  # float32 when out_dtype was float32
        dv = ops.sparse_gather_dot(g, indices, counts, W).to(values.dtype) if ctx.needs_input_grad[1] else None
        dW = (
            ops.sparse_scatter_rows(values, indices, counts, g.to(W.dtype), W.shape[0], True)
            if ctx.needs_input_grad[3] else None
        )
        db = g.sum(0).to(W.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return None, dv, None, dW, db, None

    torch.library.register_autograd(f"{ns}::sparse_decode", _backward_decode, setup_context=_setup_decode)

    def _setup_gd(ctx, inputs, output):
        grad, indices, counts, W = inputs
        ctx.save_for_backward(grad, indices, counts, W)

    def _backward_gd(ctx, dr):
        grad, indices, counts, W = ctx.saved_tensors
        dr = dr.contiguous()
        dg = ops.sparse_decode(indices, dr.to(W.dtype), counts, W, None, grad.dtype) if ctx.needs_input_grad[0] else None
        dW = (
            ops.sparse_scatter_rows(dr.to(W.dtype), indices, counts, grad.to(W.dtype), W.shape[0], True)
            if ctx.needs_input_grad[3] else None
        )
        return dg, None, None, dW

    torch.library.register_autograd(f"{ns}::sparse_gather_dot", _backward_gd, setup_context=_setup_gd)

    def _setup_sr(ctx, inputs, output):
        coef, indices, counts, grad, d_sae, deterministic = inputs
        ctx.save_for_backward(coef, indices, counts, grad)

    def _backward_sr(ctx, dG):
        coef, indices, counts, grad = ctx.saved_tensors
        dG = dG.contiguous()
        dc = ops.sparse_gather_dot(grad, indices, counts, dG) if ctx.needs_input_grad[0] else None
        dg = ops.sparse_decode(indices, coef, counts, dG, None) if ctx.needs_input_grad[3] else None
        return dc, None, None, dg, None, None

    torch.library.register_autograd(f"{ns}::sparse_scatter_rows", _backward_sr, setup_context=_setup_sr)


def _register_ops() -> None:
    global _OPS_READY
    if not _OPS_READY:
        register_sparse_prims_meta("sae_fast")

        @torch.library.register_fake("sae_fast::adam_b1zero_rows_")
        def _(param, v, last, rows, grad, step, lr, beta2, eps, sparse_dim, renorm):
            return None

        _OPS_READY = True


def adam_b1zero_rows_(param, v, last, rows, grad, *, step, lr, beta2, eps, sparse_dim, renorm=False) -> None:
    """sae_fast::adam_b1zero_rows_ (CPU or CUDA kernel) with reference.adam_b1zero_rows_'s signature."""
    _register_ops()
    torch.ops.sae_fast.adam_b1zero_rows_(param, v, last, rows, grad, step, lr, beta2, eps, sparse_dim, renorm)


def prims_from_ops(ops, deterministic: bool = True) -> Prims:
    """The three primitives of sparse_train from an op namespace (torch.ops.<ns>)."""
    return Prims(
        decode=lambda i, v, c, W, b, out_dtype=None: ops.sparse_decode(i, v.contiguous(), c, W.contiguous(), b, out_dtype),
        gather_dot=lambda g, i, c, W: ops.sparse_gather_dot(g.contiguous(), i, c, W.contiguous()),
        scatter_rows=lambda co, i, c, g, s: ops.sparse_scatter_rows(co.contiguous(), i, c, g.contiguous(), s, deterministic),
    )


class CppBackend:
    """`cpu` / `cuda`: dense encoder GEMM, compiled sparse decode and sparse backward."""

    def __init__(self, name: str):
        self.name = name
        _register_ops()
        self.prims = prims_from_ops(torch.ops.sae_fast, True)

    def encode(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input):
        return reference.jumprelu_encode(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)

    def encode_sparse(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input, capacity):
        if apply_b_dec_to_input:
            x = x - b_dec
        sets = fused_pre_encoder(x, W_enc, b_enc, threshold, 0.0, band=False)
        return SparseActs(sets.a_idx, sets.a_val, sets.a_cnt, W_enc.shape[1])

    def decode(self, acts: SparseActs, W_dec, b_dec):
        return self.prims.decode(acts.indices, acts.values, acts.counts, W_dec, b_dec)

    def loss(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input):
        return sparse_jumprelu_sae_loss(
            x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient=l0_coefficient, bandwidth=bandwidth,
            apply_b_dec_to_input=apply_b_dec_to_input, encoder=fused_pre_encoder, prims=self.prims,
        )

    def row_grads(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input,
                  dense=None):
        return sparse_jumprelu_sae_row_grads(
            x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient=l0_coefficient, bandwidth=bandwidth,
            apply_b_dec_to_input=apply_b_dec_to_input, encoder=fused_pre_encoder, prims=self.prims, dense=dense,
        )


def register_backends(ext) -> None:
    def cpu_unavailable(device: torch.device):
        return None if device.type == "cpu" else f"the cpu backend runs on CPU tensors, not {device.type}"

    def cuda_unavailable(device: torch.device):
        if not ext.has_cuda():
            return "sae_fast._C was built without CUDA kernels (CPU torch or no nvcc at build time)"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        return None

    backends.register("cpu", lambda: CppBackend("cpu"), cpu_unavailable)
    backends.register("cuda", lambda: CppBackend("cuda"), cuda_unavailable)
