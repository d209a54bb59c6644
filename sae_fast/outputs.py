"""TrainingOutput: what the training forward of every backend returns, assembled in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparse import SparseActs


@dataclass
class TrainingOutput:
    """What `JumpReLUSAE.training_forward` returns.

    loss            float32 scalar, mse_loss + l0_loss; call .backward() on it
    mse_loss        float32 scalar, mean over tokens of ||x - x_hat||^2 (summed over d_in)
    l0_loss         float32 scalar, l0_coefficient * mean over tokens of sum_j H(pre - threshold);
                    with target_l0 (Gemma Scope 2's quadratic L0 loss) l0_coefficient * mean over
                    tokens of 2 / target_l0 * (l0_b - target_l0)², l0_b = sum_j H(pre[b, j] - threshold[j])
    l0              float32 scalar (detached), mean number of active features per token
    reconstruction  x_hat, shaped like the input, in the SAE's dtype
    fired           bool [d_sae] (detached): which features were active on at least one token
    acts            SparseActs (detached): the batch's active set and activations, flat
                    tokens [N, d_sae]; what the step computed anyway (never a dense tensor).
                    None from the dense phase of the row-grads step, which never forms it

    For a transcoder the reconstruction is the prediction of the target (the skip
    connection included) and mse_loss is measured against the target.
    """

    loss: torch.Tensor
    mse_loss: torch.Tensor
    l0_loss: torch.Tensor
    l0: torch.Tensor
    reconstruction: torch.Tensor
    fired: torch.Tensor | None = None
    acts: SparseActs | None = None

    @classmethod
    def assemble(cls, *, mse_loss, step_sum, l0_coefficient: float, active, n: int, reconstruction, fired=None,
                 acts=None, l0_per_token=None, target_l0: float | None = None) -> TrainingOutput:
        """The one assembly every path uses: loss = mse_loss + l0_coefficient * step_sum / n,
        l0 = active / n (n: tokens, at least 1; step_sum = sum of H(pre - threshold),
        active = number of (token, feature) pairs in the active set). With target_l0 the
        quadratic L0 loss of l0_per_token [tokens] (each token's sum_j H(pre - threshold)),
        summed in float64 (squared counts of up to d_sae² lose digits in float32)."""
        if target_l0 is None:
            l0_loss = float(l0_coefficient) * step_sum / n
        else:
            t = float(target_l0)
            dev = (l0_per_token.double() - t).pow(2).sum()
            l0_loss = (float(l0_coefficient) * (2.0 / t) * dev / n).to(
                torch.promote_types(l0_per_token.dtype, torch.float32))
        return cls(loss=mse_loss + l0_loss, mse_loss=mse_loss, l0_loss=l0_loss, l0=active / n,
                   reconstruction=reconstruction, fired=fired, acts=acts)
