"""The training pipeline: tiny Gemma 2 from a config, synthetic activations, resume, eval, CLI."""

import json
import os

import pytest
import torch

from sae_fast import JumpReLUSAE
from sae_fast.cli import build_parser, main, train_config_from_args
from sae_fast.train import CheckpointError, SyntheticActivationSource, TrainConfig, Trainer, evaluate, train
from sae_fast.train.data import ModelActivations, TokenStream, iter_documents, load_model

transformers = pytest.importorskip("transformers")
TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun and "
        "birds sing songs of the morning light over green hills and quiet rivers ") * 40


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """A randomly initialised Gemma2ForCausalLM and a word-level tokenizer, written to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_gemma2")
    words = sorted(set(TEXT.split()))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(d)
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
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(log) == 40 and log[-1]["step"] == 40
    assert JumpReLUSAE.from_pretrained(res["sae_path"]).d_in == 32


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


def test_bad_layer_and_data(tiny_gemma2, tmp_path):
    with pytest.raises(ValueError, match=r"layer 7 does not exist: Gemma2ForCausalLM has layers 0\.\.2"):
        train(small_cfg(tmp_path / "a", model=str(tiny_gemma2), layer=7, data=[str(tiny_gemma2 / "text")]))
    with pytest.raises(FileNotFoundError, match="data path '/nonexistent/x.txt' does not exist"):
        train(small_cfg(tmp_path / "b", model=str(tiny_gemma2), data=["/nonexistent/x.txt"]))


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


def test_folded_sae_works_on_raw_activations(tmp_path):
    t = _run_steps(small_cfg(tmp_path, tokens=64 * 10), 10)
    x = t.buffer.peek()[:50].float()
    folded = t.folded_sae()
    with torch.no_grad():
        want = t.sae(x * t.scale) / t.scale
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(folded.encode(x) != 0, t.sae.encode(x * t.scale) != 0)


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
    assert embedded.model.startswith("embedded:") and embedded.d_sae == 4096
    for bad, msg in ((["--d-sae", "0"], "d-sae must be a positive integer"),
                     (["--tokens", "-5"], "tokens must be a positive integer"), (["--lr", "0"], "lr must be positive")):
        with pytest.raises(SystemExit) as e:
            main(["train", *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--site", "embed"])
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--model", "--layer", "--d-sae", "--l0-coefficient", "--tokens", "--out", "--resume", "--bandwidth"):
        assert flag in help_text


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
