"""The one command for a GPU day (benchmarks/gpu_acceptance.py): refuses to run
without a GPU, and its record and logs are written as documented (the plumbing
is exercised on CPU with --allow-cpu and a small test selection)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_acceptance


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal only happens without a GPU")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert gpu_acceptance.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_record_and_logs_on_cpu(tmp_path):
    copy = tmp_path / "copy"
    r = subprocess.run([
        sys.executable, "-m", "benchmarks.gpu_acceptance", "--allow-cpu", "--steps", "tests", "--out",
        str(tmp_path), "--copy-to",
        str(copy), "--pytest-args", "tests/test_cli.py -m 'not gpu'"
    ], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / "gpu_acceptance_cpu.json").read_text(), parse_constant=lambda c: 1 / 0)
    step = rec["steps"]["tests"]
    assert step["status"] == "passed" and step["exit_code"] == 0 and "passed" in step["tail"]
    for key in ("device", "torch", "triton", "commit", "date"):
        assert key in rec["environment"]
    assert "| tests | passed |" in (tmp_path / "gpu_acceptance_cpu.md").read_text()
    assert sorted(p.name for p in copy.iterdir()) == [
        "gpu_acceptance_cpu.json", "gpu_acceptance_cpu.md", "gpu_acceptance_cpu_tests.log"
    ]
    assert gpu_acceptance.main(["--allow-cpu", "--steps", "nonsense", "--out", str(tmp_path)]) == 2
