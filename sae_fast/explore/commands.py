"""The `sae-fast explore` and `sae-fast activations` subcommands (wired into sae_fast/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys

from ..dtypes import NAMES as DTYPE_NAMES
from ..hooks import SITES
from .run import DEFAULT_BATCH_SIZE, DEFAULT_CONTEXT_LENGTH, DEFAULT_LOGIT_K, DEFAULT_TOKENS, DEFAULT_TOP_K


def _int_at_least(lo: int):

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


_positive = _int_at_least(1)


def _add_common(p) -> None:
    p.add_argument(
        "--sae", required=True, metavar="DIR",
        help="the SAE or transcoder: a directory (SAELens / sae-fast train output, Gemma Scope 2 folder) "
        "or a params.npz / params.safetensors file")
    p.add_argument(
        "--model", default=None,
        help="hub name, local directory or .gguf file (default: the SAE's metadata model_name when it "
        "loads, else the embedded Gemma 3 270M)")
    p.add_argument("--layer", type=_int_at_least(0), default=None,
                   help="decoder layer the SAE reads (default: the hook point in the SAE's metadata)")
    p.add_argument("--site", choices=SITES, default=None,
                   help="with --layer: resid (decoder layer output), attn or mlp output (default resid)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--model-dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the LM")


def add_explore_parser(sub) -> None:
    e = sub.add_parser(
        "explore", help="feature dashboard: per-feature statistics and top-activating contexts over text",
        description="Stream text through a causal LM (up to the SAE's hook point) and the SAE's sparse encoder; "
        "keep per-feature firing frequency, mean and max activation, an activation histogram and the top-k "
        "contexts (every token's activation in them) on the device; compute each feature's logit-lens tokens; "
        "write a static HTML dashboard (index.html, feature_<j>.html) and stats.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(e)
    e.add_argument(
        "--data", action="append", default=None, metavar="PATH",
        help="text file, directory of .txt/.md files, or a saved `datasets` dataset; repeatable "
        "(default: the embedded text, Python's language reference)")
    e.add_argument("--text-column", default="text", help="column of a saved dataset holding the text")
    e.add_argument("--tokens", type=_positive, default=DEFAULT_TOKENS,
                   help="tokens to read (BOS excluded), rounded up to whole contexts; fewer if the data ends")
    e.add_argument("--top-k", type=_positive, default=DEFAULT_TOP_K, help="top contexts kept per feature")
    e.add_argument("--context-length", type=_int_at_least(2), default=DEFAULT_CONTEXT_LENGTH,
                   help="tokens per context, BOS included")
    e.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="contexts per model forward")
    e.add_argument("--logit-k", type=_int_at_least(0), default=DEFAULT_LOGIT_K,
                   help="logit-lens tokens per feature, each side (promoted, suppressed); 0: no logit lens")
    e.add_argument("--hist-bins", type=_int_at_least(2), default=40,
                   help="histogram bins per feature (log-spaced, ending at its max; the lowest bin holds the rest)")
    e.add_argument("--bins-per-octave", type=_positive, default=8, help="histogram bins per factor of 2")
    e.add_argument("--out", default="runs/explore", help="output directory: index.html, feature_<j>.html, stats.json")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_activations_parser(sub) -> None:
    a = sub.add_parser(
        "activations", help="the top SAE features of every token of a text (terminal, or an HTML page)",
        description="Run a text through a causal LM up to the SAE's hook point and the SAE's sparse encoder; print "
        "each token with its top features and their activations; --html also writes one self-contained page "
        "(tokens shaded by activation; hover or click a token for its features, click a feature to shade by it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("text", help="the text to run")
    _add_common(a)
    a.add_argument("--top", type=_positive, default=5, help="features shown per token")
    a.add_argument("--html", default=None, metavar="FILE", help="also write the page here")


# ------------------------------------------------------------------ running
def _setup(args, parser):
    """(sae, hook point, model, tokenizer, model name) from the common flags; bad input -> parser.error."""
    import torch

    from ..dtypes import DTYPES
    from ..hooks import HookPointError, hook_point_of
    from ..io import SAELoadError
    from ..train.trainer import pick_device
    from .run import load_model_for, load_sae

    if not os.path.exists(args.sae):
        parser.error(f"--sae: {args.sae!r} does not exist (expected an SAE directory or file)")
    if args.site is not None and args.layer is None:
        parser.error("--site needs --layer (without them the hook point comes from the SAE's metadata)")
    try:
        device = pick_device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device: {args.device!r} is not usable here ({e})")
    try:
        sae = load_sae(args.sae, device=device)
    except SAELoadError as e:
        parser.error(f"--sae: {e}")
    try:
        hp = hook_point_of(sae, layer=args.layer, site=args.site)
    except HookPointError as e:
        parser.error(f"--layer: {e}")
    sae.eval()
    try:
        model, tok, name = load_model_for(sae, args.model, device, DTYPES[args.model_dtype])
    except Exception as e:  # noqa: BLE001 (whatever the loader raises: the model named cannot be used)
        parser.error(f"--model: cannot load {args.model or 'the default model'!r}: {type(e).__name__}: {e}")
    try:
        hp.module(model)
    except HookPointError as e:
        parser.error(f"{'--layer' if args.layer is not None else '--sae (the hook point of its metadata)'}: {e}")
    return sae, hp, model, tok, name


def run_explore(args, parser) -> int:
    from ..train.config import EMBEDDED_TEXT
    from ..train.data import check_data_paths, iter_documents
    from .dashboard import write_dashboard
    from .run import explore, pack_texts

    data = args.data or [EMBEDDED_TEXT]
    try:
        check_data_paths(data, None)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--data: {e}")
    sae, hp, model, tok, name = _setup(args, parser)
    # one pass over the data (no cycling, unlike training's TokenStream: a repeated context
    # would show twice among a feature's top contexts)
    contexts = pack_texts(tok, iter_documents(data, None, "train", args.text_column), args.context_length)
    res = explore(sae, model, tok, contexts, hook_point=hp, tokens=args.tokens, top_k=args.top_k,
                  context_length=args.context_length, batch_size=args.batch_size, n_bins=args.hist_bins,
                  bins_per_octave=args.bins_per_octave, logit_k=args.logit_k, progress=not args.no_progress,
                  model_name=name)
    paths = write_dashboard(res, args.out)
    r = res.run
    if res.n_tokens < args.tokens:
        print(f"sae-fast explore: the data ended after {res.n_tokens} tokens (asked {args.tokens})", file=sys.stderr)
    print(f"dashboard: {paths['index_html']}")
    print(f"statistics: {paths['stats_json']}")
    print(f"{r['tokens']} tokens ({r['contexts']} contexts of {r['context_length']}) through {name} at "
          f"{r['hook_point']}: {r['tokens_per_s']:.0f} tokens/s, model {r['seconds_model']:.2f} s, SAE + statistics "
          f"{r['seconds_sae']:.2f} s ({r['sae_share']:.1%} of the two), logit lens {r['seconds_logit_lens']:.2f} s")
    dead = res.dead()
    print(f"{res.d_sae - len(dead)} of {res.d_sae} features fired in these {res.n_tokens} tokens, {len(dead)} did not "
          "(dead here)")
    for s in res.summary(5):
        print(f"  feature {s['feature']}: frequency {s['frequency']:.3%}, max {s['max']:.4g}, peaks on "
              f"{s['peak_token']!r} in {s['peak_share']:.0%} of its top contexts, top tokens {s['top_tokens']}, "
              f"logit lens {s['logit_top']}")
    return 0


def run_activations(args, parser) -> int:
    from .activations import activations_html, format_activations, token_activations

    if not args.text:
        parser.error("text: expected a non-empty text to run")
    sae, hp, model, tok, name = _setup(args, parser)
    toks = token_activations(sae, model, tok, args.text, hook_point=hp)
    line = f"model {name} · hook {hp.name} · {type(sae).__name__} d_sae={sae.d_sae} · {len(toks)} tokens"
    print(format_activations(toks, args.top, header=line))
    if args.html:
        d = os.path.dirname(os.path.abspath(args.html))
        os.makedirs(d, exist_ok=True)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(activations_html(toks, args.top, title=f"SAE activations: {args.text[:60]}", run_line=line))
        print(f"wrote {os.path.abspath(args.html)}")
    return 0


def run_command(args, parser) -> int:
    """Dispatch `explore` / `activations` (called by sae_fast.cli.main)."""
    return run_explore(args, parser) if args.command == "explore" else run_activations(args, parser)
