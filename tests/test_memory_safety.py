"""Out-of-range indices, counts and optimizer rows are refused on every backend, with a
message that names the argument, the first offending position and the valid range; and
nothing crashes.

Before these checks several of the bad cases killed the process (SIGSEGV in a Triton
decode, heap corruption in the optimizer step), so the bad cases run in a child process,
one per backend: a crash there fails the case it happened in (the child then restarts
with the next case) instead of ending the test run. Valid inputs (padding slots, zero
tokens, zero capacity, empty rows) and the deferred mechanism of CUDA tensors (forced
on CPU through a private switch) are tested in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import sae_fast
from sae_fast import _checks, backends, reference
from sae_fast.optim import SparseAdamB1Zero
from sae_fast.step import RowGrads

from helpers import Impl, impls

HERE = os.path.dirname(os.path.abspath(__file__))
# every backend users can select, on CPU tensors (the bad inputs reach each through its public
# ops, the ops users call directly and its optimizer)
IMPLS = impls(device="cpu", where=lambda i: i.selectable)
# "cpu-device-path": the C++ ops with _SAE_FAST_TEST_DEVICE_CHECK_PATH=1, i.e. the code
# csrc/checks.h runs for CUDA tensors, here on CPU tensors.
WORKERS = [(p.values[0].name, p.marks) for p in IMPLS] + [("cpu-device-path", p.marks)
                                                          for p in impls("cpu", device="cpu")]
N, K, S, D = 4, 4, 32, 8  # tokens, capacity, d_sae, d_in

# The check's cost (see sae_fast/_checks.py, next to check_sparse_ranges) was printed by:
CHECK_COST_COMMAND = "python tests/test_memory_safety.py --cost"


def _backend_of(worker: str) -> str:
    return "cpu" if worker == "cpu-device-path" else worker


# ----------------------------------------------------------------------- inputs
def _acts(bad_index=None, bad_count=None):
    """A valid [N, K] SparseActs over S features (rows hold 3, 0, 2, 4 entries; padding
    index 0), with indices[3, 1] or counts[2] replaced."""
    idx = torch.tensor([[5, 1, 30, 0], [0, 0, 0, 0], [7, 2, 0, 0], [9, 3, 31, 4]])
    cnt = torch.tensor([3, 0, 2, 4], dtype=torch.int32)
    val = torch.rand(N, K) + 0.5
    val = val * (torch.arange(K)[None] < cnt[:, None].long())
    if bad_index is not None:
        idx[3, 1] = bad_index
    if bad_count is not None:
        cnt[2] = bad_count
    return idx, val, cnt


def _W():
    return torch.randn(S, D), torch.randn(D)


def _decode(backend, **bad):
    idx, val, cnt = _acts(**bad)
    W, b = _W()
    sae_fast.sparse_decode(sae_fast.SparseActs(idx, val, cnt, S), W, b, backend=backend)


def _module_decode(backend, **bad):
    idx, val, cnt = _acts(**bad)
    sae = sae_fast.JumpReLUSAE(D, S, backend=backend)
    with torch.no_grad():
        sae.decode(sae_fast.SparseActs(idx, val, cnt, S))


def _ops(backend):
    """The op namespace users can call directly: the Triton ops, or the C++ ones."""
    return Impl(backend, torch.device("cpu")).ops


def _op_decode(backend, **bad):
    idx, val, cnt = _acts(**bad)
    W, b = _W()
    _ops(backend).sparse_decode(idx, val, cnt, W, b)


def _op_decode_raw(backend, index_dtype, n_counts):
    idx = torch.zeros(4, 2, dtype=index_dtype)
    _ops(backend).sparse_decode(idx, torch.ones(4, 2), torch.zeros(n_counts, dtype=torch.int32), torch.ones(S, D), None)


def _op_gather(backend, **bad):
    idx, _, cnt = _acts(**bad)
    W, _ = _W()
    _ops(backend).sparse_gather_dot(torch.randn(N, D), idx, cnt, W)


def _op_scatter(backend, d_sae=S, **bad):
    idx, val, cnt = _acts(**bad)
    _ops(backend).sparse_scatter_rows(val, idx, cnt, torch.randn(N, D), d_sae)


def _capacity(backend, capacity):
    x = torch.randn(3, D)
    W_enc = torch.randn(D, S)
    sae_fast.jumprelu_encode_sparse(x, W_enc, torch.zeros(S), torch.full((S, ), 0.1), capacity=capacity,
                                    backend=backend)


def _opt(backend):
    sae = sae_fast.JumpReLUSAE(D, S, backend="torch")
    return sae, SparseAdamB1Zero.for_sae(sae, lr=1e-2, backend=backend)


def _unchanged_after(fn, sae, opt):
    """fn must raise; the optimizer and the SAE must then be exactly as before."""
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    try:
        fn()
    except Exception:
        moved = [n for n, p in sae.named_parameters() if not torch.equal(p, before[n])]
        if moved or opt.t != 0 or opt.state:
            raise AssertionError(f"a refused step_rows changed {moved or 'the optimizer state'}") from None
        raise


def _step_rows(backend, rows, grad_rows=None):
    sae, opt = _opt(backend)
    rows = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.int64)
    n = rows.numel() if grad_rows is None else grad_rows
    grads = {sae.W_dec: (rows, torch.randn(n, D)), sae.b_dec: (None, torch.randn(D))}
    _unchanged_after(lambda: opt.step_rows(grads), sae, opt)


def _wider_row_grads(backend):
    # the compact gradients of an SAE with 64 features, fed to the optimizer of one with 32
    sae, opt = _opt(backend)
    rows = torch.tensor([1, 20, 40, 63])
    n = rows.numel()
    grads = RowGrads(rows, torch.randn(n, D), torch.randn(n), torch.randn(n), torch.randn(n, D), torch.randn(D))
    _unchanged_after(lambda: opt.step_rows(grads), sae, opt)


def _adam_op(backend, rows=(1, 2), *, sparse_dim=0, last_n=S, grad_n=None, v_dtype=torch.float32, no_rows=False):
    p, v = torch.randn(S, D), torch.zeros(S, D, dtype=v_dtype)
    last = torch.zeros(last_n, dtype=torch.int64)
    r = None if no_rows else torch.tensor(rows, dtype=torch.int64)
    n = grad_n if grad_n is not None else len(rows)
    _ops(backend).adam_b1zero_rows_(p, v, last, r, torch.randn(n, D), 1, 1e-3, 0.99, 1e-8, sparse_dim, False)


OOR = "OutOfRangeError"  # sae_fast._checks.OutOfRangeError: an IndexError and a ValueError
# name -> (call(backend), Python exception, regex, applies to): the C++ ops (cpu backend,
# direct torch.ops calls) raise RuntimeError with the same text.
IDX = r"indices\[3, 1\]={} outside \[0, d_sae=32\)"
CNT = r"counts\[2\]={} outside \[0, capacity=4\]"
ALL, OPS = ("torch", "cpu", "triton"), ("cpu", "triton")
CASES = {
    # public decode (sae_fast.sparse_decode, JumpReLUSAE.decode)
    "decode_index_-1": (lambda b: _decode(b, bad_index=-1), OOR, r"sparse_decode: " + IDX.format(-1), ALL),
    "decode_index_d_sae": (lambda b: _decode(b, bad_index=S), OOR, IDX.format(32), ALL),
    "decode_index_5000": (lambda b: _decode(b, bad_index=5000), OOR, IDX.format(5000), ALL),
    "decode_index_1e12": (lambda b: _decode(b, bad_index=10**12), OOR, IDX.format(10**12), ALL),
    "decode_counts_-1": (lambda b: _decode(b, bad_count=-1), OOR, r"sparse_decode: " + CNT.format(-1), ALL),
    "decode_counts_capacity+1": (lambda b: _decode(b, bad_count=K + 1), OOR, CNT.format(5), ALL),
    "decode_counts_100000": (lambda b: _decode(b, bad_count=100000), OOR, CNT.format(100000), ALL),
    "module_decode_index_5000": (lambda b: _module_decode(b, bad_index=5000), OOR, IDX.format(5000), ALL),
    "module_decode_counts_100000": (lambda b: _module_decode(b, bad_count=100000), OOR, CNT.format(100000), ALL),
    # the ops users can call directly
    "op_decode_index_1e12": (lambda b: _op_decode(b, bad_index=10**12), OOR, r"sparse_decode: " + IDX.format(10**12),
                             OPS),
    "op_decode_counts_100000": (lambda b: _op_decode(b, bad_count=100000), OOR, CNT.format(100000), OPS),
    "op_gather_index_-1": (lambda b: _op_gather(b, bad_index=-1), OOR, r"sparse_gather_dot: " + IDX.format(-1), OPS),
    "op_gather_index_1e12": (lambda b: _op_gather(b, bad_index=10**12), OOR, IDX.format(10**12), OPS),
    "op_gather_counts_100000": (lambda b: _op_gather(b, bad_count=100000), OOR, CNT.format(100000), OPS),
    "op_scatter_index_d_sae": (lambda b: _op_scatter(b, bad_index=S), OOR, r"sparse_scatter_rows: " + IDX.format(32),
                               OPS),
    "op_scatter_index_1e12": (lambda b: _op_scatter(b, bad_index=10**12), OOR, IDX.format(10**12), OPS),
    "op_scatter_counts_-1": (lambda b: _op_scatter(b, bad_count=-1), OOR, CNT.format(-1), OPS),
    "op_scatter_counts_100000": (lambda b: _op_scatter(b, bad_count=100000), OOR, CNT.format(100000), OPS),
    "op_scatter_d_sae_-1": (lambda b: _op_scatter(b, d_sae=-1), "ValueError", r"d_sae must be non-negative", OPS),
    "op_scatter_smaller_d_sae": (lambda b: _op_scatter(b, d_sae=10), OOR, r"indices\[0, 2\]=30 outside \[0, d_sae=10\)",
                                 OPS),
    "op_decode_counts_shape": (lambda b: _op_decode_raw(b, torch.int64, 3), "ValueError",
                               r"counts must be \[n_tokens\]=\[4\], got \[3\]", OPS),
    "op_decode_indices_int32": (lambda b: _op_decode_raw(b, torch.int32, 4), "TypeError", r"indices must be int64",
                                OPS),
    # encode with a caller-given capacity
    "capacity_-1": (lambda b: _capacity(b, -1), "ValueError", r"capacity must be a non-negative int or None, got -1",
                    ALL),
    "capacity_float": (lambda b: _capacity(b, 2.5), "TypeError", r"capacity must be a non-negative int.*2\.5", ALL),
    "capacity_str": (lambda b: _capacity(b, "4"), "TypeError", r"capacity must be a non-negative int.*'4'", ALL),
    "capacity_bool": (lambda b: _capacity(b, True), "TypeError", r"capacity must be a non-negative int.*True", ALL),
    # the optimizer's rows (W_dec: 32 rows of 8)
    "step_rows_-1": (lambda b: _step_rows(b, [0, 5, -1]), OOR,
                     r"step_rows: rows\[2\]=-1 outside \[0, n_rows=32\) \(W_dec", ALL),
    "step_rows_n_rows": (lambda b: _step_rows(b, [0, 32, 5]), OOR, r"rows\[1\]=32 outside \[0, n_rows=32\)", ALL),
    "step_rows_999": (lambda b: _step_rows(b, [999]), OOR, r"rows\[0\]=999 outside \[0, n_rows=32\)", ALL),
    "step_rows_duplicate": (lambda b: _step_rows(b, [3, 7, 3, 7]), "ValueError", r"rows\[2\]=3 repeats rows\[0\]", ALL),
    "step_rows_duplicate_before_out_of_range": (lambda b: _step_rows(b, [4, 4, 99]), "ValueError",
                                                r"rows\[1\]=4 repeats rows\[0\]", ALL),
    "step_rows_wider_sae": (_wider_row_grads, OOR, r"rows\[2\]=40 outside \[0, n_rows=32\).*wider SAE", ALL),
    "step_rows_grad_shape": (lambda b: _step_rows(b, [1, 2], grad_rows=3), "ValueError",
                             r"gradient of W_dec must be \[n rows=2, row length=8\], got \[3, 8\]", ALL),
    "step_rows_int32": (lambda b: _step_rows(b, torch.tensor([1], dtype=torch.int32)), "TypeError",
                        r"rows must be a 1-D int64 tensor, got torch.int32", ALL),
    "step_rows_2d": (lambda b: _step_rows(b, [[1, 2]], grad_rows=2), "TypeError",
                     r"rows must be a 1-D int64 tensor, got torch.int64 \[1, 2\]", ALL),
    # the fused optimizer op, called directly (the same checks as csrc/checks.h)
    "adam_op_-1": (lambda b: _adam_op(b,
                                      (0, -1)), OOR, r"adam_b1zero_rows_: rows\[1\]=-1 outside \[0, n_rows=32\)", OPS),
    "adam_op_999": (lambda b: _adam_op(b, (999, )), OOR, r"rows\[0\]=999 outside \[0, n_rows=32\)", OPS),
    "adam_op_duplicate": (lambda b: _adam_op(b, (5, 1, 5)), "ValueError", r"rows\[2\]=5 repeats rows\[0\]", OPS),
    "adam_op_last_shape": (lambda b: _adam_op(b, last_n=S - 1), "ValueError", r"last must be a contiguous int64 \[32\]",
                           OPS),
    "adam_op_grad_numel": (lambda b: _adam_op(b, grad_n=3), "ValueError",
                           r"grad must hold \[n_rows touched=2, row length=8\] elements", OPS),
    "adam_op_v_dtype": (lambda b: _adam_op(b, v_dtype=torch.float16), "TypeError",
                        r"v must be a contiguous float32 tensor", OPS),
    "adam_op_no_rows": (lambda b: _adam_op(b, no_rows=True), "ValueError", r"rows are required with a sparse_dim", OPS),
    "adam_op_sparse_dim": (lambda b: _adam_op(b, sparse_dim=2), "ValueError", r"sparse_dim must be 0 for a 1-D param",
                           OPS)
}
CPP_RAISES_RUNTIME_ERROR = {n for n in CASES if n.startswith(("op_", "adam_op_"))}


def _segfault(backend):
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


# the harness's own test: never run as a case of a backend (applies to none)
CASES["_crash_selftest"] = (_segfault, None, "", ())


# ------------------------------------------------------------------ the child
def _run_cases(worker: str, names: list[str]) -> None:
    """Child process: run each case, one JSON line before and one after (flushed)."""
    backend = _backend_of(worker)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        try:
            CASES[name][0](backend)
            res = {"case": name, "raised": None}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            res = {
                "case": name, "raised": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                "message": str(e)
            }
        print(json.dumps(res), flush=True)


_OUTCOMES: dict[str, dict] = {}


def _outcomes(worker: str) -> dict:
    """{case: result} for every case of this worker (cached for the session)."""
    if worker not in _OUTCOMES:
        backend = _backend_of(worker)
        _OUTCOMES[worker] = _run_children(worker, [n for n, c in CASES.items() if backend in c[3]])
    return _OUTCOMES[worker]


def _run_children(worker: str, todo: list[str]) -> dict:
    """Run the cases in child processes; a child that dies marks the case it was running
    as crashed, and a new child goes on with the rest."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    if worker == "cpu-device-path":
        env["_SAE_FAST_TEST_DEVICE_CHECK_PATH"] = "1"
    env.pop("SAE_FAST_UNCHECKED", None)
    out: dict[str, dict] = {}
    while todo:
        proc = subprocess.run([sys.executable, __file__, "--worker", worker, *todo], env=env, cwd=HERE,
                              capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                out[rec["case"]] = rec
                started = None
        if proc.returncode != 0:
            victim = started or todo[0]
            out[victim] = {"case": victim, "crashed": proc.returncode, "stderr": proc.stderr[-3000:]}
        todo = [n for n in todo if n not in out]
    return out


def test_a_crash_is_a_failed_case_not_a_dead_run():
    out = _run_children("torch", ["capacity_-1", "_crash_selftest", "capacity_bool"])
    assert out["_crash_selftest"]["crashed"] in (-11, 139)  # SIGSEGV
    assert out["capacity_-1"]["raised"] == "ValueError" and out["capacity_bool"]["raised"] == "TypeError"


def _applies(worker: str, case: str) -> bool:
    """Whether the worker's backend has an entry for the case (the device path of
    csrc/checks.h is reached through the C++ ops only)."""
    if worker == "cpu-device-path":
        return case in CPP_RAISES_RUNTIME_ERROR
    return _backend_of(worker) in CASES[case][3]


@pytest.mark.parametrize("worker,case", [
    pytest.param(w, c, id=f"{w}-{c}", marks=marks) for w, marks in WORKERS
    for c in CASES if not c.startswith("_") and _applies(w, c)
])
def test_bad_input_is_refused(worker, case):
    backend = _backend_of(worker)
    _, exc_name, pattern, applies = CASES[case]
    res = _outcomes(worker)[case]
    assert "crashed" not in res, f"the process died (exit {res.get('crashed')}):\n{res.get('stderr')}"
    assert res["raised"] is not None, "accepted silently"
    want = "RuntimeError" if backend == "cpu" and case in CPP_RAISES_RUNTIME_ERROR else exc_name
    assert want in res["mro"], f"{res['raised']} ({res['message']}), want {want}"
    if want == OOR:
        assert "IndexError" in res["mro"] and "ValueError" in res["mro"]
    assert re.search(pattern, res["message"]), res["message"]


# --------------------------------------------------------------- valid inputs
def _valid_acts(n, k):
    """Rows of distinct features; padding slots hold index 0 and value 0."""
    g = torch.Generator().manual_seed(n * 31 + k)
    cnt = torch.randint(0, k + 1, (n, ), generator=g, dtype=torch.int32)
    idx = torch.zeros(n, k, dtype=torch.int64)
    val = torch.zeros(n, k)
    for b in range(n):
        c = int(cnt[b])
        idx[b, :c] = torch.randperm(S, generator=g)[:c]
        val[b, :c] = torch.rand(c, generator=g) + 0.1
    return idx, val, cnt


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,k", [(6, 5), (0, 3), (5, 0), (0, 0), (3, 1)])
def test_valid_inputs_pass(impl, n, k):
    backend = impl.name
    idx, val, cnt = _valid_acts(n, k)
    W, b = _W()
    acts = sae_fast.SparseActs(idx, val, cnt, S)
    want = reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), b.double())
    got = sae_fast.sparse_decode(acts, W, b, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if impl.ops is not None:
        ops = impl.ops
        g = torch.randn(n, D)
        torch.testing.assert_close(
            ops.sparse_gather_dot(g, idx, cnt, W).double(),
            reference.sparse_gather_dot(g.double(), idx, cnt, W.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ops.sparse_scatter_rows(val, idx, cnt, g, S).double(),
            reference.sparse_scatter_rows(val.double(), idx, cnt, g.double(), S), rtol=1e-5, atol=1e-5)
        # d_sae 0 with no valid slot: a compact step that touched no feature
        assert ops.sparse_scatter_rows(val, idx, torch.zeros_like(cnt), g, 0).shape == (0, D)
    x = torch.randn(n, D)
    for cap in (0, 7, None):
        sp = sae_fast.jumprelu_encode_sparse(x, torch.randn(D, S), torch.zeros(S), torch.full((S, ), 0.1), capacity=cap,
                                             backend=backend)
        assert sp.capacity >= (cap or 0) and sp.n_tokens == n


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [[], [31], [3, 0, 17], list(range(32))])
def test_valid_rows_pass_and_match_the_reference(impl, rows):
    sae, opt = _opt(impl.name)
    W0 = sae.W_dec.detach().clone()
    r = torch.tensor(rows, dtype=torch.int64)
    g = torch.randn(len(rows), D)
    opt.step_rows({sae.W_dec: (r, g)})
    want, v, last = W0.clone(), torch.zeros(S, D), torch.zeros(S, dtype=torch.int64)
    reference.adam_b1zero_rows_(want, v, last, r, g, step=1, lr=1e-2, beta2=0.999, eps=1e-8, sparse_dim=0)
    torch.testing.assert_close(sae.W_dec.detach(), want)
    if impl.ops is not None:
        p, v2, last2 = W0.clone(), torch.zeros(S, D), torch.zeros(S, dtype=torch.int64)
        impl.ops.adam_b1zero_rows_(p, v2, last2, r, g, 1, 1e-2, 0.999, 1e-8, 0, False)
        torch.testing.assert_close(p, want)


@pytest.mark.parametrize("impl", impls("cpu", device="cpu"))
@pytest.mark.parametrize("rows", [[3, 0, 17], [0, 5, 31], [7]])
def test_valid_inputs_pass_the_device_path_of_the_cpp_checks(monkeypatch, rows, impl):
    monkeypatch.setenv("_SAE_FAST_TEST_DEVICE_CHECK_PATH", "1")
    ops = impl.ops
    for n, k in ((6, 5), (5, 0), (3, 1)):
        idx, val, cnt = _valid_acts(n, k)
        W, b = _W()
        torch.testing.assert_close(
            ops.sparse_decode(idx, val, cnt, W, b).double(),
            reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), b.double()))
    p, v, last = torch.randn(S, D), torch.zeros(S, D), torch.zeros(S, dtype=torch.int64)
    r = torch.tensor(rows)
    ops.adam_b1zero_rows_(p, v, last, r, torch.randn(len(rows), D), 1, 1e-3, 0.99, 1e-8, 0, False)
    assert (last[r] == 1).all() and int(last.sum()) == len(rows)


def test_training_step_and_row_grads_still_pass_the_checks():
    # the row-grads step's RowGrads (sorted, unique rows) go through step_rows' checks
    sae = sae_fast.JumpReLUSAE(D, S, backend="torch")
    opt = SparseAdamB1Zero.for_sae(sae, backend="torch")
    for _ in range(3):
        _, grads = sae.training_row_grads(torch.randn(16, D), l0_coefficient=1e-2)
        opt.step_rows(grads)
    assert opt.t == 3


# ---------------------------------------------------- deferred checks (CUDA path)
@pytest.fixture
def deferred():
    """The CUDA-tensor path of the range checks, forced on CPU tensors (each verdict
    ready at once, as on a GPU that has finished)."""
    _checks._PENDING.clear()
    with _checks._deferred_on_cpu():
        yield
    _checks._PENDING.clear()


@pytest.fixture
def deferred_busy():
    """The same, on a GPU still busy: no verdict is ready until check_pending() waits."""
    _checks._PENDING.clear()
    with _checks._deferred_on_cpu(busy=True):
        yield
    _checks._PENDING.clear()


# the Triton ops defer their verdict on CUDA tensors; forced here on CPU tensors
TRITON_ON_CPU = impls("triton", device="cpu")


def _decode_with_bad_count(impl):
    """A sparse_decode whose counts[2] = -1: the kernel's loop over the row's slots is empty,
    so this bad input is memory-safe here; the call returns and the verdict waits."""
    W, b = _W()
    idx, val, cnt = _acts(bad_count=-1)
    impl.ops.sparse_decode(idx, val, cnt, W, b)
    return W, b


@pytest.mark.parametrize("impl", TRITON_ON_CPU)
def test_deferred_error_raises_at_the_next_op_call(deferred, impl):
    ops = impl.ops
    W, b = _decode_with_bad_count(impl)
    assert len(_checks._PENDING) == 1
    g_idx, g_val, g_cnt = _acts()
    with pytest.raises(
            _checks.OutOfRangeError, match=r"sae_fast_triton::sparse_decode: counts\[2\]=-1 outside "
            r"\[0, capacity=4\] \[reported after that call returned"):
        ops.sparse_decode(g_idx, g_val, g_cnt, W, b)
    assert not _checks._PENDING
    ops.sparse_decode(g_idx, g_val, g_cnt, W, b)  # reported once, then gone


@pytest.mark.parametrize("impl", TRITON_ON_CPU)
def test_check_pending_waits_and_counts_the_rest(deferred_busy, impl):
    ops = impl.ops
    W, _ = _W()
    idx, _, cnt = _acts(bad_count=-1)
    ops.sparse_gather_dot(torch.randn(N, D), idx, cnt, W)
    rows = torch.tensor([2, 9, 2])
    p, v, last = torch.randn(S, D), torch.zeros(S, D), torch.zeros(S, dtype=torch.int64)
    ops.adam_b1zero_rows_(p, v, last, rows, torch.randn(3, D), 1, 1e-3, 0.99, 1e-8, 0, False)
    assert len(_checks._PENDING) == 2
    with pytest.raises(_checks.OutOfRangeError, match=r"sparse_gather_dot: counts\[2\]=-1.*and 1 more failed"):
        sae_fast.ops.check_pending()
    sae_fast.ops.check_pending()  # nothing left


@pytest.mark.parametrize("impl", TRITON_ON_CPU)
def test_deferred_rows_through_step_rows(deferred, impl):
    sae, opt = _opt(impl.name)
    opt.step_rows({sae.W_dec: (torch.tensor([4, 1, 4]), torch.randn(3, D))})
    with pytest.raises(ValueError, match=r"step_rows: rows\[2\]=4 repeats rows\[0\].*reported after"):
        _checks.check_pending()


@pytest.mark.parametrize("impl", TRITON_ON_CPU)
def test_deferred_error_raised_where_the_encoder_syncs(deferred, impl):
    _decode_with_bad_count(impl)
    with pytest.raises(_checks.OutOfRangeError, match=r"counts\[2\]=-1"):
        sae_fast.jumprelu_encode_sparse(torch.randn(3, D), torch.randn(D, S), torch.zeros(S), torch.full((S, ), 0.1),
                                        backend="triton")


def test_paths_that_are_not_memory_safe_never_defer(deferred):
    # the torch backend (index_select) and the reference optimizer check at the call
    with pytest.raises(_checks.OutOfRangeError, match=r"counts\[2\]=5"):
        _decode("torch", bad_count=5)
    with pytest.raises(ValueError, match=r"repeats"):
        _step_rows("torch", [1, 1])
    assert not _checks._PENDING


def test_deferred_mechanism_reports_first_position(deferred_busy):
    idx, _, cnt = _acts(bad_index=-7)
    idx[3, 3] = 99
    _checks.check_sparse_ranges("op", idx, cnt, S, defer=True)
    rows = torch.tensor([0, 50, 3, 3])
    _checks.check_rows("opt", rows, S, defer=True)
    with pytest.raises(_checks.OutOfRangeError, match=r"op: indices\[3, 1\]=-7 outside \[0, d_sae=32\)") as e:
        _checks.check_pending()
    assert "opt: rows[1]=50" not in str(e.value) and "1 more" in str(e.value)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("impl", TRITON_ON_CPU)
def test_fused_triton_check_finds_what_the_torch_check_finds(impl, seed):
    # the deferred verdict of the Triton ops comes from one kernel (tk.locate_sparse);
    # on random inputs it names the same first slot as the torch-op version
    from sae_fast.backends import triton_kernels as tk

    g = torch.Generator().manual_seed(seed)
    for trial in range(25):
        n, k = int(torch.randint(1, 40, (), generator=g)), int(torch.randint(0, 9, (), generator=g))
        idx = torch.randint(-3, S + 3, (n, k), generator=g)
        cnt = torch.randint(-2, k + 3, (n, ), generator=g, dtype=torch.int32)
        if trial % 3 == 0:
            cnt = cnt.clamp(0, k)
        if trial % 5 == 0:
            idx = idx.clamp(0, S - 1)
        verdicts = [
            str(_checks._sparse_report("op", n, k, S,
                                       locate(idx, cnt, S).tolist(), False))
            for locate in (_checks._locate_sparse, tk.locate_sparse)
        ]
        assert verdicts[0] == verdicts[1]


# ------------------------------------------------------------------- opting out
def test_unchecked_opt_in(monkeypatch):
    monkeypatch.setenv("SAE_FAST_UNCHECKED", "1")
    # memory-safe bad inputs only: counts past the capacity (the reference ignores counts),
    # a duplicate row (the reference's index_put), a negative count (the C++ loop is empty)
    _decode("torch", bad_count=5)
    _step_rows("torch", [2, 2])
    for p in impls("cpu", device="cpu"):  # the C++ CPU ops, where built
        idx, val, cnt = _acts(bad_count=-1)
        p.values[0].ops.sparse_decode(idx, val, cnt, *_W())
    monkeypatch.setenv("SAE_FAST_UNCHECKED", "0")
    with pytest.raises(_checks.OutOfRangeError):
        _decode("torch", bad_count=5)


@pytest.mark.parametrize(
    "bad", [dict(bad_index=-1),
            dict(bad_index=S),
            dict(bad_index=10**12),
            dict(bad_count=-1),
            dict(bad_count=100000)])
@pytest.mark.parametrize("impl", impls("cpu", device="cpu"))
def test_unchecked_cpu_kernels_stay_in_bounds(monkeypatch, bad, impl):
    """With the checks skipped, the C++ CPU kernels still touch nothing out of bounds
    (their guards, as the CUDA and Triton kernels'): an invalid slot reads as 0 and adds
    nothing, a count is clamped to the capacity."""
    monkeypatch.setenv("SAE_FAST_UNCHECKED", "1")
    idx, val, cnt = _acts(**bad)
    W, bias = _W()
    k = idx.shape[1]
    keep = (torch.arange(k)[None] < cnt.clamp(0, k)[:, None].long()) & (idx >= 0) & (idx < S)
    cidx, cval, full = torch.where(keep, idx, 0), torch.where(keep, val, 0.0), torch.full_like(cnt, k)
    ops = impl.ops
    torch.testing.assert_close(ops.sparse_decode(idx, val, cnt, W, bias),
                               reference.sparse_decode_raw(cidx, cval, full, W, bias))
    g = torch.randn(idx.shape[0], W.shape[1])
    torch.testing.assert_close(ops.sparse_gather_dot(g, idx, cnt, W),
                               reference.sparse_gather_dot(g, cidx, full, W) * keep)
    torch.testing.assert_close(ops.sparse_scatter_rows(val, idx, cnt, g, S),
                               reference.sparse_scatter_rows(cval, cidx, full, g, S))


# ------------------------------------------------------------- the check's cost
def _cost() -> None:
    """Decode at 4096 tokens x capacity 64, d_sae 16384, d_in 256 (float32, CPU), checked
    vs SAE_FAST_UNCHECKED=1, median of many runs, per backend."""
    import statistics
    import time

    torch.manual_seed(0)
    n, k, s, d = 4096, 64, 16384, 256
    idx = torch.stack([torch.randperm(s)[:k] for _ in range(n)])
    acts = sae_fast.SparseActs(idx, torch.rand(n, k), torch.full((n, ), k, dtype=torch.int32), s)
    W, b = torch.randn(s, d), torch.randn(d)
    for backend in ("cpu", "torch"):
        if backends.unavailable_reason(backend, "cpu"):
            continue
        times = {"checked": [], "unchecked": []}
        for _ in range(3):
            sae_fast.sparse_decode(acts, W, b, backend=backend)
        for _ in range(61):
            for mode in times:  # interleaved: load from other processes hits both alike
                if mode == "unchecked":
                    os.environ["SAE_FAST_UNCHECKED"] = "1"
                t0 = time.perf_counter()
                sae_fast.sparse_decode(acts, W, b, backend=backend)
                times[mode].append(time.perf_counter() - t0)
                os.environ.pop("SAE_FAST_UNCHECKED", None)
        check = []
        for _ in range(61):
            t0 = time.perf_counter()
            _checks.check_sparse_ranges("op", acts.indices, acts.counts, s)
            check.append(time.perf_counter() - t0)
        check = statistics.median(check)
        med = {m: statistics.median(t) for m, t in times.items()}
        # each checked run against the unchecked run right after it: robust to drifting load
        paired = statistics.median(c / u for c, u in zip(times["checked"], times["unchecked"]))
        print(f"{backend}: decode checked {med['checked'] * 1e3:.2f} ms, unchecked {med['unchecked'] * 1e3:.2f} ms "
              f"(medians of 61), median paired ratio {paired:.3f}; the Python check alone {check * 1e3:.3f} ms "
              f"= {check / med['unchecked']:.2%} of the decode")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _run_cases(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "--cost":
        _cost()
