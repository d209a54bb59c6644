"""benchmarks/bench_explore.py on tiny shapes (and a tiny model built here for its end-to-end part): every
contender is checked against the dense baseline, and the record has its structure (timings not checked)."""

import json
import os

import pytest

from benchmarks import bench_explore
from benchmarks.common import RESULTS

pytest.importorskip("transformers")
NAME = "_pytest_explore"


def test_bench_explore_tiny(tiny_model):
    try:
        rec = bench_explore.main([
            "--device", "cpu", "--d-in", "24", "--d-sae", "96", "200", "--tokens", "64", "--context-length", "8",
            "--l0", "6", "--top-k", "3", "--reps", "2", "--e2e-model",
            str(tiny_model / "model"), "--e2e-data",
            str(tiny_model / "a.txt"), "--e2e-layer", "1", "--e2e-d-sae", "40", "--e2e-tokens", "70", "--e2e-reps", "2",
            "--out", NAME
        ])
        saved = json.load(open(os.path.join(RESULTS, f"{NAME}.json")))
        assert saved == json.loads(json.dumps(rec))
        rows = saved["stats_step"]
        assert [r["d_sae"] for r in rows] == [96] * 6 + [200] * 6
        assert [r["part"] for r in rows[:6]] == ["step"] * 3 + ["statistics only"] * 3
        assert rows[0]["contender"].startswith("dense") and rows[3]["contender"].startswith("dense")
        assert rows[0]["speedup_vs_dense"] == rows[3]["speedup_vs_dense"] == 1.0
        assert all(r["correct"] and r["median_s"] > 0 and r["reps"] == 2 for r in rows)
        assert all(0 < r["measured_l0"] < 40 for r in rows)
        e2e = saved["end_to_end"]
        assert e2e["tokens"] == 70 and e2e["hook_point"] == "model.layers.1.output" and e2e["d_sae"] == 40
        assert e2e["tokens_per_s"] > 0 and 0 < e2e["sae_share"] < 1 and len(e2e["runs"]) == 2
        assert e2e["seconds_model"] > 0 and e2e["seconds_sae"] > 0 and e2e["measured_l0"] > 0
        assert saved["environment"]["commit"] and saved["config"]["d_sae"] == [96, 200]
        md = open(os.path.join(RESULTS, f"{NAME}.md")).read()
        assert "explore end to end" in md and md.count("| yes |") == 12
    finally:
        for ext in ("json", "md"):
            p = os.path.join(RESULTS, f"{NAME}.{ext}")
            if os.path.exists(p):
                os.remove(p)
