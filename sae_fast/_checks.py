"""Input validation shared by every backend.

Every public op calls these before dispatching, so a bad input gets the same
message whichever backend would have run it. Messages name the argument and
say what was expected.

Range checks (memory safety)
----------------------------
The sparse ops read and write memory at positions taken from their inputs, so
every entry checks those positions before a kernel runs:

- sparse_decode / sparse_gather_dot / sparse_scatter_rows (sae_fast.sparse_decode,
  JumpReLUSAE.decode, torch.ops.sae_fast_triton.*; torch.ops.sae_fast.* check the
  same in C++, csrc/checks.h): counts[b] in [0, capacity] and every index on a valid
  slot (k < counts[b]) in [0, d_sae); d_sae >= 0.
- the optimizer (SparseAdamB1Zero.step_rows, torch.ops.sae_fast_triton.adam_b1zero_rows_,
  torch.ops.sae_fast.adam_b1zero_rows_): rows int64 1-D, each in [0, n_rows) of that
  parameter, and unique (check_rows says why duplicates are refused, not merged).

The error names the op, the argument, the first offending position and the valid
range, e.g. "sparse_decode: indices[3, 1]=5000 outside [0, d_sae=32)" or
"SparseAdamB1Zero.step_rows: rows[2]=-1 outside [0, n_rows=32)". Out-of-range values
raise OutOfRangeError (both an IndexError and a ValueError), a repeated row
ValueError, a wrong dtype TypeError, a wrong shape ValueError. The C++ ops raise
RuntimeError with the same text.

CPU tensors are checked at the call. On CUDA tensors a check needs a device->host
read; where the kernel that follows masks its loads and stores (the Triton kernels;
bad input then gives garbage output, never an out-of-bounds access), the check runs
on the device without a synchronisation: one fused Triton kernel (sae_fast.backends.triton) finds
the first bad position (the rows check: a few torch ops and a sort), a 32-byte copy
takes it to pinned host memory behind a CUDA event, and the error is raised at the
next sae_fast op call after that event completed, or at sae_fast.check_pending()
(which waits for it). Such errors say that they come from an earlier call. The torch
backend on CUDA (index_select would hit a device assert) and the C++ cuda backend
check synchronously, one device->host read per call. Under CUDA graph capture the
range checks step aside (nothing can be read back there).
sae_fast's own training step calls unchecked internal entries on the data its
encoder made (torch.ops.sae_fast_triton_unchecked); the public ops always check.

Opting out: SAE_FAST_UNCHECKED=1 (read at every call, by the C++ ops too) skips the
range checks (not the shape and dtype ones, which read no device data). An
out-of-range index, count or row then gives a wrong result, never an out-of-bounds
access: every kernel guards its own (the Triton kernels mask their loads and
stores, the C++ CPU and CUDA kernels clamp counts and skip bad indices and rows,
tested with the checks off), and the torch backend's index_select raises. Use it
only for inputs sae_fast made itself.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading
from collections.abc import Callable

import torch

from .dtypes import FLOAT_DTYPES  # noqa: E402


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor of dtype float32, bfloat16 or float16, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_input(x: torch.Tensor, d_in: int, weight_dtype: torch.dtype, *, name: str = "x", dim: str = "d_in") -> None:
    """x: [..., d_in] floating, same dtype as the SAE weights (dim: the last dimension's name)."""
    check_float(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., {dim}] with at least one leading (token) "
                         f"dimension, got a {x.dim()}-D tensor of shape {list(x.shape)}; "
                         f"use {name}.unsqueeze(0) for a single token")
    if x.shape[-1] != d_in:
        raise ValueError(f"{name} must have last dimension {dim}={d_in}, got shape {list(x.shape)}")
    if x.dtype != weight_dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the SAE weights are {weight_dtype}; "
                        f"cast the input with {name}.to({weight_dtype}) (mixing dtypes is not "
                        f"done implicitly)")


def check_encoder_params(W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                         b_dec: torch.Tensor | None = None) -> tuple[int, int]:
    check_float("W_enc", W_enc)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must have shape [d_in, d_sae], got {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    check_float("b_enc", b_enc)
    check_shape("b_enc", b_enc, (d_sae, ))
    check_float("threshold", threshold)
    check_shape("threshold", threshold, (d_sae, ))
    if b_enc.dtype != W_enc.dtype:
        raise TypeError(f"b_enc must have the dtype of W_enc ({W_enc.dtype}), got {b_enc.dtype}")
    if b_dec is not None:
        check_float("b_dec", b_dec)
        check_shape("b_dec", b_dec, (d_in, ))
        if b_dec.dtype != W_enc.dtype:
            raise TypeError(f"b_dec must have the dtype of W_enc ({W_enc.dtype}), got {b_dec.dtype}")
    check_same_device(W_enc=W_enc, b_enc=b_enc, threshold=threshold, b_dec=b_dec)
    return d_in, d_sae


def check_decoder_params(W_dec: torch.Tensor, b_dec: torch.Tensor | None, *, out: str = "d_in") -> tuple[int, int]:
    """W_dec [d_sae, out], b_dec [out]; out names the output dimension (a transcoder's is d_out)."""
    check_float("W_dec", W_dec)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must have shape [d_sae, {out}], got {list(W_dec.shape)}")
    d_sae, d_in = W_dec.shape
    if b_dec is not None:
        check_float("b_dec", b_dec)
        check_shape("b_dec", b_dec, (d_in, ))
        if b_dec.dtype != W_dec.dtype:
            raise TypeError(f"b_dec must have the dtype of W_dec ({W_dec.dtype}), got {b_dec.dtype}")
        check_same_device(W_dec=W_dec, b_dec=b_dec)
    return d_sae, d_in


def check_skip(W_skip: torch.Tensor, d_in: int, d_out: int, weight_dtype: torch.dtype) -> None:
    """A transcoder's skip connection W_skip [d_in, d_out] in the weights' dtype."""
    check_float("W_skip", W_skip)
    check_shape("W_skip", W_skip, (d_in, d_out))
    if W_skip.dtype != weight_dtype:
        raise TypeError(f"W_skip must have the dtype of W_enc ({weight_dtype}), got {W_skip.dtype}")


def check_bandwidth(bandwidth: float) -> float:
    bw = float(bandwidth)
    if not bw > 0 or bw != bw or bw == float("inf"):
        raise ValueError(f"bandwidth must be a finite positive number, got {bandwidth!r}")
    return bw


# ------------------------------------------------------------------ range checks
class OutOfRangeError(IndexError, ValueError):
    """An index, count or row outside its valid range. Both an IndexError and a
    ValueError (as numpy's AxisError is), so either except clause catches it."""


ENV_UNCHECKED = "SAE_FAST_UNCHECKED"

_DEFERRED_NOTE = (" [reported after that call returned: checks of CUDA tensors run on the device and raise at the next "
                  "sae_fast op call or at sae_fast.check_pending(); that call's result is meaningless, but its kernel "
                  "masks every access, so no memory outside its tensors was touched]")


def checks_disabled() -> bool:
    """True when SAE_FAST_UNCHECKED is set (read at every call)."""
    return os.environ.get(ENV_UNCHECKED, "") not in ("", "0")


class _Pending:
    """A range check whose result is still on its way from the device."""

    __slots__ = ("host", "event", "report")

    def __init__(self, host, event, report):
        self.host, self.event, self.report = host, event, report

    def ready(self, wait: bool) -> bool:
        if self.event is None:
            return True
        if wait:
            self.event.synchronize()
            return True
        return self.event.query()


_PENDING: list[_Pending] = []
_LOCK = threading.Lock()
# Private switch for tests: take the deferred path on CPU tensors too (a machine
# without a GPU then exercises the mechanism the CUDA path uses). "busy": their
# events stay incomplete until check_pending() waits, like those of a busy GPU.
_defer_cpu: str | None = None


class _BusyEvent:

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@contextlib.contextmanager
def _deferred_on_cpu(busy: bool = False):
    global _defer_cpu
    prev, _defer_cpu = _defer_cpu, "busy" if busy else "done"
    try:
        yield
    finally:
        _defer_cpu = prev


def _take(wait: bool) -> list[_Pending]:
    with _LOCK:
        done = [p for p in _PENDING if p.ready(wait)]
        if done:
            gone = {id(p) for p in done}
            _PENDING[:] = [p for p in _PENDING if id(p) not in gone]
    return done


def _raise_first(done: list[_Pending]) -> None:
    errors = [e for e in (p.report(p.host.tolist(), True) for p in done) if e is not None]
    if errors:
        exc = errors[0]
        if len(errors) > 1:
            exc.args = (f"{exc.args[0]} (and {len(errors) - 1} more failed deferred check(s))", )
        raise exc


def _capturing() -> bool:
    # Under CUDA graph capture nothing may be read back or queried: the range checks
    # step aside (the kernels still mask every access).
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def poll_pending() -> None:
    """Raise the first failure among deferred checks whose device work has finished; never waits."""
    if _PENDING and not _capturing():
        _raise_first(_take(False))


def check_pending() -> None:
    """Wait for every deferred range check (CUDA tensors) and raise the first failure.

    sae_fast.check_pending(): call it where you want bad inputs of earlier calls
    reported (after a batch, before a checkpoint). It synchronises with the device
    only when a check is pending."""
    if _PENDING:
        _raise_first(_take(True))


def _finish(summary: torch.Tensor, report: Callable, defer: bool) -> None:
    """Raise report(summary) now, or (defer, CUDA) hand it to the pending list without a sync."""
    if defer and (summary.is_cuda or _defer_cpu):
        if summary.is_cuda:
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)  # on the device's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(summary.device))
        else:
            host, event = summary.clone(), _BusyEvent() if _defer_cpu == "busy" else None
        with _LOCK:
            _PENDING.append(_Pending(host, event, report))
        return
    exc = report(summary.tolist(), False)  # CUDA with defer=False: the one device->host read
    if exc is not None:
        raise exc


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Position of the first True of a 1-D bool mask, or its length when none: 0-d int64, no sync."""
    n = mask.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=mask.device)
    return torch.where(mask, torch.arange(n, device=mask.device), n).amin()


def _value_at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """t.flatten()[min(i, numel - 1)] as 0-d int64 (0 for an empty t), no sync."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    return flat.index_select(0, i.clamp(max=flat.numel() - 1).reshape(1)).reshape(()).long()


def _immediate(t: torch.Tensor, defer: bool) -> bool:
    """CPU tensors are checked at the call (with a cheap all-good test first)."""
    return not t.is_cuda and not (defer and _defer_cpu)


# Cost of check_sparse_ranges. Measured on this project's 2-core CPU (torch 2.13, no GPU):
# decode of 4096 tokens x capacity 64 (all slots valid), d_sae 16384, d_in 256, float32,
# checked vs SAE_FAST_UNCHECKED=1 (which also skips the C++ check of the cpu backend),
# 61 interleaved runs, median of the paired checked/unchecked ratios:
#   cpu backend    ratio 1.005 (decode 37 ms, load average 2); 0.999 with OMP_NUM_THREADS=1
#                  while other jobs loaded both cores (decode 88 ms)
#   torch backend  ratio 1.000-1.010 (load 2); 0.992 with OMP_NUM_THREADS=1 under load
#   the Python check alone: 0.045-0.08 ms (aminmax of indices, of counts) = ~0.1% of
#   the cpu decode; the C++ loop of csrc/checks.h adds ~0.01 ms.
# With 2 threads on an oversubscribed machine (load 3 on 2 cores) the ratio read 1.03-1.09:
# the check's one parallel region (aminmax over N*K) can then wait out a scheduler slice
# (~8 ms), as every parallel op of the decode can; it is load, not the check's work.
# Printed by:  python tests/test_memory_safety.py --cost   (OMP_NUM_THREADS=1 for the second)
# On a GPU (triton backend, CUDA tensors; reasoned, not measured: no GPU was lent) the
# check never synchronises. Its kernel (triton_kernels._first_bad_slot_kernel) reads counts
# (N*4 B) and the indices of valid slots only (<= N*K*8 B = 2 MB here), against the
# decode's N*K*(8+2) B of slots plus N*K*d_in*2 B of gathered bf16 rows: 136 MB at d_in
# 256 (check <= 1.5% of the bytes), 1.2 GB at d_in 2304 (<= 0.2%). Its fixed cost is 3
# small launches, a 32-byte device->host copy and an event (~15 us of CPU time, a few us
# of GPU time): noticeable next to a ~50 us decode at d_in 256 (up to ~10%), ~1% at d_in
# 2304. The C++ cuda backend's check (csrc/checks.h) does sync once per call.
@torch.compiler.disable  # data-dependent: runs eagerly under torch.compile
def check_sparse_ranges(op: str, indices: torch.Tensor, counts: torch.Tensor, d_sae: int, *, defer: bool = False,
                        locate: Callable | None = None) -> None:
    """counts[b] in [0, capacity] and every index on a valid slot (k < counts[b]) in [0, d_sae).

    Raises OutOfRangeError naming the first offending slot, e.g.
    "sparse_decode: indices[3, 1]=5000 outside [0, d_sae=32)". defer=True (only where the
    kernel that follows masks its loads, so bad input cannot reach memory): on CUDA
    tensors the verdict is computed on the device and raised later (see module doc).
    locate: what computes the verdict where it is deferred (the Triton ops pass one
    fused kernel, triton_kernels.locate_sparse); default _locate_sparse (torch ops)."""
    poll_pending()
    if checks_disabled():
        return
    sparse_ranges(op, indices, counts, d_sae, defer=defer, locate=locate)


def sparse_ranges(op, indices, counts, d_sae, *, defer=False, locate=None) -> None:
    """check_sparse_ranges without the SAE_FAST_UNCHECKED switch (SparseActs.validate)."""
    n, k = indices.shape
    if n == 0 or indices.device.type == "meta" or (indices.is_cuda and _capturing()):
        return
    if _immediate(indices, defer):
        lo, hi = (int(v) for v in torch.aminmax(counts))
        if lo >= 0 and hi <= k and (k == 0 or _all_in(indices, d_sae)):
            return  # the common case: one pass over each tensor
        locate = None
    summary = (locate or _locate_sparse)(indices, counts, d_sae)
    _finish(summary, functools.partial(_sparse_report, op, n, k, d_sae), defer)


def _locate_sparse(indices, counts, d_sae) -> torch.Tensor:
    """[first bad count row, its count, first bad slot (flat), its index] as int64 on the
    device, no sync; a position equal to or above its bound (N, N*K) means none."""
    k = indices.shape[1]
    c = counts.long()
    r = _first_true((c < 0) | (c > k))
    valid = torch.arange(k, device=c.device)[None, :] < c[:, None]
    p = _first_true((valid & ((indices < 0) | (indices >= d_sae))).reshape(-1))
    return torch.stack([r, _value_at(c, r), p, _value_at(indices, p)])


def _all_in(t: torch.Tensor, hi: int) -> bool:
    lo_v, hi_v = torch.aminmax(t)
    return int(lo_v) >= 0 and int(hi_v) < hi


def _sparse_report(op, n, k, s, summary, deferred):
    # The first offending slot in row order; inside a row its count comes first
    # (csrc/checks.h reports in the same order).
    r, cval, p, ival = summary  # "none": r >= n, p >= n * k
    p_row = p // k if p < n * k else n
    if r < n and r <= p_row:
        msg = f"{op}: counts[{r}]={cval} outside [0, capacity={k}]"
    elif p < n * k:
        msg = f"{op}: indices[{p // k}, {p % k}]={ival} outside [0, d_sae={s})"
    else:
        return None
    return OutOfRangeError(msg + (_DEFERRED_NOTE if deferred else ""))


@torch.compiler.disable
def check_rows(op: str, rows: torch.Tensor, n_rows: int, *, defer: bool = False, hint: str = "") -> None:
    """Optimizer rows: each in [0, n_rows), no row twice.

    Duplicates are refused, not merged: two programs updating one row race on a GPU
    (the result depends on scheduling), and what a repeated row should mean (sum the
    gradients? apply twice?) is the caller's decision. Merging would also need a
    data-dependent output size, i.e. a sync. On CPU tensors, rows that are strictly
    increasing (RowGrads, step()'s rows) pass in one pass; others cost a sort. On CUDA
    tensors (deferred: no branching on the data) the check always sorts: about 16 passes
    over n int64, small next to the update of n rows of a parameter."""
    poll_pending()
    if checks_disabled():
        return
    n = rows.numel()
    if n == 0 or rows.device.type == "meta" or (rows.is_cuda and _capturing()):
        return
    if _immediate(rows, defer):
        if _all_in(rows, n_rows) and (n == 1 or bool((rows[1:] > rows[:-1]).all())):
            return
    p = _first_true((rows < 0) | (rows >= n_rows))
    if n > 1:
        sv, perm = torch.sort(rows, stable=True)
        # each later occurrence of a value, at its position in rows; the smallest is the first repeat
        key = torch.where(sv[1:] == sv[:-1], perm[1:], n)
        i = key.argmin().reshape(1)
        q, a = key.index_select(0, i).reshape(()), perm[:-1].index_select(0, i).reshape(())
    else:
        q = torch.full((), n, dtype=torch.int64, device=rows.device)
        a = torch.zeros((), dtype=torch.int64, device=rows.device)
    summary = torch.stack([p, _value_at(rows, p), q, _value_at(rows, q), a])
    _finish(summary, functools.partial(_rows_report, op, n, n_rows, hint), defer)


def _rows_report(op, n, n_rows, hint, summary, deferred):
    p, pval, q, qval, a = summary
    note = (hint or "") + (_DEFERRED_NOTE if deferred else "")
    if p < n and p < q:  # the first offending position (csrc/checks.h reports the same one)
        return OutOfRangeError(f"{op}: rows[{p}]={pval} outside [0, n_rows={n_rows}){note}")
    if q < n:
        return ValueError(f"{op}: rows[{q}]={qval} repeats rows[{a}]; rows must be unique (two updates of one row "
                          f"would race on a GPU: merge their gradients first){note}")
    return None


def check_capacity(capacity) -> int | None:
    """jumprelu_encode_sparse's capacity: None or a non-negative int (bool refused)."""
    if capacity is None:
        return None
    if isinstance(capacity, bool):
        raise TypeError(f"capacity must be a non-negative int or None, got {capacity!r}")
    try:
        cap = operator.index(capacity)
    except TypeError:
        raise TypeError(
            f"capacity must be a non-negative int or None, got {type(capacity).__name__} {capacity!r}") from None
    if cap < 0:
        raise ValueError(f"capacity must be a non-negative int or None, got {cap}")
    return cap


# -------------------------------------------- op arguments (mirror of csrc/checks.h)
def _need_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _need_float(op, name, t):
    _need_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def _need_device(op, ref_name, ref, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} ({t.device}) must be on the device of {ref_name} ({ref.device})")


def check_sparse_layout(op, indices, counts, ref, ref_name):
    """indices int64 [N, K], counts int32 [N], on ref's device (check_common in csrc/checks.h)."""
    _need_tensor(op, "indices", indices)
    _need_tensor(op, "counts", counts)
    if indices.dim() != 2:
        raise ValueError(f"{op}: indices must be 2-D [n_tokens, capacity], got {list(indices.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
    if counts.dtype != torch.int32:
        raise TypeError(f"{op}: counts must be int32, got {counts.dtype}")
    if tuple(counts.shape) != (indices.shape[0], ):
        raise ValueError(f"{op}: counts must be [n_tokens]=[{indices.shape[0]}], got {list(counts.shape)}")
    _need_device(op, ref_name, ref, indices=indices, counts=counts)


def check_decode_args(op, indices, values, counts, W, bias, out_dtype) -> None:
    _need_float(op, "W", W)
    check_sparse_layout(op, indices, counts, W, "W")
    _need_float(op, "values", values)
    if values.dtype != W.dtype:
        raise TypeError(f"{op}: values ({values.dtype}) and W ({W.dtype}) must have the same dtype")
    if values.shape != indices.shape:
        raise ValueError(f"{op}: values must have the shape of indices {list(indices.shape)}, got {list(values.shape)}")
    if W.dim() != 2:
        raise ValueError(f"{op}: W must be 2-D [d_sae, d_in], got {list(W.shape)}")
    if bias is not None:
        _need_float(op, "bias", bias)
        if bias.dtype != W.dtype:
            raise TypeError(f"{op}: bias ({bias.dtype}) and W ({W.dtype}) must have the same dtype")
        if tuple(bias.shape) != (W.shape[1], ):
            raise ValueError(f"{op}: bias must be [d_in]=[{W.shape[1]}], got {list(bias.shape)}")
    _need_device(op, "W", W, values=values, bias=bias)
    if out_dtype is not None and out_dtype not in (W.dtype, torch.float32):
        raise TypeError(f"{op}: out_dtype must be W's dtype ({W.dtype}) or float32, got {out_dtype}")


def check_gather_dot_args(op, grad, indices, counts, W) -> None:
    _need_float(op, "W", W)
    check_sparse_layout(op, indices, counts, W, "W")
    _need_float(op, "grad", grad)
    if grad.dtype not in (W.dtype, torch.float32):
        raise TypeError(f"{op}: grad must have W's dtype ({W.dtype}) or float32, got {grad.dtype}")
    _need_device(op, "W", W, grad=grad)
    if W.dim() != 2:
        raise ValueError(f"{op}: W must be 2-D [d_sae, D], got {list(W.shape)}")
    if grad.dim() != 2 or tuple(grad.shape) != (indices.shape[0], W.shape[1]):
        raise ValueError(f"{op}: grad must be [{indices.shape[0]}, {W.shape[1]}], got {list(grad.shape)}")


def check_scatter_rows_args(op, coef, indices, counts, grad, d_sae) -> None:
    _need_float(op, "grad", grad)
    check_sparse_layout(op, indices, counts, grad, "grad")
    _need_float(op, "coef", coef)
    if coef.dtype != grad.dtype:
        raise TypeError(f"{op}: coef ({coef.dtype}) and grad ({grad.dtype}) must have the same dtype")
    _need_device(op, "grad", grad, coef=coef)
    if coef.shape != indices.shape:
        raise ValueError(f"{op}: coef must have the shape of indices {list(indices.shape)}, got {list(coef.shape)}")
    if isinstance(d_sae, bool) or not isinstance(d_sae, int):
        raise TypeError(f"{op}: d_sae must be an int, got {type(d_sae).__name__}")
    if d_sae < 0:  # 0 is valid: a compact step that touched no row
        raise ValueError(f"{op}: d_sae must be non-negative, got {d_sae}")
    if grad.dim() != 2 or grad.shape[0] != indices.shape[0]:
        raise ValueError(f"{op}: grad must be [n_tokens={indices.shape[0]}, D], got {list(grad.shape)}")


def row_geometry(op, param, sparse_dim) -> tuple[int, int]:
    """(n_rows, row length) of param's rows along sparse_dim (None: the whole tensor is one row)."""
    if sparse_dim is None:
        return 1, param.numel()
    if not ((param.dim() == 1 and sparse_dim == 0) or (param.dim() == 2 and sparse_dim in (0, 1))):
        raise ValueError(f"{op}: sparse_dim must be 0 for a 1-D param or 0/1 for a 2-D param, got {sparse_dim} "
                         f"for shape {list(param.shape)}")
    return param.shape[sparse_dim], 1 if param.dim() == 1 else param.shape[1 - sparse_dim]


def check_adam_rows_args(op, param, v, last, rows, grad, sparse_dim) -> tuple[int, int]:
    """Everything check_adam_rows_args of csrc/checks.h checks except the rows' values
    (check_rows). Returns (n_rows, row length)."""
    _need_float(op, "param", param)
    if not param.is_contiguous():
        raise ValueError(f"{op}: param must be contiguous")
    _need_tensor(op, "v", v)
    if v.dtype != torch.float32 or v.shape != param.shape or not v.is_contiguous():
        raise TypeError(f"{op}: v must be a contiguous float32 tensor of param's shape {list(param.shape)}, "
                        f"got {v.dtype} {list(v.shape)}")
    _need_tensor(op, "grad", grad)
    if grad.dtype != param.dtype or not grad.is_contiguous():
        raise TypeError(f"{op}: grad must be contiguous with param's dtype ({param.dtype}), got {grad.dtype}")
    _need_tensor(op, "last", last)
    _need_device(op, "param", param, v=v, grad=grad, last=last)
    if sparse_dim is not None and rows is None:
        raise ValueError(f"{op}: rows are required with a sparse_dim")
    if sparse_dim is None and rows is not None:
        raise ValueError(f"{op}: rows must be None without a sparse_dim (the whole tensor is one row)")
    n_rows, length = row_geometry(op, param, sparse_dim)
    if last.dtype != torch.int64 or tuple(last.shape) != (n_rows, ) or not last.is_contiguous():
        raise ValueError(f"{op}: last must be a contiguous int64 [{n_rows}], got {last.dtype} {list(last.shape)}")
    n = 1
    if rows is not None:
        _need_tensor(op, "rows", rows)
        if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous():
            raise TypeError(f"{op}: rows must be a contiguous 1-D int64 tensor, got {rows.dtype} {list(rows.shape)}")
        _need_device(op, "param", param, rows=rows)
        n = rows.numel()
    if grad.numel() != n * length:
        raise ValueError(
            f"{op}: grad must hold [n_rows touched={n}, row length={length}] elements, got {list(grad.shape)}")
    return n_rows, length
