"""Loading the compiled extension sae_fast._C, if this install has one.

The package works without it (reference backend); when it loads, it registers
the `cpu` backend, and the `cuda` backend if it was built with CUDA kernels.
"""

from __future__ import annotations

import os

from . import backends

ENV_DISABLE = "SAE_FAST_DISABLE_EXTENSION"
_state: dict = {"module": None, "error": None}


def load_extension():
    """Import sae_fast._C once; returns the module or None (reason in extension_error())."""
    if _state["module"] is not None or _state["error"] is not None:
        return _state["module"]
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        _state["error"] = f"disabled by {ENV_DISABLE}"
    else:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            from . import _C  # type: ignore[attr-defined]

            _state["module"] = _C
        except ImportError as e:
            _state["error"] = f"sae_fast._C is not built ({e}); reinstall with `pip install --no-build-isolation -e .`"
    if _state["module"] is None:
        backends.mark_unregistered("cpu", _state["error"])
        backends.mark_unregistered("cuda", _state["error"])
        return None
    from .backends import cpp

    cpp.register_backends(_state["module"])
    return _state["module"]


def load_triton() -> None:
    """Register the triton backend when Triton imports (it needs no compiled extension)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        backends.mark_unregistered("triton", "triton is not installed; pip install triton")
        return
    from .backends import triton  # noqa: F401  (registers the triton backend)


def extension_error() -> str | None:
    return _state["error"]
