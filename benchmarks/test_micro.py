"""pytest-benchmark micro suite: `python -m pytest benchmarks/test_micro.py` (not part of the test run).

Small CPU shapes of the same ops `sae-fast bench` times; compare runs with
pytest-benchmark's --benchmark-compare / --benchmark-autosave.
"""

import pytest
import torch

import sae_fast
from sae_fast.bench import Shape, Workload

SHAPE = Shape(d_in=256, d_sae=4096, tokens=256, l0=16, dtype="float32")
BACKENDS = sae_fast.backends.timed("cpu")


@pytest.fixture(scope="module")
def wl():
    return Workload(SHAPE, torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jumprelu_encode_sparse(benchmark, wl, backend):
    sae = wl.sae(backend)
    with torch.no_grad():
        benchmark(sae.encode_sparse, wl.xs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode(benchmark, wl, backend):
    sae = wl.sae(backend)
    with torch.no_grad():
        acts = sae.encode_sparse(wl.xs[0])
        benchmark(sae.decode, acts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jumprelu_sae_loss_backward(benchmark, wl, backend):
    sae = wl.sae(backend)

    def step():
        sae.zero_grad(set_to_none=True)
        sae.training_forward(wl.xs[0], l0_coefficient=1e-3, bandwidth=1e-3).loss.backward()

    benchmark(step)
