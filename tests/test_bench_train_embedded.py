"""benchmarks/bench_train_embedded.py on a tiny model built here (its --train-args): each run is a
whole `sae-fast train` process whose metrics.json lands in the table, and the record has its
structure (timings not checked)."""

import json
import os

import pytest

from benchmarks import bench_train_embedded
from benchmarks.common import RESULTS

pytest.importorskip("transformers")
NAME = "_pytest_train_embedded"


@pytest.mark.slow
def test_bench_train_embedded_tiny(tiny_model, tmp_path):
    common = (f"--model {tiny_model / 'model'} --data {tiny_model / 'a.txt'} --layer 1 --d-sae 64 --tokens 1024 "
              "--batch-size 64 --context-length 16 --eval-contexts 2 --explore-tokens 32 --buffer-tokens 256 "
              "--dead-window-tokens 256 --device cpu")
    try:
        rec = bench_train_embedded.main([
            "--variants", "default", "lr 1e-3", "--runs-dir",
            str(tmp_path / "runs"), "--train-args", common, "--out", NAME
        ])
        saved = json.load(open(os.path.join(RESULTS, f"{NAME}.json")))
        assert saved == json.loads(json.dumps(rec))
        rows = saved["runs"]
        assert [r["name"] for r in rows] == ["default", "lr 1e-3"] and rows[1]["flags"] == "--lr 1e-3"
        for r in rows:  # each row is its run's own metrics.json
            m = json.load(open(tmp_path / "runs" / r["name"].replace(" ", "_") / "metrics.json"))
            assert {k: m[k]
                    for k in ("dead_frac", "delta_loss", "eval_fvu", "total_s")
                    } == {k: r[k]
                          for k in ("dead_frac", "delta_loss", "eval_fvu", "total_s")}
            assert r["steps"] == 16 and r["process_s"] >= r["total_s"] > 0
        assert rows[0]["delta_loss"] != rows[1]["delta_loss"]  # the flag reached the run
        assert saved["train_args"] == common and saved["preset"]["d_sae"] == bench_train_embedded.EMBEDDED_PRESET[
            "d_sae"]
        md = open(os.path.join(RESULTS, f"{NAME}.md")).read()
        assert md.count("\n| default |") == 1 and "`--lr 1e-3` | 16 |" in md and common in md
        assert md == bench_train_embedded.markdown(saved)  # rebuilt from the saved record
    finally:
        for ext in ("json", "md"):
            p = os.path.join(RESULTS, f"{NAME}.{ext}")
            if os.path.exists(p):
                os.remove(p)
