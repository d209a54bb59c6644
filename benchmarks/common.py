"""Shared benchmark plumbing: the timing and environment record of sae_fast.bench, and result files."""

from __future__ import annotations

import json
import os

from sae_fast.bench.harness import environment, time_fn  # noqa: F401  (one timing implementation for every benchmark)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write(name: str, record: dict, markdown: str) -> tuple[str, str]:
    os.makedirs(RESULTS, exist_ok=True)
    jp, mp = os.path.join(RESULTS, f"{name}.json"), os.path.join(RESULTS, f"{name}.md")
    with open(jp, "w") as f:
        json.dump(record, f, indent=2)
    with open(mp, "w") as f:
        f.write(markdown)
    return jp, mp
