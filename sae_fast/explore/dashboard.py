"""The static dashboard of `sae-fast explore`: index.html, feature_<j>.html and stats.json.

Self-contained (inline CSS, SVG and JavaScript; no external asset, no network): open index.html
from the disk. Every token string is HTML-escaped; stats.json is strict JSON (NaN/inf -> null).
"""

from __future__ import annotations

import html
import json
import math
import os

from .run import ExploreResult

FORMAT = "sae_fast.explore/1"
# the shading colour of an activation (orange), alpha = activation / the feature's max
_RGB = "255, 110, 0"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
a { color: #0645ad; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
th[data-k] { cursor: pointer; user-select: none; } th[data-k]:hover { background: #eee; }
tr:nth-child(even) { background: #f7f7f7; }
.run { color: #555; font-size: 0.9em; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.9; margin: 0.2em 0 0.8em;
       padding: 0.3em; border: 1px solid #ddd; border-radius: 4px; white-space: pre-wrap; word-break: break-all; }
.tok { border-right: 1px solid #e4e4e4; padding: 1px 0; }
.tok.peak { outline: 1px solid #c33; }
.toks { font-family: ui-monospace, monospace; white-space: pre; }
.neg { color: #a33; } .pos { color: #262; }
#q { width: 24em; padding: 4px; margin: 0.5em 0; }
"""


# ------------------------------------------------------------------ values
def _num(v, digits: int = 6):
    """A float rounded to `digits` significant digits for JSON/HTML; None for NaN/inf."""
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _fmt(v, digits: int = 4) -> str:
    v = _num(v, digits)
    return "–" if v is None else f"{v:.{digits}g}"


def show_token(t: str) -> str:
    """A token's text for display, escaped: newlines and tabs made visible."""
    return html.escape(t.replace("\n", "⏎").replace("\t", "⇥"), quote=True)


def token_span(tok: str, act: float, scale: float, peak: bool = False, extra: str = "") -> str:
    """<span class="tok" data-act="..." style="background: rgba(..., a)">token</span>,
    a = act / scale (the feature's maximum), clamped to [0, 1]."""
    a = 0.0 if scale <= 0 or not math.isfinite(act) else min(max(act / scale, 0.0), 1.0)
    val = _num(act)
    cls = "tok peak" if peak else "tok"
    return (f'<span class="{cls}" data-act="{"nan" if val is None else f"{val:.6g}"}" '
            f'style="background: rgba({_RGB}, {a:.3f})" title="{_fmt(act)}"{extra}>{show_token(tok)}</span>')


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body>\n{body}\n' + (f"<script>{script}</script>" if script else "") +
            "</body></html>\n")


def _run_line(run: dict) -> str:
    return html.escape(f"model {run.get('model')} · hook {run.get('hook_point')} · {run.get('sae_class')} "
                       f"d_in={run.get('d_in')} d_sae={run.get('d_sae')} · {run.get('tokens')} tokens in "
                       f"{run.get('contexts')} contexts · {_fmt(run.get('tokens_per_s', float('nan')))} tokens/s · "
                       f"model {_fmt(run.get('seconds_model', float('nan')))} s, SAE + statistics "
                       f"{_fmt(run.get('seconds_sae', float('nan')))} s")


# ------------------------------------------------------------------ JSON
def _feature_json(res: ExploreResult, j: int, examples: list[dict]) -> dict:
    alive = int(res.fire_count[j]) > 0
    top, bot = res.logit_tokens(j)
    return {
        "index": j, "fire_count": int(res.fire_count[j]), "frequency": _num(res.frequency()[j], 8),
        "mean": _num(res.mean()[j]), "max": _num(res.act_max[j]) if alive else None,
        "hist": {"edges": [_num(e) for e in res.hist_edges(j)], "counts": res.hist[j].tolist()} if alive else None,
        "top_contexts": [{
            "context": e["context"], "score": _num(e["score"]), "peak": e["peak"], "acts": [_num(a) for a in e["acts"]]
        } for e in examples],
        "logit_lens": {"top": [[t, _num(v)] for t, v in top], "bottom": [[t, _num(v)] for t, v in bot]}
    }


def _json_head(res: ExploreResult) -> dict:
    run = {k: (_num(v) if isinstance(v, float) else v) for k, v in res.run.items()}
    return {
        "format": FORMAT, "run": run, "n_tokens": res.n_tokens, "d_sae": res.d_sae, "dead": res.dead(), "histogram": {
            "n_bins": res.n_bins, "bins_per_octave": res.bins_per_octave,
            "doc": "log-spaced bins ending just above the feature's max: cell(v) = floor(log2(v) * bins_per_octave); "
            "bin 0 holds everything below bin 1"
        }
    }


def _contexts_json(res: ExploreResult, used) -> list[dict]:
    out = []
    for c in sorted(used):
        _pos, ids = res.context_tokens(c)
        out.append({"id": c, "ids": ids, "tokens": res.token_text(ids)})
    return out


def result_json(res: ExploreResult) -> dict:
    """The statistics for programs: the content of stats.json (schema in the README, `sae-fast explore`)."""
    features = [_feature_json(res, j, res.examples(j) if res.fire_count[j] > 0 else []) for j in range(res.d_sae)]
    used = {c["context"] for f in features for c in f["top_contexts"]}
    return {**_json_head(res), "features": features, "contexts": _contexts_json(res, used)}


def _dumps(v) -> str:
    # strict JSON: the values were mapped to None where not finite; allow_nan=False makes sure
    return json.dumps(v, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------ pages
def _hist_svg(edges: list[float], counts: list[int]) -> str:
    """Inline SVG bars of the non-empty range of a histogram, with its edge values."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return "<p>no activations</p>"
    lo, hi = nz[0], len(counts) - 1
    w, h, pad = 640, 140, 24
    n = hi - lo + 1
    bw = (w - 2 * pad) / n
    top = max(counts)
    bars = []
    for i in range(lo, hi + 1):
        bh = (h - 2 * pad) * counts[i] / top
        x = pad + (i - lo) * bw
        rng = f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])})"
        bars.append(f'<rect x="{x:.1f}" y="{h - pad - bh:.1f}" width="{max(bw - 1, 1):.1f}" height="{bh:.1f}" '
                    f'fill="rgb({_RGB})"><title>{rng}: {counts[i]}</title></rect>')
    labels = (f'<text x="{pad}" y="{h - 6}" font-size="11">{_fmt(edges[lo])}</text>'
              f'<text x="{w - pad}" y="{h - 6}" font-size="11" text-anchor="end">{_fmt(edges[hi + 1])}</text>'
              f'<text x="{pad}" y="{pad - 8}" font-size="11">max count {top}</text>')
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="activation histogram">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>{"".join(bars)}{labels}'
            "</svg>")


def feature_page(res: ExploreResult, j: int, examples: list[dict] | None = None) -> str:
    """The page of feature j: statistics, histogram, logit lens, top contexts shaded by activation
    (`examples`: res.examples(j), if already at hand)."""
    cnt = int(res.fire_count[j])
    freq, mean, mx = float(res.frequency()[j]), float(res.mean()[j]), float(res.act_max[j])
    prev = f' · <a href="feature_{j - 1}.html">← {j - 1}</a>' if j > 0 else ""
    nxt = f' · <a href="feature_{j + 1}.html">{j + 1} →</a>' if j + 1 < res.d_sae else ""
    nav = f'<p><a href="index.html">index</a>{prev}{nxt}</p>'
    parts = [nav, f"<h1>Feature {j}</h1>", f'<p class="run">{_run_line(res.run)}</p>']
    parts.append("<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>"
                                     for k, v in (("fired on", f"{cnt} of {res.n_tokens} tokens"),
                                                  ("frequency", f"{_fmt(100 * freq)}%"),
                                                  ("mean activation (when firing)", _fmt(mean)),
                                                  ("max activation", _fmt(mx) if cnt else "–"))) + "</table>")
    if cnt:
        parts.append("<h2>Activation histogram</h2>")
        parts.append(_hist_svg(res.hist_edges(j), res.hist[j].tolist()))
        parts.append(f'<p class="run">log-spaced bins, {res.bins_per_octave} per octave; the lowest bin holds '
                     f"every smaller activation</p>")
    else:
        parts.append(f"<p><b>Dead</b>: never fired in {res.n_tokens} tokens.</p>")
    top, bot = res.logit_tokens(j)
    parts.append("<h2>Logit lens</h2>")
    if top:
        parts.append('<p class="run">W_dec[j] · W_U (the output embedding; no final norm)</p><table><tr>'
                     "<th>promotes</th><th></th><th>suppresses</th><th></th></tr>" +
                     "".join(f'<tr><td class="toks">{show_token(a)}</td><td class="pos">{_fmt(av)}</td>'
                             f'<td class="toks">{show_token(b)}</td><td class="neg">{_fmt(bv)}</td></tr>'
                             for (a, av), (b, bv) in zip(top, bot)) + "</table>")
    elif res.logit is not None:
        parts.append("<p>computed for the features that fired only</p>")
    else:
        parts.append(f"<p>not available: {html.escape(str(res.logit_note))}</p>")
    if cnt:
        parts.append(f"<h2>Top {res.top_ctx.shape[1]} contexts</h2>")
        for r, ex in enumerate(res.examples(j) if examples is None else examples):
            spans = "".join(
                token_span(t, a, mx, i == ex["peak"]) for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])))
            parts.append(f'<div class="run">#{r + 1} · context {ex["context"]} · max {_fmt(ex["score"])}</div>'
                         f'<div class="ctx" data-context="{ex["context"]}">{spans}</div>')
    return _page(f"Feature {j}", "\n".join(parts))


_INDEX_JS = """
const tb = document.querySelector('#feats tbody');
let dir = {};
document.querySelectorAll('th[data-k]').forEach(th => th.addEventListener('click', () => {
  const k = th.dataset.k; dir[k] = -(dir[k] || (k === 'i' ? -1 : 1));
  const rows = Array.from(tb.rows);
  rows.sort((a, b) => dir[k] * (parseFloat(a.dataset[k]) - parseFloat(b.dataset[k])));
  rows.forEach(r => tb.appendChild(r));
}));
document.getElementById('q').addEventListener('input', e => {
  const q = e.target.value.toLowerCase();
  for (const r of tb.rows) r.style.display = !q || r.dataset.s.includes(q) ? '' : 'none';
});
"""


def index_page(res: ExploreResult, top_tokens: dict[int, list[str]] | None = None) -> str:
    """Every feature (sortable by frequency, max and mean; searchable by its top tokens and logit-lens
    tokens) and the list of dead features (`top_tokens`: each feature's, if already at hand)."""
    freq, mean = res.frequency(), res.mean()
    order = sorted(range(res.d_sae), key=lambda j: (-int(res.fire_count[j]), j))
    rows = []
    for j in order:
        cnt = int(res.fire_count[j])
        toks = (top_tokens[j] if top_tokens is not None else res.top_tokens(j)) if cnt else []
        lt = [t for t, _ in res.logit_tokens(j)[0][:5]]
        search = html.escape(" ".join(toks + lt).lower(), quote=True)
        f, m, a = float(freq[j]), float(res.act_max[j]), _num(mean[j])
        rows.append(
            f'<tr data-i="{j}" data-f="{f:.8g}" data-m="{m:.6g}" data-a="{0 if a is None else a:.6g}" '
            f'data-s="{search}">'
            f'<td><a href="feature_{j}.html">{j}</a></td><td>{_fmt(100 * f)}%</td><td>{_fmt(m) if cnt else "–"}</td>'
            f'<td>{_fmt(mean[j])}</td><td class="toks">{" · ".join(show_token(t) for t in toks)}</td>'
            f'<td class="toks">{" · ".join(show_token(t) for t in lt)}</td></tr>')
    dead = res.dead()
    body = [
        "<h1>SAE features</h1>", f'<p class="run">{_run_line(res.run)}</p>',
        f"<p>{res.d_sae - len(dead)} of {res.d_sae} features fired in these {res.n_tokens} tokens; {len(dead)} did "
        "not (dead here: a feature rarer than that may only not have come up). Click a column to sort; "
        "type to search the top tokens. Data for programs: <a href=\"stats.json\">stats.json</a>.</p>",
        '<input id="q" placeholder="search top tokens / logit-lens tokens" autocomplete="off">',
        '<table id="feats"><thead><tr><th data-k="i">feature</th><th data-k="f">frequency ▾</th>'
        '<th data-k="m">max act</th><th data-k="a">mean act</th><th>top activating tokens</th>'
        "<th>logit lens (promotes)</th></tr></thead><tbody>", *rows, "</tbody></table>",
        f'<h2 id="dead">Dead features ({len(dead)}): no firing in these {res.n_tokens} tokens</h2>',
        "<p>" + (", ".join(f'<a href="feature_{j}.html">{j}</a>' for j in dead) or "none") + "</p>"
    ]
    return _page("SAE features", "\n".join(body), _INDEX_JS)


def write_dashboard(res: ExploreResult, out_dir) -> dict:
    """Write index.html, feature_<j>.html for every feature and stats.json (strict JSON) to out_dir.
    Returns {"out_dir", "index_html", "stats_json"} (absolute paths)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    tops, used = {}, set()
    sp = os.path.join(out_dir, "stats.json")
    # stats.json is written feature by feature: the whole document of a wide SAE (every top
    # context's activations) need not sit in memory at once
    with open(sp, "w", encoding="utf-8") as fj:
        fj.write(_dumps(_json_head(res))[:-1] + ',"features":[')
        for j in range(res.d_sae):
            exs = res.examples(j) if res.fire_count[j] > 0 else []
            fj.write(("," if j else "") + _dumps(_feature_json(res, j, exs)))
            used.update(e["context"] for e in exs)
            tops[j] = res.top_tokens(j, examples=exs)
            with open(os.path.join(out_dir, f"feature_{j}.html"), "w", encoding="utf-8") as f:
                f.write(feature_page(res, j, exs))
        fj.write('],"contexts":' + _dumps(_contexts_json(res, used)) + "}")
    ip = os.path.join(out_dir, "index.html")
    with open(ip, "w", encoding="utf-8") as f:
        f.write(index_page(res, tops))
    return {"out_dir": out_dir, "index_html": ip, "stats_json": sp}
