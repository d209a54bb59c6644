"""Public functional ops: validate once, flatten tokens, dispatch to a backend.

The names of docs/DESIGN.md, "Ops": jumprelu_encode, jumprelu_encode_sparse, sparse_decode,
jumprelu_sae_loss, jumprelu_sae_row_grads. Each takes backend="auto" and runs what the
registry (sae_fast.backends) gives for it: Backend.encode, .encode_sparse, .decode, and
the training step of sae_fast.step over its encoder and primitives.

sparse_decode checks the indices and counts of its SparseActs on every backend (see
sae_fast._checks: immediate on CPU tensors, deferred to the next op call or to
check_pending() on CUDA tensors of the triton backend; SAE_FAST_UNCHECKED=1 opts out).
"""

from __future__ import annotations

import torch

from . import backends, reference, step
from ._checks import (  # noqa: F401  (check_pending: sae_fast.check_pending)
    check_bandwidth, check_capacity, check_decoder_params, check_encoder_params, check_input, check_pending,
    check_same_device, check_skip, check_sparse_ranges,
)
from .outputs import TrainingOutput
from .sparse import SparseActs
from .step import RowGrads, SAEParams


def _check_encode_args(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input):
    d_in, d_sae = check_encoder_params(W_enc, b_enc, threshold, b_dec if apply_b_dec_to_input else None)
    check_input(x, d_in, W_enc.dtype)
    check_same_device(x=x, W_enc=W_enc)
    if apply_b_dec_to_input and b_dec is None:
        raise ValueError("b_dec is required when apply_b_dec_to_input=True")
    return d_in, d_sae


def jumprelu_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                    b_dec: torch.Tensor | None = None, apply_b_dec_to_input: bool = False, *,
                    backend: str = "auto") -> torch.Tensor:
    """Dense JumpReLU activations relu(pre) * (pre > threshold), shape [..., d_sae]."""
    d_in, d_sae = _check_encode_args(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)
    xin = reference.encoder_input(x.reshape(-1, d_in), b_dec, apply_b_dec_to_input)
    out = backends.select(backend, x.device).encode(xin, W_enc, b_enc, threshold)
    return out.reshape(*x.shape[:-1], d_sae)


def jumprelu_encode_sparse(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                           b_dec: torch.Tensor | None = None, apply_b_dec_to_input: bool = False, *,
                           capacity: int | None = None, backend: str = "auto") -> SparseActs:
    """Sparse JumpReLU activations (SparseActs); never truncates.

    capacity: pad each row to at least this many slots (it grows if a row has more).
    """
    d_in, _ = _check_encode_args(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)
    capacity = check_capacity(capacity)
    xin = reference.encoder_input(x.reshape(-1, d_in), b_dec, apply_b_dec_to_input)
    indices, values, counts = backends.select(backend, x.device).encode_sparse(xin, W_enc, b_enc, threshold)
    sp = SparseActs(indices, values, counts, W_enc.shape[1], x.shape[:-1])
    return sp.with_capacity(capacity) if capacity is not None else sp


def sparse_decode(acts: SparseActs, W_dec: torch.Tensor, b_dec: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x_hat = sum of values * W_dec[indices] + b_dec, float32 accumulation, [*batch_shape, d_in]."""
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be a SparseActs, got {type(acts).__name__}")
    d_sae, d_in = check_decoder_params(W_dec, b_dec)
    if acts.d_sae != d_sae:
        raise ValueError(f"acts.d_sae={acts.d_sae} does not match W_dec's d_sae={d_sae}")
    if acts.dtype != W_dec.dtype:
        raise TypeError(f"acts.values has dtype {acts.dtype} but W_dec is {W_dec.dtype}; cast with acts.to(dtype=...)")
    check_same_device(acts=acts.values, W_dec=W_dec)
    acts._check_layout()  # its tensors may have been replaced since it was built
    impl = backends.select(backend, W_dec.device)
    if not impl.checks_indices:
        # torch: nothing else checks; cpu: its C++ check would too, but as RuntimeError.
        # The triton op runs this same check inside; the cuda op checks in C++.
        check_sparse_ranges("sparse_decode", acts.indices, acts.counts, d_sae)
    return impl.decode(acts, W_dec, b_dec).reshape(*acts.batch_shape, d_in)


def _check_loss_args(x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input,
                     target=None, W_skip=None, target_l0=None):
    d_in, d_sae = _check_encode_args(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)
    if target is None:
        d_sae2, d_in2 = check_decoder_params(W_dec, b_dec)
        if (d_sae2, d_in2) != (d_sae, d_in):
            raise ValueError(f"W_dec must have shape [d_sae, d_in]=[{d_sae}, {d_in}], got {list(W_dec.shape)}")
        d_out = d_in
        if W_skip is not None:
            raise ValueError("W_skip (a transcoder's skip connection) needs a target: an SAE's target is its input")
    else:
        d_sae2, d_out = check_decoder_params(W_dec, b_dec, out="d_out")
        if d_sae2 != d_sae:
            raise ValueError(f"W_dec must have shape [d_sae={d_sae}, d_out], got {list(W_dec.shape)}")
        check_input(target, d_out, W_enc.dtype, name="target", dim="d_out")
        if tuple(target.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(f"target must have x's leading (token) shape {list(x.shape[:-1])}, "
                             f"got shape {list(target.shape)}")
        check_same_device(x=x, target=target)  # (apply_b_dec_to_input: b_dec [d_in] was checked above)
    if W_skip is not None:
        check_skip(W_skip, d_in, d_out, W_enc.dtype)
        check_same_device(x=x, W_skip=W_skip)
    check_same_device(x=x, W_dec=W_dec)
    bw = check_bandwidth(bandwidth)
    l0c = float(l0_coefficient)
    if not l0c >= 0:
        raise ValueError(f"l0_coefficient must be a non-negative number, got {l0_coefficient!r}")
    if target_l0 is not None and not (0 < float(target_l0) <= d_sae):
        raise ValueError(f"target_l0 must be in (0, d_sae={d_sae}], got {target_l0!r}")
    return d_in, l0c, bw


def _flat_target(target):
    return None if target is None else target.reshape(-1, target.shape[-1])


def jumprelu_sae_loss(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                      W_dec: torch.Tensor, b_dec: torch.Tensor, *, l0_coefficient: float, bandwidth: float,
                      apply_b_dec_to_input: bool = False, target: torch.Tensor | None = None,
                      W_skip: torch.Tensor | None = None, target_l0: float | None = None,
                      backend: str = "auto") -> TrainingOutput:
    """JumpReLU training loss with straight-through gradients (see reference.jumprelu_sae_loss).

    A transcoder passes its target [..., d_out] (W_dec [d_sae, d_out], b_dec [d_out]) and
    optionally its skip connection W_skip [d_in, d_out]; an SAE's target is x itself.
    target_l0: the quadratic L0 loss of Gemma Scope 2 instead of the linear one,
    l0_coefficient * mean over tokens of 2 / target_l0 * (l0_b - target_l0)² (the sparse
    backends need threshold >= 0 for it: their per-token L0 is the active count)."""
    d_in, l0c, bw = _check_loss_args(x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth,
                                     apply_b_dec_to_input, target, W_skip, target_l0)
    p = SAEParams(W_enc, b_enc, threshold, W_dec, b_dec, apply_b_dec_to_input, W_skip)
    out = step.loss(backends.select(backend, x.device), x.reshape(-1, d_in), p, l0_coefficient=l0c, bandwidth=bw,
                    target=_flat_target(target), target_l0=target_l0)
    out.reconstruction = out.reconstruction.reshape((x if target is None else target).shape)
    return out


def jumprelu_sae_row_grads(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                           W_dec: torch.Tensor, b_dec: torch.Tensor, *, l0_coefficient: float, bandwidth: float,
                           apply_b_dec_to_input: bool = False, target: torch.Tensor | None = None,
                           W_skip: torch.Tensor | None = None, target_l0: float | None = None, backend: str = "auto",
                           dense: bool | None = None) -> tuple[TrainingOutput, RowGrads]:
    """The row-grads training step: jumprelu_sae_loss's outputs (no autograd graph) and its
    gradients on the touched features only (sae_fast.step.RowGrads).

    dense: None (default) runs the sparse kernels unless more than
    sae_fast.step.DENSE_FALLBACK_DENSITY of the (token, feature) pairs are active (a
    fresh init), where it computes with dense GEMMs a chunk of features at a time;
    True/False force one path. Both give the same gradients to rounding.
    target, W_skip: a transcoder's, as in jumprelu_sae_loss (RowGrads.W_skip is then set);
    target_l0: the quadratic L0 loss, as there."""
    d_in, l0c, bw = _check_loss_args(x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth,
                                     apply_b_dec_to_input, target, W_skip, target_l0)
    p = SAEParams(W_enc, b_enc, threshold, W_dec, b_dec, apply_b_dec_to_input, W_skip)
    out, grads = step.row_grads(backends.select(backend, x.device), x.reshape(-1, d_in), p, l0_coefficient=l0c,
                                bandwidth=bw, dense=dense, target=_flat_target(target), target_l0=target_l0)
    out.reconstruction = out.reconstruction.reshape((x if target is None else target).shape)
    return out, grads
