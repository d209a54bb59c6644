"""`sae-fast explore`'s statistics step against a dense baseline, and explore end to end.

    python -m benchmarks.bench_explore [--device cpu|cuda] [--d-in 640] [--d-sae 16384 65536]
        [--tokens 1024] [--context-length 64] [--l0 64] [--top-k 10] [--reps 20]
        [--e2e-tokens 8192] [--e2e-sae DIR] [--no-e2e]

1. The per-batch statistics step, side by side in one run, on a batch of `--tokens` activations
   (contexts of `--context-length`) with SAE parameters giving `--l0` (sae_fast.bench's Workload):
   - sparse (explore's): `encode_sparse` + FeatureStats.update (frequency, sum, max, histogram,
     top-k merge over the batch's sparse entries, and keeping the per-token activations of the
     contexts that enter a top-k);
   - sparse, scores only: the same without keeping those per-token activations (what the dense
     baseline does);
   - dense: dense `encode` -> [tokens, d_sae], then count/sum/max as column reductions, the
     histogram from its nonzeros, and torch.topk per feature over [d_sae, k + contexts] scores
     (each context's max per feature, [contexts, d_sae]).
   Every contender starts from the same state, is checked against the dense one over three
   batches, then timed: median of `--reps` runs after warm-ups, two rotated inputs.
2. explore() end to end on the embedded model (Gemma 3 270M, layer 6, the embedded text): its
   tokens/s and the share of time in the SAE (encode_sparse + statistics) against the model's
   forward, measured inside explore; with a random SAE of `--e2e-d-sae` features whose thresholds
   give `--l0` on the model's activations (or `--e2e-sae DIR`); median of `--e2e-reps` runs after
   one warm-up run.
Writes benchmarks/results/explore_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from sae_fast.bench.contenders import Shape, Workload
from sae_fast.explore.stats import FeatureStats, slide_hist, value_cells

from .common import environment, time_fn, write


class DenseStats(FeatureStats):
    """The dense baseline of FeatureStats.update: the same state and results from the dense
    [tokens, d_sae] activations (no per-token activations kept)."""

    def __init__(self, d_sae, **kw):
        super().__init__(d_sae, keep_acts=False, **kw)

    @torch.no_grad()
    def update_dense(self, acts: torch.Tensor, n_ctx: int, ctx0: int) -> None:
        """acts [n_ctx * L, d_sae], context by context."""
        n, k, nb = acts.shape[0], self.k, self.n_bins
        self.n_tokens += n
        on = acts > 0
        self.fire_count += on.sum(0)
        self.act_sum += acts.sum(0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, acts.amax(0))
        t, f = on.nonzero(as_tuple=True)
        cells = value_cells(acts[t, f], self.r)
        new_top = self.top_cell.clone().scatter_reduce_(0, f, cells, "amax")
        rose = (new_top > self.top_cell).nonzero()[:, 0]
        if rose.numel():
            self.hist[rose] = slide_hist(self.hist[rose], new_top[rose] - self.top_cell[rose])
            self.top_cell[rose] = new_top[rose]
        slot = (cells - self.top_cell[f] + (nb - 1)).clamp(0, nb - 1)
        self.hist.view(-1).index_add_(0, f * nb + slot, torch.ones_like(f))
        per_ctx = acts.view(n_ctx, -1, acts.shape[1]).amax(1)  # [contexts, d_sae]
        per_ctx = torch.where(per_ctx > 0, per_ctx, float("-inf"))
        ids = torch.arange(ctx0, ctx0 + n_ctx, device=acts.device).expand(acts.shape[1], n_ctx)
        scores = torch.cat([self.top_score, per_ctx.T], 1)
        top = torch.topk(scores, k, dim=1)
        self.top_ctx = torch.cat([self.top_ctx, ids], 1).gather(1, top.indices)
        self.top_score = top.values
        self.top_ctx[self.top_score == float("-inf")] = -1


def _check(dense: DenseStats, other: FeatureStats) -> float:
    """Largest relative difference of the compared statistics (exact ones must match exactly)."""
    assert torch.equal(dense.fire_count, other.fire_count), "fire counts differ"
    assert torch.equal(dense.hist, other.hist), "histograms differ"
    assert torch.equal(dense.top_cell, other.top_cell), "histogram ranges differ"
    fin = dense.top_score > float("-inf")
    assert torch.equal(fin, other.top_score > float("-inf")), "top-k slots differ"
    # a tie may order contexts differently; scores must agree, and the ids where scores are distinct
    torch.testing.assert_close(dense.top_score[fin], other.top_score[fin], rtol=1e-5, atol=1e-6)
    s = dense.top_score
    distinct = ((s[:, 1:] != s[:, :-1]) | (s[:, 1:] == float("-inf"))).all(1)
    assert torch.equal(dense.top_ctx[distinct], other.top_ctx[distinct]), "top contexts differ"
    err = 0.0
    for a, b in ((dense.act_max, other.act_max), (dense.act_sum, other.act_sum)):
        err = max(err, float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-12)).max()))
    return err


def _interleaved(steps: dict, inputs: list, warmup: int, reps: int) -> dict:
    """{name: time_fn's record} with the contenders' runs interleaved (rep by rep, round robin), so
    that a load change on the machine hits every contender alike; each run timed by time_fn."""
    for fn in steps.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    times = {name: [] for name in steps}
    for i in range(reps):
        for name, fn in steps.items():
            times[name].append(time_fn(fn, [inputs[i % len(inputs)]], warmup=0, reps=1)["median_s"])
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {
            "median_s": statistics.median(ts), "min_s": min(ts), "p25_s": q[0], "p75_s": q[2], "max_s": max(ts),
            "reps": reps
        }
    return out


def _indexed(fn, xs):
    return lambda i: fn(xs[i])


def stats_step(a, dev: torch.device) -> list[dict]:
    shape = Shape(a.d_in, a.d_sae, a.tokens, a.l0, a.dtype)
    wl = Workload(shape, dev, n_inputs=2)
    sae = wl.sae("auto")
    L = a.context_length
    if a.tokens % L:
        raise SystemExit(f"--tokens {a.tokens} must be a multiple of --context-length {L}")
    n_ctx = a.tokens // L
    ctx_l = torch.arange(n_ctx, device=dev).repeat_interleave(L)
    pos = torch.arange(L, device=dev).repeat(n_ctx)
    kw = dict(top_k=a.top_k, n_bins=40, bins_per_octave=8, device=dev)

    # each contender's state and its own context counter (ids keep rising, as in a stream)
    def sparse(state, encode=True):
        n = [0]

        def step(x):
            with torch.no_grad():
                sp = sae.encode_sparse(x) if encode else x
                state.update(sp, ctx_l + n[0], pos)
            n[0] += n_ctx

        return step

    def dense(state, encode=True):
        n = [0]

        def step(x):
            with torch.no_grad():
                state.update_dense(sae.encode(x) if encode else x, n_ctx, n[0])
            n[0] += n_ctx

        return step

    full = {
        "dense: encode + column stats + torch.topk": (lambda: DenseStats(a.d_sae, **kw), dense),
        "sparse: encode_sparse + FeatureStats.update (scores only)": (
            lambda: FeatureStats(a.d_sae, keep_acts=False, **kw), sparse),
        "sparse: encode_sparse + FeatureStats.update (explore's: keeps top-context activations)": (
            lambda: FeatureStats(a.d_sae, **kw), sparse),
    }
    # correctness: three batches into fresh states (the third input repeats the first, scaled, so
    # the maxima rise and histograms slide), compared with the dense baseline
    inputs = wl.xs + [wl.xs[0] * 1.5]
    states = {}
    for name, (make, stepper) in full.items():
        st = make()
        fn = stepper(st)
        for x in inputs:
            fn(x)
        states[name] = st
    base = states[next(iter(full))]
    with torch.no_grad():  # the L0 of the timed inputs (the third check input is scaled up)
        l0 = statistics.mean(float(sae.encode_sparse(x).counts.float().mean()) for x in wl.xs)
    errs = {name: _check(base, st) for name, st in states.items()}
    timed = _interleaved({name: stepper(make()) for name, (make, stepper) in full.items()}, wl.xs, 3, a.reps)
    rows = [{"part": "step", "contender": name, "max_rel_err_vs_dense": errs[name], "correct": True, **timed[name]}
            for name in full]
    # the statistics alone, on the encoders' outputs computed beforehand (the step minus its encoder)
    with torch.no_grad():
        dense_in = [sae.encode(x) for x in wl.xs]
        sparse_in = [sae.encode_sparse(x) for x in wl.xs]
    stats_only = {
        "dense: column stats + torch.topk on [tokens, d_sae]": (dense(DenseStats(a.d_sae, **kw),
                                                                      encode=False), dense_in),
        "sparse: FeatureStats.update (scores only)": (sparse(FeatureStats(a.d_sae, keep_acts=False, **kw),
                                                             encode=False), sparse_in),
        "sparse: FeatureStats.update (explore's)": (sparse(FeatureStats(a.d_sae, **kw), encode=False), sparse_in),
    }
    # the inputs are indices into each contender's own precomputed outputs
    timed = _interleaved({name: _indexed(fn, xs) for name, (fn, xs) in stats_only.items()}, [0, 1], 3, a.reps)
    rows += [{"part": "statistics only", "contender": name, "correct": True, **timed[name]} for name in stats_only]
    for part in ("step", "statistics only"):
        base_s = next(r["median_s"] for r in rows if r["part"] == part)
        for r in rows:
            if r["part"] == part:
                r["speedup_vs_dense"] = base_s / r["median_s"]
    for r in rows:
        r["tokens_per_s"] = a.tokens / r["median_s"]
        r.update(d_in=a.d_in, d_sae=a.d_sae, tokens=a.tokens, measured_l0=l0, backend=sae.resolved_backend())
    return rows


# ------------------------------------------------------------------ end to end
def _random_sae(model, tok, hp, d_sae: int, l0: int, data, context_length: int, dev):
    """A random SAE (unit decoder rows, W_enc = W_decᵀ) whose thresholds put each feature's
    firing rate at l0 / d_sae on the model's activations (the order statistic of a sample)."""
    from sae_fast import JumpReLUSAE
    from sae_fast.explore.run import _batches
    from sae_fast.hooks import run_until

    xs, n = [], 0
    for ids in _batches(data, tok, context_length, 8, None):
        x = run_until(model, hp, ids.to(dev))[:, 1:]
        xs.append(x.reshape(-1, x.shape[-1]).float())
        n += xs[-1].shape[0]
        if n >= 4096:
            break
    x = torch.cat(xs)
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, x.shape[1], generator=g).to(dev)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    pre = x @ W_dec.T
    m = max(1, round(x.shape[0] * l0 / d_sae))
    thr = pre.kthvalue(x.shape[0] - m, dim=0).values
    sae = JumpReLUSAE.from_params(
        {
            "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae, device=dev), "threshold": thr, "W_dec": W_dec,
            "b_dec": torch.zeros(x.shape[1], device=dev)
        }, device=dev)
    sae.metadata = {"hf_hook_point_in": hp.name}
    return sae


def end_to_end(a, dev: torch.device) -> dict:
    from sae_fast.explore import explore, load_sae
    from sae_fast.explore.run import pack_texts
    from sae_fast.hooks import HookPoint, hook_point_of
    from sae_fast.train.config import EMBEDDED_MODEL, EMBEDDED_TEXT
    from sae_fast.train.data import iter_documents, load_model

    model_name = a.e2e_model or EMBEDDED_MODEL
    model, tok = load_model(model_name, dev, torch.float32)
    data = a.e2e_data or [EMBEDDED_TEXT]
    texts = lambda: iter_documents(data, None, "train", "text")  # noqa: E731
    if a.e2e_sae:
        sae = load_sae(a.e2e_sae, device=dev)
        hp = hook_point_of(sae)
        what = f"{a.e2e_sae} (d_sae {sae.d_sae})"
    else:
        hp = HookPoint.of_site(a.e2e_layer, "resid")
        sae = _random_sae(model, tok, hp, a.e2e_d_sae, a.l0, texts(), a.context_length, dev)
        what = f"random, d_sae {sae.d_sae}, thresholds for L0 {a.l0}"

    def run(tokens):
        return explore(sae, model, tok, pack_texts(tok, texts(), a.context_length), hook_point=hp, tokens=tokens,
                       context_length=a.context_length, batch_size=a.e2e_batch_size, top_k=a.top_k, logit_k=0,
                       progress=False, model_name=model_name).run

    run(min(a.e2e_tokens, 4 * a.context_length))  # warm-up
    runs = []
    for _ in range(a.e2e_reps):
        r = run(a.e2e_tokens)
        runs.append(r)
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {
        "model": model_name, "hook_point": hp.name, "sae": what, "d_sae": sae.d_sae, "tokens": runs[0]["tokens"],
        "context_length": a.context_length, "batch_size": a.e2e_batch_size, "reps": a.e2e_reps,
        "tokens_per_s": med("tokens_per_s"), "seconds": med("seconds"), "seconds_model": med("seconds_model"),
        "seconds_sae": med("seconds_sae"), "sae_share": med("sae_share"), "measured_l0": runs[0]["l0"],
        "runs": [{k: r[k]
                  for k in ("tokens_per_s", "seconds", "seconds_model", "seconds_sae", "sae_share")} for r in runs]
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-in", type=int, default=640, help="input width (Gemma 3 270M: 640)")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536], help="dictionary widths")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per batch (contexts x context length)")
    ap.add_argument("--context-length", type=int, default=64, help="tokens per context")
    ap.add_argument("--l0", type=int, default=64, help="target active features per token")
    ap.add_argument("--top-k", type=int, default=10, help="top contexts per feature")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per contender")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run")
    ap.add_argument("--e2e-model", default=None, help="model of the end-to-end run (default: the embedded model)")
    ap.add_argument("--e2e-data", action="append", default=None, help="text of the end-to-end run (default embedded)")
    ap.add_argument("--e2e-sae", default=None, help="SAE directory (default: a random SAE, see --e2e-d-sae)")
    ap.add_argument("--e2e-layer", type=int, default=6, help="layer of the random SAE")
    ap.add_argument("--e2e-d-sae", type=int, default=16384, help="width of the random SAE")
    ap.add_argument("--e2e-tokens", type=int, default=8192, help="tokens per end-to-end run")
    ap.add_argument("--e2e-batch-size", type=int, default=8, help="contexts per forward")
    ap.add_argument("--e2e-reps", type=int, default=3, help="end-to-end runs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="result name (default explore_<device>)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    # the machine's load before and after: other processes on the cores slow every contender
    load_before = os.getloadavg()
    rows = []
    for d_sae in a.d_sae:
        rows += stats_step(argparse.Namespace(**{**vars(a), "d_sae": d_sae}), dev)
    e2e = None if a.no_e2e else end_to_end(a, dev)
    env = environment()
    env["load_average_1_5_15_min"] = {"before": list(load_before), "after": list(os.getloadavg())}
    cfg = {
        k: getattr(a, k)
        for k in ("device", "d_in", "d_sae", "tokens", "context_length", "l0", "top_k", "dtype", "reps", "e2e_tokens",
                  "e2e_d_sae", "e2e_reps")
    }
    md = [
        f"# explore: statistics step, sparse vs dense ({env['device']}, {env['cpu_threads']} threads)", "",
        f"One batch of {a.tokens} tokens ({a.tokens // a.context_length} contexts of {a.context_length}), d_in "
        f"{a.d_in}, target L0 {a.l0}, top-k {a.top_k}, 40 histogram bins, {a.dtype}; median of {a.reps} runs after 3 "
        f"warm-ups, 2 rotated inputs, the contenders' runs interleaved; every contender checked against the dense "
        f"one first; statistics only: the same step on the encoders' outputs computed beforehand. "
        f"Load average (1 min) before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}. "
        f"torch {env['torch']}, sae_fast {env['sae_fast']}, commit {env['commit'][:12]}, {env['date']}.", "",
        "| d_sae | part | contender | median ms | p25–p75 ms | tokens/s | speedup vs dense | correct |",
        "|---|---|---|---|---|---|---|---|"
    ]
    for r in rows:
        md.append(f"| {r['d_sae']} (L0 {r['measured_l0']:.0f}) | {r['part']} | {r['contender']} | "
                  f"{r['median_s'] * 1e3:.2f} | {r['p25_s'] * 1e3:.2f}–"
                  f"{r['p75_s'] * 1e3:.2f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_dense']:.2f}× | "
                  f"{'yes' if r['correct'] else 'NO'} |")
    md.append("")
    if e2e is not None:
        md += [
            "## explore end to end", "",
            f"{e2e['model']} at {e2e['hook_point']}, SAE {e2e['sae']}; {e2e['tokens']} tokens in contexts of "
            f"{e2e['context_length']}, {e2e['batch_size']} contexts per forward, no logit lens; median of "
            f"{e2e['reps']} runs after a warm-up, timed inside explore.", "",
            f"- {e2e['tokens_per_s']:.0f} tokens/s ({e2e['seconds']:.2f} s), measured L0 {e2e['measured_l0']:.1f}",
            f"- model forward (up to the hook): {e2e['seconds_model']:.2f} s; SAE encode_sparse + statistics: "
            f"{e2e['seconds_sae']:.2f} s = {e2e['sae_share']:.1%} of the two", ""
        ]
    text = "\n".join(md)
    print(text)
    rec = {"config": cfg, "environment": env, "stats_step": rows, "end_to_end": e2e}
    paths = write(a.out or f"explore_{dev.type}", rec, text)
    print("wrote", *paths)
    return rec


if __name__ == "__main__":
    main()
