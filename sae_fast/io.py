"""Loading and saving: Gemma Scope params.npz, Gemma Scope 2 folders, SAELens directories, our own.

Our own format *is* the SAELens layout (cfg.json + sae_weights.safetensors),
with a `sae_fast_version` key added to cfg.json, so SAELens loads what we save.

Every loader returns (params, cfg): params under our names (W_enc, b_enc, threshold,
W_dec, b_dec, and W_skip [d_in, d_out] for affine-skip transcoders), cfg with
"kind" ("sae" or "transcoder"), "d_in", "d_sae", "d_out", "affine_skip",
"apply_b_dec_to_input", "dtype" (a torch dtype, or None to keep the file's) and "metadata".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .dtypes import DTYPES as _DTYPES

PARAM_NAMES = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GS2_CONFIG = "config.json"
GS2_PARAMS = "params.safetensors"
# Gemma Scope 2's lowercase keys -> ours. affine_skip_connection is [d_in, d_out], our
# W_skip's orientation (y = ... + x @ W_skip), so it is taken as is.
GS2_KEYS = {
    "w_enc": "W_enc", "b_enc": "b_enc", "threshold": "threshold", "w_dec": "W_dec", "b_dec": "b_dec",
    "affine_skip_connection": "W_skip"
}
KINDS = ("sae", "transcoder")
_NOUN = {"sae": "an SAE", "transcoder": "a transcoder"}
_LOADER = {"sae": "sae_fast.JumpReLUSAE.from_pretrained", "transcoder": "sae_fast.JumpReLUTranscoder.from_pretrained"}
# SAELens architectures we read; "jumprelu_fast" is the name sae_fast registers with SAELens
# (same weights as "jumprelu").
_SAELENS_ARCHS = {
    "jumprelu": "sae", "jumprelu_fast": "sae", "jumprelu_transcoder": "transcoder",
    "jumprelu_skip_transcoder": "transcoder"
}
# SAELens's LLM metadata keys (loading/pretrained_sae_loaders.py LLM_METADATA_KEYS). A cfg.json
# without a sae_lens_version takes SAELens's pre-6.0 path, which rebuilds metadata from these
# top-level keys only, so we write them flat too and read them back from either place.
_SAELENS_META_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                      "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                      "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                      "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")


class SAELoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and key."""


def _check_kind_arg(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'sae' or 'transcoder', got {kind!r}")


def _wrong_kind(where, why: str, found: str, kind: str) -> SAELoadError:
    return SAELoadError(f"{where}: {why}: this is {_NOUN[found]}, not {_NOUN[kind]}; "
                        f"load it with {_LOADER[found]}(path)")


def _dtype_from_cfg(value, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise SAELoadError(f"{where}: 'dtype' must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[name]


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAELoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path, check=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; check(shapes) runs on the header first, so a
    refused file (a cross-layer transcoder of many GB) is never read in full."""
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # header/format errors: name the file
        raise SAELoadError(f"{path}: not a readable safetensors file ({e})") from e
    with f:
        if check is not None:
            check({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise SAELoadError(f"{path}: not a readable safetensors file ({e})") from e


def _validate_params(params: dict[str, torch.Tensor], where: str, *, transcoder: bool = False, skip: bool = False,
                     skip_transposed: bool = False, names: dict[str, str] | None = None,
                     transcoder_hint: bool = False) -> dict[str, torch.Tensor]:
    """Check keys, dtypes and shapes (derived from W_enc, and for a transcoder d_out from W_dec).

    names maps our key names to the file's (Gemma Scope 2's lowercase ones) for the messages;
    skip_transposed: W_skip is stored [d_out, d_in] (SAELens), not [d_in, d_out].
    transcoder_hint: the file may as well hold a transcoder (a bare params.safetensors), so an
    SAE's W_dec into another width than d_in points the user to JumpReLUTranscoder.
    """
    n = (names or {}).get
    keys = PARAM_NAMES + (("W_skip", ) if skip else ())
    for key in keys:
        if key not in params:
            raise SAELoadError(f"{where}: missing key {n(key, key)!r} (expected keys {[n(k, k) for k in keys]})")
    for key in keys:
        t = params[key]
        if not torch.is_floating_point(t):
            raise SAELoadError(f"{where}: key {n(key, key)!r} must be floating point, got {t.dtype}")
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    enc, dec = n("W_enc", "W_enc"), n("W_dec", "W_dec")
    if W_enc.dim() != 2:
        raise SAELoadError(f"{where}: key {enc!r} must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    origin = f"from {enc} [d_in={d_in}, d_sae={d_sae}]"
    if transcoder:
        if W_dec.dim() != 2:
            raise SAELoadError(f"{where}: key {dec!r} must be 2-D [d_sae, d_out], got shape {list(W_dec.shape)}")
        d_out = W_dec.shape[1]
        origin += f" and {dec} [d_sae, d_out={d_out}]"
    else:
        d_out = d_in
    expected = {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae, ), "threshold": (d_sae, ), "W_dec": (d_sae, d_out), "b_dec": (d_out, )
    }
    if skip:
        expected["W_skip"] = (d_out, d_in) if skip_transposed else (d_in, d_out)
    for key, shape in expected.items():
        got = list(params[key].shape)
        if tuple(got) != shape:
            hint = ""
            if transcoder_hint and key == "W_dec" and not transcoder and len(got) == 2 and got[0] == d_sae:
                # An SAE decodes back into d_in; a decoder into another width is a transcoder's.
                hint = f"; a decoder into d_out={got[1]} is a transcoder's: load it with {_LOADER['transcoder']}(path)"
            raise SAELoadError(f"{where}: key {n(key, key)!r} must have shape {list(shape)} ({origin}), "
                               f"got {got}{hint}")
    out = {k: params[k] for k in keys}
    if skip and skip_transposed:
        out["W_skip"] = out["W_skip"].T.contiguous()
    return out


def _result_cfg(kind: str, params: dict[str, torch.Tensor], *, apply_b_dec_to_input: bool, dtype: torch.dtype | None,
                metadata: dict) -> dict:
    d_in, d_sae = params["W_enc"].shape
    return {
        "kind": kind, "d_in": int(d_in), "d_sae": int(d_sae), "d_out": int(params["W_dec"].shape[1]),
        "affine_skip": "W_skip" in params, "apply_b_dec_to_input": apply_b_dec_to_input, "dtype": dtype,
        "metadata": metadata
    }


# ------------------------------------------------------------- Gemma Scope 1
def load_gemma_scope_npz(path: str | os.PathLike, kind: str = "sae") -> tuple[dict[str, torch.Tensor], dict]:
    """A Gemma Scope params.npz: keys W_enc, W_dec, b_enc, b_dec, threshold (an SAE)."""
    import numpy as np

    _check_kind_arg(kind)
    path = Path(path)
    if kind == "transcoder":
        raise SAELoadError(f"{path}: a Gemma Scope params.npz loads as an SAE only ({_LOADER['sae']}(path)); "
                           f"{_LOADER['transcoder']} reads Gemma Scope 2 transcoder folders ({GS2_CONFIG} + "
                           f"{GS2_PARAMS}) and SAELens transcoder directories")
    try:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile/pickle errors: name the file
        raise SAELoadError(f"{path}: not a readable .npz file ({e})") from e
    extra = sorted(set(raw) - set(PARAM_NAMES))
    if extra:
        raise SAELoadError(f"{path}: unexpected keys {extra} (a Gemma Scope params.npz holds {list(PARAM_NAMES)})")
    params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
    params = _validate_params(params, str(path))
    return params, _result_cfg("sae", params, apply_b_dec_to_input=False, dtype=None,
                               metadata={"source": "gemma_scope"})


# ------------------------------------------------------------- Gemma Scope 2
def load_gemma_scope_2(path: str | os.PathLike, kind: str = "sae") -> tuple[dict[str, torch.Tensor], dict]:
    """A Gemma Scope 2 SAE or transcoder: a folder (config.json + params.safetensors) or a
    params.safetensors file (its config.json is used when one sits beside it).

    It is a transcoder iff config.json has hf_hook_point_out or affine_connection, or the
    file has affine_skip_connection. Without a config.json and without affine_skip_connection
    it loads as `kind` asks: a plain transcoder with d_out == d_in has an SAE's shapes.
    """
    _check_kind_arg(kind)
    path = Path(path)
    if path.is_dir():
        w_path = path / GS2_PARAMS
        if not w_path.is_file():
            raise SAELoadError(f"{w_path}: file not found (a Gemma Scope 2 folder holds {GS2_CONFIG} and {GS2_PARAMS})")
    else:
        w_path = path
    cfg_path = w_path.parent / GS2_CONFIG
    raw_cfg = _read_json(cfg_path) if cfg_path.is_file() else None
    marks = []  # why this is a transcoder, for the messages
    affine_flag = None
    if raw_cfg is not None:
        arch = raw_cfg.get("architecture")
        if arch != "jump_relu":
            got = "missing" if "architecture" not in raw_cfg else f"{arch!r}"
            raise SAELoadError(f"{cfg_path}: key 'architecture' is {got}; sae_fast loads only 'jump_relu' "
                               f"Gemma Scope 2 SAEs and transcoders")
        if "affine_connection" in raw_cfg:
            affine_flag = raw_cfg["affine_connection"]
            if not isinstance(affine_flag, bool):
                raise SAELoadError(f"{cfg_path}: key 'affine_connection' must be true or false, got {affine_flag!r}")
        marks += [f"{cfg_path} has key {k!r}" for k in ("hf_hook_point_out", "affine_connection") if k in raw_cfg]

    def check(shapes):
        w_dec = shapes.get("w_dec")
        if w_dec is not None and len(w_dec) == 3:
            raise SAELoadError(f"{w_path}: key 'w_dec' has shape {w_dec} [d_sae, n_layers, d_out]: cross-layer "
                               f"transcoders (one decoder per later layer) are not supported; sae_fast loads "
                               f"single-layer transcoders (w_dec [d_sae, d_out])")
        has_skip = "affine_skip_connection" in shapes
        if affine_flag is True and not has_skip:
            raise SAELoadError(f"{cfg_path}: key 'affine_connection' is true but {w_path} has no key "
                               f"'affine_skip_connection'")
        if affine_flag is False and has_skip:
            raise SAELoadError(f"{w_path}: has key 'affine_skip_connection' but {cfg_path} has key "
                               f"'affine_connection' false")
        if has_skip:
            marks.append(f"{w_path} has key 'affine_skip_connection'")
        found = "transcoder" if marks or (raw_cfg is None and kind == "transcoder") else "sae"
        if found != kind:
            why = (marks[0] if marks else f"{cfg_path} has no key 'hf_hook_point_out' or 'affine_connection' and "
                   f"{w_path} no key 'affine_skip_connection'")
            raise _wrong_kind(w_path, why, found, kind)
        extra = sorted(set(shapes) - set(GS2_KEYS))
        if extra:
            raise SAELoadError(f"{w_path}: unexpected keys {extra} (a Gemma Scope 2 params.safetensors holds "
                               f"{list(GS2_KEYS)})")

    raw = _read_safetensors(w_path, check)
    ours = {GS2_KEYS[k]: v for k, v in raw.items()}
    file_names = {v: k for k, v in GS2_KEYS.items()}
    params = _validate_params(ours, str(w_path), transcoder=kind == "transcoder", skip="W_skip" in ours,
                              names=file_names, transcoder_hint=raw_cfg is None)
    metadata = {"source": "gemma_scope_2"}
    for key in ("model_name", "hf_hook_point_in", "hf_hook_point_out"):
        if raw_cfg is not None and raw_cfg.get(key) is not None:
            metadata[key] = raw_cfg[key]
    # Gemma Scope 2 encodes x as is: no b_dec subtracted from the input.
    return params, _result_cfg(kind, params, apply_b_dec_to_input=False, dtype=None, metadata=metadata)


# ------------------------------------------------------------------ SAELens
def load_saelens_dir(path: str | os.PathLike, kind: str = "sae") -> tuple[dict[str, torch.Tensor], dict]:
    """A SAELens directory (cfg.json + sae_weights.safetensors): a JumpReLU SAE ("jumprelu",
    "jumprelu_fast") or transcoder ("jumprelu_transcoder", "jumprelu_skip_transcoder")."""
    _check_kind_arg(kind)
    path = Path(path)
    cfg_path, w_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAELoadError(f"{p}: file not found (a SAELens directory holds {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    cfg = _read_json(cfg_path)
    where = str(cfg_path)
    arch = cfg.get("architecture")
    found = _SAELENS_ARCHS.get(arch)
    if found is None:
        raise SAELoadError(f"{where}: key 'architecture' is {arch!r}; sae_fast supports only JumpReLU SAEs "
                           f"('jumprelu', 'jumprelu_fast') and transcoders ('jumprelu_transcoder', "
                           f"'jumprelu_skip_transcoder')")
    if found != kind:
        raise _wrong_kind(where, f"key 'architecture' is {arch!r}", found, kind)
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAELoadError(f"{where}: key 'normalize_activations' is {norm!r}; only 'none' is supported "
                           f"(fold the scaling into the weights first)")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise SAELoadError(f"{where}: key 'reshape_activations' is {reshape!r}; only 'none' is supported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", False)
    if not isinstance(apply_b_dec, bool):
        raise SAELoadError(f"{where}: key 'apply_b_dec_to_input' must be true or false, got {apply_b_dec!r}")
    if found == "transcoder" and apply_b_dec:
        raise SAELoadError(f"{where}: key 'apply_b_dec_to_input' is true; a transcoder's b_dec lives in the output "
                           f"space (d_out), so it must be false")
    dtype = _dtype_from_cfg(cfg.get("dtype"), where)
    raw = _read_safetensors(w_path)
    if "threshold" not in raw and "log_threshold" in raw:  # SAELens training checkpoints
        raw["threshold"] = raw.pop("log_threshold").float().exp()
    scaling = raw.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise SAELoadError(f"{w_path}: key 'scaling_factor' is not all ones; fold it into W_dec before loading")
    skip = arch == "jumprelu_skip_transcoder"
    keys = PARAM_NAMES + (("W_skip", ) if skip else ())
    extra = sorted(set(raw) - set(keys))
    if extra:
        raise SAELoadError(f"{w_path}: unexpected keys {extra} for architecture {arch!r} (expected {list(keys)})")
    # SAELens stores W_skip [d_out, d_in] (forward adds x @ W_skip.T): transposed to ours.
    params = _validate_params(raw, str(w_path), transcoder=found == "transcoder", skip=skip, skip_transposed=True)
    dims = {"d_in": params["W_enc"].shape[0], "d_sae": params["W_enc"].shape[1]}
    if found == "transcoder":
        dims["d_out"] = params["W_dec"].shape[1]
    for key, want in dims.items():
        if key in cfg and cfg[key] != want:
            raise SAELoadError(f"{where}: key {key!r} is {cfg[key]} but {SAELENS_WEIGHTS} has {key}={want}")
    metadata = dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}
    for key in _SAELENS_META_KEYS:  # SAELens v5 configs keep these at the top level
        if key not in metadata and cfg.get(key) not in (None, ""):
            metadata[key] = cfg[key]
    return params, _result_cfg(found, params, apply_b_dec_to_input=apply_b_dec, dtype=dtype, metadata=metadata)


# ---------------------------------------------------------------- dispatch
def load_pretrained(path: str | os.PathLike, kind: str = "sae") -> tuple[dict[str, torch.Tensor], dict]:
    """(params, cfg) of the SAE (kind="sae") or transcoder (kind="transcoder") at `path`.

    Dispatches on what `path` is: a Gemma Scope .npz file or directory with params.npz; a
    Gemma Scope 2 folder (config.json + params.safetensors) or its .safetensors file; a
    SAELens directory (cfg.json + sae_weights.safetensors), which save_pretrained writes.
    """
    _check_kind_arg(kind)
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return load_gemma_scope_npz(path, kind)
        if path.name == SAELENS_CFG or (path.name == SAELENS_WEIGHTS and (path.parent / SAELENS_CFG).is_file()):
            return load_saelens_dir(path.parent, kind)
        if path.suffix == ".safetensors" or path.name == GS2_CONFIG:
            return load_gemma_scope_2(path if path.suffix == ".safetensors" else path.parent, kind)
        raise SAELoadError(f"{path}: expected a Gemma Scope .npz file, a Gemma Scope 2 {GS2_PARAMS} or a directory")
    if path.is_dir():
        if (path / SAELENS_CFG).is_file():
            return load_saelens_dir(path, kind)
        if (path / GS2_CONFIG).is_file() or (path / GS2_PARAMS).is_file():
            return load_gemma_scope_2(path, kind)
        if (path / "params.npz").is_file():
            return load_gemma_scope_npz(path / "params.npz", kind)
        raise SAELoadError(f"{path}: directory holds neither {SAELENS_CFG} (SAELens), {GS2_CONFIG} + {GS2_PARAMS} "
                           f"(Gemma Scope 2) nor params.npz (Gemma Scope)")
    raise SAELoadError(f"{path}: no such file or directory")


# ------------------------------------------------------------------- saving
def _sae_cfg(sae) -> tuple[dict, dict[str, torch.Tensor]]:
    dtype_name = str(sae.dtype).removeprefix("torch.")
    tensors = {k: getattr(sae, k).detach().to("cpu").contiguous() for k in PARAM_NAMES}
    cfg = {
        "architecture": "jumprelu",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype_name,
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": dict(getattr(sae, "metadata", {}) or {}),
        # flat fields of SAELens v5 configs
        "hook_name": (getattr(sae, "metadata", {}) or {}).get("hook_name", ""),
        "hook_layer": (getattr(sae, "metadata", {}) or {}).get("hook_layer", 0),
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "finetuning_scaling_factor": False,
        "sae_fast_version": __version__
    }
    return cfg, tensors


def _transcoder_cfg(tc) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {k: getattr(tc, k).detach().to("cpu").contiguous() for k in PARAM_NAMES}
    if tc.W_skip is not None:
        # SAELens's JumpReLUSkipTranscoder holds W_skip [d_out, d_in] and adds x @ W_skip.T.
        tensors["W_skip"] = tc.W_skip.detach().to("cpu").T.contiguous()
    metadata = dict(getattr(tc, "metadata", None) or {})
    cfg = {
        "architecture": "jumprelu_skip_transcoder" if tc.W_skip is not None else "jumprelu_transcoder",
        "d_in": tc.d_in,
        "d_sae": tc.d_sae,
        "d_out": tc.d_out,
        "dtype": str(tc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    # Without a sae_lens_version SAELens reads metadata from the top-level keys only.
    cfg.update({k: metadata[k] for k in _SAELENS_META_KEYS if k in metadata and k not in cfg})
    cfg["sae_fast_version"] = __version__
    return cfg, tensors


def save_saelens(module, path: str | os.PathLike) -> None:
    """Write cfg.json + sae_weights.safetensors in the SAELens layout.

    A JumpReLUSAE is written as architecture "jumprelu" with the SAELens v6 fields and the
    flat v5 ones, so either generation of SAELens reads it; a JumpReLUTranscoder as
    "jumprelu_transcoder" or "jumprelu_skip_transcoder" (W_skip transposed to SAELens's
    [d_out, d_in]). threshold is saved in float32; cfg.json is strict JSON (no NaN/Infinity).
    """
    from safetensors.torch import save_file

    from .modules import JumpReLUTranscoder

    path = Path(path)
    cfg, tensors = _transcoder_cfg(module) if isinstance(module, JumpReLUTranscoder) else _sae_cfg(module)
    try:
        # Strict JSON: NaN/Infinity in metadata would make cfg.json unreadable to strict parsers.
        text = json.dumps(cfg, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / SAELENS_CFG}: cannot write the config as strict JSON ({e}); metadata must hold "
                         f"only JSON types and finite floats") from e
    path.mkdir(parents=True, exist_ok=True)
    # Write to temporaries then rename, so a crash never leaves a half-written SAE.
    tmp_w, tmp_c = path / (SAELENS_WEIGHTS + ".tmp"), path / (SAELENS_CFG + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_c.write_text(text, encoding="utf-8")
    os.replace(tmp_w, path / SAELENS_WEIGHTS)
    os.replace(tmp_c, path / SAELENS_CFG)
