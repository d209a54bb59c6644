"""Shared benchmark plumbing: timing, environment record, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_fn(fn, inputs, *, warmup=2, reps=10):
    """Median and spread (min, p25, p75, max) of fn(inp) in seconds, rotating over `inputs`
    so no single input stays hot in cache. CUDA: device events; CPU: perf_counter."""
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for inp in inputs for t in (inp if isinstance(inp, tuple) else (inp,)))
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(reps):
        inp = inputs[i % len(inputs)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inp)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(inp)
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "p25_s": q[0], "p75_s": q[2],
            "max_s": max(times), "reps": reps}


def environment() -> dict:
    import sae_fast

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS)).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or platform.machine()}"
    return {"device": dev, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "sae_fast": sae_fast.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write(name: str, record: dict, markdown: str) -> tuple[str, str]:
    os.makedirs(RESULTS, exist_ok=True)
    jp, mp = os.path.join(RESULTS, f"{name}.json"), os.path.join(RESULTS, f"{name}.md")
    with open(jp, "w") as f:
        json.dump(record, f, indent=2)
    with open(mp, "w") as f:
        f.write(markdown)
    return jp, mp
