"""The timing and environment record every benchmark of sae_fast uses (`sae-fast bench`,
benchmarks/*.py): one timing implementation, one record of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import torch


# ------------------------------------------------------------------ timing
def time_fn(fn, inputs, *, warmup=2, reps=10):
    """Median and spread (min, p25, p75, max) of fn(inp) in seconds, rotating over
    `inputs` so no single input stays hot in cache. CUDA: device events; CPU: perf_counter."""
    cuda = torch.cuda.is_available() and any(
        isinstance(t, torch.Tensor) and t.is_cuda for inp in inputs
        for t in (inp if isinstance(inp, tuple) else (inp, )))
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    if cuda:
        torch.cuda.synchronize()
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
    return {
        "median_s": statistics.median(times), "min_s": min(times), "p25_s": q[0], "p75_s": q[2], "max_s": max(times),
        "reps": reps
    }


def environment() -> dict:
    from .. import __version__

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    except OSError:
        commit = ""
    dev = (torch.cuda.get_device_name()
           if torch.cuda.is_available() else f"CPU {platform.processor() or platform.machine()}")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {
        "device": dev, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": tv, "sae_fast": __version__, "python": platform.python_version(), "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")
    }


# ------------------------------------------------------------------ roofline
def measure_roofline(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Dense matmul rate (TFLOP/s) and copy bandwidth (GB/s) of this device, measured now."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda _: a @ b, [None], warmup=1, reps=3 if quick else 10)["median_s"]
    nbytes = (64 if device.type == "cpu" else 1024) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    tc = time_fn(lambda _: dst.copy_(src), [None], warmup=1, reps=3 if quick else 10)["median_s"]
    return {
        "matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbps": 2 * nbytes / tc / 1e9, "matmul_n": n, "copy_bytes": nbytes
    }
