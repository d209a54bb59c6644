"""Index arithmetic past 2^31 elements, on CPU, without the memory.

A 2^20-wide SAE has d_sae x d_in = 2.4e9 > 2^31 weight elements and a batch of
4096 tokens has 4096 x 2^20 = 4.3e9 (token, feature) pairs: an int32 offset
anywhere wraps. These tests build tensors of that size with torch.empty (pages
are only backed once written: a few MB are ever touched), write the rows or
columns near the end that the ops will read, and check the kernels' results
there against the reference.
"""

import pytest
import torch

from sae_fast import reference
from sae_fast.step import chunked_pre_encoder

from helpers import impls

D_SAE, D_IN = 2**20, 2304
assert D_SAE * D_IN > 2**31


def _rows_case(dtype):
    """A lazily backed W [2^20, 2304] with rows near the end (and row 0) written."""
    W = torch.empty(D_SAE, D_IN, dtype=dtype)
    idx = torch.tensor([[D_SAE - 1, D_SAE - 7, 5, 0], [D_SAE - 2, 0, 0, 0], [0, 0, 0, 0]])
    cnt = torch.tensor([3, 1, 0], dtype=torch.int32)
    val = torch.tensor([[1.0, -2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0] * 4]).to(dtype)
    for r in (D_SAE - 1, D_SAE - 7, D_SAE - 2, 5, 0):
        W[r] = torch.randn(D_IN).to(dtype)
    assert (D_SAE - 1) * D_IN > 2**31  # the last row's offset
    return W, idx, val, cnt


# the implementations on CPU with torch.ops entries (the C++ and the Triton ops); the emulator
# copies its arrays through files, 10 GB here
@pytest.mark.parametrize("impl", impls("cpu", "triton", device="cpu"))
def test_decode_and_gather_dot_past_2_31(impl):
    ops = impl.ops
    W, idx, val, cnt = _rows_case(torch.bfloat16)
    out = ops.sparse_decode(idx, val, cnt, W, None, torch.float32)
    want = reference.sparse_decode_raw(idx, val, cnt, W, None, torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)
    assert out[0].abs().sum() > 0
    g = torch.randn(3, D_IN)
    torch.testing.assert_close(ops.sparse_gather_dot(g, idx, cnt, W), reference.sparse_gather_dot(g, idx, cnt, W),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", impls("triton", device="cpu"))
def test_triton_encoder_on_the_last_columns_of_a_wide_W_enc(impl):
    from sae_fast.backends import triton_kernels as tk

    W_enc = torch.empty(D_IN, D_SAE, dtype=torch.bfloat16)
    c0 = D_SAE - 70  # the last 70 features: element offsets up to 2303 * 2^20 + 2^20 - 1 > 2^31
    g = torch.Generator().manual_seed(0)
    W_enc[:, c0:] = (torch.randint(-1, 2, (D_IN, 70), generator=g) *
                     (torch.rand(D_IN, 70, generator=g) < 0.004)).to(torch.bfloat16) / 2
    x = torch.randint(-1, 2, (5, D_IN), generator=g).to(torch.bfloat16)
    b = torch.zeros(70, dtype=torch.bfloat16)
    thr = torch.full((70, ), 0.25)
    W = W_enc[:, c0:]  # a view: row stride 2^20
    a_idx, a_val, a_cnt, *_ = tk.jumprelu_encode_sets(x, W, b, thr, band=False)
    pre = x.float() @ W.float()  # exact: small integers and halves
    mask = pre > 0.25
    assert mask.any() and torch.equal(a_cnt.long(), mask.sum(1))
    for r in range(5):
        got = sorted(zip(a_idx[r, :a_cnt[r]].tolist(), a_val[r, :a_cnt[r]].float().tolist()))
        want = [(j, pre[r, j].item()) for j in mask[r].nonzero().squeeze(1).tolist()]
        assert got == want


# every optimizer on CPU (torch: the reference) but the emulator's, which copies its arrays
# through files (10 GB here)
@pytest.mark.parametrize("impl", impls(device="cpu", where=lambda i: i.name != "cuda-emu"))
def test_optimizer_rows_past_2_31(impl):
    # W_enc layout [d_in, d_sae]: feature j is the column j, elements at k * 2^20 + j
    W_enc = torch.empty(D_IN, D_SAE, dtype=torch.bfloat16)
    v = torch.empty(D_IN, D_SAE, dtype=torch.float32)
    last = torch.zeros(D_SAE, dtype=torch.int64)
    rows = torch.tensor([3, D_SAE - 5, D_SAE - 1])
    for j in rows.tolist():
        W_enc[:, j] = torch.randn(D_IN).bfloat16()
        v[:, j] = torch.rand(D_IN)
    last[rows] = torch.tensor([2, 0, 4])
    before_p, before_v = W_enc[:, rows].clone(), v[:, rows].clone()
    grad = torch.randn(3, D_IN).bfloat16()  # gradients come in the param's dtype
    kw = dict(step=5, lr=1e-2, beta2=0.99, eps=1e-8)
    impl.optimizer(W_enc, v, last, rows, grad, sparse_dim=1, renorm=False, **kw)
    # the same update on a small copy of just these columns
    p2, v2, last2 = before_p.clone(), before_v.clone(), torch.tensor([2, 0, 4])
    reference.adam_b1zero_rows_(p2, v2, last2, torch.arange(3), grad, sparse_dim=1, **kw)
    torch.testing.assert_close(v[:, rows], v2, rtol=1e-6, atol=0)
    torch.testing.assert_close(W_enc[:, rows].float(), p2.float(), rtol=0.008, atol=0)  # one bf16 rounding
    assert (W_enc[:, rows] != before_p).any() and last[rows].tolist() == [5, 5, 5]


def test_chunked_encoder_past_2_31_token_feature_pairs():
    # 2049 tokens x 2^20 features = 2,148,532,224 > 2^31 pairs, d_in = 2 (14 s on 2 cores)
    n = 2049
    assert n * D_SAE > 2**31
    W_enc = torch.zeros(2, D_SAE)
    b_enc = torch.zeros(D_SAE)
    thr = torch.full((D_SAE, ), 0.5)
    hot = [7, D_SAE // 2, D_SAE - 3, D_SAE - 1]
    W_enc[0, hot] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W_enc[1, D_SAE - 2] = 0.5  # pre = 0.5 = threshold exactly: in the band, not active
    x = torch.zeros(n, 2)
    x[n - 1, 0] = 1.0  # only the last token fires
    x[0, 1] = 1.0
    sets = chunked_pre_encoder(x, W_enc, b_enc, thr, 0.25)
    assert sets.a_cnt[:n - 1].sum() == 0 and int(sets.a_cnt[n - 1]) == 4
    assert sets.a_idx[n - 1, :4].tolist() == hot and sets.a_val[n - 1, :4].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert int(sets.band_cnt[0]) == 1 and int(sets.band_idx[0, 0]) == D_SAE - 2
    assert sets.step_sum.item() == 4
