"""What the training step works on and what it returns: the SAE's parameters as one
bundle (SAEParams) and the gradients of the features a step touched (RowGrads).
docs/DESIGN.md, "The training step"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparse import valid_slots


@dataclass(frozen=True)
class SAEParams:
    """The five parameters of a JumpReLU SAE and whether b_dec is subtracted from its input,
    and a transcoder's optional affine skip connection.

    W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae] (float32), W_dec [d_sae, d_out],
    b_dec [d_out], W_skip [d_in, d_out] or None; all but threshold in the SAE dtype.
    An SAE has d_out = d_in; a transcoder predicts decode(encode(x)) + x @ W_skip."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = False
    W_skip: torch.Tensor | None = None

    NAMES = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")

    @classmethod
    def of(cls, sae) -> SAEParams:
        """The bundle of a module with these five attributes (a JumpReLUSAE or JumpReLUTranscoder)."""
        return cls(*(getattr(sae, n) for n in cls.NAMES), bool(getattr(sae, "apply_b_dec_to_input", False)),
                   getattr(sae, "W_skip", None))

    def tensors(self) -> tuple:
        return tuple(getattr(self, n) for n in self.NAMES)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """x', what W_enc multiplies: x - b_dec where the SAE applies b_dec to its input."""
        return x - self.b_dec if self.apply_b_dec_to_input else x

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]


@dataclass
class RowGrads:
    """One step's gradients on the features it touched, U = A ∪ N (sorted, unique).

    Every feature outside `rows` has an exactly zero gradient in W_dec, W_enc,
    b_enc and threshold. W_enc holds the touched *columns* of dW_enc as rows
    ([n, d_in] = dW_enc[:, rows]ᵀ), so both matrices update row-contiguously.
    A transcoder's skip connection is dense: its whole gradient (W_skip, else None).
    """

    rows: torch.Tensor  # int64 [n]
    W_enc: torch.Tensor  # [n, d_in], SAE dtype
    b_enc: torch.Tensor  # [n], SAE dtype
    threshold: torch.Tensor  # [n], float32
    W_dec: torch.Tensor  # [n, d_out], SAE dtype
    b_dec: torch.Tensor  # [d_out], SAE dtype
    W_skip: torch.Tensor | None = None  # [d_in, d_out], SAE dtype

    def full_size(self, d_sae: int) -> dict:
        """Full-size gradients by parameter name (tests, and handing over to torch optimizers)."""

        def rows_of(v, shape):
            out = torch.zeros(shape, dtype=v.dtype, device=v.device)
            out[self.rows] = v
            return out

        d_in, d_out = self.W_enc.shape[1], self.b_dec.shape[0]
        full = {
            "W_enc": rows_of(self.W_enc, (d_sae, d_in)).t(), "b_enc": rows_of(self.b_enc, (d_sae, )),
            "threshold": rows_of(self.threshold,
                                 (d_sae, )), "W_dec": rows_of(self.W_dec, (d_sae, d_out)), "b_dec": self.b_dec.clone()
        }
        if self.W_skip is not None:
            full["W_skip"] = self.W_skip.clone()
        return full

    def tensors(self) -> tuple:
        """Every gradient tensor (W_skip last, where there is one)."""
        five = (self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec)
        return five if self.W_skip is None else (*five, self.W_skip)

    def norm(self) -> torch.Tensor:
        """L2 norm over every gradient entry (float32), as torch.nn.utils.clip_grad_norm_ measures it."""
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in self.tensors()]).norm()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_'s rule, in place: scale by min(1, max_norm / (norm + 1e-6)),
        the factor cast to each gradient's dtype first, as torch does. Returns the norm."""
        total = self.norm()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for t in self.tensors():
            t.mul_(coef.to(t.dtype))
        return total


def touched_features(d_sae: int, *sets) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, pos): the sorted features named on valid slots of any (idx, cnt) set, and
    for every feature its position in `rows` (int64; only meaningful for touched ones).
    A mark-and-count over d_sae (8 MB at 2^20), no sort: deterministic."""
    dev = sets[0][0].device
    mark = torch.zeros(d_sae, dtype=torch.bool, device=dev)
    for idx, cnt in sets:
        mark[idx[valid_slots(idx, cnt)]] = True
    pos = torch.cumsum(mark, 0, dtype=torch.int64) - 1
    return mark.nonzero().squeeze(1), pos


# Rows per block of remove_parallel_component: its float32 temporaries stay at
# 3 x 16384 x d_in x 4 B (0.45 GB at d_in 2304) however many rows a step touched.
PROJECTION_BLOCK_ROWS = 16384


@torch.no_grad()
def remove_parallel_component(W_dec: torch.Tensor, rows: torch.Tensor | None, G: torch.Tensor) -> torch.Tensor:
    """G <- G - (G·w) w, in place, for each (unit-norm) decoder row w: the part of the
    gradient that would change the row's norm is removed. rows: the touched rows, G
    their compact [n, d_in] gradient (a RowGrads' W_dec); None: every row, G full size
    (a .grad). Float32 arithmetic, one rounding. Returns G."""
    n = W_dec.shape[0] if rows is None else rows.numel()
    for r0 in range(0, n, PROJECTION_BLOCK_ROWS):
        r1 = min(n, r0 + PROJECTION_BLOCK_ROWS)
        W = (W_dec[r0:r1] if rows is None else W_dec[rows[r0:r1]]).float()
        G32 = G[r0:r1].float()
        G[r0:r1] = G32 - (G32 * W).sum(-1, keepdim=True) * W
    return G
