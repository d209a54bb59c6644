"""Adam with beta1 = 0 (the Gemma Scope setting), updating only the rows a step touched.

With beta1 = 0, Adam's first moment is the gradient itself, so a row whose
gradient is zero this step gets an update of exactly 0, and its second moment
only decays: v <- beta2 * v. This optimizer skips such rows and applies the k
missed decays at once, v <- beta2^k * v, when the row is next touched or when
`flush()` is called. The result equals torch.optim.Adam(betas=(0, beta2)) to
rounding (beta2^k by one power instead of k products), while a step touches
O(rows touched x row length) memory instead of the whole matrix.

"Rows" are slices along a parameter's `sparse_dim` (param group option):
0 for W_dec [d_sae, d_in], 1 for W_enc [d_in, d_sae], 0 for b_enc and
threshold [d_sae]; None for a dense update (b_dec). A slice is touched when
any of its gradient entries is nonzero.
"""

from __future__ import annotations

import torch


class SparseAdamB1Zero(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 7e-5, beta2: float = 0.999, eps: float = 1e-8, sparse_dim: int | None = 0):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, sparse_dim=sparse_dim))
        self.t = 0  # global step count

    @classmethod
    def for_sae(cls, sae, **kw) -> "SparseAdamB1Zero":
        """Param groups of a JumpReLUSAE with the right sparse dimension for each parameter."""
        return cls([
            {"params": [sae.W_dec, sae.b_enc, sae.threshold], "sparse_dim": 0},
            {"params": [sae.W_enc], "sparse_dim": 1},
            {"params": [sae.b_dec], "sparse_dim": None},
        ], **kw)

    def _state(self, p, sd):
        st = self.state[p]
        if not st:
            st["v"] = torch.zeros_like(p, dtype=torch.float32)
            n = p.shape[sd] if sd is not None and p.dim() > 0 else 1
            st["last"] = torch.zeros(n, dtype=torch.int64, device=p.device)  # step v is up to date with
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.t += 1
        t = self.t
        for group in self.param_groups:
            lr, b2, eps, sd = group["lr"], group["beta2"], group["eps"], group["sparse_dim"]
            bc2_sqrt = (1 - b2**t) ** 0.5
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p, sd)
                g = p.grad
                if sd is None or p.dim() == 0:
                    v = st["v"]
                    v.mul_(b2).addcmul_(g.float(), g.float(), value=1 - b2)
                    st["last"].fill_(t)
                    p.sub_((lr * (g.float() / (v.sqrt() / bc2_sqrt + eps))).to(p.dtype))
                    continue
                other = [d for d in range(g.dim()) if d != sd]
                touched = (g != 0).any(dim=other) if other else (g != 0)
                rows = touched.nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                gr = g.index_select(sd, rows).float()
                vr = st["v"].index_select(sd, rows)
                # the decays of the steps this row sat out, then this step's update
                missed = (t - 1 - st["last"][rows]).to(torch.float64)
                shape = [-1 if d == sd else 1 for d in range(g.dim())]
                vr = vr * torch.pow(torch.tensor(b2, dtype=torch.float64, device=p.device), missed).to(torch.float32).reshape(shape)
                vr = vr * b2 + (1 - b2) * gr * gr
                st["v"].index_copy_(sd, rows, vr)
                st["last"][rows] = t
                pr = p.index_select(sd, rows).float() - lr * (gr / (vr.sqrt() / bc2_sqrt + eps))
                p.index_copy_(sd, rows, pr.to(p.dtype))
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row's second moment up to the current step (as dense Adam holds it)."""
        for group in self.param_groups:
            b2, sd = group["beta2"], group["sparse_dim"]
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                missed = (self.t - st["last"]).to(torch.float64)
                if sd is None or p.dim() == 0:
                    st["v"].mul_(float(b2 ** float(missed.max())))
                else:
                    shape = [-1 if d == sd else 1 for d in range(p.dim())]
                    st["v"].mul_(torch.pow(torch.tensor(b2, dtype=torch.float64, device=p.device), missed)
                                 .to(torch.float32).reshape(shape))
                st["last"].fill_(self.t)

    def state_dict(self):
        # Copies: the base class hands out the live tensors, which a second
        # optimizer loading them would then update in place as well.
        sd = super().state_dict()
        sd["state"] = {k: {n: v.clone() for n, v in st.items()} for k, st in sd["state"].items()}
        sd["t"] = self.t
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.t = state_dict.pop("t", 0)
        super().load_state_dict(state_dict)
        # the base class casts state to the parameter's dtype; `last` is a step count
        for st in self.state.values():
            st["v"] = st["v"].float().clone()
            st["last"] = st["last"].round().to(torch.int64)

    def torch_adam_state(self, p) -> dict:
        """The state torch.optim.Adam(betas=(0, beta2)) would hold for p (call flush() first)."""
        st = self.state[p]
        return {"step": torch.tensor(float(self.t)), "exp_avg": p.grad.detach().clone() if p.grad is not None
                else torch.zeros_like(p), "exp_avg_sq": st["v"].to(p.dtype).clone()}
