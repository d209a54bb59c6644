"""sparse_gather_dot: r[b, k] = <grad[b], W[indices[b, k]]> on the valid slots, 0 on padding.

Every implementation (helpers.impls): its Backend.prims.gather_dot on fresh random cases
(gradients in W's dtype and in float32), and the torch.ops entries (autograd, opcheck,
argument checks) where it has them; against the float64 truth with the tolerance of the
dense path in the same dtype. Outputs start NaN-filled (helpers.nan_filled_outputs), so a
slot never written fails. The emulator-specific checks of the CUDA kernel are in
test_cuda_emu.py; the bad indices and counts in test_memory_safety.py.
"""

import pytest
import torch

from sae_fast import reference

from helpers import (DTYPES, PRIM_CASES, PRIM_FEW_CASES, assert_autograd_matches, assert_deterministic, check_case,
                     assert_close_as_dense, dtype_id, impl_cases, impls, nan_filled_outputs, random_sparse_case,
                     sparse_prims_case)


def _allowance(impl, dtype, d):
    """What assert_close_as_dense allows beyond the dense path's error, as each implementation
    was always tested: the CUDA kernel on the emulator runs a lane's strided float32 fma chain
    over d / 32 terms, then a 5-step shuffle tree (in ulps of the input dtype); the others
    round once."""
    if impl.name == "cuda-emu":
        return dict(ulp_dtype=dtype, roundings=min(d, -(-d // 32) + 5))
    return {}


# the Triton interpreter gets PRIM_FEW_CASES: every dtype, mode and grad dtype on fewer shapes
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,s,d,mode", impl_cases(PRIM_CASES, PRIM_FEW_CASES))
def test_matches_reference(impl, n, s, d, mode, dtype):
    idx, val, cnt, W, _, g = sparse_prims_case(n, s, d, dtype, mode)
    valid = torch.arange(idx.shape[1])[None] < cnt[:, None].long()
    for gg in (g, g.float()):  # the dots rounded to W's dtype, or unrounded
        args = impl.to(gg, idx, cnt, W)
        with nan_filled_outputs():
            out = impl.backend.prims.gather_dot(*args)
        assert out.dtype == gg.dtype and out.device == args[0].device
        out = out.cpu()
        assert_close_as_dense(out, reference.sparse_gather_dot(gg.double(), idx, cnt, W.double()),
                              reference.sparse_gather_dot(*args).cpu(), what=f"sparse_gather_dot (grad {gg.dtype})",
                              **_allowance(impl, dtype, d))
        assert (out[~valid] == 0).all()


@pytest.mark.parametrize("impl", impls())
def test_deterministic(impl):
    idx, _, cnt, W, _, g = sparse_prims_case(64, 8, 33, torch.float32, "random")
    assert_deterministic(impl.backend.prims.gather_dot, *impl.to(g, idx, cnt, W))


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_autograd_matches_reference(impl):
    idx, _, cnt = random_sparse_case(7, 11)
    g, W = torch.randn(7, 6), torch.randn(11, 6)
    assert_autograd_matches(impl, (g, W), lambda g, W: impl.ops.sparse_gather_dot(g, impl.to(idx), impl.to(cnt), W),
                            lambda g, W: reference.sparse_gather_dot(g, idx, cnt, W))


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_opcheck(impl):
    idx, _, cnt = impl.to(*random_sparse_case(6, 9, 2, empty_rows=(0, )))
    W = torch.randn(9, 5, device=impl.device, requires_grad=True)
    g = torch.randn(6, 5, device=impl.device, requires_grad=True)
    torch.library.opcheck(impl.ops.sparse_gather_dot.default, (g, idx, cnt, W))


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_bad_inputs_rejected(impl):
    # the C++ ops' checks (csrc/checks.h); every bad input of every backend: test_memory_safety.py
    bad, _, cnt = check_case(bad_index=-1)
    with pytest.raises(RuntimeError, match="outside"):
        impl.ops.sparse_gather_dot(*impl.to(torch.randn(4, 6), bad, cnt, torch.randn(10, 6)))
