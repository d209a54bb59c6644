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
threshold [d_sae]; None for a dense update (b_dec). Gradients come either as
ordinary `.grad` tensors (`step()`: a slice is touched when any entry is
nonzero) or compact, for the touched rows only (`step_rows()`, fed by
JumpReLUSAE.training_row_grads: no full-size gradient ever exists).

Every update runs through one op, adam_b1zero_rows_: the `optimizer` of the backend
the registry gives for `backend` (sae_fast.backends; default "auto": triton, then
cuda on CUDA tensors; cpu on CPU tensors; torch where nothing compiled is available):
the fused Triton kernel sae_fast_triton::adam_b1zero_rows_, the C++/CUDA
sae_fast::adam_b1zero_rows_ (csrc/cpu, kernels/sparse_ops.cu), or the pure-PyTorch
reference sae_fast.reference.adam_b1zero_rows_. Each makes one pass over each touched row:
lazy decay, moment, update, and the unit-norm renormalisation of param groups
with `renorm_rows=True`.
State: v (float32, the parameter's shape) and last (int64 per row: the step v
is up to date with). A step in which a parameter has no gradient counts as a
zero-gradient step for it (its v decays), for dense parameters too.

step_rows validates what it is given before any parameter moves: rows int64 1-D,
each in [0, n_rows) of its parameter, no row twice (two updates of one row would race
on a GPU), grad [n rows, row length]. Errors name the first offending position, e.g.
"SparseAdamB1Zero.step_rows: rows[2]=-1 outside [0, n_rows=32) (W_dec, ...)". On CUDA
tensors with the Triton kernel the rows check runs on the device and reports at the next
sae_fast call or sae_fast.check_pending() (see sae_fast._checks); SAE_FAST_UNCHECKED=1
skips it. step() derives its rows from the gradients itself: nothing to check.
"""

from __future__ import annotations

import torch

from . import _checks, backends, reference
from .step import RowGrads

_SAE_NAMES = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


class SparseAdamB1Zero(torch.optim.Optimizer):
    """backend: which adam_b1zero_rows_ runs ("auto", "torch", "triton", "cuda", "cpu")."""

    def __init__(self, params, lr: float = 7e-5, beta2: float = 0.999, eps: float = 1e-8, sparse_dim: int | None = 0,
                 renorm_rows: bool = False, backend: str = "auto"):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        backends.check_backend_name(backend)
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, sparse_dim=sparse_dim, renorm_rows=renorm_rows))
        for g in self.param_groups:
            if g["renorm_rows"] and g["sparse_dim"] is None:
                raise ValueError("renorm_rows needs a sparse_dim (the rows to renormalise)")
        self.backend = backend
        self._impls: dict = {}
        self.t = 0  # global step count
        self.sae_params: dict[str, torch.nn.Parameter] = {}

    @classmethod
    def for_sae(cls, sae, *, decoder_unit_norm: bool = False, **kw) -> SparseAdamB1Zero:
        """Param groups of a JumpReLUSAE with the right sparse dimension for each parameter
        (and the SAE's backend unless `backend` is given).
        decoder_unit_norm: renormalise the W_dec rows a step changes to unit norm, inside
        the optimizer step (the parallel-gradient removal stays with the caller, before
        any clipping: see remove_parallel_component)."""
        groups = [{"params": [sae.W_dec], "sparse_dim": 0,
                   "renorm_rows": bool(decoder_unit_norm)}, {"params": [sae.b_enc, sae.threshold], "sparse_dim": 0},
                  {"params": [sae.W_enc], "sparse_dim": 1}, {"params": [sae.b_dec], "sparse_dim": None}]
        names = _SAE_NAMES
        if getattr(sae, "W_skip", None) is not None:  # a transcoder's skip connection: dense, one row
            groups.append({"params": [sae.W_skip], "sparse_dim": None})
            names = (*names, "W_skip")
        opt = cls(groups, **{"backend": sae.backend, **kw})
        opt.sae_params = {n: getattr(sae, n) for n in names}
        return opt

    def _state(self, p, sd):
        st = self.state[p]
        if not st:
            st["v"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            n = p.shape[sd] if sd is not None and p.dim() > 0 else 1
            st["last"] = torch.zeros(n, dtype=torch.int64, device=p.device)
        return st

    def _runner(self, p) -> backends.Backend:
        """The backend whose optimizer op updates p: the reference (torch) runs where the
        fused ops can't (no compiled op, or a non-contiguous parameter)."""
        if p.device not in self._impls:
            self._impls[p.device] = backends.select(self.backend, p.device)
        b = self._impls[p.device]
        return b if b.optimizer is not None and p.is_contiguous() else backends.get("torch")

    def _update(self, group, p, rows, grad):
        st = self._state(p, group["sparse_dim"])
        impl = self._runner(p).optimizer
        grad = grad.to(p.dtype).contiguous()
        if impl is not None:
            impl(p, st["v"], st["last"], rows, grad, self.t, group["lr"], group["beta2"], group["eps"],
                 group["sparse_dim"], group["renorm_rows"])
        else:
            reference.adam_b1zero_rows_(p, st["v"], st["last"], rows, grad, step=self.t, lr=group["lr"],
                                        beta2=group["beta2"], eps=group["eps"], sparse_dim=group["sparse_dim"],
                                        renorm=group["renorm_rows"])

    def _group_of(self, p):
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise ValueError("step_rows: a parameter that is not in this optimizer's param groups")

    @torch.no_grad()
    def step(self, closure=None):
        """Dense gradients in .grad; only the slices with a nonzero entry are updated."""
        loss = closure() if closure is not None else None
        self.t += 1
        for group in self.param_groups:
            sd = group["sparse_dim"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if sd is None:
                    self._update(group, p, None, g.reshape(1, -1))
                    continue
                G = reference.row_view(g, sd)
                rows = (G != 0).any(dim=1).nonzero().squeeze(1)
                self._update(group, p, rows, G.index_select(0, rows))
        return loss

    @torch.no_grad()
    def step_rows(self, grads):
        """Compact gradients: a RowGrads (optimizer built by for_sae), or a dict
        {param: (rows int64 [n] or None, grad [n, row length] or the full grad when rows is None)}.
        Parameters not named get no update this step (their v decays lazily)."""
        from_row_grads = isinstance(grads, RowGrads)
        if from_row_grads:
            if not self.sae_params:
                raise ValueError("step_rows(RowGrads) needs an optimizer made by SparseAdamB1Zero.for_sae(sae)")
            if (grads.W_skip is None) != ("W_skip" not in self.sae_params):
                raise ValueError("step_rows: the RowGrads and this optimizer's module disagree on W_skip "
                                 "(a transcoder's skip connection): "
                                 f"RowGrads {'has' if grads.W_skip is not None else 'lacks'} it")
            grads = {
                self.sae_params[n]: (None if n in ("b_dec", "W_skip") else grads.rows, getattr(grads, n))
                for n in self.sae_params
            }
        elif not isinstance(grads, dict):
            raise TypeError(
                f"step_rows: grads must be a RowGrads or a dict {{param: (rows, grad)}}, got {type(grads).__name__}")
        # Everything is checked before any parameter moves (a bad entry leaves the optimizer as it was).
        todo, checked = [], set()
        for p, (rows, g) in grads.items():
            group = self._group_of(p)
            self._check_step_rows_entry(p, group["sparse_dim"], rows, g, from_row_grads, checked)
            todo.append((group, p, rows, g))
        self.t += 1
        for group, p, rows, g in todo:
            self._update(group, p, rows, g)

    def _name_of(self, p) -> str:
        for n, q in self.sae_params.items():
            if q is p:
                return n
        return f"a parameter of shape {list(p.shape)}"

    def _check_step_rows_entry(self, p, sd, rows, g, from_row_grads, checked) -> None:
        op = "SparseAdamB1Zero.step_rows"
        what = self._name_of(p)
        if (rows is None) != (sd is None):
            raise ValueError(f"step_rows: rows must be given exactly for parameters with a sparse_dim ({what})")
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"{op}: the gradient of {what} must be a floating tensor, got "
                            f"{g.dtype if isinstance(g, torch.Tensor) else type(g).__name__}")
        if g.device != p.device:
            raise ValueError(f"{op}: the gradient of {what} is on {g.device}, the parameter on {p.device}")
        if rows is None:
            if tuple(g.shape) not in (tuple(p.shape), (1, p.numel())):
                raise ValueError(
                    f"{op}: the gradient of {what} must have its shape {list(p.shape)}, got {list(g.shape)}")
            return
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1:
            desc = f"{rows.dtype} {list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise TypeError(f"step_rows: rows must be a 1-D int64 tensor, got {desc} ({what})")
        if rows.device != p.device:
            raise ValueError(f"{op}: rows of {what} are on {rows.device}, the parameter on {p.device}")
        n_rows, length = _checks.row_geometry(op, p, sd)
        n = rows.numel()
        if tuple(g.shape) != (n, length) and not (p.dim() == 1 and tuple(g.shape) == (n, )):
            raise ValueError(
                f"{op}: the gradient of {what} must be [n rows={n}, row length={length}], got {list(g.shape)}")
        b = self._runner(p)
        key = (id(rows), n_rows)
        if key in checked or (b.optimizer_checks_rows and rows.is_cuda):
            return  # a RowGrads' rows serve four parameters; the C++ CUDA op checks them itself
        checked.add(key)
        hint = f" ({what}, {n_rows} rows along sparse_dim {sd}"
        hint += "; a RowGrads of a wider SAE?)" if from_row_grads else ")"
        # defer (CUDA only): the Triton kernel masks rows outside [0, n_rows); the reference would assert
        _checks.check_rows(op, rows, n_rows, defer=b.defers_checks, hint=hint)

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
                decay = torch.pow(torch.tensor(b2, dtype=torch.float64, device=p.device), missed).to(torch.float32)
                reference.row_view(st["v"], sd).mul_(decay[:, None])
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
