"""Per-feature statistics of a stream of sparse activations, kept on the device.

`FeatureStats.update(sp, ctx, pos)` takes one batch of `SparseActs` (the output of
`encode_sparse`) and the context id and position of each of its tokens, and updates, for
every feature j, from the batch's valid (token, feature, value) entries only:

- `fire_count[j]`: tokens on which j fired (int64); `act_sum[j]`: the sum of its activations
  (float64, so the mean of a feature firing on millions of tokens keeps its digits);
  `act_max[j]`: its largest activation (0 until it fires).
- `hist[j]`: a histogram of its activations on log-spaced bins ending at its maximum (see below).
- `top_score[j], top_ctx[j]`: its top-k contexts, score = the feature's largest activation in the
  context, best first, an earlier context winning a tie; merged per batch with one stable sort of
  [touched features, k + batch contexts] (the old k, then the batch's per-context maxima of each
  feature, scattered from its sparse entries).
- the per-token activations of j in each of its current top contexts, kept as the batch goes
  by (the entries of the (feature, context) pairs that entered a top-k), pruned of evicted
  pairs from time to time, so the winning contexts never need a second forward.

Nothing of size [tokens, d_sae] is formed; the state is O(d_sae * (k + n_bins)) plus the kept
entries.

Histogram bins. Values are placed on a global grid of cells, cell(v) = floor(log2(v) * r) with
r = `bins_per_octave` (cell c covers [2^(c/r), 2^((c+1)/r))). Feature j's histogram holds the
`n_bins` cells ending at the cell T_j of its maximum: slot i >= 1 holds cell T_j - n_bins + 1 + i,
slot 0 holds that cell and everything below it (down to 0). So its bin edges are
0, 2^((T_j - n_bins + 2)/r), ..., 2^((T_j + 1)/r) (`hist_edges`). When a batch raises T_j, the
histogram slides down by the difference and the slots that fall off merge into slot 0: the counts
stay exact, streaming, whatever order the values come in. Defaults r = 8, n_bins = 40: 9%-wide
bins over 4.9 octaves below the maximum (a factor of 30), the rest in slot 0.
"""

from __future__ import annotations

import torch

from ..sparse import SparseActs, valid_slots

# top cell of a feature that has not fired yet: far below any real cell, so the first
# batch that fires it slides its (empty) histogram all the way down
_NO_CELL = -(1 << 40)


def value_cells(values: torch.Tensor, bins_per_octave: int) -> torch.Tensor:
    """cell(v) = floor(log2(v) * bins_per_octave), int64, computed in float64 (the edges 2^(c/r)
    are then placed to float64 precision, not float32's)."""
    return torch.floor(torch.log2(values.double()) * bins_per_octave).to(torch.int64)


def hist_edges(top_cell: int, n_bins: int, bins_per_octave: int) -> list[float]:
    """The n_bins + 1 bin edges of a feature whose maximum lies in `top_cell`: 0, then
    2^((top_cell - n_bins + 1 + i) / r) for i = 1 .. n_bins."""
    return [0.0] + [2.0**((top_cell - n_bins + 1 + i) / bins_per_octave) for i in range(1, n_bins + 1)]


def slide_hist(hist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Histograms [m, n] whose top cell rose by shift [m] (>= 0): slot i takes old slot i + shift,
    slot 0 takes old slots 0 .. shift (merged), the top `shift` slots become empty."""
    m, n = hist.shape
    shift = shift.clamp(0, n).to(torch.int64)
    csum = hist.cumsum(1)
    out = torch.zeros_like(hist)
    out[:, 0] = csum.gather(1, shift.clamp(max=n - 1)[:, None])[:, 0]
    src = torch.arange(1, n, device=hist.device)[None, :] + shift[:, None]
    out[:, 1:] = torch.where(src < n, hist.gather(1, src.clamp(max=n - 1)), 0)
    return out


class FeatureStats:
    """The streaming per-feature statistics of `sae-fast explore` (module docstring).

    d_sae: features; top_k: contexts kept per feature; n_bins, bins_per_octave: the histogram;
    device: where the state lives (the SAE's device); keep_acts: keep the per-token activations
    of the top contexts as they stream by (else only their scores and ids)."""

    def __init__(self, d_sae: int, *, top_k: int = 10, n_bins: int = 40, bins_per_octave: int = 8,
                 device: torch.device | str = "cpu", keep_acts: bool = True):
        for name, v in (("d_sae", d_sae), ("top_k", top_k), ("n_bins", n_bins), ("bins_per_octave", bins_per_octave)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2 (slot 0 holds everything below the others), got {n_bins}")
        dev = torch.device(device)
        self.d_sae, self.k, self.n_bins, self.r = d_sae, top_k, n_bins, bins_per_octave
        self.device = dev
        self.n_tokens = 0
        self.nonfinite = 0  # NaN/inf activations seen (counted in fire_count only)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.act_max = torch.zeros(d_sae, dtype=torch.float32, device=dev)
        self.top_cell = torch.full((d_sae, ), _NO_CELL, dtype=torch.int64, device=dev)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.int64, device=dev)
        self.top_score = torch.full((d_sae, top_k), float("-inf"), dtype=torch.float32, device=dev)
        self.top_ctx = torch.full((d_sae, top_k), -1, dtype=torch.int64, device=dev)
        self.keep_acts = keep_acts
        # kept entries (feature, context, position, value) of pairs that entered a top-k
        self._kept: list[tuple[torch.Tensor, ...]] = []
        self._kept_n = 0
        self._prune_at = 1 << 20
        self._ctx_chunk = 256  # contexts per top-k merge (bounds its [features, contexts] matrix)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, sp: SparseActs, ctx: torch.Tensor, pos: torch.Tensor) -> None:
        """Add one batch: sp holds n tokens, ctx [n] and pos [n] (int64) their context ids and
        positions in the context. Context ids must not decrease from one batch to the next
        (ties then go to the earlier context)."""
        if not isinstance(sp, SparseActs):
            raise TypeError(f"sp must be a SparseActs, got {type(sp).__name__}")
        if sp.d_sae != self.d_sae:
            raise ValueError(f"sp.d_sae={sp.d_sae} does not match the statistics' d_sae={self.d_sae}")
        n = sp.n_tokens
        for name, t in (("ctx", ctx), ("pos", pos)):
            if t.shape != (n, ):
                raise ValueError(f"{name} must be [n_tokens]=[{n}], got {list(t.shape)}")
        self.n_tokens += n
        valid = valid_slots(sp.indices, sp.counts)
        rows = torch.arange(n, device=sp.device)[:, None].expand_as(sp.indices)[valid]
        f = sp.indices[valid].to(self.device)
        v = sp.values[valid].to(device=self.device, dtype=torch.float32)
        rows = rows.to(self.device)
        if f.numel() == 0:
            return
        self.fire_count.index_add_(0, f, torch.ones_like(f))
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            # a NaN/inf activation counts as a firing (the sparse layout lists it) but would
            # poison the sum, the maximum and the bins: it is counted here and left out of them
            self.nonfinite += int((~finite).sum())
            f, v, rows = f[finite], v[finite], rows[finite]
            if f.numel() == 0:
                return
        self.act_sum.index_add_(0, f, v.double())
        self.act_max.scatter_reduce_(0, f, v, "amax")
        self._update_hist(f, v)
        ctx, pos = ctx.to(self.device), pos.to(self.device)
        # the batch's contexts in increasing id order, a column each of the top-k merge (a unique
        # over the tokens, not over the entries)
        bctx, tok_col = torch.unique(ctx, return_inverse=True)
        col = tok_col[rows]
        # the merge holds a [touched features, contexts] score matrix: a batch of many contexts
        # goes through in groups of contexts, in id order (so a tie still keeps the earlier one)
        step = self._ctx_chunk
        if bctx.numel() <= step:
            self._update_top(f, v, rows, col, bctx, ctx, pos)
            return
        for lo in range(0, bctx.numel(), step):
            sel = (col >= lo) & (col < lo + step)
            if bool(sel.any()):
                self._update_top(f[sel], v[sel], rows[sel], col[sel] - lo, bctx[lo:lo + step], ctx, pos)

    def _update_hist(self, f: torch.Tensor, v: torch.Tensor) -> None:
        n = self.n_bins
        cells = value_cells(v, self.r)
        new_top = self.top_cell.clone().scatter_reduce_(0, f, cells, "amax")
        rose = (new_top > self.top_cell).nonzero()[:, 0]
        if rose.numel():
            self.hist[rose] = slide_hist(self.hist[rose], new_top[rose] - self.top_cell[rose])
            self.top_cell[rose] = new_top[rose]
        slot = (cells - self.top_cell[f] + (n - 1)).clamp(0, n - 1)
        self.hist.view(-1).index_add_(0, f * n + slot, torch.ones_like(f))

    def _update_top(self, f, v, rows, col, bctx, ctx, pos) -> None:
        """Merge entries (feature f, value v, token row) into the top-k; col is each entry's
        column in bctx, the group of contexts merged."""
        k, dev, inf = self.k, self.device, float("-inf")
        B = bctx.numel()
        # the touched features, a row each, found with a mark over d_sae instead of a sort of the entries
        mark = torch.zeros(self.d_sae, dtype=torch.bool, device=dev)
        mark[f] = True
        feats = mark.nonzero()[:, 0]
        m = feats.numel()
        row_of = torch.empty(self.d_sae, dtype=torch.int64, device=dev)
        row_of[feats] = torch.arange(m, device=dev)
        r = row_of[f]
        # [touched features, batch contexts]: the feature's max activation in the context (its
        # score there), -inf where it did not fire
        cand = torch.full((m * B, ), inf, device=dev).scatter_reduce_(0, r * B + col, v, "amax").view(m, B)
        # merge with one stable sort of [touched, k + B]: the old top-k first, then the batch's
        # contexts in id order, so a tie keeps the earlier context
        all_s = torch.cat([self.top_score[feats], cand], 1)
        order = torch.sort(all_s, dim=1, descending=True, stable=True).indices[:, :k]
        new_s = all_s.gather(1, order)
        new_c = torch.cat([self.top_ctx[feats], bctx.expand(m, B)], 1).gather(1, order)
        new_c[new_s == inf] = -1  # a context where the feature did not fire never enters
        self.top_score[feats] = new_s
        self.top_ctx[feats] = new_c
        if not self.keep_acts:
            return
        entered = (order >= k) & (new_s > inf)
        if not bool(entered.any()):
            return
        accepted = torch.zeros(m, B, dtype=torch.bool, device=dev)
        er = torch.arange(m, device=dev)[:, None].expand_as(order)[entered]
        accepted[er, order[entered] - k] = True
        e = accepted[r, col]
        self._kept.append((f[e], ctx[rows[e]], pos[rows[e]], v[e]))
        self._kept_n += int(e.sum())
        if self._kept_n > self._prune_at:
            self._prune()

    # ---------------------------------------------------------------- results
    def _pair_keys(self, f: torch.Tensor, c: torch.Tensor, n_ctx: int) -> torch.Tensor:
        return f * n_ctx + c

    def _prune(self) -> None:
        """Drop the kept entries of pairs no longer in any top-k."""
        f, c, p, v = (torch.cat(t) for t in zip(*self._kept))
        n_ctx = int(max(int(c.max()), int(self.top_ctx.max()))) + 1
        live = self.top_ctx >= 0
        feats = torch.arange(self.d_sae, device=self.device)[:, None].expand_as(self.top_ctx)
        ok = torch.isin(self._pair_keys(f, c, n_ctx), self._pair_keys(feats[live], self.top_ctx[live], n_ctx))
        self._kept = [(f[ok], c[ok], p[ok], v[ok])]
        self._kept_n = int(ok.sum())
        # prune again once the survivors have doubled (amortised O(1) per kept entry)
        self._prune_at = max(self._prune_at, 2 * self._kept_n)

    def kept_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature, context, position, value) of every token on which a feature fired inside
        one of its current top contexts, sorted by (feature, context, position)."""
        if not self.keep_acts:
            raise ValueError("FeatureStats(keep_acts=False) keeps no per-token activations")
        if not self._kept:
            z = torch.zeros(0, dtype=torch.int64, device=self.device)
            return z, z, z, torch.zeros(0, device=self.device)
        self._prune()
        f, c, p, v = self._kept[0]
        n_ctx = int(c.max()) + 1 if c.numel() else 1
        n_pos = int(p.max()) + 1 if p.numel() else 1
        order = torch.sort((f * n_ctx + c) * n_pos + p).indices
        return f[order], c[order], p[order], v[order]

    def state(self) -> dict:
        """The statistics as CPU tensors (the kept entries not included)."""
        return {
            "n_tokens": self.n_tokens, "nonfinite": self.nonfinite, "fire_count": self.fire_count.cpu(),
            "act_sum": self.act_sum.cpu(), "act_max": self.act_max.cpu(), "hist": self.hist.cpu(),
            "top_cell": self.top_cell.cpu(), "top_score": self.top_score.cpu(), "top_ctx": self.top_ctx.cpu()
        }
