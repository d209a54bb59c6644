"""`sae-fast plan`: the memory model of one training step."""

import pytest

from sae_fast.cli import main
from sae_fast.plan import plan, render


def _total(rows):
    return sum(r[1] for r in rows)


def test_gemma_scope_widest_sae_fits_one_80gb_gpu():
    d = plan(2304, 2**20, 4096, dtype="bfloat16")
    parts = dict((p, n) for p, n, _ in d["sparse"])
    assert parts["parameters (W_enc + W_dec, bfloat16)"] == 2 * 2304 * 2**20 * 2 + (2 * 2**20 + 2304) * 4
    assert parts["Adam state (1 float32 moment)"] == (2 * 2304 * 2**20 + 2 * 2**20 + 2304) * 4
    # gradients for the touched features only: at most batch x (L0 + band) = 2^19 of the 2^20
    grads = parts["compact gradients: W_enc and W_dec rows of the touched features"]
    assert grads == 2**19 * (2 * 2304 * 2 + 2 + 4) + 2304 * 2
    assert _total(d["sparse"]) < 45e9  # issue 7's budget
    assert _total(d["dense"]) > _total(d["sparse"]) + 40 * 2**30  # dense: the [batch, d_sae] tensors
    assert _total(d["dense_phase"]) < 45e9  # the first steps from a fresh init, every row touched
    text, fits = render(d, 80)
    assert fits and "fits in 80 GiB" in text and "row-grads step (triton)" in text and "fresh init" in text


def test_autograd_step_and_cuda_encoder_cost_more():
    row_grads = _total(plan(2304, 2**20, 4096)["sparse"])
    autograd = plan(2304, 2**20, 4096, optimizer="adam")
    assert _total(autograd["sparse"]) > row_grads  # full-size gradients
    cuda = dict((p, n) for p, n, _ in plan(2304, 2**20, 4096, backend="cuda")["sparse"])
    assert cuda["encoder workspace (pre of one chunk of features)"] <= 2**30


def test_beta1_and_dtype_change_the_state():
    one = _total(plan(2304, 2**20, 4096, dtype="float32", optimizer="adam")["sparse"])
    two = _total(plan(2304, 2**20, 4096, dtype="float32", optimizer="adam", adam_beta1=0.9)["sparse"])
    assert two - one == pytest.approx((2 * 2304 * 2**20 + 2 * 2**20 + 2304) * 4)
    with pytest.raises(ValueError, match="sparse-adam is Adam with beta1 = 0"):
        plan(8, 8, 8, adam_beta1=0.9)


def test_cli_exit_codes(capsys):
    assert main(["plan", "--d-in", "2304", "--d-sae", "1048576", "--batch", "4096"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["plan", "--d-in", "2304", "--d-sae", "1048576", "--gpu-mem-gib", "16"]) == 1
    assert "does NOT fit in 16 GiB" in capsys.readouterr().out
    assert main(["plan", "--d-in", "2304", "--d-sae", "1048576", "--backend", "cuda"]) == 0
    assert "encoder workspace" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--d-in", "0", "--d-sae", "10"])
    assert "d_in must be positive" in capsys.readouterr().err
