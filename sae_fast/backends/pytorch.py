"""The `torch` backend: the pure-PyTorch reference (sae_fast.reference), on any device.

Its training step runs the shared step (sae_fast.step) on the reference primitives, and
its loss is the dense reference with autograd through the straight-through functions.
"""

from __future__ import annotations

from .. import reference
from ..step import Prims, SAEParams, chunked_pre_encoder
from ..step.sparse import REFERENCE_PRIMS, REFERENCE_PRIMS_F64_ACC
from . import Backend, register


def _on(device_prims: str):
    """A primitive that runs REFERENCE_PRIMS_F64_ACC's on CPU tensors and REFERENCE_PRIMS's elsewhere."""
    f64, f32 = getattr(REFERENCE_PRIMS_F64_ACC, device_prims), getattr(REFERENCE_PRIMS, device_prims)
    return lambda *a, **k: (f64 if a[0].device.type == "cpu" else f32)(*a, **k)


# float64 sums on CPU (cheap there), float32 on GPUs; the first argument of every
# primitive (indices or grad) is on the step's device.
PRIMS = Prims(_on("decode"), _on("gather_dot"), _on("scatter_rows"))


def _encode_sparse(x, W_enc, b_enc, threshold):
    sp = reference.jumprelu_encode_sparse(x, W_enc, b_enc, threshold)
    return sp.indices, sp.values, sp.counts


def _loss(x, p: SAEParams, *, l0_coefficient, bandwidth, target=None, target_l0=None):
    return reference.jumprelu_sae_loss(x, *p.tensors(), l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                       apply_b_dec_to_input=p.apply_b_dec_to_input, target=target, W_skip=p.W_skip,
                                       target_l0=target_l0)


def _backend() -> Backend:
    return Backend(name="torch", devices=None, unavailable=lambda device: None, encode=reference.jumprelu_encode,
                   encode_sparse=_encode_sparse, decode=reference.sparse_decode, encoder=chunked_pre_encoder,
                   prims=PRIMS, optimizer=None, loss=_loss)


register("torch", _backend)
