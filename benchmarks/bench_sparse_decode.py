"""sparse_decode against dense decode (acts @ W_dec + b_dec).

    python -m benchmarks.bench_sparse_decode [--device cpu|cuda] [--d-in 2304] [--d-sae 32768]
        [--tokens 1024] [--l0 64] [--dtype float32] [--reps 10]

Contenders: dense PyTorch decode on the dense [tokens, d_sae] activations; the
reference sparse decode (index_select + einsum); the compiled sae_fast::sparse_decode
(cpu or cuda kernel) and, on CUDA, the Triton kernel. Each is checked against the
float64 truth before it is timed. Writes benchmarks/results/sparse_decode_<device>.{json,md}.
"""

from __future__ import annotations

import argparse

import torch

import sae_fast
from sae_fast import reference
from sae_fast.dtypes import DTYPES
from sae_fast.sparse import SparseActs

from .common import environment, time_fn, write


def make_acts(tokens, d_sae, l0, dtype, device, gen):
    idx = torch.stack([torch.randperm(d_sae, generator=gen)[:l0] for _ in range(tokens)])
    val = torch.rand(tokens, l0, generator=gen) + 0.1
    sp = SparseActs(idx, val.to(dtype), torch.full((tokens, ), l0, dtype=torch.int32), d_sae).to(device)
    return sp, sp.to_dense()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="result name (default sparse_decode_<device>)")
    a = ap.parse_args(argv)
    dtype, dev = DTYPES[a.dtype], torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(a.d_sae, a.d_in, generator=gen).to(dtype).to(dev)
    b = torch.randn(a.d_in, generator=gen).to(dtype).to(dev)
    inputs = [make_acts(a.tokens, a.d_sae, a.l0, dtype, dev, gen) for _ in range(2)]

    contenders = {
        "dense acts @ W_dec": lambda i: i[1] @ W + b,
        "reference sparse (index_select+einsum)": lambda i: reference.sparse_decode(i[0], W, b)
    }
    for name in sae_fast.backends.timed(dev):
        if name != "torch":  # the reference is the contender above
            contenders[f"sae_fast {name}"] = (lambda nm: lambda i: sae_fast.sparse_decode(i[0], W, b, backend=nm))(name)

    sp0, dense0 = inputs[0]
    truth = dense0.double().cpu() @ W.double().cpu() + b.double().cpu()
    dense_err = float(((dense0 @ W + b).double().cpu() - truth).abs().max())
    rows = []
    for name, fn in contenders.items():
        err = float((fn(inputs[0]).double().cpu() - truth).abs().max())
        ok = err <= 2 * dense_err + torch.finfo(dtype).eps * float(truth.abs().max())
        t = time_fn(fn, inputs, warmup=2, reps=a.reps)
        rows.append({"contender": name, "max_err_vs_float64": err, "correct": ok, **t})
    base = rows[0]["median_s"]
    # bytes-moved floor of the sparse decode: W_dec rows touched + values/indices + output
    el = torch.finfo(dtype).bits // 8
    sparse_bytes = a.tokens * a.l0 * (a.d_in * el + el + 8) + a.tokens * a.d_in * el
    for r in rows:
        r["speedup_vs_dense"] = base / r["median_s"]
        r["sparse_GBps"] = sparse_bytes / r["median_s"] / 1e9
    env = environment()
    cfg = {k: getattr(a, k) for k in ("device", "d_in", "d_sae", "tokens", "l0", "dtype", "reps")}
    md = [
        f"# sparse_decode vs dense decode ({env['device']}, {env['cpu_threads']} threads)", "",
        f"d_in {a.d_in}, d_sae {a.d_sae}, {a.tokens} tokens, L0 {a.l0}, {a.dtype}; median of {a.reps} runs "
        f"after 2 warm-ups, 2 rotated inputs. torch {env['torch']}, sae_fast {env['sae_fast']}, "
        f"commit {env['commit'][:12]}, {env['date']}.", "",
        "| contender | median ms | p25–p75 ms | speedup vs dense | correct |", "|---|---|---|---|---|"
    ]
    for r in rows:
        md.append(f"| {r['contender']} | {r['median_s'] * 1e3:.2f} | {r['p25_s'] * 1e3:.2f}–{r['p75_s'] * 1e3:.2f} "
                  f"| {r['speedup_vs_dense']:.1f}× | {'yes' if r['correct'] else 'NO'} |")
    md.append("")
    text = "\n".join(md)
    print(text)
    paths = write(a.out or f"sparse_decode_{dev.type}", {"config": cfg, "environment": env, "results": rows}, text)
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
