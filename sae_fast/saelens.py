"""sae_fast as SAELens's faster backend.

    import sae_fast.saelens                        # registers architecture "jumprelu_fast"
    sae = sae_fast.saelens.accelerate(sae)         # a loaded SAELens JumpReLU SAE or transcoder, on our kernels

Importing this module registers, with SAELens's two architecture registries:

- "jumprelu_fast" for inference: `JumpReLUFastSAE`, a `sae_lens.JumpReLUSAE` whose encode and
  forward run sae_fast's fused encoder and sparse decode. It goes wherever SAELens takes an SAE
  (HookedSAETransformer.run_with_saes / run_with_cache_with_saes included): every hook point
  fires as in SAELens. The transcoders get "jumprelu_transcoder_fast" and
  "jumprelu_skip_transcoder_fast" (`JumpReLUFastTranscoder`, `JumpReLUFastSkipTranscoder`).
- "jumprelu_fast" for training: `JumpReLUFastTrainingSAE`, whose config is SAELens's
  JumpReLUTrainingSAEConfig (every field) plus `sae_fast_backend`, and whose
  training_forward_pass gives SAELens's loss and gradients (threshold included) through the
  sparse training step: SAELens's runner trains with our kernels when the config names it.

When the kernels run. Under torch.no_grad() / torch.inference_mode() (what SAELens's evals and
most analysis use), encode runs the fused encoder, forward runs the fused encoder into the
sparse decode (no dense [tokens, d_sae] tensor at all), and decode compacts the dense
activations it is given and decodes them sparsely. Where autograd must see the SAE (grad
enabled and a parameter or the input requiring grad), or where a hook sits on
hook_sae_acts_pre or hook_sae_acts_post (they need the dense tensors), SAELens's own dense math
runs for that call, so no gradient or hook is ever lost. Training always runs the sparse step.

What is refused, never silently run slow or differently (ValueError / TypeError naming the
field): another architecture; for training, jumprelu_sparsity_loss_mode "tanh" ("step" and
Gemma Scope 2's "quadratic" run), jumprelu_ste_to_input=True, pre_act_loss_coefficient,
normalize_activations "layer_norm" or "constant_norm_rescale", and autocast.

Saved files stay plain SAELens files: the training SAE saves its inference model as
architecture "jumprelu", and the accelerated classes write their plain architecture in
cfg.to_dict(), so anyone can load what they save; `JumpReLUFastSAE.load_from_disk` and
`.from_pretrained` load such files straight onto our kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import registry as _registry
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import SAE, SAEMetadata, TrainStepInput, TrainStepOutput
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
)

from . import backends, ops
from ._checks import FLOAT_DTYPES
from .sparse import SparseActs

__all__ = [
    "ARCHITECTURE", "JumpReLUFastSAE", "JumpReLUFastSAEConfig", "JumpReLUFastSkipTranscoder",
    "JumpReLUFastSkipTranscoderConfig", "JumpReLUFastTrainingSAE", "JumpReLUFastTrainingSAEConfig",
    "JumpReLUFastTranscoder", "JumpReLUFastTranscoderConfig", "accelerate"
]

ARCHITECTURE = "jumprelu_fast"


# ------------------------------------------------------------------ the shared fast path
def _hooked(hook_point) -> bool:
    """Whether a SAELens HookPoint has a hook that needs its tensor (module or global hooks)."""
    m = torch.nn.modules.module
    return bool(
        getattr(hook_point, "_forward_hooks", None) or getattr(hook_point, "_forward_pre_hooks", None) or
        m._global_forward_hooks or m._global_forward_pre_hooks)


class _Kernels:
    """encode / forward on sae_fast's kernels for a SAELens JumpReLU SAE or transcoder.

    The host class provides SAELens's process_sae_in, hook points, W_enc, b_enc, threshold,
    W_dec, b_dec, and the backend name in `sae_fast_backend`; its own encode / forward are
    what runs wherever the kernels do not."""

    sae_fast_backend: str = "auto"

    def _kernels_ok(self, x: torch.Tensor) -> bool:
        if self.dtype not in FLOAT_DTYPES:
            return False  # float64 SAEs: SAELens's math
        # autograd must see this call: SAELens's differentiable math runs
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _enc_args(self):
        # threshold compared in float32: exact for bf16/fp16 values, as SAELens's comparison is
        return self.W_enc, self.b_enc, self.threshold.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if _hooked(self.hook_sae_acts_pre) or not self._kernels_ok(x):
            return super().encode(x)
        sae_in = self.process_sae_in(x)
        flat = sae_in.reshape(-1, sae_in.shape[-1])
        acts = ops.jumprelu_encode(flat, *self._enc_args(), backend=self.sae_fast_backend)
        return self.hook_sae_acts_post(acts.reshape(*sae_in.shape[:-1], acts.shape[-1]))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        # Dense activations are sparse in fact: compacted (one scan) and decoded sparsely. The
        # compact form holds at most 3x the input's bytes (int64 index + value per nonzero).
        if (not self._kernels_ok(feature_acts) or feature_acts.is_sparse or feature_acts.dtype != self.W_dec.dtype or
                feature_acts.dim() < 1):
            return super().decode(feature_acts)
        sp = SparseActs.from_dense(feature_acts.reshape(-1, feature_acts.shape[-1]))
        out = ops.sparse_decode(sp, self.W_dec, self.b_dec, backend=self.sae_fast_backend)
        out = self.hook_sae_recons(out.reshape(*feature_acts.shape[:-1], out.shape[-1]))
        if isinstance(self, JumpReLUTranscoder):
            return out  # SAELens's transcoders stop at hook_sae_recons
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """hook_sae_recons(decode(encode(x))) through encode_sparse + sparse decode, or None where
        this call must take SAELens's path (hooks on the activations, autograd, the error term)."""
        if (getattr(self, "use_error_term", False) or _hooked(self.hook_sae_acts_pre) or
                _hooked(self.hook_sae_acts_post) or not self._kernels_ok(x)):
            return None
        sae_in = self.process_sae_in(x)
        flat = sae_in.reshape(-1, sae_in.shape[-1])
        sp = ops.jumprelu_encode_sparse(flat, *self._enc_args(), backend=self.sae_fast_backend)
        out = ops.sparse_decode(sp, self.W_dec, self.b_dec, backend=self.sae_fast_backend)
        return self.hook_sae_recons(out.reshape(*sae_in.shape[:-1], out.shape[-1]))

    def _sae_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """An SAE's forward (SAE.decode's output steps, then hook_sae_output), or None as above."""
        out = self._sparse_forward(x)
        if out is None:
            return None
        out = self.run_time_activation_norm_fn_out(out)
        return self.hook_sae_output(self.reshape_fn_out(out, self.d_head))


def _plain_dict(cfg, plain_architecture: str) -> dict[str, Any]:
    d = dataclasses.asdict(cfg) | {"metadata": cfg.metadata.to_dict()}
    d["architecture"] = plain_architecture
    d["metadata"]["sae_fast_architecture"] = cfg.architecture()
    d.pop("sae_fast_backend", None)
    return d


# --------------------------------------------------------------------------- inference SAE
@dataclass
class JumpReLUFastSAEConfig(JumpReLUSAEConfig):
    """SAELens's JumpReLUSAEConfig, on sae_fast's kernels. sae_fast_backend: "auto", "cpu",
    "cuda", "triton" or "torch" (sae_fast.info() lists what runs here)."""

    sae_fast_backend: str = "auto"

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def to_dict(self) -> dict[str, Any]:
        # a plain SAELens "jumprelu" file: the weights are exactly that architecture's
        return _plain_dict(self, "jumprelu")


class JumpReLUFastSAE(_Kernels, JumpReLUSAE):
    """SAELens's JumpReLUSAE with encode and forward on sae_fast's kernels (see the module doc)."""

    cfg: JumpReLUFastSAEConfig

    def __init__(self, cfg: JumpReLUFastSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.sae_fast_backend = backends.check_backend_name(cfg.sae_fast_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._sae_output(x)
        return super().forward(x) if out is None else out

    @classmethod
    def load_from_disk(cls, path, device: str = "cpu", dtype: str | None = None, *, backend: str = "auto",
                       **kwargs) -> JumpReLUFastSAE:
        """SAE.load_from_disk of a SAELens JumpReLU directory, on our kernels (weights not copied)."""
        return accelerate(SAE.load_from_disk(path, device=device, dtype=dtype, **kwargs), backend=backend)

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(cls, release: str, sae_id: str, *args, backend: str = "auto",
                                              **kwargs) -> tuple[JumpReLUFastSAE, dict[str, Any], Any]:
        """SAE.from_pretrained(release, sae_id, ...) (a JumpReLU release), on our kernels."""
        sae, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, *args, **kwargs)
        return accelerate(sae, backend=backend), cfg_dict, sparsity

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, *args, backend: str = "auto", **kwargs) -> JumpReLUFastSAE:
        return cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, *args, backend=backend, **kwargs)[0]


# ----------------------------------------------------------------------------- transcoders
@dataclass
class JumpReLUFastTranscoderConfig(JumpReLUTranscoderConfig):
    sae_fast_backend: str = "auto"

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder_fast"

    def to_dict(self) -> dict[str, Any]:
        return _plain_dict(self, "jumprelu_transcoder")


@dataclass
class JumpReLUFastSkipTranscoderConfig(JumpReLUSkipTranscoderConfig):
    sae_fast_backend: str = "auto"

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder_fast"

    def to_dict(self) -> dict[str, Any]:
        return _plain_dict(self, "jumprelu_skip_transcoder")


class JumpReLUFastTranscoder(_Kernels, JumpReLUTranscoder):
    """SAELens's JumpReLUTranscoder (x -> d_out prediction) with encode and forward on our kernels."""

    def __init__(self, cfg: JumpReLUFastTranscoderConfig):
        super().__init__(cfg)
        self.sae_fast_backend = backends.check_backend_name(cfg.sae_fast_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._sparse_forward(x)
        return super().forward(x) if out is None else out


class JumpReLUFastSkipTranscoder(_Kernels, JumpReLUSkipTranscoder):
    """SAELens's JumpReLUSkipTranscoder (prediction + x @ W_skipᵀ) with encode and forward on our kernels."""

    def __init__(self, cfg: JumpReLUFastSkipTranscoderConfig):
        super().__init__(cfg)
        self.sae_fast_backend = backends.check_backend_name(cfg.sae_fast_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._sparse_forward(x)
        if out is None:
            return super().forward(x)
        return out + x @ self.W_skip.T.to(x.device)


# ------------------------------------------------------------------------------- training
_TRAINING_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")


@dataclass(kw_only=True)
class JumpReLUFastTrainingSAEConfig(JumpReLUTrainingSAEConfig):
    """SAELens's JumpReLUTrainingSAEConfig (every field), trained on sae_fast's sparse step.
    sae_fast_backend: "auto", "cpu", "cuda", "triton" or "torch". Options the sparse step
    does not implement are refused when the SAE is built (see `unsupported`)."""

    sae_fast_backend: str = "auto"

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def get_inference_config_class(self) -> type:
        # The trained SAE is saved as a plain SAELens "jumprelu" SAE, loadable without sae_fast.
        return JumpReLUSAEConfig

    def unsupported(self) -> list[str]:
        """What this config asks for that the sparse step does not do (empty: all supported)."""
        bad = []
        if self.jumprelu_sparsity_loss_mode not in ("step", "quadratic"):
            bad.append(f"jumprelu_sparsity_loss_mode={self.jumprelu_sparsity_loss_mode!r} (supported: 'step', "
                       f"DeepMind's L0 loss, and 'quadratic', Gemma Scope 2's)")
        if self.jumprelu_ste_to_input:
            bad.append("jumprelu_ste_to_input=True (the straight-through gradient reaches the threshold only)")
        if self.pre_act_loss_coefficient is not None:
            bad.append(f"pre_act_loss_coefficient={self.pre_act_loss_coefficient!r} (supported: None)")
        if self.normalize_activations not in _TRAINING_NORMALIZATIONS:
            bad.append(f"normalize_activations={self.normalize_activations!r} (supported: "
                       f"{', '.join(map(repr, _TRAINING_NORMALIZATIONS))})")
        return bad


class JumpReLUFastTrainingSAE(_Kernels, JumpReLUTrainingSAE):
    """SAELens's JumpReLUTrainingSAE whose training_forward_pass runs sae_fast's sparse training
    step: the same loss (mse_loss + l0_loss) and the same gradients for every parameter,
    threshold included, with the same threshold projection (clamped at 0 before each step).

    TrainStepOutput.feature_acts is a sparse COO tensor [batch, d_sae] (SAELens's trainer
    accepts those, as for its TopK SAEs); hidden_pre is the same COO tensor, the pre-activations
    on the active set: the dense [batch, d_sae] pre is what the sparse step never forms."""

    cfg: JumpReLUFastTrainingSAEConfig

    def __init__(self, cfg: JumpReLUFastTrainingSAEConfig, use_error_term: bool = False):
        bad = cfg.unsupported()
        if bad:
            raise ValueError(f"architecture {ARCHITECTURE!r} does not support " + "; ".join(bad) +
                             ": use architecture 'jumprelu' (SAELens's dense JumpReLU) for these options")
        super().__init__(cfg, use_error_term)
        self.sae_fast_backend = backends.check_backend_name(cfg.sae_fast_backend)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)  # SAELens's projection, before every step
        device_type = step_input.sae_in.device.type
        if torch.is_autocast_enabled(device_type):
            raise ValueError(f"architecture {ARCHITECTURE!r} does not run under autocast (the runner's "
                             f"autocast=True): sae_fast's kernels compute in the SAE's own dtype; set the SAE "
                             f"config's dtype (e.g. 'bfloat16') instead")
        x = self.hook_sae_input(step_input.sae_in.to(self.dtype))
        quadratic = self.cfg.jumprelu_sparsity_loss_mode == "quadratic"
        out = ops.jumprelu_sae_loss(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                    l0_coefficient=step_input.coefficients["l0"], bandwidth=self.bandwidth,
                                    apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
                                    target_l0=self.cfg.target_l0 if quadratic else None, backend=self.sae_fast_backend)
        acts = out.acts.to_sparse_coo()
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=out.reconstruction, feature_acts=acts, hidden_pre=acts,
                               loss=out.loss, losses={"mse_loss": out.mse_loss, "l0_loss": out.l0_loss})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._sae_output(x)
        return super().forward(x) if out is None else out


# ------------------------------------------------------------------------------ accelerate
_ACCELERATED = {
    JumpReLUSAE: (JumpReLUFastSAE, JumpReLUFastSAEConfig),
    JumpReLUSkipTranscoder: (JumpReLUFastSkipTranscoder, JumpReLUFastSkipTranscoderConfig),
    JumpReLUTranscoder: (JumpReLUFastTranscoder, JumpReLUFastTranscoderConfig),
    JumpReLUTrainingSAE: (JumpReLUFastTrainingSAE, JumpReLUFastTrainingSAEConfig),
}


def accelerate(sae, *, backend: str = "auto", copy: bool = False):
    """The SAELens object equivalent to `sae` on sae_fast's kernels.

    sae: a SAELens JumpReLUSAE, JumpReLUTranscoder, JumpReLUSkipTranscoder or
    JumpReLUTrainingSAE (e.g. from SAE.from_pretrained(release, sae_id)). The result is the
    matching class of this module, with the same config (architecture aside), the same hooks
    layout and the same outputs.

    Weights: shared by default (the new module holds the very same Parameter objects: no
    memory is doubled, and training or editing one changes the other); copy=True gives it
    copies. An already accelerated SAE comes back as is (backend unchanged).
    Anything else (another architecture) raises TypeError.
    """
    backends.check_backend_name(backend)
    if isinstance(sae, tuple(cls for cls, _ in _ACCELERATED.values())):
        return sae
    if type(sae) not in _ACCELERATED:
        arch = getattr(getattr(sae, "cfg", None), "architecture", lambda: None)()
        raise TypeError(f"accelerate: sae must be a SAELens JumpReLUSAE, JumpReLUTranscoder, JumpReLUSkipTranscoder "
                        f"or JumpReLUTrainingSAE, got {type(sae).__name__} (architecture {arch!r}); sae_fast "
                        f"accelerates JumpReLU only")
    cls, cfg_cls = _ACCELERATED[type(sae)]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {f.name: getattr(sae.cfg, f.name) for f in dataclasses.fields(sae.cfg) if f.name in names}
    values["metadata"] = SAEMetadata(**sae.cfg.metadata.to_dict())
    values["sae_fast_backend"] = backend
    device = values.get("device", "cpu")
    cfg = cfg_cls(**{**values, "device": "meta"})  # no init on the real device: the weights come next
    new = cls(cfg)
    new._use_error_term = sae._use_error_term  # set directly: the setter warns about a deprecated use
    new.cfg.device = device
    new.device, new.dtype = sae.device, sae.dtype
    with torch.no_grad():
        for name, p in sae.named_parameters():
            setattr(new, name, torch.nn.Parameter(p.detach().clone(), p.requires_grad) if copy else p)
    new.train(sae.training)
    if hasattr(sae, "bandwidth"):
        new.bandwidth = sae.bandwidth
    return new


# ---------------------------------------------------------------------------- registering
def _register() -> None:
    inference = {
        ARCHITECTURE: (JumpReLUFastSAE, JumpReLUFastSAEConfig),
        "jumprelu_transcoder_fast": (JumpReLUFastTranscoder, JumpReLUFastTranscoderConfig),
        "jumprelu_skip_transcoder_fast": (JumpReLUFastSkipTranscoder, JumpReLUFastSkipTranscoderConfig),
    }
    for name, (cls, cfg_cls) in inference.items():
        if name not in _registry.SAE_CLASS_REGISTRY:  # importing twice (reloads) registers once
            _registry.register_sae_class(name, cls, cfg_cls)
    if ARCHITECTURE not in _registry.SAE_TRAINING_CLASS_REGISTRY:
        _registry.register_sae_training_class(ARCHITECTURE, JumpReLUFastTrainingSAE, JumpReLUFastTrainingSAEConfig)


_register()
