import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run through the interpreter on CPU tensors;
# it must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CUDA kernels run by the CPU emulator are one more implementation of every op: a
# test-only backend the tests get from backends.implementations() where g++ is present.
from cuda_emu import torch_impl  # noqa: E402
from sae_fast import backends  # noqa: E402

backends.register("cuda-emu", torch_impl.backend, selectable=False)

# Fresh random inputs on every run, reproducible on demand: the run's base seed
# is printed in the header; SAE_FAST_TEST_SEED=<seed> replays it.
BASE_SEED = int(os.environ.get("SAE_FAST_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    return f"sae_fast test seed: SAE_FAST_TEST_SEED={BASE_SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((BASE_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # Tests choose backends explicitly; a developer's SAE_FAST_BACKEND must not leak in.
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)


@pytest.fixture()
def tiny_model(tmp_path):
    """A directory with a tiny random Gemma 3 (model/) and a text (a.txt): helpers.write_tiny_gemma3."""
    pytest.importorskip("transformers")
    from helpers import write_tiny_gemma3

    write_tiny_gemma3(tmp_path)
    return tmp_path
