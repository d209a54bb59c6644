"""`sae-fast plan`: the bytes each part of a training step needs, and whether it fits.

The model counts what the sparse training step (sae_fast/sparse_train.py) holds
at its peak, for the Triton backend (no [tokens, d_sae] tensor anywhere), and
sets it against the dense PyTorch step for comparison.
"""

from __future__ import annotations

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan(d_in: int, d_sae: int, batch: int, *, l0: int = 64, band: int = 64, dtype: str = "bfloat16",
         optimizer: str = "sparse-adam", adam_beta1: float = 0.0) -> dict:
    """Returns {"sparse": [(part, bytes, note)], "dense": [...]} for one training step."""
    for name, v in (("d_in", d_in), ("d_sae", d_sae), ("batch", batch)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    b = _BYTES[dtype]
    W = 2 * d_in * d_sae  # elements in W_enc + W_dec
    vec = 2 * d_sae + d_in  # b_enc, threshold, b_dec
    moments = 1 if adam_beta1 == 0 else 2
    touched = min(d_sae, batch * l0)  # feature rows a step can touch
    sparse = [
        ("parameters (W_enc + W_dec, " + dtype + ")", W * b + vec * 4, "threshold kept float32"),
        (f"Adam state ({moments} float32 moment{'s' if moments > 1 else ''})", moments * (W + vec) * 4,
         "beta1 = 0 keeps only the second moment" if moments == 1 else "beta1 > 0 needs both moments"),
    ]
    if optimizer == "sparse-adam":
        sparse.append(("lazy-decay step counters (int64 per feature row/column)", 3 * d_sae * 8 + d_in * 8, ""))
    # What the code holds today: the sparse backward returns full-size gradient
    # tensors (rows outside the active set are zero). Compact row gradients
    # (min(d_sae, batch x L0) rows) are planned, not built.
    sparse.append(("weight gradients (full size; nonzero on touched rows only)", W * b + vec * 4,
                   f"a step touches at most {touched} of {d_sae} feature rows"))
    sparse += [
        ("input batch x and its float32 copy for the loss", batch * d_in * (b + 4), ""),
        ("active set (index int64 + value) and band (index) per token", batch * (l0 * (8 + b) + band * 8), ""),
        ("reconstruction and its gradient (float32)", 2 * batch * d_in * 4, ""),
        ("gather-dot and scatter workspaces", batch * (l0 + band) * 4 * 2 + touched * 8, ""),
    ]
    dense = [
        ("parameters", W * b + vec * 4, ""),
        (f"Adam state ({moments} moment{'s' if moments > 1 else ''}, param dtype)", moments * (W * b + vec * 4), ""),
        ("weight gradients (dense)", W * b + vec * 4, ""),
        ("pre-activations, activations, masks, their gradients [batch, d_sae]", batch * d_sae * (4 * b + 2), ""),
        ("input, reconstruction and gradients", 4 * batch * d_in * 4, ""),
    ]
    return {"sparse": sparse, "dense": dense}


def render(d: dict, gpu_mem_gib: float) -> tuple[str, bool]:
    lines, fits = [], None  # `fits` is the sae_fast step's verdict (the first block)
    for name, rows in (("sae_fast sparse step (triton)", d["sparse"]), ("dense PyTorch step", d["dense"])):
        total = sum(r[1] for r in rows)
        ok = total <= gpu_mem_gib * 2**30
        fits = ok if fits is None else fits
        lines.append(f"{name}:")
        for part, nbytes, note in rows:
            lines.append(f"  {nbytes / 2**30:9.2f} GiB  {part}" + (f"  ({note})" if note else ""))
        lines.append(f"  {total / 2**30:9.2f} GiB  total -> {'fits' if ok else 'does NOT fit'} in {gpu_mem_gib:g} GiB")
    return "\n".join(lines), fits
