"""The explore dashboard in a real browser: headless Chromium (Debian's `chromium` package).

Marked `browser` and deselected by the plain test command (it needs the system package);
run it apart: `python -m pytest -m browser`. Chromium loads the pages from disk with their
scripts running (--dump-dom returns the DOM after load), and the checks read that DOM: one
row per feature in the index, each linking to its feature page, whose shaded token spans
carry the activations stats.json holds. A screenshot of the index and of a feature page is
saved to SAE_FAST_SCREENSHOT_DIR (default: the test's tmp dir).

SAE_FAST_DASHBOARD=DIR also checks an existing dashboard (e.g. the one `sae-fast train`
writes to runs/sae/dashboard), on top of the one built here from a tiny model.
"""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import sae_fast

from helpers import make_tiny_gemma3, write_word_tokenizer

pytestmark = pytest.mark.browser

TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun and "
        "birds sing songs of the morning light over green hills and quiet rivers ")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("headless Chromium not found: the browser check needs Debian's chromium package "
                    "(apt-get install chromium)")
    return exe


def _headless(*args, timeout=120) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def dom(page: Path) -> str:
    """The page's DOM after load (its scripts ran), as Chromium serialises it."""
    return _headless("--dump-dom", page.resolve().as_uri()).stdout


def screenshot(page: Path, out: Path, size="1280,900") -> Path:
    _headless(f"--screenshot={out}", f"--window-size={size}", page.resolve().as_uri())
    assert out.is_file() and out.stat().st_size > 10_000, out  # a real render, not a blank page
    return out


class _Parse(HTMLParser):
    """The parts of the DOM the checks read: index rows and their links, token spans."""

    def __init__(self):
        super().__init__()
        self.rows, self.links, self.spans, self._span = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-i" in a:
            self.rows.append(a)
        elif tag == "a" and re.fullmatch(r"feature_\d+\.html", a.get("href", "")):
            self.links.append(a["href"])
        elif tag == "span" and "tok" in a.get("class", "").split():
            self._span = {**a, "text": ""}
            self.spans.append(self._span)

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None


def _parse(text: str) -> _Parse:
    p = _Parse()
    p.feed(text)
    return p


def check_dashboard(d: Path, shots: Path) -> dict:
    """The DOM checks on dashboard directory d; returns what was seen."""
    stats = json.loads((d / "stats.json").read_text(), parse_constant=lambda c: pytest.fail(f"stats.json holds {c}"))
    d_sae = stats["d_sae"]
    index = _parse(dom(d / "index.html"))
    assert len(index.rows) == d_sae, "one row per feature"
    assert {int(r["data-i"]) for r in index.rows} == set(range(d_sae))
    freq = {f["index"]: f["frequency"] for f in stats["features"]}
    for r in index.rows:  # the rows carry each feature's frequency
        assert float(r["data-f"]) == pytest.approx(freq[int(r["data-i"])] or 0.0, rel=1e-5, abs=1e-12)
    # a feature's page is reachable from the index and shows its contexts: the most frequent one
    # firing on at most 5% of tokens (as the train summary picks; the always-on ones say little),
    # or the most frequent of all when none is that rare
    rare = [f for f in stats["features"] if 0 < f["frequency"] <= 0.05]
    best = max(rare or stats["features"], key=lambda f: f["fire_count"])
    link = f"feature_{best['index']}.html"
    assert link in index.links
    page = _parse(dom(d / link))
    shaded = [s for s in page.spans if "data-act" in s]
    want = [a for c in best["top_contexts"] for a in c["acts"]]
    assert len(shaded) == len(want) > 0
    got = [float(s["data-act"]) for s in shaded]
    assert got == pytest.approx([0.0 if a is None else a for a in want], rel=1e-5, abs=1e-6)
    peak = max(got)
    for s, a in zip(shaded, got):  # shading follows the activation: alpha = act / the feature's max
        alpha = float(re.search(r"rgba\([^)]*,\s*([0-9.]+)\)", s["style"]).group(1))
        assert alpha == pytest.approx(min(max(a, 0.0) / best["max"], 1.0), abs=2e-3)
    assert any(float(s["data-act"]) == peak for s in shaded)
    shots.mkdir(parents=True, exist_ok=True)
    screenshot(d / "index.html", shots / "dashboard_index.png")
    screenshot(d / link, shots / "dashboard_feature.png", size="1280,1800")  # down to its top contexts
    return {"features": len(index.rows), "spans": len(shaded), "page": link}


@pytest.fixture(scope="module")
def tiny_dashboard(tmp_path_factory):
    """explore's dashboard of a random SAE on a tiny Gemma 3 built here (nothing downloaded)."""
    from transformers import AutoTokenizer

    from sae_fast.explore import explore_dashboard

    d = tmp_path_factory.mktemp("tiny_lm")
    vocab = write_word_tokenizer(d, TEXT)
    model = make_tiny_gemma3(len(vocab), 2)
    tok = AutoTokenizer.from_pretrained(d)
    sae = sae_fast.JumpReLUSAE(32, 24, backend="cpu")
    with torch.no_grad():
        sae.threshold.fill_(0.5)
        sae.W_enc.mul_(3.0)
    sae.metadata = {"hf_hook_point_in": "model.layers.1.output"}
    out = tmp_path_factory.mktemp("dashboard")
    explore_dashboard(sae, model, tok, TEXT * 20, out, tokens=600, top_k=4, context_length=16, progress=False)
    return out


def _shots(tmp_path, name):
    root = os.environ.get("SAE_FAST_SCREENSHOT_DIR")
    return Path(root) if root else tmp_path / name


def test_dashboard_in_chromium(tiny_dashboard, tmp_path):
    seen = check_dashboard(tiny_dashboard, _shots(tmp_path, "tiny"))
    assert seen["features"] == 24


if os.environ.get("SAE_FAST_DASHBOARD"):  # collected only when asked for: never a skipped test

    def test_existing_dashboard_in_chromium(tmp_path):
        d = Path(os.environ["SAE_FAST_DASHBOARD"])
        assert (d / "index.html").is_file(), f"SAE_FAST_DASHBOARD={d} holds no index.html"
        check_dashboard(d, _shots(tmp_path, "existing"))
