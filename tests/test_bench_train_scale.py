"""The training-step-at-scale benchmark runs both steps, reaches the asked L0, and writes its record."""

import json
import os

import pytest

from benchmarks import bench_train_scale
from benchmarks.common import RESULTS


def test_bench_train_scale_small():
    rec = bench_train_scale.main([
        "--device", "cpu", "--d-in", "32", "--d-sae", "1024", "--batch", "128", "--l0", "8", "--steps", "3", "--warmup",
        "1", "--dtype", "float32", "--out", "_pytest_train_scale"
    ])
    try:
        ours, dense = rec["results"]["sae_fast row-grads step"], rec["results"]["dense PyTorch step"]
        for r in (ours, dense):
            assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0
            assert 4 < r["mean_l0"] < 16  # the analytic thresholds give about the asked L0
        assert ours["backend"] == "cpu" or ours["backend"] == "torch"
        saved = json.load(open(os.path.join(RESULTS, "_pytest_train_scale.json")))
        assert saved["environment"]["commit"] and saved["config"]["d_sae"] == 1024
        assert "| sae_fast row-grads step |" in open(os.path.join(RESULTS, "_pytest_train_scale.md")).read()
    finally:
        for ext in ("json", "md"):
            p = os.path.join(RESULTS, f"_pytest_train_scale.{ext}")
            if os.path.exists(p):
                os.remove(p)


def test_readme_documents_every_flag():
    readme = open(os.path.join(os.path.dirname(RESULTS), "..", "README.md")).read()
    flags = [o for a in bench_train_scale.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    missing = [f for f in flags if f not in readme.split("bench_train_scale", 1)[-1]]
    assert not missing, f"README.md does not document {missing} of benchmarks.bench_train_scale"
    with pytest.raises(SystemExit):
        bench_train_scale.main(["--d-sae", "0", "--no-dense"])
