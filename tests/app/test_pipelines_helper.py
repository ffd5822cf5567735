"""``tests/helpers/pipelines.py``: the tiny pipeline directories load back with
``DiffusionPipeline.from_pretrained`` and generate images at every family's smallest side; the
training-forward recipes of its docstring run on them; the image folders have the promised layouts.

Torch runs single-threaded here (restored afterwards): on the 2-vCPU CI box the tiny convolutions
are ~80x slower with 2 OpenMP threads than with 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from helpers.pipelines import (
    CLIP_MAX_LENGTH,
    FAMILIES,
    MAX_SIDE,
    MIN_SIDE,
    T5_MAX_LENGTH,
    clip_tokenizer,
    clip_tokenizer_files,
    family_factor,
    make_image_folder,
    make_pipeline_dir,
    make_truncated_image,
    make_uncaptioned_image,
    t5_tokenizer,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CLASSES = {"sd1": "StableDiffusionPipeline", "sd2v": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
           "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {f: make_pipeline_dir(f, root) for f in FAMILIES}


def _load(d: Path):
    pipe = diffusers.DiffusionPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_dir_loads_and_generates(family, pipe_dirs):
    d = pipe_dirs[family]
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == CLASSES[family]
    pipe = _load(d)
    assert type(pipe).__name__ == CLASSES[family]
    f = family_factor(family)
    kw = {"max_sequence_length": T5_MAX_LENGTH} if family in ("flux", "sd3") else {}
    lo = MIN_SIDE[family]
    sizes = [(lo, lo), (16, 24), (32, 32)]
    for h, w in sizes:
        assert h % f == 0 and w % f == 0
        out = pipe(prompt=["a red dog"], num_inference_steps=2, height=h, width=w, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **kw).images
        assert out.shape == (1, 3, h, w)
        assert torch.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1
    # the T5 default lengths (512 FLUX / 256 SD3) work as well
    out = pipe(prompt="a red dog", num_inference_steps=1, height=16, width=16, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_fast_and_deterministic(family, tmp_path):
    make_pipeline_dir(family, tmp_path / "warm")  # imports
    t0 = time.perf_counter()
    a = make_pipeline_dir(family, tmp_path / "a", seed=3)
    assert time.perf_counter() - t0 < 3.0
    b = make_pipeline_dir(family, tmp_path / "b", seed=3)
    c = make_pipeline_dir(family, tmp_path / "c", seed=4)
    from safetensors.torch import load_file

    name = "transformer" if family in ("flux", "sd3") else "unet"
    sa, sb, sc = (load_file(next((p / name).glob("*.safetensors"))) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_factors_match_the_pipelines(pipe_dirs):
    assert {f: family_factor(f) for f in FAMILIES} == {"sd1": 2, "sd2v": 2, "sdxl": 2, "flux": 4, "sd3": 4}
    for f in FAMILIES:
        pipe = _load(pipe_dirs[f])
        patch = {"flux": 2, "sd3": getattr(pipe, "patch_size", None)}.get(f, 1)  # FLUX: 2x2 packing
        assert pipe.vae_scale_factor * patch == family_factor(f)
        assert MIN_SIDE[f] % family_factor(f) == 0
    sd3 = _load(pipe_dirs["sd3"])
    assert MAX_SIDE["sd3"] == sd3.transformer.config.pos_embed_max_size * sd3.patch_size * sd3.vae_scale_factor
    with pytest.raises(ValueError, match="divisible"):
        sd3(prompt="a", num_inference_steps=1, height=6, width=8, output_type="pt")
    sd1 = _load(pipe_dirs["sd1"])
    with pytest.raises(ValueError, match="divisible by 8"):
        sd1(prompt="a", num_inference_steps=1, height=4, width=8, output_type="pt")
    with pytest.raises(ValueError):
        family_factor("sd4")


def test_prediction_types(tmp_path):
    get = lambda f, **kw: json.loads((make_pipeline_dir(f, tmp_path / f"{f}{kw}", **kw) / "scheduler" / "scheduler_config.json").read_text())  # noqa: E731
    assert get("sd1")["prediction_type"] == "epsilon" and get("sd1")["_class_name"] == "DDPMScheduler"
    assert get("sd1", prediction_type="v_prediction")["prediction_type"] == "v_prediction"
    assert get("sd2v")["prediction_type"] == "v_prediction"
    assert get("sdxl")["_class_name"] == "EulerDiscreteScheduler"
    flux = get("flux")
    assert flux["_class_name"] == "FlowMatchEulerDiscreteScheduler" and flux["use_dynamic_shifting"] and flux["shift"] == 3.0
    sd3 = get("sd3")
    assert sd3["shift"] == 3.0 and not sd3["use_dynamic_shifting"]


# ------------------------------------------------------------------ training forward (the docstring's recipes)
def _pixels(h=16, w=24):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_training_forward_sd(family, pipe_dirs):
    pipe = _load(pipe_dirs[family])
    pe, neg = pipe.encode_prompt(["a red dog"], "cpu", 1, False)
    assert neg is None and pe.shape == (1, CLIP_MAX_LENGTH, pipe.unet.config.cross_attention_dim)
    lat = pipe.vae.encode(_pixels()).latent_dist.sample() * pipe.vae.config.scaling_factor
    assert lat.shape == (1, 4, 8, 12)
    sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    t = torch.tensor([500])
    noise = torch.randn_like(lat)
    noisy = sched.add_noise(lat, noise, t)
    pred = pipe.unet(noisy, t, encoder_hidden_states=pe, return_dict=False)[0]
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
    assert sched.config.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    assert pred.shape == target.shape


@torch.no_grad()
def test_training_forward_sdxl(pipe_dirs):
    pipe = _load(pipe_dirs["sdxl"])
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(["a red dog"], device="cpu", do_classifier_free_guidance=False)
    assert pe.shape == (1, CLIP_MAX_LENGTH, 32) == (1, CLIP_MAX_LENGTH, pipe.unet.config.cross_attention_dim)
    assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim) and neg is None
    lat = pipe.vae.encode(_pixels()).latent_dist.sample() * pipe.vae.config.scaling_factor
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert ids.tolist() == [[16, 24, 0, 0, 16, 24]]
    with pytest.raises(ValueError, match="added time embedding"):
        pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=pe.dtype, text_encoder_projection_dim=7)
    sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    t = torch.tensor([10])
    noisy = sched.add_noise(lat, torch.randn_like(lat), t)
    pred = pipe.unet(noisy, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                     return_dict=False)[0]
    assert pred.shape == lat.shape


@torch.no_grad()
def test_training_forward_flux(pipe_dirs):
    from diffusers import FluxPipeline

    pipe = _load(pipe_dirs["flux"])
    pe, pooled, txt_ids = pipe.encode_prompt(["a red dog"], prompt_2=None, max_sequence_length=8)
    assert pe.shape == (1, 8, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim) and txt_ids.shape == (8, 3)
    cfg = pipe.vae.config
    lat = (pipe.vae.encode(_pixels()).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor
    b, c, h, w = lat.shape
    assert (c, h, w) == (4, 8, 12) and pipe.transformer.config.in_channels == 4 * c
    packed = FluxPipeline._pack_latents(lat, b, c, h, w)
    assert packed.shape == (1, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(FluxPipeline._unpack_latents(packed, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                    pipe.vae_scale_factor), lat)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", lat.dtype)
    assert img_ids.shape == (h // 2 * w // 2, 3) and img_ids[-1].tolist() == [0, h // 2 - 1, w // 2 - 1]

    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # use_dynamic_shifting: the training tables are unshifted, timesteps = sigmas * 1000
    assert torch.allclose(sched.sigmas, torch.linspace(1, 1e-3, 1000))
    idx = torch.tensor([300])
    sigma, timestep = sched.sigmas[idx], sched.timesteps[idx]
    assert torch.allclose(timestep, sigma * 1000)
    noise = torch.randn_like(lat)
    noisy = (1 - sigma) * lat + sigma * noise
    pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timestep / 1000,
                            guidance=torch.full((b,), 3.5), pooled_projections=pooled, encoder_hidden_states=pe,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    assert pred.shape == packed.shape
    pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
    assert pred.shape == (noise - lat).shape


@torch.no_grad()
def test_training_forward_sd3(pipe_dirs):
    pipe = _load(pipe_dirs["sd3"])
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(["a red dog"], None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=8)
    assert pe.shape == (1, CLIP_MAX_LENGTH + 8, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim) and neg is None
    cfg = pipe.vae.config
    lat = (pipe.vae.encode(_pixels()).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor
    assert lat.shape[1] == pipe.transformer.config.in_channels
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    s = torch.linspace(1, 1e-3, 1000)
    assert torch.allclose(sched.sigmas, 3 * s / (1 + 2 * s))  # static shift 3
    idx = torch.tensor([300])
    sigma, timestep = sched.sigmas[idx], sched.timesteps[idx]
    assert torch.allclose(timestep, sigma * 1000)
    noise = torch.randn_like(lat)
    pred = pipe.transformer(hidden_states=(1 - sigma) * lat + sigma * noise, timestep=timestep,
                            encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
    assert pred.shape == lat.shape


# ------------------------------------------------------------------ tokenizers
def test_tokenizers(tmp_path):
    from transformers import CLIPTokenizer

    tok = clip_tokenizer()
    ids = tok(["a red dog"], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids[0]
    assert tok.convert_ids_to_tokens(ids[:9]) == ["<|startoftext|>", "a</w>", "r", "e", "d</w>", "d", "o", "g</w>",
                                                 "<|endoftext|>"]
    assert max(ids) < 64 and tok.bos_token_id == 0 and tok.eos_token_id == 1
    # the slow-style files load into the same tokenizer
    d = clip_tokenizer_files(tmp_path / "clip")
    again = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=CLIP_MAX_LENGTH)
    assert again(["a red dog"]).input_ids == tok(["a red dog"]).input_ids
    t5 = t5_tokenizer()
    ids = t5(["a red dog"]).input_ids[0]
    assert ids[-1] == t5.eos_token_id == 1 and max(ids) < 64 and len(t5) == 64 and t5.pad_token_id == 0


# ------------------------------------------------------------------ image folders
def _images(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".webp"))


def test_image_folder_flat(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "flat")
    imgs = _images(root)
    assert len(imgs) == 6 and {p.suffix for p in imgs} == {".png", ".jpg", ".webp"}
    sizes = set()
    for p in imgs:
        with Image.open(p) as im:
            im.load()
            sizes.add(im.size)
            assert im.mode == "RGB"
        assert p.with_suffix(".txt").read_text().strip().startswith("a ")
    assert sizes == {(40, 32), (32, 48), (64, 64)}
    assert not list(make_image_folder(tmp_path / "bare", n=2, captions=False).glob("*.txt"))


def test_image_folder_kohya_and_jsonl(tmp_path):
    root = make_image_folder(tmp_path / "k", layout="kohya")
    assert sorted(p.name for p in root.iterdir()) == ["1_bluething", "3_redthing"]
    assert len(_images(root / "3_redthing")) == 3 and len(_images(root / "1_bluething")) == 3
    assert all(p.with_suffix(".txt").read_text().strip() == "a blue thing" for p in _images(root / "1_bluething"))
    root = make_image_folder(tmp_path / "j", n=4, layout="jsonl")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in _images(root)]
    assert all(set(r) == {"file_name", "text"} for r in rows) and not list(root.glob("*.txt"))
    with pytest.raises(ValueError):
        make_image_folder(tmp_path / "x", layout="coco")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_truncated_and_uncaptioned(tmp_path, suffix):
    from PIL import Image

    bad = make_truncated_image(tmp_path / f"bad{suffix}")
    with pytest.raises(OSError):
        with Image.open(bad) as im:
            im.load()
    ok = make_uncaptioned_image(tmp_path / "d")
    with Image.open(ok) as im:
        im.load()
    assert not ok.with_suffix(".txt").exists()
