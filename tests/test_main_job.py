"""The main job's numbers: what `sae-fast train` on its embedded default wrote must be a usable SAE.

Marked `main_job` and deselected by the plain test command (it reads a run made beforehand by
the README's install command, a few minutes of training); run it apart after that command:
`python -m pytest -m main_job` (SAE_FAST_MAIN_JOB=DIR: the run's --out, default runs/sae).
It checks that the run is the embedded default (its checkpoint's settings are the ones a bare
`sae-fast train` makes) and that it meets the targets: dead fraction at most 30%, delta LM loss
at most 1.0 nats, within 5 minutes (the train call, model load through the dashboard).
"""

import json
import os

import pytest

from sae_fast.cli import build_parser, train_config_from_args
from sae_fast.train.config import resume_differences
from sae_fast.train.trainer import latest_checkpoint, read_checkpoint

pytestmark = pytest.mark.main_job

MAX_DEAD_FRAC = 0.30
MAX_DELTA_LOSS = 1.0
MAX_SECONDS = 300.0


def _fail_on_constant(name):
    raise ValueError(f"not strict JSON: {name}")


@pytest.fixture(scope="module")
def run():
    out = os.environ.get("SAE_FAST_MAIN_JOB", "runs/sae")
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        pytest.fail(
            f"{path} not found: run the main job first (`sae-fast train`, or set SAE_FAST_MAIN_JOB to its --out)")
    with open(path) as f:
        metrics = json.load(f, parse_constant=_fail_on_constant)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"{out}: no checkpoint"
    return out, metrics, read_checkpoint(ckpt)


def test_the_run_is_the_embedded_default(run):
    out, metrics, st = run
    # the settings a bare `sae-fast train --out OUT` makes; every one that changes the run must match
    args = build_parser().parse_args(["train", "--out", out])
    mismatches, _ = resume_differences(st["config"], train_config_from_args(args))
    assert not mismatches, mismatches
    assert metrics[
        "kind"] == "sae" and metrics["steps"] == st["step"] == st["config"]["tokens"] // st["config"]["batch_size"]


def test_the_embedded_default_is_a_usable_sae(run):
    _, m, _ = run
    assert m["dead_frac"] is not None and m["dead_frac"] <= MAX_DEAD_FRAC, m["dead_frac"]
    assert m["delta_loss"] is not None and m["delta_loss"] <= MAX_DELTA_LOSS, m["delta_loss"]
    assert m["spliced_loss"] > m["clean_loss"] > 0 and m["eval_tokens"] > 0
    assert 0 < m["eval_fvu"] < 1 and m["eval_l0"] > 0


def test_the_embedded_default_runs_within_five_minutes(run):
    _, m, _ = run
    assert m["total_s"] <= MAX_SECONDS, m
    assert m["total_s"] >= m["setup_s"] + m["wall_s"] + m["eval_s"] + m["dashboard_s"] - 1e-6
    assert os.path.isfile(m["dashboard"]) and m["dashboard_features"]
