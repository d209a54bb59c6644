"""Loaders on files the tests write: Gemma Scope npz, Gemma Scope 2 folders, SAELens SAEs and transcoders, our own."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_fast import JumpReLUSAE, JumpReLUTranscoder
from sae_fast.io import SAELoadError, load_pretrained

from helpers import make_params


def _np_params(d_in=6, d_sae=10):
    return {k: v.numpy() for k, v in make_params(d_in, d_sae).items()}


def test_gemma_scope_npz(tmp_path):
    p = _np_params()
    np.savez(tmp_path / "params.npz", **p)
    for path in (tmp_path / "params.npz", tmp_path):
        sae = JumpReLUSAE.from_pretrained(path, backend="torch")
        assert (sae.d_in, sae.d_sae) == (6, 10) and not sae.apply_b_dec_to_input
        for k, v in p.items():
            assert np.array_equal(getattr(sae, k).detach().numpy(), v), k
    x = torch.randn(3, 6)
    pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    want = torch.relu(pre) * (pre > torch.from_numpy(p["threshold"]))
    assert torch.equal(sae.encode(x), want)


def test_npz_errors_name_file_and_key(tmp_path):
    p = _np_params()
    del p["threshold"]
    np.savez(tmp_path / "a.npz", **p)
    with pytest.raises(SAELoadError, match=r"a\.npz: missing key 'threshold'"):
        JumpReLUSAE.from_pretrained(tmp_path / "a.npz")
    p = _np_params()
    p["b_dec"] = np.zeros(7, np.float32)
    np.savez(tmp_path / "b.npz", **p)
    with pytest.raises(SAELoadError, match=r"b\.npz: key 'b_dec' must have shape \[6\]"):
        JumpReLUSAE.from_pretrained(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(SAELoadError, match=r"c\.npz: not a readable"):
        JumpReLUSAE.from_pretrained(tmp_path / "c.npz")
    with pytest.raises(SAELoadError, match="no such file"):
        JumpReLUSAE.from_pretrained(tmp_path / "missing")


def _write_saelens(d, params, **cfg):
    d.mkdir()
    base = {
        "architecture": "jumprelu", "d_in": 6, "d_sae": 10, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "model_name": "gemma-2-2b",
        "hook_name": "blocks.12.hook_resid_post"
    }
    base.update(cfg)
    (d / "cfg.json").write_text(json.dumps(base))
    save_file({k: torch.as_tensor(v) for k, v in params.items()}, str(d / "sae_weights.safetensors"))


def test_saelens_directory(tmp_path):
    p = {k: torch.from_numpy(v) for k, v in _np_params().items()}
    _write_saelens(tmp_path / "s", p, apply_b_dec_to_input=True)
    sae = JumpReLUSAE.from_pretrained(tmp_path / "s", backend="torch")
    assert sae.apply_b_dec_to_input
    x = torch.randn(2, 6)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    assert torch.equal(sae.encode(x), torch.relu(pre) * (pre > p["threshold"]))


def test_saelens_log_threshold_and_dtype(tmp_path):
    p = {k: torch.from_numpy(v) for k, v in _np_params().items()}
    thr = p.pop("threshold")
    p["log_threshold"] = thr.log()
    _write_saelens(tmp_path / "s", p, dtype="torch.bfloat16")
    sae = JumpReLUSAE.from_pretrained(tmp_path / "s")
    assert sae.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    assert torch.allclose(sae.threshold, thr, rtol=1e-6)


@pytest.mark.parametrize("cfg, match",
                         [({"architecture": "topk"}, "'architecture' is 'topk'"),
                          ({"normalize_activations": "layer_norm"}, "'normalize_activations' is 'layer_norm'"),
                          ({"d_sae": 11}, "'d_sae' is 11"), ({"dtype": "int8"}, "'dtype' must be one of")])
def test_saelens_rejects_unsupported(tmp_path, cfg, match):
    p = {k: torch.from_numpy(v) for k, v in _np_params().items()}
    _write_saelens(tmp_path / "s", p, **cfg)
    with pytest.raises(SAELoadError, match=match) as e:
        JumpReLUSAE.from_pretrained(tmp_path / "s")
    assert "cfg.json" in str(e.value)


def test_saelens_bad_weights(tmp_path):
    p = {k: torch.from_numpy(v) for k, v in _np_params().items()}
    p["W_dec"] = p["W_dec"][:, :5].contiguous()
    _write_saelens(tmp_path / "s", p)
    with pytest.raises(SAELoadError, match=r"sae_weights\.safetensors: key 'W_dec' must have shape \[10, 6\]"):
        JumpReLUSAE.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_round_trip_in_saelens_layout(tmp_path, dtype):
    sae = JumpReLUSAE(6, 10, dtype=dtype, apply_b_dec_to_input=True)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.threshold.uniform_(0.01, 0.02)
    sae.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    # the fields SAELens reads
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert w["threshold"].dtype == torch.float32
    back = JumpReLUSAE.from_pretrained(tmp_path / "out")
    assert back.dtype == dtype and back.apply_b_dec_to_input
    for n, p in sae.named_parameters():
        assert torch.equal(getattr(back, n), p), n
    assert not any(f.name.endswith(".tmp") for f in (tmp_path / "out").iterdir())


# ------------------------------------------------------------- Gemma Scope 2
def _gs2_tensors(d_in=6, d_sae=10, d_out=6, affine=False):
    """Random Gemma Scope 2 tensors (lowercase keys, [d_in, d_sae] / [d_sae, d_out] orientation)."""
    t = {
        "w_enc": 0.5 * torch.randn(d_in, d_sae), "b_enc": 0.1 * torch.randn(d_sae),
        "threshold": 0.5 * torch.rand(d_sae) + 0.05, "w_dec": torch.randn(d_sae, d_out), "b_dec": torch.randn(d_out)
    }
    if affine:
        t["affine_skip_connection"] = torch.randn(d_in, d_out)
    return t


def _write_gs2(folder, tensors, config=None):
    """A Gemma Scope 2 folder: config.json (unless config is None) + params.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "params.safetensors"))
    return folder


def _gs2_config(transcoder=False, affine=False, **extra):
    cfg = {
        "architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
        "hf_hook_point_in": "model.layers.7.pre_feedforward_layernorm.output" if transcoder else "model.layers.7.output"
    }
    if transcoder:
        cfg["hf_hook_point_out"] = "model.layers.7.post_feedforward_layernorm.output"
        cfg["affine_connection"] = affine
    cfg.update(extra)
    return cfg


def _gs2_reference(t, x):
    """(acts, output) of Gemma Scope 2's math on the raw tensors."""
    pre = x @ t["w_enc"] + t["b_enc"]
    acts = torch.relu(pre) * (pre > t["threshold"])
    y = acts @ t["w_dec"] + t["b_dec"]
    if "affine_skip_connection" in t:
        y = y + x @ t["affine_skip_connection"]
    return acts, y


def test_gemma_scope_2_sae_folder_and_file(tmp_path):
    t = _gs2_tensors()
    folder = _write_gs2(tmp_path / "resid_post" / "layer_7_width_16k_l0_small", t, _gs2_config())
    x = torch.randn(5, 6)
    acts, want = _gs2_reference(t, x)
    for path in (folder, folder / "params.safetensors"):
        sae = JumpReLUSAE.from_pretrained(path, backend="torch")
        assert (sae.d_in, sae.d_sae, sae.dtype) == (6, 10, torch.float32) and not sae.apply_b_dec_to_input
        assert torch.equal(sae.encode(x), acts)
        torch.testing.assert_close(sae(x), want)
        assert sae.metadata == {
            "source": "gemma_scope_2", "model_name": "gemma-v3-1b-pt", "hf_hook_point_in": "model.layers.7.output"
        }
    params, cfg = load_pretrained(folder)
    assert set(params) == {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"}
    assert {k: v
            for k, v in cfg.items() if k != "metadata"} == {
                "kind": "sae", "d_in": 6, "d_sae": 10, "d_out": 6, "affine_skip": False, "apply_b_dec_to_input": False,
                "dtype": None
            }


def test_gemma_scope_2_keeps_the_files_dtype(tmp_path):
    t = {k: v.to(torch.bfloat16) for k, v in _gs2_tensors().items()}
    sae = JumpReLUSAE.from_pretrained(_write_gs2(tmp_path / "f", t, _gs2_config()))
    assert sae.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    assert torch.equal(sae.threshold, t["threshold"].float())


@pytest.mark.parametrize("d_out", [5, 6])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_gemma_scope_2_transcoder_folder_and_file(tmp_path, d_out, affine):
    t = _gs2_tensors(d_out=d_out, affine=affine)
    folder = _write_gs2(tmp_path / "transcoder" / "layer_7_width_16k", t, _gs2_config(True, affine))
    x = torch.randn(5, 6)
    acts, want = _gs2_reference(t, x)
    for path in (folder, folder / "params.safetensors"):
        tc = JumpReLUTranscoder.from_pretrained(path, backend="torch")
        assert (tc.d_in, tc.d_sae, tc.d_out, tc.affine_skip) == (6, 10, d_out, affine)
        assert not tc.apply_b_dec_to_input
        assert torch.equal(tc.encode(x), acts)
        torch.testing.assert_close(tc(x), want)
        if affine:
            assert torch.equal(tc.W_skip, t["affine_skip_connection"])  # same orientation, no transpose
        assert tc.metadata["hf_hook_point_out"] == "model.layers.7.post_feedforward_layernorm.output"
        assert tc.metadata["source"] == "gemma_scope_2"
    _, cfg = load_pretrained(folder, kind="transcoder")
    assert (cfg["kind"], cfg["d_out"], cfg["affine_skip"], cfg["dtype"]) == ("transcoder", d_out, affine, None)


def test_gemma_scope_2_bare_file_loads_as_kind_asks(tmp_path):
    # No config.json: a plain transcoder with d_out == d_in has an SAE's shapes, so `kind` decides.
    t = _gs2_tensors()
    f = _write_gs2(tmp_path / "p", t) / "params.safetensors"
    x = torch.randn(3, 6)
    torch.testing.assert_close(JumpReLUSAE.from_pretrained(f)(x), _gs2_reference(t, x)[1])
    tc = JumpReLUTranscoder.from_pretrained(f)
    assert (tc.d_out, tc.affine_skip) == (6, False)
    torch.testing.assert_close(tc(x), _gs2_reference(t, x)[1])
    # affine_skip_connection alone marks a transcoder
    t = _gs2_tensors(d_out=5, affine=True)
    f = _write_gs2(tmp_path / "a", t) / "params.safetensors"
    torch.testing.assert_close(JumpReLUTranscoder.from_pretrained(f)(x), _gs2_reference(t, x)[1])
    with pytest.raises(SAELoadError, match=r"params\.safetensors.*'affine_skip_connection'.*JumpReLUTranscoder"):
        JumpReLUSAE.from_pretrained(f)


def test_gemma_scope_2_kind_mismatch_names_the_class_to_use(tmp_path):
    sae_dir = _write_gs2(tmp_path / "sae", _gs2_tensors(), _gs2_config())
    with pytest.raises(
            SAELoadError, match=r"config\.json has no key 'hf_hook_point_out'.*this is an SAE, not a "
            r"transcoder; load it with sae_fast\.JumpReLUSAE\.from_pretrained"):
        JumpReLUTranscoder.from_pretrained(sae_dir)
    tc_dir = _write_gs2(tmp_path / "tc", _gs2_tensors(), _gs2_config(True))
    with pytest.raises(
            SAELoadError, match=r"config\.json has key 'hf_hook_point_out'.*this is a transcoder, not "
            r"an SAE; load it with sae_fast\.JumpReLUTranscoder\.from_pretrained"):
        JumpReLUSAE.from_pretrained(tc_dir / "params.safetensors")
    # a decoder into another width than d_in: the shape error says it is a transcoder's
    bare = _write_gs2(tmp_path / "bare", _gs2_tensors(d_out=5)) / "params.safetensors"
    with pytest.raises(SAELoadError, match=r"key 'w_dec' must have shape \[10, 6\].*JumpReLUTranscoder"):
        JumpReLUSAE.from_pretrained(bare)


def _drop(key):
    return lambda t, c: t.pop(key)


# (transcoder?, edit of (tensors, config), the message expected)
_GS2_ERRORS = [
    pytest.param(False, lambda t, c: c.update(architecture="topk"), r"config\.json: key 'architecture' is 'topk'",
                 id="architecture"),
    pytest.param(False, lambda t, c: c.pop("architecture"), r"config\.json: key 'architecture' is missing",
                 id="no-architecture"),
    pytest.param(False, _drop("threshold"), r"params\.safetensors: missing key 'threshold'", id="missing-key"),
    pytest.param(
        False, lambda t, c: t.update(b_enc=torch.zeros(11)),
        r"params\.safetensors: key 'b_enc' must have shape \[10\] \(from w_enc \[d_in=6, d_sae=10\]\), "
        r"got \[11\]", id="shape"),
    pytest.param(
        False, lambda t, c: t.update(w_dec=torch.zeros(10, 5)),
        r"params\.safetensors: key 'w_dec' must have shape \[10, 6\] \(from w_enc \[d_in=6, d_sae=10\]\), "
        r"got \[10, 5\]$", id="sae-d_out"),
    pytest.param(True, lambda t, c: t.update(b_dec=torch.zeros(6)),
                 r"params\.safetensors: key 'b_dec' must have shape \[5\]", id="b_dec-d_out"),
    pytest.param(True, lambda t, c:
                 (t.update(affine_skip_connection=torch.zeros(5, 6)), c.update(affine_connection=True)),
                 r"params\.safetensors: key 'affine_skip_connection' must have shape \[6, 5\]", id="skip-shape"),
    pytest.param(False, lambda t, c: t.update(w_enc=t["w_enc"].to(torch.int32)),
                 r"params\.safetensors: key 'w_enc' must be floating point", id="int-dtype"),
    pytest.param(False, lambda t, c: t.update(extra=torch.zeros(1)),
                 r"params\.safetensors: unexpected keys \['extra'\]", id="extra-key"),
    pytest.param(
        True, lambda t, c: c.update(affine_connection=True),
        r"config\.json: key 'affine_connection' is true but .*params\.safetensors has no key "
        r"'affine_skip_connection'", id="affine-without-key"),
    pytest.param(
        True, lambda t, c: t.update(affine_skip_connection=torch.zeros(6, 5)),
        r"params\.safetensors: has key 'affine_skip_connection' but .*config\.json has key "
        r"'affine_connection' false", id="key-without-affine"),
    pytest.param(True, lambda t, c: c.update(affine_connection="yes"),
                 r"config\.json: key 'affine_connection' must be true or false, got 'yes'", id="affine-not-bool"),
    pytest.param(
        True, lambda t, c: t.update(w_dec=torch.zeros(10, 3, 5)),
        r"params\.safetensors: key 'w_dec' has shape \[10, 3, 5\] \[d_sae, n_layers, d_out\]: cross-layer "
        r"transcoders \(one decoder per later layer\) are not supported", id="clt")
]


@pytest.mark.parametrize("transcoder, edit, match", _GS2_ERRORS)
def test_gemma_scope_2_errors_name_file_and_key(tmp_path, transcoder, edit, match):
    t = _gs2_tensors(d_out=5 if transcoder else 6)
    c = _gs2_config(transcoder)
    edit(t, c)
    folder = _write_gs2(tmp_path / "f", t, c)
    cls = JumpReLUTranscoder if transcoder else JumpReLUSAE
    with pytest.raises(SAELoadError, match=match):
        cls.from_pretrained(folder)


def test_gemma_scope_2_clt_refused_without_config(tmp_path):
    t = _gs2_tensors(d_out=5)
    t["w_dec"] = torch.zeros(10, 4, 5)
    f = tmp_path / "layer_0.safetensors"
    save_file(t, str(f))
    for cls in (JumpReLUTranscoder, JumpReLUSAE):
        with pytest.raises(SAELoadError,
                           match=r"layer_0\.safetensors: key 'w_dec' has shape \[10, 4, 5\].*cross-layer"):
            cls.from_pretrained(f)


def test_unreadable_files_are_named(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "params.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(SAELoadError, match=r"junk.params\.safetensors: not a readable safetensors file"):
        JumpReLUSAE.from_pretrained(d)
    (d / "config.json").write_text("{'architecture': jump_relu")
    with pytest.raises(SAELoadError, match=r"junk.config\.json: not valid JSON"):
        JumpReLUSAE.from_pretrained(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(SAELoadError, match=r"junk.config\.json: expected a JSON object, got list"):
        JumpReLUSAE.from_pretrained(d)
    s = tmp_path / "s"
    _write_saelens(s, {k: torch.from_numpy(v) for k, v in _np_params().items()})
    (s / "cfg.json").write_text("{")
    with pytest.raises(SAELoadError, match=r"s.cfg\.json: not valid JSON"):
        JumpReLUSAE.from_pretrained(s)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(SAELoadError, match=r"w\.bin: expected a Gemma Scope \.npz file"):
        JumpReLUSAE.from_pretrained(tmp_path / "w.bin")
    with pytest.raises(SAELoadError, match="directory holds neither"):
        JumpReLUSAE.from_pretrained(tmp_path / "s" / "..")


def test_load_pretrained_kind(tmp_path):
    with pytest.raises(ValueError, match="kind must be 'sae' or 'transcoder', got 'clt'"):
        load_pretrained(tmp_path, kind="clt")
    np.savez(tmp_path / "params.npz", **_np_params())
    with pytest.raises(SAELoadError, match=r"params\.npz: a Gemma Scope params\.npz loads as an SAE only"):
        JumpReLUTranscoder.from_pretrained(tmp_path)
    _, cfg = load_pretrained(tmp_path / "params.npz")
    assert cfg["kind"] == "sae" and cfg["d_out"] == 6 and cfg["dtype"] is None and not cfg["affine_skip"]


# ----------------------------------------------------- SAELens transcoders
@pytest.fixture(scope="module")
def sae_lens():
    import sae_lens  # a test dependency (slow to import: once per module)

    return sae_lens


def _strict_json(text):

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _random_transcoder(affine, d_out=5, dtype=torch.float32):
    tc = JumpReLUTranscoder(6, 10, d_out, affine_skip=affine, dtype=dtype, backend="torch")
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
        tc.threshold.uniform_(0.05, 0.5)
    return tc


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_save_pretrained_transcoder_round_trip_and_saelens_loads_it(tmp_path, sae_lens, affine):
    tc = _random_transcoder(affine)
    tc.metadata = {"model_name": "google/gemma-3-1b-pt", "hook_name": "blocks.7.hook_mlp_in", "lr": 3e-4}
    out = tmp_path / "out"
    tc.save_pretrained(out)
    cfg = _strict_json((out / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_skip_transcoder" if affine else "jumprelu_transcoder")
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["dtype"]) == (6, 10, 5, "float32")
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["metadata"] == tc.metadata and "sae_fast_version" in cfg
    w = load_file(str(out / "sae_weights.safetensors"))
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} | ({"W_skip"} if affine else set())
    assert w["threshold"].dtype == torch.float32
    if affine:
        assert torch.equal(w["W_skip"], tc.W_skip.detach().T)  # SAELens's [d_out, d_in]
    assert not any(f.name.endswith(".tmp") for f in out.iterdir())

    params, got = load_pretrained(out, kind="transcoder")
    assert (got["kind"], got["d_out"], got["affine_skip"], got["dtype"]) == ("transcoder", 5, affine, torch.float32)
    assert got["metadata"] == tc.metadata
    back = JumpReLUTranscoder.from_pretrained(out, backend="torch")
    for n, p in tc.named_parameters():
        assert torch.equal(getattr(back, n), p), n
    with pytest.raises(SAELoadError, match=r"cfg\.json: key 'architecture' is 'jumprelu_.*JumpReLUTranscoder"):
        JumpReLUSAE.from_pretrained(out)

    theirs = sae_lens.SAE.load_from_disk(str(out))
    want_cls = sae_lens.JumpReLUSkipTranscoder if affine else sae_lens.JumpReLUTranscoder
    assert type(theirs) is want_cls
    assert theirs.cfg.metadata.model_name == "google/gemma-3-1b-pt"
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), tc(x))


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_saelens_written_transcoder_loads(tmp_path, sae_lens, affine):
    Cls, Cfg = ((sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig) if affine else
                (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig))
    theirs = Cls(Cfg(d_in=6, d_sae=10, d_out=5, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        theirs.threshold.uniform_(0.05, 0.5)
    theirs.save_model(str(tmp_path / "s"))
    tc = JumpReLUTranscoder.from_pretrained(tmp_path / "s", backend="torch")
    assert (tc.d_in, tc.d_sae, tc.d_out, tc.affine_skip) == (6, 10, 5, affine)
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(tc(x), theirs(x))
    assert "sae_lens_version" in tc.metadata


def _transcoder_dir(d, affine=False, **cfg):
    tc = _random_transcoder(affine)
    tc.save_pretrained(d)
    c = json.loads((d / "cfg.json").read_text())
    c.update(cfg)
    (d / "cfg.json").write_text(json.dumps(c))
    return tc


def test_saelens_transcoder_errors_name_file_and_key(tmp_path):
    _transcoder_dir(tmp_path / "a", apply_b_dec_to_input=True)
    with pytest.raises(SAELoadError, match=r"a.cfg\.json: key 'apply_b_dec_to_input' is true"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "a")
    _transcoder_dir(tmp_path / "b", d_out=4)
    with pytest.raises(SAELoadError, match=r"b.cfg\.json: key 'd_out' is 4 but sae_weights\.safetensors has d_out=5"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "b")
    tc = _transcoder_dir(tmp_path / "c", affine=True)
    w = load_file(str(tmp_path / "c" / "sae_weights.safetensors"))
    w["W_skip"] = tc.W_skip.detach().clone()  # our orientation, not SAELens's
    save_file(w, str(tmp_path / "c" / "sae_weights.safetensors"))
    with pytest.raises(SAELoadError, match=r"c.sae_weights\.safetensors: key 'W_skip' must have shape \[5, 6\]"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "c")
    _transcoder_dir(tmp_path / "d", architecture="jumprelu_skip_transcoder")
    with pytest.raises(SAELoadError, match=r"d.sae_weights\.safetensors: missing key 'W_skip'"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "d")
    _transcoder_dir(tmp_path / "e", affine=True, architecture="jumprelu_transcoder")
    with pytest.raises(SAELoadError, match=r"e.sae_weights\.safetensors: unexpected keys \['W_skip'\]"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "e")
    _write_saelens(tmp_path / "f", {k: torch.from_numpy(v) for k, v in _np_params().items()})
    with pytest.raises(
            SAELoadError, match=r"f.cfg\.json: key 'architecture' is 'jumprelu': this is an SAE, not a "
            r"transcoder; load it with sae_fast\.JumpReLUSAE\.from_pretrained"):
        JumpReLUTranscoder.from_pretrained(tmp_path / "f")


def test_saelens_jumprelu_fast_and_flat_metadata(tmp_path):
    p = {k: torch.from_numpy(v) for k, v in _np_params().items()}
    _write_saelens(tmp_path / "s", p, architecture="jumprelu_fast")
    sae = JumpReLUSAE.from_pretrained(tmp_path / "s")
    assert sae.metadata == {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post"}
    for k, v in p.items():
        assert torch.equal(getattr(sae, k), v), k
    _, cfg = load_pretrained(tmp_path / "s" / "sae_weights.safetensors")
    assert cfg["kind"] == "sae" and cfg["dtype"] == torch.float32


def test_save_writes_strict_json(tmp_path):
    sae = JumpReLUSAE(6, 10)
    sae.metadata = {"normalization_scale_folded": 0.25, "hook_layer": 3}
    sae.save_pretrained(tmp_path / "ok")
    assert _strict_json((tmp_path / "ok" / "cfg.json").read_text())["metadata"] == sae.metadata
    for module in (sae, _random_transcoder(False)):
        module.metadata = {"scale": float("nan")}
        with pytest.raises(ValueError, match=r"bad.cfg\.json: cannot write the config as strict JSON"):
            module.save_pretrained(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
