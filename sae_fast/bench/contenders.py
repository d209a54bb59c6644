"""What `sae-fast bench` times: workloads (realistic activations and SAE parameters of a
chosen L0) and the contenders (dense PyTorch eager and torch.compile, SAELens, SAELens on
sae_fast's kernels ("jumprelu_fast"), sae_fast on each backend), each exposing the same ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from ..dtypes import DTYPES
from ..modules import JumpReLUSAE
from ..sparse import SparseActs


# ------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Shape:
    d_in: int
    d_sae: int
    tokens: int
    l0: int
    dtype: str

    def __str__(self):
        return f"d_in={self.d_in} d_sae={self.d_sae} T={self.tokens} L0={self.l0} {self.dtype}"


class Workload:
    """Realistic activations (a power-law spectrum in a random rotation, like LM
    residuals) and SAE parameters whose thresholds give the asked L0 in expectation:
    pre_j is Gaussian with std sigma_j, so threshold_j = sigma_j * Phi^-1(1 - L0/d_sae)."""

    def __init__(self, shape: Shape, device: torch.device, n_inputs: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d, S, dt = shape.d_in, shape.d_sae, DTYPES[shape.dtype]
        spec = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.xs = [((torch.randn(shape.tokens, d, generator=g) * spec) @ Q).to(device=device, dtype=dt)
                   for _ in range(n_inputs)]
        W_dec = torch.randn(S, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        sigma = ((Q @ W_dec.T) * spec[:, None]).norm(dim=0)  # std of pre_j = x . w_j
        p = min(max(shape.l0 / S, 1e-9), 0.999)
        thr = sigma * torch.special.ndtri(torch.tensor(1 - p))
        self.params = {
            "W_enc": W_dec.T.contiguous().to(device, dt), "b_enc": torch.zeros(S, device=device, dtype=dt),
            "threshold": thr.to(device), "W_dec": W_dec.to(device,
                                                           dt), "b_dec": torch.zeros(d, device=device, dtype=dt)
        }
        self.shape = shape

    def sae(self, backend: str) -> JumpReLUSAE:
        return JumpReLUSAE.from_params(self.params, dtype=DTYPES[self.shape.dtype], device=self.xs[0].device,
                                       backend=backend)


# --------------------------------------------------------------- contenders
def _adam(params):
    return torch.optim.Adam(params, lr=1e-5, betas=(0.0, 0.999))


class DenseEager:
    """The Gemma Scope reference module, dense, in eager PyTorch."""

    name = "dense eager"
    sparse_io = False

    def __init__(self, wl: Workload, compile_: bool = False):
        self.p = {k: v.clone().requires_grad_() for k, v in wl.params.items()}
        p = self.p
        enc = lambda x: reference.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["threshold"])  # noqa: E731
        dec = lambda a: a @ p["W_dec"] + p["b_dec"]  # noqa: E731
        loss = lambda x: reference.jumprelu_sae_loss(x, **p, l0_coefficient=1e-3, bandwidth=1e-3).loss  # noqa: E731
        if compile_:
            enc, dec, loss = torch.compile(enc), torch.compile(dec), torch.compile(loss)
        self.opt = _adam(self.p.values())
        self.fns = {
            "encode": lambda x: enc(x), "encode_sparse": lambda x: SparseActs.from_dense(enc(x)),
            "decode": lambda a: dec(a), "forward": lambda x: dec(enc(x)), "train_step": self._step(loss)
        }

    def _step(self, loss):

        def step(x):
            self.opt.zero_grad(set_to_none=True)
            out = loss(x)
            out.backward()
            self.opt.step()
            return out

        return step


class DenseCompiled(DenseEager):
    name = "dense torch.compile"

    def __init__(self, wl):
        super().__init__(wl, compile_=True)


class SAEFast:
    """A sae_fast backend. Its training step is the product's: the row-grads step
    (JumpReLUSAE.training_row_grads, gradients for the touched features only) and the
    row-sparse exact Adam(beta1 = 0) (SparseAdamB1Zero.step_rows, fused on CUDA)."""

    sparse_io = True

    def __init__(self, wl: Workload, backend: str):
        from ..optim import SparseAdamB1Zero

        self.name = f"sae_fast {backend}"
        self.sae = wl.sae(backend)
        self.opt = SparseAdamB1Zero.for_sae(self.sae, lr=1e-5, beta2=0.999)
        sae = self.sae

        def step(x):
            out, grads = sae.training_row_grads(x, l0_coefficient=1e-3, bandwidth=1e-3)
            self.opt.step_rows(grads)
            return out.loss

        self.fns = {
            "encode": sae.encode, "encode_sparse": sae.encode_sparse, "decode": sae.decode, "forward": sae.forward,
            "train_step": step
        }


class SAELensJumpReLU:
    """SAELens's JumpReLUSAE (inference) and JumpReLUTrainingSAE trained by SAELens's own
    SAETrainer.step (training_forward_pass, backward, gradient clipping, Adam, schedulers and
    its firing statistics), given the same parameters. With fast=True the same two objects
    accelerated by sae_fast.saelens ("jumprelu_fast"): SAELens's code, our kernels."""

    sparse_io = False

    def __init__(self, wl: Workload, fast: bool = False):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE as SLSAE
        from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.name = "SAELens + sae_fast" if fast else "saelens"
        s, dev = wl.shape, str(wl.xs[0].device)
        common = dict(d_in=s.d_in, d_sae=s.d_sae, dtype=s.dtype, device=dev, apply_b_dec_to_input=False)
        self.sae = SLSAE(JumpReLUSAEConfig(**common))
        tr = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, jumprelu_bandwidth=1e-3, l0_coefficient=1e-3))
        with torch.no_grad():
            for m in (self.sae, tr):
                names = dict(m.named_parameters())
                for k, v in wl.params.items():
                    names[k].copy_(v)
        if fast:
            from .. import saelens

            self.sae, tr = saelens.accelerate(self.sae), saelens.accelerate(tr)
        cfg = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=s.tokens, device=dev, lr=1e-5,
                               lr_end=1e-5, adam_beta1=0.0, adam_beta2=0.999)
        self.trainer = SAETrainer(cfg=cfg, sae=tr, data_provider=iter(()))

        def step(x):
            return self.trainer.step(x).loss

        self.fns = {
            "encode": self.sae.encode, "encode_sparse": lambda x: SparseActs.from_dense(self.sae.encode(x)),
            "decode": self.sae.decode, "forward": self.sae.forward, "train_step": step
        }


def contenders(wl: Workload, names: list[str]) -> tuple[list, list[tuple[str, str]]]:
    """The contenders that can run here, and (name, reason) for those that cannot."""
    from .. import backends

    dev = wl.xs[0].device
    out, skipped = [], []
    for n in names:
        if n == "dense":
            out.append(DenseEager(wl))
        elif n == "compile":
            out.append(DenseCompiled(wl))
        elif n in ("saelens", "saelens-fast"):
            try:
                out.append(SAELensJumpReLU(wl, fast=n == "saelens-fast"))
            except ImportError as e:
                skipped.append((n, f"sae-lens not installed ({e})"))
        elif n in backends.NAMES and n != "torch":
            why = backends.unavailable_reason(n, dev)
            if why is None and n not in backends.timed(dev):
                why = f"sae_fast {n} runs interpreted on {dev.type} tensors: a correctness tool, not a benchmark"
            if why:
                skipped.append((f"sae_fast {n}", why))
            else:
                out.append(SAEFast(wl, n))
        else:
            raise ValueError(f"unknown contender {n!r}")
    return out, skipped


# ------------------------------------------------------------- floors, checks
