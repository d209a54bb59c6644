import pytest
import torch

from sae_fast import SparseActs

from helpers import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype):
    dense = torch.randn(3, 4, 11).to(dtype)
    dense[dense.abs() < 1.0] = 0
    dense[1, 2] = 0  # an empty row
    sp = SparseActs.from_dense(dense).validate()
    assert sp.shape == (3, 4, 11) and sp.n_tokens == 12
    assert sp.capacity == int((dense != 0).sum(-1).max())
    assert torch.equal(sp.to_dense(), dense)
    assert torch.equal(sp.l0(), (dense != 0).sum(-1).float())
    assert sp.counts[1 * 4 + 2] == 0


def test_padding_and_capacity():
    dense = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    sp = SparseActs.from_dense(dense, capacity=5).validate()
    assert sp.capacity == 5
    assert sp.indices[1].tolist() == [0] * 5 and sp.values[1].tolist() == [0.0] * 5
    assert torch.equal(sp.to_dense(), dense)
    with pytest.raises(ValueError, match="truncation"):
        SparseActs.from_dense(dense, capacity=1)


def test_all_active_and_none_active():
    full = torch.rand(2, 6) + 0.5
    assert SparseActs.from_dense(full).capacity == 6
    none = SparseActs.from_dense(torch.zeros(2, 6))
    assert none.capacity == 0 and torch.equal(none.to_dense(), torch.zeros(2, 6))


def test_moves_and_sorted():
    dense = torch.zeros(2, 8)
    dense[0, [5, 1, 7]] = torch.tensor([1.0, 2.0, 3.0])
    sp = SparseActs.from_dense(dense, capacity=4)
    perm = SparseActs(sp.indices.flip(1), sp.values.flip(1), sp.counts, 8)  # out of order, padding first
    with pytest.raises(ValueError, match="padding"):
        perm.validate()
    s = sp.sorted()
    assert s.indices[0, :3].tolist() == [1, 5, 7]
    half = sp.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.indices.dtype == torch.int64
    assert torch.equal(half.to_dense().float(), dense)


def test_validate_rejects_bad_contents():
    sp = SparseActs.from_dense(torch.tensor([[1.0, 2.0, 0.0]]))
    bad = SparseActs(torch.tensor([[0, 0]]), sp.values, sp.counts, 3)
    with pytest.raises(ValueError, match="repeat"):
        bad.validate()
    bad = SparseActs(torch.tensor([[0, 3]]), sp.values, sp.counts, 3)
    with pytest.raises(ValueError, match="d_sae=3"):
        bad.validate()
    with pytest.raises(TypeError, match="int64"):
        SparseActs(sp.indices.int(), sp.values, sp.counts, 3)
    with pytest.raises(TypeError, match="int32"):
        SparseActs(sp.indices, sp.values, sp.counts.long(), 3)
    with pytest.raises(ValueError, match="counts"):
        SparseActs(sp.indices, sp.values, torch.tensor([1, 1], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="batch_shape"):
        SparseActs(sp.indices, sp.values, sp.counts, 3, (2, ))
