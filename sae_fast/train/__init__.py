"""Training pipeline: a causal LM's activations -> a trained JumpReLU SAE or transcoder (`sae-fast train`)."""

from .config import EMBEDDED_MODEL, EMBEDDED_TEXT, PathNotFoundError, TrainConfig, TrainSetupError
from .data import SyntheticActivationSource, SyntheticTranscoderSource
from .run import evaluate, evaluate_transcoder, train
from .trainer import ActivationBuffer, CheckpointError, Trainer, autograd_step, row_grads_step

__all__ = [
    "ActivationBuffer", "CheckpointError", "EMBEDDED_MODEL", "EMBEDDED_TEXT", "PathNotFoundError",
    "SyntheticActivationSource", "SyntheticTranscoderSource", "TrainConfig", "TrainSetupError", "Trainer",
    "autograd_step", "evaluate", "evaluate_transcoder", "train", "row_grads_step"
]
