"""SparseActs: the sparse activation container every backend reads and writes.

Layout (kernels read and write these tensors directly, so it is a contract):

    indices  int64  [n_tokens, capacity]  feature ids, row-major, contiguous
    values   dtype  [n_tokens, capacity]  activation values (the SAE's dtype)
    counts   int32  [n_tokens]            number of valid slots in each row
    d_sae    int                          width of the dictionary
    batch_shape  tuple                    leading shape of the input; prod == n_tokens

Row b holds its active features in slots 0 .. counts[b]-1, in no particular
order (a fused kernel writes them in tile order), with no repeated index.
Slots counts[b] .. capacity-1 are padding and hold index 0 and value 0, so a
consumer that ignores counts (a gather-sum, a scatter-add) still computes the
exact result. capacity >= max(counts); capacity == max(counts) when nothing
asked for more ("unpadded").

The active set of a token is { j : pre[j] > threshold[j] and pre[j] > 0 },
plus every j where pre[j] is NaN: the dense Gemma Scope formula
relu(pre) * (pre > threshold) yields NaN there, and the sparse form must
propagate it exactly as the dense one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import FLOAT_DTYPES


def valid_slots(indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [n_tokens, capacity]: True on slots k < counts[b] (the rest is padding)."""
    return torch.arange(indices.shape[1], device=indices.device)[None, :] < counts.long()[:, None]


def compact(mask: torch.Tensor, values: torch.Tensor | None = None):
    """Per-row compaction of a [N, S] mask into this layout, unpadded.

    Returns (indices int64 [N, cap], values [N, cap] or None, counts int32 [N])
    with cap = the largest row count, entries in increasing feature order,
    padding index 0 and value 0.
    """
    n = mask.shape[0]
    nz = mask.nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    counts = torch.bincount(rows, minlength=n) if n else torch.zeros(0, dtype=torch.int64, device=mask.device)
    cap = int(counts.max()) if n and rows.numel() else 0
    pos = torch.arange(rows.numel(), device=mask.device) - (torch.cumsum(counts, 0) - counts)[rows]
    idx = torch.zeros(n, cap, dtype=torch.int64, device=mask.device)
    idx[rows, pos] = cols
    val = None
    if values is not None:
        val = torch.zeros(n, cap, dtype=values.dtype, device=mask.device)
        val[rows, pos] = values[rows, cols]
    return idx, val, counts.to(torch.int32)


def segment_by_feature(indices: torch.Tensor, counts: torch.Tensor, d_sae: int):
    """(order, start): the valid flat slots b*K+k grouped by feature, stable in (b, k),
    and each feature's first position in `order` (int64 [d_sae + 1]). Padding slots, and
    indices outside [0, d_sae), are keyed d_sae and sort past every group. The layout
    the deterministic segmented scatter kernels read (Triton; csrc/cuda/sparse_ops.cu
    forms the same with ATen ops)."""
    ok = valid_slots(indices, counts) & (indices >= 0) & (indices < d_sae)
    key = torch.where(ok, indices, d_sae).reshape(-1)
    order = torch.sort(key, stable=True).indices
    start = torch.zeros(d_sae + 1, dtype=torch.int64, device=indices.device)
    start[1:] = torch.cumsum(torch.bincount(key, minlength=d_sae + 1)[:d_sae], 0)
    return order, start


class SparseActs:
    __slots__ = ("indices", "values", "counts", "d_sae", "batch_shape")

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, d_sae: int,
                 batch_shape: Sequence[int] | None = None):
        self.indices = indices
        self.values = values
        self.counts = counts
        self.d_sae = int(d_sae)
        self.batch_shape = tuple(int(s) for s in batch_shape) if batch_shape is not None else (int(indices.shape[0]), )
        self._check_layout()

    # ------------------------------------------------------------------ layout
    def _check_layout(self) -> None:
        """Cheap structural checks (no device sync); `validate()` checks contents."""
        i, v, c = self.indices, self.values, self.counts
        for name, t in (("indices", i), ("values", v), ("counts", c)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SparseActs.{name} must be a torch.Tensor, got {type(t).__name__}")
        if i.dtype != torch.int64:
            raise TypeError(f"SparseActs.indices must be int64, got {i.dtype}")
        if c.dtype != torch.int32:
            raise TypeError(f"SparseActs.counts must be int32, got {c.dtype}")
        if v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"SparseActs.values must be float32, bfloat16 or float16, got {v.dtype}")
        if i.dim() != 2 or v.shape != i.shape:
            raise ValueError(f"SparseActs.indices and .values must both be [n_tokens, capacity], "
                             f"got {list(i.shape)} and {list(v.shape)}")
        if c.shape != (i.shape[0], ):
            raise ValueError(f"SparseActs.counts must be [n_tokens]=[{i.shape[0]}], got {list(c.shape)}")
        if not (i.device == v.device == c.device):
            raise ValueError(f"SparseActs tensors must share a device, got indices on {i.device}, "
                             f"values on {v.device}, counts on {c.device}")
        if self.d_sae <= 0:
            raise ValueError(f"SparseActs.d_sae must be positive, got {self.d_sae}")
        if math.prod(self.batch_shape) != i.shape[0]:
            raise ValueError(
                f"SparseActs.batch_shape {list(self.batch_shape)} does not hold n_tokens={i.shape[0]} tokens")

    def validate(self) -> SparseActs:
        """Full content check (syncs with the device). Returns self.

        Counts and indices raise sae_fast._checks.OutOfRangeError (a ValueError) naming the
        first bad slot, as the ops do; whatever SAE_FAST_UNCHECKED says."""
        from ._checks import sparse_ranges

        self._check_layout()
        n, cap = self.indices.shape
        sparse_ranges("SparseActs.validate", self.indices, self.counts, self.d_sae)
        if n and cap:
            valid = valid_slots(self.indices, self.counts)
            idx = self.indices
            if bool((idx[~valid] != 0).any()) or bool((self.values[~valid] != 0).any()):
                raise ValueError("SparseActs padding slots (k >= counts[b]) must hold index 0 and value 0")
            # Repeated index inside a row: sort the valid slots (padding mapped past d_sae).
            keyed = torch.where(valid, idx, torch.full_like(idx, self.d_sae) + torch.arange(cap, device=idx.device))
            s = keyed.sort(dim=1).values
            if cap > 1 and bool((s[:, 1:] == s[:, :-1]).any()):
                raise ValueError("SparseActs rows must not repeat a feature index")
        return self

    # -------------------------------------------------------------- properties
    @property
    def n_tokens(self) -> int:
        return int(self.indices.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.indices.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor this represents."""
        return (*self.batch_shape, self.d_sae)

    @property
    def dtype(self) -> torch.dtype:
        """The values' dtype: the SAE dtype of the encoder that made them."""
        return self.values.dtype

    def l0(self) -> torch.Tensor:
        """Number of active features per token, shaped like batch_shape (float32)."""
        return self.counts.float().reshape(self.batch_shape)

    @property
    def device(self) -> torch.device:
        """Where indices, values and counts live (one device for the three)."""
        return self.values.device

    # ------------------------------------------------------------- conversion
    @classmethod
    def from_dense(cls, dense: torch.Tensor, capacity: int | None = None) -> SparseActs:
        """Every nonzero (NaN included) of dense [..., d_sae] becomes an entry.

        capacity: pad every row to this many slots; it must be at least the
        largest row count (a smaller one would drop active features: error).
        """
        if not isinstance(dense, torch.Tensor) or dense.dtype not in FLOAT_DTYPES:
            raise TypeError("dense must be a float32, bfloat16 or float16 tensor")
        if dense.dim() < 1:
            raise ValueError("dense must have shape [..., d_sae]")
        batch_shape, d_sae = tuple(dense.shape[:-1]), int(dense.shape[-1])
        flat = dense.reshape(-1, d_sae)
        indices, values, counts = compact(flat != 0, flat)
        max_count = indices.shape[1]
        if capacity is None:
            capacity = max_count
        elif capacity < max_count:
            raise ValueError(f"capacity={capacity} is smaller than the largest row count {max_count}: "
                             f"truncation would drop active features")
        return cls(indices, values, counts, d_sae, batch_shape).with_capacity(capacity)

    def with_capacity(self, capacity: int) -> SparseActs:
        """The same entries padded to `capacity` slots per row (never fewer than now)."""
        pad = capacity - self.capacity
        if pad <= 0:
            return self
        return SparseActs(torch.nn.functional.pad(self.indices, (0, pad)),
                          torch.nn.functional.pad(self.values, (0, pad)), self.counts, self.d_sae, self.batch_shape)

    def to_dense(self) -> torch.Tensor:
        """Dense [*batch_shape, d_sae] tensor. Padding adds exact zeros."""
        out = torch.zeros(self.n_tokens, self.d_sae, dtype=self.dtype, device=self.device)
        out.scatter_add_(1, self.indices, self.values)
        return out.reshape(self.shape)

    def to_sparse_coo(self) -> torch.Tensor:
        """The entries as a torch sparse COO tensor [n_tokens, d_sae] (what SAELens's trainer
        takes as feature activations); no index repeats, coalesce() sorts them if needed."""
        valid = valid_slots(self.indices, self.counts)
        rows = torch.arange(self.n_tokens, device=self.indices.device)[:, None].expand_as(self.indices)
        idx = torch.stack([rows[valid], self.indices[valid]])
        return torch.sparse_coo_tensor(idx, self.values[valid], (self.n_tokens, self.d_sae), check_invariants=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseActs:
        """Move to a device and/or cast values (indices stay int64, counts int32)."""
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return SparseActs(self.indices.to(device=device), self.values.to(device=device, dtype=dtype),
                          self.counts.to(device=device), self.d_sae, self.batch_shape)

    def cpu(self) -> SparseActs:
        return self.to("cpu")

    def cuda(self, device: int | None = None) -> SparseActs:
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def sorted(self) -> SparseActs:
        """Same entries with each row's valid slots in increasing feature order."""
        valid = valid_slots(self.indices, self.counts)
        key = torch.where(valid, self.indices, torch.full_like(self.indices, self.d_sae))
        order = key.argsort(dim=1, stable=True)
        return SparseActs(self.indices.gather(1, order), self.values.gather(1, order), self.counts, self.d_sae,
                          self.batch_shape)

    def __repr__(self) -> str:
        return (
            f"SparseActs(shape={list(self.shape)}, capacity={self.capacity}, dtype={self.dtype}, device={self.device})")
