"""One command for the day a GPU is there: build the CUDA kernels, run every
`gpu`-marked test (plain and under compute-sanitizer), the benchmark suite and
the 2^20-latent training-scale run, and write what was measured, with the
device, versions and commit, under benchmarks/results/.

    python -m benchmarks.gpu_acceptance [--steps build,tests,sanitizer,bench,train_scale]
        [--out DIR] [--copy-to DIR] [--step-timeout S] [--bench-args "..."] [--train-args "..."]
        [--allow-cpu]

Each step runs as a subprocess with its own time limit; its output goes to
<out>/gpu_acceptance_<device>_<step>.log and its status, duration and the tail
of its output to <out>/gpu_acceptance_<device>.{json,md}. A step that fails is
recorded and the next one runs; the exit code is 1 if any failed. The steps can
be run in separate calls (a device machine may limit one call to 10 minutes):
each call merges its steps into the same record. Without a CUDA GPU it refuses
to run (exit 2) unless --allow-cpu, which exists to test this plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

from .common import RESULTS, environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "tests", "sanitizer", "bench", "train_scale")


def _commands(args) -> dict[str, list[str]]:
    py = sys.executable
    return {
        # The CUDA half of sae_fast._C, for Hopper only (the arch of the machine at hand),
        # failing loudly rather than falling back to a CPU-only build.
        "build": [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ROOT],
        "tests": [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *shlex.split(args.pytest_args)],
        # the same tests with every device access checked
        "sanitizer": [
            "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", py, "-m", "pytest", "-q", "-m", "gpu",
            "-x", "-p", "no:cacheprovider", *shlex.split(args.pytest_args)
        ],
        "bench": [
            py, "-m", "sae_fast", "bench", "--device", "cuda", "--out", args.out, "--name", f"bench_{_slug()}",
            *shlex.split(args.bench_args)
        ],
        "train_scale": [
            py, "-m", "benchmarks.bench_train_scale", "--device", "cuda", "--out", f"train_scale_{_slug()}",
            *shlex.split(args.train_args)
        ]
    }


def _slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    ap.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--copy-to", default=None, help="also copy the record and logs here (e.g. $OUT)")
    ap.add_argument("--step-timeout", type=float, default=540, help="seconds per step")
    ap.add_argument("--pytest-args", default="", help="extra arguments for the test steps")
    ap.add_argument("--bench-args", default="", help="extra arguments for `sae-fast bench`")
    ap.add_argument("--train-args", default="", help="extra arguments for benchmarks.bench_train_scale")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (tests this command only)")
    return ap


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_step(name: str, cmd: list[str], timeout: float, log_path: str) -> dict:
    env = dict(os.environ)
    if name == "build":
        env.update(SAE_FAST_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=env.get("TORCH_CUDA_ARCH_LIST", "9.0a"))
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return {"step": name, "status": "unavailable", "reason": f"{cmd[0]} not found", "command": shlex.join(cmd)}
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        out, code = r.stdout + r.stderr, r.returncode
        status = "passed" if code == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, status = None, "timeout"
    with open(log_path, "w") as f:
        f.write(out)
    return {
        "step": name, "status": status, "exit_code": code, "seconds": round(time.time() - t0, 1),
        "command": shlex.join(cmd), "log": os.path.relpath(log_path, ROOT), "tail": _tail(out)
    }


def _markdown(record: dict) -> str:
    env = record["environment"]
    lines = [
        f"# GPU acceptance on {env['device']}", "",
        f"commit {env['commit']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"sae_fast {env['sae_fast']}, {env['date']}", "", "| step | status | seconds | command |", "|---|---|---|---|"
    ]
    for s in record["steps"].values():
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | `{s['command']}` |")
    for s in record["steps"].values():
        lines += ["", f"## {s['step']}: {s['status']}", "", "```", s.get("tail") or s.get("reason", ""), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        print(f"gpu_acceptance: unknown step(s) {bad}; expected some of {list(STEPS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "gpu_acceptance: no CUDA GPU here (torch.cuda.is_available() is False); nothing was run. "
            "Run it on a GPU machine, or pass --allow-cpu to test this command.", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gpu_acceptance_{_slug()}")
    record = {"environment": environment(), "steps": {}}
    if os.path.exists(base + ".json"):  # steps from earlier calls on this device are kept
        with open(base + ".json") as f:
            record["steps"] = json.load(f).get("steps", {})
    cmds = _commands(args)
    for s in steps:
        print(f"gpu_acceptance: {s} ...", flush=True)
        res = run_step(s, cmds[s], args.step_timeout, f"{base}_{s}.log")
        record["steps"][s] = res
        print(f"gpu_acceptance: {s} {res['status']} ({res.get('seconds', 0)} s)\n{res.get('tail', '')}", flush=True)
        with open(base + ".json", "w") as f:
            json.dump(record, f, indent=2, allow_nan=False)
        with open(base + ".md", "w") as f:
            f.write(_markdown(record))
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        for p in [base + ".json", base + ".md"] + [f"{base}_{s}.log" for s in steps]:
            if os.path.exists(p):
                shutil.copy(p, args.copy_to)
    return 0 if all(r["status"] == "passed" for r in record["steps"].values() if r["step"] in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
