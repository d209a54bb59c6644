"""Build and run the CUDA emulator's test driver (tests/cuda_emu/driver.cpp).

The driver is kernels/*.cu (unchanged device code and launchers) plus the
emulator and planted kernels of this folder, compiled by g++ with ASan and
UBSan. `run` writes a case file, runs the driver in a subprocess (a sanitizer
report or an emulator abort is a failed run, never a dead test session) and
reads every array back.

Environment: CUDA_EMU_CXX (default g++), CUDA_HOME (the CUDA headers; default
the nvcc on PATH's install), CUDA_EMU_BUILD (build folder; default
build/cuda_emu under the repository).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "cuda_emu")
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

FLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    # 16-byte vector loads are read back as bf16/fp16 through a reinterpret_cast
    # (kernels/sparse_ops.cu load_f): fine for nvcc, undefined for g++ without this
    "-fno-strict-aliasing",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas"
]


def cuda_include() -> str:
    home = os.environ.get("CUDA_HOME")
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else "/usr/local/cuda"
    inc = os.path.join(home, "include")
    if not os.path.exists(os.path.join(inc, "cuda_runtime.h")):
        for cand in sorted(glob.glob("/usr/local/cuda*/include"), reverse=True):
            if os.path.exists(os.path.join(cand, "cuda_runtime.h")):
                return cand
    return inc


def sources() -> list[str]:
    return (sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu"))) + sorted(glob.glob(os.path.join(HERE, "*.cu"))) +
            sorted(glob.glob(os.path.join(HERE, "*.cpp"))))


# The emulated library loaded into the test process (ctypes): the kernels, the
# emulator and the C ABI, without sanitizers (ASan must be the first library of a
# process; the driver runs every kernel under it).
LIB_FLAGS = [
    "-std=c++20", "-O2", "-g", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"
]


def library_sources() -> list[str]:
    return (sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu"))) +
            [os.path.join(HERE, "cuda_emu.cpp"), os.path.join(HERE, "capi.cpp")])


def available() -> str | None:
    """None when the driver can be built here, else why not."""
    cxx = os.environ.get("CUDA_EMU_CXX", "g++")
    if shutil.which(cxx) is None:
        return f"{cxx} not found"
    if not os.path.exists(os.path.join(cuda_include(), "cuda_bf16.h")):
        return f"CUDA headers not found under {cuda_include()} (set CUDA_HOME)"
    return None


def build() -> str:
    """Compile (once per source state) and return the driver's path."""
    return _build(sources(), FLAGS, "driver", [])


def build_library() -> str:
    """Compile (once per source state) and return the emulated library's path."""
    return _build(library_sources(), LIB_FLAGS, "libcuda_emu.so", ["-shared"])


def _build(srcs, flags, name, link) -> str:
    cxx = os.environ.get("CUDA_EMU_CXX", "g++")
    inc = cuda_include()
    h = hashlib.sha256()
    for f in srcs + sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cuh"))) + sorted(
            glob.glob(os.path.join(HERE, "*.h"))):
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join([cxx, inc, name, *flags]).encode())
    out_dir = os.path.join(os.environ.get("CUDA_EMU_BUILD", os.path.join(ROOT, "build", "cuda_emu")),
                           h.hexdigest()[:16])
    exe = os.path.join(out_dir, name)
    if os.path.exists(exe):
        return exe
    os.makedirs(out_dir, exist_ok=True)
    common = [cxx, *flags, f"-I{inc}", f"-I{os.path.join(ROOT, 'kernels')}", f"-I{HERE}"]

    def compile_one(src):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        # device code (.cu) compiles as C++ with the emulator force-included
        lang = ["-x", "c++", "-include", os.path.join(HERE, "cuda_emu.h")] if src.endswith(".cu") else []
        r = subprocess.run([*common, *lang, "-c", src, "-o", obj], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise RuntimeError(f"emulator build of {os.path.relpath(src, ROOT)} failed:\n{r.stdout}{r.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(compile_one, srcs))
    tmp = exe + f".tmp{os.getpid()}"
    r = subprocess.run([cxx, *flags, *link, *objs, "-o", tmp], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emulator link failed:\n{r.stdout}{r.stderr}")
    os.replace(tmp, exe)  # atomic: a concurrent build never sees half a binary
    return exe


@dataclass
class Result:
    returncode: int
    stderr: str
    cuda_error: int | None
    arrays: dict[str, torch.Tensor]


def _write(path, op, ints, floats, arrays, offsets):
    with open(path, "wb") as f:
        f.write(f"SAEEMU1\nop {op}\n".encode())
        for k, v in ints.items():
            f.write(f"int {k} {int(v)}\n".encode())
        for k, v in floats.items():
            f.write(f"float {k} {float(v)!r}\n".encode())
        for k, t in arrays.items():
            if t is None:
                continue
            raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.write(f"array {k} {len(raw)} {offsets.get(k, 0)}\n".encode())
            f.write(raw)
        f.write(b"end\n")


def _read(path, like):
    out = {}
    with open(path, "rb") as f:
        assert f.readline() == b"SAEEMU1\n"
        err = None
        while True:
            line = f.readline().decode()
            if line in ("end\n", ""):
                break
            kind, key, *rest = line.split()
            if kind == "int" and key == "cuda_error":
                err = int(rest[0])
            elif kind == "array":
                raw = f.read(int(rest[0]))
                if len(rest) > 2:  # an array the op allocated: "DTYPE D0 D1 ..."
                    dtype, shape = getattr(torch, rest[2]), [int(x) for x in rest[3:]]
                else:
                    dtype, shape = like[key].dtype, like[key].shape
                out[key] = (torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()
                            if raw else torch.zeros(shape, dtype=dtype))
    return err, out


def run(op: str, ints: dict | None = None, floats: dict | None = None, arrays: dict | None = None, *,
        order: str = "forward", max_blocks: int | None = None, offsets: dict | None = None,
        timeout: float = 300) -> Result:
    """Run one op on the driver. order: "forward" or "reverse" (threads and blocks);
    max_blocks: the launchers' grid cap (small values exercise the grid-stride loops);
    offsets: byte offsets of arrays from a 16-byte boundary (misaligned pointers)."""
    exe = build()
    arrays = {k: v for k, v in (arrays or {}).items() if v is not None}
    env = dict(os.environ, CUDA_EMU_ORDER=order, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    if max_blocks is not None:
        env["CUDA_EMU_MAX_BLOCKS"] = str(max_blocks)
    with tempfile.TemporaryDirectory() as d:
        cin, cout = os.path.join(d, "in"), os.path.join(d, "out")
        _write(cin, op, ints or {}, floats or {}, arrays, offsets or {})
        r = subprocess.run([exe, cin, cout], capture_output=True, text=True, env=env, timeout=timeout)
        err, out = (None, {})
        if r.returncode == 0:
            err, out = _read(cout, arrays)
    return Result(r.returncode, r.stderr, err, out)


def run_ok(op, ints=None, floats=None, arrays=None, **kw) -> dict[str, torch.Tensor]:
    """run() that must succeed: clean sanitizers, cudaSuccess. Returns the arrays."""
    r = run(op, ints, floats, arrays, **kw)
    assert r.returncode == 0, f"{op} failed under the emulator (exit {r.returncode}):\n{r.stderr[-6000:]}"
    assert r.cuda_error == 0, f"{op}: launcher returned cudaError {r.cuda_error}"
    return r.arrays
