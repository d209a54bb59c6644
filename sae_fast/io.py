"""Loading and saving: Gemma Scope params.npz, SAELens directories, our own.

Our own format *is* the SAELens layout (cfg.json + sae_weights.safetensors),
with a `sae_fast_version` key added to cfg.json, so SAELens loads what we save.
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


class SAELoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and key."""


def _dtype_from_cfg(value, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise SAELoadError(f"{where}: 'dtype' must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[name]


def _validate_params(params: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    for key in PARAM_NAMES:
        if key not in params:
            raise SAELoadError(f"{where}: missing key {key!r} (expected keys {list(PARAM_NAMES)})")
    for key in PARAM_NAMES:
        t = params[key]
        if not torch.is_floating_point(t):
            raise SAELoadError(f"{where}: key {key!r} must be floating point, got {t.dtype}")
    W_enc = params["W_enc"]
    if W_enc.dim() != 2:
        raise SAELoadError(f"{where}: key 'W_enc' must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    expected = {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae, ), "threshold": (d_sae, ), "W_dec": (d_sae, d_in), "b_dec": (d_in, )
    }
    for key, shape in expected.items():
        if tuple(params[key].shape) != shape:
            raise SAELoadError(
                f"{where}: key {key!r} must have shape {list(shape)} (from W_enc [d_in={d_in}, d_sae={d_sae}]), "
                f"got {list(params[key].shape)}")
    return {k: params[k] for k in PARAM_NAMES}


def load_gemma_scope_npz(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A Gemma Scope params.npz: keys W_enc, W_dec, b_enc, b_dec, threshold."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile/pickle errors: name the file
        raise SAELoadError(f"{path}: not a readable .npz file ({e})") from e
    extra = sorted(set(raw) - set(PARAM_NAMES))
    if extra:
        raise SAELoadError(f"{path}: unexpected keys {extra} (a Gemma Scope params.npz holds {list(PARAM_NAMES)})")
    params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
    return _validate_params(params, str(path)), {"apply_b_dec_to_input": False}


def load_saelens_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A SAELens directory (cfg.json + sae_weights.safetensors) of a JumpReLU SAE."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAELoadError(f"{p}: file not found (a SAELens directory holds {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAELoadError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{cfg_path}: expected a JSON object")
    where = str(cfg_path)
    arch = cfg.get("architecture")
    if arch != "jumprelu":
        raise SAELoadError(f"{where}: key 'architecture' is {arch!r}; sae_fast supports only 'jumprelu' SAEs")
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
    dtype = _dtype_from_cfg(cfg.get("dtype"), where)
    try:
        raw = load_file(str(w_path))
    except Exception as e:
        raise SAELoadError(f"{w_path}: not a readable safetensors file ({e})") from e
    if "threshold" not in raw and "log_threshold" in raw:  # SAELens training checkpoints
        raw["threshold"] = raw.pop("log_threshold").float().exp()
    scaling = raw.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise SAELoadError(f"{w_path}: key 'scaling_factor' is not all ones; fold it into W_dec before loading")
    extra = sorted(set(raw) - set(PARAM_NAMES))
    if extra:
        raise SAELoadError(f"{w_path}: unexpected keys {extra} for a JumpReLU SAE (expected {list(PARAM_NAMES)})")
    params = _validate_params(raw, str(w_path))
    for key in ("d_in", "d_sae"):
        want = params["W_enc"].shape[0 if key == "d_in" else 1]
        if key in cfg and cfg[key] != want:
            raise SAELoadError(f"{where}: key {key!r} is {cfg[key]} but {SAELENS_WEIGHTS} has {key}={want}")
    return params, {"apply_b_dec_to_input": apply_b_dec, "dtype": dtype}


def load_pretrained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Dispatch on what `path` is: an .npz file, a directory with params.npz, or a SAELens directory."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return load_gemma_scope_npz(path)
        raise SAELoadError(f"{path}: expected a Gemma Scope .npz file or a directory")
    if path.is_dir():
        if (path / SAELENS_CFG).is_file():
            return load_saelens_dir(path)
        if (path / "params.npz").is_file():
            return load_gemma_scope_npz(path / "params.npz")
        raise SAELoadError(f"{path}: directory holds neither {SAELENS_CFG} (SAELens) nor params.npz (Gemma Scope)")
    raise SAELoadError(f"{path}: no such file or directory")


def save_saelens(sae, path: str | os.PathLike) -> None:
    """Write cfg.json + sae_weights.safetensors in the SAELens layout.

    cfg.json carries the SAELens v6 fields and the flat v5 ones, so either
    generation of SAELens reads it; threshold is saved in float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
    # Write to temporaries then rename, so a crash never leaves a half-written SAE.
    tmp_w, tmp_c = path / (SAELENS_WEIGHTS + ".tmp"), path / (SAELENS_CFG + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_c.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp_w, path / SAELENS_WEIGHTS)
    os.replace(tmp_c, path / SAELENS_CFG)
