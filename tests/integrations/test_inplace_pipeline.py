"""In-place injection in a diffusers pipeline: the component keeps its class, so the pipeline saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers.models import sd1_pipe, unet_out
from lohakit import LoHaConfig, LoHaLayer, LoHaModel, inject_adapter_in_model
from lohakit.diffusers import save_loha_weights
from lohakit.formats.kohya import load_kohya


NONE = dict(tokenizer=None, safety_checker=None, feature_extractor=None, image_encoder=None)


def tiny_sd_pipeline():
    """A real StableDiffusionPipeline from small configs (no tokenizer: it needs vocabulary files)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    parts = sd1_pipe()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionPipeline(vae=vae, text_encoder=parts.text_encoder, tokenizer=None, unet=parts.unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_pipeline_with_injected_unet_saves_and_reloads(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = tiny_sd_pipeline()
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base_out = unet_out(pipe.unet)
    inject_adapter_in_model(LoHaConfig(r=2, alpha=4, target_modules=["to_q", "to_v"], init_weights=False), pipe.unet)
    assert type(pipe.unet) is UNet2DConditionModel and any(isinstance(m, LoHaLayer) for m in pipe.unet.modules())
    adapted_out = unet_out(pipe.unet)
    assert not torch.allclose(adapted_out, base_out)

    pipe.save_pretrained(str(tmp_path / "pipe"))  # base weights under the UNet's own names
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), **NONE)
    assert type(again.unet) is UNet2DConditionModel
    sd = again.unet.state_dict()
    assert sd.keys() == base_unet.keys() and all(torch.equal(sd[k], v) for k, v in base_unet.items())

    # the adapter itself: a kohya file (ComfyUI / A1111) and PEFT's format
    save_loha_weights(pipe, str(tmp_path / "style.safetensors"), dtype=torch.float32)
    load_kohya(str(tmp_path / "style.safetensors"), {"lora_unet": again.unet})
    torch.testing.assert_close(unet_out(again.unet), adapted_out, atol=1e-5, rtol=1e-5)
    LoHaModel.attach(pipe.unet).save_pretrained(str(tmp_path / "peft"))
    fresh = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), **NONE).unet
    torch.testing.assert_close(unet_out(LoHaModel.from_pretrained(fresh, str(tmp_path / "peft"))), adapted_out, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- a LoHaModel wrapper inside a pipeline
def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else None


def test_pipeline_save_with_a_wrapper_refused_before_anything_is_written(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.unet = LoHaModel(pipe.unet, LoHaConfig(r=2, target_modules=["to_q"], init_weights=False))
    fresh = tmp_path / "new"
    with pytest.raises(TypeError) as info:
        pipe.save_pretrained(str(fresh))
    msg = str(info.value)
    assert "'unet'" in msg and "UNet2DConditionModel" in msg and "nothing was written" in msg
    assert "lohakit.inject_adapter_in_model" in msg and "save_loha_weights" in msg and "pipe.unet.save_pretrained" in msg
    assert "\n" not in msg
    assert not fresh.exists()  # the VAE, saved first by diffusers, was not written either

    old = tmp_path / "old"
    (old / "vae").mkdir(parents=True)
    (old / "model_index.json").write_text('{"keep": 1}')
    (old / "vae" / "config.json").write_text("{}")
    before = _snapshot(old)
    with pytest.raises(TypeError, match="unet"):
        pipe.save_pretrained(str(old))
    assert _snapshot(old) == before

    # the two ways the message names work
    save_loha_weights(pipe, str(tmp_path / "a.safetensors"), dtype=torch.float32)
    pipe.unet.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "a.safetensors").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()


def test_every_wrapped_component_is_named_once(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.unet = LoHaModel(pipe.unet, LoHaConfig(r=2, target_modules=["to_q"]))
    pipe.text_encoder = LoHaModel(pipe.text_encoder, LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError) as info:
        pipe.save_pretrained(str(tmp_path / "p"))
    assert "'unet'" in str(info.value) and "'text_encoder'" in str(info.value) and "CLIPTextModel" in str(info.value)
    assert not (tmp_path / "p").exists()


def test_pipeline_without_wrappers_saves_as_before(tmp_path):
    from diffusers import StableDiffusionPipeline

    LoHaModel(nn.Sequential(nn.Linear(2, 2)), LoHaConfig(r=1, target_modules=["0"]))  # the save guard is in place
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(str(tmp_path / "p"))
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"), **NONE)
    assert again.config["unet"][1] == "UNet2DConditionModel"


# ---------------------------------------------------------------- a kohya load, then pipe.save_pretrained
def _kohya_file(tmp_path):
    src = tiny_sd_pipeline()
    inject_adapter_in_model(LoHaConfig(r=2, alpha=4, target_modules=["to_q", "to_v"], init_weights=False), src.unet)
    f = tmp_path / "style.safetensors"
    save_loha_weights(src, str(f), dtype=torch.float32)
    return f, unet_out(src.unet)


@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_saved_after_a_kohya_load_has_base_keys_and_reloads(tmp_path, fuse):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from lohakit.diffusers import load_loha_weights

    f, adapted = _kohya_file(tmp_path)
    pipe = tiny_sd_pipeline()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    load_loha_weights(pipe, str(f), fuse=fuse)
    torch.testing.assert_close(unet_out(pipe.unet), adapted, atol=1e-5, rtol=1e-5)
    keys = list(pipe.unet.state_dict())
    assert keys == list(base) and not any("base_layer" in k or "hada_" in k for k in keys)

    pipe.save_pretrained(str(tmp_path / "pipe"))
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), **NONE)
    assert type(again.unet) is UNet2DConditionModel
    sd = again.unet.state_dict()
    assert sd.keys() == base.keys()
    if fuse:  # the merged weights were saved: the plain UNet reproduces the adapted one
        torch.testing.assert_close(unet_out(again.unet), adapted, atol=1e-5, rtol=1e-5)
    else:  # the base weights were saved; the file applies again on the reloaded pipeline
        assert all(torch.equal(sd[k], v) for k, v in base.items())
        load_loha_weights(again, str(f))
        torch.testing.assert_close(unet_out(again.unet), adapted, atol=1e-5, rtol=1e-5)


def test_guard_holds_when_the_wrapper_comes_before_any_pipeline(tmp_path):
    """UNet loaded and wrapped while no pipeline module is imported yet; then the pipeline is built."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import UNet2DConditionModel
        assert "diffusers.pipelines.pipeline_utils" not in sys.modules
        from lohakit import LoHaConfig, LoHaModel
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
            "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
        wrapped = LoHaModel(unet, LoHaConfig(r=2, target_modules=["to_q"]))
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=wrapped, scheduler=DDPMScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        try:
            pipe.save_pretrained({str(tmp_path / "p")!r})
        except TypeError as e:
            print("refused", "'unet'" in str(e))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("refused True"), r.stderr[-2000:]
    assert not (tmp_path / "p").exists()
