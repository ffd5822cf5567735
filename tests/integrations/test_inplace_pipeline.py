"""In-place injection in a diffusers pipeline: the component keeps its class, so the pipeline saves."""

from __future__ import annotations

import torch

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
