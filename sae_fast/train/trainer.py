"""The training loop: buffer -> normalised batch -> JumpReLU step -> metrics -> checkpoints."""

from __future__ import annotations

import math
import os
import shutil
import time

import torch

from ..dtypes import DTYPES
from ..modules import JumpReLUSAE
from ..step import remove_parallel_component
from .config import RESUME_KEYS, TrainConfig


class CheckpointError(ValueError):
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


def autograd_step(sae: JumpReLUSAE, opt, x, *, l0_coefficient: float, bandwidth: float, decoder_unit_norm: bool = True,
                  grad_clip: float = 0.0):
    """One training step through autograd: full-size .grad tensors and any torch
    optimizer (torch.optim.Adam in `sae-fast train --optimizer adam`)."""
    out = sae.training_forward(x, l0_coefficient=l0_coefficient, bandwidth=bandwidth)
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


def row_grads_step(sae: JumpReLUSAE, opt, x, *, l0_coefficient: float, bandwidth: float, decoder_unit_norm: bool = True,
                   grad_clip: float = 0.0):
    """One row-grads training step (what `sae-fast train` runs by default): no autograd
    graph, gradients for the touched features only (RowGrads), the decoder's
    parallel-gradient removal and the clipping on those rows, then the row-sparse optimizer
    (opt: SparseAdamB1Zero.for_sae(sae, decoder_unit_norm=...), which renormalises the
    changed W_dec rows in the same pass).
    Nothing of size [d_sae, d_in] beyond the parameters and the optimizer state."""
    out, grads = sae.training_row_grads(x, l0_coefficient=l0_coefficient, bandwidth=bandwidth)
    if decoder_unit_norm:
        remove_parallel_component(sae.W_dec, grads.rows, grads.W_dec)
    if grad_clip > 0:
        # the untouched features' gradients are exactly zero and add nothing to the norm
        grads.clip_(grad_clip)
    opt.step_rows(grads)
    return out


class Trainer:

    def __init__(self, cfg: TrainConfig, source, d_in: int, *, device: torch.device | None = None, log=None):
        self.cfg = cfg.validate()
        self.device = device or pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
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
        self.scale: float | None = None
        # step at which each feature last fired (-1: never), for the dead-feature count
        self.last_fired = torch.full((cfg.d_sae, ), -1, dtype=torch.int64, device=self.device)
        self.log = log
        self.history: list[dict] = []

    # ----------------------------------------------------------- normalisation
    def estimate_scale(self) -> float:
        """One fixed scalar so that mean ||x||^2 = 1, estimated on the first buffer fill."""
        x = self.buffer.peek().float()
        self.scale = float(1.0 / math.sqrt(float(x.pow(2).sum(-1).mean()) + 1e-12))
        return self.scale

    # ----------------------------------------------------------------- a step
    def train_step(self) -> dict:
        cfg, sae = self.cfg, self.sae
        if self.scale is None:
            self.estimate_scale()
        t0 = time.perf_counter()
        x = (self.buffer.next().float() * self.scale).to(sae.dtype)
        lam = l0_coefficient_at(self.step, cfg)
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        run = row_grads_step if self.optimizer == "sparse-adam" else autograd_step
        out = run(self.sae, self.opt, x, l0_coefficient=lam, bandwidth=cfg.bandwidth,
                  decoder_unit_norm=cfg.decoder_unit_norm, grad_clip=cfg.grad_clip)
        with torch.no_grad():
            self.last_fired[out.fired] = self.step
            xf = x.float()
            var = (xf - xf.mean(0)).pow(2).sum(-1).mean()
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
        x_n = s x, so W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s."""
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
            "model_name": self.cfg.model, "normalization_scale_folded": s
        }
        return sae

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
                "config": self.cfg.to_dict(), "step": self.step, "scale": self.scale, "sae": self.sae.state_dict(),
                "optimizer": self.opt.state_dict(), "buffer": self.buffer.state_dict(),
                "last_fired": self.last_fired.cpu(), "torch_rng": torch.get_rng_state()
            }, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str) -> None:
        f = os.path.join(path, "trainer_state.pt")
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: no trainer state (not a sae-fast checkpoint directory?)")
        try:
            st = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable or corrupt checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(st, dict) or not {"config", "step", "sae", "optimizer", "buffer"} <= set(st):
            raise CheckpointError(f"{f}: corrupt checkpoint (missing trainer state entries)")
        mine = self.cfg.to_dict()
        diff = [
            f"{k}: checkpoint {st['config'].get(k)!r} vs this run {mine[k]!r}" for k in RESUME_KEYS
            if st["config"].get(k) != mine[k]
        ]
        if diff:
            raise CheckpointError(f"{f}: checkpoint does not match this run: " + "; ".join(diff))
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.buffer.load_state_dict(st["buffer"])
        self.step, self.scale = st["step"], st["scale"]
        self.last_fired = st["last_fired"].to(self.device)
        torch.set_rng_state(st["torch_rng"])
        self.buffer.source.load_state_dict(st["buffer"]["source"])


def latest_checkpoint(out: str) -> str | None:
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return None
    steps = sorted(p for p in os.listdir(d) if p.startswith("step_") and not p.endswith(".tmp"))
    return os.path.join(d, steps[-1]) if steps else None
