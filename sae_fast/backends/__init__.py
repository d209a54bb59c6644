"""The backend registry: which implementation runs an op, and why the others can't.

A backend is one value, `Backend` (docs/DESIGN.md, "Backends"): its name, the device
types it runs on, why it is unavailable on a device, and its implementation of every
op the package dispatches (the public ops of sae_fast.ops, the training step of
sae_fast.step and the optimizer of sae_fast.optim). Nothing else resolves backends.

    torch   sae_fast.backends.pytorch  the pure-PyTorch reference; runs anywhere
    cpu     sae_fast.backends.cpp      C++/OpenMP kernels of sae_fast._C (csrc/cpu)
    cuda    sae_fast.backends.cpp      CUDA kernels of sae_fast._C (csrc/cuda, kernels/)
    triton  sae_fast.backends.triton   Triton kernels (CUDA tensors; CPU under TRITON_INTERPRET=1)

`resolve` picks one. "auto" prefers, on CUDA tensors: triton, cuda, torch; on CPU
tensors: cpu, torch (the Triton interpreter is a correctness tool, never picked by
auto). The environment variable SAE_FAST_BACKEND, when set, replaces "auto".

Implementations that users cannot name (selectable=False) may be registered too: the
test suite registers the CUDA kernels run by its CPU emulator (tests/cuda_emu) this
way, so that `implementations()` hands every available implementation to the tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_BACKEND = "SAE_FAST_BACKEND"
NAMES = ("torch", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@dataclass(frozen=True)
class Backend:
    """One implementation of every op, over flattened tokens ([N, d_in] inputs).

    encode(x, W_enc, b_enc, threshold) -> acts [N, d_sae]           dense JumpReLU
    encode_sparse(x, W_enc, b_enc, threshold) -> (indices, values, counts)   the active set
    decode(indices, values, counts, W_dec, b_dec) -> x_hat [N, d_in]
    encoder(x, W_enc, b_enc, threshold, half_bandwidth, *, band=True) -> step.EncodedSets
        the training encoder: active set, band and step count in one pass
    prims: step.Prims, the sparse decode / gather-dot / scatter-rows of the training step
    optimizer: adam_b1zero_rows_ with the schema of sae_fast::adam_b1zero_rows_, or None
        (sae_fast.reference.adam_b1zero_rows_ runs)
    loss: replaces the sparse autograd step of sae_fast.step.loss (torch: the dense
        reference, autograd through reference.jumprelu_sae_loss), or None
    checks_indices: its decode validates the indices and counts of its input itself
    optimizer_checks_rows: its optimizer op validates the rows of CUDA tensors itself
    defers_checks: the checks made for it on CUDA tensors report at a later call, without
        a synchronisation (its kernels mask every access meanwhile; sae_fast._checks)
    interpreted_on: device types where it runs only through an interpreter, for
        correctness (Triton on CPU): never picked by auto, never timed
    devices: the device types it can run on (None: any); `unavailable` says why it cannot run on one
    of them here (a build without the kernels, Triton without its interpreter...).
    x is already x - b_dec where the SAE applies b_dec to its input.
    """

    name: str
    devices: tuple[str, ...] | None
    unavailable: Callable[[torch.device], str | None]
    encode: Callable
    encode_sparse: Callable
    decode: Callable
    encoder: Callable
    prims: object
    optimizer: Callable | None = None
    loss: Callable | None = None
    checks_indices: bool = False
    optimizer_checks_rows: bool = False
    defers_checks: bool = False
    interpreted_on: tuple[str, ...] = ()

    def why_not(self, device: torch.device | str) -> str | None:
        """None when this backend runs on tensors of `device`, else why not: a device type
        outside `devices`, or what `unavailable` says (no build, no interpreter...)."""
        device = torch.device(device)
        why = self.unavailable(device)
        if why is None and self.devices is not None and device.type not in self.devices:
            why = f"the {self.name} backend runs on {' or '.join(self.devices)} tensors, not {device.type}"
        return why


# name -> factory returning the Backend (built on first use: the compiled ops register lazily)
_FACTORIES: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_SELECTABLE: dict[str, bool] = {}
# Why a backend failed to register (import error of its module), for info().
_UNREGISTERED_REASON: dict[str, str] = {
    "triton": "the Triton kernels are not part of this build", "cuda": "the CUDA kernels are not part of this build",
    "cpu": "the compiled extension sae_fast._C is not part of this build"
}


def register(name: str, factory: Callable[[], Backend], *, selectable: bool = True) -> None:
    """Register a backend under `name`. selectable=False: an implementation for tests and
    benchmarks only (listed by implementations(), never by NAMES, auto or resolve)."""
    if selectable and name not in NAMES:
        raise ValueError(f"unknown backend name {name!r}; expected one of {NAMES}")
    _FACTORIES[name] = factory
    _SELECTABLE[name] = selectable
    _INSTANCES.pop(name, None)
    _UNREGISTERED_REASON.pop(name, None)


def mark_unregistered(name: str, reason: str) -> None:
    if name not in _FACTORIES:
        _UNREGISTERED_REASON[name] = reason


def get(name: str) -> Backend:
    if name not in _FACTORIES:
        raise RuntimeError(f"backend {name!r} is not available: {_UNREGISTERED_REASON.get(name, 'not registered')}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None when `name` can run on tensors of `device`, else why not."""
    if name not in NAMES and name not in _FACTORIES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    if name not in _FACTORIES:
        return _UNREGISTERED_REASON.get(name, "not registered")
    return get(name).why_not(device)


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device | str) -> str:
    """The backend name that will run on tensors of `device` for a request of `backend`."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in NAMES:
                raise ValueError(f"{ENV_BACKEND} must be one of {('auto',) + NAMES}, got {env!r}")
            backend = env
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch", )):
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device} tensors: {why}")
    return backend


def select(backend: str, device: torch.device | str) -> Backend:
    """The Backend that runs on tensors of `device` for a request of `backend` (resolve's rules)."""
    return get(resolve(backend, device))


def table(device: torch.device | str) -> list[tuple[str, bool, str]]:
    """(name, available, reason) for each backend on `device`."""
    rows = []
    for name in NAMES:
        why = unavailable_reason(name, device)
        rows.append((name, why is None, why or "ok"))
    return rows


def timed(device: torch.device | str) -> list[str]:
    """The selectable backends that run natively on tensors of `device` (not through an
    interpreter): what the benchmarks time."""
    device = torch.device(device)
    return [n for n in NAMES if unavailable_reason(n, device) is None and device.type not in get(n).interpreted_on]


def implementations(devices=None) -> list[tuple[str, torch.device]]:
    """Every (backend name, device) pair that runs here: the selectable backends on each
    device type they support, and the registered test-only implementations (such as
    the CUDA kernels under the emulator). The tests and benchmarks iterate over this."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for name in list(NAMES) + sorted(n for n, s in _SELECTABLE.items() if not s):
        for dev in devices:
            if unavailable_reason(name, dev) is None:
                out.append((name, torch.device(dev)))
    return out


from . import pytorch as _pytorch  # noqa: E402,F401  (registers "torch")
