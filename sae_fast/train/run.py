"""train(cfg): the whole job, from a model (or any activation source) to a saved SAE."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from ..dtypes import DTYPES as _DTYPES
from ..modules import JumpReLUTranscoder
from .config import TrainConfig
from .data import (
    MLPSites,
    ModelActivations,
    ModelActivationSource,
    ModelTranscoderActivations,
    TokenStream,
    check_data_paths,
    hook_module,
    iter_documents,
    load_model,
)
from .trainer import Trainer, latest_checkpoint, pick_device


class _Logger:
    """JSON lines always; a tqdm bar and wandb when asked and available."""

    def __init__(self, cfg: TrainConfig, path: str, total: int, start: int):
        self.f = open(path, "a")
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="sae-fast train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.wandb = None
        if cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict())
            except ImportError:
                print("sae-fast: --wandb-project given but wandb is not installed; logging to JSON lines only",
                      file=sys.stderr)

    def __call__(self, rec: dict, show: bool):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.wandb is not None:
            self.wandb.log(rec, step=rec.get("step"))
        if self.bar is not None:
            self.bar.update(1)
            if show:
                self.bar.set_postfix(mse=f"{rec['mse']:.4g}", fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}",
                                     dead=f"{rec['dead_frac']:.2f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.f.close()


def _keep(ids, tokenizer):
    """The positions an SAE reads and writes: all but BOS."""
    bos = tokenizer.bos_token_id
    return ids != bos if bos is not None else torch.ones_like(ids, dtype=torch.bool)


def _replace(out, keep, fn):
    """A forward hook's new output: fn(h[keep]) at the kept positions, h elsewhere."""
    h = out[0] if isinstance(out, tuple) else out
    new = h.clone()
    new[keep] = fn(h[keep]).to(h.dtype)
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _eval_record(tot: dict, targets: torch.Tensor) -> dict:
    """The evaluation's metrics from its running sums; FVU against the variance of `targets`
    (the activations an SAE reconstructs, or the MLP outputs a transcoder predicts)."""
    var = float((targets - targets.mean(0)).pow(2).sum())
    return {
        "eval_l0": tot["l0"] / max(tot["n"], 1), "eval_fvu": tot["sq"] / max(var, 1e-12),
        "clean_loss": tot["clean"] / tot["lm_n"], "spliced_loss": tot["spliced"] / tot["lm_n"],
        "delta_loss": (tot["spliced"] - tot["clean"]) / tot["lm_n"], "eval_tokens": tot["n"]
    }


@torch.no_grad()
def evaluate(sae, model, tokenizer, layer: int, site: str, contexts: torch.Tensor, batch: int = 8) -> dict:
    """L0, FVU and the LM loss with the SAE spliced in at (layer, site) against the clean loss,
    on held-out contexts. `sae` works on raw activations. BOS positions are left untouched.
    A JumpReLUTranscoder is evaluated by evaluate_transcoder (`site` is not used)."""
    if isinstance(sae, JumpReLUTranscoder):
        return evaluate_transcoder(sae, model, tokenizer, layer, contexts, batch)
    module = hook_module(model, layer, site)
    acts = ModelActivations(model, tokenizer, layer, site)
    dev = next(model.parameters()).device
    tot = {"clean": 0.0, "spliced": 0.0, "sq": 0.0, "var": 0.0, "l0": 0.0, "n": 0, "lm_n": 0}
    xs = []
    for i in range(0, contexts.shape[0], batch):
        ids = contexts[i:i + batch].to(dev)
        x = acts(ids)
        xs.append(x.float().cpu())
        sp = sae.encode_sparse(x.to(sae.dtype))
        rec = sae.decode(sp).float()
        tot["sq"] += float((rec - x.float()).pow(2).sum())
        tot["l0"] += float(sp.counts.sum())
        tot["n"] += x.shape[0]
        clean = model(ids, labels=ids).loss.item()
        keep = _keep(ids, tokenizer)

        def splice(_m, _inp, out, keep=keep):
            return _replace(out, keep, lambda h: sae(h.to(sae.dtype)))

        hnd = module.register_forward_hook(splice)
        try:
            spliced = model(ids, labels=ids).loss.item()
        finally:
            hnd.remove()
        tot["clean"] += clean * ids.shape[0]
        tot["spliced"] += spliced * ids.shape[0]
        tot["lm_n"] += ids.shape[0]
    return _eval_record(tot, torch.cat(xs))


@torch.no_grad()
def evaluate_transcoder(tc: JumpReLUTranscoder, model, tokenizer, layer: int, contexts: torch.Tensor,
                        batch: int = 8) -> dict:
    """A transcoder of layer `layer`'s MLP on held-out contexts: L0, FVU against the real MLP
    output, and the LM loss with the transcoder's prediction tc(x) replacing the MLP output
    (x captured at the input site of the same forward) against the clean loss. `tc` works on
    raw activations. BOS positions are left untouched."""
    sites = MLPSites(model, layer)
    dev = next(model.parameters()).device
    tot = {"clean": 0.0, "spliced": 0.0, "sq": 0.0, "l0": 0.0, "n": 0, "lm_n": 0}
    ys = []
    for i in range(0, contexts.shape[0], batch):
        ids = contexts[i:i + batch].to(dev)
        keep = _keep(ids, tokenizer)
        seen = {}

        def record(_m, _inp, out, seen=seen):
            seen["y"] = (out[0] if isinstance(out, tuple) else out).clone()

        # the clean forward records the input and the real MLP output too
        hs = [
            sites.hook_in(lambda x, seen=seen: seen.update(x=x.clone())),
            sites.out_module.register_forward_hook(record)
        ]
        try:
            clean = model(ids, labels=ids).loss.item()
        finally:
            for h in hs:
                h.remove()
        x, y = seen["x"][keep].to(tc.dtype), seen["y"][keep].float()
        ys.append(y.cpu())
        tot["sq"] += float((tc(x).float() - y).pow(2).sum())
        tot["l0"] += float(tc.encode_sparse(x).counts.sum())
        tot["n"] += x.shape[0]
        live = {}

        def splice(_m, _inp, out, keep=keep, live=live):
            return _replace(out, keep, lambda _h: tc(live["x"][keep].to(tc.dtype)))

        hs = [sites.hook_in(lambda x, live=live: live.update(x=x)), sites.out_module.register_forward_hook(splice)]
        try:
            spliced = model(ids, labels=ids).loss.item()
        finally:
            for h in hs:
                h.remove()
        tot["clean"] += clean * ids.shape[0]
        tot["spliced"] += spliced * ids.shape[0]
        tot["lm_n"] += ids.shape[0]
    return _eval_record(tot, torch.cat(ys))


def train(cfg: TrainConfig, *, source=None, d_in: int | None = None, d_out: int | None = None,
          resume: bool = False) -> dict:
    """Train an SAE, or with cfg.transcoder a transcoder. With `source` (anything with
    next_chunk/state_dict/load_state_dict) and `d_in` (and a transcoder's `d_out`, default
    d_in: the source then yields [tokens, d_in + d_out] rows, input then target), no model is
    loaded (synthetic or precomputed activations); otherwise the model and text of `cfg` are
    used. Returns the final metrics and where the SAE (or transcoder) was saved."""
    cfg.validate()
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    model = tok = eval_ctx = hook_points = None
    if source is None:
        check_data_paths(cfg.data, cfg.dataset)
        model, tok = load_model(cfg.model, device, _DTYPES[cfg.model_dtype])
        # built before any work: rejects a bad layer/site
        if cfg.transcoder:
            acts = ModelTranscoderActivations(model, tok, cfg.layer)
            hook_points = acts.hook_points
        else:
            acts = ModelActivations(model, tok, cfg.layer, cfg.site)
        docs = lambda: iter_documents(cfg.data, cfg.dataset, cfg.dataset_split, cfg.text_column)  # noqa: E731
        stream = TokenStream(tok, docs, cfg.context_length)
        eval_ctx = stream.next(cfg.eval_contexts) if cfg.eval_contexts else None
        source = ModelActivationSource(acts, stream, cfg.model_batch_size)
        # a decoder layer's MLP maps the residual width to itself
        d_in = d_out = (model.config.hidden_size
                        if hasattr(model.config, "hidden_size") else model.config.get_text_config().hidden_size)
    trainer = Trainer(cfg, source, d_in, d_out=d_out, device=device, hook_points=hook_points)
    ckpt = latest_checkpoint(cfg.out) if resume else None
    if resume and ckpt is None:
        print(f"sae-fast: --resume: no checkpoint under {cfg.out}/checkpoints; starting fresh", file=sys.stderr)
    if ckpt:
        trainer.load_checkpoint(ckpt)
        print(f"sae-fast: resumed from {ckpt} at step {trainer.step}", file=sys.stderr)
    log = _Logger(cfg, os.path.join(cfg.out, "train_log.jsonl"), cfg.steps, trainer.step)
    last = {}
    t0 = time.perf_counter()
    try:
        while trainer.step < cfg.steps:
            rec = trainer.train_step()
            show = rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.steps
            log(rec, show)
            last = rec
            if cfg.checkpoint_every and rec["step"] % cfg.checkpoint_every == 0 and rec["step"] < cfg.steps:
                trainer.save_checkpoint(os.path.join(cfg.out, "checkpoints", f"step_{rec['step']:09d}"))
    finally:
        log.close()
    wall = time.perf_counter() - t0
    trainer.save_checkpoint(os.path.join(cfg.out, "checkpoints", f"step_{trainer.step:09d}"))
    final = trainer.folded_sae()
    sae_dir = os.path.join(cfg.out, "sae")
    final.save_pretrained(sae_dir)
    result = {
        "kind": "transcoder" if cfg.transcoder else "sae", "sae_path": os.path.abspath(sae_dir), "steps": trainer.step,
        "tokens": trainer.step * cfg.batch_size, "wall_s": wall, "normalization_scale": trainer.scale,
        **{k: last.get(k)
           for k in ("mse", "fvu", "l0", "dead_frac", "tokens_per_s")}
    }
    if cfg.transcoder:
        # mse and fvu above are against the target (the MLP output)
        result.update({
            "affine_skip": cfg.affine_skip, "normalization_scale_out": trainer.scale_out,
            "hook_point_in": trainer.hook_points["in"], "hook_point_out": trainer.hook_points["out"]
        })
    if cfg.target_l0 is not None:
        result["target_l0"] = cfg.target_l0
    if model is not None and eval_ctx is not None and eval_ctx.shape[0]:
        final.eval()
        result.update(evaluate(final, model, tok, cfg.layer, cfg.site, eval_ctx, cfg.model_batch_size))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    return result
