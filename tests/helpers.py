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
    return float((out.detach().double() - ref64.double()).abs().max())


def assert_close_as_dense(out, ref64, dense_same_dtype, factor=2.0, what="output", ulp_dtype=None):
    """out must be as close to the float64 truth as the dense path in the same dtype is.

    The tolerance is measured, not chosen: factor x the dense path's own max
    error, plus one ulp-scale term so that exact-in-fp32 cases don't demand 0.
    """
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN where the truth has none"
    e_out, e_dense = err_vs(out, ref64), err_vs(dense_same_dtype, ref64)
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    floor = torch.finfo(ulp_dtype or out.dtype).eps * max(scale, 1e-6)
    assert e_out <= factor * e_dense + floor, f"{what}: max error {e_out:.3g} vs dense path {e_dense:.3g} (floor {floor:.3g})"
