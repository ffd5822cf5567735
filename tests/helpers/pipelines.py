"""Tiny diffusers pipeline directories (SD1, SD2-v, SDXL, FLUX.1, SD3) and image folders for the
text-to-image trainer's tests. Random weights, built from configs (no download).

API
---
* :func:`make_pipeline_dir` ``(family, root, *, prediction_type="epsilon", seed=0) -> Path``: builds a
  tiny pipeline and ``save_pretrained``\\ s it to ``root/<family>``; ``DiffusionPipeline.from_pretrained``
  loads it back and it runs inference (``output_type="pt"``) at any side in :data:`MIN_SIDE` steps.
* :func:`family_factor` ``(family) -> int``: the multiple an image side must have for training
  (VAE scale factor x patch: 2x2 packing for FLUX, ``patch_size`` for SD3).
  :data:`MIN_SIDE`: the smallest side each *pipeline's* ``__call__`` accepts (SD/SDXL's ``check_inputs``
  hard-codes ``% 8``; FLUX only warns and floors to its factor; SD3 raises unless ``% factor``).
  :data:`MAX_SIDE`: SD3's ``pos_embed_max_size`` caps the latent grid (FLUX/UNets have no cap).
* :func:`make_image_folder`, :func:`make_truncated_image`, :func:`make_uncaptioned_image`: datasets.

Tiny models (all families): VAE ``block_out_channels=(8, 16)`` -> scale factor 2; CLIP text encoders
(:func:`helpers.dit.clip_encoder`: hidden 16, projection 8, 16 positions, vocab 64, bos 0 / eos 1) with a
character-level CLIP BPE tokenizer (:func:`clip_tokenizer`, ``model_max_length`` 16, so at most 14
characters of a caption survive: longer prompts are truncated as the real 77-token CLIP does);
T5 (:func:`helpers.dit.t5_encoder`, d_model 16, for FLUX; d_model 32 for SD3) with a character-level
Unigram ``T5Tokenizer`` (:func:`t5_tokenizer`, vocab 64, no sentinels). ``prediction_type`` applies to
``sd1`` and ``sdxl``; ``sd2v`` is always ``v_prediction``; FLUX/SD3 are flow matching (argument ignored).

===================================================================================================
Training forward per family (diffusers 0.42.1, transformers 5.24; read from the installed
``diffusers/pipelines/...`` and the diffusers ``examples/`` training scripts named below)
===================================================================================================
Common: ``vae.encode(pixels).latent_dist.sample()`` with pixels in [-1, 1] (the pipelines'
``VaeImageProcessor.preprocess`` maps [0, 1] -> [-1, 1]); decode is the exact inverse of the
normalisation below (the pipelines do ``latents / scaling_factor + shift_factor``, SD/SDXL just
``/ scaling_factor``).

SD1 / SD2 (``StableDiffusionPipeline``; ``examples/text_to_image/train_text_to_image_lora.py``)
  * ``prompt_embeds, negative = pipe.encode_prompt(prompt, device, num_images_per_prompt,
    do_classifier_free_guidance, negative_prompt=None, ..., clip_skip=None)`` -> ``(B, 77, hidden)``
    (``text_encoder(ids)[0]``: the last hidden state after ``final_layer_norm``; tokenizer pads to
    ``tokenizer.model_max_length``). ``negative`` is None unless CFG. Training scripts call
    ``text_encoder(input_ids, return_dict=False)[0]`` directly (same thing).
  * latents = ``vae.encode(x).latent_dist.sample() * vae.config.scaling_factor`` (0.18215 SD1/2; no shift).
  * ``noise = randn_like``; ``t = randint(0, scheduler.config.num_train_timesteps)`` (integer 0..999);
    ``noisy = noise_scheduler.add_noise(latents, noise, t)`` (DDPM: sqrt(ab_t) x0 + sqrt(1-ab_t) eps).
  * ``pred = unet(noisy, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]``.
  * target: ``epsilon`` -> ``noise``; ``v_prediction`` -> ``noise_scheduler.get_velocity(latents, noise, t)``
    (= sqrt(ab_t) eps - sqrt(1-ab_t) x0). Loss MSE (float32). Target chosen from
    ``noise_scheduler.config.prediction_type``.

SDXL (``StableDiffusionXLPipeline``; ``examples/text_to_image/train_text_to_image_lora_sdxl.py``)
  * ``prompt_embeds, neg, pooled_prompt_embeds, neg_pooled = pipe.encode_prompt(prompt, prompt_2=None,
    device=None, num_images_per_prompt=1, do_classifier_free_guidance=True, ...)``: for each of
    (tokenizer, text_encoder) and (tokenizer_2, text_encoder_2): ``out = te(ids, output_hidden_states=True)``,
    hidden = ``out.hidden_states[-2]`` (penultimate, NOT final-layer-normed; ``clip_skip`` k -> ``[-(k+2)]``),
    pooled = ``out[0]`` of the LAST encoder only (``text_embeds`` of ``CLIPTextModelWithProjection``,
    ``projection_dim``). ``prompt_embeds = cat([h1, h2], -1)`` -> ``(B, 77, hidden1 + hidden2)`` =
    ``unet.config.cross_attention_dim``. With ``force_zeros_for_empty_prompt`` the negative is zeros.
  * latents = ``sample() * scaling_factor`` (0.13025 SDXL; no shift; the pipeline also supports
    ``latents_mean/std`` in the VAE config, unused by SDXL's VAE).
  * ``add_time_ids = pipe._get_add_time_ids(original_size, crops_coords_top_left, target_size,
    dtype, text_encoder_projection_dim=text_encoder_2.config.projection_dim)`` -> tensor ``(1, 6)``
    = ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` (pixels); it checks
    ``unet.config.addition_time_embed_dim * 6 + projection_dim ==
    unet.add_embedding.linear_1.in_features`` (i.e. ``projection_class_embeddings_input_dim``).
    The SDXL training script builds the same list per sample (original size before resize, the
    crop's top-left, the training resolution).
  * ``pred = unet(noisy, t, encoder_hidden_states=prompt_embeds,
    added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids}, return_dict=False)[0]``;
    timesteps/targets as SD. The saved scheduler is ``EulerDiscreteScheduler`` (inference); its
    ``add_noise`` is ``x0 + sigma * noise`` (a k-diffusion parametrisation that needs
    ``scale_model_input``), so train as the script does with a DDPM view of the same betas:
    ``DDPMScheduler.from_config(pipe.scheduler.config)`` (``add_noise`` / ``get_velocity``).

FLUX.1 (``FluxPipeline``; ``examples/dreambooth/train_dreambooth_lora_flux.py``)
  * ``prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(prompt, prompt_2=None,
    device=None, num_images_per_prompt=1, prompt_embeds=None, pooled_prompt_embeds=None,
    max_sequence_length=512, lora_scale=None)``: pooled = CLIP ``text_encoder(ids).pooler_output``
    ``(B, clip_hidden)`` (= ``transformer.config.pooled_projection_dim``); ``prompt_embeds`` = T5
    ``text_encoder_2(ids)[0]`` ``(B, max_sequence_length, d_model)`` (= ``joint_attention_dim``; T5 pads to
    ``max_sequence_length`` exactly, ``<= 512``); ``text_ids = zeros(seq_len, 3)`` (2-D, no batch dim).
  * latents = ``(vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor``
    (FLUX VAE: shift 0.1159, scale 0.3611; 16 latent channels).
  * packing: ``vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)``;
    ``FluxPipeline._pack_latents(latents, B, C, h, w)`` -> ``(B, (h//2)*(w//2), 4C)`` (2x2 patches,
    channel order C,2,2); ``transformer.config.in_channels == 4 * latent_channels``;
    ``img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, device, dtype)`` -> ``(h/2 * w/2, 3)``
    (``[0, row, col]``; 2-D, the batch argument is unused). ``_unpack_latents(pred, H_pixels, W_pixels,
    vae_scale_factor)`` inverts the packing (it takes PIXEL sizes). All three are staticmethods.
  * noise/timestep (script): ``u = compute_density_for_timestep_sampling(weighting_scheme, B, logit_mean,
    logit_std, mode_scale)`` (``diffusers.training_utils``; "none"/uniform, "logit_normal", "mode"),
    ``indices = (u * num_train_timesteps).long()``, ``timesteps = sched.timesteps[indices]`` and
    ``sigmas = sched.sigmas[indices]`` of a ``FlowMatchEulerDiscreteScheduler`` built from the saved
    config. Its construction-time tables: ``sigmas = linspace(1, 1/N)``, then ``shift * s / (1 + (shift - 1) * s)``
    ONLY when ``use_dynamic_shifting`` is False; ``timesteps = sigmas * N`` (N = 1000). FLUX.1-dev's config
    has ``use_dynamic_shifting=True``, so the training table is UNshifted (the static ``shift=3.0`` is
    unused); SD3's (``shift=3.0``, no dynamic shifting) is shifted. ``noisy = (1 - sigma) * latents + sigma * noise``.
  * ``pred = transformer(hidden_states=packed_noisy, timestep=timesteps / 1000, guidance=guidance,
    pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids,
    return_dict=False)[0]`` -> packed ``(B, h/2 * w/2, 4C)``: ``timestep`` is the SIGMA in [0, 1] (the pipeline
    passes ``t / 1000``; the model multiplies by 1000 inside its time embedding; ``guidance`` likewise is
    passed raw, e.g. 3.5, and scaled by 1000 inside). ``guidance = full((B,), guidance_scale)`` iff
    ``transformer.config.guidance_embeds`` (FLUX.1-dev: yes, script default ``--guidance_scale 3.5``;
    schnell: None).
  * target: flow matching ``noise - latents``; the script unpacks ``pred`` back to ``(B, C, h, w)`` with
    ``_unpack_latents`` (pixel sizes: ``h * vae_scale_factor``; the script derives them from its own
    ``2 ** len(block_out_channels)`` halved, the same numbers) and compares with ``noise - latents``; loss
    weighted by ``compute_loss_weighting_for_sd3(weighting_scheme, sigmas)`` (ones unless
    "sigma_sqrt"/"cosmap"). The stored script version passes the UNhalved latent sizes to
    ``_prepare_latent_image_ids`` (older diffusers halved inside it); 0.42's takes the packed grid size.
  * scheduler config as FLUX.1-dev: ``shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096``; at inference the pipeline passes
    ``sigmas = linspace(1, 1/steps)`` and ``mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)``
    (``pipeline_flux.calculate_shift``: linear in the packed token count) to ``set_timesteps``, which applies
    the exponential time shift ``exp(mu) / (exp(mu) + (1/s - 1))``. Training scripts don't use ``mu``.

SD3 / SD3.5 (``StableDiffusion3Pipeline``; ``examples/dreambooth/train_dreambooth_lora_sd3.py``)
  * ``prompt_embeds, neg, pooled_prompt_embeds, neg_pooled = pipe.encode_prompt(prompt, prompt_2,
    prompt_3, device=None, num_images_per_prompt=1, do_classifier_free_guidance=True, ...,
    clip_skip=None, max_sequence_length=256, lora_scale=None)`` (``prompt_2``/``prompt_3`` are required
    positionals: pass None to reuse ``prompt``). Per CLIP: hidden = ``hidden_states[-2]``, pooled =
    ``out[0]`` (projected ``text_embeds``); ``clip = cat([h_L, h_G], -1)`` zero-padded on the last dim to the
    T5 width; ``prompt_embeds = cat([clip, t5], dim=-2)`` -> ``(B, 77 + max_sequence_length, d_t5)``;
    ``pooled = cat([pooled_L, pooled_G], -1)`` (= ``pooled_projection_dim``). Without text_encoder_3 the
    T5 part is zeros of ``(B, max_sequence_length, transformer.config.joint_attention_dim)``.
  * latents = ``(sample() - shift_factor) * scaling_factor`` (SD3 VAE: shift 0.0609, scale 1.5305;
    16 channels = ``transformer.config.in_channels``; no packing: the transformer patchifies with
    ``patch_size`` itself, sides must be multiples of ``vae_scale_factor * patch_size``).
  * timesteps/sigmas/noisy input as FLUX, but SD3's scheduler (``FlowMatchEulerDiscreteScheduler(shift=3.0)``,
    no dynamic shifting) has shifted training tables (sigma = 3s / (1 + 2s)).
  * ``pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled, return_dict=False)[0]`` -> same shape as ``latents``: ``timestep`` is
    ``sigma * 1000`` (the pipeline passes the scheduler's ``t`` unchanged; contrast FLUX's ``t / 1000``).
    No guidance input, no ids, no packing.
  * target ``noise - latents``; with the script's ``--precondition_outputs`` (older versions: always)
    ``pred * (-sigma) + noisy`` is compared with ``latents`` instead. Older scripts also skipped the
    ``shift_factor`` on encode; the 0.42 pipeline decodes ``latents / scaling_factor + shift_factor``, so a
    trainer must encode ``(x - shift_factor) * scaling_factor``.

UNet timesteps are integers in [0, num_train_timesteps); DiT timesteps are floats (FLUX sigma, SD3 sigma*1000).
The tests in ``tests/app/test_pipelines_helper.py`` (``test_training_forward_*``) run each of these
recipes on the tiny pipelines (shapes, pack/unpack round trip, ``_get_add_time_ids``' check).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from helpers.dit import clip_encoder, t5_encoder

FAMILIES = ("sd1", "sd2v", "sdxl", "flux", "sd3")

VAE_SCALE = 2  # 2 ** (len(block_out_channels) - 1) with block_out_channels = (8, 16)
_PATCH = {"sd1": 1, "sd2v": 1, "sdxl": 1, "flux": 2, "sd3": 2}

#: smallest side each pipeline's ``__call__`` accepts (SD/SDXL ``check_inputs``: ``% 8``).
MIN_SIDE = {"sd1": 8, "sd2v": 8, "sdxl": 8, "flux": 4, "sd3": 4}
#: largest side (SD3: ``pos_embed_max_size`` latent patches x patch x VAE; others: no limit).
SD3_POS_EMBED_MAX = 64
MAX_SIDE = {"sd1": None, "sd2v": None, "sdxl": None, "flux": None, "sd3": SD3_POS_EMBED_MAX * 2 * VAE_SCALE}

CLIP_MAX_LENGTH = 16  # = helpers.dit.clip_encoder's max_position_embeddings
T5_MAX_LENGTH = 16  # a small max_sequence_length to pass to FLUX/SD3 (the pipelines default to 512/256)
_VOCAB_SIZE = 64  # = helpers.dit's CLIP/T5 vocab_size


def family_factor(family: str) -> int:
    """The multiple an image side must have for ``family``'s tiny pipeline (VAE factor x patch)."""
    if family not in _PATCH:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return VAE_SCALE * _PATCH[family]


# ------------------------------------------------------------------ tokenizers
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (64 tokens).

    ids: 0 ``<|startoftext|>``, 1 ``<|endoftext|>`` (also unk and pad, as OpenAI's CLIP), then each
    letter mid-word and word-final (``a`` / ``a</w>``: CLIP marks word ends with ``</w>``), digits
    0-7 (CLIP's pre-tokenizer makes every digit its own word, so only ``0</w>``.. are needed), ``,</w>``
    and ``.</w>``. No merges: every token is a single character.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab[c] = len(vocab)
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    for c in "01234567,.":
        vocab[c + "</w>"] = len(vocab)
    assert len(vocab) == _VOCAB_SIZE, len(vocab)
    return vocab


def clip_tokenizer_files(directory: Path) -> Path:
    """:func:`clip_vocab` as ``vocab.json`` + an empty ``merges.txt`` in ``directory`` (the slow-tokenizer files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(clip_vocab()))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A character-level Unigram ``T5Tokenizer`` (64 pieces: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁``, letters,
    ``▁``+letter, digits, punctuation; no ``<extra_id_*>`` sentinels)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _LETTERS]
    pieces += [("\u2581" + c, -2.5) for c in _LETTERS]
    pieces += [(c, -4.0) for c in "0123456789,.-'"]
    pieces = pieces[:_VOCAB_SIZE]
    assert len(pieces) <= _VOCAB_SIZE
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ------------------------------------------------------------------ components
def _vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float | None, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor, **kw,
    ).eval()


def _unet(seed: int, cross_attention_dim: int, sdxl: bool, prediction_v: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = {}
    if sdxl:
        kw = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=8 + 6 * 4,  # text_encoder_2 projection_dim + 6 time ids
                  use_linear_projection=True)
    elif prediction_v:
        kw = dict(use_linear_projection=True)  # as SD2's UNet
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **kw,
    ).eval()


def _ddpm(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type, steps_offset=1,
                         timestep_spacing="leading")


def _build(family: str, prediction_type: str, seed: int):
    import diffusers

    if family in ("sd1", "sd2v"):
        pt = "v_prediction" if family == "sd2v" else prediction_type
        return diffusers.StableDiffusionPipeline(
            vae=_vae(seed, 4, 0.18215, None, False), text_encoder=clip_encoder(seed=seed + 1), tokenizer=clip_tokenizer(),
            unet=_unet(seed + 2, 16, False, family == "sd2v"), scheduler=_ddpm(pt),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=prediction_type,
                                       timestep_spacing="leading", steps_offset=1, interpolation_type="linear")
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(seed, 4, 0.13025, None, False), text_encoder=clip_encoder(seed=seed + 1),
            text_encoder_2=clip_encoder(True, seed=seed + 2), tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
            unet=_unet(seed + 3, 32, True), scheduler=sched, force_zeros_for_empty_prompt=True,
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "flux":
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(seed + 3)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        ).eval()
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
        return diffusers.FluxPipeline(
            scheduler=sched, vae=_vae(seed, 4, 0.3611, 0.1159, True), text_encoder=clip_encoder(seed=seed + 1),
            tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(seed + 2), tokenizer_2=t5_tokenizer(),
            transformer=transformer,
        )
    if family == "sd3":
        from diffusers import SD3Transformer2DModel
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed + 4)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=SD3_POS_EMBED_MAX,
        ).eval()
        torch.manual_seed(seed + 3)
        # T5 width = the two CLIP widths concatenated (16 + 16), so the CLIP part is padded by 0
        t5 = T5EncoderModel(T5Config(vocab_size=_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=_vae(seed, 4, 1.5305, 0.0609, True), text_encoder=clip_encoder(True, seed=seed + 1),
            tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(True, seed=seed + 2), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5, tokenizer_3=t5_tokenizer(),
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_pipeline(family: str, *, prediction_type: str = "epsilon", seed: int = 0):
    """The tiny pipeline object itself (not saved)."""
    return _build(family, prediction_type, seed)


def make_pipeline_dir(family: str, root: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build ``family``'s tiny pipeline and save it to ``root/<family>`` (returned)."""
    out = Path(root) / family
    _build(family, prediction_type, seed).save_pretrained(out)
    return out


# ------------------------------------------------------------------ images
_COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 190, 60), "yellow": (230, 210, 40)}


def _image(size: tuple[int, int], color: tuple[int, int, int], rng: random.Random):
    """A ``size`` = (width, height) RGB image: ``color`` with a gradient and a few random rectangles."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), color)
    px = img.load()
    for y in range(h):
        for x in range(w):
            r, g, b = color
            d = (x * 40) // max(w, 1) - (y * 40) // max(h, 1)
            px[x, y] = (max(0, min(255, r + d)), max(0, min(255, g + d)), max(0, min(255, b - d)))
    draw = ImageDraw.Draw(img)
    for _ in range(2):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        draw.rectangle([x0, y0, min(w - 1, x0 + w // 4), min(h - 1, y0 + h // 4)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def _save(img, path: Path) -> Path:
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:].lower()]
    img.save(path, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return path


def make_image_folder(root: Path, n: int = 6, sizes=((40, 32), (32, 48), (64, 64)), formats=("png", "jpg", "webp"),
                      captions: bool = True, layout: str = "flat", seed: int = 0) -> Path:
    """``n`` small colored images (``sizes`` are (width, height), cycled; ``formats`` cycled) in ``root``.

    * ``flat``: ``root/img_000.png`` ... with same-name ``.txt`` captions ("a red thing").
    * ``kohya``: ``root/3_redthing/`` (even-indexed images, red) and ``root/1_bluething/`` (odd, blue);
      ``<repeats>_<name>`` folders, same-name ``.txt`` captions inside.
    * ``jsonl``: images in ``root`` and ``root/metadata.jsonl`` with ``{"file_name", "text"}`` per line
      (HF ``imagefolder``); no metadata file when ``captions`` is False.
    Returns ``root``.
    """
    if layout not in ("flat", "kohya", "jsonl"):
        raise ValueError(f"layout must be flat, kohya or jsonl, not {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(_COLORS)
    meta = []
    for i in range(n):
        size, fmt = sizes[i % len(sizes)], formats[i % len(formats)]
        if layout == "kohya":
            color, folder = ("red", root / "3_redthing") if i % 2 == 0 else ("blue", root / "1_bluething")
        else:
            color, folder = names[i % len(names)], root
        folder.mkdir(exist_ok=True)
        path = _save(_image(size, _COLORS[color], rng), folder / f"img_{i:03d}.{fmt}")
        text = f"a {color} thing"
        if captions and layout != "jsonl":
            path.with_suffix(".txt").write_text(text + "\n")
        meta.append({"file_name": path.name, "text": text})
    if captions and layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root


def make_truncated_image(path: Path, size: tuple[int, int] = (32, 32), keep: float = 0.5) -> Path:
    """An image file cut to ``keep`` of its bytes (format from the suffix): ``PIL.Image.open`` reads the
    header, ``.load()``/``.convert()`` raises ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(_image(size, _COLORS["green"], random.Random(1)), path)
    data = path.read_bytes()
    path.write_bytes(data[: max(16, int(len(data) * keep))])
    return path


def make_uncaptioned_image(folder: Path, name: str = "nocaption.png", size: tuple[int, int] = (32, 32)) -> Path:
    """A valid image in ``folder`` without a ``.txt`` caption (or metadata line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _save(_image(size, _COLORS["yellow"], random.Random(2)), folder / name)
