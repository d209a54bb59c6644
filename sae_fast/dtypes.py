"""The floating dtypes sae_fast runs in, by the names the CLI, configs and files use."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = tuple(DTYPES)
FLOAT_DTYPES = tuple(DTYPES.values())
BYTES = {name: torch.finfo(dt).bits // 8 for name, dt in DTYPES.items()}
NAME_OF = {dt: name for name, dt in DTYPES.items()}
