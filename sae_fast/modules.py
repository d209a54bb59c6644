"""JumpReLUSAE and JumpReLUTranscoder: the drop-in modules, with Gemma Scope's parameter names."""

from __future__ import annotations

import os

import torch
from torch import nn

from . import backends, ops
from ._checks import FLOAT_DTYPES, check_input
from .outputs import TrainingOutput
from .sparse import SparseActs

# Set while from_pretrained builds a module whose parameters it will overwrite:
# a random init of a 2^20-wide SAE costs seconds for nothing.
_skip_init = False


class JumpReLUSAE(nn.Module):
    """A JumpReLU sparse autoencoder.

    Parameters (Gemma Scope's names and shapes):
        W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

    `threshold` is kept in float32 whatever `dtype` the weights have (bf16
    rounds small threshold updates away); `.to(dtype)` leaves it float32.

    Math (docs/DESIGN.md, "The math"):
        pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
        acts = relu(pre) * (pre > threshold)
        x̂    = acts @ W_dec + b_dec

    backend: "auto", "torch", "triton", "cuda" or "cpu" (see sae_fast.info()).
    Inputs are [..., d_in] in the SAE's dtype.
    """

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str = "auto", apply_b_dec_to_input: bool = False):
        super().__init__()
        self._build(d_in, d_sae, d_in, dtype=dtype, device=device, backend=backend, skip=False)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        if not _skip_init:
            self.reset_parameters()

    def _build(self, d_in, d_sae, d_out, *, dtype, device, backend, skip):
        for name, v in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.d_in = d_in
        self.d_sae = d_sae
        self.backend = backends.check_backend_name(backend)
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.empty(d_sae, **kw))
        self.threshold = nn.Parameter(torch.empty(d_sae, dtype=torch.float32, device=device))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.empty(d_out, **kw))
        self.W_skip = nn.Parameter(torch.empty(d_in, d_out, **kw)) if skip else None

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self, threshold_init: float = 0.001) -> None:
        """Training init (Gemma Scope recipe): unit-norm random decoder rows,
        W_enc = W_decᵀ, zero biases, threshold = threshold_init. (A transcoder whose
        d_out differs from d_in draws W_enc on its own, unit-norm columns; W_skip = 0.)"""
        w = torch.empty(self.d_sae, self.W_dec.shape[1], dtype=torch.float32, device=self.W_dec.device)
        nn.init.kaiming_uniform_(w)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        if self.W_enc.shape[0] != w.shape[1]:
            w = torch.empty(self.d_sae, self.d_in, dtype=torch.float32, device=self.W_dec.device)
            nn.init.kaiming_uniform_(w)
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(threshold_init)
        if self.W_skip is not None:
            self.W_skip.zero_()

    def _apply(self, fn, recurse=True):
        # Keep threshold float32 through .to(dtype)/.half()/.bfloat16(): where fn cast it, it is
        # remade on its new device from the float32 value it had (no lossy round trip). Where fn
        # kept it float32 (a device move, to_empty, float()), fn's result stands: re-copying the
        # old tensor would fail for a meta one (to_empty after device="meta" init) and copy twice.
        thr = self.threshold.data
        # .data: the cast replaces the gradient tensor's data in place, so keep the old data
        grad = self.threshold.grad.data if self.threshold.grad is not None else None
        out = super()._apply(fn, recurse)
        new = self.threshold
        if new.dtype != torch.float32:
            # its gradient was cast with it: remade the same way
            new.data = thr.to(device=new.device, dtype=torch.float32)
            if grad is not None:
                new.grad = grad.to(device=new.device, dtype=torch.float32)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def resolved_backend(self) -> str:
        """The backend that runs for this module's device now (honours SAE_FAST_BACKEND)."""
        return backends.resolve(self.backend, self.device)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.dtype}, backend={self.backend!r}, "
                f"apply_b_dec_to_input={self.apply_b_dec_to_input}")

    # ---------------------------------------------------------------- compute
    def _enc_args(self):
        return (self.W_enc, self.b_enc, self.threshold, self.b_dec, self.apply_b_dec_to_input)

    def _encode_backend(self, x: torch.Tensor) -> str:
        # The fused encoder ops carry no autograd (training goes through
        # training_forward, whose sparse backward covers the encoder). When autograd
        # must see encode()/forward(), the reference path runs, so no gradient is
        # silently lost; under torch.no_grad()/inference_mode the kernels run.
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "torch"
        return self.backend

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense activations [..., d_sae], exactly relu(pre) * (pre > threshold)."""
        return ops.jumprelu_encode(x, *self._enc_args(), backend=self._encode_backend(x))

    def encode_sparse(self, x: torch.Tensor, capacity: int | None = None) -> SparseActs:
        """Sparse activations (SparseActs) of [..., d_in] input; never truncates."""
        return ops.jumprelu_encode_sparse(x, *self._enc_args(), capacity=capacity, backend=self._encode_backend(x))

    def decode(self, acts: torch.Tensor | SparseActs) -> torch.Tensor:
        """x̂ from dense activations [..., d_sae] or from SparseActs."""
        if isinstance(acts, SparseActs):
            return ops.sparse_decode(acts, self.W_dec, self.b_dec, backend=self.backend)
        check_input(acts, self.d_sae, self.dtype, name="acts", dim="d_sae")
        if acts.device != self.device:
            raise ValueError(f"acts is on {acts.device} but the SAE is on {self.device}")
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ of x [..., d_in]. Sparse (encode_sparse + sparse decode) on the
        compiled backends under torch.no_grad(); dense reference when autograd needs the graph."""
        backend = self._encode_backend(x)
        if backend == "torch" or backends.resolve(backend, self.device) == "torch":
            acts = ops.jumprelu_encode(x, *self._enc_args(), backend="torch")
            return self.decode(acts)
        return self.decode(self.encode_sparse(x))

    def training_forward(self, x: torch.Tensor, *, l0_coefficient: float, bandwidth: float = 0.001,
                         target_l0: float | None = None) -> TrainingOutput:
        """Loss and metrics for one training batch; loss.backward() fills every
        parameter's gradient, threshold by the straight-through rules. target_l0: the quadratic
        L0 loss of Gemma Scope 2 instead of the linear one (see ops.jumprelu_sae_loss)."""
        return ops.jumprelu_sae_loss(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                     l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                     apply_b_dec_to_input=self.apply_b_dec_to_input, target_l0=target_l0,
                                     backend=self.backend)

    def training_row_grads(self, x: torch.Tensor, *, l0_coefficient: float, bandwidth: float = 0.001,
                           dense: bool | None = None, target_l0: float | None = None):
        """The row-grads training step: (TrainingOutput, RowGrads), the same loss as
        training_forward without an autograd graph, and the gradients of the features
        the batch touched only (sae_fast.step.RowGrads); .grad is left alone.
        Feed them to sae_fast.optim.SparseAdamB1Zero.step_rows. In dense phases (a fresh
        init: about half the features active) it computes with chunked dense GEMMs
        instead (`dense`, see ops.jumprelu_sae_row_grads)."""
        return ops.jumprelu_sae_row_grads(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                          l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                          apply_b_dec_to_input=self.apply_b_dec_to_input, backend=self.backend,
                                          dense=dense, target_l0=target_l0)

    # ----------------------------------------------------------------- saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, backend: str = "auto") -> JumpReLUSAE:
        """Load a Gemma Scope params.npz, a Gemma Scope 2 SAE folder (config.json +
        params.safetensors) or its params.safetensors file, a SAELens directory (cfg.json +
        sae_weights.safetensors, JumpReLU), or a directory saved by save_pretrained."""
        from .io import load_pretrained

        params, cfg = load_pretrained(path, kind="sae")
        sae = cls.from_params(params, dtype=dtype or cfg.get("dtype"), device=device, backend=backend,
                              apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", False))
        sae.metadata = cfg.get("metadata", {})
        return sae

    @classmethod
    def from_params(cls, params: dict, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    backend: str = "auto", apply_b_dec_to_input: bool = False) -> JumpReLUSAE:
        """An SAE holding copies of params {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"}
        (cast to dtype, default W_enc's; threshold stays float32), without a random init."""
        W_enc = params["W_enc"]
        global _skip_init
        _skip_init = True
        try:
            sae = cls(int(W_enc.shape[0]), int(W_enc.shape[1]), dtype=dtype or W_enc.dtype, device=device,
                      backend=backend, apply_b_dec_to_input=apply_b_dec_to_input)
        finally:
            _skip_init = False
        with torch.no_grad():
            for name, t in params.items():
                getattr(sae, name).copy_(t)
        return sae

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the SAELens layout (cfg.json + sae_weights.safetensors) to directory `path`."""
        from .io import save_saelens

        save_saelens(self, path)


class JumpReLUTranscoder(JumpReLUSAE):
    """A JumpReLU transcoder: the JumpReLU dictionary of an MLP, read from the MLP's input
    and written to its output (Gemma Scope 2's transcoders).

    Parameters (Gemma Scope 2's names and orientation):
        W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae] (float32), W_dec [d_sae, d_out],
        b_dec [d_out], and with affine_skip=True W_skip [d_in, d_out] (Gemma Scope 2's
        `affine_skip_connection`; SAELens stores its transpose as W_skip [d_out, d_in]).

    Math:
        acts  = relu(pre) * (pre > threshold),  pre = x @ W_enc + b_enc
        y_hat = acts @ W_dec + b_dec (+ x @ W_skip)       forward(x) = y_hat

    The same kernels as JumpReLUSAE: fused encoder, sparse decode into d_out, the sparse
    backward, the row-grads step and row-sparse Adam (W_skip, dense, is one Adam row).
    Training pairs an input x (the MLP input) with its target y (the MLP output).
    """

    def __init__(self, d_in: int, d_sae: int, d_out: int, *, affine_skip: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None, backend: str = "auto"):
        nn.Module.__init__(self)
        self._build(d_in, d_sae, d_out, dtype=dtype, device=device, backend=backend, skip=bool(affine_skip))
        self.apply_b_dec_to_input = False  # b_dec lives in the output space
        if not _skip_init:
            self.reset_parameters()

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def affine_skip(self) -> bool:
        return self.W_skip is not None

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}, affine_skip={self.affine_skip}, "
                f"dtype={self.dtype}, backend={self.backend!r}")

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W_skip, or None without a skip connection."""
        return None if self.W_skip is None else x @ self.W_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted output y_hat [..., d_out] of x [..., d_in] (sparse decode under
        torch.no_grad() on the compiled backends, as JumpReLUSAE.forward)."""
        y = super().forward(x)
        s = self.skip(x)
        return y if s is None else y + s

    def _check_target(self, target):
        if target is None:
            raise ValueError("target is required: a transcoder is trained to predict target [..., d_out] "
                             "(the MLP output) from x [..., d_in] (the MLP input)")

    def training_forward(self, x: torch.Tensor, target: torch.Tensor | None = None, *, l0_coefficient: float,
                         bandwidth: float = 0.001, target_l0: float | None = None) -> TrainingOutput:
        """Loss and metrics for one batch of (x, target) pairs; mse_loss is ||target - y_hat||²
        (mean over tokens), the rest as JumpReLUSAE.training_forward."""
        self._check_target(target)
        return ops.jumprelu_sae_loss(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                     l0_coefficient=l0_coefficient, bandwidth=bandwidth, target=target,
                                     W_skip=self.W_skip, target_l0=target_l0, backend=self.backend)

    def training_row_grads(self, x: torch.Tensor, target: torch.Tensor | None = None, *, l0_coefficient: float,
                           bandwidth: float = 0.001, dense: bool | None = None, target_l0: float | None = None):
        """The row-grads step on (x, target) pairs (see JumpReLUSAE.training_row_grads);
        RowGrads.W_skip holds the skip connection's whole gradient."""
        self._check_target(target)
        return ops.jumprelu_sae_row_grads(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                          l0_coefficient=l0_coefficient, bandwidth=bandwidth, target=target,
                                          W_skip=self.W_skip, target_l0=target_l0, backend=self.backend, dense=dense)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, backend: str = "auto") -> JumpReLUTranscoder:
        """Load a Gemma Scope 2 transcoder folder (config.json + params.safetensors, plain or
        affine-skip), its params.safetensors file, a SAELens transcoder directory
        (jumprelu_transcoder / jumprelu_skip_transcoder), or one saved by save_pretrained."""
        from .io import load_pretrained

        params, cfg = load_pretrained(path, kind="transcoder")
        tc = cls.from_params(params, dtype=dtype or cfg.get("dtype"), device=device, backend=backend)
        tc.metadata = cfg.get("metadata", {})
        return tc

    @classmethod
    def from_params(cls, params: dict, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    backend: str = "auto") -> JumpReLUTranscoder:
        """A transcoder holding copies of params {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"
        and optionally "W_skip" [d_in, d_out]}, without a random init."""
        W_enc, W_dec = params["W_enc"], params["W_dec"]
        global _skip_init
        _skip_init = True
        try:
            tc = cls(int(W_enc.shape[0]), int(W_enc.shape[1]), int(W_dec.shape[1]), affine_skip=params.get("W_skip")
                     is not None, dtype=dtype or W_enc.dtype, device=device, backend=backend)
        finally:
            _skip_init = False
        with torch.no_grad():
            for name, t in params.items():
                if t is not None:
                    getattr(tc, name).copy_(t)
        return tc
