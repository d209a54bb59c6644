"""sae_fast.info(): versions, devices, and which backends run where (and why not)."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, backends

ENV_VARS = {
    "SAE_FAST_BACKEND": "force a backend instead of auto (torch, triton, cuda, cpu)",
    "SAE_FAST_DISABLE_EXTENSION": "1: do not load the compiled extension sae_fast._C",
    "TRITON_INTERPRET": "1: run Triton kernels on CPU tensors through the interpreter"
}


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # ImportError, or a broken install
        return f"not installed ({type(e).__name__})"


def info(file=None, *, print_out: bool = True) -> dict:
    """Print (to `file`, default stdout) and return a dict describing this install."""
    from ._ext import extension_error, load_extension

    ext = load_extension()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    d = {
        "sae_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _triton_version(),
        "extension": "loaded" + (" (with CUDA kernels)" if ext is not None and ext.has_cuda() else " (CPU kernels)")
        if ext is not None else extension_error(), "devices": {
            dev: (torch.cuda.get_device_name(dev) if dev != "cpu" else platform.processor() or platform.machine())
            for dev in devices
        }, "backends": {dev: backends.table(dev)
                        for dev in devices[:2]}, "auto": {dev: backends.resolve("auto", dev)
                                                          for dev in devices[:2]},
        "env": {k: os.environ.get(k)
                for k in ENV_VARS}
    }
    if print_out:
        out = file or sys.stdout
        w = lambda s="": print(s, file=out)  # noqa: E731
        w(f"sae_fast {d['sae_fast']}  (python {d['python']}, torch {d['torch']}, "
          f"CUDA {d['torch_cuda']}, triton {d['triton']})")
        w(f"extension sae_fast._C: {d['extension']}")
        for dev, name in d["devices"].items():
            w(f"device {dev}: {name}")
        for dev, rows in d["backends"].items():
            w(f"backends on {dev} (auto -> {d['auto'][dev]}):")
            for name, ok, why in rows:
                w(f"  {name:<7} {'yes' if ok else 'no ':<4} {'' if ok else why}")
        w("environment:")
        for k, v in d["env"].items():
            w(f"  {k}={v if v is not None else '(unset)'}  # {ENV_VARS[k]}")
    return d
