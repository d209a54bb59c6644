"""adam_b1zero_rows_: Adam with beta1 = 0 on the named rows of a parameter, in place, with the
lazy decay of rows that sat steps out (sae_fast.reference.adam_b1zero_rows_).

Every implementation's optimizer (helpers.Impl.optimizer: the op of its Backend, the
reference where it has none) against the float64 truth with the tolerance of the reference
in the same dtype; rows not named must not be written at all (helpers.check_adam_rows).
SparseAdamB1Zero, the optimizer built on it, is tested in test_optim.py; the emulator-specific
checks of the CUDA kernel in test_cuda_emu.py; bad rows in test_memory_safety.py.
"""

import pytest
import torch

from helpers import DTYPES, adam_case, check_adam_rows, dtype_id, impls

LAYOUTS = [  # (shape, sparse_dim, renorm): W_dec rows, W_enc columns, b_enc, b_dec; long rows (a block each on CUDA)
    ((37, 11), 0, False), ((37, 11), 0, True), ((11, 37), 1, False), ((11, 37), 1, True), ((37, ), 0, False),
    ((11, ), None, False), ((5, 300), 0, True), ((300, 5), 1, False), ((5, 300), 0, False)
]
# a dense parameter (sparse_dim None) is always touched whole
CASES = [
    pytest.param(*layout, touch,
                 id=f"{'x'.join(map(str, layout[0]))}-dim{layout[1]}-{touch}" + ("-renorm" if layout[2] else ""))
    for layout in LAYOUTS for touch in ("some", "all", "none") if layout[1] is not None or touch == "all"
]


def _kernel(impl):
    """impl's optimizer on CPU tensors (check_adam_rows' contract): moved to its device and back."""
    opt = impl.optimizer
    if impl.device.type == "cpu":
        return opt

    def on_device(param, v, last, rows, grad, **kw):
        moved = impl.to(param, v, last)
        opt(*moved, impl.to(rows), impl.to(grad), **kw)
        for t, m in zip((param, v, last), moved):
            t.copy_(m.cpu())

    return on_device


@pytest.mark.parametrize("beta2", [0.99, 0.0])
@pytest.mark.parametrize("shape,sd,renorm,touch", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", impls())
def test_matches_reference(impl, dtype, shape, sd, renorm, touch, beta2):
    p, v, last, rows, grad = adam_case(shape, sd, dtype, touch)
    check_adam_rows(_kernel(impl), p, v, last, rows, grad, step=7, lr=3e-2, beta2=beta2, eps=1e-8, sparse_dim=sd,
                    renorm=renorm)


@pytest.mark.parametrize("impl", impls())
def test_deterministic(impl):
    p, v, last, rows, grad = adam_case((37, 11), 0, torch.float32, "some")
    kw = dict(step=7, lr=3e-2, beta2=0.99, eps=1e-8, sparse_dim=0, renorm=True)
    outs = []
    for _ in range(2):
        pk, vk, lk = p.clone(), v.clone(), last.clone()
        _kernel(impl)(pk, vk, lk, rows, grad, **kw)
        outs.append((pk, vk, lk))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", impls("cpu", "cuda", "triton"))
def test_opcheck(impl):
    p, v, last, rows, grad = adam_case((37, 11), 0, torch.float32, "some")
    args = (*impl.to(p, v, last, rows, grad), 7, 3e-2, 0.99, 1e-8, 0, True)
    torch.library.opcheck(impl.ops.adam_b1zero_rows_.default, args)
