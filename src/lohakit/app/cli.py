"""The ``lohakit`` command (also ``python -m lohakit``): train, demo, inspect, convert, merge.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr naming the thing at fault),
130 interrupted (after a checkpoint was saved), 1 an unexpected internal error. ``--debug``
prints the traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any, Callable, Iterator, Sequence

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Exceptions that mean "bad input": reported as one line, exit code 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, ImportError)


class _UsageError(Exception):
    """Raised by the parser instead of printing the usage block and exiting."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and goes through :func:`main`'s error path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _kv(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it can be (``r=4``, ``target_modules=["q"]``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _target_list(text: str) -> str | list[str]:
    return text if text == "all-linear" or any(c in text for c in "*()[]^$|\\") else [t for t in text.split(",") if t]


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
#: flag -> (TrainConfig field, argparse kwargs)
_TRAIN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="transformers model directory, or an import path package.module:callable")),
    "--data": ("data", dict(help="training text: .txt, .jsonl (with a text field) or .csv")),
    "--output-dir": ("output_dir", dict(help="where checkpoints, metrics.jsonl, loss_curve.png and the adapter go")),
    "--task": ("task", dict(choices=["causal-lm", "seq-cls", "text-to-image"],
                            help="causal-lm (default), seq-cls, or text-to-image (--model: a diffusers pipeline directory, "
                            "--data: an image folder)")),
    "--eval-data": ("eval_data", dict(help="held-out text (default: the last --eval-fraction of --data)")),
    "--eval-fraction": ("eval_fraction", dict(type=float, help="share of --data held out when no --eval-data (0.1)")),
    "--text-field": ("text_field", dict(help="text field/column of .jsonl/.csv data (text)")),
    "--label-field": ("label_field", dict(help="label field/column for seq-cls (label)")),
    "--seq-len": ("seq_len", dict(type=int, help="tokens per sample (128)")),
    "--batch-size": ("batch_size", dict(type=int, help="samples per process per micro-step (8; text-to-image 1)")),
    "--grad-accum": ("grad_accum", dict(type=int, help="micro-steps per optimiser step (1)")),
    "--max-steps": ("max_steps", dict(type=int, help="optimiser steps (100; text-to-image 1000)")),
    "--lr": ("lr", dict(type=float, help="AdamW learning rate (default: min(3e-2, 6 / hidden size), measured for LoHa; "
                                        "about 3x the rate LoRA wants; text-to-image: 1e-4)")),
    "--weight-decay": ("weight_decay", dict(type=float, help="AdamW weight decay (0; text-to-image 0.01)")),
    "--warmup-steps": ("warmup_steps", dict(type=int, help="linear warm-up steps (0)")),
    "--lr-scheduler": ("lr_scheduler", dict(choices=["linear", "cosine", "constant"], help="decay after warm-up (linear; text-to-image constant)")),
    "--max-grad-norm": ("max_grad_norm", dict(type=float, help="gradient clipping norm, 0 = off (1.0)")),
    "--eval-every": ("eval_every", dict(type=int, help="evaluate every N steps, 0 = only at the end (50)")),
    "--eval-batches": ("eval_batches", dict(type=int, help="at most N eval batches (20)")),
    "--save-every": ("save_every", dict(type=int, help="checkpoint every N steps, 0 = only at the end (100; text-to-image 500)")),
    "--seed": ("seed", dict(type=int, help="random seed (0)")),
    "--mixed-precision": ("mixed_precision", dict(choices=["auto", "no", "bf16", "fp16"], help="auto: bf16 on a GPU that has it, else fp32")),
}


#: text-to-image flags: flag -> (ImageTrainConfig field, argparse kwargs)
_IMAGE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--resolution": ("resolution", dict(type=int, help="bucket area ~ resolution^2, a multiple of the family's factor (512)")),
    "--caption-ext": ("caption_ext", dict(help="suffix of the caption files beside the images (.txt)")),
    "--missing-caption": ("missing_caption", dict(choices=["warn", "error", "empty", "folder"],
                                                  help="an image without caption: warn (default; empty caption), error, empty, "
                                                  "folder (the concept folder's name)")),
    "--caption-dropout": ("caption_dropout", dict(type=float, help="probability of an empty caption per sample (0)")),
    "--keep-tokens": ("keep_tokens", dict(type=int, help="with --shuffle-caption: leading tags kept in place (0)")),
    "--text-encoder-lr": ("text_encoder_lr", dict(type=float, help="learning rate of the text encoders' adapters (--lr)")),
    "--conv-r": ("conv_r", dict(type=int, help="with --train-convs: rank of the ResNet conv adapters (-r)")),
    "--conv-alpha": ("conv_alpha", dict(type=float, help="with --train-convs: their alpha (--conv-r)")),
    "--cache-dir": ("cache_dir", dict(help="cached VAE latents / text outputs (default $XDG_CACHE_HOME/lohakit/image-cache)")),
    "--min-snr-gamma": ("min_snr_gamma", dict(type=float, help="UNets: Min-SNR-gamma loss weighting (off)")),
    "--noise-offset": ("noise_offset", dict(type=float, help="UNets: offset noise strength (0)")),
    "--timestep-sampling": ("timestep_sampling", dict(choices=["logit_normal", "uniform"], help="FLUX/SD3: how sigma is drawn before "
                                                      "the scheduler's shift (logit_normal)")),
    "--guidance-scale": ("guidance_scale", dict(type=float, help="FLUX.1-dev: the guidance input while training (3.5)")),
    "--max-sequence-length": ("max_sequence_length", dict(type=int, help="FLUX/SD3: T5 tokens per caption (the pipeline's default)")),
    "--optimizer": ("optimizer", dict(choices=["adamw", "adamw8bit"], help="adamw (default) or adamw8bit (bitsandbytes)")),
    "--ema-decay": ("ema_decay", dict(type=float, help="EMA of the adapter weights, e.g. 0.999 (0: off); outputs carry the EMA")),
    "--sample-prompts": ("sample_prompts", dict(help="file of prompts, one per line: sample grids under OUT/samples/")),
    "--sample-every": ("sample_every", dict(type=int, help="sample every N steps (0: at the end only, with --sample-prompts)")),
    "--sample-steps": ("sample_steps", dict(type=int, help="inference steps per sample (20)")),
    "--sample-seed": ("sample_seed", dict(type=int, help="seed of the sample images (0)")),
    "--output-name": ("output_name", dict(help="name of the kohya file, OUT/NAME.safetensors (loha)")),
    "--save-dtype": ("save_dtype", dict(choices=["fp16", "bf16", "fp32"], help="dtype of the kohya file (fp16)")),
}
_IMAGE_SWITCHES = {
    "--skip-bad-images": ("skip_bad_images", "skip unreadable or truncated images (one warning) instead of stopping"),
    "--random-flip": ("random_flip", "mirror half of the samples (a pure function of seed and step)"),
    "--shuffle-caption": ("shuffle_caption", "shuffle the comma-separated tags of each caption per sample"),
    "--train-text-encoder": ("train_text_encoder", "adapt the text encoders too (their outputs are then not cached)"),
    "--train-convs": ("train_convs", "UNets: adapt the ResNet convolutions too (--conv-r/--conv-alpha)"),
    "--use-effective-conv2d": ("use_effective_conv2d", "with --train-convs: Tucker (CP) factors for k x k convolutions"),
    "--gradient-checkpointing": ("gradient_checkpointing", "recompute activations in backward (less memory)"),
}


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model with a LoHa adapter on local text or captioned images",
        description="Fine-tune a transformers model directory (or a model named by import path) with a LoHa "
        "adapter on local text; with --task text-to-image, a diffusers pipeline directory (SD 1.x/2.x, SDXL, FLUX.1, "
        "SD3/3.5) on a folder of captioned images, saving PEFT adapters and a kohya .safetensors that ComfyUI and A1111 load. Settings come from CONFIG (.yaml/.json/.toml, keys as in the flags with "
        "underscores, LoHa settings under 'loha') and/or flags; flags win. Multi-process (DDP; gloo on CPU): "
        "accelerate launch --multi_gpu --num_processes N -m lohakit train ... (accelerate needs --multi_gpu "
        "to start several processes, also on a CPU-only machine).",
    )
    p.add_argument("config", nargs="?", help="YAML/JSON/TOML file with the training settings")
    for flag, (dest, kw) in _TRAIN_FLAGS.items():
        p.add_argument(flag, dest=dest, default=None, **kw)
    p.add_argument("--cpu", dest="cpu", action="store_true", default=None, help="use the CPU even when a GPU is present")
    p.add_argument("--resume", dest="resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --output-dir (or from CHECKPOINT)")
    p.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                   help="replace lohakit's files in an existing --output-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--fsdp", dest="fsdp", action="store_true", default=None,
                   help="with several processes, shard the model with torch's FSDP2 (fully_shard) instead of DDP; "
                   "works on CPU (gloo), where accelerate's own FSDP plugin does not")
    img = p.add_argument_group("text-to-image (--task text-to-image)")
    for flag, (dest, kw) in _IMAGE_FLAGS.items():
        img.add_argument(flag, dest=dest, default=None, **kw)
    for flag, (dest, text) in _IMAGE_SWITCHES.items():
        img.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
    g = p.add_argument_group("LoHa adapter (override the config file's 'loha' section)")
    g.add_argument("-r", "--rank", dest="loha_r", type=int, metavar="R", help="rank of each Hadamard branch")
    g.add_argument("--alpha", dest="loha_alpha", type=float, metavar="ALPHA", help="scale numerator: ΔW is scaled by alpha / r")
    g.add_argument("--target-modules", dest="loha_target_modules", type=_target_list, metavar="MODULES",
                   help="comma-separated module names, 'all-linear', or a regex")
    g.add_argument("--loha", dest="loha_extra", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="any other LoHaConfig field (VALUE parsed as JSON), repeatable")
    p.set_defaults(func=_cmd_train)


def _train_config(args: argparse.Namespace) -> Any:
    from .train import TrainConfig, load_config_file

    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    source = f"config file {args.config!r}" if args.config else "train flags"
    for dest, _ in _TRAIN_FLAGS.values():
        if getattr(args, dest) is not None:
            data[dest] = getattr(args, dest)
    for dest in ("cpu", "resume", "overwrite", "progress", "fsdp"):
        if getattr(args, dest) is not None:
            data[dest] = getattr(args, dest)
    image_dests = [d for d, _ in _IMAGE_FLAGS.values()] + [d for d, _ in _IMAGE_SWITCHES.values()]
    given = [d for d in image_dests if getattr(args, d) is not None]
    if data.get("task") != "text-to-image" and given:
        flags = [f for f, (d, _) in {**_IMAGE_FLAGS, **_IMAGE_SWITCHES}.items() if d in given]
        raise ValueError(f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} only to --task text-to-image")
    for d in given:
        data[d] = getattr(args, d)
    if not isinstance(data.get("loha") or {}, dict):
        raise ValueError(f"{source}: 'loha' must be a mapping of LoHaConfig fields, got {data['loha']!r}")
    loha = dict(data.get("loha") or {})
    for key in ("r", "alpha", "target_modules"):
        v = getattr(args, f"loha_{key}")
        if v is not None:
            loha[key] = int(v) if key == "alpha" and float(v).is_integer() else v
    for k, v in args.loha_extra:
        loha[k] = v
    data["loha"] = loha
    if data.get("task") == "text-to-image":
        from .train_image import ImageTrainConfig

        return ImageTrainConfig.from_dict(data, source=source)
    return TrainConfig.from_dict(data, source=source)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainInterrupted, train

    cfg = _train_config(args)
    if cfg.task == "text-to-image":
        from .train_image import train_text_to_image as train  # type: ignore[assignment]
    try:
        result = train(cfg, echo=lambda line: print(line, flush=True))
    except TrainInterrupted as e:
        print(f"lohakit train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["rank"] == 0:
        parts = [f"step {result['step']}", f"train loss {result['train_loss']:.4f}"]
        if result.get("eval_loss") is not None:
            parts.append(f"eval loss {result['eval_loss']:.4f}")
        if result.get("eval_ppl") is not None:
            parts.append(f"eval ppl {result['eval_ppl']:.3f}")
        if result.get("eval_accuracy") is not None:
            parts.append(f"eval accuracy {result['eval_accuracy']:.3f}")
        where = f"kohya file {result['kohya_file']}, PEFT adapters in {result['output_dir']}" if result.get("kohya_file") else (
            f"adapter in {result['output_dir']}")
        print("done: " + ", ".join(parts) + f"; {where}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------
def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demos: a tiny Llama adapted to Python code, or (demo diffusion) a tiny diffusion model "
        "adapted to new digits",
        description="lohakit demo [language]: build a small byte-level Llama, pretrain it briefly on English prose shipped "
        "with Python (cached), adapt it with LoHa to Python source from the standard library, compare with PEFT LoRA "
        "at equal parameter count, then save and reload the adapter and check that the merged weights give the "
        "unmerged outputs (the merged model is checked in memory, not written). About a minute. "
        "lohakit demo diffusion: build a tiny Stable-Diffusion-shaped pipeline from configs, pretrain it on "
        "scikit-learn's bundled digits 0-6 through lohakit train --task text-to-image (cached), adapt it with LoHa to "
        "the digits 7-9 it never saw, judge generated images with a classifier before and after, compare with PEFT "
        "LoRA, check the kohya file reloads exactly and merged == unmerged, write a sample grid. A few minutes the "
        "first time. Both offline, on a CPU.",
    )
    p.add_argument("which", nargs="?", choices=["language", "diffusion"], default="language",
                   help="language (default): the Llama demo; diffusion: the text-to-image demo")
    p.add_argument("--cache-dir", help="where the pretrained base model is cached (default: $XDG_CACHE_HOME/lohakit or ~/.cache/lohakit)")
    p.add_argument("--output-dir", help="where the outputs go (default: <cache-dir>/demo-output or <cache-dir>/diffusion-demo-output, "
                   "-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for tests): same steps, less training")
    p.add_argument("--no-lora", action="store_true", help="skip the PEFT LoRA comparison")
    p.add_argument("--rebuild-base", action="store_true", help="pretrain the base model again even when cached")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: fastest at the demo's sizes, on a busy machine by far; 0 keeps torch's default)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.which == "diffusion":
        import dataclasses
        from pathlib import Path

        from .demo_diffusion import DiffusionDemoSettings, run_diffusion_demo

        settings = DiffusionDemoSettings.quick() if args.quick else DiffusionDemoSettings()
        run_diffusion_demo(
            dataclasses.replace(settings, seed=args.seed), Path(args.output_dir) if args.output_dir else None,
            Path(args.cache_dir) if args.cache_dir else None, lambda line: print(line, flush=True),
            with_lora=not args.no_lora, rebuild_base=args.rebuild_base, threads=args.threads or None,
        )
        return EXIT_OK
    from .demo import run_demo

    run_demo(
        cache_dir=args.cache_dir, output_dir=args.output_dir, quick=args.quick, with_lora=not args.no_lora,
        rebuild_base=args.rebuild_base, seed=args.seed, threads=args.threads or None,
    )
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# inspect / convert / merge
# ------------------------------------------------------------------------------------------
def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-module table of a LoHa adapter (PEFT directory or kohya .safetensors)",
        description="Print one row per adapted module: type, ΔW shape, rank, alpha, scale, parameters, "
        "‖ΔW‖_F (computed through the factored form, never building ΔW), Tucker or not, dtype; then totals.",
    )
    p.add_argument("path", help="a PEFT adapter directory or a kohya/LyCORIS .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable JSON instead of the table")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_table, inspect_adapter

    report = inspect_adapter(args.path)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return EXIT_OK


def _add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between PEFT directories and kohya files, or export an exact/compressed LoRA",
        description="Convert a LoHa adapter: --to peft (kohya file -> PEFT directory), --to kohya (PEFT "
        "directory -> kohya/LyCORIS .safetensors), --to lora (exact LoRA of rank r1*r2, or compressed with --rank).",
    )
    p.add_argument("src", metavar="IN", help="PEFT adapter directory or kohya .safetensors file")
    p.add_argument("dst", metavar="OUT", help="output directory (peft, lora) or .safetensors file (kohya)")
    p.add_argument("--to", required=True, choices=["peft", "kohya", "lora"], help="target format")
    p.add_argument("--rank", type=int, help="--to lora: compress to this rank (default: exact, rank r1*r2)")
    p.add_argument("--base", help="model directory (transformers model, diffusers model or pipeline directory): needed "
                   "for --to peft (file names are matched against its modules); --to lora: conv kernels; --to kohya: names")
    p.add_argument("--prefix", default=None, help="kohya prefix of the model: lora_unet, lora_te, lora_te1, ... "
                   "(default: lora_unet for diffusion models; a language-model adapter needs it given)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    print(convert(args.src, args.dst, to=args.to, rank=args.rank, overwrite=args.overwrite, base=args.base, prefix=args.prefix))
    return EXIT_OK


def _add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge an adapter into a transformers model and write the merged model directory",
        description="Load the base model directory, apply the adapter, merge W += ΔW and write a "
        "transformers model directory (safetensors, sharded) that AutoModel.from_pretrained loads.",
    )
    p.add_argument("--base", required=True, help="transformers model directory")
    p.add_argument("--adapter", required=True, help="PEFT LoHa adapter directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_to_dir

    info = merge_to_dir(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"merged {info['merged_modules']} modules; wrote {info['out']} ({info['files']} weight file(s))")
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
_SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "train": _add_train,
    "demo": _add_demo,
    "inspect": _add_inspect,
    "convert": _add_convert,
    "merge": _add_merge,
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="lohakit", description="LoHa adapters for PyTorch models: train, demo, inspect, convert, merge.")
    parser.add_argument("--version", action="version", version=f"lohakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS.values():
        add(sub)
    return parser


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Offline, no advisory warnings or progress bars from transformers/accelerate; restored on exit.

    Restoring matters when :func:`main` is called in-process (tests, notebooks).
    """
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # the last one: transformers' "Loading weights" bar
    added = [k for k in env if k not in os.environ]
    for k in added:
        os.environ[k] = env[k]
    loggers = {name: logging.getLogger(name).level for name in ("transformers", "accelerate", "huggingface_hub")}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_state = None
    if "transformers" in sys.modules:  # imported before main() ran: the env vars come too late
        from transformers.utils import logging as hf_logging

        hf_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        if hf_state is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(hf_state[0])
            (hf_logging.enable_progress_bar if hf_state[1] else hf_logging.disable_progress_bar)()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lohakit`` command; return the exit code (0 ok, 2 bad usage/input, 130 interrupted, 1 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _quiet_libraries(), _one_line_warnings(debug):
        return _main(argv, debug)


@contextlib.contextmanager
def _one_line_warnings(debug: bool) -> Iterator[None]:
    """Warnings as ``lohakit: warning: <message>``, one line each (no source excerpt; --debug keeps Python's form)."""
    import warnings

    old = warnings.formatwarning
    if not debug:
        warnings.formatwarning = lambda message, category, *a, **k: f"lohakit: warning: {' '.join(str(message).split())}\n"
    try:
        yield
    finally:
        warnings.formatwarning = old


def _main(argv: list[str], debug: bool) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    except BrokenPipeError:  # `lohakit inspect ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except SystemExit as e:  # --help / --version
        return int(e.code) if isinstance(e.code, int) else EXIT_OK
    except _UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print("lohakit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if debug:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lohakit: error: {' '.join(msg.split())}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the last line of defence of a command-line tool
        if debug:
            raise
        print(f"lohakit: internal error: {type(e).__name__}: {' '.join(str(e).split())} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
