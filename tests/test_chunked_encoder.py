"""chunked_pre_encoder: the dense-GEMM encoder of the torch/cpu/cuda backends, one chunk
of features at a time. Same sets as one unchunked pass, for any chunk size."""

import pytest
import torch

from sae_fast import reference
from sae_fast.sparse import compact
from sae_fast.sparse_train import chunked_pre_encoder, encode_chunk_features

from helpers import DTYPES, EXACT_BANDWIDTH, exact_pre_case

D_IN, D_SAE = 11, 301


def _truth(x, p, half_bw):
    pre = reference.jumprelu_pre(x, p["W_enc"], p["b_enc"])
    pre32, thr = pre.float(), p["threshold"]
    a_idx, a_val, a_cnt = compact(((pre32 > thr) & (pre32 > 0)) | torch.isnan(pre32), pre)
    n_idx, _, n_cnt = compact((pre32 - thr).abs() < half_bw)
    return a_idx, a_val, a_cnt, n_idx, n_cnt, (pre32 > thr).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,mode", [(13, "mixed"), (13, "all"), (13, "none"), (1, "mixed"), (0, "mixed")])
@pytest.mark.parametrize("chunk", [1, 7, 128, None])
def test_chunks_give_the_unchunked_sets(dtype, n, mode, chunk):
    x, p = exact_pre_case(n, D_IN, D_SAE, dtype, mode)
    if n > 2:
        x[2, 0] = float("nan")  # a NaN pre row: every feature of token 2 is active, in every chunk
    sets = chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], EXACT_BANDWIDTH / 2, chunk_features=chunk)
    a_idx, a_val, a_cnt, n_idx, n_cnt, steps = _truth(x, p, EXACT_BANDWIDTH / 2)
    assert torch.equal(sets.a_cnt, a_cnt) and torch.equal(sets.n_cnt, n_cnt)
    assert torch.equal(sets.a_idx, a_idx) and torch.equal(sets.n_idx, n_idx)
    assert torch.equal(sets.a_val.isnan(), a_val.isnan())
    assert torch.equal(sets.a_val.nan_to_num(), a_val.nan_to_num())
    assert sets.step_sum.item() == steps.item()
    if mode == "all" and n:
        assert int(sets.a_cnt.min()) == D_SAE


def test_band_off_for_inference():
    x, p = exact_pre_case(9, D_IN, D_SAE, torch.float32)
    sets = chunked_pre_encoder(x, p["W_enc"], p["b_enc"], p["threshold"], 0.0, band=False, chunk_features=50)
    assert sets.n_idx.shape == (9, 0) and not sets.n_cnt.any()
    assert torch.equal(sets.a_cnt, _truth(x, p, 0.0)[2])


def test_chunk_size_bounds_the_workspace():
    for n, s, dtype, ws in ((4096, 2**20, torch.bfloat16, 1 << 30), (4096, 2**20, torch.float32, 1 << 28),
                            (7, 300, torch.float32, 1 << 30), (4096, 2**20, torch.float32, 1)):
        c = encode_chunk_features(n, s, dtype, ws)
        per = n * (torch.finfo(dtype).bits // 8 + 11)
        assert c == s or (c % 128 == 0 and (c * per <= ws or c == 128)), (n, s, dtype, ws, c)
    assert encode_chunk_features(4096, 2**20, torch.bfloat16, 1 << 30) == 20096  # 53 chunks at 2^20
    with pytest.raises(ValueError, match="workspace_bytes must be positive"):
        encode_chunk_features(4, 4, torch.float32, 0)
