"""explore(): stream text through a causal LM (up to the SAE's hook point) and the SAE's sparse
encoder, keeping per-feature statistics and top contexts on the device (`FeatureStats`).

    res = explore(sae, model, tokenizer, texts_or_stream, tokens=20_000)
    index_html = write_dashboard(res, "out")          # sae_fast.explore.dashboard
    res.summary(5)                                     # a few features with their top tokens
"""

from __future__ import annotations

import bisect
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..hooks import HookPoint, hook_point_of, run_until
from .stats import FeatureStats, hist_edges

DEFAULT_TOP_K = 10
DEFAULT_CONTEXT_LENGTH = 64
DEFAULT_BATCH_SIZE = 8
DEFAULT_TOKENS = 20_000
DEFAULT_LOGIT_K = 10
# cap on one chunk of the logit lens: [features, vocab] float32 scores (Gemma's vocabulary is 262k)
_LOGIT_CHUNK_BYTES = 1 << 28


# ------------------------------------------------------------------- loading
def load_sae(path, *, device=None, backend: str = "auto"):
    """A JumpReLUSAE, or a JumpReLUTranscoder when the files hold one (explore reads it at its
    input hook); files that are neither: the SAE loader's SAELoadError (a missing path too)."""
    from ..io import SAELoadError
    from ..modules import JumpReLUSAE, JumpReLUTranscoder

    try:
        return JumpReLUSAE.from_pretrained(path, device=device, backend=backend)
    except SAELoadError as first:
        # a transcoder's files: the SAE loader refuses them ("this is a transcoder"), or, for a
        # params file without config.json whose d_out differs from d_in, fails on the shapes
        try:
            return JumpReLUTranscoder.from_pretrained(path, device=device, backend=backend)
        except SAELoadError:
            raise first from None


def model_candidates(sae, model: str | None) -> list[str]:
    """The models to try in order: `model` alone if given, else the SAE's metadata model_name (our
    runs record e.g. "embedded:gemma3-270m") and then the embedded default."""
    from ..train.config import EMBEDDED_MODEL

    if model is not None:
        return [model]
    named = (getattr(sae, "metadata", None) or {}).get("model_name")
    return [m for m in (named, EMBEDDED_MODEL) if m] if named != EMBEDDED_MODEL else [EMBEDDED_MODEL]


def load_model_for(sae, model: str | None, device: torch.device, dtype: torch.dtype = torch.float32, *, load=None,
                   err=None):
    """(model, tokenizer, name): the first of model_candidates(sae, model) that loads, each one
    that does not said on `err` (default stderr); the last one's failure is raised. `load`: the
    loader (sae_fast.train.data.load_model; tests pass another)."""
    from ..train.data import load_model

    load, err = load or load_model, err or sys.stderr
    candidates = model_candidates(sae, model)
    for i, name in enumerate(candidates):
        try:
            return (*load(name, device, dtype), name)
        except Exception as e:  # noqa: BLE001 (any loader failure means: not loadable here)
            if i == len(candidates) - 1:
                raise
            first_line = str(e).splitlines()[0] if str(e) else ""
            print(
                f"note: the SAE's model {name!r} does not load here ({type(e).__name__}: {first_line}); "
                f"using {candidates[i + 1]!r} (pass --model to choose)", file=err)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- token text
class TokenText:
    """Each token id's own text (the tokenizer's decode of that one id), cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            texts = self.tok.batch_decode([[i] for i in missing], clean_up_tokenization_spaces=False)
            self.cache.update(zip(missing, texts))
        return [self.cache[i] for i in ids]


# ---------------------------------------------------------------- contexts
def pack_texts(tokenizer, texts: Iterable[str], context_length: int) -> Iterator[torch.Tensor]:
    """Contexts [BOS, t1, ..., t_{L-1}] packed from the texts in order, one pass (the last,
    shorter context included)."""
    bos = tokenizer.bos_token_id
    body = context_length - (1 if bos is not None else 0)
    pending: list[int] = []

    def ctx(toks):
        return torch.tensor(([bos] if bos is not None else []) + toks, dtype=torch.long)

    for text in texts:
        pending.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(pending) >= body:
            yield ctx(pending[:body])
            pending = pending[body:]
    if pending:
        yield ctx(pending)


def _batches(data, tokenizer, context_length: int, batch_size: int, tokens: int | None) -> Iterator[torch.Tensor]:
    """[B, L] int64 batches from: a TokenStream (anything with .next(n); it cycles through its
    data, so `tokens` is required), a str or list of str (packed into contexts), or an iterable
    of [L] / [B, L] token id tensors."""
    if hasattr(data, "next") and callable(data.next):
        if tokens is None:
            raise ValueError("tokens is required with a TokenStream: it cycles through its data forever")
        while True:
            yield data.next(batch_size)
    if isinstance(data, str):
        data = [data]
    items = iter(data)
    first = next(items, None)
    if first is None:
        return
    if isinstance(first, str):
        items = pack_texts(tokenizer, itertools.chain([first], items), context_length)
    else:
        items = itertools.chain([first], items)
    pending: list[torch.Tensor] = []
    for t in items:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"data items must be texts or [L] / [B, L] integer token id tensors, got {got}")
        t = t.long()
        if t.dim() == 2:
            if pending:
                yield torch.stack(pending)
                pending = []
            yield t
            continue
        if pending and pending[0].shape != t.shape:
            yield torch.stack(pending)
            pending = []
        pending.append(t)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def read_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The positions an SAE reads: every one but BOS (as `sae-fast train` trains)."""
    bos = tokenizer.bos_token_id
    return ids != bos if bos is not None else torch.ones_like(ids, dtype=torch.bool)


# ---------------------------------------------------------------- logit lens
@torch.no_grad()
def logit_lens(sae, model, k: int, vocab_size: int | None = None, features: torch.Tensor | None = None):
    """(top_ids, top_vals, bottom_ids, bottom_vals), each [d_sae, k], of W_dec[j] @ W_Uᵀ with the
    model's output embedding W_U [vocab, d]; no final norm is applied (as the SAELens and
    Neuronpedia logit lens). `features`: compute only these rows (the others get ids -1 and NaN
    values). (None, the reason) when the decoder does not write the residual width or the model
    has no output embedding; else (the tuple, None)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or not hasattr(emb, "weight"):
        return None, f"{type(model).__name__} has no output embedding"
    W_U = emb.weight
    if vocab_size is not None:
        W_U = W_U[:vocab_size]  # rows past the tokenizer's vocabulary are padding
    W_dec = sae.W_dec
    if W_dec.shape[1] != W_U.shape[1]:
        return None, (f"the decoder writes d={W_dec.shape[1]} but the unembedding reads d={W_U.shape[1]}")
    d_sae = W_dec.shape[0]
    rows = torch.arange(d_sae) if features is None else features.cpu().long()
    k = min(k, W_U.shape[0])
    ids = [torch.full((d_sae, k), -1, dtype=torch.int64) for _ in range(2)]
    vals = [torch.full((d_sae, k), float("nan")) for _ in range(2)]
    # chunks of features: the [chunk, vocab] scores stay under _LOGIT_CHUNK_BYTES
    chunk = max(1, _LOGIT_CHUNK_BYTES // (4 * W_U.shape[0]))
    for s in range(0, rows.numel(), chunk):
        r = rows[s:s + chunk]
        scores = (W_dec[r.to(W_dec.device)].to(device=W_U.device, dtype=W_U.dtype) @ W_U.T).float()
        for side, largest in ((0, True), (1, False)):
            t = scores.topk(k, dim=1, largest=largest)
            ids[side][r], vals[side][r] = t.indices.cpu(), t.values.cpu()
    return (ids[0], vals[0], ids[1], vals[1]), None


# ------------------------------------------------------------------- result
@dataclass
class ExploreResult:
    """What explore() measured; CPU tensors. Per feature j: fire_count[j], act_sum[j], act_max[j],
    hist[j] (bins: hist_edges(j)), top_score[j] / top_ctx[j] (best first; ctx -1 and score -inf
    pad a feature with fewer than k firing contexts), the logit lens (None where it does not
    apply), and the token ids of every context that is someone's top context."""

    d_sae: int
    n_tokens: int
    n_bins: int
    bins_per_octave: int
    fire_count: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    hist: torch.Tensor
    top_cell: torch.Tensor
    top_score: torch.Tensor
    top_ctx: torch.Tensor
    contexts: dict[int, list[int]]
    token_text: TokenText
    bos_id: int | None
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (feature, ctx, pos, value), sorted
    logit: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    logit_note: str | None
    run: dict = field(default_factory=dict)

    def __post_init__(self):
        f, c, _p, _v = self.entries
        self._n_ctx = int(max([c.max().item() if c.numel() else 0, *self.contexts.keys(), 0])) + 1
        self._keys = f * self._n_ctx + c
        self._freq = self._mean = None

    # -------------------------------------------------------------- per feature
    def frequency(self) -> torch.Tensor:
        """Fraction of the tokens read on which each feature fired (float64 [d_sae])."""
        if self._freq is None:
            self._freq = self.fire_count.double() / max(self.n_tokens, 1)
        return self._freq

    def mean(self) -> torch.Tensor:
        """Mean activation over the tokens where the feature fired (NaN for a dead feature)."""
        if self._mean is None:
            self._mean = torch.where(self.fire_count > 0, self.act_sum / self.fire_count.clamp(min=1).double(),
                                     float("nan"))
        return self._mean

    def dead(self) -> list[int]:
        """Features that never fired."""
        return (self.fire_count == 0).nonzero()[:, 0].tolist()

    def hist_edges(self, j: int) -> list[float]:
        """Feature j's n_bins + 1 bin edges (stats.py: log-spaced, ending just above its maximum)."""
        return hist_edges(int(self.top_cell[j]), self.n_bins, self.bins_per_octave)

    def context_tokens(self, ctx: int) -> tuple[list[int], list[int]]:
        """(positions, token ids) of a kept context, BOS left out (the SAE does not read it)."""
        ids = self.contexts[ctx]
        pos = [i for i, t in enumerate(ids) if self.bos_id is None or t != self.bos_id]
        return pos, [ids[i] for i in pos]

    def examples(self, j: int) -> list[dict]:
        """Feature j's top contexts, best first: {"context", "score", "peak" (index into tokens),
        "tokens" (strings), "ids", "acts" (feature j's activation on every token)}."""
        out = []
        for slot in range(self.top_ctx.shape[1]):
            c = int(self.top_ctx[j, slot])
            if c < 0:
                break
            key = j * self._n_ctx + c
            lo = int(torch.searchsorted(self._keys, key))
            hi = int(torch.searchsorted(self._keys, key, right=True))
            pos, ids = self.context_tokens(c)
            at = {p: i for i, p in enumerate(pos)}
            acts = [0.0] * len(pos)
            for p, v in zip(self.entries[2][lo:hi].tolist(), self.entries[3][lo:hi].tolist()):
                if p in at:
                    acts[at[p]] = v
            peak = max(range(len(acts)), key=lambda i: acts[i]) if acts else 0
            out.append({
                "context": c, "score": float(self.top_score[j, slot]), "peak": peak, "tokens": self.token_text(ids),
                "ids": ids, "acts": acts
            })
        return out

    def top_tokens(self, j: int, n: int = 5, examples: list[dict] | None = None) -> list[str]:
        """The distinct tokens on which feature j peaks in its top contexts, best first
        (`examples`: feature j's, if already at hand)."""
        seen: list[str] = []
        for ex in self.examples(j) if examples is None else examples:
            t = ex["tokens"][ex["peak"]] if ex["tokens"] else ""
            if t not in seen:
                seen.append(t)
            if len(seen) == n:
                break
        return seen

    def logit_tokens(self, j: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(top, bottom) logit-lens tokens of feature j with their values; empty without a lens."""
        if self.logit is None:
            return [], []
        ti, tv, bi, bv = self.logit
        if ti[j, 0] < 0:  # not computed for this feature (a dead one)
            return [], []
        top = list(zip(self.token_text(ti[j].tolist()), tv[j].tolist()))
        bot = list(zip(self.token_text(bi[j].tolist()), bv[j].tolist()))
        return top, bot

    def summary(self, n: int = 5, *, max_frequency: float = 0.05, pool: int = 512) -> list[dict]:
        """A few live features worth a first look: index, frequency, max, top tokens, logit-lens top
        tokens, and `peak_share`, the share of its top contexts that peak on its most common peak
        token (`peak_token`).

        The most frequent features of a small SAE fire on nearly every token and peak on a medley
        of tokens, which says little; so the features firing on at most `max_frequency` of tokens
        (all live ones when none does) are ranked by peak_share, then by frequency (more evidence),
        among the `pool` most frequent of them, with one feature per peak token."""
        freq = self.frequency()
        live = self.fire_count > 0
        pick = live & (freq <= max_frequency)
        if not bool(pick.any()):
            pick = live
        cand = pick.nonzero()[:, 0]
        cand = cand[torch.argsort(self.fire_count[cand], descending=True, stable=True)[:pool]]
        ranked = []
        for j in cand.tolist():
            ex = self.examples(j)
            peaks = [e["tokens"][e["peak"]] if e["tokens"] else "" for e in ex]
            if not peaks:
                continue
            tok = max(dict.fromkeys(peaks), key=peaks.count)  # the first among the most common
            ranked.append((-peaks.count(tok) / len(peaks), -int(self.fire_count[j]), j, tok, ex))
        ranked.sort(key=lambda r: r[:3])
        out, shown = [], set()
        for neg_share, _, j, tok, ex in ranked:
            if tok in shown:
                continue
            shown.add(tok)
            out.append({
                "feature": j, "frequency": float(freq[j]), "max": float(self.act_max[j]),
                "top_tokens": self.top_tokens(j, examples=ex), "peak_token": tok, "peak_share": -neg_share,
                "logit_top": [t for t, _ in self.logit_tokens(j)[0][:5]]
            })
            if len(out) == n:
                break
        return out


# ------------------------------------------------------------------ explore
def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@torch.no_grad()
def explore(sae, model, tokenizer, data, *, hook_point: HookPoint | str | None = None, tokens: int | None = None,
            top_k: int = DEFAULT_TOP_K, context_length: int = DEFAULT_CONTEXT_LENGTH,
            batch_size: int = DEFAULT_BATCH_SIZE, n_bins: int = 40, bins_per_octave: int = 8,
            logit_k: int = DEFAULT_LOGIT_K, progress: bool = True, model_name: str | None = None) -> ExploreResult:
    """Stream `data` through `model` (run only up to the SAE's hook point) and `sae.encode_sparse`,
    and return the per-feature statistics (ExploreResult).

    data: a TokenStream (sae_fast.train.data; needs `tokens`), a text or list of texts (packed
    into contexts of `context_length` tokens, BOS first), or an iterable of [L] / [B, L] token id
    tensors. tokens: stop after this many tokens read by the SAE (BOS positions are not read),
    rounded up to whole contexts; None: until the data ends. hook_point: default the SAE's
    metadata (sae_fast.hooks.hook_point_of). batch_size: contexts per forward. top_k: contexts
    kept per feature. n_bins, bins_per_octave: the histogram (sae_fast/explore/stats.py).
    logit_k: logit-lens tokens kept per feature, each side (0: no logit lens)."""
    for name, v in (("top_k", top_k), ("context_length", context_length), ("batch_size", batch_size)):
        _check_positive(name, v)
    if isinstance(logit_k, bool) or not isinstance(logit_k, int) or logit_k < 0:
        raise ValueError(f"logit_k must be an int >= 0 (0: no logit lens), got {logit_k!r}")
    if tokens is not None:
        _check_positive("tokens", tokens)
    if context_length < 2 and tokenizer.bos_token_id is not None:
        raise ValueError(f"context_length must be at least 2 (BOS and one token), got {context_length}")
    hp = hook_point_of(sae) if hook_point is None else (
        HookPoint.parse(hook_point) if isinstance(hook_point, str) else hook_point)
    hp.module(model)  # a hook point the model lacks fails here, before any work
    mdev = model_device(model)
    stats = FeatureStats(sae.d_sae, top_k=top_k, n_bins=n_bins, bins_per_octave=bins_per_octave, device=sae.device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tokens, desc="sae-fast explore", unit="tok", unit_scale=True, dynamic_ncols=True,
                   file=sys.stderr)
    all_ctx: list[torch.Tensor] = []  # every context's token ids (int32, CPU): 4 bytes a token
    t_model = t_sae = 0.0
    n_ctx = 0
    t_start = time.perf_counter()
    try:
        for ids in _batches(data, tokenizer, context_length, batch_size, tokens):
            keep = read_mask(ids, tokenizer)
            if tokens is not None:
                # whole contexts, just enough to reach `tokens`
                need = tokens - stats.n_tokens
                per = keep.sum(1).cumsum(0)
                ids, keep = ids[:int((per < need).sum()) + 1], keep[:int((per < need).sum()) + 1]
            t0 = time.perf_counter()
            x = run_until(model, hp, ids.to(mdev))
            _sync(x)
            t1 = time.perf_counter()
            if x.shape[-1] != sae.d_in:
                raise ValueError(f"the SAE reads d_in={sae.d_in} but {hp.name} of the model gives "
                                 f"{x.shape[-1]}: the SAE belongs to another model or hook point "
                                 f"(choose them with --model / --layer)")
            kd = keep.to(x.device)
            rows = kd.nonzero()
            xs = x[kd].to(device=sae.device, dtype=sae.dtype)
            sp = sae.encode_sparse(xs)
            stats.update(sp, (rows[:, 0] + n_ctx).to(sae.device), rows[:, 1].to(sae.device))
            _sync(sp.values)
            t2 = time.perf_counter()
            t_model += t1 - t0
            t_sae += t2 - t1
            all_ctx.append(ids.to(torch.int32).cpu())
            n_ctx += ids.shape[0]
            if bar is not None:
                bar.update(int(keep.sum()))
            if tokens is not None and stats.n_tokens >= tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    if stats.n_tokens == 0:
        raise ValueError("explore read no tokens: the data is empty (or holds only BOS)")
    t0 = time.perf_counter()
    st = stats.state()
    entries = tuple(t.cpu() for t in stats.kept_entries())
    ids_all = torch.cat([c.reshape(-1, c.shape[-1]) for c in all_ctx]) if len({c.shape[-1] for c in all_ctx}) == 1 \
        else None
    winners = sorted(set(st["top_ctx"][st["top_ctx"] >= 0].tolist()))
    contexts = {}
    if ids_all is not None:
        for c in winners:
            contexts[c] = ids_all[c].tolist()
    else:  # contexts of different lengths: walk the batches
        starts, s = [], 0
        for c in all_ctx:
            starts.append(s)
            s += c.shape[0]

        for c in winners:
            b = bisect.bisect_right(starts, c) - 1
            contexts[c] = all_ctx[b][c - starts[b]].tolist()
    t_gather = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    # the features that fired only: the lens is a [features, vocab] GEMM (d_sae x 262k x d for
    # Gemma), and a dead feature's page has nothing to read it against
    fired = (st["fire_count"] > 0).nonzero()[:, 0]
    logit, note = logit_lens(sae, model, logit_k, vocab, fired) if logit_k else (None, "skipped (logit_k=0)")
    t_logit = time.perf_counter() - t0
    run = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "model_class": type(model).__name__, "hook_point": hp.name, "sae_class": type(sae).__name__, "d_in": sae.d_in,
        "d_sae": sae.d_sae, "sae_dtype": str(sae.dtype).removeprefix("torch."), "device": str(sae.device),
        "tokens": stats.n_tokens, "contexts": n_ctx, "context_length": int(max(c.shape[-1] for c in all_ctx)),
        "batch_size": batch_size, "top_k": top_k, "l0": float(st["fire_count"].sum()) / stats.n_tokens,
        "nonfinite_activations": stats.nonfinite, "seconds": wall, "seconds_model": t_model, "seconds_sae": t_sae,
        "sae_share": t_sae / max(t_model + t_sae, 1e-12), "tokens_per_s": stats.n_tokens / max(wall, 1e-12),
        "seconds_gather": t_gather, "seconds_logit_lens": t_logit, "logit_lens": note or
        "W_dec[j] @ W_U^T, no final norm, features that fired"
    }
    return ExploreResult(d_sae=sae.d_sae, n_tokens=stats.n_tokens, n_bins=n_bins, bins_per_octave=bins_per_octave,
                         fire_count=st["fire_count"], act_sum=st["act_sum"], act_max=st["act_max"], hist=st["hist"],
                         top_cell=st["top_cell"], top_score=st["top_score"], top_ctx=st["top_ctx"], contexts=contexts,
                         token_text=TokenText(tokenizer), bos_id=tokenizer.bos_token_id, entries=entries, logit=logit,
                         logit_note=note, run=run)


def explore_dashboard(sae, model, tokenizer, data, out_dir, *, n_summary: int = 5, **kw) -> dict:
    """explore() then write_dashboard(): {"index_html", "stats_json", "features": a few features with
    their top tokens, "run": the run record}. What `sae-fast train` calls at its end."""
    from .dashboard import write_dashboard

    res = explore(sae, model, tokenizer, data, **kw)
    paths = write_dashboard(res, out_dir)
    return {**paths, "features": res.summary(n_summary), "run": res.run}
