"""The training loop: buffer -> normalised batch -> JumpReLU step -> metrics -> checkpoints."""

from __future__ import annotations

import math
import os
import re
import shutil
import time

import torch

from ..dtypes import DTYPES
from ..modules import JumpReLUSAE, JumpReLUTranscoder
from ..step import remove_parallel_component
from ..hooks import HookPoint
from .config import TrainConfig, TrainSetupError, resume_differences
from .data import transcoder_hook_points


class CheckpointError(TrainSetupError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ActivationBuffer:
    """A shuffled buffer of activations on the device, kept in bf16, refilled from the
    source whenever it falls below half full. Its whole state (contents, shuffle RNG,
    source position) goes into checkpoints, so a resume continues bit for bit."""

    def __init__(self, source, size: int, batch_size: int, device: torch.device, seed: int):
        self.source, self.size, self.batch = source, size, batch_size
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.data = torch.empty(0, 0, dtype=torch.bfloat16, device=device)

    def _refill(self):
        chunks = [self.data] if self.data.numel() else []
        have = self.data.shape[0] if self.data.numel() else 0
        while have < self.size:
            c = self.source.next_chunk().to(self.device, torch.bfloat16)
            chunks.append(c)
            have += c.shape[0]
        data = torch.cat(chunks)[:max(self.size, self.batch)]
        self.data = data[torch.randperm(data.shape[0], generator=self.gen).to(self.device)]

    def next(self) -> torch.Tensor:
        if self.data.shape[0] < max(self.size // 2, self.batch):
            self._refill()
        out, self.data = self.data[:self.batch], self.data[self.batch:]
        return out

    def peek(self) -> torch.Tensor:
        if self.data.shape[0] < self.batch:
            self._refill()
        return self.data

    def state_dict(self) -> dict:
        return {"data": self.data.cpu(), "gen": self.gen.get_state(), "source": self.source.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.data = s["data"].to(self.device)
        self.gen.set_state(s["gen"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, constant, linear decay to 0 over the final lr_decay_frac of the steps."""
    warm = min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))
    decay_start = cfg.steps * (1 - cfg.lr_decay_frac)
    decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / max(cfg.steps - decay_start, 1))
    return cfg.lr * warm * decay


def l0_coefficient_at(step: int, cfg: TrainConfig) -> float:
    return cfg.l0_coefficient * min(1.0, (step + 1) / max(cfg.l0_warmup_steps, 1))


def _targets(target) -> tuple:
    # an SAE's training methods take no target (it is x); a transcoder's take (x, target)
    return () if target is None else (target, )


def autograd_step(sae: JumpReLUSAE, opt, x, target=None, *, l0_coefficient: float, bandwidth: float,
                  decoder_unit_norm: bool = True, grad_clip: float = 0.0, target_l0: float | None = None):
    """One training step through autograd: full-size .grad tensors and any torch
    optimizer (torch.optim.Adam in `sae-fast train --optimizer adam`).
    target: a transcoder's target (the MLP output) for input x; None for an SAE.
    target_l0: the quadratic L0 loss's target (None: the linear L0 loss)."""
    out = sae.training_forward(x, *_targets(target), l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                               target_l0=target_l0)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    with torch.no_grad():
        if decoder_unit_norm:
            remove_parallel_component(sae.W_dec, None, sae.W_dec.grad)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    if decoder_unit_norm:
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return out


def row_grads_step(sae: JumpReLUSAE, opt, x, target=None, *, l0_coefficient: float, bandwidth: float,
                   decoder_unit_norm: bool = True, grad_clip: float = 0.0, target_l0: float | None = None):
    """One row-grads training step (what `sae-fast train` runs by default): no autograd
    graph, gradients for the touched features only (RowGrads), the decoder's
    parallel-gradient removal and the clipping on those rows, then the row-sparse optimizer
    (opt: SparseAdamB1Zero.for_sae(sae, decoder_unit_norm=...), which renormalises the
    changed W_dec rows in the same pass).
    Nothing of size [d_sae, d_in] beyond the parameters and the optimizer state.
    target: a transcoder's target (the MLP output) for input x; None for an SAE.
    target_l0: the quadratic L0 loss's target (None: the linear L0 loss)."""
    out, grads = sae.training_row_grads(x, *_targets(target), l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                        target_l0=target_l0)
    if decoder_unit_norm:
        remove_parallel_component(sae.W_dec, grads.rows, grads.W_dec)
    if grad_clip > 0:
        # the untouched features' gradients are exactly zero and add nothing to the norm
        grads.clip_(grad_clip)
    opt.step_rows(grads)
    return out


class Trainer:
    """Trains a JumpReLU SAE on `source`'s [tokens, d_in] chunks, or with cfg.transcoder a
    JumpReLUTranscoder on its [tokens, d_in + d_out] chunks: input x then target y per row
    (d_out defaults to d_in). hook_points: a transcoder's {"in", "out"} hook names for its
    metadata (default: Gemma Scope 2's for cfg.layer)."""

    def __init__(self, cfg: TrainConfig, source, d_in: int, *, d_out: int | None = None,
                 device: torch.device | None = None, log=None, hook_points: dict | None = None):
        self.cfg = cfg.validate()
        self.device = device or pick_device(cfg.device)
        self.d_in = d_in
        self.d_out = (d_out or d_in) if cfg.transcoder else None
        self.hook_points = hook_points or transcoder_hook_points(cfg.layer)
        torch.manual_seed(cfg.seed)
        if cfg.transcoder:
            self.sae = JumpReLUTranscoder(d_in, cfg.d_sae, self.d_out, affine_skip=cfg.affine_skip,
                                          dtype=DTYPES[cfg.dtype], device=self.device, backend=cfg.backend)
        else:
            self.sae = JumpReLUSAE(d_in, cfg.d_sae, dtype=DTYPES[cfg.dtype], device=self.device, backend=cfg.backend,
                                   apply_b_dec_to_input=cfg.apply_b_dec_to_input)
        self.sae.reset_parameters(threshold_init=cfg.threshold_init)
        self.optimizer = cfg.resolved_optimizer
        if self.optimizer == "sparse-adam":
            from ..optim import SparseAdamB1Zero

            # the W_dec rows a step changes are renormalised inside the fused step
            self.opt = SparseAdamB1Zero.for_sae(self.sae, lr=cfg.lr, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                                                decoder_unit_norm=cfg.decoder_unit_norm)
        else:
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                        eps=cfg.adam_eps)
        self.buffer = ActivationBuffer(source, cfg.buffer_tokens, cfg.batch_size, self.device, cfg.seed)
        self.step = 0
        self.scale: float | None = None  # of x (a transcoder's input)
        self.scale_out: float | None = None  # of a transcoder's target y
        # step at which each feature last fired (-1: never), for the dead-feature count
        self.last_fired = torch.full((cfg.d_sae, ), -1, dtype=torch.int64, device=self.device)
        self.log = log
        self.history: list[dict] = []

    # ----------------------------------------------------------- normalisation
    def estimate_scale(self) -> float:
        """One fixed scalar so that mean ||x||^2 = 1, estimated on the first buffer fill;
        for a transcoder a second one, scale_out, so that mean ||y||^2 = 1."""
        data = self.buffer.peek()
        want = self.d_in + (self.d_out or 0)
        if data.shape[-1] != want:
            what = f"d_in + d_out = {self.d_in} + {self.d_out}" if self.cfg.transcoder else f"d_in = {self.d_in}"
            raise ValueError(f"the activation source yields rows of width {data.shape[-1]}, expected {what}")
        inv_rms = lambda t: float(1.0 / math.sqrt(float(t.float().pow(2).sum(-1).mean()) + 1e-12))  # noqa: E731
        self.scale = inv_rms(data[:, :self.d_in])
        if self.cfg.transcoder:
            self.scale_out = inv_rms(data[:, self.d_in:])
        if self.cfg.b_dec_init == "mean":
            # what the decoder predicts: x, or a transcoder's target y, normalised as _split does
            pred = data[:, :self.d_in] if not self.cfg.transcoder else data[:, self.d_in:]
            mean = (pred.float() * (self.scale if not self.cfg.transcoder else self.scale_out)).mean(0)
            with torch.no_grad():
                self.sae.b_dec.copy_(mean.to(self.sae.b_dec.dtype))
        return self.scale

    def _split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised (x, target) in the SAE's dtype; target None for an SAE."""
        dt = self.sae.dtype
        if not self.cfg.transcoder:
            return (batch.float() * self.scale).to(dt), None
        x = (batch[:, :self.d_in].float() * self.scale).to(dt).contiguous()
        y = (batch[:, self.d_in:].float() * self.scale_out).to(dt).contiguous()
        return x, y

    # ----------------------------------------------------------------- a step
    def train_step(self) -> dict:
        cfg = self.cfg
        if self.scale is None:
            self.estimate_scale()
        t0 = time.perf_counter()
        x, y = self._split(self.buffer.next())
        lam = l0_coefficient_at(self.step, cfg)
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        run = row_grads_step if self.optimizer == "sparse-adam" else autograd_step
        quadratic = cfg.l0_loss == "quadratic"
        if quadratic:
            with torch.no_grad():  # its per-token L0 is the active count: exact for threshold >= 0
                self.sae.threshold.clamp_(min=0.0)
        out = run(self.sae, self.opt, x, y, l0_coefficient=lam, bandwidth=cfg.bandwidth,
                  decoder_unit_norm=cfg.decoder_unit_norm, grad_clip=cfg.grad_clip,
                  target_l0=cfg.target_l0 if quadratic else None)
        with torch.no_grad():
            self.last_fired[out.fired] = self.step
            tf = (x if y is None else y).float()  # FVU against what is predicted
            var = (tf - tf.mean(0)).pow(2).sum(-1).mean()
            window = max(1, cfg.dead_window_tokens // cfg.batch_size)
            dead = ((self.last_fired < 0) | (self.last_fired < self.step - window + 1)).float().mean()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        return {
            "step": self.step, "loss": out.loss.item(), "mse": out.mse_loss.item(),
            "fvu": (out.mse_loss / var.clamp_min(1e-12)).item(), "l0": out.l0.item(),
            "dead_frac": dead.item() if self.step >= window else float("nan"), "l0_coefficient": lam, "lr": lr,
            "tokens_per_s": cfg.batch_size / dt
        }

    # ------------------------------------------------------------ checkpoints
    def folded_sae(self) -> JumpReLUSAE:
        """A copy whose weights work on raw (unnormalised) activations, as Gemma Scope's do:
        x_n = s x, so W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s.
        A transcoder (x_n = s x, y_n = t y): y = y_n / t = acts (W_dec / t) + b_dec / t
        + x (s W_skip / t), so W_enc' = s W_enc, W_dec' = W_dec / t, b_dec' = b_dec / t,
        W_skip' = W_skip s / t."""
        if self.cfg.transcoder:
            return self._folded_transcoder()
        s = self.scale or 1.0
        with torch.no_grad():
            folded = {
                "W_enc": self.sae.W_enc.float() * s, "b_enc": self.sae.b_enc, "threshold": self.sae.threshold,
                "W_dec": self.sae.W_dec.float() / s, "b_dec": self.sae.b_dec.float() / s
            }
        sae = JumpReLUSAE.from_params(folded, dtype=self.sae.dtype, device=self.device, backend=self.cfg.backend,
                                      apply_b_dec_to_input=self.cfg.apply_b_dec_to_input)
        sae.metadata = {
            "hook_layer": self.cfg.layer, "hook_name": f"layer{self.cfg.layer}.{self.cfg.site}",
            "hf_hook_point_in": HookPoint.of_site(self.cfg.layer, self.cfg.site).name, "model_name": self.cfg.model,
            "normalization_scale_folded": s
        }
        return sae

    def _folded_transcoder(self) -> JumpReLUTranscoder:
        s, t = self.scale or 1.0, self.scale_out or 1.0
        tc = self.sae
        with torch.no_grad():
            folded = {
                "W_enc": tc.W_enc.float() * s, "b_enc": tc.b_enc, "threshold": tc.threshold,
                "W_dec": tc.W_dec.float() / t, "b_dec": tc.b_dec.float() / t
            }
            if tc.W_skip is not None:
                folded["W_skip"] = tc.W_skip.float() * (s / t)
        out = JumpReLUTranscoder.from_params(folded, dtype=tc.dtype, device=self.device, backend=self.cfg.backend)
        L, hp = self.cfg.layer, self.hook_points
        # SAELens's names for Gemma Scope 2's transcoders: TransformerLens hooks in hook_name(_out),
        # the Hugging Face module paths in hf_hook_name(_out); hf_hook_point_in/out as Gemma Scope 2's
        # own config.json has them
        out.metadata = {
            "model_name": self.cfg.model, "hook_layer": L, "hook_name": f"blocks.{L}.hook_mlp_in",
            "hook_name_out": f"blocks.{L}.hook_mlp_out", "hf_hook_name": hp["in"], "hf_hook_name_out": hp["out"],
            "hf_hook_point_in": hp["in"], "hf_hook_point_out": hp["out"], "affine_skip": tc.affine_skip,
            "normalization_scale_folded": s, "normalization_scale_out_folded": t
        }
        return out

    def save_checkpoint(self, path: str) -> str:
        """SAELens layout (folded weights, usable as is) + trainer_state.pt (exact resume).
        Written to a temporary directory, then renamed: never half-written."""
        if hasattr(self.opt, "flush"):
            # Apply the pending lazy decays: the saved second moments are exactly dense
            # Adam's (loadable into torch.optim.Adam). Done on the live state, so the run
            # that writes a checkpoint and a run resumed from it continue bit for bit alike.
            self.opt.flush()
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.folded_sae().save_pretrained(tmp)
        torch.save(
            {
                "config": self.cfg.to_dict(), "step": self.step, "scale": self.scale, "scale_out": self.scale_out,
                "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "buffer": self.buffer.state_dict(),
                "last_fired": self.last_fired.cpu(), "torch_rng": torch.get_rng_state()
            }, os.path.join(tmp, "trainer_state.pt"))
        # Rewriting a checkpoint (a resumed finished run writes its last one again): the old one
        # is renamed aside, not deleted, until the new one is in place.
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Continue from checkpoint directory `path`; CheckpointError (naming the file) if it is
        unreadable or its settings differ from this run's in anything but RESUME_FREE."""
        st = read_checkpoint(path)
        check_resume_config(st, self.cfg, path)
        self.load_state(st)

    def load_state(self, st: dict) -> None:
        """The trainer state of a checkpoint read by read_checkpoint (and checked against this
        run's settings by check_resume_config)."""
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.buffer.load_state_dict(st["buffer"])
        self.step, self.scale, self.scale_out = st["step"], st["scale"], st.get("scale_out")
        self.last_fired = st["last_fired"].to(self.device)
        torch.set_rng_state(st["torch_rng"])
        self.buffer.source.load_state_dict(st["buffer"]["source"])


def read_checkpoint(path: str) -> dict:
    """The trainer state saved in checkpoint directory `path` (on the CPU), or CheckpointError
    naming the file: missing, unreadable or lacking entries."""
    f = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: no trainer state (not a sae-fast checkpoint directory?)")
    try:
        st = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable or corrupt checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(st, dict) or not {"config", "step", "sae", "optimizer", "buffer", "last_fired", "torch_rng"
                                        } <= set(st) or not isinstance(st["config"], dict):
        raise CheckpointError(f"{f}: corrupt checkpoint (missing trainer state entries)")
    return st


def check_resume_config(st: dict, cfg: TrainConfig, path: str) -> list[str]:
    """Refuse (CheckpointError naming every differing setting, its checkpoint value and this
    run's) to resume checkpoint state `st` with settings that change the run; returns the
    RESUME_FREE settings that differ (allowed: they do not change the trained weights)."""
    mismatches, changes = resume_differences(st["config"], cfg)
    if mismatches:
        raise CheckpointError(f"{os.path.join(path, 'trainer_state.pt')}: checkpoint does not match this run in "
                              f"{len(mismatches)} setting(s): " + "; ".join(mismatches) + ". Resume with the "
                              "checkpoint's settings, or start a new run (another --out, or --overwrite)")
    return changes


_STEP_DIR = re.compile(r"step_(\d+)")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, directory) of each finished checkpoint under out/checkpoints, by step
    (half-written .tmp and replaced .old directories are not checkpoints)."""
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, p)) for p in os.listdir(d) if (m := _STEP_DIR.fullmatch(p))]
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def resume_checkpoint(out: str, resume: bool | str) -> str | None:
    """The checkpoint `--resume` names: True, the latest under out/checkpoints (None if there is
    none); a path, that checkpoint, which must be a checkpoints/step_N directory of `out`."""
    if resume is True:
        return latest_checkpoint(out)
    path = os.fspath(resume)
    want = os.path.realpath(os.path.join(out, "checkpoints"))
    where = os.path.realpath(os.path.dirname(os.path.abspath(path.rstrip("/\\"))))
    name = os.path.basename(path.rstrip("/\\"))
    mine = ", ".join(os.path.basename(p) for _, p in list_checkpoints(out)) or "none"
    if where != want or not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"--resume {path!r}: expected a checkpoints/step_N directory of --out {out!r} (its "
                              f"checkpoints: {mine}); to continue another run, pass its directory as --out")
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path!r}: no such checkpoint (checkpoints of --out {out!r}: {mine})")
    return path
