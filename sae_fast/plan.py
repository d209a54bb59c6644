"""`sae-fast plan`: the bytes each part of a training step needs, and whether it fits.

The model counts what the training step holds at its peak, and sets it against
the dense PyTorch step. With --optimizer sparse-adam it is the row-grads step
(step.row_grads + optim.SparseAdamB1Zero.step_rows):
no autograd graph, gradients for the touched features only. With --optimizer
adam it is the autograd step (full-size .grad tensors, torch.optim.Adam).
The Triton encoder keeps pre in registers; the cuda backend's dense-GEMM encoder
forms it one chunk of features at a time (step.encoders.ENCODE_WORKSPACE_BYTES).
"""

from __future__ import annotations

from .dtypes import BYTES as _BYTES


def plan(d_in: int, d_sae: int, batch: int, *, l0: int = 64, band: int = 64, dtype: str = "bfloat16",
         optimizer: str = "sparse-adam", adam_beta1: float = 0.0, backend: str = "triton") -> dict:
    """Returns {"sparse": [(part, bytes, note)], "dense": [...], "label": str} for one training step."""
    import torch

    from .step.encoders import ENCODE_WORKSPACE_BYTES, encode_chunk_features

    for name, v in (("d_in", d_in), ("d_sae", d_sae), ("batch", batch)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    for name, v in (("l0", l0), ("band", band)):
        if v < 0:
            raise ValueError(f"{name} must be non-negative, got {v}")
    if optimizer == "sparse-adam" and adam_beta1 != 0:
        raise ValueError(f"optimizer sparse-adam is Adam with beta1 = 0; got adam_beta1={adam_beta1}")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be triton or cuda, got {backend!r}")
    b = _BYTES[dtype]
    W = 2 * d_in * d_sae  # elements in W_enc + W_dec
    vec = 2 * d_sae + d_in  # b_enc, threshold, b_dec
    moments = 1 if adam_beta1 == 0 else 2
    # features a step can touch: every active or band slot a different feature, at most d_sae
    touched = min(d_sae, batch * (l0 + band))
    sparse = [("parameters (W_enc + W_dec, " + dtype + ")", W * b + vec * 4, "threshold kept float32"),
              (f"Adam state ({moments} float32 moment{'s' if moments > 1 else ''})", moments * (W + vec) * 4,
               "beta1 = 0 keeps only the second moment" if moments == 1 else "beta1 > 0 needs both moments")]
    if optimizer == "sparse-adam":
        sparse += [("lazy-decay step counters (int64 per feature, 4 parameters)", 4 * d_sae * 8 + 8, ""),
                   ("compact gradients: W_enc and W_dec rows of the touched features",
                    touched * (2 * d_in * b + b + 4) + d_in * b, f"at most {touched} of {d_sae} features"),
                   ("touched-feature map (mark, position) and the decoder projection's row block",
                    d_sae * 9 + touched * 8 + 16384 * d_in * 4 * 3, "")]
    else:
        sparse.append(("weight gradients (full size .grad; nonzero on touched rows only)", W * b + vec * 4,
                       f"a step touches at most {touched} of {d_sae} features"))
    if backend == "cuda":
        c = encode_chunk_features(batch, d_sae, getattr(torch, dtype))
        sparse.append(
            ("encoder workspace (pre of one chunk of features)", min(ENCODE_WORKSPACE_BYTES,
                                                                     batch * c * (b + 11)), f"{c} features per chunk"))
    sparse += [("input batch x and its float32 copy for the loss", batch * d_in * (b + 4), ""),
               ("active set (index int64 + value) and band (index) per token", batch * (l0 * (8 + b) + band * 8), ""),
               ("reconstruction and its gradient (float32)", 2 * batch * d_in * 4, ""),
               ("gather-dot and scatter workspaces", batch * (l0 + band) * 4 * 2 + batch * (l0 + band) * 8 * 2, "")]
    dense = [("parameters", W * b + vec * 4, ""),
             ("Adam state (2 moments, param dtype)", 2 * (W * b + vec * 4),
              "torch.optim.Adam keeps exp_avg even at beta1 = 0"), ("weight gradients (dense)", W * b + vec * 4, ""),
             ("pre-activations, activations, masks, their gradients [batch, d_sae]", batch * d_sae * (4 * b + 2), ""),
             ("input, reconstruction and gradients", 4 * batch * d_in * 4, "")]
    label = f"sae_fast {'row-grads' if optimizer == 'sparse-adam' else 'autograd'} step ({backend})"
    out = {"sparse": sparse, "dense": dense, "label": label}
    if optimizer == "sparse-adam":
        # Right after the Gemma Scope init about half the features fire: the row-grads step
        # runs chunked dense GEMMs (step.chunked_dense_row_grads) and touches every row.
        c = encode_chunk_features(batch, d_sae, getattr(torch, dtype))
        phase = list(sparse[:3])
        phase += [("gradients of every feature (all rows touched)", W * b + vec * 4, ""),
                  ("chunk workspace: pre, acts, masks, float32 dacts of one chunk", batch * c * (3 * b + 4 * 4 + 3),
                   f"{c} features per chunk"),
                  ("input, reconstruction (float32) and their gradients", batch * d_in * (b + 4 * 3), "")]
        out["dense_phase"] = phase
    return out


def render(d: dict, gpu_mem_gib: float) -> tuple[str, bool]:
    lines, fits = [], True  # `fits`: every sae_fast block fits
    blocks = [(d.get("label", "sae_fast step"), d["sparse"], True)]
    if "dense_phase" in d:
        blocks.append(("sae_fast row-grads step at a fresh init (more than 1/32 active: chunked dense GEMMs)",
                       d["dense_phase"], True))
    blocks.append(("dense PyTorch step", d["dense"], False))
    for name, rows, ours in blocks:
        total = sum(r[1] for r in rows)
        ok = total <= gpu_mem_gib * 2**30
        fits = fits and ok if ours else fits
        lines.append(f"{name}:")
        for part, nbytes, note in rows:
            lines.append(f"  {nbytes / 2**30:9.2f} GiB  {part}" + (f"  ({note})" if note else ""))
        lines.append(f"  {total / 2**30:9.2f} GiB  total -> {'fits' if ok else 'does NOT fit'} in {gpu_mem_gib:g} GiB")
    return "\n".join(lines), fits
