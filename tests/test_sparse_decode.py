"""sparse_decode: out[b] = sum_k values[b, k] W[indices[b, k]] (+ bias) over the valid slots.

Every implementation (helpers.impls): its Backend.prims.decode on fresh random cases, the
public sae_fast.sparse_decode where users can select it, and the torch.ops entries
(autograd, opcheck, argument checks) where it has them; against the float64 truth with the
tolerance of the dense path in the same dtype. Outputs start NaN-filled
(helpers.nan_filled_outputs), so an element never written fails. The emulator-specific
checks of the CUDA kernels (both thread orders, capped grids, misaligned rows) are in
test_cuda_emu.py; the bad indices and counts in test_memory_safety.py.
"""

import pytest
import torch

import sae_fast
from sae_fast import reference
from sae_fast.sparse import SparseActs

from helpers import (DTYPES, PRIM_CASES, PRIM_FEW_CASES, assert_autograd_matches, assert_deterministic, check_case,
                     PRIM_MODES, assert_close_as_dense, dtype_id, impl_cases, impls, make_params, nan_filled_outputs,
                     random_sparse_case, sparse_prims_case)


def _allowance(impl, dtype, k):
    """What assert_close_as_dense allows beyond the dense path's error, as each implementation
    was always tested: the CUDA kernels on the emulator add in float32 over a row's slots, bias
    first (one rounding per slot, in ulps of the input dtype); the others round once."""
    if impl.name == "cuda-emu":
        return dict(ulp_dtype=dtype, roundings=k + 1)
    return {}


# the Triton interpreter gets PRIM_FEW_CASES: every dtype, mode and out_dtype on fewer shapes
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,n,s,d,mode", impl_cases(PRIM_CASES, PRIM_FEW_CASES))
def test_matches_reference(impl, n, s, d, mode, dtype):
    idx, val, cnt, W, bias, _ = sparse_prims_case(n, s, d, dtype, mode)
    args = impl.to(idx, val, cnt, W, bias)
    truth = reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), bias.double())
    for out_dtype in (None, torch.float32):
        with nan_filled_outputs():
            out = impl.backend.prims.decode(*args, out_dtype)
        assert out.dtype == (out_dtype or dtype) and out.device == args[0].device
        dense = reference.sparse_decode_raw(*args, out_dtype).cpu()
        assert_close_as_dense(out.cpu(), truth, dense, what=f"sparse_decode (out_dtype {out_dtype})",
                              **_allowance(impl, dtype, idx.shape[1]))


@pytest.mark.parametrize("mode", PRIM_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls(where=lambda i: i.selectable))
def test_public_op(impl, dtype, mode):
    # 2 x 3 tokens: the output takes the acts' batch shape
    idx, val, cnt, W, bias, _ = sparse_prims_case(6, 37, 19, dtype, mode)
    acts = SparseActs(*impl.to(idx, val, cnt), 37, (2, 3)).validate()
    with nan_filled_outputs():
        out = sae_fast.sparse_decode(acts, *impl.to(W, bias), backend=impl.name)
    assert out.shape == (2, 3, 19) and out.dtype == dtype
    truth = reference.sparse_decode_raw(idx, val.double(), cnt, W.double(), bias.double())
    dense = reference.sparse_decode_raw(idx, val, cnt, W, bias)
    assert_close_as_dense(out.reshape(6, 19).cpu(), truth, dense, what="sae_fast.sparse_decode")


@pytest.mark.parametrize("impl", impls())
def test_deterministic(impl):
    idx, val, cnt, W, bias, _ = sparse_prims_case(64, 8, 33, torch.float32, "random")
    assert_deterministic(impl.backend.prims.decode, *impl.to(idx, val, cnt, W, bias))


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_autograd_matches_reference(impl):
    idx, val, cnt = random_sparse_case(7, 11)
    W = torch.randn(11, 6, dtype=torch.float32)
    b = torch.randn(6)
    assert_autograd_matches(impl, (val, W, b),
                            lambda v, W, b: impl.ops.sparse_decode(impl.to(idx), v, impl.to(cnt), W, b),
                            lambda v, W, b: reference.sparse_decode_raw(idx, v, cnt, W, b))


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_opcheck(impl):
    idx, val, cnt = impl.to(*random_sparse_case(6, 9, 2, empty_rows=(0, )))
    W = torch.randn(9, 5, device=impl.device, requires_grad=True)
    v = val.clone().requires_grad_()
    torch.library.opcheck(impl.ops.sparse_decode.default,
                          (idx, v, cnt, W, torch.randn(5, device=impl.device, requires_grad=True)))
    torch.library.opcheck(impl.ops.sparse_decode.default, (idx, v, cnt, W, None, torch.float32))


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_bad_inputs_rejected(impl):
    # the C++ ops' checks (csrc/checks.h); every bad input of every backend: test_memory_safety.py
    idx, val, cnt, W = impl.to(*check_case(), torch.randn(10, 6))
    op = impl.ops.sparse_decode
    bad = idx.clone()
    bad[1, 0] = 10
    with pytest.raises(RuntimeError, match=r"indices\[1, 0\]=10 outside \[0, d_sae=10\)"):
        op(bad, val, cnt, W, None)
    c2 = cnt.clone()
    c2[0] = idx.shape[1] + 1
    with pytest.raises(RuntimeError, match=r"counts\[0\]"):
        op(idx, val, c2, W, None)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        op(idx.int(), val, cnt, W, None)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        op(idx, val.half(), cnt, W, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(idx, val, cnt, torch.randn(6, 10, device=impl.device).t(), None)


# ------------------------------------------------------------- the reference
def test_reference_sparse_and_dense_decode_agree_with_formula():
    p = {k: v.double() for k, v in make_params(7, 13).items()}
    x = torch.randn(6, 7, dtype=torch.float64)
    acts = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    sp = SparseActs.from_dense(acts.float()).to(dtype=torch.float32)
    W_dec, b_dec = p["W_dec"].float(), p["b_dec"].float()
    want = acts @ p["W_dec"] + p["b_dec"]
    # hand loop: x_hat_b = sum over active j of acts[b,j] * W_dec[j] + b_dec
    loop = torch.stack(
        [sum((acts[b, j] * p["W_dec"][j] for j in range(13) if acts[b, j] != 0), p["b_dec"].clone()) for b in range(6)])
    assert torch.allclose(loop, want)
    assert torch.allclose(reference.sparse_decode(sp, W_dec, b_dec).double(), want, atol=1e-5)
    assert torch.allclose(reference.dense_decode(acts.float(), W_dec, b_dec).double(), want, atol=1e-5)
