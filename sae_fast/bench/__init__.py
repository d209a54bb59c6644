"""`sae-fast bench`: sae_fast against dense PyTorch (eager and torch.compile) and SAELens.

For every shape and op, each contender is first checked against the dense eager
reference, then timed (warm-up, device events on CUDA, median with spread over
rotated inputs). The device's matmul rate and copy bandwidth are measured in the
same run, and each result is reported as achieved TFLOP/s, GB/s and fraction of
its floor. Writes a markdown table, a JSON record (device, versions, commit) and
PNG plots.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .. import reference
from ..dtypes import DTYPES
from ..sparse import SparseActs
from .contenders import Shape, Workload, contenders
from .harness import environment, measure_roofline, time_fn

__all__ = ["OPS", "Shape", "Workload", "contenders", "environment", "main", "run", "time_fn"]

OPS = ("encode", "encode_sparse", "decode", "forward", "train_step")


def op_model(op: str, s: Shape) -> tuple[float, float]:
    """(useful FLOPs, floor bytes) of the sparse algorithm for `op` at shape `s`."""
    b = torch.finfo(DTYPES[s.dtype]).bits // 8
    T, d, S, L = s.tokens, s.d_in, s.d_sae, s.l0
    enc_f, enc_b = 2 * T * d * S, d * S * b + T * d * b
    dec_rows = min(S, T * L)
    dec_f, dec_b = 2 * T * L * d, dec_rows * d * b + T * L * (b + 8) + T * d * b
    if op == "encode":
        return enc_f, enc_b + T * S * b  # dense output written
    if op == "encode_sparse":
        return enc_f, enc_b + T * L * (b + 8)
    if op == "decode":
        return dec_f, dec_b
    if op == "forward":
        return enc_f + dec_f, enc_b + dec_b
    # train step (the row-grads step): encoder GEMM + sparse backward (~2x decode-sized
    # gathers/scatters for each of W_dec, W_enc) + the row-sparse Adam over the touched
    # rows of both matrices only (read and write the param and its float32 moment, read the grad)
    touched = 2 * d * dec_rows
    return enc_f + 4 * dec_f, enc_b + 4 * dec_b + touched * (3 * b + 2 * 4)


def _close(a, ref, dtype) -> bool:
    if isinstance(a, SparseActs):
        a = a.to_dense()
    if isinstance(ref, SparseActs):
        ref = ref.to_dense()
    a, ref = a.detach().float(), ref.detach().float()
    if a.shape != ref.shape:
        return False
    tol = 16 * torch.finfo(dtype).eps * max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-6)
    # an element near its threshold may land on either side in another summation order
    bad = ((a - ref).abs() > tol).float().mean().item() if a.numel() else 0.0
    return bad <= 1e-3


def _input(op: str, wl: Workload, c, i: int):
    x = wl.xs[i]
    if op != "decode":
        return x
    with torch.no_grad():
        acts = reference.jumprelu_encode(x, wl.params["W_enc"], wl.params["b_enc"], wl.params["threshold"])
    return SparseActs.from_dense(acts) if c.sparse_io else acts


def fits(shape: Shape, device: torch.device) -> str | None:
    """None if the dense baseline's working set fits this device, else why not."""
    b = torch.finfo(DTYPES[shape.dtype]).bits // 8
    need = 2 * shape.d_in * shape.d_sae * (b * 3 + 8) + 4 * shape.tokens * shape.d_sae * b
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 16 * 2**30
    if need > 0.9 * have:
        return f"needs about {need / 2**30:.0f} GiB (dense baseline), device has {have / 2**30:.0f} GiB"
    return None


# --------------------------------------------------------------------- run
def run(shapes: list[Shape], ops: list[str], names: list[str], device: torch.device, *, reps: int, warmup: int,
        quick: bool, log=print) -> dict:
    env = environment()
    roof = {dt: measure_roofline(device, DTYPES[dt], quick) for dt in sorted({s.dtype for s in shapes})}
    rows, skipped = [], []
    for s in shapes:
        why = fits(s, device)
        if why:
            skipped.append({"shape": str(s), "reason": why})
            log(f"skip {s}: {why}")
            continue
        wl = Workload(s, device)
        cs, sk = contenders(wl, names)
        skipped += [{"shape": str(s), "contender": n, "reason": r} for n, r in sk]
        base = cs[0]
        for op in ops:
            if op == "train_step":
                with torch.enable_grad():  # the first step's loss, from the shared starting parameters
                    ref_out = base.fns[op](_input(op, wl, base, 0)).detach()
            else:
                with torch.no_grad():
                    ref_out = base.fns[op](_input(op, wl, base, 0))
            flops, nbytes = op_model(op, s)
            r = roof[s.dtype]
            floor_s = max(flops / (r["matmul_tflops"] * 1e12), nbytes / (r["copy_gbps"] * 1e9))
            for c in cs:
                inputs = [_input(op, wl, c, i) for i in range(len(wl.xs))]
                if op == "train_step":
                    if c is base:
                        ok = True
                    else:  # same starting parameters and input: the first step's loss must agree
                        with torch.enable_grad():
                            loss = float(c.fns[op](inputs[0]))
                        ok = abs(loss - float(ref_out)) <= 16 * torch.finfo(DTYPES[s.dtype]).eps * max(
                            abs(float(ref_out)), 1e-6)
                else:
                    with torch.no_grad():
                        ok = _close(c.fns[op](inputs[0]), ref_out, DTYPES[s.dtype])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                ctx = torch.enable_grad() if op == "train_step" else torch.no_grad()
                with ctx:
                    t = time_fn(c.fns[op], inputs, warmup=warmup, reps=reps)
                peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
                rows.append({
                    "shape": str(s), **s.__dict__, "op": op, "contender": c.name, "correct": ok,
                    **t, "peak_extra_bytes": peak, "tflops": flops / t["median_s"] / 1e12,
                    "gbps": nbytes / t["median_s"] / 1e9, "floor_s": floor_s,
                    "fraction_of_floor": floor_s / t["median_s"]
                })
                log(f"{s} {op:<13} {c.name:<20} {t['median_s'] * 1e3:9.3f} ms  {'ok' if ok else 'MISMATCH'}")
        del wl, cs
    for r in rows:
        dense = next(
            (x for x in rows if x["shape"] == r["shape"] and x["op"] == r["op"] and x["contender"] == "dense eager"),
            None)
        r["speedup_vs_dense"] = dense["median_s"] / r["median_s"] if dense else None
    return {
        "environment": env, "roofline": roof, "results": rows, "skipped": skipped,
        "settings": {"reps": reps, "warmup": warmup, "quick": quick, "inputs_rotated": 2}
    }


def markdown(rec: dict) -> str:
    env = rec["environment"]
    lines = [
        f"# sae-fast bench: {env['device']}", "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, sae_fast {env['sae_fast']}, "
        f"commit {env['commit'][:12]}, {env['date']}; median of {rec['settings']['reps']} runs after "
        f"{rec['settings']['warmup']} warm-ups, inputs rotated.", ""
    ]
    for dt, r in rec["roofline"].items():
        lines.append(
            f"Measured roofline ({dt}): matmul {r['matmul_tflops']:.2f} TFLOP/s, copy {r['copy_gbps']:.1f} GB/s.")
    lines += [
        "", "| shape | op | contender | median ms | p25–p75 ms | speedup vs dense | TFLOP/s | GB/s | of floor "
        "| peak MiB | ok |", "|---|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in rec["results"]:
        pk = f"{r['peak_extra_bytes'] / 2**20:.0f}" if r["peak_extra_bytes"] is not None else "n/a"
        sp = f"{r['speedup_vs_dense']:.2f}×" if r["speedup_vs_dense"] else "–"
        lines.append(f"| {r['shape']} | {r['op']} | {r['contender']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['p25_s'] * 1e3:.3f}–{r['p75_s'] * 1e3:.3f} | {sp} | {r['tflops']:.3f} | {r['gbps']:.1f} | "
                     f"{r['fraction_of_floor']:.2f} | {pk} | {'yes' if r['correct'] else 'NO'} |")
    if rec["skipped"]:
        lines += ["", "Skipped:"
                  ] + [f"- {s.get('contender', 'all')} at {s['shape']}: {s['reason']}" for s in rec["skipped"]]
    return "\n".join(lines) + "\n"


def plots(rec: dict, prefix: str) -> list[str]:
    """time vs d_sae per contender, and speedup vs dense eager, one panel per op."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = rec["results"]
    ops = [o for o in OPS if any(r["op"] == o for r in rows)]
    paths = []
    for kind, key, ylabel in (("time", "median_s", "median time (ms)"), ("speedup", "speedup_vs_dense",
                                                                         "speedup vs dense eager")):
        fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.6), squeeze=False)
        for ax, op in zip(axes[0], ops):
            groups = {}
            for r in rows:
                if r["op"] == op and r[key] is not None:
                    groups.setdefault((r["contender"], r["d_in"], r["l0"], r["dtype"]), []).append(r)
            for (c, d, l0, dt), rs in sorted(groups.items()):
                rs.sort(key=lambda r: r["d_sae"])
                ys = [r[key] * (1e3 if key == "median_s" else 1) for r in rs]
                ax.plot([r["d_sae"] for r in rs], ys, marker="o", label=f"{c} (d_in {d}, L0 {l0}, {dt})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(op)
            ax.set_xlabel("d_sae")
            ax.set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.suptitle(f"sae-fast bench on {rec['environment']['device']}")
        fig.tight_layout()
        p = f"{prefix}_{kind}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(args) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        d_ins, d_saes, tokens, l0s, dtypes = [256], [1024, 4096], 256, [16], ["float32"]
        reps, warmup = args.reps or 5, 1
    else:
        d_ins = args.d_in or [2304, 3584]
        d_saes = args.d_sae or [16384, 65536, 131072, 1048576]
        tokens, l0s, dtypes = args.tokens, args.l0 or [20, 64, 150], args.dtype or ["float32", "bfloat16"]
        reps, warmup = args.reps or 20, 3
    if args.quick and args.d_sae:
        d_saes = args.d_sae
    names = args.contenders or (["dense", "compile", "saelens", "saelens-fast", "triton", "cuda", "cpu"])
    shapes = [Shape(d, s, tokens, l0, dt) for dt in dtypes for d in d_ins for l0 in l0s for s in d_saes]
    rec = run(shapes, args.ops or list(OPS), names, device, reps=reps, warmup=warmup, quick=args.quick,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, args.name or f"bench_{device.type}{'_quick' if args.quick else ''}")
    with open(prefix + ".json", "w") as f:
        json.dump(rec, f, indent=2)
    text = markdown(rec)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    pngs = [] if args.no_plots else plots(rec, prefix)
    print(text)
    print("wrote", prefix + ".json", prefix + ".md", *pngs)
    return 0 if all(r["correct"] for r in rec["results"]) else 1
