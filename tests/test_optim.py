"""SparseAdamB1Zero equals torch.optim.Adam(betas=(0, beta2)) to rounding, with lazy decay."""

import pytest
import torch

from sae_fast import JumpReLUSAE
from sae_fast.optim import SparseAdamB1Zero


def _params():
    torch.manual_seed(0)
    return [torch.randn(37, 11), torch.randn(11, 37), torch.randn(37), torch.randn(11)]


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


def _ours(params, lr=1e-2, b2=0.99):
    return SparseAdamB1Zero([{"params": [p], "sparse_dim": d} for p, d in zip(params, SPARSE_DIMS)], lr=lr, beta2=b2)


def _pair(lr=1e-2, b2=0.99):
    a = [p.clone().requires_grad_() for p in _params()]
    b = [p.clone().requires_grad_() for p in _params()]
    return a, b, _ours(a, lr, b2), torch.optim.Adam(b, lr=lr, betas=(0.0, b2))


def _feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _advance(steps, gen, *pairs):
    """Feed the same gradients of `steps` to every (params, optimizer) pair and step them."""
    for step in steps:
        grads = _grads(step, gen)
        for params, opt in pairs:
            _feed(params, grads)
            opt.step()


def test_matches_torch_adam_to_rounding():
    a, b, ours, ref = _pair()
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
        torch_opt.state[h] = {"step": torch.tensor(float(ours_flushed.t)), "exp_avg": torch.zeros_like(h),
                              "exp_avg_sq": ours_flushed.state[src]["v"].clone()}
    for step in range(6, 14):
        _advance([step], gen, (a, ours), (a2, again), (b, ref), (handed, torch_opt))
        for x, y in zip(a, a2):
            assert torch.equal(x, y)
        for x, y, z in zip(a, b, handed):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)
            torch.testing.assert_close(z, y, rtol=2e-6, atol=2e-7)


def test_for_sae_param_groups_and_training_equivalence():
    torch.manual_seed(0)
    sae = JumpReLUSAE(16, 64, backend="torch")
    ref_sae = JumpReLUSAE(16, 64, backend="torch")
    ref_sae.load_state_dict(sae.state_dict())
    ours = SparseAdamB1Zero.for_sae(sae, lr=1e-3, beta2=0.999)
    ref = torch.optim.Adam(ref_sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    with torch.no_grad():
        for m in (sae, ref_sae):
            m.threshold.fill_(2.0)  # a sparse regime: most features untouched each step
    for _ in range(15):
        x = torch.randn(8, 16)
        for m, opt in ((sae, ours), (ref_sae, ref)):
            opt.zero_grad()
            m.training_forward(x, l0_coefficient=1e-2, bandwidth=0.05).loss.backward()
            opt.step()
    untouched_frac = (ours.state[sae.W_dec]["last"] < ours.t).float().mean()
    assert untouched_frac > 0.2  # laziness really happened
    for (n, p), q in zip(sae.named_parameters(), ref_sae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_bad_settings():
    with pytest.raises(ValueError, match="lr must be positive"):
        SparseAdamB1Zero([torch.zeros(2, requires_grad=True)], lr=0)
    with pytest.raises(ValueError, match="beta2"):
        SparseAdamB1Zero([torch.zeros(2, requires_grad=True)], beta2=1.0)
