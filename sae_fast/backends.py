"""Backend registry: which implementation runs an op, and why the others can't.

A backend is an object with four methods over flattened tokens:

    encode(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input) -> dense acts [N, d_sae]
    encode_sparse(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input, capacity) -> SparseActs
    decode(acts: SparseActs, W_dec, b_dec) -> [N, d_in]
    loss(x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input)
        -> TrainingOutput
    row_grads(same arguments) -> (TrainingOutput, RowGrads)   the lean step (sparse_train.py)

Backends register themselves at import (`register`); `resolve` picks one.
"auto" prefers, on CUDA tensors: triton, cuda, torch; on CPU tensors: cpu,
torch (the Triton interpreter is a correctness tool, never picked by auto).
The environment variable SAE_FAST_BACKEND, when set, replaces "auto".
"""

from __future__ import annotations

import os
from typing import Callable

import torch

ENV_BACKEND = "SAE_FAST_BACKEND"
NAMES = ("torch", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# name -> (factory returning the backend object, availability(device) -> reason or None)
_REGISTRY: dict[str, tuple[Callable[[], object], Callable[[torch.device], str | None]]] = {}
_INSTANCES: dict[str, object] = {}
# Why a backend failed to register (import error of its module), for info().
_UNREGISTERED_REASON: dict[str, str] = {
    "triton": "the Triton kernels are not part of this build",
    "cuda": "the CUDA kernels are not part of this build",
    "cpu": "the compiled extension sae_fast._C is not part of this build",
}


def register(name: str, factory: Callable[[], object], unavailable: Callable[[torch.device], str | None]) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown backend name {name!r}; expected one of {NAMES}")
    _REGISTRY[name] = (factory, unavailable)
    _UNREGISTERED_REASON.pop(name, None)


def mark_unregistered(name: str, reason: str) -> None:
    if name not in _REGISTRY:
        _UNREGISTERED_REASON[name] = reason


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None when `name` can run on tensors of `device`, else why not."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    if name not in _REGISTRY:
        return _UNREGISTERED_REASON.get(name, "not registered")
    return _REGISTRY[name][1](torch.device(device))


def get(name: str) -> object:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name][0]()
    return _INSTANCES[name]


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device | str) -> str:
    """The backend name that will run on tensors of `device` for a request of `backend`."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in NAMES:
                raise ValueError(f"{ENV_BACKEND} must be one of {('auto',) + NAMES}, got {env!r}")
            backend = env
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device} tensors: {why}")
    return backend


def table(device: torch.device | str) -> list[tuple[str, bool, str]]:
    """(name, available, reason) for each backend on `device`."""
    rows = []
    for name in NAMES:
        why = unavailable_reason(name, device)
        rows.append((name, why is None, why or "ok"))
    return rows


class TorchBackend:
    """The pure-PyTorch reference (sae_fast.reference); runs anywhere."""

    name = "torch"

    def encode(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input):
        from . import reference

        return reference.jumprelu_encode(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input)

    def encode_sparse(self, x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input, capacity):
        from . import reference

        return reference.jumprelu_encode_sparse(x, W_enc, b_enc, threshold, b_dec, apply_b_dec_to_input, capacity)

    def decode(self, acts, W_dec, b_dec):
        from . import reference

        return reference.sparse_decode(acts, W_dec, b_dec)

    def loss(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input):
        from . import reference

        return reference.jumprelu_sae_loss(
            x, W_enc, b_enc, threshold, W_dec, b_dec,
            l0_coefficient=l0_coefficient, bandwidth=bandwidth, apply_b_dec_to_input=apply_b_dec_to_input,
        )

    def row_grads(self, x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient, bandwidth, apply_b_dec_to_input,
                  dense=None):
        # The sparse step in plain torch ops: chunked dense-GEMM encoder, reference primitives.
        from .sparse_train import (REFERENCE_PRIMS, REFERENCE_PRIMS_F64_ACC, chunked_pre_encoder,
                                   sparse_jumprelu_sae_row_grads)

        prims = REFERENCE_PRIMS_F64_ACC if x.device.type == "cpu" else REFERENCE_PRIMS
        return sparse_jumprelu_sae_row_grads(
            x, W_enc, b_enc, threshold, W_dec, b_dec, l0_coefficient=l0_coefficient, bandwidth=bandwidth,
            apply_b_dec_to_input=apply_b_dec_to_input, encoder=chunked_pre_encoder, prims=prims, dense=dense,
        )


register("torch", TorchBackend, lambda device: None)
