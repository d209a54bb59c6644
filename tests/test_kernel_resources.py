"""benchmarks/kernel_resources compiles every GPU kernel for sm_80 and sm_90a without a GPU.

The slow test runs the tool (--quick: every Triton kernel x architecture x dtype with
three of its configurations, every CUDA kernel of kernels/*.cu) in a subprocess
without TRITON_INTERPRET, and checks that every row compiled, nothing spills, shared
memory fits, and every kernel is there for both architectures and all three dtypes.
The fast tests check the occupancy arithmetic and the source parsing on fixed inputs.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import kernel_resources as kr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_NVCC = kr._nvcc() is not None
ARCHS = set(kr.ARCHS)
DTYPES = {"float32", "bfloat16", "float16"}
KEYS = {
    "language", "kernel", "arch", "dtype", "config", "registers", "spill_stores", "spill_loads", "spill_bytes",
    "shared_bytes", "threads", "occupancy", "blocks_per_sm", "limiter", "tensor_cores", "error"
}


def _triton_kernels():
    src = open(os.path.join(ROOT, "sae_fast", "backends", "triton_kernels.py")).read()
    return set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(", src))


def test_every_triton_kernel_lives_in_triton_kernels():
    # the report compiles what triton_kernels.gpu_configs lists: a kernel elsewhere would escape it
    for path in glob.glob(os.path.join(ROOT, "sae_fast", "**", "*.py"), recursive=True):
        if os.path.basename(path) != "triton_kernels.py":
            assert "@triton.jit" not in open(path).read(), path


def _cuda_kernels():
    return {os.path.relpath(p, ROOT): set(kr.cuda_kernel_names(p)) for p in kr.cuda_sources()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    name = "_pytest_kernel_resources"
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--quick", "--json", "--out", name]
    if not HAVE_NVCC:
        cmd += ["--language", "triton"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    try:
        files = {ext: open(os.path.join(kr.RESULTS, f"{name}.{ext}")).read() for ext in ("json", "md")}
    finally:
        for ext in ("json", "md"):
            path = os.path.join(kr.RESULTS, f"{name}.{ext}")
            if os.path.exists(path):
                os.remove(path)
    return p, json.loads(p.stdout), files


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(quick_run):
    p, rows, _ = quick_run
    assert p.returncode == 0, p.stderr[-4000:]
    assert rows
    for r in rows:
        what = f"{r['language']} {r['kernel']} {r['arch']} {r['dtype']} [{r['config']}]"
        assert r["error"] is None, (what, r["error"])
        assert KEYS <= set(r), (what, KEYS - set(r))
        assert r["spill_bytes"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, what
        assert 0 < r["registers"] <= 255, what
        assert 0 <= r["shared_bytes"] <= kr.ARCHS[r["arch"]]["smem_per_block"], what
        assert r["arch"] in ARCHS and (r["dtype"] in DTYPES or (r["language"] == "cuda" and r["dtype"] == "any")), what
        if r["threads"] is not None:
            assert 0 < r["occupancy"] <= 1, what
        if r["language"] == "triton":
            assert r["occupancy"] > 0 and r["compile_s"] >= 0, what
            if r["arch"] == "sm_90a":
                assert r["ptx_target"] == "sm_90a", what


@pytest.mark.slow
def test_every_triton_kernel_for_both_archs_and_all_dtypes(quick_run):
    _, rows, _ = quick_run
    want = _triton_kernels()
    assert {"_jumprelu_encode_kernel", "_sparse_decode_kernel", "_adam_b1zero_rows_kernel"} <= want
    have = {(r["kernel"], r["arch"], r["dtype"]) for r in rows if r["language"] == "triton"}
    missing = {(k, a, d) for k in want for a in ARCHS for d in DTYPES} - have
    assert not missing, sorted(missing)
    from sae_fast.backends import triton_kernels as tk

    for r in rows:
        if r["kernel"] != "_jumprelu_encode_kernel":
            continue
        # tensor cores: wgmma on sm_90a, mma.sync on sm_80, for bf16 and fp16
        if r["dtype"] != "float32":
            assert r["tensor_cores"] == ("wgmma" if r["arch"] == "sm_90a" else "mma"), r
        # the launcher's shared-memory estimate (it prunes tiles with it on smaller GPUs) is an upper bound
        c = dict(re.findall(r"(\w+)=(\S+)", r["config"]))
        tile = tuple(int(c[k]) for k in ("BM", "BN", "BK", "warps", "stages"))
        assert tk._encode_smem(tile, 4 if r["dtype"] == "float32" else 2) >= r["shared_bytes"], r


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not installed")
def test_every_cuda_kernel_for_both_archs_and_all_dtypes(quick_run):
    _, rows, _ = quick_run
    for src, names in _cuda_kernels().items():
        assert names, src
        for name in names:
            got = [r for r in rows if r["language"] == "cuda" and r["kernel"] == name and r.get("source") == src]
            for arch in ARCHS:
                dts = {r["dtype"] for r in got if r["arch"] == arch}
                assert dts == {"any"} or DTYPES <= dts, (src, name, arch, dts)


@pytest.mark.slow
def test_result_files(quick_run):
    _, rows, files = quick_run
    rec = json.loads(files["json"], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert rec["environment"]["commit"] and rec["environment"]["triton"]
    assert rec["problems"] == [] and len(rec["rows"]) == len(rows)
    assert rec["architectures"]["sm_90a"]["smem_per_block"] == 227 * 1024
    assert "| lang | kernel |" in files["md"] and files["md"].count("\n| triton |") == sum(r["language"] == "triton"
                                                                                           for r in rows)


# ------------------------------------------------------------------ fast checks
def test_occupancy_arithmetic():
    # 32 registers x 128 threads: 16 blocks by registers and by threads: every warp slot
    assert kr.occupancy("sm_90a", 32, 128, 0)["occupancy"] == 1.0
    # 128 registers x 256 threads: 4096 per warp, 16 warps, 2 blocks: 25%, limited by registers
    o = kr.occupancy("sm_90a", 128, 256, 0)
    assert (o["blocks_per_sm"], o["occupancy"], o["limiter"]) == (2, 0.25, "registers")
    # 40 registers: 1280 per warp, 51 warps, 12 blocks of 4; 41 round up to 1536 per warp: 10 blocks
    assert kr.occupancy("sm_80", 40, 128, 0)["blocks_per_sm"] == 12
    assert kr.occupancy("sm_80", 41, 128, 0)["blocks_per_sm"] == 10
    # 100 KiB of shared memory: one block on sm_80 (164 KiB), two on sm_90a (228 KiB)
    assert kr.occupancy("sm_80", 32, 128, 100 * 1024)["blocks_per_sm"] == 1
    o = kr.occupancy("sm_90a", 32, 128, 100 * 1024)
    assert o["blocks_per_sm"] == 2 and o["limiter"] == "shared memory"
    # 1024 threads: at most two blocks
    assert kr.occupancy("sm_90a", 16, 1024, 0)["blocks_per_sm"] == 2


def test_source_parsing():
    src = """
    constexpr int kThreads = 128;
    constexpr int kBig = 2 * kThreads;  // comment <<<x, 1>>>
    template <typename T, int V> __global__ void a_kernel(T* p) {}
    __global__ void __launch_bounds__(256) b_kernel() {}
    void host() {
      a_kernel<T, V><<<grid, kThreads, 0, stream>>>(p);
      SAE_LAUNCH(grid, kBig, 0, stream, b_kernel)();
      SAE_LAUNCH(grid, dim3(4, 4), 0, stream, c_kernel<float, 2>)(x);
    }
    """
    assert kr._launch_blocks(src) == {"a_kernel": {128}, "b_kernel": {256}, "c_kernel": set()}
    name, targs = kr._parse_instance(
        "void sae_fast_kernels::(anonymous namespace)::sparse_decode_kernel<__nv_bfloat16, float, 8>"
        "(long const*, __nv_bfloat16 const*, int const*)")
    assert (name, targs) == ("sparse_decode_kernel", ["__nv_bfloat16", "float", "8"])
    assert kr._parse_instance("void ns::set_last_kernel(long*, long const*, long, long)") == ("set_last_kernel", [])
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]\n")
    assert kr._ptxas_log(log)["_Z1kv"] == {
        "stack": 16, "spill_stores": 8, "spill_loads": 12, "registers": 255, "smem": 32
    }


def test_every_cu_file_is_picked_up():
    assert {os.path.relpath(p, ROOT)
            for p in kr.cuda_sources()
            } == {os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, "kernels", "*.cu"))}
    assert shutil.which("c++filt") or shutil.which("cu++filt") or True  # demangling is optional


def test_problems_are_reported():
    ok = {
        "language": "triton", "kernel": "k", "arch": "sm_90a", "dtype": "float32", "config": "c", "error": None,
        "spill_bytes": 0, "spill_stores": 0, "spill_loads": 0, "registers": 40, "shared_bytes": 1024,
        "ptx_target": "sm_90a"
    }
    assert kr.problems([ok]) == []
    bad = [
        dict(ok, spill_bytes=8, spill_stores=4, spill_loads=4),
        dict(ok, error="PTXASError: x"),
        dict(ok, shared_bytes=227 * 1024 + 1),
        dict(ok, ptx_target="sm_90"),
        dict(ok, arch="sm_80", shared_bytes=163 * 1024 + 1, ptx_target=None)
    ]
    found = kr.problems(bad)
    assert [p.split(":")[0] for p in found
            ] == ["spill", "compile failure", "shared memory overflow", "wrong target", "shared memory overflow"]
