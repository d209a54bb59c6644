"""The `triton` backend: the Triton kernels of sae_fast.backends.triton_kernels as
torch.library custom ops (fakes and autograd: sae_fast.library).

Op names follow docs/DESIGN.md, "Names"; the namespace says which implementation:
sae_fast_triton::jumprelu_encode (dense acts, fused threshold),
sae_fast_triton::jumprelu_encode_sets (the training encoder's EncodedSets: active set,
band, per-row step counts, from one fused GEMM that never forms pre),
sae_fast_triton::sparse_decode / sparse_gather_dot / sparse_scatter_rows (the schemas
of the C++ ops in namespace sae_fast),
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

from .. import _checks, library
from ..sparse import valid_slots
from ..step import EncodedSets
from . import Backend, register
from . import triton_kernels as tk
from .cpp import prims_from_ops

NS = "sae_fast_triton"


def _c(t: Tensor) -> Tensor:
    return t.contiguous()


@torch.library.custom_op(f"{NS}::jumprelu_encode", mutates_args=())
def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor) -> Tensor:
    return tk._launch_encode(_c(x), _c(W_enc), _c(b_enc), _c(threshold.float()), dense=True)


@torch.library.custom_op(f"{NS}::jumprelu_encode_sets", mutates_args=())
def jumprelu_encode_sets(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, half_bandwidth: float,
                         band: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt = tk.jumprelu_encode_sets(_c(x), _c(W_enc), _c(b_enc),
                                                                                _c(threshold.float()), band=band,
                                                                                half_bw=half_bandwidth)
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
    return a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt


library.register_triton_encode_fakes(NS)


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
    def sparse_decode(indices: Tensor, values: Tensor, counts: Tensor, W: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype | None = None) -> Tensor:
        if checked:
            op = f"{ns}::sparse_decode"
            _checks.check_decode_args(op, indices, values, counts, W, bias, out_dtype)
            _check_ranges(op, indices, counts, W.shape[0])
        return tk.sparse_decode(_c(indices), _c(values), _c(counts), _c(W),
                                _c(bias) if bias is not None else None, out_dtype=out_dtype)

    @torch.library.custom_op(f"{ns}::sparse_gather_dot", mutates_args=())
    def sparse_gather_dot(grad: Tensor, indices: Tensor, counts: Tensor, W: Tensor) -> Tensor:
        if checked:
            op = f"{ns}::sparse_gather_dot"
            _checks.check_gather_dot_args(op, grad, indices, counts, W)
            _check_ranges(op, indices, counts, W.shape[0])
        return tk.sparse_gather_dot(_c(grad), _c(indices), _c(counts), _c(W))

    @torch.library.custom_op(f"{ns}::sparse_scatter_rows", mutates_args=())
    def sparse_scatter_rows(coef: Tensor, indices: Tensor, counts: Tensor, grad: Tensor, d_sae: int) -> Tensor:
        if checked:
            op = f"{ns}::sparse_scatter_rows"
            _checks.check_scatter_rows_args(op, coef, indices, counts, grad, d_sae)
            _check_ranges(op, indices, counts, d_sae)
        # Always deterministic: a segmented reduction over entries sorted by feature.
        return tk.sparse_scatter_rows(_c(coef), _c(indices), _c(counts), _c(grad), d_sae)

    @torch.library.custom_op(f"{ns}::adam_b1zero_rows_", mutates_args=("param", "v", "last"))
    def adam_b1zero_rows_(param: Tensor, v: Tensor, last: Tensor, rows: Tensor | None, grad: Tensor, step: int,
                          lr: float, beta2: float, eps: float, sparse_dim: int | None, renorm: bool) -> None:
        op = f"{ns}::adam_b1zero_rows_"
        if checked:
            n_rows, _ = _checks.check_adam_rows_args(op, param, v, last, rows, grad, sparse_dim)
            if rows is not None:
                _checks.check_rows(op, rows, n_rows, defer=True)
        else:
            for name, t in (("param", param), ("v", v)):
                if not t.is_contiguous():
                    raise ValueError(f"{op}: {name} must be contiguous")
        tk.adam_b1zero_rows_(param, v, last, rows, grad, step=step, lr=lr, beta2=beta2, eps=eps, sparse_dim=sparse_dim,
                             renorm=renorm)

    library.register_prims(ns)


_define_sparse_ops(NS, checked=True)
NS_UNCHECKED = "sae_fast_triton_unchecked"
_define_sparse_ops(NS_UNCHECKED, checked=False)
UNCHECKED = getattr(torch.ops, NS_UNCHECKED)
# The training step's primitives: indices and counts come from sae_fast's own encoder.
PRIMS = prims_from_ops(UNCHECKED)


def triton_encoder(xin, W_enc, b_enc, threshold, half_bandwidth: float, *, band: bool = True) -> EncodedSets:
    a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt = torch.ops.sae_fast_triton.jumprelu_encode_sets(
        xin, W_enc, b_enc, threshold, half_bandwidth, band)
    return EncodedSets(a_idx, a_val, a_cnt, band_idx, band_cnt, step_cnt.sum().float())


def _encode_sparse(x, W_enc, b_enc, threshold):
    a_idx, a_val, a_cnt, *_ = torch.ops.sae_fast_triton.jumprelu_encode_sets(x, W_enc, b_enc, threshold, 0.0, False)
    return a_idx, a_val, a_cnt


def _decode(acts, W_dec, b_dec):
    return torch.ops.sae_fast_triton.sparse_decode(acts.indices, acts.values, acts.counts, W_dec, b_dec)


def _unavailable(device: torch.device):
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return None
        return "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (slow, for tests)"
    return f"Triton does not run on {device.type} tensors"


def _backend() -> Backend:
    # optimizer: the unchecked entry; step_rows has checked the rows already, step() made them itself
    return Backend(name="triton", devices=("cuda", "cpu"), unavailable=_unavailable,
                   encode=torch.ops.sae_fast_triton.jumprelu_encode, encode_sparse=_encode_sparse, decode=_decode,
                   encoder=triton_encoder, prims=PRIMS, optimizer=UNCHECKED.adam_b1zero_rows_, checks_indices=True,
                   defers_checks=True, interpreted_on=("cpu", ))


register("triton", _backend)
