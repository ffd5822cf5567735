"""``lohakit train --task text-to-image``: fine-tune a diffusers pipeline with LoHa on captioned images.

One function, :func:`train_text_to_image`, driven by an :class:`ImageTrainConfig` (flags or a
YAML/JSON/TOML file). ``model`` is a diffusers pipeline directory (``model_index.json``) of a
family lohakit knows (SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5); ``data`` an image folder
(:mod:`lohakit.app.imagedata`: same-name caption files, kohya ``N_name`` repeat folders or a
``metadata.jsonl``). The objective comes from the pipeline (:mod:`lohakit.app.objectives`).

* Images go into aspect-ratio buckets around ``resolution``; every global batch is one bucket.
  The batch order, flips, caption shuffles and every noise draw are pure functions of
  ``(seed, step, micro-step, position in the global batch)``: ``--resume`` continues exactly and
  N processes with batch B train like one process with batch N·B.
* VAE latents (posterior mean and std) and text-encoder outputs are cached as safetensors under
  ``cache_dir``, keyed by the image file's bytes, the bucket, the flip and the VAE's fingerprint
  (texts: the caption and the text encoders' fingerprint); text outputs are not cached with
  ``train_text_encoder``.
* The loop runs on accelerate (device, mixed precision, processes); gradients of the adapter are
  all-reduced by hand (the denoiser stays the pipeline's own module, so its pipeline samples it).

Outputs in ``output_dir``::

    unet/ or transformer/        the denoiser's adapter, PEFT format
    text_encoder*/               with train_text_encoder
    <output_name>.safetensors    the kohya/LyCORIS file (fp16 by default, ss_* metadata)
    checkpoint-<step>/           the same plus optimizer.safetensors, trainer_state.json
    samples/step-<N>.png         one grid per sampling (rows: prompts)
    metrics.jsonl, loss_curve.png, train_config.json

Every check on the inputs runs before anything is written: a bad input leaves ``output_dir``
as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..core.config import LoHaConfig
from ..core.io import load_state_dict, save_state_dict
from ..core.model import LoHaModel, inject_adapter_in_model
from .imagedata import ImageBatches, cover_and_crop, load_pixels, make_buckets, process_caption, scan_images, tag_frequencies
from .objectives import FAMILY_DEFAULT_TARGETS, TEXT_ENCODER_TARGETS, TIMESTEP_SAMPLING, UNET_CONV_TARGETS, Objective, objective_for
from .runs import (
    atomic_write_text, check_fields, config_from_dict, default_cache_dir, find_last_checkpoint, interrupt_flag, is_checkpoint_name, is_int,
    is_num, metrics_log, progress_bar, read_trainer_state, resolve_resume,
)
from .train import (
    MIXED_PRECISION, SCHEDULERS, TrainInterrupted, _jsonable, _lr_lambda, _make_accelerator, _optimizer_from_files,
    _optimizer_to_files, _params_digest, _plot, _rng_state, _set_rng_state, base_fingerprint,
)

logger = logging.getLogger(__name__)

__all__ = ["ImageTrainConfig", "train_text_to_image", "read_pipeline_dir", "PipelineInfo"]

ADAPTERS = ("loha", "lora")
#: Largest --resolution accepted (FLUX.1 and SDXL train at 1024-2048).
MAX_RESOLUTION = 8192
OPTIMIZERS = ("adamw", "adamw8bit")
MISSING_CAPTION = ("warn", "error", "empty", "folder")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Pipeline classes of each family (model_index.json's ``_class_name``).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}


@dataclass
class ImageTrainConfig:
    """Everything ``lohakit train --task text-to-image`` needs (config-file keys; flags use dashes).

    Args:
        model: A diffusers pipeline directory (``model_index.json``).
        data: The image folder.
        output_dir: Where adapters, the kohya file, checkpoints, samples and metrics go.
        loha: LoHaConfig fields (``r``, ``alpha``, ``target_modules``...); default targets per family.
        adapter: ``loha``, or ``lora`` (PEFT LoRA from ``lora``'s LoraConfig fields; for comparisons).
        full_finetune: Train every denoiser weight instead of an adapter and save the pipeline
            (used to build bases, e.g. the demo's).
        resolution: Bucket area ≈ resolution²; a multiple of the family's side factor.
        caption_ext, missing_caption, skip_bad_images: How the folder is read.
        random_flip, shuffle_caption, keep_tokens, caption_dropout: Augmentations.
        train_text_encoder: Adapt the text encoders too (their outputs are then not cached).
        train_convs, conv_r, conv_alpha, use_effective_conv2d: UNet ResNet convolutions too.
        cache_dir: Where cached latents/text outputs go (default ``<lohakit cache>/image-cache``).
        min_snr_gamma, noise_offset: UNet objectives; timestep_sampling, guidance_scale,
            max_sequence_length: the DiTs'.
        ema_decay: EMA of the adapter weights (0: off); saved outputs carry the EMA weights.
        optimizer: ``adamw`` or ``adamw8bit`` (bitsandbytes).
        sample_prompts, sample_every, sample_steps, sample_seed: Sample grids.
        save_dtype: Dtype of the kohya file (fp16, bf16, fp32).
    """

    model: str | None = None
    data: str | None = None
    output_dir: str | None = None
    task: str = "text-to-image"
    loha: dict[str, Any] = field(default_factory=dict)
    adapter: str = "loha"
    lora: dict[str, Any] = field(default_factory=dict)
    full_finetune: bool = False
    resolution: int = 512
    caption_ext: str = ".txt"
    missing_caption: str = "warn"
    skip_bad_images: bool = False
    random_flip: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    train_convs: bool = False
    conv_r: int | None = None
    conv_alpha: float | None = None
    use_effective_conv2d: bool = False
    cache_dir: str | None = None
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    ema_decay: float = 0.0
    gradient_checkpointing: bool = False
    save_every: int = 500
    sample_prompts: str | None = None
    sample_every: int = 0
    sample_steps: int = 20
    sample_seed: int = 0
    output_name: str = "loha"
    save_dtype: str = "fp16"
    seed: int = 0
    mixed_precision: str = "auto"
    cpu: bool = False
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> "ImageTrainConfig":
        """Build from a mapping; an unknown key raises ``ValueError`` listing the valid keys."""
        return config_from_dict(cls, data, source, context=" for task text-to-image")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "train config") -> None:
        """Raise ``ValueError`` naming the field when a value is missing or out of range."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{source}: '{name}' is required")
        pos_int = (lambda v: is_int(v) and v >= 1, "an int >= 1")
        nonneg_int = (lambda v: is_int(v) and v >= 0, "an int >= 0")
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "task": (lambda v: v == "text-to-image", "'text-to-image'"),
            "adapter": (lambda v: v in ADAPTERS, f"one of {list(ADAPTERS)}"),
            "optimizer": (lambda v: v in OPTIMIZERS, f"one of {list(OPTIMIZERS)}"),
            "lr_scheduler": (lambda v: v in SCHEDULERS, f"one of {list(SCHEDULERS)}"),
            "mixed_precision": (lambda v: v in MIXED_PRECISION, f"one of {list(MIXED_PRECISION)}"),
            "missing_caption": (lambda v: v in MISSING_CAPTION, f"one of {list(MISSING_CAPTION)}"),
            "timestep_sampling": (lambda v: v is None or v in TIMESTEP_SAMPLING, f"one of {list(TIMESTEP_SAMPLING)} or null"),
            "save_dtype": (lambda v: v in SAVE_DTYPES, f"one of {list(SAVE_DTYPES)}"),
            "resolution": (lambda v: is_int(v) and 1 <= v <= MAX_RESOLUTION, f"an int in [1, {MAX_RESOLUTION}]"),
            "batch_size": pos_int, "grad_accum": pos_int, "max_steps": pos_int,
            "sample_steps": pos_int, "warmup_steps": nonneg_int, "save_every": nonneg_int,
            "sample_every": nonneg_int, "keep_tokens": nonneg_int,
            "seed": (is_int, "an int"), "sample_seed": (is_int, "an int"),
            "lr": (lambda v: is_num(v) and v > 0, "a positive number"),
            "text_encoder_lr": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null"),
            "weight_decay": (lambda v: is_num(v) and v >= 0, "a number >= 0"),
            "max_grad_norm": (lambda v: is_num(v) and v >= 0, "a number >= 0 (0: no clipping)"),
            "caption_dropout": (lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
            "noise_offset": (lambda v: is_num(v) and v >= 0, "a number >= 0"),
            "min_snr_gamma": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null"),
            "ema_decay": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1) (0: no EMA)"),
            "guidance_scale": (lambda v: v is None or is_num(v), "a number or null"),
            "max_sequence_length": (lambda v: v is None or (is_int(v) and 1 <= v <= 512), "an int in [1, 512] (T5's limit in these pipelines) or null"),
            "caption_ext": (lambda v: isinstance(v, str) and v.strip(".") != "" and "/" not in v, "a file suffix such as .txt"),
            "cache_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a directory path or null"),
            "sample_prompts": (lambda v: v is None or (isinstance(v, str) and v != ""), "a file path or null"),
            "model": (lambda v: isinstance(v, str), "a pipeline directory path"),
            "data": (lambda v: isinstance(v, str), "an image folder path"),
            "output_dir": (lambda v: isinstance(v, str), "a directory path"),
            "conv_r": (lambda v: v is None or (is_int(v) and v >= 1), "an int >= 1 or null"),
            "conv_alpha": (lambda v: v is None or is_num(v), "a number or null"),
            "loha": (lambda v: isinstance(v, dict), "a mapping of LoHaConfig fields"),
            "lora": (lambda v: isinstance(v, dict), "a mapping of peft LoraConfig fields"),
            "resume": (lambda v: isinstance(v, (bool, str)), "true/false or a checkpoint directory"),
            "output_name": (lambda v: isinstance(v, str) and v and "/" not in v and "\\" not in v and not v.startswith("."),
                            "a plain file name without .safetensors"),
        }
        for name in ("full_finetune", "skip_bad_images", "random_flip", "shuffle_caption", "train_text_encoder",
                     "train_convs", "use_effective_conv2d", "gradient_checkpointing", "cpu", "overwrite", "progress"):
            checks[name] = (lambda v: isinstance(v, bool), "true or false")
        check_fields(self, checks, source)
        if self.full_finetune and self.resume:
            raise ValueError(f"{source}: 'full_finetune' runs cannot resume (they write no checkpoints)")
        if self.full_finetune and self.train_text_encoder:
            raise ValueError(f"{source}: 'full_finetune' trains the denoiser only; drop 'train_text_encoder'")
        needs = {"conv_r": "train_convs", "conv_alpha": "train_convs", "use_effective_conv2d": "train_convs",
                 "text_encoder_lr": "train_text_encoder"}
        for name, switch in needs.items():
            if getattr(self, name) not in (None, False) and not getattr(self, switch):
                raise ValueError(f"{source}: '{name}' only applies with '{switch}' (--{switch.replace('_', '-')})")
        if self.adapter == "lora" and self.train_convs:
            raise ValueError(f"{source}: 'train_convs' is LoHa's (conv_r/conv_alpha); adapter 'lora' trains the linear targets only")


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
#: Components each family's training needs (SD3 may drop its T5, text_encoder_3, as diffusers allows).
REQUIRED_COMPONENTS = {
    "sd": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "flux": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd3": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}


@dataclass(frozen=True)
class PipelineInfo:
    """What ``model_index.json`` says: the pipeline class, its family and its components."""

    path: Path
    class_name: str
    family: str
    components: dict[str, tuple[str, str]]


def read_pipeline_dir(model: str) -> PipelineInfo:
    """Check a diffusers pipeline directory before loading it.

    Raises:
        FileNotFoundError: no directory or no ``model_index.json``.
        ValueError: a pipeline class of no known family, or a component folder missing.
    """
    d = Path(model)
    index = d / "model_index.json"
    if not d.is_dir():
        raise FileNotFoundError(f"--model {model!r}: not a directory (expected a diffusers pipeline directory with model_index.json)")
    if not index.is_file():
        raise FileNotFoundError(f"--model {model!r}: no model_index.json (expected a diffusers pipeline directory saved by save_pretrained)")
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{index}: cannot be read as JSON ({e})") from None
    cls = raw.get("_class_name") if isinstance(raw, dict) else None
    if not isinstance(cls, str) or cls not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{index}: pipeline class {cls!r} is of no family lohakit trains; known: {sorted(PIPELINE_FAMILIES)}"
        )
    comps: dict[str, tuple[str, str]] = {}
    for name, v in raw.items():
        if name.startswith("_") or not isinstance(v, list) or len(v) != 2 or v[0] is None:
            continue
        if not (d / name).is_dir():
            raise ValueError(f"--model {model!r}: component {name!r} ({v[1]}) is listed in model_index.json but {d / name} is missing")
        comps[name] = (str(v[0]), str(v[1]))
    for need in REQUIRED_COMPONENTS[PIPELINE_FAMILIES[cls]]:
        if need not in comps:
            raise ValueError(f"--model {model!r}: model_index.json has no {need!r} component (a {cls} needs one)")
    return PipelineInfo(d, cls, PIPELINE_FAMILIES[cls], comps)


def _check_family_options(cfg: ImageTrainConfig, info: PipelineInfo) -> None:
    """Options of one family's objective given for another: refused, naming the option."""
    unet = info.family in ("sd", "sdxl")
    wrong = {
        "min_snr_gamma": (cfg.min_snr_gamma is not None and not unet, "the UNet families (SD 1.x/2.x, SDXL)"),
        "noise_offset": (bool(cfg.noise_offset) and not unet, "the UNet families (SD 1.x/2.x, SDXL)"),
        "timestep_sampling": (cfg.timestep_sampling is not None and unet, "the flow-matching families (FLUX.1, SD3)"),
        "max_sequence_length": (cfg.max_sequence_length is not None and unet, "the T5 families (FLUX.1, SD3)"),
        "guidance_scale": (cfg.guidance_scale is not None and info.family != "flux", "FLUX.1 (guidance-distilled)"),
    }
    for name, (bad, where) in wrong.items():
        if bad:
            raise ValueError(f"--{name.replace('_', '-')} applies to {where}, not to {info.class_name}")


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line (``#`` starts a comment line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--sample-prompts {path!r}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"--sample-prompts {path!r}: cannot be read as UTF-8 text ({e})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--sample-prompts {path!r}: no prompts (one per line)")
    return prompts


def _load_pipeline(info: PipelineInfo) -> Any:
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:  # pragma: no cover
        raise ImportError("lohakit train --task text-to-image needs diffusers: pip install 'lohakit[diffusers]'") from e
    import diffusers.utils.logging as dlog

    was, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        kw = {"safety_checker": None, "requires_safety_checker": False} if info.family == "sd" else {}
        return DiffusionPipeline.from_pretrained(str(info.path), **kw).to(torch.float32)
    except Exception as e:  # noqa: BLE001 - a broken component (tokenizer, config) fails in many ways
        raise ValueError(f"--model {str(info.path)!r}: the pipeline cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    finally:
        dlog.set_verbosity(was)
        if bars:
            dlog.enable_progress_bar()


def _text_encoders(pipe: Any) -> dict[str, nn.Module]:
    return {n: m for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if isinstance(m := getattr(pipe, n, None), nn.Module)}


def _fingerprint(modules: Sequence[nn.Module]) -> str:
    return hashlib.sha256("|".join(base_fingerprint(m) for m in modules).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------
def _module_paths(model: nn.Module, names: Sequence[str], kinds: tuple[type, ...]) -> list[str]:
    """Paths of modules of ``kinds`` whose dotted path ends with one of ``names``."""
    return [p for p, m in model.named_modules() if isinstance(m, kinds) and any(p == n or p.endswith("." + n) for n in names)]


def _denoiser_loha_config(cfg: ImageTrainConfig, family: str, denoiser: nn.Module) -> LoHaConfig:
    loha = {"r": 8, "alpha": 8, **cfg.loha}
    if "target_modules" not in cfg.loha:
        loha["target_modules"] = list(FAMILY_DEFAULT_TARGETS[family])
    if cfg.train_convs:
        if family not in ("sd", "sdxl"):
            raise ValueError(f"--train-convs: the {family} transformer has no ResNet convolutions (UNet families only)")
        convs = _module_paths(denoiser, UNET_CONV_TARGETS, (nn.Conv2d,))
        targets = loha["target_modules"]
        if isinstance(targets, str):
            raise ValueError("--train-convs cannot extend a regex target_modules; list the conv names in it instead")
        loha["target_modules"] = list(targets) + [c for c in convs if c not in targets]
        conv_r = cfg.conv_r or int(loha["r"])
        conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else conv_r
        loha["rank_pattern"] = {**{f"^{c}$".replace(".", r"\."): conv_r for c in convs}, **loha.get("rank_pattern", {})}
        loha["alpha_pattern"] = {**{f"^{c}$".replace(".", r"\."): conv_alpha for c in convs}, **loha.get("alpha_pattern", {})}
        loha["use_effective_conv2d"] = cfg.use_effective_conv2d
    return LoHaConfig.from_dict(loha, source="train config 'loha'")


def _text_loha_config(cfg: ImageTrainConfig) -> LoHaConfig:
    loha = {"r": 8, "alpha": 8, **{k: v for k, v in cfg.loha.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}}
    loha["target_modules"] = list(TEXT_ENCODER_TARGETS)
    return LoHaConfig.from_dict(loha, source="train config 'loha' (text encoders)")


def _inject(cfg: ImageTrainConfig, info: PipelineInfo, pipe: Any, denoiser: nn.Module) -> dict[str, nn.Module]:
    """Add the adapter to the models that train; return ``{component: model}``."""
    trained = {info_component(info): denoiser}
    if cfg.train_text_encoder:
        trained.update(_text_encoders(pipe))
    for m in trained.values():
        m.requires_grad_(False)
    if cfg.full_finetune:
        denoiser.requires_grad_(True)
        return trained
    if cfg.adapter == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model as peft_inject
        except ImportError as e:
            raise ImportError("adapter 'lora' needs peft: pip install peft") from e
        lora = {"r": 8, "lora_alpha": 8, "target_modules": list(FAMILY_DEFAULT_TARGETS[info.family]), **cfg.lora}
        for name, m in trained.items():
            kw = lora if name == info_component(info) else {**lora, "target_modules": list(TEXT_ENCODER_TARGETS)}
            peft_inject(LoraConfig(**kw), m)
        return trained
    for name, m in trained.items():
        conf = _denoiser_loha_config(cfg, info.family, m) if name == info_component(info) else _text_loha_config(cfg)
        inject_adapter_in_model(conf, m)
    return trained


def info_component(info: PipelineInfo) -> str:
    """The pipeline attribute of the denoiser: ``unet`` or ``transformer``."""
    return "unet" if info.family in ("sd", "sdxl") else "transformer"


# ------------------------------------------------------------------------------------------
# Caches
# ------------------------------------------------------------------------------------------
class _DiskCache:
    """safetensors entries under ``root/kind/<key>.safetensors``; counts hits and misses."""

    def __init__(self, root: Path | None, kind: str) -> None:
        self.dir = root / kind if root is not None else None
        self.hits = self.misses = 0
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        path = self.dir / f"{key}.safetensors" if self.dir is not None else None
        entry = None
        if path is not None and path.is_file():
            try:
                entry = load_state_dict(path)
                self.hits += 1
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
                entry = None
        if entry is None:
            entry = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
            self.misses += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_state_dict(entry, path)
        self.memory[key] = entry
        return entry


def _tokenizer_digest(pipeline_dir: Path) -> str:
    """sha256 over the pipeline's tokenizer files (a changed vocabulary changes every text entry)."""
    h = hashlib.sha256()
    for d in sorted(pipeline_dir.glob("tokenizer*")):
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            h.update(f.relative_to(pipeline_dir).as_posix().encode())
            h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def _offload(pipe: Any, dev: torch.device, vae: bool, text: bool) -> None:
    """Move the VAE / frozen text encoders to the CPU while training on an accelerator (no-op on CPU)."""
    if torch.device(dev).type == "cpu":
        return
    if vae:
        pipe.vae.to("cpu")
    if text:
        for m in _text_encoders(pipe).values():
            m.to("cpu")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
_TOP_FILES = ("metrics.jsonl", "loss_curve.png", "train_config.json")


def _clear_artefacts(out: Path, cfg: ImageTrainConfig) -> None:
    """``--overwrite``: remove only what this trainer writes."""
    names = set(_TOP_FILES) | {f"{cfg.output_name}.safetensors", "samples", "pipeline",
                               "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    for p in out.iterdir():
        if is_checkpoint_name(p.name) or p.name in names:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _image_grid(images: list[Any], rows: int) -> Any:
    cols = max(1, math.ceil(len(images) / rows))
    w, h = images[0].size
    from PIL import Image

    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def train_text_to_image(
    cfg: ImageTrainConfig, should_stop: Callable[[int], bool] | None = None, echo: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train an adapter of a diffusers pipeline on an image folder as ``cfg`` says; return a summary.

    Args:
        cfg: The configuration (validated here).
        should_stop: Called after every optimiser step; True acts like Ctrl-C (checkpoint, then
            :class:`~lohakit.app.train.TrainInterrupted`).
        echo: Where the main process's report lines go (banner, cache, resume); default: the logger.

    Returns:
        ``{"step", "train_loss", "output_dir", "kohya_file", "adapters" ({component: dir}),
        "pipeline_dir" (full_finetune), "trainable_params", "total_params", "checkpoint",
        "cache" ({"latents": (reused, computed), "text": (...)}), "family", "rank", "world_size"}``.

    Raises:
        ValueError / FileNotFoundError / FileExistsError / ImageDataError: bad input, before
            anything is written.
        TrainInterrupted: after saving a checkpoint on SIGINT or ``should_stop``.
    """
    cfg.validate()
    say = echo if echo is not None else logger.info
    out = Path(cfg.output_dir)  # type: ignore[arg-type]
    # ---------------------------------------------------------------- every input, before any write
    info = read_pipeline_dir(cfg.model)  # type: ignore[arg-type]
    prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
    items, scan = scan_images(cfg.data, caption_ext=cfg.caption_ext, missing_caption=cfg.missing_caption,
                              skip_bad_images=cfg.skip_bad_images)
    data_dir, out_abs = Path(cfg.data).resolve(), out.resolve()  # type: ignore[arg-type]
    if out_abs == data_dir or data_dir in out_abs.parents:
        raise ValueError(f"--output-dir {str(out)!r} is inside the image folder {cfg.data!r}: the next run would train on "
                         "its outputs; choose a directory outside it")
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {cfg.cache_dir!r} exists and is not a directory")
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (torch has no fp16 autocast with loss scaling on the CPU); "
                         "use bf16 or no")
    resume_dir = resolve_resume(cfg.resume, out)
    if resume_dir is None:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"output directory {str(out)!r} exists and is a file")
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise FileExistsError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite to replace it or --resume to continue")
    state = _read_state(resume_dir, cfg) if resume_dir is not None else None
    _check_family_options(cfg, info)
    pipe = _load_pipeline(info)
    component = info_component(info)
    denoiser: nn.Module = getattr(pipe, component)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        if not 0 < int(getattr(tok, "model_max_length", 0) or 0) <= 1_000_000 or len(tok) == 0:
            raise ValueError(f"--model {cfg.model!r}: {name}/ holds no usable tokenizer (model_max_length "
                             f"{getattr(tok, 'model_max_length', None)!r}, {len(tok)} tokens); expected the files its "
                             "save_pretrained writes")
    vcfg = pipe.vae.config
    for key in ("scaling_factor", "shift_factor"):
        v = getattr(vcfg, key, None)
        if not (v is None and key == "shift_factor") and not is_num(v):
            raise ValueError(f"{info.path / 'vae' / 'config.json'}: {key} must be a number, got {v!r}")
    objective = objective_for(
        pipe, info.family, min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset,
        timestep_sampling=cfg.timestep_sampling or "logit_normal", guidance_scale=cfg.guidance_scale,
        max_sequence_length=cfg.max_sequence_length,
    )
    if cfg.guidance_scale is not None and not getattr(denoiser.config, "guidance_embeds", False):
        raise ValueError(f"--guidance-scale: {cfg.model!r}'s transformer has no guidance input (guidance_embeds false: FLUX.1-schnell)")
    if cfg.resolution % objective.factor:
        raise ValueError(
            f"--resolution {cfg.resolution} does not fit {info.class_name}: image sides must be multiples of "
            f"{objective.factor} (VAE factor x patch); try {max(objective.factor, cfg.resolution // objective.factor * objective.factor)}"
        )
    f = objective.factor
    step = max(f, min(64, cfg.resolution // 8) // f * f)  # kohya's 64 from 512 up
    buckets = make_buckets(cfg.resolution, f, step=step if cfg.resolution % step == 0 else f)
    batches = ImageBatches(items, buckets, seed=cfg.seed, random_flip=cfg.random_flip)
    item_buckets = batches.item_buckets
    cap = getattr(denoiser.config, "pos_embed_max_size", None)  # SD3: positions exist for a cap x cap patch grid
    if cap and max(max(b) for b in set(item_buckets)) // f > cap:
        raise ValueError(f"--resolution {cfg.resolution}: a bucket of {max(set(item_buckets), key=max)} needs more than the "
                         f"{cap} x {cap} patch positions of {info.class_name}'s transformer (pos_embed_max_size): every bucket "
                         f"side must be at most {cap * f} pixels; lower --resolution")
    fingerprint = _fingerprint([denoiser, *_text_encoders(pipe).values()])
    if state is not None and state.get("base_fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {str(resume_dir)!r} was trained on another base pipeline "
                         f"(fingerprint {state.get('base_fingerprint')}; {cfg.model!r} has {fingerprint})")
    torch.manual_seed(cfg.seed)
    trained = _inject(cfg, info, pipe, denoiser)
    if resume_dir is not None:
        _load_adapter_tensors(resume_dir, trained)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name, m in trained.items():
            if name != component and hasattr(m, "gradient_checkpointing_enable"):
                m.gradient_checkpointing_enable()

    # ---------------------------------------------------------------- processes, device
    acc = _make_accelerator(cfg, find_unused=False)  # type: ignore[arg-type]
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    dev = acc.device
    # frozen weights in the mixed-precision dtype (the VAE stays float32: SDXL's overflows in fp16); adapter float32
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision), torch.float32)
    pipe.to(dev)
    if weight_dtype != torch.float32:
        for m in [*trained.values(), *_text_encoders(pipe).values()]:
            nn.Module.to(m, weight_dtype)  # torch's own .to: diffusers' override only adds a warning here
    for p in (p for m in trained.values() for p in m.parameters() if p.requires_grad):
        p.data = p.data.float()
    pipe.set_progress_bar_config(disable=True)
    global_batch = cfg.batch_size * world
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for m in trained.values() for p in m.parameters())
    groups = [{"params": [p for p in trained[component].parameters() if p.requires_grad], "lr": cfg.lr}]
    te_params = [p for n, m in trained.items() if n != component for p in m.parameters() if p.requires_grad]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.lr})
    optimizer = _make_optimizer(cfg, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps))
    start_step = 0
    ema: list[torch.Tensor] | None = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else None
    if state is not None:
        optimizer.load_state_dict(_optimizer_from_files(load_state_dict(resume_dir / "optimizer.safetensors"), state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        rngs = state.get("rng", [])
        if rank < len(rngs):  # only dropout draws from the global generators; every other draw is seeded per sample
            _set_rng_state(rngs[rank])
        if ema is not None:
            saved = load_state_dict(resume_dir / "ema.safetensors") if (resume_dir / "ema.safetensors").is_file() else {}
            ema = [saved.get(str(i), e).to(e.device, e.dtype) for i, e in enumerate(ema)]
        if state.get("world_size", world) * state.get("batch_size", cfg.batch_size) != global_batch:
            logger.warning("resuming with another global batch (%s) than the checkpoint's: the data order changes", global_batch)
    optimizer = acc.prepare(optimizer)
    if state is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])  # fp16: the loss scale goes on where it was

    # ---------------------------------------------------------------- caches
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "image-cache"
    vae_fp = _fingerprint([pipe.vae])
    text_fp = "|".join([info.family, _fingerprint(list(_text_encoders(pipe).values())), _tokenizer_digest(info.path),
                        str(cfg.max_sequence_length)])
    latent_cache = _DiskCache(cache_root, "latents")
    text_cache = None if cfg.train_text_encoder else _DiskCache(cache_root, "text")
    digests = {i: _file_digest(it.path) for i, it in enumerate(items)}
    # only the captions as written (and "" for caption dropout) are cached: shuffled ones are encoded per step
    cacheable = {it.caption for it in items} | ({""} if cfg.caption_dropout > 0 else set())

    def latent_moments(i: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        bw, bh = item_buckets[i]
        key = hashlib.sha256(f"{digests[i]}|{vae_fp}|{bw}x{bh}|{int(flip)}".encode()).hexdigest()[:32]

        def compute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                mean, std = objective.latent_moments(load_pixels(items[i].path, (bw, bh), flip)[None])
            return {"mean": mean[0], "std": std[0]}

        e = latent_cache.get(key, compute)
        return e["mean"], e["std"]

    def encode_one(c: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # float32, outside autocast: a cached entry does not depend on the run's precision
            return {k: v[0].float() for k, v in objective.encode_prompts([c], dev).items()}

    def text_cond(captions: list[str]) -> dict[str, torch.Tensor]:
        if text_cache is None:  # the text encoders train: encoded with grad, every step
            return objective.encode_prompts(captions, dev)
        parts = [text_cache.get(hashlib.sha256(f"{c}|{text_fp}".encode()).hexdigest()[:32], lambda c=c: encode_one(c))
                 if c in cacheable else encode_one(c) for c in captions]
        return {k: torch.stack([p[k] for p in parts]).to(dev) for k in parts[0]}

    if main:  # the main process fills the cache; the others then read it
        for i in range(len(items)):
            latent_moments(i, False)
            if cfg.random_flip:
                latent_moments(i, True)
        if text_cache is not None:
            for c in sorted(cacheable):
                text_cond([c])
    acc.wait_for_everyone()
    text_on_the_fly = text_cache is None or cfg.shuffle_caption
    _offload(pipe, dev, vae=True, text=not text_on_the_fly)  # accelerators: frozen parts no step needs go to the CPU

    created = not out.exists()
    try:
        if main:
            if resume_dir is None and out.is_dir() and cfg.overwrite:
                _clear_artefacts(out, cfg)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
        acc.wait_for_everyone()
        metrics, log = metrics_log(out, start_step, main)

        def ema_swap() -> None:
            """Exchange the live weights with the EMA copy (twice = back)."""
            if ema is not None:
                with torch.no_grad():
                    for p, e in zip(params, ema):
                        tmp = p.detach().clone()
                        p.copy_(e)
                        e.copy_(tmp)

        def sample(step: int) -> None:
            if not (main and prompts):
                return
            ema_swap()
            pipe.to(dev)  # the parts offloaded after caching come back for the pipeline's own call
            for m in trained.values():
                m.eval()
            try:
                imgs = []
                for k, prompt in enumerate(prompts):
                    g = torch.Generator(device="cpu").manual_seed(cfg.sample_seed + k)
                    kw: dict[str, Any] = {"num_inference_steps": cfg.sample_steps, "generator": g,
                                          "height": cfg.resolution, "width": cfg.resolution}
                    if info.family in ("flux", "sd3") and cfg.max_sequence_length:
                        kw["max_sequence_length"] = cfg.max_sequence_length
                    with torch.no_grad():
                        imgs.append(pipe(prompt=prompt, **kw).images[0])
                (out / "samples").mkdir(exist_ok=True)
                _image_grid(imgs, rows=len(imgs)).save(out / "samples" / f"step-{step:06d}.png")
            finally:
                for m in trained.values():
                    m.train()
                _offload(pipe, dev, vae=True, text=not text_on_the_fly)
                ema_swap()

        def write_outputs(where: Path, step: int) -> dict[str, Any]:
            """The adapter(s) in PEFT format and the kohya file (EMA weights when on)."""
            ema_swap()
            try:
                return _write_adapter_outputs(where, cfg, info, pipe, trained, step, items, buckets,
                                              str(acc.mixed_precision))
            finally:
                ema_swap()

        def save_checkpoint(step: int, reason: str) -> Path:
            rng, digest = [_rng_state()], [_params_digest(params)]
            if world > 1:
                from accelerate.utils import gather_object

                rng, digest = gather_object(rng), gather_object(digest)
            final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
            if main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                write_outputs(tmp, step)
                save_state_dict({f"{i}": p.detach().to("cpu").contiguous() for i, p in enumerate(params)}, tmp / "params.safetensors")
                if ema is not None:
                    save_state_dict({f"{i}": e.detach().to("cpu").contiguous() for i, e in enumerate(ema)}, tmp / "ema.safetensors")
                opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
                save_state_dict(opt_tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
                st = {"step": step, "reason": reason, "base_model": cfg.model, "base_fingerprint": fingerprint,
                      "world_size": world, "batch_size": cfg.batch_size, "scheduler": _jsonable(scheduler.state_dict()),
                      "optimizer": _jsonable(opt_meta), "rng": rng, "replica_digests": digest, "config": cfg.to_dict(),
                      "scaler": _jsonable(acc.scaler.state_dict()) if acc.scaler is not None else None}
                (tmp / "trainer_state.json").write_text(json.dumps(st, default=str), encoding="utf-8")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            acc.wait_for_everyone()
            return final

        if main:
            for line in _banner(cfg, info, objective, trained, trainable, total, scan, buckets, item_buckets, world):
                say(line)
            say(f"cache {cache_root}: latents {latent_cache.hits} reused, {latent_cache.misses} computed"
                + (f"; text {text_cache.hits} reused, {text_cache.misses} computed" if text_cache is not None else
                   "; text outputs not cached (train_text_encoder)"))
            if resume_dir is not None:
                say(f"resumed from {resume_dir.name} (step {start_step} of {cfg.max_steps})")
        if start_step == 0 and cfg.sample_every:
            sample(0)

        interrupts = contextlib.ExitStack()
        stop = interrupts.enter_context(interrupt_flag())  # Ctrl-C: checkpoint, then stop
        bar = progress_bar(cfg.max_steps, start_step, main and cfg.progress)
        for m in trained.values():
            m.train()
        step, last_loss, last_ckpt = start_step, float("nan"), None
        per = cfg.batch_size
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                step_loss = torch.zeros((), dtype=torch.float64, device=dev)
                for micro in range(cfg.grad_accum):
                    idx = batches.batch(step, micro, cfg.grad_accum, global_batch, rank, world)
                    positions = [rank * per + j for j in range(len(idx))]
                    seeds = [_sample_seed(cfg.seed, step, micro, p) for p in positions]
                    flips = [batches.flip_for(step, micro, p) for p in positions]
                    with torch.no_grad():
                        moments = [latent_moments(i, f) for i, f in zip(idx, flips)]
                        mean = torch.stack([m for m, _ in moments]).to(dev)
                        std = torch.stack([s for _, s in moments]).to(dev)
                        latents = objective.latents(mean, std, seeds)
                    captions = [
                        process_caption(items[i].caption, batches.caption_rng(step, micro, positions[j]), shuffle=cfg.shuffle_caption,
                                        keep_tokens=cfg.keep_tokens, dropout=cfg.caption_dropout)
                        for j, i in enumerate(idx)
                    ]
                    if text_cache is not None:
                        cond = text_cond(captions)  # cached or encoded in float32, outside autocast
                    with acc.autocast():
                        if text_cache is None:
                            cond = text_cond(captions)
                        time_ids = _time_ids(items, idx, item_buckets) if info.family == "sdxl" else None
                        loss = objective.loss(denoiser, latents, cond, seeds, time_ids=time_ids).mean()
                    acc.backward(loss / cfg.grad_accum)
                    step_loss += loss.detach().double() / cfg.grad_accum
                if world > 1:
                    _all_reduce_grads(params, world)
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                skipped = acc.optimizer_step_was_skipped  # fp16: an overflow skips the step, the schedule waits too
                if not skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and not skipped:
                    with torch.no_grad():
                        for p, e in zip(params, ema):
                            e.lerp_(p.detach(), 1 - cfg.ema_decay)
                step += 1
                if world > 1:
                    step_loss = acc.reduce(step_loss, reduction="mean")
                dt = time.perf_counter() - t0
                last_loss = float(step_loss)
                log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "it_per_s": round(1 / max(dt, 1e-9), 3)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", it_s=f"{1 / max(dt, 1e-9):.2f}")
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                    sample(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps and not cfg.full_finetune:
                    last_ckpt = save_checkpoint(step, "periodic")
                want = stop["stop"] or (should_stop is not None and should_stop(step))
                if world > 1:
                    want = bool(acc.reduce(torch.tensor(float(want), device=dev), reduction="sum") > 0)
                if want and step < cfg.max_steps:
                    if cfg.full_finetune:
                        raise KeyboardInterrupt
                    ckpt = save_checkpoint(step, "interrupted")
                    if main:
                        _plot(metrics, out / "loss_curve.png", title="lohakit train (text-to-image)")
                    raise TrainInterrupted(step, ckpt)
            sample(step)
            result: dict[str, Any] = {}
            if cfg.full_finetune:
                if main:
                    ema_swap()
                    pipe.save_pretrained(str(out / "pipeline"))
                    ema_swap()
                    result["pipeline_dir"] = str(out / "pipeline")
            else:
                last_ckpt = save_checkpoint(step, "final")
                if main:
                    result = write_outputs(out, step)
            if main:
                _plot(metrics, out / "loss_curve.png", title="lohakit train (text-to-image)")
            acc.wait_for_everyone()
        finally:
            if bar is not None:
                bar.close()
            interrupts.close()
            if world == 1:
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)
    except TrainInterrupted:
        raise
    except BaseException:
        if main and resume_dir is None and out.is_dir() and find_last_checkpoint(out) is None:
            _clear_artefacts(out, cfg)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    return {
        "step": step, "train_loss": last_loss, "output_dir": str(out), "family": info.family,
        "kohya_file": result.get("kohya_file"), "adapters": result.get("adapters", {}), "pipeline_dir": result.get("pipeline_dir"),
        "checkpoint": str(last_ckpt) if last_ckpt else None, "trainable_params": trainable, "total_params": total,
        "cache": {"latents": (latent_cache.hits, latent_cache.misses),
                  "text": (text_cache.hits, text_cache.misses) if text_cache is not None else None},
        "rank": rank, "world_size": world,
    }


# ------------------------------------------------------------------------------------------
# Loop pieces
# ------------------------------------------------------------------------------------------
def _sample_seed(seed: int, step: int, micro: int, position: int) -> int:
    """The seed of one sample's draws: a pure function of where it is in the run."""
    h = hashlib.blake2b(f"{seed}|{step}|{micro}|{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def _time_ids(items: Sequence[Any], idx: Sequence[int], item_buckets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """SDXL's size conditioning per sample ``(B, 6)``: original (h, w), crop (top, left), bucket (h, w)."""
    rows = []
    for i in idx:
        it, (bw, bh) = items[i], item_buckets[i]
        _, (left, top) = cover_and_crop(it.width, it.height, (bw, bh))
        rows.append([it.height, it.width, top, left, bh, bw])
    return torch.tensor(rows, dtype=torch.float32)


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the adapter's gradients over the processes (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).to(g.dtype)
        off += n


def _make_optimizer(cfg: ImageTrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _read_state(resume_dir: Path, cfg: ImageTrainConfig) -> dict[str, Any]:
    state = read_trainer_state(resume_dir, cfg.max_steps)
    for key in ("optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"checkpoint {str(resume_dir)!r}: trainer_state.json has no '{key}' state (got {state.get(key)!r})")
    if not (resume_dir / "params.safetensors").is_file():
        raise ValueError(f"checkpoint {str(resume_dir)!r} has no params.safetensors (not a text-to-image checkpoint)")
    return state


def _load_adapter_tensors(resume_dir: Path, trained: dict[str, nn.Module]) -> None:
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    saved = load_state_dict(resume_dir / "params.safetensors")
    if len(saved) != len(params):
        raise ValueError(f"checkpoint {str(resume_dir)!r} holds another adapter ({len(saved)} tensors) than this config "
                         f"builds ({len(params)}); resume with the checkpoint's settings")
    for i, p in enumerate(params):
        got = tuple(saved.get(str(i), torch.empty(0)).shape)
        if got != tuple(p.shape):
            raise ValueError(f"checkpoint {str(resume_dir)!r} holds another adapter: tensor {i} has shape {got}, this config "
                             f"builds {tuple(p.shape)} (another rank or targets?); resume with the checkpoint's settings")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[str(i)])


def _kohya_metadata(cfg: ImageTrainConfig, info: PipelineInfo, step: int, items: Sequence[Any], buckets: Any,
                    mixed_precision: str) -> dict[str, str]:
    """The ``ss_*`` header entries A1111 / kohya tools read (strings only)."""
    return {
        "ss_output_name": cfg.output_name,
        "ss_sd_model_name": info.path.name,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_learning_rate": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.lr) if cfg.train_text_encoder else "0",
        "ss_unet_lr": str(cfg.lr),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_num_train_images": str(len(items)),
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_mixed_precision": mixed_precision,
        "ss_enable_bucket": "True",
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b)} for i, b in enumerate(buckets or [])}}),
        "ss_tag_frequency": json.dumps(tag_frequencies(items)),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_training_comment": "lohakit train --task text-to-image",
    }


def _write_adapter_outputs(
    where: Path, cfg: ImageTrainConfig, info: PipelineInfo, pipe: Any, trained: dict[str, nn.Module],
    step: int, items: Sequence[Any], buckets: Any, mixed_precision: str,
) -> dict[str, Any]:
    """PEFT adapter directories (one per trained model) and, for LoHa, the kohya file."""
    from ..integrations.diffusers import save_loha_weights

    adapters = {}
    for name, m in trained.items():
        d = where / name
        if cfg.adapter == "lora":
            _save_peft_lora(m, d)
        else:
            LoHaModel.attach(m).save_pretrained(str(d))
        adapters[name] = str(d)
    result: dict[str, Any] = {"adapters": adapters, "kohya_file": None}
    if cfg.adapter == "loha":
        path = where / f"{cfg.output_name}.safetensors"
        save_loha_weights(pipe, path, dtype=SAVE_DTYPES[cfg.save_dtype], metadata=_kohya_metadata(cfg, info, step, items, buckets, mixed_precision))
        result["kohya_file"] = str(path)
    return result


def _save_peft_lora(model: nn.Module, d: Path) -> None:
    """A PEFT LoRA injected in place, as PEFT writes it: its config's own save_pretrained, and the adapter tensors."""
    from peft import get_peft_model_state_dict

    model.peft_config["default"].save_pretrained(str(d))
    save_state_dict(get_peft_model_state_dict(model), d / "adapter_model.safetensors")


def _banner(cfg: ImageTrainConfig, info: PipelineInfo, objective: Objective, trained: dict[str, nn.Module], trainable: int,
            total: int, scan: Any, buckets: Any, item_buckets: Sequence[Any], world: int) -> list[str]:
    n_layers = None
    if cfg.full_finetune:
        what = "all denoiser weights"
    elif cfg.adapter == "lora":
        conf = trained[info_component(info)].peft_config["default"]
        what = f"PEFT LoRA r={conf.r} alpha={conf.lora_alpha:g}"
    else:  # what was injected, defaults included
        conf = LoHaModel.attach(trained[info_component(info)]).peft_config["default"]
        what = f"LoHa r={conf.r} alpha={conf.alpha:g}"
        n_layers = sum(1 for m in trained.values() for _ in LoHaModel.attach(m).loha_layers())
    used = sorted(set(item_buckets))
    pct = 100.0 * trainable / max(total, 1)
    objective_s = objective.kind if objective.kind != "flow" else f"flow matching ({objective.timestep_sampling} σ, shifted per the scheduler)"
    return [
        f"lohakit train: {info.path} ({info.class_name}, family {info.family}), {what}"
        + (f" on {n_layers} modules" if n_layers else "") + f" of {', '.join(trained)}: {trainable:,} of {total:,} "
        f"parameters trainable ({pct:.3f}%)",
        f"data: {scan.n_images} images ({scan.n_samples} samples with repeats) in {len(used)} bucket(s) of "
        f"{len(buckets)}: {', '.join(f'{w}x{h}' for w, h in used)}; objective {objective_s}",
        f"{cfg.max_steps} steps of {cfg.batch_size * world * cfg.grad_accum} samples ({world} process{'es' if world > 1 else ''} "
        f"x batch {cfg.batch_size} x accumulation {cfg.grad_accum}), lr {cfg.lr:.3g}",
    ]
