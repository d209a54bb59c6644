"""The `triton` backend: Triton kernels as torch.library custom ops, with fakes and autograd.

Op names follow the ladder of DESIGN.md; the namespace says which implementation:
sae_fast_triton::jumprelu_encode (dense acts, fused threshold),
sae_fast_triton::jumprelu_encode_sparse (active set, band, per-row step counts),
sae_fast_triton::sparse_decode / sparse_gather_dot / sparse_scatter_rows (same schemas,
fakes and autograd as the C++ ops in namespace sae_fast),
sae_fast_triton::adam_b1zero_rows_ (the fused, in-place optimizer step of sae_fast.optim).

Those four validate every argument as the C++ ops do (csrc/checks.h), indices, counts
and rows included (sae_fast._checks: at the call on CPU tensors, without a sync on CUDA
tensors). sae_fast_triton_unchecked:: holds the same four without the checks, for
sae_fast's own callers on data they made or validated already.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _checks, backends
from .cpp_ops import prims_from_ops, register_sparse_prims_meta
from .sparse import SparseActs, valid_slots
from .sparse_train import EncodedSets, sparse_jumprelu_sae_loss, sparse_jumprelu_sae_row_grads
from . import triton_kernels as tk

NS = "sae_fast_triton"


def _c(t: Tensor) -> Tensor:
    return t.contiguous()


@torch.library.custom_op(f"{NS}::jumprelu_encode", mutates_args=())
def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor) -> Tensor:
    return tk._launch_encode(_c(x), _c(W_enc), _c(b_enc), _c(threshold.float()), dense=True)


@jumprelu_encode.register_fake
def _(x, W_enc, b_enc, threshold):
    return x.new_empty(x.shape[0], W_enc.shape[1])


@torch.library.custom_op(f"{NS}::jumprelu_encode_sparse", mutates_args=())
def jumprelu_encode_sparse(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, half_bandwidth: float, band: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt = tk.jumprelu_encode_sets(
        _c(x), _c(W_enc), _c(b_enc), _c(threshold.float()), band=band, half_bw=half_bandwidth
    )
    # The launcher just read the counts back (a sync): deferred checks of earlier calls have
    # finished, so report their failures here at no cost.
    _checks.poll_pending()
    if torch.are_deterministic_algorithms_enabled():
        # Kernel tiles claim slots through atomics, so a row's order varies run to
        # run; sorting by feature makes every later float sum order-fixed.
        pad = ~valid_slots(a_idx, a_cnt)
        big = torch.iinfo(torch.int64).max
        a_idx, order = a_idx.masked_fill(pad, big).sort(dim=1)
        a_val = torch.gather(a_val, 1, order)
        a_idx = a_idx.masked_fill(a_idx == big, 0)
    return a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt


@jumprelu_encode_sparse.register_fake
def _(x, W_enc, b_enc, threshold, half_bandwidth, band):
    ctx = torch.library.get_ctx()
    n = x.shape[0]
    a_cap = ctx.new_dynamic_size()
    n_cap = ctx.new_dynamic_size() if band else 0
    i64 = dict(dtype=torch.int64, device=x.device)
    i32 = dict(dtype=torch.int32, device=x.device)
    return (
        x.new_empty(n, a_cap, **i64), x.new_empty(n, a_cap), x.new_empty(n, **i32),
        x.new_empty(n, n_cap, **i64), x.new_empty(n, **i32), x.new_empty(n, **i32),
    )


def _check_ranges(op: str, indices: Tensor, counts: Tensor, d_sae: int) -> None:
    _checks.check_sparse_ranges(op, indices, counts, d_sae, defer=True, locate=tk.locate_sparse)


def _define_sparse_ops(ns: str, checked: bool) -> None:
    """ns::sparse_decode / sparse_gather_dot / sparse_scatter_rows / adam_b1zero_rows_.

    checked: every argument is validated as csrc/checks.h does for the C++ ops, and the
    indices, counts and rows by sae_fast._checks (on CUDA tensors without a sync: the
    kernels mask their accesses, the verdict is raised later; see _checks). Unchecked
    (namespace sae_fast_triton_unchecked): for sae_fast's own callers only, on data it
    made itself (the training step's primitives) or validated already (the optimizer)."""

    @torch.library.custom_op(f"{ns}::sparse_decode", mutates_args=())
    def sparse_decode(
        indices: Tensor, values: Tensor, counts: Tensor, W: Tensor, bias: Tensor | None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        if checked:
            op = f"{ns}::sparse_decode"
            _checks.check_decode_args(op, indices, values, counts, W, bias, out_dtype)
            _check_ranges(op, indices, counts, W.shape[0])
        return tk.sparse_decode(_c(indices), _c(values), _c(counts), _c(W), _c(bias) if bias is not None else None,
                                out_dtype=out_dtype)

    @torch.library.custom_op(f"{ns}::sparse_gather_dot", mutates_args=())
    def sparse_gather_dot(grad: Tensor, indices: Tensor, counts: Tensor, W: Tensor) -> Tensor:
        if checked:
            op = f"{ns}::sparse_gather_dot"
            _checks.check_gather_dot_args(op, grad, indices, counts, W)
            _check_ranges(op, indices, counts, W.shape[0])
        return tk.sparse_gather_dot(_c(grad), _c(indices), _c(counts), _c(W))

    @torch.library.custom_op(f"{ns}::sparse_scatter_rows", mutates_args=())
    def sparse_scatter_rows(
        coef: Tensor, indices: Tensor, counts: Tensor, grad: Tensor, d_sae: int, deterministic: bool = True
    ) -> Tensor:
        if checked:
            op = f"{ns}::sparse_scatter_rows"
            _checks.check_scatter_rows_args(op, coef, indices, counts, grad, d_sae)
            _check_ranges(op, indices, counts, d_sae)
        # Always deterministic: a segmented reduction over entries sorted by feature.
        return tk.sparse_scatter_rows(_c(coef), _c(indices), _c(counts), _c(grad), d_sae)

    register_sparse_prims_meta(ns)

    @torch.library.custom_op(f"{ns}::adam_b1zero_rows_", mutates_args=("param", "v", "last"))
    def adam_b1zero_rows_(
        param: Tensor, v: Tensor, last: Tensor, rows: Tensor | None, grad: Tensor, step: int, lr: float,
        beta2: float, eps: float, sparse_dim: int | None, renorm: bool,
    ) -> None:
        op = f"{ns}::adam_b1zero_rows_"
        if checked:
            n_rows, _ = _checks.check_adam_rows_args(op, param, v, last, rows, grad, sparse_dim)
            if rows is not None:
                _checks.check_rows(op, rows, n_rows, defer=True)
        else:
            for name, t in (("param", param), ("v", v)):
                if not t.is_contiguous():
                    raise ValueError(f"{op}: {name} must be contiguous")
        tk.adam_b1zero_rows_(param, v, last, rows, grad, step=step, lr=lr, beta2=beta2, eps=eps,
                             sparse_dim=sparse_dim, renorm=renorm)

    @adam_b1zero_rows_.register_fake
    def _(param, v, last, rows, grad, step, lr, beta2, eps, sparse_dim, renorm):
        return None


_define_sparse_ops(NS, checked=True)
NS_UNCHECKED = "sae_fast_triton_unchecked"
_define_sparse_ops(NS_UNCHECKED, checked=False)
UNCHECKED = getattr(torch.ops, NS_UNCHECKED)
# The training step's primitives: indices and counts come from sae_fast's own encoder.
PRIMS = prims_from_ops(UNCHECKED, True)


def triton_encoder(xin, W_enc, b_enc, threshold, half_bandwidth: float) -> EncodedSets:
    a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt = torch.ops.sae_fast_triton.jumprelu_encode_sparse(
        xin, W_enc, b_enc, threshold, half_bandwidth, True
    )
    return EncodedSets(a_idx, a_val, a_cnt, n_idx, n_cnt, h_cnt.sum().float())


class TritonBackend:
    name = "triton"

    def encode(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input):
        if apply_b_dec_to_input:
            x = x - b_dec
        return torch.ops.sae_fast_triton.jumprelu_encode(x, W_enc, b_enc, threshold)

    def encode_sparse(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input, capacity):
        if apply_b_dec_to_input:
            x = x - b_dec
        a_idx, a_val, a_cnt, *_ = torch.ops.sae_fast_triton.jumprelu_encode_sparse(x, W_enc, b_enc, threshold, 0.0, False)
        return SparseActs(a_idx, a_val, a_cnt, W_enc.shape[1])

    def decode(self, acts: SparseActs, W_dec, b_dec):
        return torch.ops.sae_fast_triton.sparse_decode(acts.indices, acts.values, acts.counts, W_dec, b_dec)

    def loss(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input):
        return sparse_jumprelu_sae_loss(
            x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient=l0_coefficient, bandwidth=bandwidth,
            apply_b_dec_to_input=apply_b_dec_to_input, encoder=triton_encoder, prims=PRIMS,
        )

    def row_grads(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input,
                  dense=None):
        return sparse_jumprelu_sae_row_grads(
            x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient=l0_coefficient, bandwidth=bandwidth,
            apply_b_dec_to_input=apply_b_dec_to_input, encoder=triton_encoder, prims=PRIMS, dense=dense,
        )


def _unavailable(device: torch.device):
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return None
        return "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (slow, for tests)"
    return f"Triton does not run on {device.type} tensors"


backends.register("triton", TritonBackend, _unavailable)
