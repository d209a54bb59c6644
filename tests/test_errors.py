"""Bad inputs get clear errors that name the argument and what was expected."""

import pytest
import torch

import sae_fast
from sae_fast import JumpReLUSAE


@pytest.fixture
def sae():
    return JumpReLUSAE(8, 16, backend="torch")


def test_wrong_last_dimension(sae):
    with pytest.raises(ValueError, match=r"x must have last dimension d_in=8"):
        sae.encode(torch.randn(3, 9))


def test_one_d_input(sae):
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_in\].*unsqueeze"):
        sae(torch.randn(8))


def test_non_floating_input(sae):
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        sae.encode(torch.ones(2, 8, dtype=torch.int64))


def test_dtype_mix(sae):
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the SAE weights are torch.float32"):
        sae.encode(torch.randn(2, 8, dtype=torch.bfloat16))
    acts = sae.encode_sparse(torch.randn(2, 8)).to(dtype=torch.float16)
    with pytest.raises(TypeError, match="acts.values has dtype torch.float16"):
        sae.decode(acts)


def test_devices_differ():
    W_enc = torch.randn(8, 16)
    with pytest.raises(ValueError, match="same device"):
        sae_fast.jumprelu_encode(torch.randn(2, 8), W_enc, torch.zeros(16, device="meta"), torch.zeros(16),
                                 backend="torch")


def test_bad_params():
    with pytest.raises(ValueError, match="d_sae must be a positive int"):
        JumpReLUSAE(8, 0)
    with pytest.raises(ValueError, match=r"b_enc must have shape \[16\]"):
        sae_fast.jumprelu_encode(torch.randn(2, 8), torch.randn(8, 16), torch.zeros(15), torch.zeros(16))
    with pytest.raises(ValueError, match="bandwidth must be a finite positive"):
        JumpReLUSAE(8, 16).training_forward(torch.randn(2, 8), l0_coefficient=1.0, bandwidth=0.0)
    with pytest.raises(ValueError, match="l0_coefficient"):
        JumpReLUSAE(8, 16).training_forward(torch.randn(2, 8), l0_coefficient=-1.0)


def test_dense_decode_checks(sae):
    with pytest.raises(ValueError, match="acts must have last dimension d_sae=16"):
        sae.decode(torch.randn(2, 15))
    sp = sae_fast.SparseActs.from_dense(torch.randn(2, 15))
    with pytest.raises(ValueError, match="acts.d_sae=15"):
        sae.decode(sp)


def test_nan_propagates_through_module(sae):
    x = torch.randn(3, 8)
    x[2, 0] = float("nan")
    for out in (sae(x), sae.decode(sae.encode_sparse(x))):
        assert torch.isnan(out[2]).all() and not torch.isnan(out[:2]).any()


def test_capacity_and_out_of_range_errors(sae):
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match=r"capacity must be a non-negative int or None, got float 2\.5"):
        sae.encode_sparse(x, capacity=2.5)
    with pytest.raises(ValueError, match=r"capacity must be a non-negative int or None, got -1"):
        sae.encode_sparse(x, capacity=-1)
    acts = sae.encode_sparse(x, capacity=3)
    bad = sae_fast.SparseActs(acts.indices.clone(), acts.values, acts.counts, 16)
    bad.indices[1, 0] = 16
    bad.counts[1] = 1
    # an IndexError and a ValueError at once: out of range
    with pytest.raises(IndexError, match=r"sparse_decode: indices\[1, 0\]=16 outside \[0, d_sae=16\)"):
        sae.decode(bad)
    cap = bad.capacity  # at least 3: it grows to the largest row count
    bad.counts[0] = cap + 1
    with pytest.raises(ValueError, match=rf"sparse_decode: counts\[0\]={cap + 1} outside \[0, capacity={cap}\]"):
        sae.decode(bad)
