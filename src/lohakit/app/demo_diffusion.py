"""``lohakit demo diffusion``: LoHa on a text-to-image diffusion model, offline, on a CPU, in minutes.

1. Data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upscaled to
   16x16 RGB, captioned "a handwritten digit seven". Digits 0-6 pretrain the base; 7, 8 and 9
   are new concepts the base never sees; a quarter of their images are held out for evaluation.
2. A tiny Stable-Diffusion-1-shaped pipeline built from configs (AutoencoderKL trained briefly
   as an autoencoder, CLIPTextModel with a CLIPTokenizer whose vocabulary is the caption words,
   UNet2DConditionModel with cross-attention, DDPMScheduler), its UNet pretrained on 0-6 through
   lohakit's own text-to-image trainer (``full_finetune``), saved as a diffusers pipeline
   directory and cached under the user's cache directory.
3. LoHa adapts the UNet to 7-9 (the same trainer); PEFT LoRA does the same at an equal
   trainable-parameter count.
4. Figures, all measured in the run: a small classifier (trained on real digits) reads images
   the pipeline generates for "seven", "eight", "nine" before and after adaptation; held-out
   denoising loss (the training objective at fixed noise and timesteps) on unseen 7-9 images
   and on unseen 0-6 images (what the adapter costs the old concepts).
5. Checks: the kohya ``.safetensors`` the trainer wrote reloads onto a fresh pipeline with
   :func:`lohakit.diffusers.load_loha_weights` and gives the trained adapter's UNet output;
   merged == unmerged. A sample grid PNG (rows base / LoHa / LoRA, columns 7, 8, 9).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .demo import default_cache_dir, relative_change

logger = logging.getLogger(__name__)

__all__ = [
    "DiffusionDemoSettings",
    "run_diffusion_demo",
    "DIGIT_WORDS",
    "UNET_TARGETS",
    "caption_for",
    "digit_images",
    "split_digits",
    "write_image_folder",
    "build_tokenizer",
    "build_pipeline",
    "train_vae",
    "DigitClassifier",
    "train_classifier",
    "classify",
    "generate_digits",
    "heldout_loss",
    "heldout_set",
    "HeldOut",
    "objective_of",
    "load_pipeline",
    "load_or_build_base",
    "to_pixels",
    "lora_rank_for",
    "write_sample_grid",
]

#: Caption words for the digits 0-9.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The UNet modules the demo adapts: attention and feed-forward projections of the transformer blocks.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
_CAPTION_WORDS = ("a", "handwritten", "digit") + DIGIT_WORDS
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
#: Bump when the base recipe changes in a way the settings do not show.
_BASE_VERSION = 1


def caption_for(digit: int) -> str:
    """``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


@dataclass(frozen=True)
class DiffusionDemoSettings:
    """Sizes and schedules of the diffusion demo (``quick()`` for tests: same path, far less compute)."""

    resolution: int = 16
    base_digits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    new_digits: tuple[int, ...] = (7, 8, 9)
    #: Every k-th image of the new digits (in dataset order) is held out for evaluation;
    #: every k-th of the base digits is held out of pretraining (forgetting figure).
    new_held_out_every: int = 4
    base_held_out_every: int = 10
    # -- the pipeline
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    vae_steps: int = 250
    vae_lr: float = 5e-3
    vae_batch: int = 64
    vae_kl_weight: float = 1e-6
    unet_channels: tuple[int, ...] = (32, 64)
    attention_head_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 8
    #: CLIP's ``initializer_factor`` for the frozen, random text encoder. At the default (1) the
    #: ten captions' embeddings are 98.7% alike (cosine: the weights are too small to mix the
    #: digit word into the later tokens) and the UNet barely learns to follow them; at 25, 79%.
    text_init_factor: float = 25.0
    # -- training (through lohakit.app.train_image)
    batch: int = 64
    pretrain_steps: int = 400
    pretrain_lr: float = 1e-3
    adapt_steps: int = 150
    adapt_batch: int = 48
    rank: int = 4
    alpha: float = 4.0
    #: Per-method learning rates, each the best of a small sweep at these sizes (held-out 7/8/9
    #: loss, then the judge; LoHa over {1e-2, 2e-2, 4e-2}, LoRA over {5e-3, 1e-2, 2e-2}; LoRA's
    #: 1e-2 and 2e-2 tied on held-out loss, 1e-2 forgot less of 0-6). LoHa's product
    #: parametrisation (ΔW quadratic in the factors, w2_b = 0 at init) wants a larger one.
    loha_lr: float = 4e-2
    lora_lr: float = 1e-2
    # -- evaluation
    samples_per_digit: int = 16
    sample_steps: int = 20
    guidance_scale: float = 3.0
    #: Share of training captions replaced by "" (what classifier-free guidance needs at sampling).
    caption_dropout: float = 0.1
    classifier_steps: int = 200
    eval_noise_draws: int = 4
    grid_columns_per_digit: int = 6
    seed: int = 0

    @classmethod
    def quick(cls) -> "DiffusionDemoSettings":
        """Tiny schedules for the test suite: every step of the demo runs, in seconds."""
        return cls(vae_steps=20, pretrain_steps=6, adapt_steps=4, batch=16, adapt_batch=16, samples_per_digit=2, sample_steps=3,
                   classifier_steps=30, eval_noise_draws=1, grid_columns_per_digit=2, unet_channels=(16, 32),
                   vae_channels=(8, 16))


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def digit_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(uint8 images (N, res, res), labels (N,))``: ink bright on black.

    The 8x8 images (0..16) are upscaled bilinearly and quantised to 8 bits, exactly what the PNG
    files written by :func:`write_image_folder` hold, so in-memory evaluation sees the trainer's data.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError("lohakit demo diffusion needs scikit-learn (its bundled digits): pip install scikit-learn") from e
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    img = (x[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8)  # (N, res, res)
    return img, torch.as_tensor(d.target, dtype=torch.long)


def to_pixels(img: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) grayscale -> float (N, 3, H, W) RGB in [-1, 1]."""
    x = img.float().div(127.5).sub(1.0)[:, None]
    return x.expand(-1, 3, -1, -1).contiguous()


def split_digits(labels: torch.Tensor, s: DiffusionDemoSettings) -> dict[str, torch.Tensor]:
    """Index sets: ``base_train``, ``base_eval`` (0-6), ``new_train``, ``new_eval`` (7-9); disjoint."""
    out: dict[str, list[int]] = {"base_train": [], "base_eval": [], "new_train": [], "new_eval": []}
    seen: dict[str, int] = {"base": 0, "new": 0}
    for i, y in enumerate(labels.tolist()):
        if y in s.base_digits:
            kind, every = "base", s.base_held_out_every
        elif y in s.new_digits:
            kind, every = "new", s.new_held_out_every
        else:
            continue
        held = every > 0 and seen[kind] % every == 0
        seen[kind] += 1
        out[f"{kind}_{'eval' if held else 'train'}"].append(i)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def write_image_folder(folder: Path, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> int:
    """Write ``images[indices]`` as RGB PNGs with same-name ``.txt`` captions; returns the count."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in indices.tolist():
        stem = f"digit{int(labels[i])}_{i:04d}"
        gray = images[i].numpy()
        Image.fromarray(gray, mode="L").convert("RGB").save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption_for(int(labels[i])), encoding="utf-8")
    return int(indices.numel())


# ------------------------------------------------------------------------------------------
# The pipeline, from configs
# ------------------------------------------------------------------------------------------
def _vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary in which every caption word is one token.

    Single characters (plain and word-final ``</w>``) plus, per word, the left-to-right merge
    chain that builds it (``s e`` -> ``se``, ``se v`` -> ``sev`` ...).
    """
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            if (cur, sym) not in merges:
                merges.append((cur, sym))
            cur = cur + sym
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault(_BOS, len(vocab))
    vocab.setdefault(_EOS, len(vocab))
    return vocab, merges


def build_tokenizer(folder: Path, max_tokens: int = 8) -> Any:
    """A CLIPTokenizer for the caption words, from a ``vocab.json`` / ``merges.txt`` written to ``folder``.

    Raises:
        RuntimeError: A caption word does not come out as a single token.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(_CAPTION_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_tokens,
                        bos_token=_BOS, eos_token=_EOS, unk_token=_EOS, pad_token=_EOS)
    for w in _CAPTION_WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok


def build_pipeline(s: DiffusionDemoSettings, folder: Path, seed: int) -> Any:
    """A StableDiffusionPipeline of tiny, freshly initialised models (the VAE is trained separately)."""
    with _quiet_diffusers():
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = build_tokenizer(folder / "tokenizer-src", s.max_tokens)
    n_vae = len(s.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=tuple(s.vae_channels), layers_per_block=1,
        latent_channels=s.latent_channels, norm_num_groups=min(8, s.vae_channels[0]), sample_size=s.resolution,
        mid_block_add_attention=False,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=s.text_hidden, intermediate_size=2 * s.text_hidden,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, max_position_embeddings=s.max_tokens,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_factor=s.text_init_factor, initializer_range=0.02 * s.text_init_factor,
    ))
    factor = 2 ** (n_vae - 1)
    n_unet = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=s.resolution // factor, in_channels=s.latent_channels, out_channels=s.latent_channels,
        block_out_channels=tuple(s.unet_channels), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        cross_attention_dim=s.text_hidden, attention_head_dim=s.attention_head_dim,
        norm_num_groups=min(8, s.unet_channels[0]),
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
    with _quiet_diffusers():
        return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def train_vae(vae: nn.Module, pixels: torch.Tensor, eval_pixels: torch.Tensor, s: DiffusionDemoSettings,
              seed: int) -> dict[str, float]:
    """Train the AutoencoderKL briefly as an autoencoder (MSE + a small KL); set its ``scaling_factor``.

    The scaling factor is 1 / std of the training latents (the SD convention: unit-variance
    latents for the UNet). Returns ``{"rmse", "max_abs", "scaling_factor", "seconds"}``, the
    errors measured on ``eval_pixels`` (never trained on) in [-1, 1] pixel units.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.vae_lr, total_steps=max(2, s.vae_steps), pct_start=0.1)
    vae.train()
    t0 = time.perf_counter()
    bs = min(s.vae_batch, pixels.shape[0])
    for _ in range(s.vae_steps):
        idx = torch.randint(0, pixels.shape[0], (bs,), generator=gen)
        x = pixels[idx]  # (B, 3, H, W)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + s.vae_kl_weight * post.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, pixels.shape[0], 256)])
        scaling = float(1.0 / lat.std().clamp_min(1e-6))
        rec = vae.decode(vae.encode(eval_pixels).latent_dist.mean).sample
        err = rec.clamp(-1, 1) - eval_pixels
    vae.register_to_config(scaling_factor=scaling)
    return {"rmse": float(err.pow(2).mean().sqrt()), "max_abs": float(err.abs().max()), "scaling_factor": scaling,
            "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' and transformers' progress bars, info logs and deprecation notices off inside the block.

    Both libraries' settings are restored afterwards.
    """
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename, in the trainer's loader
            yield
    finally:
        for lib, bar, level in saved:
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def load_pipeline(path: Path) -> Any:
    """``StableDiffusionPipeline.from_pretrained(path)`` (local files, float32, quiet, eval mode)."""
    with _quiet_diffusers():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    return pipe


# ------------------------------------------------------------------------------------------
# Objective: the trainer's own (lohakit.app.objectives), so "held-out loss" is the training loss
# ------------------------------------------------------------------------------------------
def objective_of(pipe: Any) -> Any:
    """The training objective :func:`lohakit.app.train_image.train_text_to_image` uses for ``pipe``."""
    from ..formats.families import family_of_pipeline
    from .objectives import objective_for

    fam = family_of_pipeline(pipe)
    if fam is None:  # pragma: no cover - the demo builds an SD1 pipeline
        raise TypeError(f"{type(pipe).__name__} is not a pipeline of a known family")
    return objective_for(pipe, fam.name)


@dataclass
class HeldOut:
    """Fixed evaluation inputs: latents drawn once and text conditions, with their draw seeds."""

    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    seeds: list[int]


@torch.no_grad()
def heldout_set(objective: Any, pixels: torch.Tensor, captions: Sequence[str], seed: int, draws: int = 1) -> HeldOut:
    """Latents and prompt embeddings of held-out images, repeated ``draws`` times with distinct seeds.

    Every model is evaluated on the same latents, noise and timesteps (the objective draws them
    from the per-sample seeds), so before/after losses differ only by the denoiser.
    """
    n = pixels.shape[0]
    mean, std = objective.latent_moments(pixels)
    seeds = [seed * 1_000_003 + k for k in range(n * max(1, draws))]
    latents = objective.latents(mean.repeat(max(1, draws), 1, 1, 1), std.repeat(max(1, draws), 1, 1, 1), seeds)
    cond = objective.encode_prompts(list(captions) * max(1, draws), "cpu")
    return HeldOut(latents, cond, seeds)


@torch.no_grad()
def heldout_loss(objective: Any, denoiser: nn.Module, held: HeldOut, chunk: int = 256) -> float:
    """Mean per-sample training loss of ``denoiser`` on a :class:`HeldOut` set."""
    was = denoiser.training
    denoiser.eval()
    vals = []
    for i in range(0, held.latents.shape[0], chunk):
        cond = {k: v[i:i + chunk] for k, v in held.cond.items()}
        vals.append(objective.loss(denoiser, held.latents[i:i + chunk], cond, held.seeds[i:i + chunk]).float())
    denoiser.train(was)
    return float(torch.cat(vals).mean())


# ------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """A small CNN on grayscale images in [-1, 1] (N, 1, H, W) -> logits (N, 10)."""

    def __init__(self, resolution: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (resolution // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1, H, W)."""
    return pixels.mean(1, keepdim=True)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, s: DiffusionDemoSettings, seed: int,
                     held_out_every: int = 5) -> tuple[DigitClassifier, float, int]:
    """Train :class:`DigitClassifier` on the real digits (all classes; every k-th image held out).

    Training images are shifted by up to one pixel at random (generated digits are not centred
    exactly). Returns ``(classifier, held-out accuracy, held-out count)``.
    """
    torch.manual_seed(seed)
    x = _gray(to_pixels(images))  # (N, 1, H, W)
    held = torch.arange(x.shape[0]) % held_out_every == 0
    xt, yt, xe, ye = x[~held], labels[~held], x[held], labels[held]
    clf = DigitClassifier(images.shape[-1])
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(s.classifier_steps):
        idx = torch.randint(0, xt.shape[0], (128,), generator=gen)
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(clf(xb), yt[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clf.eval()
    with torch.no_grad():
        acc = float((clf(xe).argmax(1) == ye).float().mean())
    return clf, acc, int(ye.numel())


@torch.no_grad()
def classify(clf: DigitClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """Predicted digits for RGB images in [-1, 1] (N, 3, H, W)."""
    return clf(_gray(pixels.clamp(-1, 1))).argmax(1)


# ------------------------------------------------------------------------------------------
# Generation, LoRA sizing, grid
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_digits(pipe: Any, digits: Sequence[int], n: int, s: DiffusionDemoSettings, seed: int) -> torch.Tensor:
    """``n`` images per digit from ``pipe`` (fixed seed, DPM-Solver++): (len(digits)·n, 3, H, W) in [-1, 1].

    Ordered digit-major: ``out[k*n:(k+1)*n]`` are the images of ``digits[k]``. The same seed
    gives every pipeline the same starting noise, so rows of the grid are comparable.
    """
    from diffusers import DPMSolverMultistepScheduler

    train_scheduler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(train_scheduler.config)
    prompts = [caption_for(d) for d in digits for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    try:
        img = pipe(prompt=prompts, num_inference_steps=s.sample_steps, guidance_scale=s.guidance_scale, generator=gen,
                   height=s.resolution, width=s.resolution, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    finally:
        pipe.scheduler = train_scheduler
    return img.float().mul(2).sub(1)


def _matching_modules(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets)]


def lora_rank_for(model: nn.Module, targets: Sequence[str], loha_params: int) -> tuple[int, int]:
    """The LoRA rank whose trainable count is closest to ``loha_params`` on the same modules.

    A LoRA of rank R on Linear(in, out) has R·(in + out) parameters (Conv2d: R·(in·k·k + out)).
    Returns ``(rank, LoRA parameter count at that rank)``.
    """
    unit = 0
    for _, m in _matching_modules(model, targets):
        if isinstance(m, nn.Linear):
            unit += m.in_features + m.out_features
        else:
            unit += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    if unit == 0:
        raise ValueError(f"no Linear/Conv2d module of the model matches {list(targets)}")
    rank = max(1, round(loha_params / unit))
    return rank, rank * unit


def write_sample_grid(path: Path, rows: dict[str, torch.Tensor], digits: Sequence[int], per_digit: int,
                      cols_per_digit: int, accuracies: dict[str, float] | None = None, scale: int = 4) -> None:
    """One PNG: a row per model (labelled), ``cols_per_digit`` samples of each digit side by side.

    ``rows[name]`` is the digit-major output of :func:`generate_digits` with ``per_digit`` images each.
    """
    from PIL import Image, ImageDraw

    first = next(iter(rows.values()))
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    gap, label_w, head_h = 2, 150, 18
    group_w = cols_per_digit * (w + gap) + 6
    W = label_w + len(digits) * group_w
    H = head_h + len(rows) * (h + gap)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, d in enumerate(digits):
        draw.text((label_w + k * group_w + 2, 3), f"'{caption_for(d).split()[-1]}'", fill=(0, 0, 0))
    for r, (name, imgs) in enumerate(rows.items()):
        y = head_h + r * (h + gap)
        label = name if not accuracies or name not in accuracies else f"{name}: judge {100 * accuracies[name]:.0f}%"
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        for k in range(len(digits)):
            for c in range(min(cols_per_digit, per_digit)):
                img = imgs[k * per_digit + c].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
                tile = Image.fromarray(img.permute(1, 2, 0).numpy(), mode="RGB").resize((w, h), Image.NEAREST)
                canvas.paste(tile, (label_w + k * group_w + c * (w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# The cached base
# ------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _recipe(s: DiffusionDemoSettings, images: torch.Tensor) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(s).items()
              if k not in {"adapt_steps", "adapt_batch", "rank", "alpha", "loha_lr", "lora_lr", "samples_per_digit", "sample_steps",
                           "guidance_scale", "classifier_steps", "eval_noise_draws", "grid_columns_per_digit",
                           "new_held_out_every"}}
    return {
        "kind": "lohakit-diffusion-demo-base",
        "version": _BASE_VERSION,
        "settings": json.loads(json.dumps(fields)),
        "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16],
        "versions": {d: _version(d).split("+")[0] for d in ("torch", "diffusers", "transformers", "lohakit")},
    }


def load_or_build_base(cache_dir: Path, s: DiffusionDemoSettings, images: torch.Tensor, labels: torch.Tensor,
                       split: dict[str, torch.Tensor], rebuild: bool = False) -> tuple[Path, dict[str, Any]]:
    """The pretrained base pipeline directory: from the cache when its recipe matches, else built.

    Building: the tiny pipeline from configs, its VAE trained as an autoencoder, its UNet
    pretrained on the base digits with :func:`lohakit.app.train_image.train_text_to_image`
    (``full_finetune=True``). Written to a temporary directory and renamed into place, so an
    interrupted run never leaves a half-built base. Returns ``(path, info)``.
    """
    recipe = _recipe(s, images)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"diffusion-demo-base-{key}"
    meta_file = path / "lohakit_demo_recipe.json"
    if not rebuild and meta_file.is_file() and (path / "model_index.json").is_file():
        try:
            saved = json.loads(meta_file.read_text(encoding="utf-8"))
            if saved.get("recipe") == recipe:
                load_pipeline(path)  # a damaged cache is rebuilt, never trusted
                return path, {**saved["info"], "cached": True, "path": str(path)}
        except Exception as e:  # noqa: BLE001 - any damage means: build again
            logger.warning("cached diffusion demo base at %s is unusable (%s); building it again", path, e)
    from .train_image import ImageTrainConfig, train_text_to_image

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".diffusion-demo-base-", dir=cache_dir))
    try:
        pipe = build_pipeline(s, tmp, s.seed)
        pix = to_pixels(images)
        vae_info = train_vae(pipe.vae, pix[split["base_train"]], pix[split["base_eval"]], s, s.seed)
        init_dir = tmp / "init"
        with _quiet_diffusers():
            pipe.save_pretrained(str(init_dir))
        (init_dir / "tokenizer" / "vocab.json").write_bytes((tmp / "tokenizer-src" / "vocab.json").read_bytes())
        (init_dir / "tokenizer" / "merges.txt").write_bytes((tmp / "tokenizer-src" / "merges.txt").read_bytes())
        data_dir = tmp / "data-base-digits"
        n_imgs = write_image_folder(data_dir, images, labels, split["base_train"])
        cfg = ImageTrainConfig(
            model=str(init_dir), data=str(data_dir), output_dir=str(tmp / "pretrain"), resolution=s.resolution,
            batch_size=s.batch, max_steps=s.pretrain_steps, lr=s.pretrain_lr, seed=s.seed, full_finetune=True,
            save_every=0, sample_prompts=None, sample_every=0, progress=False, mixed_precision="no", cpu=True,
            overwrite=True, caption_dropout=s.caption_dropout, lr_scheduler="cosine",
            warmup_steps=max(1, s.pretrain_steps // 20), cache_dir=str(cache_dir / "diffusion-demo-image-cache"),
        )
        t0 = time.perf_counter()
        with _quiet_diffusers():
            res = train_text_to_image(cfg)
        secs = time.perf_counter() - t0
        base_tmp = tmp / "base"
        shutil.copytree(res["pipeline_dir"], base_tmp)
        for name in ("vocab.json", "merges.txt"):
            if not (base_tmp / "tokenizer" / name).exists():
                shutil.copy2(init_dir / "tokenizer" / name, base_tmp / "tokenizer" / name)
        pipe = load_pipeline(base_tmp)
        info = {
            "vae": vae_info,
            "pretrain": {"steps": int(res["step"]), "seconds": secs, "train_loss": float(res["train_loss"]),
                         "images": n_imgs, "trainable_params": int(res["trainable_params"])},
            "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
            "text_params": sum(p.numel() for p in pipe.text_encoder.parameters()),
            "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
        }
        (base_tmp / "lohakit_demo_recipe.json").write_text(json.dumps({"recipe": recipe, "info": info}, indent=2),
                                                           encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(base_tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, {**info, "cached": False, "path": str(path)}


# ------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------
def _load_lora(unet: nn.Module, adapter_dir: Path) -> nn.Module:
    """Inject a PEFT LoRA adapter directory into ``unet`` in place (peft's own loader functions)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    inject_adapter_in_model(cfg, unet)
    res = set_peft_model_state_dict(unet, sd)
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"LoRA adapter {adapter_dir} has keys the UNet does not: {unexpected[:3]}")
    return unet


def _unet_probe(pipe: Any, s: DiffusionDemoSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed UNet input: (noisy latents, timesteps, text states) for the new digits."""
    gen = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    x = torch.randn(len(s.new_digits), pipe.unet.config.in_channels, size, size, generator=gen)
    t = torch.linspace(50, 900, len(s.new_digits)).long()
    with torch.no_grad():
        cond = objective_of(pipe).encode_prompts([caption_for(d) for d in s.new_digits], "cpu")["encoder_hidden_states"]
    return x, t, cond


@torch.no_grad()
def _unet_out(unet: nn.Module, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, t, cond = probe
    return unet(x, t, encoder_hidden_states=cond).sample


def _kohya_dtype(path: Path) -> torch.dtype:
    """The dtype of the LoHa factors stored in a kohya file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if "hada_" in k:
                return f.get_tensor(k).dtype
    return torch.float32


# ------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------
def run_diffusion_demo(
    settings: DiffusionDemoSettings,
    output_dir: Path | None,
    cache_dir: Path | None,
    echo: Callable[[str], None],
    *,
    with_lora: bool = True,
    rebuild_base: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the diffusion demo; print a report through ``echo`` and return every figure as a dict.

    Args:
        settings: Sizes and schedules (``DiffusionDemoSettings()`` or ``.quick()``).
        output_dir: Where the adapters, sample grid and ``diffusion_demo_summary.json`` go
            (default ``<cache>/diffusion-demo-output``).
        cache_dir: Where the base pipeline is cached (default :func:`default_cache_dir`).
        echo: Receives each report line.
        with_lora: Also run PEFT LoRA at an equal parameter count (skipped when peft is missing).
        rebuild_base: Ignore a cached base.
        threads: torch CPU threads for the run (default 1; None keeps the current setting); restored after.
            These models are small: on 2 shared cores one thread measured 15x faster than two
            (OpenMP threads waiting for each other), and no slower on a quiet machine.

    Raises:
        RuntimeError: The reloaded kohya file or the merged weights disagree with the trained adapter.
    """
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(max(1, threads))
    try:
        return _run(settings, output_dir, cache_dir, echo, with_lora, rebuild_base)
    finally:
        torch.set_num_threads(threads_before)


def _train_adapter(s: DiffusionDemoSettings, base: Path, data: Path, out: Path, cache: Path, seed: int, lr: float,
                   extra: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One adapter run of the trainer on the new digits: ``(its result, seconds)``."""
    from .train_image import ImageTrainConfig, train_text_to_image

    cfg = ImageTrainConfig(
        model=str(base), data=str(data), output_dir=str(out), resolution=s.resolution, batch_size=s.adapt_batch,
        max_steps=s.adapt_steps, lr=lr, seed=seed, full_finetune=False, save_every=0, sample_prompts=None,
        sample_every=0, progress=False, mixed_precision="no", cpu=True, overwrite=True,
        caption_dropout=s.caption_dropout, lr_scheduler="cosine", warmup_steps=max(1, s.adapt_steps // 20),
        cache_dir=str(cache / "diffusion-demo-image-cache"), **extra,
    )
    t0 = time.perf_counter()
    with _quiet_diffusers():
        res = train_text_to_image(cfg)
    return res, time.perf_counter() - t0


def _run(s: DiffusionDemoSettings, output_dir: Path | None, cache_dir: Path | None, echo: Callable[[str], None],
         with_lora: bool, rebuild_base: bool) -> dict[str, Any]:
    """The body of :func:`run_diffusion_demo` (threads already set)."""
    from ..core.model import LoHaModel
    from ..integrations.diffusers import load_loha_weights

    t_start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    quick = dataclasses.replace(s, seed=0) == DiffusionDemoSettings.quick()
    out = Path(output_dir) if output_dir is not None else cache / (
        "diffusion-demo-output-quick" if quick else "diffusion-demo-output")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    echo(f"lohakit demo diffusion: torch {torch.__version__}, diffusers {_version('diffusers')}, "
         f"{torch.get_num_threads()} of {os.cpu_count()} CPU threads, Python {platform.python_version()}")

    images, labels = digit_images(s.resolution)
    split = split_digits(labels, s)
    pix = to_pixels(images)
    new_names = "/".join(str(d) for d in s.new_digits)
    echo(f"data: scikit-learn digits, {images.shape[0]} images upscaled to {s.resolution}x{s.resolution}; base digits "
         f"{min(s.base_digits)}-{max(s.base_digits)}: {split['base_train'].numel()} to pretrain, "
         f"{split['base_eval'].numel()} held out; new digits {new_names}: {split['new_train'].numel()} to adapt, "
         f"{split['new_eval'].numel()} held out")

    # ---- 1. base
    base_dir, info = load_or_build_base(cache, s, images, labels, split, rebuild=rebuild_base)
    vae = info["vae"]
    params = f"UNet {info['unet_params']:,}, text encoder {info['text_params']:,}, VAE {info['vae_params']:,} parameters"
    if info["cached"]:
        echo(f"[1] base pipeline: loaded from cache {base_dir} ({params})")
    else:
        pre = info["pretrain"]
        echo(f"[1] base pipeline built from configs ({params}); VAE trained {s.vae_steps} steps in {vae['seconds']:.1f}s")
        echo(f"    UNet pretrained (all {pre['trainable_params']:,} parameters, lohakit train_text_to_image) "
             f"{pre['steps']} steps on {pre['images']} images of digits {min(s.base_digits)}-{max(s.base_digits)} in "
             f"{pre['seconds']:.1f}s (final train loss {pre['train_loss']:.4f}); cached at {base_dir}")
    echo(f"    VAE reconstruction on held-out digits: RMSE {vae['rmse']:.4f}, max |error| {vae['max_abs']:.3f} "
         f"(pixels in [-1, 1]; latents scaled by {vae['scaling_factor']:.3f})")

    pipe = load_pipeline(base_dir)
    objective = objective_of(pipe)
    held_new = heldout_set(objective, pix[split["new_eval"]],
                           [caption_for(int(labels[i])) for i in split["new_eval"].tolist()], s.seed + 7, s.eval_noise_draws)
    held_base = heldout_set(objective, pix[split["base_eval"]],
                            [caption_for(int(labels[i])) for i in split["base_eval"].tolist()], s.seed + 8, s.eval_noise_draws)

    def losses(unet: nn.Module) -> tuple[float, float]:
        return heldout_loss(objective, unet, held_new), heldout_loss(objective, unet, held_base)

    t0 = time.perf_counter()
    clf, clf_acc, clf_n = train_classifier(images, labels, s, s.seed + 3)
    echo(f"    judge: a small CNN trained on real digits (all 10), accuracy {100 * clf_acc:.1f}% on {clf_n} held-out "
         f"real images ({time.perf_counter() - t0:.1f}s)")
    targets = torch.tensor(s.new_digits).repeat_interleave(s.samples_per_digit)

    def read(gen: torch.Tensor) -> tuple[float, dict[int, float]]:
        pred = classify(clf, gen)
        per = {d: float((pred[targets == d] == d).float().mean()) for d in s.new_digits}
        return float((pred == targets).float().mean()), per

    t0 = time.perf_counter()
    samples: dict[str, torch.Tensor] = {"base": generate_digits(pipe, s.new_digits, s.samples_per_digit, s, s.seed + 11)}
    gen_secs = time.perf_counter() - t0
    acc_before, per_before = read(samples["base"])
    loss_new_before, loss_base_before = losses(pipe.unet)
    n_gen = len(s.new_digits) * s.samples_per_digit
    known = generate_digits(pipe, s.base_digits, s.samples_per_digit, s, s.seed + 13)
    known_targets = torch.tensor(s.base_digits).repeat_interleave(s.samples_per_digit)
    acc_known = float((classify(clf, known) == known_targets).float().mean())
    echo(f"    base on its own digits {min(s.base_digits)}-{max(s.base_digits)}: judge reads {100 * acc_known:.1f}% of "
         f"{known_targets.numel()} generated images as the digit asked for")
    echo(f"    base on the new digits: judge reads {100 * acc_before:.1f}% of {n_gen} generated images as the digit asked "
         f"for ({', '.join(f'{d}: {100 * a:.0f}%' for d, a in per_before.items())}; {s.sample_steps} DPM-Solver steps, "
         f"{gen_secs:.1f}s); held-out denoising loss {new_names} {loss_new_before:.4f}, "
         f"{min(s.base_digits)}-{max(s.base_digits)} {loss_base_before:.4f}")

    # ---- 2. LoHa
    data_new = out / "data-new-digits"
    if data_new.exists():
        shutil.rmtree(data_new)
    n_new = write_image_folder(data_new, images, labels, split["new_train"])
    runs: dict[str, dict[str, Any]] = {}
    loha_res, loha_secs = _train_adapter(
        s, base_dir, data_new, out / "loha", cache, s.seed + 1, s.loha_lr,
        {"loha": {"r": s.rank, "alpha": s.alpha, "target_modules": list(UNET_TARGETS)}})
    loha_dir = Path(loha_res["adapters"]["unet"])
    pipe_loha = load_pipeline(base_dir)
    loha_model = LoHaModel.from_pretrained(pipe_loha.unet, str(loha_dir))  # adapts pipe_loha.unet in place
    loha_model.eval()
    trainable, total = int(loha_res["trainable_params"]), int(loha_res["total_params"])
    samples["LoHa"] = generate_digits(pipe_loha, s.new_digits, s.samples_per_digit, s, s.seed + 11)
    acc, per = read(samples["LoHa"])
    l_new, l_base = losses(pipe_loha.unet)
    runs["LoHa"] = {"params": trainable, "seconds": loha_secs, "steps": int(loha_res["step"]), "lr": s.loha_lr,
                    "train_loss": float(loha_res["train_loss"]), "accuracy": acc, "accuracy_per_digit": per,
                    "heldout_loss_new": l_new, "heldout_loss_base": l_base, "adapter_dir": str(loha_dir),
                    "kohya_file": str(loha_res["kohya_file"])}
    echo(f"[2] LoHa r={s.rank} alpha={s.alpha:g} on the UNet's {len(loha_model.targeted_module_names)} attention/MLP "
         f"projections: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    echo(f"    {runs['LoHa']['steps']} steps on {n_new} images of {new_names}, lr {s.loha_lr:g}, in {loha_secs:.1f}s: judge "
         f"{100 * acc_before:.1f}% -> {100 * acc:.1f}% ({', '.join(f'{d}: {100 * a:.0f}%' for d, a in per.items())}); "
         f"held-out loss {new_names} {loss_new_before:.4f} -> {l_new:.4f} ({relative_change(loss_new_before, l_new)}), "
         f"{min(s.base_digits)}-{max(s.base_digits)} {loss_base_before:.4f} -> {l_base:.4f}")

    # ---- 3. LoRA at the same parameter count
    lora_info: dict[str, Any] | None = None
    peft_ok = True
    try:
        import peft  # noqa: F401
    except ImportError:
        peft_ok = False
    if with_lora and peft_ok:
        lora_r, _ = lora_rank_for(pipe.unet, UNET_TARGETS, trainable)
        lora_alpha = s.alpha * lora_r / s.rank  # the same alpha / r scale as LoHa
        lora_res, lora_secs = _train_adapter(
            s, base_dir, data_new, out / "lora", cache, s.seed + 1, s.lora_lr,
            {"adapter": "lora", "lora": {"r": lora_r, "lora_alpha": lora_alpha, "target_modules": list(UNET_TARGETS)}})
        pipe_lora = load_pipeline(base_dir)
        _load_lora(pipe_lora.unet, Path(lora_res["adapters"]["unet"]))
        pipe_lora.unet.eval()
        samples["LoRA"] = generate_digits(pipe_lora, s.new_digits, s.samples_per_digit, s, s.seed + 11)
        acc_l, per_l = read(samples["LoRA"])
        ll_new, ll_base = losses(pipe_lora.unet)
        lp = int(lora_res["trainable_params"])
        runs["LoRA"] = lora_info = {
            "rank": lora_r, "alpha": lora_alpha, "params": lp, "seconds": lora_secs, "steps": int(lora_res["step"]),
            "lr": s.lora_lr, "train_loss": float(lora_res["train_loss"]), "accuracy": acc_l, "accuracy_per_digit": per_l,
            "heldout_loss_new": ll_new, "heldout_loss_base": ll_base, "adapter_dir": str(lora_res["adapters"]["unet"])}
        diff = lp - trainable
        echo(f"[3] PEFT LoRA r={lora_r} alpha={lora_alpha:g} on the same modules: trainable {lp:,} parameters "
             f"({'equal to' if diff == 0 else f'{100 * abs(diff) / trainable:.2f}% ' + ('above' if diff > 0 else 'below')} "
             f"LoHa's {trainable:,}); {lora_info['steps']} steps, lr {s.lora_lr:g}, in {lora_secs:.1f}s: judge "
             f"{100 * acc_before:.1f}% -> {100 * acc_l:.1f}% ({', '.join(f'{d}: {100 * a:.0f}%' for d, a in per_l.items())}); "
             f"held-out loss {new_names} {loss_new_before:.4f} -> {ll_new:.4f} ({relative_change(loss_new_before, ll_new)}), "
             f"{min(s.base_digits)}-{max(s.base_digits)} {loss_base_before:.4f} -> {ll_base:.4f}")
    else:
        echo("[3] PEFT LoRA comparison skipped" + (": peft is not installed" if not peft_ok else " (with_lora=False)"))

    # ---- 4. checks: kohya reload, merged == unmerged
    probe = _unet_probe(pipe, s, s.seed + 5)
    trained_out = _unet_out(pipe_loha.unet, probe)
    base_out = _unet_out(pipe.unet, probe)
    kohya_file = Path(loha_res["kohya_file"])
    pipe_k = load_pipeline(base_dir)
    report = load_loha_weights(pipe_k, str(kohya_file))
    kohya_out = _unet_out(pipe_k.unet, probe)
    file_dtype = _kohya_dtype(kohya_file)
    reload_vs_trained = float((kohya_out - trained_out).abs().max())
    if file_dtype != torch.float32:
        # the file stores the factors in file_dtype: compare with the trained adapter's factors rounded the same way
        rounded = copy.deepcopy(loha_model)
        with torch.no_grad():
            for n, p in rounded.named_parameters():
                if "hada_" in n:
                    p.copy_(p.to(file_dtype).float())
        reload_err = float((kohya_out - _unet_out(rounded.model, probe)).abs().max())
    else:
        reload_err = reload_vs_trained
    loha_model.merge_adapter()
    merged_out = _unet_out(pipe_loha.unet, probe)
    loha_model.unmerge_adapter()
    merge_err = float((merged_out - trained_out).abs().max())
    effect = float((trained_out - base_out).abs().max())
    n_keys = len(report.matched)
    echo(f"[4] kohya file {kohya_file.name} ({kohya_file.stat().st_size / 1024:.1f} KiB, {str(file_dtype).replace('torch.', '')}) "
         f"loaded onto a fresh pipeline with lohakit.diffusers.load_loha_weights ({n_keys} modules): max |reloaded - "
         f"trained| UNet output = {reload_err:.2e}" + (f" (vs the float32 factors: {reload_vs_trained:.2e})" if file_dtype != torch.float32 else ""))
    echo(f"    merged into the weights: max |merged - unmerged| = {merge_err:.2e} (the adapter moves the UNet output by "
         f"up to {effect:.3f})")
    tol = 1e-4
    ok = reload_err <= tol and merge_err <= tol

    grid = out / "diffusion_samples.png"
    write_sample_grid(grid, samples, s.new_digits, s.samples_per_digit, s.grid_columns_per_digit,
                      {"base": acc_before, **{k: v["accuracy"] for k, v in runs.items()}})
    summary = {
        "settings": dataclasses.asdict(s),
        "base_cached": info["cached"],
        "base_path": str(base_dir),
        "base": {k: v for k, v in info.items() if k not in {"cached", "path"}},
        "classifier_accuracy": clf_acc,
        "classifier_held_out": clf_n,
        "accuracy_base_digits": acc_known,
        "accuracy_before": acc_before,
        "accuracy_per_digit_before": per_before,
        "heldout_loss_new_before": loss_new_before,
        "heldout_loss_base_before": loss_base_before,
        "loha": runs["LoHa"],
        "lora": lora_info,
        "trainable_params": trainable,
        "total_params": total,
        "kohya_file": str(kohya_file),
        "kohya_dtype": str(file_dtype).replace("torch.", ""),
        "kohya_modules": n_keys,
        "reload_max_abs_err": reload_err,
        "reload_vs_float32_max_abs_err": reload_vs_trained,
        "merge_max_abs_err": merge_err,
        "adapter_effect_max_abs": effect,
        "sample_grid": str(grid),
        "seconds": time.perf_counter() - t_start,
        "ok": ok,
    }
    (out / "diffusion_demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    echo(f"    sample grid (rows {', '.join(samples)}; columns {new_names}): {grid}; all figures: "
         f"{out / 'diffusion_demo_summary.json'}")
    if not ok:
        raise RuntimeError(f"adapter round trip failed: kohya reload error {reload_err:.3e}, merge error {merge_err:.3e} "
                           f"(tolerance {tol:g})")
    verdict = ""
    if lora_info is not None:
        verdict = (f"; at equal size LoHa reaches {100 * runs['LoHa']['accuracy']:.1f}% vs LoRA "
                   f"{100 * lora_info['accuracy']:.1f}%, held-out loss {runs['LoHa']['heldout_loss_new']:.4f} vs "
                   f"{lora_info['heldout_loss_new']:.4f}")
    echo(f"OK in {summary['seconds']:.0f}s: kohya file reloads, merged == unmerged (float32, tol {tol:g}){verdict}")
    return summary
