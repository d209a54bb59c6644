"""jumprelu_sae_row_grads, the row-grads training step: the loss without a graph and the gradients
of the touched features only (RowGrads).

Every implementation (helpers.impls): JumpReLUSAE.training_row_grads where users can select
it, sae_fast.step.row_grads over its Backend else; the sparse path on each, the chunked
dense path (torch GEMMs, the same on every backend) once; the loss and every gradient,
threshold included, against the float64 truth with the tolerance of the dense path in the
same dtype, on exact-pre inputs. The autograd form of the step is in
test_jumprelu_sae_loss.py.
"""

import pytest
import torch

import sae_fast
from sae_fast import reference, step
from sae_fast.step import touched_features

from helpers import (ALL, DTYPES, EXACT_BANDWIDTH, STEP_CASES, STEP_D_IN, STEP_D_OUT, STEP_D_SAE, STEP_FEW_CASES,
                     STEP_KW, TRANSCODER_CASES, TRANSCODER_FEW_CASES, assert_close_as_dense, deterministic_mode,
                     dtype_id, exact_pre_case, impl_cases, impls, reference_grads, transcoder_case)


def _sae(params, apply_b_dec, backend="torch", device="cpu"):
    sae = sae_fast.JumpReLUSAE(STEP_D_IN, STEP_D_SAE, dtype=params["W_enc"].dtype, device=device, backend=backend,
                               apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        for k, v in params.items():
            getattr(sae, k).copy_(v)
    return sae


def _row_grads(impl, x, params, apply_b_dec, dense):
    """impl's (TrainingOutput, RowGrads): through the module where the backend is selectable."""
    x = impl.to(x)
    if impl.selectable:
        sae = _sae(params, apply_b_dec, impl.name, impl.device)
        out = sae.training_row_grads(x, dense=dense, **STEP_KW)
        assert all(prm.grad is None for prm in sae.parameters())  # .grad is left alone
        return out
    p = step.SAEParams(**{k: impl.to(v) for k, v in params.items()}, apply_b_dec_to_input=apply_b_dec)
    return step.row_grads(impl.backend, x, p, dense=dense, **STEP_KW)


# the sparse path on every implementation (the Triton interpreter: STEP_FEW_CASES); the chunked
# dense path (torch GEMMs, the same on every backend) once
PATHS = [
    pytest.param(p.values[0], False, *p.values[1:], id=p.id, marks=p.marks)
    for p in impl_cases(STEP_CASES, STEP_FEW_CASES)
]
PATHS += [
    pytest.param(i, True, *case, id="-".join(map(str, ["torch-dense", *case]))) for i in ALL if i.name == "torch"
    for case in STEP_CASES
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,dense,n,mode,apply_b_dec", PATHS)
def test_row_grads_match_reference(impl, dense, dtype, n, mode, apply_b_dec):
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, dtype, mode)
    if apply_b_dec:
        p["b_dec"] = torch.zeros_like(p["b_dec"])  # keeps x - b_dec on the exact grid
    out, g = _row_grads(impl, x, p, apply_b_dec, dense)
    truth, tg = reference_grads(x.double(), {k: v.double() for k, v in p.items()}, apply_b_dec)
    dense_path, dg = reference_grads(x, p, apply_b_dec)

    # rows are exactly the features in the active set or the band of some token
    pre64 = reference.jumprelu_pre(x.double(), p["W_enc"].double(), p["b_enc"].double())
    want = ((reference.active_mask(pre64, p["threshold"].double())
             | reference.band_mask(pre64, p["threshold"], EXACT_BANDWIDTH)).any(0).nonzero().squeeze(1))
    assert torch.equal(g.rows.cpu(), want)
    assert g.W_enc.shape == g.W_dec.shape == (want.numel(), STEP_D_IN)
    assert g.threshold.dtype == torch.float32 and g.W_dec.dtype == g.W_enc.dtype == g.b_dec.dtype == dtype

    assert out.l0.item() == truth.l0.item() and out.l0_loss.item() == pytest.approx(truth.l0_loss.item())
    assert torch.equal(out.fired.cpu(), truth.fired)
    assert_close_as_dense(out.mse_loss.cpu(), truth.mse_loss, dense_path.mse_loss, what="mse", ulp_dtype=dtype)
    full = g.full_size(STEP_D_SAE)
    for k in full:
        assert_close_as_dense(full[k].cpu(), tg[k], dg[k], what=f"{impl.name} row grad {k}")
    if n > 1 and mode == "mixed":
        assert g.threshold.abs().sum() > 0  # the band is exercised
        assert g.rows.numel() < STEP_D_SAE  # and some features were left out


@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("impl", impls(where=lambda i: i.backend.loss is None))
def test_row_grads_are_the_autograd_gradients_compacted(impl, apply_b_dec):
    # same backend, same kernels: the row-grads step and loss.backward() give the same numbers (the
    # implementations whose autograd form is the sparse step; deterministic mode makes the
    # Triton encoder list each row's slots in the same order in both runs)
    x, p = exact_pre_case(29, STEP_D_IN, STEP_D_SAE, torch.float32, "mixed")
    with deterministic_mode():
        out, g = _row_grads(impl, x, p, apply_b_dec, dense=False)
        ps = {k: impl.to(v).clone().requires_grad_() for k, v in p.items()}
        if impl.selectable:
            ref = sae_fast.jumprelu_sae_loss(impl.to(x), **ps, apply_b_dec_to_input=apply_b_dec, backend=impl.name,
                                             **STEP_KW)
        else:
            ref = step.loss(impl.backend, impl.to(x), step.SAEParams(**ps, apply_b_dec_to_input=apply_b_dec), **STEP_KW)
        ref.loss.backward()
    assert torch.equal(out.loss, ref.loss.detach())
    full = g.full_size(STEP_D_SAE)
    for k, prm in ps.items():
        if (k == "b_dec" and apply_b_dec) or k == "threshold":
            # the row-grads step sums dx' as W_enc[:, rows] @ db_enc instead of decoding it per token,
            # and keeps dL/d step_sum = l0_coefficient / n unrounded (autograd has it in float32)
            torch.testing.assert_close(full[k], prm.grad, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(full[k], prm.grad), k


@pytest.mark.parametrize("impl,dense,n,mode,apply_b_dec", [p for p in PATHS if not p.values[4]])
def test_quadratic_l0_row_grads_match_reference(impl, dense, n, mode, apply_b_dec):
    # Gemma Scope 2's quadratic L0 loss on the row-grads step (sparse on every implementation, dense once)
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, torch.float32, mode)
    kw = dict(STEP_KW, target_l0=4.0)
    if impl.selectable:
        out, g = _sae(p, False, impl.name, impl.device).training_row_grads(impl.to(x), dense=dense, **kw)
    else:
        sp = step.SAEParams(**{k: impl.to(v) for k, v in p.items()})
        out, g = step.row_grads(impl.backend, impl.to(x), sp, dense=dense, **kw)
    ps = {k: v.double().requires_grad_() for k, v in p.items()}
    truth = reference.jumprelu_sae_loss(x.double(), **ps, **kw)
    truth.loss.backward()
    pd = {k: v.clone().requires_grad_() for k, v in p.items()}
    dense_path = reference.jumprelu_sae_loss(x, **pd, **kw)
    dense_path.loss.backward()
    assert out.l0_loss.item() == pytest.approx(truth.l0_loss.item(), rel=1e-6)
    full = g.full_size(STEP_D_SAE)
    for k in full:
        assert_close_as_dense(full[k].cpu(), ps[k].grad, pd[k].grad, what=f"{impl.name} row grad {k}")


# ------------------------------------------------------------------ transcoders
TRANSCODER_PATHS = [
    pytest.param(p.values[0], False, *p.values[1:], id=p.id, marks=p.marks)
    for p in impl_cases(TRANSCODER_CASES, TRANSCODER_FEW_CASES)
]
TRANSCODER_PATHS += [
    pytest.param(i, True, *case, id="-".join(map(str, ["torch-dense", *case]))) for i in ALL if i.name == "torch"
    for case in TRANSCODER_CASES
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl,dense,n,mode,skip", TRANSCODER_PATHS)
def test_transcoder_row_grads_match_reference(impl, dense, dtype, n, mode, skip):
    """A transcoder's row-grads step (target in d_out, optional skip connection): through
    JumpReLUTranscoder.training_row_grads where the backend is selectable; W_skip's gradient
    is dense (RowGrads.W_skip), the rest compact, all as close to the float64 truth as the
    dense path."""
    x, p, y = transcoder_case(n, dtype, mode, skip)
    if impl.selectable:
        tc = sae_fast.JumpReLUTranscoder.from_params({k: impl.to(v) for k, v in p.items()}, backend=impl.name)
        out, g = tc.training_row_grads(impl.to(x), impl.to(y), dense=dense, **STEP_KW)
        assert all(prm.grad is None for prm in tc.parameters())
    else:
        sp = step.SAEParams(**{k: impl.to(v) for k, v in p.items()})
        out, g = step.row_grads(impl.backend, impl.to(x), sp, dense=dense, target=impl.to(y), **STEP_KW)
    truth, tg = reference_grads(x.double(), {k: v.double() for k, v in p.items()}, False, target=y.double())
    dense_path, dg = reference_grads(x, p, False, target=y)
    assert g.W_dec.shape[1] == STEP_D_OUT and (g.W_skip is not None) == skip
    assert out.reconstruction.shape == (n, STEP_D_OUT) and out.l0.item() == truth.l0.item()
    assert_close_as_dense(out.mse_loss.cpu(), truth.mse_loss, dense_path.mse_loss, what="mse", ulp_dtype=dtype)
    full = g.full_size(STEP_D_SAE)
    assert set(full) == set(p)
    for k in full:
        assert_close_as_dense(full[k].cpu(), tg[k], dg[k], what=f"{impl.name} row grad {k}")


def test_transcoder_row_grads_train_with_sparse_adam():
    # the skip connection is one dense row of the row-sparse Adam; the step lowers the loss
    x, p, y = transcoder_case(64, torch.float32, "mixed", True)
    tc = sae_fast.JumpReLUTranscoder.from_params(p, backend="torch")
    opt = sae_fast.SparseAdamB1Zero.for_sae(tc, lr=1e-2)
    assert "W_skip" in opt.sae_params
    first = None
    for _ in range(20):
        out, g = tc.training_row_grads(x, y, **STEP_KW)
        first = first if first is not None else out.mse_loss.item()
        opt.step_rows(g)
    assert out.mse_loss.item() < 0.8 * first
    sae_opt = sae_fast.SparseAdamB1Zero.for_sae(sae_fast.JumpReLUSAE(STEP_D_IN, STEP_D_SAE))
    with pytest.raises(ValueError, match="disagree on W_skip"):
        sae_opt.step_rows(g)


def test_touched_features_and_grad_norm():
    idx = torch.tensor([[5, 2, 0], [7, 0, 0]])
    cnt = torch.tensor([2, 1], dtype=torch.int32)
    nidx = torch.tensor([[9], [2]])
    ncnt = torch.tensor([1, 0], dtype=torch.int32)
    rows, pos = touched_features(12, (idx, cnt), (nidx, ncnt))
    assert rows.tolist() == [2, 5, 7, 9]  # padding slots (index 0) name nothing
    assert pos[rows].tolist() == [0, 1, 2, 3]
    x, p = exact_pre_case(9, STEP_D_IN, STEP_D_SAE, torch.float32, "mixed")
    sae = _sae(p, False)
    _, g = sae.training_row_grads(x, **STEP_KW)
    ref = sae.training_forward(x, **STEP_KW)
    ref.loss.backward()
    norm = torch.stack([prm.grad.float().norm() for prm in sae.parameters()]).norm()
    torch.testing.assert_close(g.norm(), norm)
    # clip_ scales like torch.nn.utils.clip_grad_norm_
    before = g.full_size(STEP_D_SAE)
    torch.testing.assert_close(g.clip_(float(norm) / 4), norm)  # returns the norm before clipping
    torch.nn.utils.clip_grad_norm_(sae.parameters(), float(norm) / 4)
    after = g.full_size(STEP_D_SAE)
    for k, prm in sae.named_parameters():
        torch.testing.assert_close(after[k], prm.grad, msg=k)
        assert not torch.equal(after[k], before[k]) or not before[k].any()


def test_row_grads_bad_input():
    sae = sae_fast.JumpReLUSAE(8, 16, backend="torch")
    with pytest.raises(ValueError, match="l0_coefficient"):
        sae.training_row_grads(torch.randn(3, 8), l0_coefficient=-1.0)
    with pytest.raises(ValueError, match="x must have last dimension d_in=8"):
        sae.training_row_grads(torch.randn(3, 9), l0_coefficient=0.1)


def test_auto_path_follows_density(monkeypatch):
    # a fresh Gemma Scope init (threshold 0.001) has about half the features active:
    # the step runs densely, in chunks; once L0 is small, sparsely
    sae = sae_fast.JumpReLUSAE(16, 200, backend="torch")
    x = torch.randn(40, 16)
    calls = []
    real = step.chunked_dense_row_grads
    monkeypatch.setattr(step, "chunked_dense_row_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, g = sae.training_row_grads(x, l0_coefficient=1e-3)
    assert calls and out.l0.item() > 200 / 32 and g.rows.numel() == 200
    with torch.no_grad():
        sae.threshold.fill_(2.5)  # now about one feature per token
    sae.training_row_grads(x, l0_coefficient=1e-3)  # measured density from the last step: still dense
    n_calls = len(calls)
    out, g = sae.training_row_grads(x, l0_coefficient=1e-3)
    assert len(calls) == n_calls and out.l0.item() < 200 / 32  # this step's measured density: sparse
    _, gd = sae.training_row_grads(x, l0_coefficient=1e-3, dense=True)
    for k in ("rows", "W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(g, k), getattr(gd, k), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_dense_path_chunks_agree(chunk):
    x, p = exact_pre_case(21, STEP_D_IN, STEP_D_SAE, torch.float32, "mixed")
    o1, g1 = step.chunked_dense_row_grads(x, step.SAEParams(**p), **STEP_KW, chunk_features=chunk)
    o2, g2 = step.chunked_dense_row_grads(x, step.SAEParams(**p), **STEP_KW)
    assert torch.equal(g1.rows, g2.rows) and o1.l0.item() == o2.l0.item() and torch.equal(o1.fired, o2.fired)
    for k in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(g1, k), getattr(g2, k), rtol=1e-5, atol=1e-6, msg=k)
