"""`sae-fast activations`: which features fire on each token of a text.

    toks = token_activations(sae, model, tokenizer, "The quick brown fox")
    print(format_activations(toks, top=5))
    open("acts.html", "w").write(activations_html(toks, top=5))
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import torch

from ..hooks import HookPoint, hook_point_of, run_until
from ..sparse import valid_slots
from .dashboard import _CSS, _RGB, _fmt, _num, show_token
from .run import TokenText, model_device, read_mask


@dataclass
class TokenFeatures:
    """One token of the text: its position, id and text; whether the SAE reads it (not BOS); and
    every feature that fired on it as (index, activation), largest first."""

    position: int
    id: int
    text: str
    read: bool
    features: list[tuple[int, float]]


@torch.no_grad()
def token_activations(sae, model, tokenizer, text: str, *,
                      hook_point: HookPoint | str | None = None) -> list[TokenFeatures]:
    """Tokenize `text` (BOS first, as explore's contexts), run the model up to the SAE's hook point
    and the sparse encoder on every token but BOS."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    hp = hook_point_of(sae) if hook_point is None else (
        HookPoint.parse(hook_point) if isinstance(hook_point, str) else hook_point)
    bos = tokenizer.bos_token_id
    ids = torch.tensor([([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]])
    keep = read_mask(ids, tokenizer)[0]
    x = run_until(model, hp, ids.to(model_device(model)))
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"the SAE reads d_in={sae.d_in} but {hp.name} of the model gives {x.shape[-1]}: the SAE "
                         f"belongs to another model or hook point (choose them with --model / --layer)")
    sp = sae.encode_sparse(x[0][keep.to(x.device)].to(device=sae.device, dtype=sae.dtype))
    valid = valid_slots(sp.indices, sp.counts).cpu()
    idx, val = sp.indices.cpu(), sp.values.float().cpu()
    texts = TokenText(tokenizer)(ids[0].tolist())
    out, r = [], 0
    for p in range(ids.shape[1]):
        feats: list[tuple[int, float]] = []
        if keep[p]:
            row = sorted(zip(idx[r][valid[r]].tolist(), val[r][valid[r]].tolist()), key=lambda t: (-t[1], t[0]))
            feats = [(int(j), float(v)) for j, v in row]
            r += 1
        out.append(TokenFeatures(p, int(ids[0, p]), texts[p], bool(keep[p]), feats))
    return out


def format_activations(toks: list[TokenFeatures], top: int = 5, header: str | None = None) -> str:
    """One line per token: position, the token (Python repr, so spaces and newlines show), then its
    top features as index=activation, largest first."""
    width = min(max((len(repr(t.text)) for t in toks), default=5), 24)
    lines = [header] if header else []
    lines.append(f"{'pos':>4}  {'token':<{width}}  top {top} features (feature=activation)")
    for t in toks:
        if not t.read:
            what = "(BOS: not read by the SAE)"
        elif not t.features:
            what = "(no feature fired)"
        else:
            what = "  ".join(f"{j}={v:.4g}" for j, v in t.features[:top])
        lines.append(f"{t.position:>4}  {repr(t.text):<{width}}  {what}")
    return "\n".join(lines)


_JS = """
const toks = Array.from(document.querySelectorAll('#text .tok'));
const info = document.getElementById('info');
const gmax = parseFloat(document.getElementById('text').dataset.max) || 1;
let pinned = null, chosen = null;
function feats(s) { return JSON.parse(s.dataset.feats); }
function shade() {
  let m = gmax;
  if (chosen !== null) {
    m = 0;
    for (const s of toks) for (const [j, v] of feats(s)) if (j === chosen && v > m) m = v;
  }
  for (const s of toks) {
    let v = parseFloat(s.dataset.act);
    if (chosen !== null) { v = 0; for (const [j, a] of feats(s)) if (j === chosen) v = a; }
    s.style.background = 'rgba(RGB, ' + (m > 0 ? Math.min(v / m, 1) : 0).toFixed(3) + ')';
  }
  document.getElementById('mode').textContent = chosen === null ?
    'shading: each token\\'s top activation' : 'shading: feature ' + chosen + ' (click it again for all)';
}
function show(s) {
  const f = feats(s), top = parseInt(info.dataset.top);
  let h = '<b>token ' + s.dataset.pos + '</b> ' + s.innerHTML + '<br>';
  if (s.dataset.read === '0') h += 'BOS: not read by the SAE';
  else if (!f.length) h += 'no feature fired';
  else h += f.slice(0, top).map(([j, v]) => '<a href="#" data-j="' + j + '">' + j + '</a> ' + v.toPrecision(4))
    .join('<br>') + (f.length > top ? '<br>(' + f.length + ' fired)' : '');
  info.innerHTML = h;
  info.querySelectorAll('a[data-j]').forEach(a => a.addEventListener('click', e => {
    e.preventDefault(); const j = parseInt(a.dataset.j); chosen = chosen === j ? null : j; shade(); }));
}
toks.forEach(s => {
  s.addEventListener('mouseenter', () => { if (pinned === null) show(s); });
  s.addEventListener('click', () => { pinned = pinned === s ? null : s; show(s); });
});
shade();
""".replace("RGB", _RGB)


def activations_html(toks: list[TokenFeatures], top: int = 5, title: str = "SAE activations",
                     run_line: str = "") -> str:
    """One self-contained page: the text's tokens shaded by their top activation; hovering a token
    (clicking pins it) lists its top features; clicking a feature there shades every token by it."""
    gmax = max((t.features[0][1] for t in toks if t.features), default=0.0)
    spans = []
    for t in toks:
        act = t.features[0][1] if t.features else 0.0
        a = min(max(act / gmax, 0.0), 1.0) if gmax > 0 and act == act else 0.0
        data = html.escape(json.dumps([[j, _num(v)] for j, v in t.features], allow_nan=False), quote=True)
        val = _num(act)
        spans.append(f'<span class="tok" data-pos="{t.position}" data-read="{int(t.read)}" '
                     f'data-act="{0 if val is None else val:.6g}" data-feats="{data}" '
                     f'style="background: rgba({_RGB}, {a:.3f})" title="{_fmt(act)}">{show_token(t.text)}</span>')
    body = (f"<h1>{html.escape(title)}</h1><p class=\"run\">{html.escape(run_line)}</p>"
            f'<p class="run" id="mode"></p><div id="text" class="ctx" data-max="{gmax:.6g}">{"".join(spans)}</div>'
            f'<div id="info" class="ctx" data-top="{int(top)}">hover a token (click to pin it)</div>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS} #text {{ font-size: 1.05em; }}</style></head><body>\n{body}\n<script>{_JS}</script>"
            "</body></html>\n")
