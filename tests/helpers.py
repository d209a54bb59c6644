"""Shared test helpers: random SAEs and dtype-aware tolerances."""

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_params(d_in, d_sae, dtype=torch.float32, device="cpu", thr_scale=0.5, seed=None):
    """Random JumpReLU parameters with a mix of active and inactive features.

    W_dec rows have unit norm; thresholds are positive, drawn around the spread
    of pre so that some features fire and some don't.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g)
    b_enc = 0.1 * torch.randn(d_sae, generator=g)
    threshold = thr_scale * torch.rand(d_sae, generator=g) + 0.05
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return dict(
        W_enc=cast(W_enc), b_enc=cast(b_enc), threshold=threshold.to(device), W_dec=cast(W_dec), b_dec=cast(b_dec)
    )


def err_vs(out: torch.Tensor, ref64: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return float((out.detach().double() - ref64.detach().double()).abs().max())


def assert_close_as_dense(out, ref64, dense_same_dtype, factor=2.0, what="output", ulp_dtype=None, roundings=1):
    """out must be as close to the float64 truth as the dense path in the same dtype is.

    The tolerance is measured, not chosen: factor x the dense path's own max
    error, plus an ulp-scale term so that exact-in-fp32 cases don't demand 0:
    one ulp per rounding of the kernel's sum (`roundings`, 1 for a kernel that
    accumulates in float64 and rounds once). On a tiny output the dense path's
    measured error can be 0 by luck, while a float32 accumulation of k terms rounds
    up to k times.
    """
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN where the truth has none"
    e_out, e_dense = err_vs(out, ref64), err_vs(dense_same_dtype, ref64)
    scale = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    floor = roundings * torch.finfo(ulp_dtype or out.dtype).eps * max(scale, 1e-6)
    assert e_out <= factor * e_dense + floor, f"{what}: max error {e_out:.3g} vs dense path {e_dense:.3g} (floor {floor:.3g})"


def exact_pre_case(n, d_in, d_sae, dtype, mode="mixed", seed=None):
    """Inputs on which pre = x @ W_enc + b_enc is exact in fp32, bf16 and fp16.

    x in {-1, 0, 1}, W_enc and b_enc on the 1/8 grid, |pre| <= 4: every partial
    sum is a multiple of 1/8 below 2^5, exact with 8 significant bits. Thresholds
    sit at odd multiples of 1/16, so no pre ties a threshold, and with
    bandwidth = EXACT_BANDWIDTH the band |pre - thr| < 1/8 holds exactly the pre
    at distance 1/16. So every backend, in every dtype, sees the same active set
    and band as float64, and only the decode/backward arithmetic can differ.
    W_dec, b_dec are ordinary random values.

    mode: "mixed" (some active), "all" (every feature active), "none" (none active).
    """
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    x = torch.randint(-1, 2, (n, d_in), generator=g).float()
    per = max(1, 32 // max(d_in, 1))
    W_enc = torch.randint(-per, per + 1, (d_in, d_sae), generator=g).float() / 8
    W_enc *= (torch.rand(d_in, d_sae, generator=g) < min(1.0, 8 / d_in)).float()  # keep |pre| <= 4
    b_enc = torch.randint(-4, 5, (d_sae,), generator=g).float() / 8
    if mode == "all":
        b_enc = b_enc.abs() + 6.0  # pre > 2 everywhere
        threshold = torch.full((d_sae,), 1.0 / 16)
    elif mode == "none":
        threshold = torch.full((d_sae,), 15.0 + 1.0 / 16)
    else:
        threshold = (2 * torch.randint(0, 8, (d_sae,), generator=g).float() + 1) / 16
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    params = dict(W_enc=cast(W_enc), b_enc=cast(b_enc), threshold=threshold, W_dec=cast(W_dec), b_dec=cast(b_dec))
    return cast(x), params


EXACT_BANDWIDTH = 0.25


def random_sparse_case(n, s, cap_extra=0, dtype=torch.float32, all_active=False, empty_rows=(), device="cpu"):
    """Random SparseActs-layout (indices, values, counts) over s features: rows of
    0..9 distinct features (all s when all_active), cap_extra padding slots, and
    the rows in empty_rows left empty."""
    counts = torch.full((n,), s, dtype=torch.int32) if all_active else torch.randint(0, min(s, 9) + 1, (n,), dtype=torch.int32)
    for r in empty_rows:
        counts[r] = 0
    cap = int(counts.max()) + cap_extra if n else cap_extra
    idx = torch.zeros(n, cap, dtype=torch.int64)
    val = torch.zeros(n, cap)
    for b in range(n):
        c = int(counts[b])
        idx[b, :c] = torch.randperm(s)[:c]
        val[b, :c] = torch.rand(c) + 0.1
    return idx.to(device), val.to(dtype).to(device), counts.to(device)


def adam_case(shape, sd, dtype, touch):
    """A random optimizer-row case: param (unit-norm rows along sd), v, last, the rows
    touched ("some", "all", "none"; None for a dense parameter) and their gradients."""
    from sae_fast import reference

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    p = torch.randn(shape, generator=g)
    if sd is not None and len(shape) == 2:
        p = p / reference.row_view(p, sd).norm(dim=1, keepdim=True).reshape([-1 if d == sd else 1 for d in range(2)])
    v = torch.rand(shape, generator=g) * 1e-2
    n_rows = shape[sd] if sd is not None else 1
    last = torch.randint(0, 7, (n_rows,), generator=g)
    if sd is None:
        rows = None
        grad = torch.randn(1, p.numel(), generator=g)
    else:
        rows = {"some": torch.randperm(n_rows, generator=g)[: max(1, n_rows // 3)].sort().values,
                "all": torch.arange(n_rows), "none": torch.zeros(0, dtype=torch.int64)}[touch]
        length = p.numel() // n_rows
        grad = torch.randn(rows.numel(), length, generator=g)
    return p.to(dtype), v, last, rows, grad


def check_adam_rows(kernel, p, v, last, rows, grad, **kw):
    """Run kernel(param, v, last, rows, grad, **kw) (in place, adam_b1zero_rows_'s contract)
    on copies and check it against the float64 truth with the tolerance of the reference
    in the same dtype; rows not named must not be written at all. Returns (param, v, last)."""
    from sae_fast import reference

    dtype, sd = p.dtype, kw["sparse_dim"]
    p64, v64, l64 = p.double(), v.double(), last.clone()
    reference.adam_b1zero_rows_(p64, v64, l64, rows, grad.double(), **kw)
    pr, vr, lr_ = p.clone(), v.clone(), last.clone()
    reference.adam_b1zero_rows_(pr, vr, lr_, rows, grad.to(dtype), **kw)
    pk, vk, lk = p.clone(), v.clone(), last.clone()
    kernel(pk, vk, lk, rows, grad.to(dtype), **kw)
    assert torch.equal(lk, lr_) and torch.equal(lk, l64)
    idx = rows if rows is not None else torch.zeros(1, dtype=torch.int64)
    untouched = torch.ones(last.numel(), dtype=torch.bool)
    untouched[idx] = False
    for got, before in ((pk, p), (vk, v)):  # rows not named are not written at all
        assert torch.equal(reference.row_view(got, sd)[untouched], reference.row_view(before, sd)[untouched])
    assert_close_as_dense(vk, v64, vr, what="v")
    assert_close_as_dense(pk, p64, pr, what="param")
    if kw.get("renorm") and idx.numel():
        norms = reference.row_view(pk, sd)[idx].float().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=2 * torch.finfo(dtype).eps * 11**0.5, atol=0)
    return pk, vk, lk
