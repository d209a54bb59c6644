"""Run SAELens's own training runner (LanguageModelSAETrainingRunner) offline on CPU for a few steps and return the
loss curve, on a tiny random-weight TransformerLens model and a pre-tokenized in-memory dataset built here (no download,
no tokenizer, no wandb). For checking that an architecture registered with `sae_lens.register_sae_training_class`
(e.g. "jumprelu_fast") trains like a built-in one ("jumprelu"): same seed and initial weights, same curve. Needs
sae-lens, transformer-lens and datasets: import it after `pytest.importorskip("sae_lens")`."""

from __future__ import annotations

import logging
import math
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from transformer_lens import HookedTransformer, HookedTransformerConfig

# The tiny model: one block whose hook_mlp_out (d_model wide) is the SAE input.
D_MODEL = 16
D_VOCAB = 64
N_CTX = 16
HOOK_NAME = "blocks.0.hook_mlp_out"


def tiny_model(seed: int = 0, *, n_layers: int = 1, d_model: int = D_MODEL, n_heads: int = 4, d_vocab: int = D_VOCAB,
               n_ctx: int = N_CTX, device: str = "cpu") -> HookedTransformer:
    """A random-weight HookedTransformer (relu MLP, LayerNorm, no tokenizer), the same weights for the same seed.

    Seeded through a forked torch RNG, so the caller's global RNG state is left as it was."""
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads,
                                  d_mlp=4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="relu",
                                  normalization_type="LN", device=device)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated" (transformer-lens 3)
        torch.manual_seed(seed)
        model = HookedTransformer(cfg)
    return model.eval()


def tiny_token_dataset(n_seqs: int = 256, context_size: int = N_CTX, d_vocab: int = D_VOCAB, seed: int = 0) -> Dataset:
    """An in-memory pre-tokenized `datasets.Dataset` with one column, "input_ids" (n_seqs rows of context_size ints).

    A tokenized column makes SAELens's ActivationsStore use the rows as they are: no tokenizer, no BOS, no download."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (n_seqs, context_size), generator=g)
    return Dataset.from_dict({"input_ids": tokens.tolist()})


@dataclass
class SAELensRun:
    """What `train_saelens` returns."""

    losses: list[float]  # TrainStepOutput.loss.item() of every step, in order
    loss_terms: list[dict[str, float]]  # TrainStepOutput.losses of every step (e.g. mse_loss, l0_loss)
    sae: TrainingSAE  # the trained SAE, as runner.run() returns it
    initial_state: dict[str, torch.Tensor] = field(repr=False)  # the SAE's state_dict before the first step
    runner: LanguageModelSAETrainingRunner = field(repr=False)


def _item(value: Any) -> float:
    value = value() if callable(value) else value
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _record_steps(sae: TrainingSAE, losses: list[torch.Tensor], terms: list[dict[str, Any]]) -> None:
    """Wrap the instance's `training_forward_pass`, which SAETrainer._train_step calls once per step and whose output's
    `loss` it backpropagates; the bound method stays on the class, so nothing global is patched."""
    forward = sae.training_forward_pass

    def training_forward_pass(step_input: TrainStepInput) -> TrainStepOutput:
        out = forward(step_input)
        losses.append(out.loss.detach())
        terms.append({k: v.detach() if isinstance(v, torch.Tensor) else _item(v) for k, v in out.losses.items()})
        return out

    sae.training_forward_pass = training_forward_pass  # type: ignore[method-assign]


def train_saelens(architecture: str, workdir: str | Path, *, steps: int = 8, seed: int = 0, d_sae: int = 64,
                  sae_kwargs: dict[str, Any] | None = None, initial_state: dict[str, torch.Tensor] | None = None,
                  model: HookedTransformer | None = None, dataset: Dataset | None = None,
                  **runner_kwargs: Any) -> SAELensRun:
    """Train an SAE of `architecture` with SAELens's LanguageModelSAETrainingRunner for `steps` steps, offline.

    - architecture: a key of SAELens's training-class registry; the SAE config is
      `get_sae_training_class(architecture)[1](d_in=..., d_sae=d_sae, device=..., **sae_kwargs)`, so sae_kwargs
      sets l0_coefficient, jumprelu_bandwidth, jumprelu_init_threshold, jumprelu_sparsity_loss_mode, ... (d_in defaults
      to the hook's width). A new architecture must also be registered for inference
      (`sae_lens.registry.register_sae_class`): TrainingSAEConfig.__post_init__ looks its inference config class up.
    - initial_state: a state_dict loaded (strictly) into the SAE before training, e.g. `run.initial_state` of a run of
      another architecture, so that two architectures start from the same weights whatever their init does.
    - model, dataset: default to `tiny_model(seed)` and a `tiny_token_dataset` large enough for the run.
    - runner_kwargs: LanguageModelSAERunnerConfig fields over the defaults below (train_batch_size_tokens=64, lr=1e-3,
      hook_name, context_size, ...); training_tokens defaults to steps * train_batch_size_tokens, one batch a step.

    Offline and quiet: model and dataset are passed as the runner's override_model / override_dataset (the dataset is
    pre-tokenized, so no tokenizer and no hub check), logger.log_to_wandb=False, output_path=None (nothing saved; set
    it, under workdir, to save the final SAE), checkpoint_path under workdir (written only if n_checkpoints > 0 or
    save_final_checkpoint). Deterministic: SAELens never reads cfg.seed, so the global torch RNG is seeded here, with
    `seed` before the SAE is built (its init) and `seed + 1` before training (the activation buffer's shuffles), so the
    data order does not depend on how much RNG an architecture's init draws; the caller's RNG state is restored after.
    The per-step losses are recorded by wrapping the SAE instance's `training_forward_pass` (see `_record_steps`);
    with compile_sae=True the runner compiles that wrapper. The runner installs SIGINT/SIGTERM handlers (so it must run
    in the main thread); the previous handlers are put back afterwards."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = tiny_model(seed)
    cfg_kwargs: dict[str, Any] = dict(model_name="tiny-random-hooked-transformer", model_class_name="HookedTransformer",
                                      hook_name=HOOK_NAME, dataset_path="", streaming=False, is_dataset_tokenized=True,
                                      context_size=model.cfg.n_ctx, prepend_bos=False, exclude_special_tokens=False,
                                      store_batch_size_prompts=4, n_batches_in_buffer=8, train_batch_size_tokens=64,
                                      lr=1e-3, device="cpu", dtype="float32", seed=seed, autocast=False,
                                      autocast_lm=False, compile_llm=False, compile_sae=False,
                                      logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0,
                                      checkpoint_path=str(workdir / "checkpoints"), output_path=None, verbose=False)
    cfg_kwargs.update(runner_kwargs)
    cfg_kwargs.setdefault("training_tokens", steps * cfg_kwargs["train_batch_size_tokens"])
    if dataset is None:
        n_seqs = 2 * math.ceil(cfg_kwargs["training_tokens"] / cfg_kwargs["context_size"])
        n_seqs += 2 * cfg_kwargs["store_batch_size_prompts"] * cfg_kwargs["n_batches_in_buffer"]
        dataset = tiny_token_dataset(n_seqs, model.cfg.n_ctx, model.cfg.d_vocab, seed)

    sae_kwargs = dict(sae_kwargs or {})
    sae_kwargs.setdefault("device", cfg_kwargs["device"])
    if "d_in" not in sae_kwargs:
        hook = cfg_kwargs["hook_name"]
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device),
                                            names_filter=[hook])
        acts = cache[hook][0, 0]  # (d,) or (n_heads, d_head): SAELens flattens heads unless hook_head_index is set
        sae_kwargs["d_in"] = acts.shape[-1] if cfg_kwargs.get("hook_head_index") is not None else acts.numel()
    sae_cfg_class = get_sae_training_class(architecture)[1]

    losses: list[torch.Tensor] = []
    terms: list[dict[str, Any]] = []
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    with torch.random.fork_rng(), warnings.catch_warnings():
        # SAELens noise: it compares the dataset's rows with training_tokens, and torch.tensor()s its tensor rows
        warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        torch.manual_seed(seed)
        cfg = LanguageModelSAERunnerConfig(sae=sae_cfg_class(d_sae=d_sae, **sae_kwargs), **cfg_kwargs)
        quiet, level = logging.getLogger("sae_lens"), logging.getLogger("sae_lens").level
        quiet.setLevel(logging.ERROR)  # its warnings that override_model / override_dataset replace the config's
        try:
            runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
        finally:
            quiet.setLevel(level)
        if initial_state is not None:
            runner.sae.load_state_dict(initial_state)
        start = {k: v.detach().clone() for k, v in runner.sae.state_dict().items()}
        _record_steps(runner.sae, losses, terms)
        torch.manual_seed(seed + 1)
        try:
            sae = runner.run()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    loss_terms = [{k: _item(v) for k, v in t.items()} for t in terms]
    return SAELensRun(losses=[_item(x) for x in losses], loss_terms=loss_terms, sae=sae, initial_state=start,
                      runner=runner)


def run_saelens_training(architecture: str, workdir: str | Path, *, steps: int = 8, seed: int = 0, d_sae: int = 64,
                         sae_kwargs: dict[str, Any] | None = None, **runner_kwargs: Any) -> list[float]:
    """The per-step total training loss (TrainStepOutput.loss.item(), in step order) of `train_saelens`.

    Keyword arguments beyond the named ones go to `train_saelens` (initial_state, model, dataset, then
    LanguageModelSAERunnerConfig fields)."""
    return train_saelens(architecture, workdir, steps=steps, seed=seed, d_sae=d_sae, sae_kwargs=sae_kwargs,
                         **runner_kwargs).losses
