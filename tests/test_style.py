"""The style checks contributors run, run by the suite too (so CI runs them): the ruff
linter and the yapf formatter on every Python file, clang-format on every C++/CUDA file.
Configuration: [tool.ruff] and [tool.yapf] in pyproject.toml, .clang-format. To fix:
`ruff check --fix .`, `yapf -i -r sae_fast benchmarks tests setup.py` and
`clang-format -i <files>`."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP_DIRS = ("csrc", "kernels", os.path.join("tests", "cuda_emu"))
CPP_EXTS = (".cpp", ".cu", ".cuh", ".h")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed; `pip install -e .[test]` installs it (pinned in pyproject.toml)"
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def cpp_files() -> list[str]:
    out = []
    for d in CPP_DIRS:
        for ext in CPP_EXTS:
            out += glob.glob(os.path.join(ROOT, d, "**", f"*{ext}"), recursive=True)
    return sorted(out)


PY_PATHS = ("sae_fast", "benchmarks", "tests", "setup.py")


def test_ruff_lint():
    r = _run([_tool("ruff"), "check", "."])
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}\n{r.stderr}"


def test_yapf_format():
    r = _run([_tool("yapf"), "--diff", "--recursive", *PY_PATHS])
    assert r.returncode == 0 and not r.stdout, f"yapf would reformat (yapf -i -r ...):\n{r.stdout[-5000:]}{r.stderr}"


def test_clang_format():
    files = cpp_files()
    assert len(files) >= 10, files  # the C++/CUDA sources are where this test looks
    r = _run([_tool("clang-format"), "--dry-run", "--Werror", *files])
    assert r.returncode == 0, f"clang-format would change:\n{r.stderr[-5000:]}"
