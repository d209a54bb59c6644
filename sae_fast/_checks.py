"""Input validation shared by every backend.

Every public op calls these before dispatching, so a bad input gets the same
message whichever backend would have run it. Messages name the argument and
say what was expected.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor of dtype float32, bfloat16 or float16, "
            f"got {t.dtype}"
        )


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_input(x: torch.Tensor, d_in: int, weight_dtype: torch.dtype, *, name: str = "x") -> None:
    """x: [..., d_in] floating, same dtype as the SAE weights."""
    check_float(name, x)
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape [..., d_in] with at least one leading (token) "
            f"dimension, got a {x.dim()}-D tensor of shape {list(x.shape)}; "
            f"use {name}.unsqueeze(0) for a single token"
        )
    if x.shape[-1] != d_in:
        raise ValueError(
            f"{name} must have last dimension d_in={d_in}, got shape {list(x.shape)}"
        )
    if x.dtype != weight_dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the SAE weights are {weight_dtype}; "
            f"cast the input with {name}.to({weight_dtype}) (mixing dtypes is not "
            f"done implicitly)"
        )


def check_encoder_params(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    b_dec: torch.Tensor | None = None,
) -> tuple[int, int]:
    check_float("W_enc", W_enc)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must have shape [d_in, d_sae], got {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    check_float("b_enc", b_enc)
    check_shape("b_enc", b_enc, (d_sae,))
    check_float("threshold", threshold)
    check_shape("threshold", threshold, (d_sae,))
    if b_enc.dtype != W_enc.dtype:
        raise TypeError(f"b_enc must have the dtype of W_enc ({W_enc.dtype}), got {b_enc.dtype}")
    if b_dec is not None:
        check_float("b_dec", b_dec)
        check_shape("b_dec", b_dec, (d_in,))
        if b_dec.dtype != W_enc.dtype:
            raise TypeError(f"b_dec must have the dtype of W_enc ({W_enc.dtype}), got {b_dec.dtype}")
    check_same_device(W_enc=W_enc, b_enc=b_enc, threshold=threshold, b_dec=b_dec)
    return d_in, d_sae


def check_decoder_params(W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> tuple[int, int]:
    check_float("W_dec", W_dec)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must have shape [d_sae, d_in], got {list(W_dec.shape)}")
    d_sae, d_in = W_dec.shape
    if b_dec is not None:
        check_float("b_dec", b_dec)
        check_shape("b_dec", b_dec, (d_in,))
        if b_dec.dtype != W_dec.dtype:
            raise TypeError(f"b_dec must have the dtype of W_dec ({W_dec.dtype}), got {b_dec.dtype}")
        check_same_device(W_dec=W_dec, b_dec=b_dec)
    return d_sae, d_in


def check_bandwidth(bandwidth: float) -> float:
    bw = float(bandwidth)
    if not bw > 0 or bw != bw or bw == float("inf"):
        raise ValueError(f"bandwidth must be a finite positive number, got {bandwidth!r}")
    return bw
