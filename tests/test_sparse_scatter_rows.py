"""sparse_scatter_rows: G[j] = sum over the valid slots (b, k) with indices[b, k] == j of
coef[b, k] * grad[b], [d_sae, D].

Every implementation (helpers.impls): its Backend.prims.scatter_rows on fresh random cases,
and the torch.ops entries (autograd, opcheck, argument checks) where it has them; against
the float64 truth with the tolerance of the dense path in the same dtype. Outputs start
NaN-filled (helpers.nan_filled_outputs), so a row never written fails. Every
implementation is deterministic (a fixed order of each feature's sum). The
emulator-specific checks of the CUDA kernel are in test_cuda_emu.py; the bad indices and
counts in test_memory_safety.py.
"""

import pytest
import torch

from sae_fast import reference

from helpers import (DTYPES, PRIM_CASES, PRIM_FEW_CASES, assert_autograd_matches, assert_deterministic, check_case,
                     assert_close_as_dense, dtype_id, impl_cases, impls, nan_filled_outputs, random_sparse_case,
                     sparse_prims_case)


def _allowance(impl, n):
    """What assert_close_as_dense allows beyond the dense path's error, as each implementation
    was always tested: the CUDA kernel on the emulator adds in float32 over a feature's
    entries, at most one per token; the others round once."""
    if impl.name == "cuda-emu":
        return dict(roundings=max(n, 1))
    return {}


# the Triton interpreter gets PRIM_FEW_CASES: every dtype and mode on fewer shapes
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,s,d,mode", impl_cases(PRIM_CASES, PRIM_FEW_CASES))
def test_matches_reference(impl, n, s, d, mode, dtype):
    idx, val, cnt, _, _, g = sparse_prims_case(n, s, d, dtype, mode)
    args = impl.to(val, idx, cnt, g)
    with nan_filled_outputs():
        out = impl.backend.prims.scatter_rows(*args, s)
    assert out.dtype == dtype and out.shape == (s, d) and out.device == args[0].device
    assert_close_as_dense(out.cpu(), reference.sparse_scatter_rows(val.double(), idx, cnt, g.double(), s),
                          reference.sparse_scatter_rows(*args, s).cpu(), what="sparse_scatter_rows",
                          **_allowance(impl, n))


@pytest.mark.parametrize("impl", impls())
def test_no_entries_and_no_features(impl):
    # capacity 0: every row of the output is an exact zero; d_sae 0 (a compact step that
    # touched no feature): an empty output
    idx = torch.zeros(4, 0, dtype=torch.int64)
    cnt = torch.zeros(4, dtype=torch.int32)
    g = torch.randn(4, 6)
    with nan_filled_outputs():
        out = impl.backend.prims.scatter_rows(*impl.to(torch.zeros(4, 0), idx, cnt, g), 5)
    assert torch.equal(out.cpu(), torch.zeros(5, 6))
    idx, val, _ = random_sparse_case(4, 3)
    out = impl.backend.prims.scatter_rows(*impl.to(val, idx, torch.zeros_like(cnt), g), 0)
    assert out.shape == (0, 6)


@pytest.mark.parametrize("impl", impls())
def test_deterministic(impl):
    idx, val, cnt = random_sparse_case(200, 8)  # many tokens per feature
    assert_deterministic(impl.backend.prims.scatter_rows, *impl.to(val, idx, cnt, torch.randn(200, 33)), 8, runs=3)


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_autograd_matches_reference(impl):
    idx, val, cnt = random_sparse_case(7, 11)
    g = torch.randn(7, 6)
    assert_autograd_matches(impl, (val, g),
                            lambda v, g: impl.ops.sparse_scatter_rows(v, impl.to(idx), impl.to(cnt), g, 11),
                            lambda v, g: reference.sparse_scatter_rows(v, idx, cnt, g, 11))


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_opcheck(impl):
    idx, val, cnt = impl.to(*random_sparse_case(6, 9, 2, empty_rows=(0, )))
    g = torch.randn(6, 5, device=impl.device, requires_grad=True)
    v = val.clone().requires_grad_()
    torch.library.opcheck(impl.ops.sparse_scatter_rows.default, (v, idx, cnt, g, 9))


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_bad_inputs_rejected(impl):
    # the C++ ops' checks (csrc/checks.h); every bad input of every backend: test_memory_safety.py
    bad, val, cnt = check_case(bad_index=-1)
    with pytest.raises(RuntimeError, match="outside"):
        impl.ops.sparse_scatter_rows(*impl.to(val, bad, cnt, torch.randn(4, 6)), 10)
