"""TrainingOutput: what the training forward of every backend returns, assembled in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingOutput:
    """What `JumpReLUSAE.training_forward` returns.

    loss            float32 scalar, mse_loss + l0_loss; call .backward() on it
    mse_loss        float32 scalar, mean over tokens of ||x - x_hat||^2 (summed over d_in)
    l0_loss         float32 scalar, l0_coefficient * mean over tokens of sum_j H(pre - threshold)
    l0              float32 scalar (detached), mean number of active features per token
    reconstruction  x_hat, shaped like the input, in the SAE's dtype
    fired           bool [d_sae] (detached): which features were active on at least one token
    """

    loss: torch.Tensor
    mse_loss: torch.Tensor
    l0_loss: torch.Tensor
    l0: torch.Tensor
    reconstruction: torch.Tensor
    fired: torch.Tensor | None = None

    @classmethod
    def assemble(cls, *, mse_loss, step_sum, l0_coefficient: float, active, n: int, reconstruction,
                 fired=None) -> TrainingOutput:
        """The one assembly every path uses: loss = mse_loss + l0_coefficient * step_sum / n,
        l0 = active / n (n: tokens, at least 1; step_sum = sum of H(pre - threshold),
        active = number of (token, feature) pairs in the active set)."""
        l0_loss = float(l0_coefficient) * step_sum / n
        return cls(loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active / n,
                   reconstruction=reconstruction, fired=fired)
