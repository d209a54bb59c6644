"""train(cfg): the whole job, from a model (or any activation source) to a saved SAE."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import torch

from ..dtypes import DTYPES as _DTYPES
from ..modules import JumpReLUTranscoder
from .config import TrainConfig, TrainSetupError
from .data import (
    MLPSites,
    ModelActivations,
    ModelActivationSource,
    ModelTranscoderActivations,
    TokenStream,
    check_data_paths,
    check_data_text,
    check_layer,
    check_model_path,
    check_token_count,
    hook_module,
    iter_documents,
    load_model,
    load_tokenizer,
)
from .trainer import (
    CheckpointError,
    Trainer,
    check_resume_config,
    list_checkpoints,
    pick_device,
    read_checkpoint,
    resume_checkpoint,
)


def strict_json(v):
    """v with every NaN/inf float (an undefined metric: the dead fraction before its first
    window, an FVU of constant targets) replaced by None, so json.dumps(..., allow_nan=False)
    writes strict JSON (null) that any parser reads."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def _dumps(rec, **kw) -> str:
    return json.dumps(strict_json(rec), allow_nan=False, **kw)


# ------------------------------------------------------------------- --out
# What a run writes under --out, so what --overwrite may delete (and their temporaries).
RUN_ENTRIES = ("sae", "checkpoints", "train_log.jsonl", "metrics.json", "superseded", "dashboard")
LOG_NAME = "train_log.jsonl"


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or name.endswith(".tmp") and name[:-4] in RUN_ENTRIES


def _show(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_out_dir(out: str, resume, overwrite: bool) -> None:
    """Refuse (TrainSetupError) --resume with --overwrite, an --out that is a file, and a
    non-empty --out without either; with --overwrite, an --out holding anything a run does not
    write (--overwrite deletes run directories only, never someone's other files)."""
    if resume and overwrite:
        raise TrainSetupError("--resume and --overwrite exclude each other: --resume continues the run under --out, "
                              "--overwrite deletes it and starts a new one; pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainSetupError(f"--out {out!r} is a file; --out expects a directory (new, empty, or holding a run)")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries or resume:
        return
    if not overwrite:
        raise TrainSetupError(f"--out {out!r} is not empty (it holds {_show(entries)}): pass --resume to continue the "
                              f"run in it, or --overwrite to delete its contents and start a new run (or choose "
                              f"another --out)")
    foreign = [e for e in entries if not _is_run_entry(e)]
    if foreign:
        raise TrainSetupError(f"--overwrite: --out {out!r} holds {_show(foreign)}, which a sae-fast run does not "
                              f"write; --overwrite deletes only a run's own entries ({', '.join(RUN_ENTRIES)}): "
                              f"move the rest away or choose another --out")


def _clear_out_dir(out: str) -> None:
    entries = sorted(os.listdir(out))
    for e in entries:
        p = os.path.join(out, e)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    print(f"sae-fast: --overwrite: deleted {', '.join(entries)} from {out}", file=sys.stderr)


def _split_log(path: str, step: int) -> tuple[list[dict], list[str]]:
    """(the records of steps <= step, the raw lines after them: later steps and any line
    that does not parse, such as one cut short by a crash)."""
    keep, cut = [], []
    if not os.path.isfile(path):
        return keep, cut
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)  # lenient: logs written before this release hold NaN
            except ValueError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(rec)
            else:
                cut.append(line if line.endswith("\n") else line + "\n")
    return keep, cut


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _set_aside(out: str, step: int, steps: int) -> dict:
    """Resuming at `step`: what the run under `out` did after that step belongs to no run any
    more (a continuation that is replaced), so it is moved, never mixed in nor deleted, to
    out/superseded/after_step_<step>_<time>/: the checkpoints of later steps, the final sae/
    and metrics.json (unless the run ended at `step` itself: they are then written again,
    the same) and the train_log.jsonl records of later steps. The log keeps steps <= step,
    rewritten as strict JSON. Returns the log's last kept record (the step's metrics) or {}."""
    later = [p for n, p in list_checkpoints(out) if n > step]
    ends = [e for e in ("sae", "metrics.json") if step < steps and os.path.exists(os.path.join(out, e))]
    log = os.path.join(out, LOG_NAME)
    keep, cut = _split_log(log, step)
    if os.path.isfile(log):
        _write_atomic(log, "".join(_dumps(r) + "\n" for r in keep))
    if later or ends or cut:
        base = os.path.join(out, "superseded", f"after_step_{step:09d}_{time.strftime('%Y%m%d-%H%M%S')}")
        dest, i = base, 1
        while os.path.exists(dest):
            i += 1
            dest = f"{base}_{i}"
        os.makedirs(dest)
        moved = []
        if later:
            os.makedirs(os.path.join(dest, "checkpoints"))
            for p in later:
                os.replace(p, os.path.join(dest, "checkpoints", os.path.basename(p)))
            moved.append("checkpoints " + ", ".join(os.path.basename(p) for p in later))
        for e in ends:
            os.replace(os.path.join(out, e), os.path.join(dest, e))
            moved.append(e + ("/" if e == "sae" else ""))
        if cut:
            with open(os.path.join(dest, LOG_NAME), "w", encoding="utf-8") as f:
                f.writelines(cut)
            moved.append(f"{len(cut)} {LOG_NAME} line(s)")
        print(f"sae-fast: resuming at step {step}: moved what the run wrote after it ({'; '.join(moved)}) to {dest}",
              file=sys.stderr)
    return keep[-1] if keep and keep[-1].get("step") == step else {}


class _Logger:
    """JSON lines always; a tqdm bar and wandb when asked and available."""

    def __init__(self, cfg: TrainConfig, path: str, total: int, start: int):
        self.f = open(path, "a", encoding="utf-8")
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
        self.f.write(_dumps(rec) + "\n")
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
          resume: bool | str = False, overwrite: bool = False) -> dict:
    """Train an SAE, or with cfg.transcoder a transcoder. With `source` (anything with
    next_chunk/state_dict/load_state_dict) and `d_in` (and a transcoder's `d_out`, default
    d_in: the source then yields [tokens, d_in + d_out] rows, input then target), no model is
    loaded (synthetic or precomputed activations); otherwise the model and text of `cfg` are
    used. Returns the final metrics and where the SAE (or transcoder) was saved.

    A non-empty cfg.out is refused unless `resume` (True: continue from its latest checkpoint;
    a path: from that checkpoints/step_N directory of cfg.out, setting aside what came after
    it, see _set_aside) or `overwrite` (delete its contents first). Everything that can be
    checked without the model's weights is checked before they load (TrainSetupError naming
    the setting): the output directory, the checkpoint and its settings, the model path, the
    layer, the data. Nothing under cfg.out changes until the model is loaded and the trainer
    built.

    The result's timings: setup_s (checks, model and text loading, up to the first step),
    wall_s (the training loop), eval_s, dashboard_s, and total_s (this call, through the
    metrics.json it writes last)."""
    t_start = time.perf_counter()
    cfg.validate()
    device = pick_device(cfg.device)
    check_out_dir(cfg.out, resume, overwrite)
    ckpt = state = None
    changes: list[str] = []
    if resume:
        ckpt = resume_checkpoint(cfg.out, resume)
        if ckpt is not None:
            try:
                state = read_checkpoint(ckpt)
            except CheckpointError as e:
                earlier = [p for _, p in list_checkpoints(cfg.out) if os.path.realpath(p) != os.path.realpath(ckpt)]
                if resume is True and earlier:
                    raise CheckpointError(f"{e}; to continue from an earlier checkpoint, pass --resume "
                                          f"{earlier[-1]}") from e
                raise
            changes = check_resume_config(state, cfg, ckpt)
    tok = None
    if source is None:
        check_data_paths(cfg.data, cfg.dataset)
        check_model_path(cfg.model)
        check_layer(cfg.model, cfg.layer)
        check_data_text(cfg.data, cfg.dataset, cfg.dataset_split, cfg.text_column)
        docs = lambda: iter_documents(cfg.data, cfg.dataset, cfg.dataset_split, cfg.text_column)  # noqa: E731
        tok = load_tokenizer(cfg.model)
        if cfg.dataset is None:
            check_token_count(tok, docs, cfg.context_length, cfg.eval_contexts,
                              "--data " + ", ".join(repr(d) for d in cfg.data))
    model = eval_ctx = hook_points = None
    if source is None:
        model, tok = load_model(cfg.model, device, _DTYPES[cfg.model_dtype], tokenizer=tok)
        # built before any work: rejects a site the layer lacks
        if cfg.transcoder:
            acts = ModelTranscoderActivations(model, tok, cfg.layer)
            hook_points = acts.hook_points
        else:
            acts = ModelActivations(model, tok, cfg.layer, cfg.site)
        stream = TokenStream(tok, docs, cfg.context_length, held_out=cfg.eval_contexts)
        eval_ctx = stream.next(cfg.eval_contexts) if cfg.eval_contexts else None
        source = ModelActivationSource(acts, stream, cfg.model_batch_size)
        # a decoder layer's MLP maps the residual width to itself
        d_in = d_out = (model.config.hidden_size
                        if hasattr(model.config, "hidden_size") else model.config.get_text_config().hidden_size)
    trainer = Trainer(cfg, source, d_in, d_out=d_out, device=device, hook_points=hook_points)
    if state is not None:
        trainer.load_state(state)
        del state
    # Everything is checked and loaded (the model too, which rejects a site the layer lacks):
    # only now does anything under --out change.
    if overwrite and os.path.isdir(cfg.out) and os.listdir(cfg.out):
        _clear_out_dir(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    last = {}
    if resume:
        if ckpt is None:
            print(f"sae-fast: --resume: no checkpoint under {cfg.out}/checkpoints; starting fresh", file=sys.stderr)
        else:
            print(f"sae-fast: resumed from {ckpt} at step {trainer.step}", file=sys.stderr)
            for c in changes:
                print(f"sae-fast: resumed with a changed setting that does not change the weights: {c}",
                      file=sys.stderr)
        last = _set_aside(cfg.out, trainer.step, cfg.steps)
    log = _Logger(cfg, os.path.join(cfg.out, "train_log.jsonl"), cfg.steps, trainer.step)
    t0 = time.perf_counter()
    setup_s = t0 - t_start
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
    t_eval = time.perf_counter()
    if model is not None and eval_ctx is not None and eval_ctx.shape[0]:
        final.eval()
        result.update(evaluate(final, model, tok, cfg.layer, cfg.site, eval_ctx, cfg.model_batch_size))
    t_dash = time.perf_counter()
    if model is not None and cfg.explore_tokens > 0:
        # the main job shows what it trained: the explore dashboard of the saved SAE
        from ..explore import explore_dashboard

        # (a model means no source was given: `docs` is the text the run trained on)
        dash = explore_dashboard(final, model, tok, TokenStream(tok, docs, cfg.context_length),
                                 os.path.join(cfg.out, "dashboard"), tokens=cfg.explore_tokens,
                                 context_length=cfg.context_length, batch_size=cfg.model_batch_size,
                                 progress=cfg.progress, model_name=cfg.model)
        result["dashboard"] = dash["index_html"]
        result["dashboard_features"] = dash["features"]
    t_end = time.perf_counter()
    result.update(setup_s=setup_s, eval_s=t_dash - t_eval, dashboard_s=t_end - t_dash, total_s=t_end - t_start)
    # strict JSON: an undefined metric (NaN) is null
    _write_atomic(os.path.join(cfg.out, "metrics.json"), _dumps(result, indent=2) + "\n")
    return result
