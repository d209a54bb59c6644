"""sae_fast.saelens: SAELens's classes on sae_fast's kernels, against SAELens's own JumpReLU classes.

Real SAELens objects throughout (sae-lens is a test dependency): inference (encode, decode,
forward; every selectable implementation, every dtype, odd sizes, one and zero tokens, every
and no feature active), HookedSAETransformer's run_with_saes / run_with_cache_with_saes, the
transcoders, the training loss and every gradient, a run of SAELens's own training runner
with "jumprelu_fast" against "jumprelu", saving and loading, and what is refused.
"""

import dataclasses
import json

import pytest
import torch
from sae_lens import (SAE, HookedSAETransformer, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUSkipTranscoder,
                      JumpReLUSkipTranscoderConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, JumpReLUTranscoder,
                      JumpReLUTranscoderConfig, StandardSAE, StandardSAEConfig)
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

import sae_fast
import sae_fast.saelens as fast
from sae_fast import ops, reference

from helpers import (DTYPES, EXACT_BANDWIDTH, assert_close_as_dense, dtype_id, err_vs, exact_pre_case, impls,
                     nan_filled_outputs)
from saelens_harness import tiny_model, train_saelens

D_IN, D_SAE = 17, 45
SELECTABLE = impls(where=lambda i: i.selectable)
# (tokens, mode): odd sizes, one token, zero tokens, every / no feature active
CASES = [(13, "mixed"), (1, "mixed"), (0, "mixed"), (13, "all"), (13, "none")]
FEW_CASES = [(13, "mixed"), (0, "mixed"), (13, "all")]  # the Triton interpreter


def _cases(impl):
    return FEW_CASES if impl.slow else CASES


def _load(module, params):
    with torch.no_grad():
        for k, v in params.items():
            getattr(module, k).copy_(v)
    return module


def _saelens_sae(params, dtype, apply_b_dec, device="cpu"):
    cfg = JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype_id_saelens(dtype), device=str(device),
                            apply_b_dec_to_input=apply_b_dec)
    return _load(JumpReLUSAE(cfg), params)


def dtype_id_saelens(dtype):
    return str(dtype).removeprefix("torch.")


def _count_kernel_calls(monkeypatch):
    calls = []
    for name in ("jumprelu_encode", "jumprelu_encode_sparse", "sparse_decode"):  # the kernels' entry points
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    return calls


# ------------------------------------------------------------------------- registering
def test_architectures_registered():
    assert get_sae_class("jumprelu_fast") == (fast.JumpReLUFastSAE, fast.JumpReLUFastSAEConfig)
    assert get_sae_training_class("jumprelu_fast") == (fast.JumpReLUFastTrainingSAE, fast.JumpReLUFastTrainingSAEConfig)
    assert get_sae_class("jumprelu_transcoder_fast")[0] is fast.JumpReLUFastTranscoder
    assert get_sae_class("jumprelu_skip_transcoder_fast")[0] is fast.JumpReLUFastSkipTranscoder
    sae = SAE.from_dict({"architecture": "jumprelu_fast", "d_in": D_IN, "d_sae": D_SAE, "sae_fast_backend": "cpu"})
    assert type(sae) is fast.JumpReLUFastSAE and sae.sae_fast_backend == "cpu"
    fast._register()  # registering again (a second import after a reload) changes nothing and raises nothing
    assert get_sae_class("jumprelu_fast")[0] is fast.JumpReLUFastSAE


def test_training_config_accepts_every_saelens_field():
    mine = {f.name for f in dataclasses.fields(fast.JumpReLUFastTrainingSAEConfig)}
    theirs = {f.name for f in dataclasses.fields(JumpReLUTrainingSAEConfig)}
    assert theirs <= mine and mine - theirs == {"sae_fast_backend"}


# ---------------------------------------------------------------------------- inference
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("impl", SELECTABLE)
def test_inference_matches_saelens(impl, apply_b_dec, dtype, monkeypatch):
    """encode is SAELens's exactly (exact-pre inputs: every path sees the same active set),
    forward and decode as close to the float64 truth as SAELens's dense math in that dtype;
    under no_grad the kernels ran (encode_sparse + sparse_decode for forward), outputs
    NaN-filled before they ran."""
    calls = _count_kernel_calls(monkeypatch)
    for n, mode in _cases(impl):
        x, p = exact_pre_case(n, D_IN, D_SAE, dtype, mode)
        if apply_b_dec:
            p["b_dec"] = torch.zeros_like(p["b_dec"])  # keeps x - b_dec on the exact grid
        p["threshold"] = p["threshold"].to(dtype)  # SAELens keeps an inference threshold in the SAE dtype
        theirs = _saelens_sae({k: impl.to(v) for k, v in p.items()}, dtype, apply_b_dec, impl.device)
        mine = fast.accelerate(theirs, backend=impl.name)
        x = impl.to(x)
        truth = _saelens_sae({k: v.double() for k, v in p.items()}, torch.float64, apply_b_dec)
        with torch.no_grad(), nan_filled_outputs():
            calls.clear()
            acts, out = mine.encode(x), mine(x)
            assert calls == ["jumprelu_encode", "jumprelu_encode_sparse", "sparse_decode"], calls
            x3 = x.reshape(1, n, D_IN)  # leading dims are kept
            assert mine(x3).shape == (1, n, D_IN) and mine.encode(x3).shape == (1, n, D_SAE)
            ref_acts, ref_out = theirs.encode(x), theirs(x)
            t_acts, t_out = truth.encode(x.cpu().double()), truth(x.cpu().double())
            assert torch.equal(acts, ref_acts), (n, mode)
            assert_close_as_dense(out.cpu(), t_out, ref_out.cpu(), what=f"forward {n} {mode}")
            calls.clear()
            assert_close_as_dense(mine.decode(acts).cpu(), t_out, theirs.decode(ref_acts).cpu(), what="decode")
            assert calls == ["sparse_decode"]  # dense activations are compacted and decoded sparsely
            assert torch.equal(t_acts.to(dtype), acts.cpu())


def test_autograd_calls_take_saelens_math(monkeypatch):
    # grad enabled and parameters requiring grad: SAELens's differentiable path, same gradients
    calls = _count_kernel_calls(monkeypatch)
    x, p = exact_pre_case(9, D_IN, D_SAE, torch.float32, "mixed")
    theirs = _saelens_sae(p, torch.float32, True)
    mine = fast.accelerate(theirs, copy=True)
    for m in (theirs, mine):
        m(x).pow(2).sum().backward()
    assert calls == []
    for (name, a), (_, b) in zip(theirs.named_parameters(), mine.named_parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name  # threshold: None in both


def test_hooked_sae_transformer():
    """run_with_saes and run_with_cache_with_saes: the same logits and cached activations as
    SAELens's JumpReLUSAE, every SAE hook point in the cache; a hook that edits the
    activations (ablating a feature) is honoured."""
    tl = tiny_model(seed=3)
    hooked = HookedSAETransformer(tl.cfg)
    hooked.load_state_dict(tl.state_dict())
    d = tl.cfg.d_model
    cfg = JumpReLUSAEConfig(d_in=d, d_sae=40, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    theirs = JumpReLUSAE(cfg)
    with torch.no_grad():
        for prm in theirs.parameters():
            prm.normal_()
        theirs.threshold.abs_().mul_(0.5)
    mine = fast.accelerate(theirs)
    tokens = torch.randint(0, tl.cfg.d_vocab, (2, 9))
    with torch.no_grad():
        ref = hooked.run_with_saes(tokens, saes=[theirs])
        got = hooked.run_with_saes(tokens, saes=[mine])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref, hooked(tokens))  # the SAE changed the run
        ref_logits, ref_cache = hooked.run_with_cache_with_saes(tokens, saes=[theirs])
        got_logits, got_cache = hooked.run_with_cache_with_saes(tokens, saes=[mine])
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
        sae_keys = [k for k in ref_cache.keys() if "hook_sae" in k]
        assert {k.rsplit(".", 1)[-1]
                for k in sae_keys} >= {"hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons"}
        for k in sae_keys:
            torch.testing.assert_close(got_cache[k], ref_cache[k], rtol=1e-5, atol=1e-5, msg=k)

        def ablate(acts, hook):
            acts[..., :20] = 0
            return acts

        outs = []
        for sae in (theirs, mine):
            hooked.add_sae(sae)
            outs.append(hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out.hook_sae_acts_post", ablate)]))
            hooked.reset_saes()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(outs[0], ref)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("impl", SELECTABLE)
def test_transcoders_match_saelens(impl, skip):
    d_out = 11
    kw = dict(d_in=D_IN, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False, device=str(impl.device))
    theirs = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
        **kw)) if skip else JumpReLUTranscoder(JumpReLUTranscoderConfig(**kw))
    x, p = exact_pre_case(13, D_IN, D_SAE, torch.float32, "mixed")
    p["W_dec"], p["b_dec"] = torch.randn(D_SAE, d_out), torch.randn(d_out)
    if skip:
        p["W_skip"] = torch.randn(d_out, D_IN)
    _load(theirs, {k: impl.to(v) for k, v in p.items()})
    mine = fast.accelerate(theirs, backend=impl.name)
    assert type(mine) is (fast.JumpReLUFastSkipTranscoder if skip else fast.JumpReLUFastTranscoder)
    x = impl.to(x)
    with torch.no_grad():
        assert torch.equal(mine.encode(x), theirs.encode(x))
        torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)
        y, acts = mine.forward_with_activations(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ training
def _train_cfg(dtype="float32", **kw):
    base = dict(d_in=D_IN, d_sae=D_SAE, dtype=dtype, jumprelu_bandwidth=EXACT_BANDWIDTH, l0_coefficient=0.3)
    return JumpReLUTrainingSAEConfig(**{**base, **kw})


def _step_input(x, coefficient=0.3):
    return TrainStepInput(sae_in=x, coefficients={"l0": coefficient}, dead_neuron_mask=None, n_training_steps=0,
                          is_logging_step=False)


def _training_pair(p, dtype, apply_b_dec, backend, device="cpu", **kw):
    theirs = JumpReLUTrainingSAE(
        _train_cfg(dtype_id_saelens(dtype), apply_b_dec_to_input=apply_b_dec, device=str(device), **kw))
    _load(theirs, p)
    return theirs, fast.accelerate(theirs, backend=backend, copy=True)


def _grads(module):
    return {k: v.grad for k, v in module.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("apply_b_dec,loss_mode", [(False, "step"), (True, "step"), (False, "quadratic")])
@pytest.mark.parametrize("impl", SELECTABLE)
def test_training_forward_pass_matches_saelens(impl, apply_b_dec, loss_mode, dtype):
    """SAELens's loss terms and every gradient (threshold included) through the sparse step, as
    close to a float64 SAELens run as SAELens's own run in that dtype, for DeepMind's L0 loss
    and Gemma Scope 2's quadratic one; feature_acts (a sparse COO tensor) holds exactly
    SAELens's activations."""
    loss_kw = dict(jumprelu_sparsity_loss_mode=loss_mode, target_l0=7.0 if loss_mode == "quadratic" else None)
    for n, mode in _cases(impl):
        x, p = exact_pre_case(n, D_IN, D_SAE, dtype, mode)
        if apply_b_dec:
            p["b_dec"] = torch.zeros_like(p["b_dec"])
        theirs, mine = _training_pair({k: impl.to(v)
                                       for k, v in p.items()}, dtype, apply_b_dec, impl.name, impl.device, **loss_kw)
        truth = _training_pair({k: v.double() for k, v in p.items()}, torch.float64, apply_b_dec, "torch", **loss_kw)[0]
        outs = []
        for m, xm in ((theirs, impl.to(x)), (mine, impl.to(x)), (truth, x.double())):
            out = m.training_forward_pass(_step_input(xm))
            out.loss.backward()
            outs.append(out)
        ref, got, t = outs
        assert got.feature_acts.is_sparse and got.hidden_pre.is_sparse
        assert torch.equal(got.feature_acts.to_dense(), ref.feature_acts.detach())
        assert set(got.losses) == set(ref.losses) == {"mse_loss", "l0_loss"}
        if n == 0:  # SAELens's mean over no tokens is NaN; every sae_fast loss is 0 there, gradients 0
            assert got.loss.item() == 0 and all(not g.any() for g in _grads(mine).values())
            continue
        assert got.losses["l0_loss"].item() == pytest.approx(t.losses["l0_loss"].item(), rel=1e-6)
        assert_close_as_dense(got.losses["mse_loss"].detach().cpu().double(), t.losses["mse_loss"],
                              ref.losses["mse_loss"].detach().cpu(), what="mse", ulp_dtype=dtype)
        assert_close_as_dense(got.sae_out.detach().cpu(), t.sae_out, ref.sae_out.detach().cpu(), what="sae_out")
        tg, rg = _grads(truth), _grads(theirs)
        # the dense path in this dtype: SAELens's, or sae_fast's reference where that one rounds more
        # (SAELens rounds sae_out and its mse in the SAE dtype, the reference keeps the loss in float32)
        ps = {k: impl.to(v).clone().requires_grad_() for k, v in p.items()}
        reference.jumprelu_sae_loss(impl.to(x), **ps, apply_b_dec_to_input=apply_b_dec, l0_coefficient=0.3,
                                    bandwidth=EXACT_BANDWIDTH, target_l0=loss_kw["target_l0"]).loss.backward()
        for k, g in _grads(mine).items():
            assert g.dtype == rg[k].dtype, k
            dense = max(rg[k].cpu(), ps[k].grad.cpu(), key=lambda d, k=k: err_vs(d, tg[k]))
            assert_close_as_dense(g.cpu(), tg[k], dense, what=f"grad {k} ({n}, {mode})")


def test_threshold_projection_and_sparse_feature_acts_in_saelens_trainer():
    # SAELens clamps the threshold at 0 before each step; its trainer takes our sparse acts
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    x, p = exact_pre_case(32, D_IN, D_SAE, torch.float32, "mixed")
    p["threshold"][:5] = -0.1
    theirs, mine = _training_pair(p, torch.float32, True, "cpu")
    for m in (theirs, mine):
        m.training_forward_pass(_step_input(x))
    assert torch.equal(mine.threshold, theirs.threshold) and (mine.threshold[:5] == 0).all()
    trained = []
    for m in (theirs, mine):
        tr = SAETrainer(
            cfg=SAETrainerConfig(total_training_samples=10**6, train_batch_size_samples=32, device="cpu", lr=1e-3,
                                 lr_end=1e-3), sae=m, data_provider=iter(()))
        for _ in range(3):
            tr.step(x)
        trained.append(tr)
    torch.testing.assert_close(trained[1].act_freq_scores, trained[0].act_freq_scores)
    torch.testing.assert_close(trained[1].n_forward_passes_since_fired, trained[0].n_forward_passes_since_fired)
    for (k, a), (_, b) in zip(theirs.named_parameters(), mine.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_saelens_runner_trains_jumprelu_fast_like_jumprelu(tmp_path):
    """SAELens's own runner (its ActivationsStore, trainer, Adam, schedulers) on a tiny model
    written here: naming "jumprelu_fast" gives "jumprelu"'s loss curve to rounding, from
    the same initial weights."""
    kw = dict(steps=12, seed=5, d_sae=48, sae_kwargs=dict(l0_coefficient=0.05, jumprelu_bandwidth=0.05))
    ref = train_saelens("jumprelu", tmp_path / "ref", **kw)
    got = train_saelens("jumprelu_fast", tmp_path / "fast", initial_state=ref.initial_state, **kw)
    assert type(got.sae) is fast.JumpReLUFastTrainingSAE
    assert len(got.losses) == 12
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-6)
    for (k, a), (_, b) in zip(ref.sae.named_parameters(), got.sae.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=k)
    assert ref.losses[-1] != ref.losses[0]  # it trained


@pytest.mark.parametrize("bad,match", [
    (dict(jumprelu_sparsity_loss_mode="tanh"), "jumprelu_sparsity_loss_mode='tanh'"),
    (dict(jumprelu_ste_to_input=True), "jumprelu_ste_to_input=True"),
    (dict(pre_act_loss_coefficient=3e-6), "pre_act_loss_coefficient=3e-06"),
    (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm'"),
])
def test_unsupported_training_options_are_refused(bad, match):
    cfg = fast.JumpReLUFastTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **bad)
    with pytest.raises(ValueError, match=match):
        fast.JumpReLUFastTrainingSAE(cfg)
    with pytest.raises(ValueError, match=match):
        fast.accelerate(JumpReLUTrainingSAE(_train_cfg(**bad)))


def test_autocast_is_refused():
    mine = fast.JumpReLUFastTrainingSAE(fast.JumpReLUFastTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        mine.training_forward_pass(_step_input(torch.randn(4, D_IN)))


def test_other_architectures_are_refused():
    with pytest.raises(TypeError, match="got StandardSAE \\(architecture 'standard'\\)"):
        fast.accelerate(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    with pytest.raises(TypeError, match="got Linear"):
        fast.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        fast.accelerate(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)), backend="fastest")


# ---------------------------------------------------------------------- weights, files
def test_accelerate_shares_or_copies_weights():
    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    shared, copied = fast.accelerate(theirs), fast.accelerate(theirs, copy=True)
    assert fast.accelerate(shared) is shared
    for name, prm in theirs.named_parameters():
        assert getattr(shared, name) is prm
        assert getattr(copied, name) is not prm and torch.equal(getattr(copied, name), prm)
    with torch.no_grad():
        theirs.b_enc.add_(1.0)
    assert torch.equal(shared.b_enc, theirs.b_enc) and not torch.equal(copied.b_enc, theirs.b_enc)
    assert shared.cfg.d_sae == D_SAE and shared.cfg.architecture() == "jumprelu_fast"


def test_saved_files_are_plain_saelens(tmp_path):
    x, p = exact_pre_case(9, D_IN, D_SAE, torch.float32, "mixed")
    mine = fast.accelerate(_saelens_sae(p, torch.float32, False))
    mine.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "sae_fast_backend" not in cfg
    plain = SAE.load_from_disk(tmp_path / "sae")
    assert type(plain) is JumpReLUSAE
    again = fast.JumpReLUFastSAE.load_from_disk(tmp_path / "sae", backend="cpu")
    assert type(again) is fast.JumpReLUFastSAE and again.sae_fast_backend == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(again(x), plain(x), rtol=1e-5, atol=1e-6)
    # a training SAE's inference model is a plain "jumprelu" SAE too
    trained = fast.JumpReLUFastTrainingSAE(fast.JumpReLUFastTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    trained.save_inference_model(tmp_path / "inf")
    assert json.loads((tmp_path / "inf" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert type(SAE.load_from_disk(tmp_path / "inf")) is JumpReLUSAE


# ------------------------------------------------------- Gemma Scope 2 through SAELens
def _gemma_scope_2_folder(root, folder, d_in, d_sae, d_out, transcoder, affine):
    """A Gemma Scope 2 folder as the hub holds it: config.json + params.safetensors (lowercase keys)."""
    from safetensors.torch import save_file

    d = root / folder
    d.mkdir(parents=True)
    W_dec = torch.randn(d_sae, d_out)
    t = {
        "w_enc": torch.randn(d_in, d_sae) * 0.3, "w_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_enc": torch.randn(d_sae) * 0.1, "b_dec": torch.randn(d_out) * 0.1, "threshold": torch.rand(d_sae) * 0.5
    }
    cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": "model.layers.9.output"}
    if transcoder:
        cfg.update(hf_hook_point_in="model.layers.9.pre_feedforward_layernorm.output",
                   hf_hook_point_out="model.layers.9.post_feedforward_layernorm.output", affine_connection=affine)
        if affine:
            t["affine_skip_connection"] = torch.randn(d_in, d_out) * 0.1
    save_file(t, str(d / "params.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """SAELens's own Hugging Face loaders, served from tmp_path: hf_hub_download and the
    header-only shape query read local files (nothing is fetched)."""
    from safetensors import safe_open
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def download(repo_id, filename=None, subfolder=None, **_):
        return str(tmp_path / repo_id / (f"{subfolder}/{filename}" if subfolder else filename))

    def shapes(repo_id, filename):
        with safe_open(str(tmp_path / repo_id / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    return tmp_path / "google" / "gemma-scope-2-270m-pt"


@pytest.mark.parametrize("release,sae_id,folder,transcoder,affine", [
    ("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_small", "resid_post/layer_12_width_16k_l0_small", False,
     False),
    ("gemma-scope-2-270m-pt-transcoders", "transcoder/layer_9_width_16k_l0_small_affine",
     "transcoder/layer_9_width_16k_l0_small_affine", True, True),
])
def test_gemma_scope_2_releases_load_the_same_three_ways(offline_hub, release, sae_id, folder, transcoder, affine):
    """A Gemma Scope 2 release through SAELens's own loader (SAE.from_pretrained, its "gemma_3"
    converter, files served locally), then accelerate(); and the same folder through
    sae_fast's loader: one model, three ways, the same outputs."""
    d = _gemma_scope_2_folder(offline_hub, folder, 16, 48, 16, transcoder, affine)
    theirs = SAE.from_pretrained(release, sae_id)
    assert type(theirs) is (JumpReLUSkipTranscoder if transcoder else JumpReLUSAE)
    mine = fast.accelerate(theirs, backend="cpu")
    ours = (sae_fast.JumpReLUTranscoder if transcoder else sae_fast.JumpReLUSAE).from_pretrained(d, backend="cpu")
    x = torch.randn(11, 16)
    with torch.no_grad():
        want = theirs(x)
        torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.encode(x), theirs.encode(x))
    if not transcoder:
        direct = fast.JumpReLUFastSAE.from_pretrained(release, sae_id, backend="cpu")
        assert type(direct) is fast.JumpReLUFastSAE
        with torch.no_grad():
            torch.testing.assert_close(direct(x), want, rtol=1e-5, atol=1e-5)
