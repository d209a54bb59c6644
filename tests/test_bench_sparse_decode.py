"""The sparse_decode benchmark runs, checks every contender, and writes its record."""

import json
import os

from benchmarks import bench_sparse_decode
from benchmarks.common import RESULTS


def test_bench_sparse_decode_small():
    rows = bench_sparse_decode.main([
        "--device", "cpu", "--d-in", "48", "--d-sae", "300", "--tokens", "17", "--l0", "5", "--reps", "2", "--out",
        "_pytest_sparse_decode"
    ])
    try:
        names = [r["contender"] for r in rows]
        assert names[0] == "dense acts @ W_dec" and "sae_fast cpu" in names
        assert all(r["correct"] for r in rows), rows
        rec = json.load(open(os.path.join(RESULTS, "_pytest_sparse_decode.json")))
        assert rec["environment"]["commit"] and rec["config"]["l0"] == 5
    finally:
        for ext in ("json", "md"):
            p = os.path.join(RESULTS, f"_pytest_sparse_decode.{ext}")
            if os.path.exists(p):
                os.remove(p)
