"""`sae-fast bench --quick` (what CI runs): every contender checked and timed, files written."""

import json
import os

from sae_fast.cli import main


def test_bench_quick(tmp_path, capsys):
    rc = main(["bench", "--quick", "--out", str(tmp_path), "--name", "q"])
    out = capsys.readouterr().out
    rec = json.load(open(tmp_path / "q.json"))
    assert rc == 0 and all(r["correct"] for r in rec["results"])
    ops = {r["op"] for r in rec["results"]}
    assert ops == {"encode", "encode_sparse", "decode", "forward", "train_step"}
    contenders = {r["contender"] for r in rec["results"]}
    assert {"dense eager", "dense torch.compile", "sae_fast cpu"} <= contenders
    assert {r["d_sae"] for r in rec["results"]} == {1024, 4096}
    for r in rec["results"]:
        assert r["median_s"] > 0 and r["p25_s"] <= r["median_s"] <= r["p75_s"] and r["fraction_of_floor"] > 0
    roof = rec["roofline"]["float32"]
    assert roof["matmul_tflops"] > 0 and roof["copy_gbps"] > 0
    assert rec["environment"]["commit"] and rec["environment"]["torch"]
    # every contender that could not run says why
    assert all(s["reason"] for s in rec["skipped"])
    assert "| shape | op | contender |" in out and os.path.exists(tmp_path / "q.md")
    assert os.path.getsize(tmp_path / "q_time.png") > 1000 and os.path.getsize(tmp_path / "q_speedup.png") > 1000
