"""sae_fast.hooks: hook points of a Hugging Face causal LM (a tiny Gemma 3 built here), read from
an SAE's metadata, captured, stopped at, and edited."""

import pytest
import torch

import sae_fast
from sae_fast.hooks import HookPoint, HookPointError, capture, edit, hook_point_of, run_until


@pytest.fixture(scope="module")
def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def _independent(model, module, side):
    seen = {}
    if side == "output":
        h = module.register_forward_hook(lambda m, i, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
    else:
        h = module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    return seen, h


@pytest.mark.parametrize("name,module", [
    ("model.layers.1.output", "model.layers.1"),
    ("model.layers.0.pre_feedforward_layernorm.output", "model.layers.0.pre_feedforward_layernorm"),
    ("model.layers.0.post_feedforward_layernorm.output", "model.layers.0.post_feedforward_layernorm"),
    ("model.layers.1.self_attn.o_proj.input", "model.layers.1.self_attn.o_proj"),
])
def test_capture_and_run_until_read_the_named_tensor(gemma3, name, module):
    hp = HookPoint.parse(name)
    assert hp.name == name and hp.module(gemma3) is gemma3.get_submodule(module)
    ids = torch.randint(0, 64, (2, 7))
    seen, h = _independent(gemma3, gemma3.get_submodule(module), hp.side)
    try:
        with torch.no_grad(), capture(gemma3, hp) as got:
            gemma3(ids)
    finally:
        h.remove()
    assert torch.equal(got["x"], seen["x"])
    assert torch.equal(run_until(gemma3, hp, ids), seen["x"])


def test_edit_replaces_the_tensor_in_every_forward(gemma3):
    ids = torch.randint(0, 64, (1, 6))
    hp = HookPoint.parse("model.layers.0.output")
    with torch.no_grad():
        clean = gemma3(ids).logits
        with edit(gemma3, hp, lambda t: t):
            same = gemma3(ids).logits
        with edit(gemma3, hp, lambda t: t * 0):
            zeroed = gemma3(ids).logits
        after = gemma3(ids).logits
    assert torch.equal(same, clean) and torch.equal(after, clean)  # identity edits nothing; the hook is removed
    assert not torch.allclose(zeroed, clean)


def test_hook_point_of_an_sae():
    sae = sae_fast.JumpReLUSAE(4, 8)
    sae.metadata = {"hf_hook_point_in": "model.layers.12.output"}
    assert hook_point_of(sae) == HookPoint("model.layers.12", "output")
    sae.metadata = {"hook_layer": 3, "hook_name": "layer3.mlp"}  # ours before hf_hook_point_in was written
    assert hook_point_of(sae) == HookPoint("model.layers.3.mlp", "output")
    assert hook_point_of(sae, layer=5, site="attn") == HookPoint("model.layers.5.self_attn", "output")
    sae.metadata = {}
    with pytest.raises(HookPointError, match="names no hook point"):
        hook_point_of(sae)


def test_bad_hook_points_are_named(gemma3):
    with pytest.raises(HookPointError, match="layer 7 does not exist: Gemma3ForCausalLM has layers 0..1"):
        HookPoint.parse("model.layers.7.output").module(gemma3)
    with pytest.raises(HookPointError, match="has no module 'model.layers.0.nope'"):
        HookPoint.parse("model.layers.0.nope.output").module(gemma3)
    with pytest.raises(HookPointError, match="must end in '.output' or '.input'"):
        HookPoint.parse("model.layers.0.weight")
    with pytest.raises(HookPointError, match="site must be one of"):
        HookPoint.of_site(0, "embed")
