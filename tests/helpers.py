"""Shared test helpers: the implementations to test, random SAEs and dtype-aware tolerances."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from sae_fast import backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ------------------------------------------------------------ implementations
# Every implementation that runs here, as the registry lists it at collection time:
# ("torch", cpu), ("cpu", cpu), ("triton", cpu) under TRITON_INTERPRET=1 or ("triton", cuda),
# ("cuda", cuda) on a GPU, and ("cuda-emu", cpu), the CUDA kernels on the CPU emulator,
# which tests/conftest.py registers before any test module imports this one.
IMPLEMENTATIONS = backends.implementations()
_MARKS = {"triton": pytest.mark.triton, "cuda-emu": pytest.mark.cuda_emu, "cuda": pytest.mark.gpu}


@dataclass(frozen=True)
class Impl:
    """One (backend name, device) pair of backends.implementations()."""

    name: str
    device: torch.device

    @property
    def id(self) -> str:
        same_name = [d for n, d in IMPLEMENTATIONS if n == self.name]
        return self.name if len(same_name) <= 1 else f"{self.name}-{self.device.type}"

    @property
    def backend(self) -> backends.Backend:
        return backends.get(self.name)

    @property
    def selectable(self) -> bool:
        """Users can name it: the public ops, JumpReLUSAE and SparseAdamB1Zero take backend=name."""
        return self.name in backends.NAMES

    @property
    def slow(self) -> bool:
        """GPU code interpreted on the CPU (the Triton interpreter): tests give it fewer shapes,
        never fewer dtypes or edge cases."""
        return self.name == "triton" and self.device.type == "cpu"

    @property
    def ops(self):
        """The torch.ops namespace users call directly (argument checks included), or None:
        sae_fast:: for cpu and cuda, sae_fast_triton:: for triton."""
        if self.name == "triton":
            return torch.ops.sae_fast_triton
        if self.name in ("cpu", "cuda"):
            from sae_fast.backends import cpp

            cpp._ready()
            return torch.ops.sae_fast
        return None

    @property
    def select(self):
        """Its implementation of sae_fast::jumprelu_select (the fused selection of the chunked
        encoder), with the signature of sae_fast.backends.cpp.jumprelu_select, or None."""
        if self.name in ("cpu", "cuda"):
            from sae_fast.backends import cpp

            return cpp.jumprelu_select
        if self.name == "cuda-emu":
            from cuda_emu import torch_impl

            return torch_impl.select
        return None

    @property
    def optimizer(self):
        """adam_b1zero_rows_ (the schema of sae_fast::adam_b1zero_rows_, keywords accepted)."""
        from sae_fast import reference

        return self.backend.optimizer or reference.adam_b1zero_rows_

    def to(self, *tensors):
        """The tensors on this implementation's device (None stays None); one tensor alone unpacked."""
        out = tuple(t if t is None else t.to(self.device) for t in tensors)
        return out[0] if len(out) == 1 else out


ALL = [Impl(name, device) for name, device in IMPLEMENTATIONS]


def impls(*names, device=None, where=None) -> list:
    """pytest params of the implementations available here (all, or those named; on `device`
    only; those for which where(impl) holds), with ids "torch", "cpu", "triton", "cuda-emu",
    "cuda" and marks: triton -> triton, cuda-emu -> cuda_emu, cuda -> gpu.

        @pytest.mark.parametrize("impl", impls())
    """
    chosen = [
        i for i in ALL if (not names or i.name in names) and (device is None or i.device.type == device) and
        (where is None or where(i))
    ]
    return [pytest.param(i, id=i.id, marks=[_MARKS[i.name]] if i.name in _MARKS else []) for i in chosen]


def impl_cases(cases, slow_cases=None, *, where=None, slow=lambda impl: impl.slow) -> list:
    """pytest params (impl, *case) of every implementation (for which where(impl) holds) with
    every case (a tuple), and the slow ones (slow(impl), default Impl.slow) with slow_cases
    only where given: fewer shapes, each category kept."""
    out = []
    for p in impls(where=where):
        impl = p.values[0]
        for case in slow_cases if slow_cases is not None and slow(impl) else cases:
            case = case if isinstance(case, tuple) else (case, )
            out.append(pytest.param(impl, *case, id="-".join([impl.id, *map(str, case)]), marks=p.marks))
    return out


@contextlib.contextmanager
def deterministic_mode(fill=False):
    """torch.use_deterministic_algorithms(True) meanwhile (warn_only: no op refuses to run):
    the Triton encoder sorts each row's slots, so two runs sum in the same order. fill: every
    tensor torch.empty allocates is filled with NaN, integers with their maximum."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def nan_filled_outputs():
    """Every tensor torch.empty allocates meanwhile (the output buffers of the kernels, from
    Python, C++ or Triton launchers) is filled with NaN, integers with their maximum: an
    element an implementation never writes fails the comparison. (The fill_uninitialized_memory
    of deterministic mode, see deterministic_mode.)"""
    return deterministic_mode(fill=True)


def assert_deterministic(fn, *args, runs=2):
    """fn(*args) gives the same bits every time."""
    first = fn(*args)
    for _ in range(runs):
        assert torch.equal(first, fn(*args))


def assert_autograd_matches(impl, tensors, op, ref):
    """The gradients of sum(op(*leaves)^2), leaves = tensors on impl's device, equal those
    of sum(ref(*leaves)^2) on the CPU reference (rtol = atol = 1e-5)."""
    leaves = [t.clone().to(impl.device).requires_grad_() for t in tensors]
    op(*leaves).pow(2).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref(*ref_leaves).pow(2).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.cpu(), r.grad, rtol=1e-5, atol=1e-5)


def check_case(s=10, bad_index=None):
    """(indices, values, counts) of 4 tokens for the C++ ops' argument checks: capacity at
    least 1, row 1 holding a valid slot, every index 0 (indices[1, 0] = bad_index if
    given), every value 1."""
    idx, _, cnt = random_sparse_case(4, s)
    cnt[1] = max(int(cnt[1]), 1)
    idx = torch.zeros(4, max(idx.shape[1], 1), dtype=torch.int64)
    if bad_index is not None:
        idx[1, 0] = bad_index
    return idx, torch.ones(4, idx.shape[1]), cnt


def make_params(d_in, d_sae, dtype=torch.float32, device="cpu", thr_scale=0.5, seed=None):
    """Random JumpReLU parameters with a mix of active and inactive features.

    W_dec rows have unit norm; thresholds are positive, drawn around the spread
    of pre so that some features fire and some don't.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g)
    b_enc = 0.1 * torch.randn(d_sae, generator=g)
    threshold = thr_scale * torch.rand(d_sae, generator=g) + 0.05
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return dict(W_enc=cast(W_enc), b_enc=cast(b_enc), threshold=threshold.to(device), W_dec=cast(W_dec),
                b_dec=cast(b_dec))


def err_vs(out: torch.Tensor, ref64: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return float((out.detach().double() - ref64.detach().double()).abs().max())


def assert_close_as_dense(out, ref64, dense_same_dtype, factor=2.0, what="output", ulp_dtype=None, roundings=1):
    """out must be as close to the float64 truth as the dense path in the same dtype is.

    The tolerance is measured, not chosen: factor x the dense path's own max
    error, plus an ulp-scale term so that exact-in-fp32 cases don't demand 0:
    one ulp per rounding of the kernel's sum (`roundings`, 1 for a kernel that
    accumulates in float64 and rounds once). On a tiny output the dense path's
    measured error can be 0 by luck, while a float32 accumulation of k terms rounds
    up to k times.
    """
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN where the truth has none"
    e_out, e_dense = err_vs(out, ref64), err_vs(dense_same_dtype, ref64)
    scale = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    floor = roundings * torch.finfo(ulp_dtype or out.dtype).eps * max(scale, 1e-6)
    assert e_out <= factor * e_dense + floor, (
        f"{what}: max error {e_out:.3g} vs dense path {e_dense:.3g} (floor {floor:.3g})")


def exact_pre_case(n, d_in, d_sae, dtype, mode="mixed", seed=None):
    """Inputs on which pre = x @ W_enc + b_enc is exact in fp32, bf16 and fp16.

    x in {-1, 0, 1}, W_enc and b_enc on the 1/8 grid, |pre| <= 4: every partial
    sum is a multiple of 1/8 below 2^5, exact with 8 significant bits. Thresholds
    sit at odd multiples of 1/16, so no pre ties a threshold, and with
    bandwidth = EXACT_BANDWIDTH the band |pre - thr| < 1/8 holds exactly the pre
    at distance 1/16. So every backend, in every dtype, sees the same active set
    and band as float64, and only the decode/backward arithmetic can differ.
    W_dec, b_dec are ordinary random values.

    mode: "mixed" (some active), "all" (every feature active), "none" (none active).
    """
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1, ))))
    x = torch.randint(-1, 2, (n, d_in), generator=g).float()
    per = max(1, 32 // max(d_in, 1))
    W_enc = torch.randint(-per, per + 1, (d_in, d_sae), generator=g).float() / 8
    W_enc *= (torch.rand(d_in, d_sae, generator=g) < min(1.0, 8 / d_in)).float()  # keep |pre| <= 4
    b_enc = torch.randint(-4, 5, (d_sae, ), generator=g).float() / 8
    if mode == "all":
        b_enc = b_enc.abs() + 6.0  # pre > 2 everywhere
        threshold = torch.full((d_sae, ), 1.0 / 16)
    elif mode == "none":
        threshold = torch.full((d_sae, ), 15.0 + 1.0 / 16)
    else:
        threshold = (2 * torch.randint(0, 8, (d_sae, ), generator=g).float() + 1) / 16
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    params = dict(W_enc=cast(W_enc), b_enc=cast(b_enc), threshold=threshold, W_dec=cast(W_dec), b_dec=cast(b_dec))
    return cast(x), params


EXACT_BANDWIDTH = 0.25


def random_sparse_case(n, s, cap_extra=0, dtype=torch.float32, all_active=False, empty_rows=(), device="cpu"):
    """Random SparseActs-layout (indices, values, counts) over s features: rows of
    0..9 distinct features (all s when all_active), cap_extra padding slots, and
    the rows in empty_rows left empty."""
    if all_active:
        counts = torch.full((n, ), s, dtype=torch.int32)
    else:
        counts = torch.randint(0, min(s, 9) + 1, (n, ), dtype=torch.int32)
    for r in empty_rows:
        counts[r] = 0
    cap = int(counts.max()) + cap_extra if n else cap_extra
    idx = torch.zeros(n, cap, dtype=torch.int64)
    val = torch.zeros(n, cap)
    for b in range(n):
        c = int(counts[b])
        idx[b, :c] = torch.randperm(s)[:c]
        val[b, :c] = torch.rand(c) + 0.1
    return idx.to(device), val.to(dtype).to(device), counts.to(device)


# The cases of the sparse primitives (decode, gather-dot, scatter-rows), (tokens, d_sae, d_in):
# one token, zero tokens, odd sizes; d_in 130 is a multiple of no vector width but 2, 64
# vectorises every dtype, 300 spans blocks of a row, 2304 (Gemma 2 2B) with 512 features.
PRIM_SHAPES = [(1, 5, 3), (0, 7, 5), (13, 37, 19), (33, 64, 130), (9, 20, 64), (4, 40, 300), (64, 512, 2304)]
# The Triton interpreter: the same categories on fewer shapes (d_in 2304 alone takes 30 s there).
PRIM_FEW_SHAPES = [(1, 5, 3), (0, 7, 5), (13, 37, 130), (4, 40, 300)]
# random rows (row 0 empty); every feature in every row (but row 0); no feature in any row;
# 3 padding slots per row
PRIM_MODES = ["random", "all_active", "none_active", "padded"]


def _prim_cases(shapes):
    # the large shape (64 x 512 x 2304: 75M products with every feature active) in one mode
    return [(*shape, mode) for shape in shapes for mode in PRIM_MODES
            if mode == "padded" or shape[0] * shape[1] * shape[2] <= 10**6]


# (tokens, d_sae, d_in, mode) for helpers.impl_cases
PRIM_CASES, PRIM_FEW_CASES = _prim_cases(PRIM_SHAPES), _prim_cases(PRIM_FEW_SHAPES)


def sparse_prims_case(n, s, d, dtype, mode):
    """(indices, values, counts, W [s, d], bias [d], grad [n, d]) on the CPU, for a mode of PRIM_MODES."""
    empty = range(n) if mode == "none_active" else (0, ) if n > 1 else ()
    idx, val, cnt = random_sparse_case(n, s, cap_extra=3 if mode in ("padded", "none_active") else 0, dtype=dtype,
                                       all_active=mode == "all_active", empty_rows=empty)
    return idx, val, cnt, torch.randn(s, d).to(dtype), torch.randn(d).to(dtype), torch.randn(n, d).to(dtype)


def adam_case(shape, sd, dtype, touch):
    """A random optimizer-row case: param (unit-norm rows along sd), v, last, the rows
    touched ("some", "all", "none"; None for a dense parameter) and their gradients."""
    from sae_fast import reference

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1, ))))
    p = torch.randn(shape, generator=g)
    if sd is not None and len(shape) == 2:
        p = p / reference.row_view(p, sd).norm(dim=1, keepdim=True).reshape([-1 if d == sd else 1 for d in range(2)])
    v = torch.rand(shape, generator=g) * 1e-2
    n_rows = shape[sd] if sd is not None else 1
    last = torch.randint(0, 7, (n_rows, ), generator=g)
    if sd is None:
        rows = None
        grad = torch.randn(1, p.numel(), generator=g)
    else:
        rows = {
            "some": torch.randperm(n_rows, generator=g)[:max(1, n_rows // 3)].sort().values,
            "all": torch.arange(n_rows), "none": torch.zeros(0, dtype=torch.int64)
        }[touch]
        length = p.numel() // n_rows
        grad = torch.randn(rows.numel(), length, generator=g)
    return p.to(dtype), v, last, rows, grad


def check_adam_rows(kernel, p, v, last, rows, grad, **kw):
    """Run kernel(param, v, last, rows, grad, **kw) (in place, adam_b1zero_rows_'s contract)
    on copies and check it against the float64 truth with the tolerance of the reference
    in the same dtype; rows not named must not be written at all. Returns (param, v, last)."""
    from sae_fast import reference

    dtype, sd = p.dtype, kw["sparse_dim"]
    p64, v64, l64 = p.double(), v.double(), last.clone()
    reference.adam_b1zero_rows_(p64, v64, l64, rows, grad.double(), **kw)
    pr, vr, lr_ = p.clone(), v.clone(), last.clone()
    reference.adam_b1zero_rows_(pr, vr, lr_, rows, grad.to(dtype), **kw)
    pk, vk, lk = p.clone(), v.clone(), last.clone()
    kernel(pk, vk, lk, rows, grad.to(dtype), **kw)
    assert torch.equal(lk, lr_) and torch.equal(lk, l64)
    idx = rows if rows is not None else torch.zeros(1, dtype=torch.int64)
    untouched = torch.ones(last.numel(), dtype=torch.bool)
    untouched[idx] = False
    for got, before in ((pk, p), (vk, v)):  # rows not named are not written at all
        assert torch.equal(reference.row_view(got, sd)[untouched], reference.row_view(before, sd)[untouched])
    assert_close_as_dense(vk, v64, vr, what="v")
    assert_close_as_dense(pk, p64, pr, what="param")
    if kw.get("renorm") and idx.numel():
        norms = reference.row_view(pk, sd)[idx].float().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=2 * torch.finfo(dtype).eps * 11**0.5, atol=0)
    return pk, vk, lk


# ----------------------------------------------------------- the training step
# The case of the loss and row-grads tests: odd sizes, exact pre (exact_pre_case) so that every
# implementation sees the float64 active set and band; EXACT_BANDWIDTH puts some pre in the band.
STEP_D_IN, STEP_D_SAE = 17, 45
STEP_KW = dict(l0_coefficient=0.3, bandwidth=EXACT_BANDWIDTH)
# (tokens, mode, apply_b_dec_to_input): odd sizes, every/no feature active, one token, zero
# tokens; each with and without b_dec subtracted from the input
STEP_CASES = [(n, mode, apply_b_dec)
              for n, mode in [(13, "mixed"), (13, "all"), (13, "none"), (1, "mixed"), (0, "mixed")]
              for apply_b_dec in (False, True)]
# the Triton interpreter (a second a case): every case once, b_dec subtracted in the mixed one
STEP_FEW_CASES = [c for c in STEP_CASES if not c[2]] + [(13, "mixed", True)]


def reference_grads(x, params, apply_b_dec, target=None):
    """reference.jumprelu_sae_loss on x and params (a dict of the five tensors, and W_skip for
    a transcoder with a skip connection) and its gradients by parameter name (x's dtype
    decides: float64 for the truth, the SAE's for the dense path). target: a transcoder's."""
    from sae_fast import reference

    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = reference.jumprelu_sae_loss(x, **ps, apply_b_dec_to_input=apply_b_dec, target=target, **STEP_KW)
    out.loss.backward()
    return out, {k: v.grad for k, v in ps.items()}


# A transcoder's case: the exact-pre encoder of the SAE cases, a decoder into D_OUT (odd, unlike
# d_in), a random target and, in the "skip" cases, a random skip connection.
STEP_D_OUT = 11
# (tokens, mode, skip): odd sizes, every/no feature active, one token, zero tokens
TRANSCODER_CASES = [(n, mode, skip)
                    for n, mode in [(13, "mixed"), (13, "all"), (13, "none"), (1, "mixed"), (0, "mixed")]
                    for skip in (False, True)]
TRANSCODER_FEW_CASES = [c for c in TRANSCODER_CASES if c[2]] + [(13, "mixed", False)]


def transcoder_case(n, dtype, mode, skip):
    """(x, params, target): exact_pre_case's x and encoder, W_dec [d_sae, STEP_D_OUT], b_dec,
    W_skip [d_in, STEP_D_OUT] with skip, target [n, STEP_D_OUT]; all in dtype (threshold float32)."""
    x, p = exact_pre_case(n, STEP_D_IN, STEP_D_SAE, dtype, mode)
    W_dec = torch.randn(STEP_D_SAE, STEP_D_OUT)
    p["W_dec"] = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
    p["b_dec"] = (0.1 * torch.randn(STEP_D_OUT)).to(dtype)
    if skip:
        p["W_skip"] = (0.2 * torch.randn(STEP_D_IN, STEP_D_OUT)).to(dtype)
    return x, p, torch.randn(n, STEP_D_OUT).to(dtype)


# ------------------------------------------------------------- tiny language models
def write_word_tokenizer(d, text: str) -> dict:
    """A word-level Hugging Face tokenizer over the words of `text` (plus <pad>, <bos>, <eos>,
    <unk> as ids 0-3), saved to directory d; returns its vocabulary. With a tiny model saved
    next to it (save_pretrained(d)), AutoTokenizer / AutoModelForCausalLM load d offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text.split()))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(d)
    return vocab


def make_tiny_gemma3(vocab_size: int, n_layers: int, *, hidden: int = 32, max_positions: int = 128):
    """A randomly initialised tiny Gemma3ForCausalLM (Gemma Scope 2's architecture), in eval
    mode, drawn after torch.manual_seed(0); special tokens as write_word_tokenizer's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=max_positions, sliding_window=8, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def write_tiny_gemma3(d, n_words: int = 600, n_layers: int = 2) -> None:
    """A random-word text (d/a.txt, 30 distinct words) and a randomly initialised tiny
    Gemma3ForCausalLM with a word-level tokenizer over it (d/model), for benchmark scripts'
    quick checks."""
    import random

    rng = random.Random(0)
    text = " ".join(rng.choice([f"w{i}" for i in range(30)]) for _ in range(n_words))
    vocab = write_word_tokenizer(d / "model", text)
    make_tiny_gemma3(len(vocab), n_layers, max_positions=64).save_pretrained(d / "model")
    (d / "a.txt").write_text(text)
