"""Where an SAE reads (and a transcoder writes) in a Hugging Face causal LM: hook points.

A hook point names a module of the model and one side of it, as Gemma Scope 2's configs
do: "model.layers.12.output" (the decoder layer's output, the residual stream),
"model.layers.9.pre_feedforward_layernorm.output" (a transcoder's MLP input),
"model.layers.3.self_attn.o_proj.input". Paths are relative to the causal LM
(`AutoModelForCausalLM`); "model.layers.{L}" also resolves on models whose decoder layers
sit elsewhere (`model.language_model.layers`, `transformer.h`, ...).

    hp = hook_point_of(sae)                       # from the SAE's metadata (else layer/site)
    with capture(model, hp) as seen: model(ids)   # seen["x"]: the tensor at the hook
    with edit(model, hp, fn): model.generate(...) # the tensor at the hook replaced by fn(tensor)

Used by `sae-fast explore`, `sae-fast activations`, steering and `sae-fast train`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

SITES = ("resid", "attn", "mlp")
# the module of each site of `sae-fast train`, below the decoder layer
_SITE_PATHS = {"resid": "", "attn": "self_attn", "mlp": "mlp"}
_LAYERS = re.compile(r"^model\.layers\.(\d+)(?:\.(.+))?$")
# other names of a decoder layer's attention and MLP modules (GPT-2, NeoX, ...)
_ALIASES = {"self_attn": ("attn", "attention"), "mlp": ("feed_forward", )}


class HookPointError(ValueError):
    """A hook point that does not exist in the model (the message names it and what exists)."""


@dataclass(frozen=True)
class HookPoint:
    """A module path of the causal LM and the side of it: "output" or "input"."""

    path: str
    side: str = "output"

    @property
    def name(self) -> str:
        return f"{self.path}.{self.side}"

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """"model.layers.12.output" -> HookPoint("model.layers.12", "output")."""
        if not isinstance(name, str) or "." not in name:
            raise HookPointError(f"hook point must look like 'model.layers.12.output', got {name!r}")
        path, side = name.rsplit(".", 1)
        if side not in ("output", "input"):
            raise HookPointError(f"hook point {name!r} must end in '.output' or '.input'")
        return cls(path, side)

    @classmethod
    def of_site(cls, layer: int, site: str) -> HookPoint:
        """The hook of `sae-fast train --layer L --site S`: the decoder layer's output (resid),
        or its attention / MLP module's output."""
        if site not in SITES:
            raise HookPointError(f"site must be one of {SITES}, got {site!r}")
        sub = _SITE_PATHS[site]
        return cls(f"model.layers.{int(layer)}" + (f".{sub}" if sub else ""), "output")

    @property
    def layer(self) -> int | None:
        m = _LAYERS.match(self.path)
        return int(m.group(1)) if m else None

    def module(self, model) -> torch.nn.Module:
        """The module this hook point names in `model` (HookPointError if it has none)."""
        try:
            return model.get_submodule(self.path)
        except AttributeError:
            pass
        m = _LAYERS.match(self.path)
        if m is not None:
            from .train.data import decoder_layers

            layers = decoder_layers(model)
            i = int(m.group(1))
            if not 0 <= i < len(layers):
                raise HookPointError(f"hook point {self.name!r}: layer {i} does not exist: "
                                     f"{type(model).__name__} has layers 0..{len(layers) - 1}")
            sub = m.group(2) or ""
            head, _, rest = sub.partition(".")
            for alt in (head, *_ALIASES.get(head, ())):
                try:
                    return layers[i].get_submodule(".".join(p for p in (alt, rest) if p))
                except AttributeError:
                    continue
        raise HookPointError(f"hook point {self.name!r}: {type(model).__name__} has no module {self.path!r}")


def hook_point_of(sae, *, layer: int | None = None, site: str | None = None) -> HookPoint:
    """Where `sae` reads: its metadata's hf_hook_point_in (Gemma Scope 2, our transcoders),
    hf_hook_name (SAELens), or our SAEs' hook_layer + site; else the given layer and site
    (which also override the metadata when given)."""
    meta = dict(getattr(sae, "metadata", None) or {})
    if layer is not None:
        return HookPoint.of_site(layer, site or "resid")
    for key in ("hf_hook_point_in", "hf_hook_name"):
        if meta.get(key):
            return HookPoint.parse(meta[key])
    if meta.get("hook_layer") is not None:
        name = str(meta.get("hook_name", ""))
        found = name.rsplit(".", 1)[-1] if name.startswith("layer") else "resid"
        return HookPoint.of_site(int(meta["hook_layer"]), found if found in SITES else "resid")
    raise HookPointError("the SAE's metadata names no hook point (hf_hook_point_in, hf_hook_name or hook_layer): "
                         "give the layer (and site)")


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def capture(model, hp: HookPoint, *, stop: bool = False):
    """Meanwhile, every forward records the tensor at `hp` in the yielded dict under "x".
    stop=True ends the forward right there (raising StopForward, which `run_until` catches):
    the layers above are not run."""
    seen: dict = {}
    mod = hp.module(model)

    def on_output(_m, _inp, out):
        seen["x"] = _first(out)
        if stop:
            raise StopForward

    def on_input(_m, args, kwargs):
        seen["x"] = args[0] if args else next(iter(kwargs.values()))
        if stop:
            raise StopForward

    h = (mod.register_forward_hook(on_output) if hp.side == "output" else mod.register_forward_pre_hook(
        on_input, with_kwargs=True))
    try:
        yield seen
    finally:
        h.remove()


class StopForward(Exception):
    """Raised by a stopping capture to end the model's forward early."""


@contextlib.contextmanager
def edit(model, hp: HookPoint, fn):
    """Meanwhile, the tensor at `hp` is replaced by fn(tensor) in every forward (generation
    included); fn gets and returns [batch, seq, d]."""
    mod = hp.module(model)

    def on_output(_m, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    def on_input(_m, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        k = next(iter(kwargs))
        return args, {**kwargs, k: fn(kwargs[k])}

    h = (mod.register_forward_hook(on_output) if hp.side == "output" else mod.register_forward_pre_hook(
        on_input, with_kwargs=True))
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def run_until(model, hp: HookPoint, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The tensor at `hp` for input ids, running the model only up to it."""
    with capture(model, hp, stop=True) as seen:
        try:
            model(ids, **kwargs)
        except StopForward:
            pass
    if "x" not in seen:
        raise HookPointError(f"hook point {hp.name!r} was not reached by the forward")
    return seen["x"]
