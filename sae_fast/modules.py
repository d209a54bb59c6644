"""JumpReLUSAE: the drop-in module, with Gemma Scope's parameter names."""

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
        for name, v in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.d_in = d_in
        self.d_sae = d_sae
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.backend = backends.check_backend_name(backend)
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.empty(d_sae, **kw))
        self.threshold = nn.Parameter(torch.empty(d_sae, dtype=torch.float32, device=device))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.empty(d_in, **kw))
        if not _skip_init:
            self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self, threshold_init: float = 0.001) -> None:
        """Training init (Gemma Scope recipe): unit-norm random decoder rows,
        W_enc = W_decᵀ, zero biases, threshold = threshold_init."""
        w = torch.empty(self.d_sae, self.d_in, dtype=torch.float32, device=self.W_dec.device)
        nn.init.kaiming_uniform_(w)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(threshold_init)

    def _apply(self, fn, recurse=True):
        # Keep threshold float32 through .to(dtype)/.half()/.bfloat16(): move it
        # to the new device only, from its float32 value (no lossy round trip).
        thr = self.threshold.data
        grad = self.threshold.grad
        out = super()._apply(fn, recurse)
        dev = self.W_enc.device
        self.threshold.data = thr.to(device=dev, dtype=torch.float32)
        if grad is not None:
            self.threshold.grad = grad.to(device=dev, dtype=torch.float32)
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
        check_input(acts, self.d_sae, self.dtype, name="acts")
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

    def training_forward(self, x: torch.Tensor, *, l0_coefficient: float, bandwidth: float = 0.001) -> TrainingOutput:
        """Loss and metrics for one training batch; loss.backward() fills every
        parameter's gradient, threshold by the straight-through rules."""
        return ops.jumprelu_sae_loss(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                     l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                     apply_b_dec_to_input=self.apply_b_dec_to_input, backend=self.backend)

    def training_row_grads(self, x: torch.Tensor, *, l0_coefficient: float, bandwidth: float = 0.001,
                           dense: bool | None = None):
        """The row-grads training step: (TrainingOutput, RowGrads), the same loss as
        training_forward without an autograd graph, and the gradients of the features
        the batch touched only (sae_fast.step.RowGrads); .grad is left alone.
        Feed them to sae_fast.optim.SparseAdamB1Zero.step_rows. In dense phases (a fresh
        init: about half the features active) it computes with chunked dense GEMMs
        instead (`dense`, see ops.jumprelu_sae_row_grads)."""
        return ops.jumprelu_sae_row_grads(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                          l0_coefficient=l0_coefficient, bandwidth=bandwidth,
                                          apply_b_dec_to_input=self.apply_b_dec_to_input, backend=self.backend,
                                          dense=dense)

    # ----------------------------------------------------------------- saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, backend: str = "auto") -> JumpReLUSAE:
        """Load a Gemma Scope params.npz, a SAELens directory (cfg.json +
        sae_weights.safetensors, JumpReLU), or a directory saved by save_pretrained."""
        from .io import load_pretrained

        params, cfg = load_pretrained(path)
        return cls.from_params(params, dtype=dtype or cfg.get("dtype"), device=device, backend=backend,
                               apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", False))

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
