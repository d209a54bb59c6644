"""Registers, spills, shared memory and occupancy of every GPU kernel, compiled without a GPU.

    python -m benchmarks.kernel_resources [--json] [--quick] [--kernel REGEX] [--arch sm_90a|sm_80]
        [--dtype float32|bfloat16|float16] [--language triton|cuda] [--jobs 2] [--no-write]

Triton: every configuration sae_fast.backends.triton_kernels.gpu_configs() lists (each launcher
choice and autotune candidate: tiles, num_warps, num_stages, constexpr variants, output
dtypes) is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)),
pointers 16-byte aligned as torch allocates them. CUDA: every kernels/*.cu is compiled
by nvcc to a cubin per architecture, and every kernel instantiation in it is a row.

Per row: registers per thread (cuobjdump --dump-resource-usage on the cubin), spill
stores + loads in bytes (ptxas -v), shared memory per block (static from ptxas, plus
Triton's dynamic `shared`), threads per block, theoretical occupancy (computed here
from the constants below) and the tensor-core instructions the code uses (wgmma / mma
from the PTX or HGMMA / HMMA from the SASS).

Writes benchmarks/results/kernel_resources.{md,json}; exits 1 when any row spills,
fails to compile or needs more shared memory than its architecture has (each is
printed). Nothing is cached across runs: a fresh Triton cache directory per run.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Architecture limits (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"; both 8.0 and 9.0): registers per SM, threads / blocks / warps per SM,
# register allocation unit per warp, the most registers a thread may use, shared memory
# per block (opt-in maximum) and per SM, and the 1 KiB the runtime reserves per block.
_SM_8X_9X = dict(regs_per_sm=65536, threads_per_sm=2048, blocks_per_sm=32, warps_per_sm=64, reg_alloc_unit=256,
                 max_regs_per_thread=255, smem_reserved_per_block=1024, smem_alloc_unit=128)  # the same on both
ARCHS = {
    "sm_90a": {**_SM_8X_9X, "cc": 90, "smem_per_block": 227 * 1024, "smem_per_sm": 228 * 1024},
    "sm_80": {**_SM_8X_9X, "cc": 80, "smem_per_block": 163 * 1024, "smem_per_sm": 164 * 1024},
}
NVCC_ARCH = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}
DTYPES = ("float32", "bfloat16", "float16")
CUDA_DTYPES = {"float": "float32", "__nv_bfloat16": "bfloat16", "__half": "float16"}

ROW_FIELDS = ("language", "kernel", "arch", "dtype", "config", "registers", "spill_stores", "spill_loads",
              "spill_bytes", "stack_bytes", "shared_bytes", "smem_limit", "threads", "blocks_per_sm", "occupancy",
              "limiter", "tensor_cores", "tensor_ops", "compile_s", "error")


# ------------------------------------------------------------------ occupancy
def occupancy(arch: str, regs: int, threads: int, smem: int) -> dict:
    """Theoretical occupancy: resident warps / the SM's maximum, and what limits it."""
    a = ARCHS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // a["reg_alloc_unit"]) * a["reg_alloc_unit"]
    smem_block = -(-(smem + a["smem_reserved_per_block"]) // a["smem_alloc_unit"]) * a["smem_alloc_unit"]
    limits = {
        "blocks": a["blocks_per_sm"], "warps": a["warps_per_sm"] // warps,
        "registers": (a["regs_per_sm"] // regs_per_warp) // warps, "shared memory": a["smem_per_sm"] // smem_block
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / a["warps_per_sm"], "limiter": limiter}


# ------------------------------------------------------------------ tools
def _triton_bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc", ) if os.path.exists(p)), None)


def _resource_usage(cubin_path: str) -> dict:
    """{mangled function: {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage."""
    out = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True,
                         text=True, check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return res


def _sass_tensor_ops(cubin_path: str) -> dict:
    """{mangled function: {instruction: count}} of tensor-core instructions in the SASS."""
    out = subprocess.run([_triton_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            res[name] = {}
            continue
        m = re.search(r"\b(HGMMA|HMMA|IMMA|DMMA|WGMMA)\b", line)
        if name and m:
            res[name][m.group(1)] = res[name].get(m.group(1), 0) + 1
    return res


_PTXAS_FN = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")


def _ptxas_log(log: str) -> dict:
    """{mangled function: {registers, spill_stores, spill_loads, stack, smem}} from ptxas -v."""
    res, name = {}, None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            name = m.group(1)
            res.setdefault(name, {})
            continue
        if name is None:
            continue
        d = res[name]
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            d.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if m := re.search(r"Used (\d+) registers", line):
            d["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            d["smem"] = int(m2.group(1)) if m2 else 0
    return res


def _demangle(names: list[str]) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# ------------------------------------------------------------------ triton
_SPACE: dict = {}


def _space(cc: int) -> list:
    if cc not in _SPACE:
        from sae_fast.backends import triton_kernels as tk

        _SPACE[cc] = tk.gpu_configs(cc)
    return _SPACE[cc]


def _jit_fn(name: str):
    from triton.runtime.jit import JITFunction

    from sae_fast.backends import triton_kernels as tk

    fn = getattr(tk, name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def triton_kernel_names() -> list[str]:
    """Every Triton kernel of sae_fast.backends.triton_kernels (jit functions named *_kernel)."""
    from triton.runtime.jit import JITFunction

    from sae_fast.backends import triton_kernels as tk

    return sorted(n for n, v in vars(tk).items() if isinstance(v, JITFunction) and n.endswith("_kernel"))


def _compile_triton(task) -> dict:
    arch, index = task
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    a = ARCHS[arch]
    case = _space(a["cc"])[index]
    row = {
        "language": "triton", "kernel": case["kernel"], "arch": arch, "dtype": case["dtype"],
        "config": " ".join(f"{k}={_fmt(v)}" for k, v in case["config"].items()), "threads": case["num_warps"] * 32
    }
    fn = _jit_fn(case["kernel"])
    sig = case["signature"]
    missing = [p for p in fn.arg_names if p not in sig]
    if missing:
        return dict(row, error=f"signature lacks {missing}")
    # the pointers (16-byte aligned) and integers (multiples of 16) this launch sees as
    # such: Triton specialises on both at run time
    attrs = {(fn.arg_names.index(p), ): [["tt.divisibility", 16]] for p in case.get("divisible", ())}
    src = ASTSource(fn, sig, case["constexprs"], attrs)
    t0 = time.time()
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(log):
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=GPUTarget("cuda", a["cc"], 32),
                               options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    except Exception as e:  # noqa: BLE001 - every failure is a row
        return dict(row, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                    compile_s=round(time.time() - t0, 2))
    row["compile_s"] = round(time.time() - t0, 2)
    ptx = k.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    row["ptx_target"] = target.group(1).rstrip(",") if target else None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = _resource_usage(f.name)
    finally:
        os.remove(f.name)
    name = k.metadata.name
    info = _ptxas_log(log.getvalue()).get(name, {})
    reg = usage.get(name, {}).get("REG", info.get("registers"))
    tc = {
        "wgmma": len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
        "mma": len(re.findall(r"^\s*mma\.sync", ptx, re.M))
    }
    static = info.get("smem", 0)
    return _finish(row, registers=reg, spill_stores=info.get("spill_stores"), spill_loads=info.get("spill_loads"),
                   stack=info.get("stack"), shared=static + k.metadata.shared, tensor_ops=tc)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


def _finish(row, *, registers, spill_stores, spill_loads, stack, shared, tensor_ops) -> dict:
    arch = row["arch"]
    row.update(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
               spill_bytes=None if spill_stores is None else spill_stores + spill_loads, stack_bytes=stack,
               shared_bytes=shared, smem_limit=ARCHS[arch]["smem_per_block"],
               tensor_cores=", ".join(k for k, v in tensor_ops.items() if v) or "-",
               tensor_ops={k: v
                           for k, v in tensor_ops.items() if v})
    if registers is None or spill_stores is None:
        row["error"] = "no ptxas resource report for this function"
        return row
    row.update(
        occupancy(arch, registers, row["threads"], shared) if row.
        get("threads") else {"blocks_per_sm": None, "occupancy": None, "limiter": None})
    row.setdefault("error", None)
    return row


# ------------------------------------------------------------------ cuda
def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))


def cuda_kernel_names(path: str) -> list[str]:
    """Names of the __global__ functions a source defines."""
    text = _strip_comments(open(path).read())
    return sorted(set(re.findall(r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)", text)))


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _launch_blocks(text: str) -> dict:
    """{kernel: {threads per block}} from the launches in a source: `k<...><<<grid, block, ...>>>`
    and SAE_LAUNCH(grid, block, smem, stream, k<...>), with `constexpr int NAME = value;`
    constants resolved. A block that does not resolve to an integer is left out."""
    text = _strip_comments(text)
    consts = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"constexpr\s+(?:unsigned\s+)?(?:int|int32_t|int64_t|unsigned|size_t|long)\s+(\w+)\s*=\s*([^;]+);", text)
    }

    def value(expr: str):
        for _ in range(4):
            expr = re.sub(r"\b([A-Za-z_]\w*)\b", lambda m: f"({consts[m.group(1)]})"
                          if m.group(1) in consts else m.group(1), expr)
        expr = re.sub(r"static_cast<[^>]*>", "", expr)
        if re.fullmatch(r"[\d\s+\-*/()u]+", expr):
            try:
                return int(eval(expr.replace("u", "").replace("/", "//")))  # noqa: S307 - digits and operators only
            except (SyntaxError, ZeroDivisionError, ValueError):
                return None
        return None

    blocks: dict = {}
    for m in re.finditer(r"(\w+)\s*(?:<(?:[^<>;]|<[^<>;]*>)*>)?\s*<<<(.+?)>>>", text, re.S):
        args = _split_top(m.group(2))
        if len(args) >= 2:
            blocks.setdefault(m.group(1), set()).add(value(args[1]))
    for m in re.finditer(r"SAE_LAUNCH\s*\(", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        args = _split_top(text[m.end():i - 1])
        if len(args) >= 5:
            kname = re.match(r"\s*(\w+)", args[4])
            if kname:
                blocks.setdefault(kname.group(1), set()).add(value(args[1]))
    return {k: {b for b in v if b} for k, v in blocks.items()}


def _parse_instance(demangled: str):
    """(kernel name, template arguments) of 'void ns::(anonymous namespace)::k<float, 4>(...)'."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s[i:].startswith("(anonymous namespace)"):
            cut = i
            break
    head = s[:cut]
    targs = ""
    if head.endswith(">"):
        depth = 0
        for i in range(len(head) - 1, -1, -1):
            depth += {">": 1, "<": -1}.get(head[i], 0)
            if depth == 0:
                targs, head = head[i + 1:-1], head[:i]
                break
    return head.split("::")[-1], _split_top(targs) if targs else []


def _compile_cuda(task) -> list[dict]:
    path, arch = task
    rel = os.path.relpath(path, ROOT)
    base = {"language": "cuda", "arch": arch, "source": rel}
    nvcc = _nvcc()
    if nvcc is None:
        return [dict(base, kernel=os.path.basename(path), dtype="-", config="", error="nvcc not found")]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        t0 = time.time()
        p = subprocess.run([
            nvcc, "-cubin", "-gencode", NVCC_ARCH[arch], "-std=c++17", "-O3", f"-I{os.path.join(ROOT, 'kernels')}",
            "-Xptxas", "-v", path, "-o", cubin
        ], capture_output=True, text=True, cwd=ROOT)
        secs = round(time.time() - t0, 2)
        if p.returncode != 0:
            err = next((ln for ln in (p.stderr + p.stdout).splitlines() if "error" in ln), p.stderr.strip()[:300])
            return [
                dict(base, kernel=os.path.basename(path), dtype="-", config="", compile_s=secs,
                     error=f"nvcc failed: {err.strip()[:300]}")
            ]
        usage = _resource_usage(cubin)
        sass = _sass_tensor_ops(cubin)
    info = _ptxas_log(p.stderr + p.stdout)
    names = _demangle(sorted(usage))
    blocks = _launch_blocks(open(path).read())
    rows = []
    for mangled in sorted(usage, key=lambda m: names[m]):
        kernel, targs = _parse_instance(names[mangled])
        dtype = next((CUDA_DTYPES[t] for t in targs if t in CUDA_DTYPES), "any")
        tb = sorted(blocks.get(kernel, ()))
        ptx = info.get(mangled, {})
        for threads in tb or [None]:
            row = dict(base, kernel=kernel, dtype=dtype,
                       config=", ".join(targs) + (f" block={threads}" if threads else " block=?"), threads=threads,
                       compile_s=secs, symbol=mangled)
            ops = {k.lower(): v for k, v in sass.get(mangled, {}).items()}
            rows.append(
                _finish(row, registers=usage[mangled].get("REG", ptx.get("registers")),
                        spill_stores=ptx.get("spill_stores"), spill_loads=ptx.get("spill_loads"),
                        stack=ptx.get("stack"), shared=ptx.get("smem", 0), tensor_ops=ops))
    return rows


# ------------------------------------------------------------------ driver
def _worker_init(cache_dir: str):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # the log comes from ptxas, which a cache hit skips: rows that compile the same
    # kernel (one with no float data, listed under each dtype) must each run it
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def _run_task(task):
    kind, payload = task
    if kind == "triton":
        return [_compile_triton(payload)]
    return _compile_cuda(payload)


def _crashed(task, err) -> dict:
    kind, payload = task
    if kind == "triton":
        arch, index = payload
        case = _space(ARCHS[arch]["cc"])[index]
        row = {
            "language": "triton", "kernel": case["kernel"], "arch": arch, "dtype": case["dtype"],
            "config": " ".join(f"{k}={_fmt(v)}" for k, v in case["config"].items())
        }
    else:
        path, arch = payload
        row = {
            "language": "cuda", "kernel": os.path.basename(path), "arch": arch, "dtype": "-", "config": "",
            "source": os.path.relpath(path, ROOT)
        }
    return dict(row, error=f"compiler process died: {type(err).__name__}: {err}"[:300])


def _quick(cases: list) -> list:
    """A spread of each (kernel, dtype)'s configs: the first, the middle and the last."""
    groups: dict = {}
    for i, c in cases:
        groups.setdefault((c["kernel"], c["dtype"]), []).append((i, c))
    out = []
    for g in groups.values():
        out += [g[j] for j in sorted({0, len(g) // 2, len(g) - 1})]
    return out


def collect(archs, *, quick=False, kernel=None, dtype=None, languages=("triton", "cuda"), jobs=2):
    """Compiles everything selected (a pool of `jobs` processes); returns the rows."""
    cache = tempfile.mkdtemp(prefix="kernel_resources_")
    _worker_init(cache)
    tasks = []
    if "triton" in languages:
        for arch in archs:
            cases = [(i, c) for i, c in enumerate(_space(ARCHS[arch]["cc"]))
                     if (kernel is None or re.search(kernel, c["kernel"])) and (dtype is None or c["dtype"] == dtype)]
            if quick:
                cases = _quick(cases)
            tasks += [("triton", (arch, i)) for i, _ in cases]
    if "cuda" in languages:
        tasks += [("cuda", (p, arch)) for p in cuda_sources() for arch in archs]

    # longest first: the CUDA files and the encoder's big tiles
    def cost(t):
        if t[0] == "cuda":
            return 0
        c = _space(ARCHS[t[1][0]]["cc"])[t[1][1]]
        return 1 if c["kernel"] == "_jumprelu_encode_kernel" else 2

    tasks.sort(key=cost)
    rows = []
    try:
        if jobs <= 1:
            for t in tasks:
                rows += _run_task(t)
        else:
            with ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=(cache, )) as ex:
                futures = [(t, ex.submit(_run_task, t)) for t in tasks]
                for t, f in futures:
                    try:
                        rows += f.result()
                    except Exception as e:  # noqa: BLE001 - a compiler that aborts takes its worker down
                        rows.append(_crashed(t, e))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows = [
        r for r in rows
        if (kernel is None or re.search(kernel, r["kernel"])) and (dtype is None or r["dtype"] in (dtype, "any"))
    ]
    for r in rows:  # one set of fields for every row, failures included
        for k in ROW_FIELDS:
            r.setdefault(k, None)
    rows.sort(key=lambda r: (r["language"], r["kernel"], r["arch"], r["dtype"], r["config"]))
    return rows


def problems(rows) -> list[str]:
    out = []
    for r in rows:
        what = f"{r['language']} {r['kernel']} {r['arch']} {r['dtype']} [{r['config']}]"
        if r.get("error"):
            out.append(f"compile failure: {what}: {r['error']}")
            continue
        if r["spill_bytes"]:
            out.append(f"spill: {what}: {r['spill_stores']} bytes stores + {r['spill_loads']} bytes loads, "
                       f"{r['registers']} registers")
        if r["shared_bytes"] > ARCHS[r["arch"]]["smem_per_block"]:
            out.append(f"shared memory overflow: {what}: {r['shared_bytes']} bytes > "
                       f"{ARCHS[r['arch']]['smem_per_block']} per block")
        if r["language"] == "triton" and r["arch"] == "sm_90a" and r.get("ptx_target") != "sm_90a":
            out.append(f"wrong target: {what}: PTX .target {r.get('ptx_target')}")
    return out


def _versions() -> dict:
    import platform

    import triton

    def first(cmd):
        try:
            lines = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
            return next((ln.strip() for ln in lines if "release" in ln), lines[-1].strip() if lines else None)
        except OSError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    nvcc = _nvcc()
    return {
        "commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain")),
        "triton": triton.__version__, "ptxas": first([_triton_bin("ptxas"), "--version"]),
        "nvcc": first([nvcc, "--version"]) if nvcc else None, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")
    }


COLUMNS = [("language", "lang"), ("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("config", "config"),
           ("registers", "regs"), ("spill_bytes", "spill B"), ("shared_bytes", "smem B"), ("threads", "threads"),
           ("occupancy", "occupancy"), ("limiter", "limited by"), ("tensor_cores", "tensor cores")]


def markdown(rows, env, seconds, bad) -> str:

    def cell(r, k):
        v = r.get(k)
        if k == "occupancy" and v is not None:
            return f"{100 * v:.1f}%"
        if k == "kernel" and r.get("error"):
            return f"{v} (**{r['error'][:80]}**)"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = [
        "# Kernel resources", "",
        f"commit {env['commit']}{' (+ uncommitted changes)' if env['dirty'] else ''}; triton {env['triton']}; "
        f"ptxas: {env['ptxas']}; nvcc: {env['nvcc']}; {env['date']}; {len(rows)} rows in {seconds:.0f} s.", "",
        "Compiled without a GPU (`python -m benchmarks.kernel_resources`). Registers per thread from the "
        "cubin; spill = spill stores + loads (bytes per thread); smem = static + dynamic shared memory per "
        "block; occupancy = resident warps / 64, from registers (allocated in units of 256 per warp), threads "
        "and shared memory (+1 KiB reserved per block) against 65536 registers, 2048 threads, 32 blocks and "
        "164 KiB (sm_80) / 228 KiB (sm_90a) per SM.", "",
        f"**{len(bad)} problem(s)**" if bad else "No spills, compile failures or shared-memory overflows.", ""
    ]
    lines += [f"- {b}" for b in bad]
    lines += ["", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    ap.add_argument("--quick", action="store_true", help="three configurations per Triton kernel and dtype")
    ap.add_argument("--kernel", default=None, help="only kernels whose name matches this regex")
    ap.add_argument("--arch", choices=list(ARCHS), action="append", help="repeatable; default both")
    ap.add_argument("--dtype", choices=DTYPES, default=None)
    ap.add_argument("--language", choices=("triton", "cuda"), action="append", help="repeatable; default both")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/kernel_resources.*")
    ap.add_argument("--out", default="kernel_resources", help="result name under benchmarks/results")
    a = ap.parse_args(argv)
    t0 = time.time()
    rows = collect(a.arch or list(ARCHS), quick=a.quick, kernel=a.kernel, dtype=a.dtype,
                   languages=tuple(a.language or ("triton", "cuda")), jobs=a.jobs)
    seconds = time.time() - t0
    bad = problems(rows)
    env = _versions()
    record = {
        "environment": env, "architectures": ARCHS, "seconds": round(seconds, 1),
        "selection": {"quick": a.quick, "kernel": a.kernel, "arch": a.arch, "dtype": a.dtype,
                      "language": a.language}, "problems": bad, "rows": rows
    }
    text = json.dumps(record, indent=1, allow_nan=False)
    if not a.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{a.out}.json"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(RESULTS, f"{a.out}.md"), "w") as f:
            f.write(markdown(rows, env, seconds, bad))
    if a.json:
        print(json.dumps(rows, indent=1, allow_nan=False))
    else:
        worst = {}
        for r in rows:
            if r.get("registers") is not None:
                k = (r["language"], r["kernel"], r["arch"])
                worst[k] = max(worst.get(k, 0), r["registers"])
        for (lang, k, arch), regs in sorted(worst.items()):
            print(f"{lang:6s} {k:45s} {arch:7s} max {regs} registers")
        print(f"{len(rows)} rows in {seconds:.0f} s")
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
