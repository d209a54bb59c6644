"""SparseAdamB1Zero equals torch.optim.Adam(betas=(0, beta2)) to rounding, with lazy decay.

Its row update, adam_b1zero_rows_, is tested on every implementation in test_adam_b1zero_rows.py."""

import copy

import pytest
import torch

from sae_fast import JumpReLUSAE
from sae_fast.optim import SparseAdamB1Zero

from helpers import impls


def _params(device="cpu"):
    torch.manual_seed(0)
    return [t.to(device) for t in (torch.randn(37, 11), torch.randn(11, 37), torch.randn(37), torch.randn(11))]


SPARSE_DIMS = [0, 1, 0, None]


def _grads(step, gen, touch=0.3, idle_rows=(3, 5)):
    """Gradients where only some rows (features) are nonzero; rows in idle_rows sit
    out steps 2..9 entirely, to exercise long lazy decays."""
    feats = torch.rand(37, generator=gen) < touch
    if 2 <= step <= 9:
        feats[list(idle_rows)] = False
    g0 = torch.randn(37, 11, generator=gen) * feats[:, None]
    g1 = torch.randn(11, 37, generator=gen) * feats[None, :]
    g2 = torch.randn(37, generator=gen) * feats
    g3 = torch.randn(11, generator=gen)
    return [g0, g1, g2, g3]


def _ours(params, lr=1e-2, b2=0.99, backend="torch"):
    return SparseAdamB1Zero([{"params": [p], "sparse_dim": d} for p, d in zip(params, SPARSE_DIMS)], lr=lr, beta2=b2,
                            backend=backend)


def _pair(lr=1e-2, b2=0.99, backend="torch", device="cpu"):
    a = [p.clone().requires_grad_() for p in _params(device)]
    b = [p.clone().requires_grad_() for p in _params(device)]
    return a, b, _ours(a, lr, b2, backend), torch.optim.Adam(b, lr=lr, betas=(0.0, b2))


def _feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device).clone()


def _advance(steps, gen, *pairs):
    """Feed the same gradients of `steps` to every (params, optimizer) pair and step them."""
    for step in steps:
        grads = _grads(step, gen)
        for params, opt in pairs:
            _feed(params, grads)
            opt.step()


@pytest.mark.parametrize("impl", impls(where=lambda i: i.selectable))
def test_matches_torch_adam_to_rounding(impl):
    # every update through one implementation of adam_b1zero_rows_ (triton: the interpreter on CPU)
    a, b, ours, ref = _pair(backend=impl.name, device=impl.device)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        _advance([step], gen, (a, ours), (b, ref))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)
    ours.flush()
    for x, y in zip(a, b):
        torch.testing.assert_close(ours.state[x]["v"], ref.state[y]["exp_avg_sq"], rtol=2e-6, atol=1e-12)


def test_untouched_rows_do_not_move_and_decay_lazily():
    a, b, ours, ref = _pair()
    gen = torch.Generator().manual_seed(2)
    for step in range(10):
        grads = _grads(step, gen)
        before = a[0].detach().clone()
        _feed(a, grads), _feed(b, grads)
        ours.step(), ref.step()
        idle = (grads[0] == 0).all(1)
        assert torch.equal(a[0][idle], before[idle])  # exactly unchanged
    # rows 3 and 5 sat out steps 2..9: their stored moment is stale until flushed
    st = ours.state[a[0]]
    assert int(st["last"][3]) <= 2 < ours.t
    ours.flush()
    assert (st["last"] == ours.t).all()
    torch.testing.assert_close(st["v"][3], ref.state[b[0]]["exp_avg_sq"][3], rtol=2e-6, atol=1e-12)


def test_state_round_trip_continues_exactly_and_hands_over_to_torch_adam():
    a, b, ours, ref = _pair()
    gen = torch.Generator().manual_seed(3)
    _advance(range(6), gen, (a, ours), (b, ref))
    # lazy state saved as is: a resumed optimizer continues bit for bit
    a2 = [p.detach().clone().requires_grad_() for p in a]
    again = _ours(a2)
    again.load_state_dict(ours.state_dict())
    assert again.t == ours.t
    # flushed state loads into torch.optim.Adam, which then continues like the reference
    ours_flushed = _ours([p.detach().clone().requires_grad_() for p in a])
    ours_flushed.load_state_dict(ours.state_dict())
    ours_flushed.flush()
    handed = [p.detach().clone().requires_grad_() for p in a]
    torch_opt = torch.optim.Adam(handed, lr=1e-2, betas=(0.0, 0.99))
    for h, src in zip(handed, [g["params"][0] for g in ours_flushed.param_groups]):
        torch_opt.state[h] = {
            "step": torch.tensor(float(ours_flushed.t)), "exp_avg": torch.zeros_like(h),
            "exp_avg_sq": ours_flushed.state[src]["v"].clone()
        }
    for step in range(6, 14):
        _advance([step], gen, (a, ours), (a2, again), (b, ref), (handed, torch_opt))
        for x, y in zip(a, a2):
            assert torch.equal(x, y)
        for x, y, z in zip(a, b, handed):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)
            torch.testing.assert_close(z, y, rtol=2e-6, atol=2e-7)


def _sparse_regime_saes(k):
    """k identical small SAEs whose thresholds leave most features untouched each step."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(16, 64, backend="torch")
    with torch.no_grad():
        sae.threshold.fill_(2.0)
    return [sae] + [copy.deepcopy(sae) for _ in range(k - 1)]


def _autograd_step(sae, opt, x):
    opt.zero_grad()
    sae.training_forward(x, l0_coefficient=1e-2, bandwidth=0.05).loss.backward()
    opt.step()


def test_for_sae_param_groups_and_training_equivalence():
    sae, ref_sae = _sparse_regime_saes(2)
    ours = SparseAdamB1Zero.for_sae(sae, lr=1e-3, beta2=0.999)
    ref = torch.optim.Adam(ref_sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for _ in range(15):
        x = torch.randn(8, 16)
        for m, opt in ((sae, ours), (ref_sae, ref)):
            _autograd_step(m, opt, x)
    untouched_frac = (ours.state[sae.W_dec]["last"] < ours.t).float().mean()
    assert untouched_frac > 0.2  # laziness really happened
    for (n, p), q in zip(sae.named_parameters(), ref_sae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_bad_settings():
    with pytest.raises(ValueError, match="lr must be positive"):
        SparseAdamB1Zero([torch.zeros(2, requires_grad=True)], lr=0)
    with pytest.raises(ValueError, match="beta2"):
        SparseAdamB1Zero([torch.zeros(2, requires_grad=True)], beta2=1.0)


def test_step_rows_equals_step_with_dense_grads_and_torch_adam():
    sae, rg_sae, ref_sae = _sparse_regime_saes(3)
    # eps 1e-4: the row-grads step's sparse gradients and autograd's dense ones differ by
    # rounding (~1e-7), which Adam would blow up to ~lr where a gradient is ~1e-8 if eps were 1e-8
    dense_grads = SparseAdamB1Zero.for_sae(sae, lr=1e-3, eps=1e-4)
    row_grads_opt = SparseAdamB1Zero.for_sae(rg_sae, lr=1e-3, eps=1e-4)
    ref = torch.optim.Adam(ref_sae.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-4)
    for _ in range(12):
        x = torch.randn(8, 16)
        for m, opt in ((sae, dense_grads), (ref_sae, ref)):
            _autograd_step(m, opt, x)
        _, grads = rg_sae.training_row_grads(x, l0_coefficient=1e-2, bandwidth=0.05)
        assert grads.rows.numel() < 64
        row_grads_opt.step_rows(grads)
    assert (row_grads_opt.state[rg_sae.W_dec]["last"] < row_grads_opt.t).any()
    for (n, p), q, r in zip(rg_sae.named_parameters(), sae.parameters(), ref_sae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=n)


def test_renorm_rows_and_step_rows_errors():
    W = torch.randn(6, 4)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    b = torch.zeros(4, requires_grad=True)
    opt = SparseAdamB1Zero([{"params": [W], "sparse_dim": 0, "renorm_rows": True}, {"params": [b], "sparse_dim": None}],
                           lr=0.1)
    before = W.detach().clone()
    opt.step_rows({W: (torch.tensor([1, 4]), torch.randn(2, 4)), b: (None, torch.randn(4))})
    torch.testing.assert_close(W.detach().norm(dim=1), torch.ones(6))
    assert torch.equal(W.detach()[[0, 2, 3, 5]], before[[0, 2, 3, 5]]) and not torch.equal(W.detach()[1], before[1])
    with pytest.raises(ValueError, match="rows must be given exactly for parameters with a sparse_dim"):
        opt.step_rows({b: (torch.tensor([0]), torch.randn(1, 4))})
    with pytest.raises(TypeError, match="rows must be a 1-D int64 tensor"):
        opt.step_rows({W: (torch.tensor([1], dtype=torch.int32), torch.randn(1, 4))})
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_rows({torch.zeros(3, requires_grad=True): (None, torch.zeros(3))})
    with pytest.raises(ValueError, match="needs an optimizer made by SparseAdamB1Zero.for_sae"):
        opt.step_rows(JumpReLUSAE(4, 6).training_row_grads(torch.randn(2, 4), l0_coefficient=0.1)[1])
    with pytest.raises(ValueError, match="renorm_rows needs a sparse_dim"):
        SparseAdamB1Zero([{"params": [b], "sparse_dim": None, "renorm_rows": True}])
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseAdamB1Zero([b], backend="fast")
