"""Result types returned by the training forward of every backend."""

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
