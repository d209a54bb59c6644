"""The training step (docs/DESIGN.md, "The training step"), over any backend of the registry.

    encoders.py     the active set, band and step count of every token (EncodedSets)
    sparse.py       the step on the sparse primitives: its autograd form (sparse_loss)
                    and the row-grads step (sparse_row_grads: no graph, RowGrads)
    dense_phase.py  the row-grads step with dense GEMMs, a chunk of features at a time,
                    for dense phases such as a fresh init
    params.py       SAEParams (the parameters as one bundle), RowGrads

`loss` and `row_grads` are what sae_fast.ops.jumprelu_sae_loss and
jumprelu_sae_row_grads run once a backend is chosen.
"""

from __future__ import annotations

from .dense_phase import _DENSITY_ATTR, DENSE_FALLBACK_DENSITY, active_density, chunked_dense_row_grads
from .encoders import EncodedSets, chunked_pre_encoder, encode_chunk_features
from .params import RowGrads, SAEParams, remove_parallel_component, touched_features
from .sparse import Prims, sparse_loss, sparse_row_grads

__all__ = [
    "DENSE_FALLBACK_DENSITY", "EncodedSets", "Prims", "RowGrads", "SAEParams", "active_density",
    "chunked_dense_row_grads", "chunked_pre_encoder", "encode_chunk_features", "loss", "remove_parallel_component",
    "row_grads", "sparse_loss", "sparse_row_grads", "touched_features"
]


def loss(impl, x, p: SAEParams, *, l0_coefficient: float, bandwidth: float, target=None, target_l0=None):
    """The training loss with straight-through gradients on backend `impl` (a Backend):
    its own `loss` where it has one (torch: the dense reference), else the sparse step's
    autograd form over its encoder and primitives. x is [N, d_in]; target [N, d_out] is a
    transcoder's (None: x); target_l0 selects the quadratic L0 loss."""
    if impl.loss is not None:
        return impl.loss(x, p, l0_coefficient=l0_coefficient, bandwidth=bandwidth, target=target, target_l0=target_l0)
    return sparse_loss(x, p, l0_coefficient=l0_coefficient, bandwidth=bandwidth, encoder=impl.encoder, prims=impl.prims,
                       target=target, target_l0=target_l0)


def row_grads(impl, x, p: SAEParams, *, l0_coefficient: float, bandwidth: float, dense: bool | None = None, target=None,
              target_l0=None):
    """The row-grads step on backend `impl`: the loss (no graph) and the gradients of the
    touched features only (RowGrads).

    dense: None picks by density: above DENSE_FALLBACK_DENSITY active pairs (last step's
    density for this W_enc, or a PROBE_TOKENS probe on the first step) the step runs as
    chunked_dense_row_grads; True/False force one path."""
    if dense is None:
        density = getattr(p.W_enc, _DENSITY_ATTR, None)
        if density is None:
            density = active_density(x, p)
        dense = density > DENSE_FALLBACK_DENSITY
    if dense:
        out, grads = chunked_dense_row_grads(x, p, l0_coefficient=l0_coefficient, bandwidth=bandwidth, target=target,
                                             target_l0=target_l0)
    else:
        out, grads = sparse_row_grads(x, p, l0_coefficient=l0_coefficient, bandwidth=bandwidth, encoder=impl.encoder,
                                      prims=impl.prims, target=target, target_l0=target_l0)
    if x.shape[0]:
        setattr(p.W_enc, _DENSITY_ATTR, float(out.l0) / p.d_sae)
    return out, grads
