"""Steering: run a Hugging Face causal LM with chosen SAE features turned up or clamped.

    with sae_fast.steering(model, sae, {1234: 8.0}):            # add 8 x feature 1234's decoder row
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    with sae_fast.steering(model, sae, {1234: 0.0}, mode="clamp"):   # ablate feature 1234
        logits = model(ids).logits

Meanwhile every forward of `model` (generation included) has the tensor at the SAE's hook point
edited (sae_fast.hooks.edit); leaving the block removes the hooks, and the model is as before.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .hooks import HookPoint, HookPointError, capture, edit, hook_point_of
from .modules import JumpReLUSAE, JumpReLUTranscoder
from .sparse import valid_slots

MODES = ("add", "clamp")
POSITIONS = ("all", "generated")


@dataclass(frozen=True)
class Steering:
    """What a steering block does (yielded by `steering`): the edited hook point, the hook point
    a clamp reads the activations at (a transcoder's input; None in mode "add"), the features
    and their strengths, the mode and the positions."""

    hook: HookPoint
    read_hook: HookPoint | None
    features: dict
    mode: str
    positions: str


def check_features(sae, features) -> dict[int, float]:
    """{feature index: strength} as ints and finite floats, or an error naming what is wrong."""
    if not isinstance(features, Mapping):
        raise TypeError(f"features must be a dict {{feature index: strength}}, got {type(features).__name__}")
    if not features:
        raise ValueError("features must name at least one feature, got an empty dict")
    out = {}
    for j, s in features.items():
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise TypeError(f"feature indices must be ints, got {j!r} ({type(j).__name__})")
        if not 0 <= int(j) < sae.d_sae:
            raise ValueError(f"feature {int(j)} is out of range: the SAE has d_sae={sae.d_sae} features "
                             f"(0..{sae.d_sae - 1})")
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise ValueError(f"the strength of feature {int(j)} must be a finite number, got {s!r}")
        out[int(j)] = float(s)
    return out


def write_hook_point(sae) -> HookPoint:
    """Where `sae`'s decoder writes: an SAE's hook point (where it reads), a transcoder's output
    hook point (metadata hf_hook_point_out, or SAELens's hf_hook_name_out)."""
    if not isinstance(sae, JumpReLUTranscoder):
        return hook_point_of(sae)
    meta = dict(getattr(sae, "metadata", None) or {})
    for key in ("hf_hook_point_out", "hf_hook_name_out"):
        if meta.get(key):
            return HookPoint.parse(meta[key])
    raise HookPointError("the transcoder's metadata names no output hook point (hf_hook_point_out or "
                         "hf_hook_name_out): pass hook= (where its decoder writes)")


class _Positions:
    """The absolute position of each token the current forward of the model runs on, and where the
    prompt ends, for positions="generated".

    A forward that starts at position 0 (no cache, or an empty one) holds a new prompt, unless it is
    the previous such forward's input plus one token: that is a generation step without a KV cache
    (generate(use_cache=False) re-runs the whole sequence each step). A forward that starts past 0
    (a KV cache holds the tokens before it) continues the sequence. A new prompt's length is where
    generated tokens begin."""

    def __init__(self):
        self.start = 0
        self.n = None  # tokens of the forward under way; None outside a forward of the model
        self.prompt_len = None
        self.last_ids = None

    @staticmethod
    def _past_length(kwargs) -> int:
        cache_position = kwargs.get("cache_position")  # transformers < 5 passes it to every forward
        if isinstance(cache_position, torch.Tensor) and cache_position.numel():
            return int(cache_position.reshape(-1)[0])
        past = kwargs.get("past_key_values")
        if past is None:
            return 0
        if hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
        try:  # the legacy tuple cache: ((key [batch, heads, seq, dim], value), ...) per layer
            return int(past[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError):
            return 0

    def before_forward(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = None
            embeds = kwargs.get("inputs_embeds")
            if not isinstance(embeds, torch.Tensor):
                raise ValueError("steering with positions='generated': the model's forward got neither input_ids "
                                 "nor inputs_embeds, so the generated positions cannot be told")
            n = int(embeds.shape[-2])
        else:
            n = int(ids.shape[-1])
        start = self._past_length(kwargs)
        if start == 0:
            last = self.last_ids
            step = (ids is not None and last is not None and ids.shape[:-1] == last.shape[:-1] and
                    ids.shape[-1] == last.shape[-1] + 1 and torch.equal(ids[..., :-1], last))
            if not step:
                self.prompt_len = n
            self.last_ids = ids
        else:
            self.last_ids = None  # a cached sequence goes on by its cache, not by re-sent prefixes
            if self.prompt_len is None:  # the block was entered mid-sequence: all new tokens are generated
                self.prompt_len = start
        self.start, self.n = start, n

    def after_forward(self, *_):
        self.n = None

    def mask(self, seq_len: int, device) -> torch.Tensor:
        """Bool [seq_len]: the positions of the forward under way that hold generated tokens."""
        if self.n is None or self.n != seq_len:
            raise RuntimeError(f"steering with positions='generated': a forward reached the hook point with "
                               f"{seq_len} positions outside a forward of the model given to steering() "
                               f"(or with another length than its input's, {self.n}); call that model")
        return torch.arange(self.start, self.start + seq_len, device=device) >= self.prompt_len


def _model_device(model, fallback):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else fallback


@torch.no_grad()
def feature_acts(sae, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """float32 [..., F]: the activations of `features` (int64 [F]) on x [..., d_in], read from
    the sparse encoder (sae.encode_sparse: the same values it reports, no dense [tokens, d_sae])."""
    flat = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=sae.dtype)
    sp = sae.encode_sparse(flat)
    feats = features.to(sp.indices.device)
    hit = (sp.indices[:, :, None] == feats[None, None, :]) & valid_slots(sp.indices, sp.counts)[:, :, None]
    # where(), not values * hit: another feature's NaN value must not leak into these sums
    a = torch.where(hit, sp.values[:, :, None].float(), 0.0).sum(1)
    return a.reshape(*x.shape[:-1], feats.numel())


@contextlib.contextmanager
def steering(model, sae, features: Mapping[int, float], *, mode: str = "add", positions: str = "all",
             hook: HookPoint | str | None = None):
    """Meanwhile, every forward of the Hugging Face causal LM `model` (model.generate included) runs
    with SAE features steered at the SAE's hook point. Yields a `Steering` record.

    features: {feature index: strength}, one or more features of `sae` (a JumpReLUSAE or
    JumpReLUTranscoder).

    mode:
      "add"   (default) x += Σ_j strength_j · W_dec[j]: each feature's decoder direction, `strength`
              times; strength 0 leaves the model's outputs as they are.
      "clamp" set each feature's activation to its strength: x += (strength_j - a_j(x)) · W_dec[j],
              a_j(x) the SAE's activation of feature j on x (from sae.encode_sparse); only feature
              j's contribution to the SAE's reconstruction changes: the other features' and the
              reconstruction error stay. Strength 0 ablates the feature.

    Where: an SAE reads and writes at one hook point, sae_fast.hooks.hook_point_of(sae) (from its
    metadata). A transcoder's decoder writes to its OUTPUT hook point (metadata hf_hook_point_out):
    the edit is made there, and in mode "clamp" a_j is computed from the tensor at its input hook
    point in the same forward. `hook` (a HookPoint or a name such as "model.layers.6.output")
    replaces the hook point that is edited.

    positions:
      "all"       (default) every position of every forward: each prompt token and each generated one.
      "generated" only the positions of generated tokens, those past the prompt: the prompt is the
                  input of a forward that starts a sequence (position 0; see _Positions for
                  generation without a KV cache). The first new token is still predicted from the
                  unsteered prompt, so steering shows from the second generated token on.

    Numerics: the edit, Σ coefficient · W_dec[j], is computed in float32 on the model's device
    and added to the hook tensor in the model's dtype (the SAE may have another dtype or device:
    a clamp's input is cast to the SAE's). Positions not steered keep their exact values. The edit
    is not differentiated through the SAE (a_j is a constant to autograd).

    Errors: a feature index outside 0..d_sae-1 (ValueError naming d_sae), an unknown mode or
    positions (ValueError), a model without the hook point (sae_fast.hooks.HookPointError, on
    entering the block), a hook tensor whose width is not the decoder's (ValueError, in the forward).
    """
    if not isinstance(sae, JumpReLUSAE):
        raise TypeError(f"sae must be a sae_fast JumpReLUSAE or JumpReLUTranscoder, got {type(sae).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    feats = check_features(sae, features)
    transcoder = isinstance(sae, JumpReLUTranscoder)
    if hook is None:
        hp = write_hook_point(sae)
    else:
        hp = hook if isinstance(hook, HookPoint) else HookPoint.parse(hook)
    read_hp = hook_point_of(sae) if transcoder and mode == "clamp" else None
    hp.module(model)  # a missing hook point is refused here, before any forward
    if read_hp is not None:
        read_hp.module(model)

    index = torch.tensor(list(feats), dtype=torch.int64)
    device = _model_device(model, sae.device)
    with torch.no_grad():
        rows = {device: sae.W_dec.detach()[index.to(sae.device)].float().to(device)}  # [F, d_out] per device
        strengths = {device: torch.tensor(list(feats.values()), dtype=torch.float32, device=device)}
    width = int(sae.W_dec.shape[1])
    tracker = _Positions() if positions == "generated" else None

    def on(dev, table):
        if dev not in table:  # a model split over devices: the hook tensor lives elsewhere
            table[dev] = next(iter(table.values())).to(dev)
        return table[dev]

    def steer(x: torch.Tensor, x_in: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-1] != width:
            raise ValueError(f"steering: the tensor at hook point {hp.name!r} has width {x.shape[-1]} but the "
                             f"SAE's decoder writes {width}: this SAE does not belong at this hook point")
        sel = None
        if tracker is not None:
            sel = tracker.mask(x.shape[-2], x.device)
            if not bool(sel.any()):
                return x
            x_sel = x[..., sel, :]
            x_in = x_in[..., sel, :] if x_in is not None else None
        else:
            x_sel = x
        w, s = on(x.device, rows), on(x.device, strengths)
        with torch.no_grad():
            if mode == "add":
                delta = s @ w
            else:
                a = feature_acts(sae, x_sel if x_in is None else x_in, index).to(x.device)
                delta = (s - a) @ w
        out = x_sel + delta.to(x.dtype)
        if sel is None:
            return out
        full = x.clone()
        full[..., sel, :] = out
        return full

    with contextlib.ExitStack() as stack:
        if tracker is not None:
            pre = model.register_forward_pre_hook(tracker.before_forward, with_kwargs=True)
            stack.callback(pre.remove)
            post = model.register_forward_hook(tracker.after_forward)
            stack.callback(post.remove)
        if read_hp is None:
            stack.enter_context(edit(model, hp, lambda x: steer(x, None)))
        else:
            seen = stack.enter_context(capture(model, read_hp))

            def steer_output(y):
                if "x" not in seen:
                    raise HookPointError(f"steering: the transcoder's input hook point {read_hp.name!r} was not "
                                         f"reached before its output hook point {hp.name!r}")
                x_in = seen.pop("x")  # popped: a later forward must not read this one's input
                if x_in.shape[:-1] != y.shape[:-1]:
                    raise ValueError(f"steering: the tensors at {read_hp.name!r} {list(x_in.shape)} and "
                                     f"{hp.name!r} {list(y.shape)} do not have the same positions")
                return steer(y, x_in)

            stack.enter_context(edit(model, hp, steer_output))
        yield Steering(hook=hp, read_hook=read_hp, features=feats, mode=mode, positions=positions)


# ------------------------------------------------------------------- `sae-fast steer`
def add_parser(sub) -> None:
    """The `sae-fast steer` subcommand (added to the CLI's subparsers `sub`)."""
    import argparse

    from .dtypes import NAMES as DTYPE_NAMES
    from .train.config import EMBEDDED_MODEL

    s = sub.add_parser(
        "steer", help="generate with SAE features steered: the plain and the steered continuation side by side",
        description="Load a causal LM and an SAE (or transcoder), generate greedily from --prompt once plainly and "
        "once with the features steered at the SAE's hook point (sae_fast.steering), and print the two "
        "continuations side by side (two columns, or two labelled blocks when the terminal is narrower "
        "than 60 columns; the width is the terminal's, or $COLUMNS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--sae", required=True,
                   help="SAE or transcoder: a directory saved by sae-fast train, a SAELens or Gemma Scope (2) one")
    s.add_argument("--feature", type=int, action="append", required=True, metavar="J",
                   help="feature index to steer; repeat for several features")
    s.add_argument(
        "--strength", type=float, action="append", required=True, metavar="S",
        help="strength of each --feature, in the same order (one --strength applies to every feature): "
        "the multiple of its decoder row added (--mode add) or its activation (--mode clamp)")
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument(
        "--model", default=None, help="hub name, local directory or .gguf file (default: the SAE's metadata "
        f"model_name if it loads, else {EMBEDDED_MODEL})")
    s.add_argument("--mode", choices=MODES, default="add",
                   help="add: x += S * W_dec[J]; clamp: set feature J's activation to S (x += (S - a_J) * W_dec[J])")
    s.add_argument("--positions", choices=POSITIONS, default="all",
                   help="all: prompt and generated tokens; generated: generated tokens only")
    s.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (greedy)")
    s.add_argument("--model-dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the LM")
    s.add_argument("--seed", type=int, default=0, help="torch seed (greedy decoding itself draws nothing)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    lines = []
    for para in text.strip().split("\n"):  # keep the continuation's own line breaks
        lines += textwrap.wrap(para, width) or [""]
    return lines


def side_by_side(left: str, right: str, left_label: str, right_label: str, width: int) -> str:
    """Two columns of `width` characters in all, or two labelled blocks when width < 60."""
    import itertools

    if width < 60:
        return "\n".join([f"--- {left_label} ---", *_wrap(left, width), f"--- {right_label} ---", *_wrap(right, width)])
    col = (width - 3) // 2
    rows = [(left_label, right_label), ("-" * col, "-" * col)]
    rows += itertools.zip_longest(_wrap(left, col), _wrap(right, col), fillvalue="")
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in rows)


def describe(feats: dict, mode: str) -> str:
    """'feature 12 +8, feature 40 -2' (add) or 'feature 12 = 8' (clamp)."""
    return ", ".join(f"feature {j} {s:+g}" if mode == "add" else f"feature {j} = {s:g}" for j, s in feats.items())


def run_cli(args, parser, out=None, err=None, load=None) -> int:
    """`sae-fast steer`: load, generate plainly and steered, print side by side. `load`: the model
    loader (sae_fast.train.data.load_model; tests pass another)."""
    import shutil
    import sys

    from .dtypes import DTYPES
    from .explore.run import load_model_for, load_sae
    from .hooks import run_until
    from .train.trainer import pick_device

    out, err = out or sys.stdout, err or sys.stderr
    if len(args.strength) not in (1, len(args.feature)):
        parser.error(f"--strength: give one per --feature ({len(args.feature)}) or one for all, "
                     f"got {len(args.strength)}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    strengths = args.strength * len(args.feature) if len(args.strength) == 1 else args.strength
    if len(set(args.feature)) != len(args.feature):
        parser.error(f"--feature: each feature once, got {args.feature}")
    try:
        device = pick_device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    torch.manual_seed(args.seed)
    from .io import SAELoadError

    try:
        sae = load_sae(args.sae, device=device)
    except SAELoadError as e:
        parser.error(f"--sae: {e}")
    features = dict(zip(args.feature, strengths))
    try:
        check_features(sae, features)
    except ValueError as e:
        parser.error(f"--feature/--strength: {e}")
    model, tok, name = load_model_for(sae, args.model, device, DTYPES[args.model_dtype], load=load, err=err)
    enc = tok(args.prompt, return_tensors="pt").to(device)
    if enc["input_ids"].shape[-1] == 0:
        parser.error("--prompt: it holds no tokens")
    # the hook point and its width are checked on the prompt first: a wrong SAE or model fails
    # here with what to change, before any generation
    try:
        hp = write_hook_point(sae)
        width = run_until(model, hp, enc["input_ids"]).shape[-1]
    except HookPointError as e:
        raise SystemExit(f"sae-fast steer: {e}") from None
    if width != sae.W_dec.shape[1]:
        raise SystemExit(f"sae-fast steer: the SAE writes width {sae.W_dec.shape[1]} but {name} has width {width} "
                         f"at {hp.name}: pass the --model this SAE was trained on")
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, top_p=None, top_k=None,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    n = enc["input_ids"].shape[-1]
    with torch.no_grad():
        plain = model.generate(**enc, **gen)[0, n:]
        with steering(model, sae, features, mode=args.mode, positions=args.positions):
            steered = model.generate(**enc, **gen)[0, n:]
    text = [tok.decode(t, skip_special_tokens=True) for t in (plain, steered)]
    kind = type(sae).__name__
    print(f"model: {name}   {kind}: {args.sae} (d_sae={sae.d_sae}) at {hp.name}", file=out)
    print(
        f"steering: {describe(features, args.mode)} ({args.mode}, {args.positions} positions); greedy, "
        f"{args.max_new_tokens} new tokens", file=out)
    print(f"prompt: {args.prompt!r}", file=out)
    cols = shutil.get_terminal_size((100, 24)).columns
    print(side_by_side(text[0], text[1], "plain", "steered", cols), file=out)
    return 0
