"""Training pipeline: a causal LM's activations -> a trained JumpReLU SAE (`sae-fast train`)."""

from .config import EMBEDDED_MODEL, EMBEDDED_TEXT, TrainConfig
from .data import SyntheticActivationSource
from .run import evaluate, train
from .trainer import ActivationBuffer, CheckpointError, Trainer, autograd_step, row_grads_step

__all__ = [
    "ActivationBuffer", "CheckpointError", "EMBEDDED_MODEL", "EMBEDDED_TEXT", "SyntheticActivationSource",
    "TrainConfig", "Trainer", "autograd_step", "evaluate", "row_grads_step", "train"
]
