"""The CUDA kernels of kernels/ as an implementation of sae_fast's ops on CPU
tensors: the emulated library (harness.build_library) called through ctypes with
the tensors' pointers, doing what the host entries of csrc/cuda/*.cu do around each
launch. `backend()` is the CUDA implementation of every op as a sae_fast Backend
(registered by tests/conftest.py as "cuda-emu", a test-only implementation), so whole
forward and backward passes and optimizer steps run through the CUDA kernels."""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from sae_fast.backends.cpp import compiled_backend
from sae_fast.step import Prims
from sae_fast.sparse import segment_by_feature

from .harness import CODE, build_library

_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@lru_cache(maxsize=1)
def library():
    lib = ctypes.CDLL(build_library())
    lib.emu_sparse_decode.argtypes = [_I32, _I32, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64]
    lib.emu_sparse_gather_dot.argtypes = [_I32, _I32, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64]
    lib.emu_sparse_scatter_rows_segmented.argtypes = [_I32, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64]
    lib.emu_select_plan.argtypes = [_I64, _I64, _P, _P]
    lib.emu_select_count.argtypes = [_I32, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_float, _I32, _P, _P, _P]
    lib.emu_select_scan.argtypes = [_I64, _I64, _I64, _P, _P, _P, _P, _P, _P]
    lib.emu_select_write.argtypes = [
        _I32, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_float, _I32, _I64, _P, _P, _P, _P, _P, _P, _I64, _P, _I64
    ]
    for f in ("emu_sparse_decode", "emu_sparse_gather_dot", "emu_sparse_scatter_rows_segmented", "emu_select_count",
              "emu_select_scan", "emu_select_write"):
        getattr(lib, f).restype = _I32
    return lib


def _p(t):
    return None if t is None else t.data_ptr()


def _ok(err, what):
    assert err == 0, f"{what}: emulated launch returned cudaError {err}"


def decode(indices, values, counts, W, bias, out_dtype=None):
    values, W = values.contiguous(), W.contiguous()
    n, k = indices.shape
    s, d = W.shape
    out = torch.full((n, d), float("nan"), dtype=out_dtype or W.dtype)
    _ok(
        library().emu_sparse_decode(CODE[W.dtype], CODE[out.dtype], _p(indices), _p(values), _p(counts), _p(W),
                                    _p(bias), _p(out), n, k, s, d), "sparse_decode")
    return out


def gather_dot(grad, indices, counts, W):
    grad, W = grad.contiguous(), W.contiguous()
    n, k = indices.shape
    s, d = W.shape
    out = torch.full((n, k), float("nan"), dtype=grad.dtype)
    _ok(
        library().emu_sparse_gather_dot(CODE[W.dtype], CODE[grad.dtype], _p(grad), _p(indices), _p(counts), _p(W),
                                        _p(out), n, k, s, d), "sparse_gather_dot")
    return out


def scatter_rows(coef, indices, counts, grad, d_sae):
    coef, grad = coef.contiguous(), grad.contiguous()
    n, k = indices.shape
    d = grad.shape[1]
    order, start = segment_by_feature(indices, counts, d_sae)
    out = torch.full((d_sae, d), float("nan"), dtype=grad.dtype)
    _ok(
        library().emu_sparse_scatter_rows_segmented(CODE[grad.dtype], _p(order), _p(start), _p(coef), _p(grad), _p(out),
                                                    d_sae, n, max(k, 1), d), "sparse_scatter_rows")
    return out


def select(pre, threshold, half_bandwidth, *, band=True, col_offset=0):
    """sae_fast::jumprelu_select through the emulated CUDA kernels (csrc/cuda/jumprelu_select.cu's sequence)."""
    lib = library()
    pre, thr = pre.contiguous(), threshold.float().contiguous()
    n, c = pre.shape
    seg, seg_len = _I64(), _I64()
    lib.emu_select_plan(n, c, ctypes.addressof(seg), ctypes.addressof(seg_len))
    segments, seg_len = seg.value, seg_len.value
    a_cnt, band_cnt = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    steps = torch.empty(n, dtype=torch.int64)
    a_base = band_base = None
    t, hb = CODE[pre.dtype], float(half_bandwidth)
    if segments == 1:
        _ok(
            lib.emu_select_count(t, _p(pre), _p(thr), n, c, segments, seg_len, hb, int(band), _p(a_cnt), _p(band_cnt),
                                 _p(steps)), "select count")
    else:
        a_base, band_base = (torch.empty(n, segments, dtype=torch.int32) for _ in range(2))
        seg_s = torch.empty(n, segments, dtype=torch.int64)
        _ok(
            lib.emu_select_count(t, _p(pre), _p(thr), n, c, segments, seg_len, hb, int(band), _p(a_base), _p(band_base),
                                 _p(seg_s)), "select count")
        _ok(
            lib.emu_select_scan(n, segments, seg_len, _p(a_base), _p(band_base), _p(seg_s), _p(a_cnt), _p(band_cnt),
                                _p(steps)), "select scan")
    cap_a = int(a_cnt.max()) if n else 0
    cap_band = int(band_cnt.max()) if n and band else 0
    a_idx = torch.full((n, cap_a), -7, dtype=torch.int64)
    a_val = torch.full((n, cap_a), float("nan"), dtype=pre.dtype)
    band_idx = torch.full((n, cap_band), -7, dtype=torch.int64)
    _ok(
        lib.emu_select_write(t, _p(pre), _p(thr), n, c, segments, seg_len, hb, int(band), col_offset, _p(a_cnt),
                             _p(band_cnt), _p(a_base), _p(band_base), _p(a_idx), _p(a_val), cap_a, _p(band_idx),
                             cap_band), "select write")
    return a_idx, a_val, a_cnt, band_idx, band_cnt, steps


PRIMS = Prims(decode=decode, gather_dot=gather_dot, scatter_rows=scatter_rows)


def adam_b1zero_rows_(param, v, last, rows, grad, step, lr, beta2, eps, sparse_dim, renorm):
    """sae_fast::adam_b1zero_rows_'s schema on the emulated CUDA kernel."""
    from .ops import adam_b1zero_rows_ as emulated

    emulated(param, v, last, rows, grad, step=step, lr=lr, beta2=beta2, eps=eps, sparse_dim=sparse_dim, renorm=renorm)


def _unavailable(device):
    from .harness import available

    if device.type != "cpu":
        return f"the emulated CUDA kernels run on CPU tensors, not {device.type}"
    return available()


def backend():
    """The cuda backend's contract with every kernel emulated: chunked GEMM + the fused
    selection, the three primitives, the optimizer."""
    return compiled_backend("cuda-emu", _unavailable, prims=PRIMS, select=select, optimizer=adam_b1zero_rows_)
