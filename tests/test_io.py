"""Loaders on files the tests write: Gemma Scope npz, SAELens layout, our own."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_fast import JumpReLUSAE
from sae_fast.io import SAELoadError

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
