"""`sae-fast explore` and `sae-fast activations` on a tiny Gemma 3 and a random SAE built here: the
streaming statistics against a dense reference, no dense [tokens, d_sae] tensor, the dashboard
files, strict JSON, the per-token CLI, and the CLI's errors."""

import html
import json
import random
import re

import pytest
import torch

import sae_fast
from sae_fast import JumpReLUSAE, JumpReLUTranscoder, reference
from sae_fast.cli import main
from sae_fast.explore import FeatureStats, explore, hist_edges, load_sae, write_dashboard
from sae_fast.hooks import HookPoint, run_until
from sae_fast.sparse import SparseActs
from sae_fast.train.data import TokenStream, iter_documents, load_model

from helpers import make_tiny_gemma3, write_word_tokenizer

transformers = pytest.importorskip("transformers")

HOOK = "model.layers.1.output"
D_SAE = 48
DEAD = (5, 31)  # features given an unreachable threshold
CTX = 16  # context length: BOS + 15 tokens the SAE reads
# words that must be escaped in HTML are tokens of their own
WORDS = [f"w{i}" for i in range(40)] + ["<", ">", "&", '"', "'"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Gemma3ForCausalLM with a word-level tokenizer, a text of random words (no context
    repeats, so top contexts have no ties) and a random SAE at HOOK whose thresholds sit at midpoints
    between observed pre-activations (no activation lies within rounding of its threshold)."""
    d = tmp_path_factory.mktemp("explore")
    rng = random.Random(1234)
    text = " ".join(rng.choice(WORDS) for _ in range(4000))
    vocab = write_word_tokenizer(d / "model", text)
    g = torch.Generator().manual_seed(0)
    make_tiny_gemma3(len(vocab), 3).save_pretrained(d / "model")
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_text(text)
    model, tok = load_model(str(d / "model"), torch.device("cpu"), torch.float32)
    sae = JumpReLUSAE(32, D_SAE, backend="auto")
    x = _read(model, tok, _contexts(d, tok, 30))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, D_SAE, generator=g) / 4)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        pre = (x @ sae.W_enc + sae.b_enc).sort(0).values
        q = torch.randint(int(0.55 * pre.shape[0]), int(0.95 * pre.shape[0]), (D_SAE, ), generator=g)
        ar = torch.arange(D_SAE)
        sae.threshold.copy_(((pre[q, ar] + pre[q + 1, ar]) / 2).clamp(min=1e-3))
        sae.threshold[list(DEAD)] = 1e9
    sae.metadata = {"hf_hook_point_in": HOOK, "model_name": str(d / "model")}
    sae.save_pretrained(d / "sae")
    return {"dir": d, "model": model, "tok": tok, "sae": JumpReLUSAE.from_pretrained(d / "sae")}


def _contexts(d, tok, n):
    return TokenStream(tok, lambda: iter_documents([str(d / "text")], None, "train", "text"), CTX).next(n)


def _read(model, tok, ids):
    """The activations at HOOK of every token but BOS, [n_ctx * (CTX - 1), 32]."""
    x = run_until(model, HookPoint.parse(HOOK), ids)
    return x[ids != tok.bos_token_id].reshape(-1, x.shape[-1])


def _dense_reference(tiny, n_ctx):
    """Dense acts [n_ctx, CTX - 1, d_sae] of the same contexts explore reads, by the reference formula."""
    sae = tiny["sae"]
    ids = _contexts(tiny["dir"], tiny["tok"], n_ctx)
    x = _read(tiny["model"], tiny["tok"], ids)
    acts = reference.jumprelu_encode(x, sae.W_enc, sae.b_enc, sae.threshold).detach()
    return ids, acts.reshape(n_ctx, CTX - 1, D_SAE)


def _no_dense(monkeypatch):
    """Any dense [tokens, d_sae] activation path of sae_fast fails while explore runs."""

    def refuse(*a, **k):
        raise AssertionError("explore formed a dense [tokens, d_sae] tensor")

    monkeypatch.setattr(JumpReLUSAE, "encode", refuse)
    monkeypatch.setattr(JumpReLUSAE, "forward", refuse)
    monkeypatch.setattr(SparseActs, "to_dense", refuse)
    monkeypatch.setattr(SparseActs, "from_dense", refuse)
    monkeypatch.setattr(sae_fast.ops, "jumprelu_encode", refuse)


def _hist_reference(vals, n_bins, r):
    """Bins of one feature's values: edges 0, 2^((T - n + 2)/r), ..., 2^((T + 1)/r), T the cell of the
    max, by comparing against the edges (independent of the streaming slide)."""
    T = int(torch.floor(torch.log2(vals.max().double()) * r))
    edges = torch.tensor(hist_edges(T, n_bins, r), dtype=torch.float64)
    slot = torch.bucketize(vals.double(), edges[1:n_bins], right=True)
    return T, torch.bincount(slot, minlength=n_bins)


def _check_against_dense(res, acts, ids, bos, k, n_bins, r):
    n_ctx = acts.shape[0]
    flat = acts.reshape(-1, D_SAE)
    fired = flat > 0
    n_tok = flat.shape[0]
    assert res.n_tokens == n_tok
    torch.testing.assert_close(res.fire_count, fired.sum(0))
    torch.testing.assert_close(res.frequency(), fired.sum(0).double() / n_tok)
    torch.testing.assert_close(res.act_max, flat.amax(0), rtol=1e-5, atol=1e-6)
    mean = flat.double().sum(0) / fired.sum(0).clamp(min=1)
    torch.testing.assert_close(res.mean()[fired.any(0)], mean[fired.any(0)], rtol=1e-5, atol=1e-6)
    assert res.dead() == (~fired.any(0)).nonzero()[:, 0].tolist()
    assert set(DEAD) <= set(res.dead()) and len(res.dead()) < D_SAE // 2
    per_ctx = acts.amax(1)  # [n_ctx, d_sae]: a context's score is the feature's max in it
    underflow_used = False
    for j in range(D_SAE):
        vals = flat[:, j][fired[:, j]]
        if vals.numel() == 0:
            assert res.top_ctx[j].eq(-1).all()
            continue
        T, counts = _hist_reference(vals, n_bins, r)
        assert int(res.top_cell[j]) == T
        assert res.hist[j].tolist() == counts.tolist(), j
        underflow_used |= bool(counts[0] > 0)
        # top-k: best score first, the earlier context on a tie; only contexts where j fired
        order = sorted(range(n_ctx), key=lambda c: (-float(per_ctx[c, j]), c))
        want = [c for c in order if per_ctx[c, j] > 0][:k]
        assert res.top_ctx[j][:len(want)].tolist() == want, j
        assert res.top_ctx[j][len(want):].eq(-1).all()
        exs = res.examples(j)
        assert [e["context"] for e in exs] == want
        for e in exs:
            c = e["context"]
            assert e["ids"] == ids[c][ids[c] != bos].tolist()
            torch.testing.assert_close(torch.tensor(e["acts"]), acts[c, :, j], rtol=1e-5, atol=1e-6)
            assert e["score"] == pytest.approx(float(per_ctx[c, j]), rel=1e-5)
            assert e["acts"][e["peak"]] == max(e["acts"])
    assert underflow_used  # the bins are narrow enough that some values land in slot 0


def test_explore_stats_equal_a_dense_reference(tiny, monkeypatch):
    # 300 tokens from training's TokenStream: 20 contexts of 15 read tokens, in batches of 3
    # (the last one partial), with narrow bins so the histograms slide and merge into bin 0
    ids, acts = _dense_reference(tiny, 20)
    stream = TokenStream(tiny["tok"], lambda: iter_documents([str(tiny["dir"] / "text")], None, "train", "text"), CTX)
    _no_dense(monkeypatch)
    res = explore(tiny["sae"], tiny["model"], tiny["tok"], stream, tokens=300, batch_size=3, top_k=4, n_bins=6,
                  bins_per_octave=4, progress=False)
    _check_against_dense(res, acts, ids, tiny["tok"].bos_token_id, k=4, n_bins=6, r=4)
    assert res.run["hook_point"] == HOOK and res.run["contexts"] == 20 and res.run["tokens"] == 300
    assert res.run["seconds_model"] > 0 and res.run["seconds_sae"] > 0 and 0 < res.run["sae_share"] < 1
    # logit lens: W_dec[j] @ W_U of the (tied) output embedding, best and worst tokens
    W_U = tiny["model"].get_output_embeddings().weight
    logits = tiny["sae"].W_dec.detach() @ W_U.T
    # (computed for the features that fired; a dead one has ids -1 and no tokens)
    ti, tv, bi, bv = res.logit
    live = res.fire_count > 0
    torch.testing.assert_close(tv[live], logits.topk(10, dim=1).values[live], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bv[live], logits.topk(10, dim=1, largest=False).values[live], rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.gather(1, ti.clamp(min=0))[live], tv[live])
    assert (ti[~live] == -1).all() and res.logit_tokens(DEAD[0]) == ([], [])


def test_explore_from_texts_rounds_tokens_up_to_whole_contexts(tiny):
    text = (tiny["dir"] / "text" / "a.txt").read_text()
    res = explore(tiny["sae"], tiny["model"], tiny["tok"], [text], tokens=100, context_length=CTX, batch_size=4,
                  progress=False)
    assert res.n_tokens == 105 and res.run["contexts"] == 7  # ceil(100 / 15) contexts
    # the same contexts as training's TokenStream packs (BOS + 15 tokens, in order)
    ids, acts = _dense_reference(tiny, 7)
    torch.testing.assert_close(res.fire_count, (acts > 0).reshape(-1, D_SAE).sum(0))


def test_summary_shows_selective_features_not_the_always_on_ones(tiny):
    res = explore(tiny["sae"], tiny["model"], tiny["tok"], [(tiny["dir"] / "text" / "a.txt").read_text()], tokens=600,
                  context_length=CTX, batch_size=4, top_k=6, progress=False)
    freq, live = res.frequency(), res.fire_count > 0

    def share(j):  # the share of j's top contexts peaking on its most common peak token
        peaks = [e["tokens"][e["peak"]] for e in res.examples(j)]
        return max(peaks.count(t) for t in peaks) / len(peaks)

    cap = float(freq[live].median())
    eligible = [j for j in live.nonzero()[:, 0].tolist() if freq[j] <= cap]
    summ = res.summary(4, max_frequency=cap)
    assert len(summ) == 4 and all(s["frequency"] <= cap for s in summ)
    assert all(s["peak_share"] == share(s["feature"]) and s["peak_token"] in s["top_tokens"] for s in summ)
    shares = [s["peak_share"] for s in summ]
    assert shares == sorted(shares, reverse=True) and shares[0] == max(share(j) for j in eligible)
    assert len({s["peak_token"] for s in summ}) == 4  # one feature per peak token
    # when no live feature is that rare, every live one is a candidate; a dead one never is
    summ = res.summary(50, max_frequency=0.0)
    assert summ and all(res.fire_count[s["feature"]] > 0 for s in summ)
    assert not {s["feature"] for s in summ} & set(DEAD)


def test_feature_stats_streaming_matches_dense_on_random_batches():
    # many small batches with a rising scale (every feature's max keeps rising, so its histogram
    # slides again and again), kept entries pruned every few batches, the larger batches' top-k
    # merged in groups of contexts
    g = torch.Generator().manual_seed(7)
    d_sae, k, n_bins, r, L = 40, 3, 5, 2, 6
    st = FeatureStats(d_sae, top_k=k, n_bins=n_bins, bins_per_octave=r)
    st._prune_at = 50
    st._ctx_chunk = 2  # batches of 3 contexts merge in two groups
    dense, ctx_of = [], []
    n_ctx = 0
    for b in range(12):
        B = 1 + b % 3
        vals = torch.exp(torch.randn(B * L, d_sae, generator=g) + b * 0.4)
        on = torch.rand(B * L, d_sae, generator=g) < 0.15
        on[:, 0] = False  # a dead feature
        a = torch.where(on, vals, torch.zeros(()))
        sp = SparseActs.from_dense(a)
        ctx = torch.arange(B).repeat_interleave(L) + n_ctx
        st.update(sp, ctx, torch.arange(L).repeat(B))
        dense.append(a)
        ctx_of.append(ctx)
        n_ctx += B
    a, ctx = torch.cat(dense), torch.cat(ctx_of)
    assert st.n_tokens == a.shape[0]
    torch.testing.assert_close(st.fire_count, (a > 0).sum(0))
    torch.testing.assert_close(st.act_max, a.amax(0))
    torch.testing.assert_close(st.act_sum, a.double().sum(0))
    per_ctx = torch.zeros(n_ctx, d_sae).scatter_reduce_(0, ctx[:, None].expand_as(a), a, "amax")
    f, c, p, v = st.kept_entries()
    for j in range(1, d_sae):
        vals = a[:, j][a[:, j] > 0]
        T, counts = _hist_reference(vals, n_bins, r)
        assert int(st.top_cell[j]) == T and st.hist[j].tolist() == counts.tolist()
        want = sorted(range(n_ctx), key=lambda cc: (-float(per_ctx[cc, j]), cc))[:k]
        assert st.top_ctx[j].tolist() == want
        for cc in want:  # the kept per-token activations of each top context
            m = (f == j) & (c == cc)
            rows = (ctx == cc).nonzero()[:, 0]
            fired = a[rows, j] > 0
            assert p[m].tolist() == fired.nonzero()[:, 0].tolist()
            torch.testing.assert_close(v[m], a[rows, j][fired])
    assert st.top_ctx[0].eq(-1).all() and st.fire_count[0] == 0
    # nothing but the top contexts' entries survives the pruning
    assert f.numel() == sum(
        int(((ctx == cc)[:, None] & (a > 0))[:, j].sum()) for j in range(d_sae) for cc in st.top_ctx[j].tolist()
        if cc >= 0)


def _spans(page):
    return re.findall(
        r'<span class="tok( peak)?" data-act="([^"]+)" style="background: rgba\([^)]*\)" '
        r'title="[^"]*">([^<]*)</span>', page)


def test_dashboard_files_are_valid(tiny, tmp_path):
    ids, acts = _dense_reference(tiny, 20)
    res = explore(tiny["sae"], tiny["model"], tiny["tok"], [(tiny["dir"] / "text" / "a.txt").read_text()], tokens=300,
                  context_length=CTX, top_k=3, progress=False)
    paths = write_dashboard(res, tmp_path / "dash")
    index = open(paths["index_html"], encoding="utf-8").read()
    # every feature is listed with its frequency; the dead ones also in their own list
    rows = dict(re.findall(r'<tr data-i="(\d+)" data-f="([^"]+)"', index))
    assert sorted(int(j) for j in rows) == list(range(D_SAE))
    fired = (acts > 0).reshape(-1, D_SAE).sum(0)
    for j, f in rows.items():
        assert float(f) == pytest.approx(float(fired[int(j)]) / 300, rel=1e-6)
    dead_part = index[index.index('id="dead"'):]
    assert sorted(int(j) for j in re.findall(r'href="feature_(\d+)\.html"', dead_part)) == res.dead()
    assert "http://" not in index and "https://" not in index and "<script src" not in index
    # feature pages: a span per token of each top context, data-act = that token's activation
    checked = 0
    for j in range(D_SAE):
        page = open(tmp_path / "dash" / f"feature_{j}.html", encoding="utf-8").read()
        ctxs = re.findall(r'<div class="ctx" data-context="(\d+)">(.*?)</div>', page)
        if j in res.dead():
            assert not ctxs and "Dead" in page
            continue
        assert [int(c) for c, _ in ctxs] == res.top_ctx[j][res.top_ctx[j] >= 0].tolist()
        for c, inner in ctxs:
            spans = _spans(inner)
            c = int(c)
            assert len(spans) == CTX - 1 and "".join(s[2] for s in spans) == re.sub(r"<[^>]*>", "", inner)
            torch.testing.assert_close(torch.tensor([float(s[1]) for s in spans]), acts[c, :, j], rtol=1e-5, atol=1e-6)
            toks = res.token_text(ids[c][1:].tolist())
            assert [html.unescape(s[2]) for s in spans] == toks  # escaped, and exactly the tokens
            checked += 1
    assert checked >= 3 * (D_SAE - len(res.dead())) - 3
    assert any(t in index + "".join(open(p, encoding="utf-8").read() for p in (tmp_path / "dash").glob("f*.html"))
               for t in ("&lt;", "&amp;", "&quot;"))

    # stats.json: strict JSON (no NaN/Infinity), the same numbers
    def no_constants(name):
        raise AssertionError(f"stats.json holds {name}: not strict JSON")

    doc = json.loads(open(paths["stats_json"], encoding="utf-8").read(), parse_constant=no_constants)
    assert doc == json.loads(json.dumps(sae_fast.explore.result_json(res)))  # the file is the API's document
    assert doc["format"] == "sae_fast.explore/1" and doc["dead"] == res.dead() and doc["n_tokens"] == 300
    assert doc["run"]["hook_point"] == HOOK and doc["run"]["tokens_per_s"] > 0
    contexts = {c["id"]: c for c in doc["contexts"]}
    for feat in doc["features"]:
        j = feat["index"]
        assert feat["fire_count"] == int(fired[j])
        if feat["fire_count"] == 0:
            assert feat["mean"] is None and feat["max"] is None and feat["hist"] is None
            continue
        assert sum(feat["hist"]["counts"]) == feat["fire_count"] and len(feat["hist"]["edges"]) == 41
        assert feat["max"] == pytest.approx(float(acts[..., j].max()), rel=1e-5)
        for tc in feat["top_contexts"]:
            ctx = contexts[tc["context"]]
            assert len(ctx["tokens"]) == len(tc["acts"]) == CTX - 1
            assert tc["acts"] == pytest.approx(acts[tc["context"], :, j].tolist(), rel=1e-5, abs=1e-6)
        assert len(feat["logit_lens"]["top"]) == len(feat["logit_lens"]["bottom"]) == 10


def test_transcoder_is_read_at_its_input_hook(tiny, tmp_path):
    hook = "model.layers.1.pre_feedforward_layernorm.output"
    tc = JumpReLUTranscoder(32, 24, 32)
    with torch.no_grad():
        tc.W_enc.normal_()
        tc.threshold.fill_(0.5)
    tc.metadata = {"hf_hook_point_in": hook, "hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output"}
    tc.save_pretrained(tmp_path / "tc")
    tc = load_sae(str(tmp_path / "tc"))
    assert isinstance(tc, JumpReLUTranscoder)
    res = explore(tc, tiny["model"], tiny["tok"], [(tiny["dir"] / "text" / "a.txt").read_text()], tokens=60,
                  context_length=CTX, progress=False)
    ids = _contexts(tiny["dir"], tiny["tok"], 4)
    x = run_until(tiny["model"], HookPoint.parse(hook), ids)[:, 1:].reshape(-1, 32)
    want = (reference.jumprelu_encode(x, tc.W_enc, tc.b_enc, tc.threshold) > 0).sum(0)
    assert res.run["hook_point"] == hook and torch.equal(res.fire_count, want)


def test_explore_refuses_an_sae_of_another_width(tiny):
    sae = JumpReLUSAE(16, 8)
    with pytest.raises(ValueError, match=r"the SAE reads d_in=16 but model\.layers\.1\.output of the model gives 32"):
        explore(sae, tiny["model"], tiny["tok"], ["w1 w2 w3"], hook_point=HOOK, progress=False)
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        explore(tiny["sae"], tiny["model"], tiny["tok"], ["w1 w2"], top_k=0, progress=False)


def test_cli_explore_writes_the_dashboard(tiny, tmp_path, capsys):
    # no --model: the SAE's metadata names the tiny model's directory
    out = tmp_path / "dash"
    assert main([
        "explore", "--sae",
        str(tiny["dir"] / "sae"), "--data",
        str(tiny["dir"] / "text"), "--tokens", "120", "--context-length",
        str(CTX), "--top-k", "2", "--out",
        str(out), "--no-progress"
    ]) == 0
    text = capsys.readouterr().out
    assert f"dashboard: {out / 'index.html'}" in text and "tokens/s" in text
    assert "features fired" in text
    assert (out / "index.html").is_file() and (out / "stats.json").is_file()
    doc = json.loads((out / "stats.json").read_text())
    assert doc["n_tokens"] == 120 and doc["run"]["model"] == str(tiny["dir"] / "model")
    assert all(len(f["top_contexts"]) <= 2 for f in doc["features"])
    assert len(list(out.glob("feature_*.html"))) == D_SAE


def test_cli_activations_prints_each_tokens_top_features(tiny, tmp_path, capsys):
    text = "w3 w17 < w8 & w30 w1"
    page = tmp_path / "acts.html"
    assert main(["activations", "--sae", str(tiny["dir"] / "sae"), text, "--top", "3", "--html", str(page)]) == 0
    out = capsys.readouterr().out.splitlines()
    sae, tok = tiny["sae"], tiny["tok"]
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    x = run_until(tiny["model"], HookPoint.parse(HOOK), ids)[0, 1:]
    acts = reference.jumprelu_encode(x, sae.W_enc, sae.b_enc, sae.threshold).detach()
    lines = [line for line in out if re.match(r"^\s+\d+\s", line)]
    assert len(lines) == ids.shape[1] and "BOS" in lines[0]
    for p, line in enumerate(lines[1:]):
        got = [(int(j), float(v)) for j, v in re.findall(r"(\d+)=([-\d.e+]+)", line)]
        a = acts[p]
        n = min(3, int((a > 0).sum()))
        top = a.topk(n)
        assert [j for j, _ in got] == top.indices.tolist(), line
        assert [v for _, v in got] == pytest.approx(top.values.tolist(), rel=1e-3)
        assert repr(tok.decode([int(ids[0, p + 1])])) in line
    # the page: one shaded span per token, each carrying all of its features
    doc = page.read_text(encoding="utf-8")
    spans = re.findall(
        r'<span class="tok" data-pos="(\d+)" data-read="(\d)" data-act="([^"]+)" '
        r'data-feats="([^"]*)"', doc)
    assert len(spans) == ids.shape[1] and spans[0][1] == "0"
    for p, (_pos, _read, act, feats) in enumerate(spans[1:]):
        f = json.loads(html.unescape(feats))
        a = acts[p]
        assert sorted(j for j, _ in f) == (a > 0).nonzero()[:, 0].tolist()
        assert float(act) == pytest.approx(float(a.max()), rel=1e-5)
    assert "&lt;" in doc and "&amp;" in doc and "<script src" not in doc


def test_cli_errors_are_clear(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["explore", "--sae", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--sae" in err and "missing" in err and "does not exist" in err
    for flag, bad in (("--top-k", "0"), ("--top-k", "x"), ("--tokens", "-5"), ("--context-length", "1")):
        with pytest.raises(SystemExit) as e:
            main(["explore", "--sae", str(tiny["dir"] / "sae"), flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: expected an integer >=" in err and bad in err, err
    with pytest.raises(SystemExit):
        main(["explore", "--sae", str(tiny["dir"] / "sae"), "--site", "mlp"])
    assert "--site needs --layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["activations", "--sae", str(tiny["dir"] / "sae"), "w1", "--layer", "9"])
    assert "layer 9 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["activations", "--sae", str(tiny["dir"] / "text" / "a.txt"), "w1"])
    assert "--sae:" in capsys.readouterr().err
