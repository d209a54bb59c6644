"""sae_fast.steering and `sae-fast steer` on a tiny Gemma 3 and a small random SAE built here:
strength 0 changes nothing, a large strength raises the feature and changes the tokens, clamp
sets the activation and keeps the rest, positions="generated" leaves the prompt alone, the
model is restored on exit, dtypes mix, transcoders write to their output hook, bad input is
refused, and the CLI prints both continuations."""

import copy

import pytest
import torch

import sae_fast
from sae_fast import JumpReLUSAE, JumpReLUTranscoder
from sae_fast.cli import main
from sae_fast.hooks import HookPoint, HookPointError, capture
from sae_fast.steer import feature_acts, side_by_side

from helpers import make_params, make_tiny_gemma3, write_word_tokenizer

transformers = pytest.importorskip("transformers")
TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun and "
        "birds sing songs of the morning light over green hills and quiet rivers ")
HOOK = "model.layers.1.output"
D = 32  # the tiny model's hidden size
J = 5  # the feature most tests steer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model, tokenizer): a random Gemma3ForCausalLM (Gemma Scope 2's architecture) with a
    word-level tokenizer, saved to the directory so that the CLI loads it offline."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_gemma3_steer")
    vocab = write_word_tokenizer(d, TEXT)
    model = make_tiny_gemma3(len(vocab), 3, hidden=D)
    model.save_pretrained(d)
    return d, model, AutoTokenizer.from_pretrained(d)


def make_sae(d_sae=48, dtype=torch.float32, seed=1, **meta) -> JumpReLUSAE:
    """A random SAE on the tiny model's layer-1 residual stream; W_enc[:, j] ≈ W_dec[j] (unit norm)."""
    sae = JumpReLUSAE.from_params(make_params(D, d_sae, seed=seed, thr_scale=0.3), dtype=dtype)
    sae.metadata = {"hf_hook_point_in": HOOK, **meta}
    return sae


@pytest.fixture(scope="module")
def prompt(tiny):
    return tiny[2]("the quick brown fox jumps over the lazy", return_tensors="pt")["input_ids"]


def generate(model, ids, n=8, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def hook_tensors(model, name=HOOK):
    """A list that receives the tensor at the hook point on every forward, and the hook handle;
    registered before a steering block it sees the unedited tensor, inside it the edited one."""
    seen = []
    mod = HookPoint.parse(name).module(model)
    return seen, mod.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).clone()))


def test_strength_zero_is_the_plain_model(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    with torch.no_grad():
        plain_ids = generate(model, prompt)
        plain_logits = model(plain_ids).logits
        with sae_fast.steering(model, sae, {J: 0.0, 7: 0.0}):
            ids = generate(model, prompt)
            logits = model(plain_ids).logits
    assert torch.equal(ids, plain_ids)
    assert torch.equal(logits, plain_logits)


def test_large_strength_raises_the_feature_and_changes_the_tokens(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    with torch.no_grad():
        plain_ids = generate(model, prompt)
        with capture(model, HookPoint.parse(HOOK)) as plain:
            model(plain_ids)
        scale = float(plain["x"].norm(dim=-1).mean())  # the residual's size at the hook
        with sae_fast.steering(model, sae, {J: 4 * scale}) as st:
            ids = generate(model, prompt)
            with capture(model, HookPoint.parse(HOOK)) as steered:  # registered inside: sees the edit
                model(plain_ids)
    assert st.hook.name == HOOK and st.mode == "add" and st.features == {J: 4 * scale}
    index = torch.tensor([J])
    a_plain, a_steered = feature_acts(sae, plain["x"], index), feature_acts(sae, steered["x"], index)
    # W_enc[:, J] · W_dec[J] ≈ 1: pre rises by about the strength at every position
    assert bool((a_steered > a_plain + 2 * scale).all()), (a_plain, a_steered)
    torch.testing.assert_close(steered["x"] - plain["x"], (4 * scale * sae.W_dec[J]).expand_as(plain["x"]))
    assert not torch.equal(ids[:, prompt.shape[1]:], plain_ids[:, prompt.shape[1]:])


def test_several_features_add_their_sum(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    with torch.no_grad():
        before, h = hook_tensors(model)
        try:
            with sae_fast.steering(model, sae, {J: 1.5, 11: -2.0}):
                after, h2 = hook_tensors(model)
                model(prompt)
                h2.remove()
        finally:
            h.remove()
    want = 1.5 * sae.W_dec[J] - 2.0 * sae.W_dec[11]
    torch.testing.assert_close(after[0] - before[0], want.expand_as(before[0]), rtol=1e-6, atol=1e-6)


def test_clamp_sets_the_activation_and_keeps_the_rest(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    hp = HookPoint.parse(HOOK)
    with torch.no_grad():
        fired = (sae.encode(sae_fast.hooks.run_until(model, hp, prompt)) > 0).sum((0, 1))
        fired[J] = -1
        k = int(fired.argmax())  # the feature firing at the most positions: clamped to 0, an ablation
        with capture(model, hp) as before:
            with sae_fast.steering(model, sae, {J: 3.0, k: 0.0}, mode="clamp"):
                with capture(model, hp) as after:
                    model(prompt)
        x, x_new = before["x"], after["x"]
        acts = sae.encode(x)
        assert bool((acts[..., J] != 3.0).all()) and bool((acts[..., k] > 0).any())  # both edits do something
        # the SAE's decomposition of x, with a_J := 3 and a_k := 0 and everything else kept:
        # the other features' contributions and the reconstruction error (x - x̂)
        clamped = acts.clone()
        clamped[..., J], clamped[..., k] = 3.0, 0.0
        want = sae.decode(clamped) + (x - sae.decode(acts))
    torch.testing.assert_close(x_new, want, rtol=1e-5, atol=1e-5)


def test_clamp_reads_back_exactly_through_an_orthonormal_sae(tiny, prompt):
    """An SAE whose encoder reads each feature's own decoder row (W_enc = W_decᵀ, orthonormal rows,
    threshold 0): after the clamp, the encoder itself reports a_J = strength, and every other
    feature's activation is unchanged (W_dec[J] is orthogonal to their encoder columns)."""
    _, model, _ = tiny
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    sae = JumpReLUSAE.from_params(
        dict(W_enc=q[:, :16].contiguous(), b_enc=torch.zeros(16), threshold=torch.zeros(16),
             W_dec=q[:, :16].T.contiguous(), b_dec=torch.zeros(D)))
    sae.metadata = {"hf_hook_point_in": HOOK}
    with torch.no_grad():
        x = sae_fast.hooks.run_until(model, HookPoint.parse(HOOK), prompt)
        j = int(sae.encode(x)[0].gt(0).float().sum(0).argmax())  # the feature active at the most positions
        active = sae.encode(x)[0, :, j] > 0
        with sae_fast.steering(model, sae, {j: 2.5}, mode="clamp"):
            x_new = sae_fast.hooks.run_until(model, HookPoint.parse(HOOK), prompt)
    a, a_new = sae.encode(x)[0], sae.encode(x_new)[0]
    assert bool(active.any())
    torch.testing.assert_close(a_new[active, j], torch.full_like(a_new[active, j], 2.5), rtol=1e-5, atol=1e-5)
    others = torch.arange(16) != j
    torch.testing.assert_close(a_new[:, others], a[:, others], rtol=1e-5, atol=1e-5)


def test_generated_positions_leave_the_prompt_alone(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    n = prompt.shape[1]
    with torch.no_grad():
        plain_ids = generate(model, prompt)
        for use_cache in (True, False):
            before, h = hook_tensors(model)
            try:
                with sae_fast.steering(model, sae, {J: 50.0}, positions="generated"):
                    after, h2 = hook_tensors(model)
                    ids = generate(model, prompt, use_cache=use_cache)
                    h2.remove()
            finally:
                h.remove()
            # the first new token comes from the unsteered prompt; later ones are steered
            assert ids[0, n] == plain_ids[0, n] and not torch.equal(ids, plain_ids)
            assert len(before) == len(after) == 8
            edit = 50.0 * sae.W_dec[J]
            for k, (b, a) in enumerate(zip(before, after)):
                first = n + k - b.shape[1] if use_cache and k else 0  # absolute position of b's first token
                pos = torch.arange(first, first + b.shape[1])
                assert torch.equal(a[:, pos < n], b[:, pos < n]), k  # prompt positions: bit for bit
                torch.testing.assert_close(a[:, pos >= n] - b[:, pos >= n], edit.expand_as(b[:, pos >= n]))
                assert bool((pos >= n).any()) == (k > 0)


def test_leaving_the_block_restores_the_model(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    hooked = HookPoint.parse(HOOK).module(model)
    with torch.no_grad():
        clean, plain_ids = model(prompt).logits, generate(model, prompt)
        for mode, positions in (("add", "all"), ("clamp", "generated")):
            with sae_fast.steering(model, sae, {J: 30.0}, mode=mode, positions=positions):
                assert not torch.equal(generate(model, prompt), plain_ids)
            assert torch.equal(model(prompt).logits, clean) and torch.equal(generate(model, prompt), plain_ids)
        with pytest.raises(RuntimeError, match="boom"):
            with sae_fast.steering(model, sae, {J: 30.0}, positions="generated"):
                raise RuntimeError("boom")
        assert torch.equal(model(prompt).logits, clean)
    assert not hooked._forward_hooks and not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize("model_dtype,sae_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_model_and_sae_dtypes_mix(tiny, prompt, model_dtype, sae_dtype, mode):
    sae = make_sae(dtype=sae_dtype)
    model = copy.deepcopy(tiny[1]).to(model_dtype)  # a copy: the shared model keeps its float32 weights
    with torch.no_grad():
        with capture(model, HookPoint.parse(HOOK)) as before:
            with sae_fast.steering(model, sae, {J: 2.0}, mode=mode):
                with capture(model, HookPoint.parse(HOOK)) as after:
                    ids = generate(model, prompt, n=3)
    assert after["x"].dtype == model_dtype and ids.shape == (1, prompt.shape[1] + 3)
    x = before["x"].double()
    coef = 2.0 - (feature_acts(sae, before["x"], torch.tensor([J])).double() if mode == "clamp" else 0.0)
    delta = coef * sae.W_dec[J].double()
    # the edit is computed in float32 and added in the model's dtype: within one rounding of that
    # dtype of the exact sum, for the edit and for the sum
    err = (after["x"].double() - (x + delta)).abs()
    bound = torch.finfo(model_dtype).eps * ((x + delta).abs() + delta.abs()) + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


def test_transcoder_writes_to_its_output_hook(tiny, prompt):
    _, model, _ = tiny
    hp_in = "model.layers.1.pre_feedforward_layernorm.output"
    hp_out = "model.layers.1.post_feedforward_layernorm.output"
    p = make_params(D, 40, seed=4, thr_scale=0.2)
    tc = JumpReLUTranscoder.from_params(p)
    tc.metadata = {"hf_hook_point_in": hp_in, "hf_hook_point_out": hp_out}
    for mode in ("add", "clamp"):
        with torch.no_grad():
            with capture(model, HookPoint.parse(hp_in)) as x_in, capture(model, HookPoint.parse(hp_out)) as y:
                with sae_fast.steering(model, tc, {J: 2.0}, mode=mode) as st:
                    with capture(model, HookPoint.parse(hp_in)) as x_in_new, capture(model,
                                                                                     HookPoint.parse(hp_out)) as y_new:
                        model(prompt)
        assert st.hook.name == hp_out and (st.read_hook.name == hp_in if mode == "clamp" else st.read_hook is None)
        assert torch.equal(x_in_new["x"], x_in["x"])  # the input side is read, never written
        a = feature_acts(tc, x_in["x"], torch.tensor([J])) if mode == "clamp" else 0.0
        if mode == "clamp":
            assert bool((a != 2.0).all())
        torch.testing.assert_close(y_new["x"] - y["x"], ((2.0 - a) * tc.W_dec[J]).expand_as(y["x"]), rtol=1e-5,
                                   atol=1e-5)
    tc.metadata = {"hf_hook_point_in": hp_in}
    with pytest.raises(HookPointError, match="names no output hook point"):
        with sae_fast.steering(model, tc, {J: 1.0}):
            pass


def test_bad_input_is_refused_with_what_was_expected(tiny, prompt):
    _, model, _ = tiny
    sae = make_sae()
    with pytest.raises(ValueError, match=r"feature 48 is out of range: the SAE has d_sae=48 features \(0\.\.47\)"):
        with sae_fast.steering(model, sae, {48: 1.0}):
            pass
    with pytest.raises(ValueError, match="feature -1 is out of range"):
        with sae_fast.steering(model, sae, {-1: 1.0}):
            pass
    with pytest.raises(ValueError, match=r"mode must be one of \('add', 'clamp'\), got 'set'"):
        with sae_fast.steering(model, sae, {J: 1.0}, mode="set"):
            pass
    with pytest.raises(ValueError, match=r"positions must be one of \('all', 'generated'\), got 'prompt'"):
        with sae_fast.steering(model, sae, {J: 1.0}, positions="prompt"):
            pass
    with pytest.raises(TypeError, match=r"features must be a dict \{feature index: strength\}, got list"):
        with sae_fast.steering(model, sae, [J]):
            pass
    with pytest.raises(ValueError, match="at least one feature"):
        with sae_fast.steering(model, sae, {}):
            pass
    with pytest.raises(ValueError, match="strength of feature 5 must be a finite number, got nan"):
        with sae_fast.steering(model, sae, {J: float("nan")}):
            pass
    with pytest.raises(TypeError, match="feature indices must be ints, got True"):
        with sae_fast.steering(model, sae, {True: 1.0}):
            pass
    with pytest.raises(TypeError, match="sae must be a sae_fast JumpReLUSAE or JumpReLUTranscoder, got Linear"):
        with sae_fast.steering(model, torch.nn.Linear(2, 2), {J: 1.0}):
            pass
    with pytest.raises(HookPointError, match=r"layer 7 does not exist: Gemma3ForCausalLM has layers 0\.\.2"):
        with sae_fast.steering(model, make_sae(hf_hook_point_in="model.layers.7.output"), {J: 1.0}):
            pass
    with pytest.raises(HookPointError, match="has no module 'model.nothing'"):
        with sae_fast.steering(model, sae, {J: 1.0}, hook="model.nothing.output"):
            pass
    narrow = JumpReLUSAE.from_params(make_params(16, 8, seed=2))
    narrow.metadata = {"hf_hook_point_in": HOOK}
    with pytest.raises(ValueError, match=r"has width 32 but the SAE's decoder writes 16"):
        with torch.no_grad(), sae_fast.steering(model, narrow, {J: 1.0}):
            model(prompt)
    assert not HookPoint.parse(HOOK).module(model)._forward_hooks  # a failed forward leaves no hook behind


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def sae_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("steer_sae")
    make_sae(model_name=str(tiny[0])).save_pretrained(d)
    return d


def _continuations(model, tok, text, features):
    ids = tok(text, return_tensors="pt")["input_ids"]
    sae = make_sae()
    with torch.no_grad():
        plain = generate(model, ids, n=6)
        with sae_fast.steering(model, sae, features):
            steered = generate(model, ids, n=6)
    return [tok.decode(t[0, ids.shape[1]:], skip_special_tokens=True) for t in (plain, steered)]


def test_cli_prints_both_continuations(tiny, sae_dir, capsys, monkeypatch):
    _, model, tok = tiny
    text = "the quick brown fox"
    plain, steered = _continuations(model, tok, text, {J: 40.0, 9: 40.0})
    assert plain != steered
    argv = [
        "steer", "--sae",
        str(sae_dir), "--feature",
        str(J), "--feature", "9", "--strength", "40", "--prompt", text, "--max-new-tokens", "6", "--device", "cpu"
    ]
    monkeypatch.setenv("COLUMNS", "120")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"steering: feature {J} +40, feature 9 +40 (add, all positions)" in out and HOOK in out
    rows = [[c.strip() for c in line.split(" | ")] for line in out.splitlines() if " | " in line]
    assert rows[0] == ["plain", "steered"]
    left = " ".join(r[0].strip() for r in rows[2:] if r[0].strip())
    right = " ".join(r[1].strip() for r in rows[2:] if len(r) > 1 and r[1].strip())
    assert left == " ".join(plain.split()) and right == " ".join(steered.split())
    monkeypatch.setenv("COLUMNS", "40")  # narrow: two labelled blocks
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    i, k = lines.index("--- plain ---"), lines.index("--- steered ---")
    assert " ".join(lines[i + 1:k]) == " ".join(plain.split()) and " ".join(lines[k + 1:]) == " ".join(steered.split())


def test_cli_refuses_bad_flags(sae_dir, capsys):
    base = ["steer", "--sae", str(sae_dir), "--prompt", "the", "--device", "cpu"]
    for extra, msg in [(["--feature", "1", "--feature", "2", "--strength", "1", "--strength", "2", "--strength",
                         "3"], "give one per --feature (2) or one for all, got 3"),
                       (["--feature", "99", "--strength", "1"], "feature 99 is out of range: the SAE has d_sae=48"),
                       (["--feature", "1", "--strength", "1", "--max-new-tokens",
                         "0"], "--max-new-tokens must be at least 1, got 0"),
                       (["--feature", "1", "--strength", "1", "--mode", "set"], "invalid choice: 'set'"),
                       (["--feature", "1", "--strength", "1", "--sae",
                         "/nonexistent/sae"], "--sae: /nonexistent/sae: no such file or directory")]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2 and msg in capsys.readouterr().err, extra


def test_cli_falls_back_to_the_embedded_model_when_the_sae_model_does_not_load(tiny, tmp_path, capsys):
    from sae_fast.explore import model_candidates
    from sae_fast.steer import run_cli
    from sae_fast.cli import build_parser
    from sae_fast.train.config import EMBEDDED_MODEL

    sae = make_sae(model_name="/nonexistent/model")
    assert model_candidates(sae, None) == ["/nonexistent/model", EMBEDDED_MODEL]
    assert model_candidates(sae, "other") == ["other"]
    assert model_candidates(make_sae(model_name=EMBEDDED_MODEL), None) == [EMBEDDED_MODEL]
    assert model_candidates(make_sae(), None) == [EMBEDDED_MODEL]
    sae.save_pretrained(tmp_path)
    tried = []

    def load(name, device, dtype):  # the embedded model stands in for the tiny one (no 270M load in a test)
        tried.append(name)
        if name != EMBEDDED_MODEL:
            raise OSError(f"{name} is not a model")
        return tiny[1], tiny[2]

    parser = build_parser()
    args = parser.parse_args([
        "steer", "--sae",
        str(tmp_path), "--feature", "1", "--strength", "2", "--prompt", "the", "--max-new-tokens", "2", "--device",
        "cpu"
    ])
    assert run_cli(args, parser, load=load) == 0
    assert tried == ["/nonexistent/model", EMBEDDED_MODEL]
    captured = capsys.readouterr()
    assert "note: the SAE's model '/nonexistent/model' does not load here (OSError" in captured.err
    assert f"model: {EMBEDDED_MODEL}" in captured.out


def test_side_by_side_layout():
    # two columns of (63 - 3) // 2 = 30 characters; a column that ends keeps the separator
    lines = side_by_side("a b c\nd", "x", "plain", "steered", 63).splitlines()
    assert lines == [
        "plain" + " " * 25 + " | steered", "-" * 30 + " | " + "-" * 30, "a b c" + " " * 25 + " | x",
        "d" + " " * 29 + " |"
    ]
    assert side_by_side("", "x y", "L", "R", 63).splitlines()[2] == " " * 30 + " | x y"
    long = side_by_side("word " * 20, "", "L", "R", 63).splitlines()[2:]
    assert all(len(line) <= 63 for line in long) and " ".join(line[:30].strip()
                                                              for line in long) == " ".join(["word"] * 20)
    # narrower than 60 columns: two labelled blocks
    assert side_by_side("a", "b", "L", "R", 20).splitlines() == ["--- L ---", "a", "--- R ---", "b"]
