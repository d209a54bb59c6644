"""jumprelu_encode and jumprelu_encode_sparse: relu(pre) * (pre > threshold), dense or as the
active set, pre = x @ W_enc + b_enc.

Every implementation (helpers.impls): its Backend.encode and Backend.encode_sparse, and the
public sae_fast.jumprelu_encode / jumprelu_encode_sparse where users can select it, on
inputs whose pre is exact in every dtype (helpers.exact_pre_case), so every implementation
must give the reference's bits. Outputs start NaN-filled (helpers.nan_filled_outputs). The
training encoder (active set, band and step count in one pass) is in
test_jumprelu_select.py; the reference against hand-written formulas at the end.
"""

import pytest
import torch

import sae_fast
from sae_fast import reference
from sae_fast.sparse import SparseActs

from helpers import DTYPES, dtype_id, exact_pre_case, impls, make_params, nan_filled_outputs

# odd sizes, not multiples of any block; one token; zero tokens
SHAPES = [(9, 19, 70), (1, 5, 33), (0, 7, 20)]


def _case(impl, n, d_in, d_sae, dtype, mode="mixed"):
    x, p = exact_pre_case(n, d_in, d_sae, dtype, mode)
    return x, p, impl.to(x, p["W_enc"], p["b_enc"], p["threshold"])


def _sparse(impl, args):
    """impl's encode_sparse as a validated SparseActs on the CPU."""
    indices, values, counts = impl.backend.encode_sparse(*args)
    return SparseActs(indices, values, counts, args[1].shape[1]).validate().to(device="cpu")


@pytest.mark.parametrize("mode", ["mixed", "all", "none"])
@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls())
def test_matches_reference(impl, dtype, n, d_in, d_sae, mode):
    x, p, args = _case(impl, n, d_in, d_sae, dtype, mode)
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    with nan_filled_outputs():
        dense = impl.backend.encode(*args)
        poisoned = _sparse(impl, args)  # (the triton op sorts its rows here: deterministic mode)
    assert torch.equal(dense.cpu(), want)  # pre is exact on these inputs: bit-identical
    assert torch.equal(poisoned.to_dense(), want)
    assert torch.equal(_sparse(impl, args).to_dense(), want)
    if impl.selectable:
        xb = args[0].reshape(n, 1, d_in)  # a batch shape
        got = sae_fast.jumprelu_encode(xb, *args[1:], backend=impl.name)
        assert got.shape == (n, 1, d_sae) and torch.equal(got.reshape(n, d_sae).cpu(), want)
        sp = sae_fast.jumprelu_encode_sparse(xb, *args[1:], backend=impl.name)
        assert sp.shape == (n, 1, d_sae) and torch.equal(sp.to_dense().reshape(n, d_sae).cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("impl", impls())
def test_encode_sparse_grows_past_any_capacity(impl, dtype):
    # every one of 150 features active: more than the Triton encoder's default capacity of 64
    x, p, args = _case(impl, 5, 11, 150, dtype, "all")
    if impl.name == "triton":
        from sae_fast.backends import triton_kernels as tk

        tk._CAP_HINT.clear()
    sp = _sparse(impl, args)
    assert sp.counts.tolist() == [150] * 5
    assert torch.equal(sp.to_dense(), reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"]))


@pytest.mark.parametrize("impl", impls())
def test_nan_propagates(impl):
    x, p = exact_pre_case(3, 8, 20, torch.float32)
    x[1, 0] = float("nan")
    args = impl.to(x, p["W_enc"], p["b_enc"], p["threshold"])
    want = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(torch.isnan(impl.backend.encode(*args).cpu()), torch.isnan(want))
    sp = _sparse(impl, args)
    assert torch.equal(torch.isnan(sp.to_dense()), torch.isnan(want))
    assert sp.counts[1] == 20


@pytest.mark.parametrize("impl", impls())
def test_negative_threshold_needs_positive_pre(impl):
    # relu(pre) * (pre > thr): with thr < pre <= 0 the activation is 0, and the feature is not
    # in the active set
    x = torch.tensor([[-0.5, 0.0, 0.3]])
    args = impl.to(x, torch.eye(3), torch.zeros(3), torch.full((3, ), -1.0))
    assert torch.equal(impl.backend.encode(*args).cpu(), torch.tensor([[0.0, 0.0, 0.3]]))
    sp = _sparse(impl, args)
    assert sp.counts.tolist() == [1] and sp.indices[0, :1].tolist() == [2]


@pytest.mark.parametrize("impl", impls())
def test_deterministic_mode_sorts_rows(impl):
    _, _, args = _case(impl, 6, 9, 90, torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        sp = _sparse(impl, args)
    finally:
        torch.use_deterministic_algorithms(prev)
    s = sp.sorted()
    assert torch.equal(sp.indices, s.indices) and torch.equal(sp.values, s.values)


@pytest.mark.parametrize("impl", impls("triton"))
def test_opcheck(impl):
    _, _, args = _case(impl, 6, 9, 30, torch.float32)
    torch.library.opcheck(impl.ops.jumprelu_encode.default, args)


# ------------------------------------------------------------- the reference
def _params64(d_in=7, d_sae=13):
    return {k: v.double() for k, v in make_params(d_in, d_sae).items()}


def test_reference_matches_gemma_scope_formula():
    p = _params64()
    x = torch.randn(5, 7, dtype=torch.float64)
    pre = x @ p["W_enc"] + p["b_enc"]
    mask = pre > p["threshold"]
    expect = torch.nn.functional.relu(pre) * mask
    got = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(got, expect)
    assert 0 < int((got != 0).sum()) < got.numel()  # a real mix of active and inactive


def test_reference_apply_b_dec_to_input_subtracts_b_dec():
    p = _params64()
    x = torch.randn(4, 7, dtype=torch.float64)
    got = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"], p["b_dec"], True)
    want = reference.jumprelu_encode(x - p["b_dec"], p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(got, want)


def test_reference_negative_threshold_needs_positive_pre():
    pre = torch.tensor([[-0.5, 0.0, 0.3]])
    thr = torch.tensor([-1.0, -1.0, -1.0])
    assert torch.equal(reference.jumprelu(pre, thr), torch.tensor([[0.0, 0.0, 0.3]]))
    assert reference.active_mask(pre, thr).tolist() == [[False, False, True]]


def test_reference_nan_input_propagates_like_dense():
    p = make_params(7, 13)
    x = torch.randn(3, 7)
    x[1, 2] = float("nan")
    dense = reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.isnan(dense[1]).all() and not torch.isnan(dense[[0, 2]]).any()
    sp = reference.jumprelu_encode_sparse(x, p["W_enc"], p["b_enc"], p["threshold"])
    assert torch.equal(torch.isnan(sp.to_dense()), torch.isnan(dense))
    out = reference.sparse_decode(sp, p["W_dec"], p["b_dec"])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()


def test_reference_zero_tokens():
    p = make_params(7, 13)
    sp = reference.jumprelu_encode_sparse(torch.zeros(0, 7), p["W_enc"], p["b_enc"], p["threshold"])
    assert sp.n_tokens == 0 and sp.to_dense().shape == (0, 13)
