"""The `cpu` and `cuda` backends: the compiled ops of sae_fast._C.

Schemas: csrc/ops.cpp. Kernels: csrc/cpu (C++/OpenMP) and csrc/cuda + kernels/ (CUDA,
torch-free device code). Fakes and autograd: sae_fast.library. Both backends encode with
a dense GEMM a chunk of features at a time and select each chunk with
sae_fast::jumprelu_select (one read of pre); decode and the training step's backward
run the sparse primitives sae_fast::sparse_decode / sparse_gather_dot /
sparse_scatter_rows; the optimizer is sae_fast::adam_b1zero_rows_.
"""

from __future__ import annotations

import functools

import torch

from .. import library, reference
from ..step import Prims, chunked_pre_encoder
from . import Backend, register

_SELECT = "sae_fast::jumprelu_select"
_select_devices: dict = {}


def _ready() -> None:
    library.register_prims("sae_fast")
    library.register_select_fake()


def select_available(device: torch.device | str) -> bool:
    """True when sae_fast._C carries a jumprelu_select kernel for this device's type
    (CPU: any build of the extension; CUDA: a build with the CUDA kernels)."""
    dev = torch.device(device).type
    if dev not in _select_devices:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(dev)
        try:
            ok = key is not None and bool(torch._C._dispatch_has_kernel_for_dispatch_key(_SELECT, key))
        except RuntimeError:  # an older build without the op
            ok = False
        _select_devices[dev] = ok
    return _select_devices[dev]


def jumprelu_select(pre: torch.Tensor, threshold: torch.Tensor, half_bandwidth: float, *, band: bool = True,
                    col_offset: int = 0):
    """sae_fast::jumprelu_select, the fused selection of one chunk of pre [N, C]:

        (a_idx, a_val, a_cnt, band_idx, band_cnt, steps)

    the active set A = {pre > threshold and pre > 0, or pre NaN} (indices int64 =
    col_offset + column, values in pre's dtype, counts int32), the band N =
    {|float32(pre) - threshold| < float32(half_bandwidth)} (empty with band=False) and
    steps[b] = |{j : pre[b, j] > threshold[j]}| (int64), laid out like
    sae_fast.sparse.compact (capacity = the largest row count, increasing feature order,
    padding index 0 and value 0). No autograd formula: the encoders call it on detached
    tensors. threshold is float32 [C]."""
    _ready()
    return torch.ops.sae_fast.jumprelu_select(pre, threshold, float(half_bandwidth), bool(band), int(col_offset))


def fused_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth: float, *, band: bool = True,
                      chunk_features: int | None = None):
    """The cpu/cuda backends' training encoder: chunked_pre_encoder selecting each chunk with
    sae_fast::jumprelu_select where x's device has it (the PyTorch definition elsewhere)."""
    select = jumprelu_select if select_available(x.device) else None
    return chunked_pre_encoder(x, W_enc, b_enc, threshold, half_bandwidth, band=band, chunk_features=chunk_features,
                               select=select)


def prims_from_ops(ops) -> Prims:
    """The three primitives of the training step from an op namespace (torch.ops.<ns>)."""

    def decode(i, v, c, W, b, out_dtype=None):
        return ops.sparse_decode(i, v.contiguous(), c, W.contiguous(), b, out_dtype)

    def gather_dot(g, i, c, W):
        return ops.sparse_gather_dot(g.contiguous(), i, c, W.contiguous())

    def scatter_rows(coef, i, c, g, d_sae):
        return ops.sparse_scatter_rows(coef.contiguous(), i, c, g.contiguous(), d_sae)

    return Prims(decode, gather_dot, scatter_rows)


def compiled_backend(name: str, unavailable, *, prims: Prims | None = None, select=None, optimizer=None) -> Backend:
    """A Backend over the compiled ops' contract: `prims` and `optimizer` (default: the
    sae_fast:: ops) and `select` (an implementation of jumprelu_select; default: the
    compiled op where the device has it). The tests build the emulated CUDA
    implementation with this too."""
    if prims is None or optimizer is None:
        _ready()
        prims = prims or prims_from_ops(torch.ops.sae_fast)
        optimizer = optimizer or torch.ops.sae_fast.adam_b1zero_rows_
    encoder = fused_pre_encoder if select is None else functools.partial(chunked_pre_encoder, select=select)

    def encode_sparse(x, W_enc, b_enc, threshold):
        sets = encoder(x, W_enc, b_enc, threshold, 0.0, band=False)
        return sets.a_idx, sets.a_val, sets.a_cnt

    def decode(acts, W_dec, b_dec):
        return prims.decode(acts.indices, acts.values, acts.counts, W_dec, b_dec)

    devices = ("cuda", ) if name == "cuda" else ("cpu", )
    return Backend(name=name, devices=devices, unavailable=unavailable, encode=reference.jumprelu_encode,
                   encode_sparse=encode_sparse, decode=decode, encoder=encoder, prims=prims, optimizer=optimizer,
                   checks_indices=name == "cuda", optimizer_checks_rows=name == "cuda")


def register_backends(ext) -> None:

    def cpu_unavailable(device: torch.device):
        return None if device.type == "cpu" else f"the cpu backend runs on CPU tensors, not {device.type}"

    def cuda_unavailable(device: torch.device):
        if not ext.has_cuda():
            return "sae_fast._C was built without CUDA kernels (CPU torch or no nvcc at build time)"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        return None

    register("cpu", lambda: compiled_backend("cpu", cpu_unavailable))
    register("cuda", lambda: compiled_backend("cuda", cuda_unavailable))
