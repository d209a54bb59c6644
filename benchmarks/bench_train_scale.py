"""The training step at Gemma Scope's widest size: sae_fast's row-grads step against the dense PyTorch step.

    python -m benchmarks.bench_train_scale [--d-in 2304] [--d-sae 1048576] [--batch 4096] [--l0 64]
        [--dtype bfloat16] [--steps 30] [--warmup 5] [--backend auto] [--device auto] [--no-dense]
        [--out NAME]

Activations: synthetic, of width d_in, with a realistic spectrum (variance
falling as 1/k over the principal directions, in a random rotation, as language
model residual streams do), a few batches generated on the device and rotated.
SAE: the Gemma Scope init (unit-norm decoder rows, W_enc = W_decᵀ), bf16
weights, thresholds set so that the expected L0 is --l0 (a trained SAE's
regime; a fresh threshold 0.001 init runs the chunked dense path instead).

sae_fast: the row-grads step of `sae-fast train` (train.row_grads_step: compact row
gradients, parallel-gradient removal, SparseAdamB1Zero with the fused
adam_b1zero_rows_ and in-pass decoder renormalisation). Dense: train.autograd_step
on the torch backend, the reference loss with autograd and
torch.optim.Adam(betas=(0, 0.999)), the step a dense PyTorch SAE trainer runs;
an out-of-memory is recorded as such.

Records the median step time over --steps timed steps after --warmup (CUDA
events on a GPU), tokens/s, and the peak memory allocated (torch.cuda, the
whole run: parameters and optimizer state included). Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import sae_fast
from sae_fast.dtypes import DTYPES
from sae_fast.optim import SparseAdamB1Zero
from sae_fast.train import autograd_step, row_grads_step

from .common import environment, write


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=2304, help="input width")
    ap.add_argument("--d-sae", type=int, default=2**20, help="dictionary width")
    ap.add_argument("--batch", type=int, default=4096, help="tokens per step")
    ap.add_argument("--l0", type=float, default=64, help="expected active features per token")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="SAE weight dtype")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--backend", default="auto", help="sae_fast backend (auto, triton, cuda, cpu, torch)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense PyTorch step")
    ap.add_argument("--out", default=None, help="result file name (default train_scale_<device>_<d_sae>)")
    return ap


class Activations:
    """Batches with a power-law spectrum in a random rotation, made on the device."""

    def __init__(self, d_in: int, batch: int, dtype, device, n: int = 4, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.spec = torch.arange(1, d_in + 1, dtype=torch.float32).pow(-0.5).to(device)
        self.Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0].to(device)
        z = [torch.randn(batch, d_in, generator=g).to(device) for _ in range(n)]
        xs = [(zi * self.spec) @ self.Q for zi in z]
        scale = 1.0 / math.sqrt(float(torch.cat(xs).pow(2).sum(-1).mean()))  # Gemma Scope: mean ||x||^2 = 1
        self.batches = [(x * scale).to(dtype) for x in xs]
        self.scale = scale
        self.i = 0

    def next(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]


@torch.no_grad()
def set_thresholds(sae, acts: Activations, l0: float, chunk: int = 65536) -> None:
    """threshold_j = sigma_j * Phi^-1(1 - l0/d_sae): pre_j = x . w_j is Gaussian with
    std sigma_j = scale * || diag(spec) Q w_j ||, computed a chunk of features at a time."""
    p = min(max(l0 / sae.d_sae, 1e-9), 0.999)
    z = float(torch.special.ndtri(torch.tensor(1 - p, dtype=torch.float64)))
    M = acts.spec[:, None] * acts.Q  # [d_in, d_in]
    for c0 in range(0, sae.d_sae, chunk):
        W = sae.W_enc[:, c0:c0 + chunk].float()
        sigma = (M @ W).norm(dim=0) * acts.scale
        sae.threshold[c0:c0 + chunk] = sigma * z


def _timer(device):
    if device.type == "cuda":

        def run(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3, out
    else:

        def run(fn):
            t = time.perf_counter()
            out = fn()
            return time.perf_counter() - t, out

    return run


def measure(step, acts, args, device) -> dict:
    timer = _timer(device)
    times, losses, l0s = [], [], []
    for i in range(args.warmup + args.steps):
        dt, out = timer(lambda: step(acts.next()))
        if i >= args.warmup:
            times.append(dt)
            losses.append(float(out[0]))
            l0s.append(float(out[1]))
    times.sort()
    med = times[len(times) // 2]
    return {
        "median_step_s": med, "min_step_s": times[0], "max_step_s": times[-1], "tokens_per_s": args.batch / med,
        "mean_l0": sum(l0s) / len(l0s), "last_loss": losses[-1],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    }


def run_sae_fast(args, device, dtype, acts) -> dict:
    sae = sae_fast.JumpReLUSAE(args.d_in, args.d_sae, dtype=dtype, device=device, backend=args.backend)
    set_thresholds(sae, acts, args.l0)
    opt = SparseAdamB1Zero.for_sae(sae, decoder_unit_norm=True, lr=7e-5, beta2=0.999)

    def step(x):
        out = row_grads_step(sae, opt, x, l0_coefficient=1e-3, bandwidth=1e-3, decoder_unit_norm=True, grad_clip=0.0)
        return out.loss, out.l0

    rec = measure(step, acts, args, device)
    rec["backend"] = sae.resolved_backend()
    return rec


def run_dense(args, device, dtype, acts) -> dict:
    sae = sae_fast.JumpReLUSAE(args.d_in, args.d_sae, dtype=dtype, device=device, backend="torch")
    set_thresholds(sae, acts, args.l0)
    opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999))

    def step(x):
        out = autograd_step(sae, opt, x, l0_coefficient=1e-3, bandwidth=1e-3, decoder_unit_norm=True, grad_clip=0.0)
        return out.loss.detach(), out.l0

    try:
        return measure(step, acts, args, device)
    except torch.OutOfMemoryError as e:
        return {
            "error": "out of memory", "detail": str(e).split("\n")[0],
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        }


def _reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def markdown(rec: dict) -> str:
    env, c = rec["environment"], rec["config"]
    lines = [
        f"# Training step at d_in={c['d_in']} d_sae={c['d_sae']} batch={c['batch']} L0~{c['l0']} {c['dtype']}", "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, sae_fast {env['sae_fast']}, "
        f"commit {env['commit']}", "", f"`{rec['command']}`", "",
        "| step | median ms | tokens/s | peak memory GiB | mean L0 |", "|---|---|---|---|---|"
    ]
    for name, r in rec["results"].items():
        if "error" in r:
            peak = r.get("peak_memory_bytes")
            lines.append(f"| {name} | {r['error']} | - | {peak / 2**30:.2f} at failure |  - |"
                         if peak else f"| {name} | {r['error']} | - | - | - |")
            continue
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None else "n/a (CPU)"
        lines.append(
            f"| {name} | {r['median_step_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | {peak} | {r['mean_l0']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import sys

    args = build_parser().parse_args(argv)
    for name in ("d_in", "d_sae", "batch", "steps"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype]
    acts = Activations(args.d_in, args.batch, dtype, device)
    results = {}
    _reset(device)
    results["sae_fast row-grads step"] = run_sae_fast(args, device, dtype, acts)
    if not args.no_dense:
        _reset(device)
        results["dense PyTorch step"] = run_dense(args, device, dtype, acts)
    rec = {
        "environment": environment(),
        "config": {k: getattr(args, k)
                   for k in ("d_in", "d_sae", "batch", "l0", "dtype", "steps", "warmup")},
        "command": "python -m benchmarks.bench_train_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results
    }
    md = markdown(rec)
    name = args.out or f"train_scale_{device.type}_{args.d_sae}"
    jp, mp = write(name, rec, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return rec


if __name__ == "__main__":
    main()
