"""Python side of sae_fast::jumprelu_select, the fused selection step of the chunked
dense-GEMM encoder (csrc/jumprelu_select.cpp defines it and its CPU kernel,
csrc/jumprelu_select_cuda.cu + kernels/jumprelu_select.cu the CUDA one).

    jumprelu_select(pre [N, C], threshold [C] float32, half_bandwidth, band, col_offset)
        -> (a_idx, a_val, a_cnt, n_idx, n_cnt, steps)

One read of a chunk of pre gives the active set A = {pre > threshold and pre > 0, or
pre NaN} (indices int64 = col_offset + column, values in pre's dtype, counts int32),
the band N = {|float32(pre) - threshold| < float32(half_bandwidth)} (indices, counts;
empty with band=False) and steps[b] = |{j : pre[b, j] > threshold[j]}| (int64), laid
out like sae_fast.sparse.compact (capacity = the largest row count, increasing feature
order, padding index 0 and value 0). The op has no autograd formula; the encoders
call it on detached tensors.
"""

from __future__ import annotations

import torch

from . import _ext

_OP = "sae_fast::jumprelu_select"
_state: dict = {"fake": False, "devices": {}}


def _register_fake() -> None:
    if _state["fake"] or _ext.load_extension() is None:
        return
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CPU")  # RuntimeError where the op does not exist
    except RuntimeError:
        return

    @torch.library.register_fake(_OP)
    def _(pre, threshold, half_bandwidth, band=True, col_offset=0):
        ctx = torch.library.get_ctx()
        n = pre.shape[0]
        cap_a = ctx.new_dynamic_size()
        cap_n = ctx.new_dynamic_size() if band else 0
        return (
            pre.new_empty(n, cap_a, dtype=torch.int64),
            pre.new_empty(n, cap_a),
            pre.new_empty(n, dtype=torch.int32),
            pre.new_empty(n, cap_n, dtype=torch.int64),
            pre.new_empty(n, dtype=torch.int32),
            pre.new_empty(n, dtype=torch.int64),
        )

    _state["fake"] = True


def available(device: torch.device | str) -> bool:
    """True when sae_fast._C carries a jumprelu_select kernel for this device's type
    (CPU: any build of the extension; CUDA: a build with the CUDA kernels)."""
    dev = torch.device(device).type
    known = _state["devices"].get(dev)
    if known is not None:
        return known
    ok = False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(dev)
    if key is not None and _ext.load_extension() is not None:
        try:
            ok = bool(torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key))
        except RuntimeError:  # an older build without the op
            ok = False
    _state["devices"][dev] = ok
    return ok


def jumprelu_select(pre: torch.Tensor, threshold: torch.Tensor, half_bandwidth: float, *, band: bool = True,
                    col_offset: int = 0):
    """(a_idx, a_val, a_cnt, n_idx, n_cnt, steps) of one chunk of pre; see the module docstring."""
    _register_fake()
    return torch.ops.sae_fast.jumprelu_select(pre, threshold, float(half_bandwidth), bool(band), int(col_offset))
