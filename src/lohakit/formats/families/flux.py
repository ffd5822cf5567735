"""FLUX.1 (diffusers ``FluxTransformer2DModel``) and its original BFL module tree.

kohya sd-scripts trains FLUX on BFL's tree (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``); SimpleTuner, OneTrainer and diffusers name diffusers' tree. The
BFL tree fuses what diffusers keeps apart:

* ``double_blocks.N.img_attn.qkv`` = ``attn.to_q`` / ``to_k`` / ``to_v`` stacked by rows,
  ``txt_attn.qkv`` = ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``;
* ``single_blocks.N.linear1`` = ``attn.to_q``, ``to_k``, ``to_v`` (hidden rows each) then
  ``proj_mlp`` (the MLP input);
* ``final_layer.adaLN_modulation.1`` = ``norm_out.linear`` with its (shift, scale) halves swapped.
"""

from __future__ import annotations

import torch.nn as nn

from . import Family, Target, TextEncoderSlot, block_names

__all__ = ["FLUX", "bfl_names"]

#: (diffusers block list, BFL block list) -> {BFL child: diffusers child(ren)}
BLOCKS = {
    ("transformer_blocks", "double_blocks"): {
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
    },
    ("single_transformer_blocks", "single_blocks"): {
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        "linear2": "proj_out",
        "modulation.lin": "norm.linear",
    },
}
#: BFL path -> diffusers path outside the blocks
SINGLES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def bfl_names(model: nn.Module) -> dict[str, Target]:
    """BFL path -> diffusers Target for every module of a ``FluxTransformer2DModel``."""
    return block_names(model, BLOCKS, SINGLES)


FLUX = Family(
    name="flux",
    label="FLUX.1",
    model_classes=("FluxTransformer2DModel",),
    component="transformer",
    text_encoders=(
        TextEncoderSlot("text_encoder", ("lora_te1", "lora_te"), ("text_encoder.",), ("text_encoders.clip_l.transformer.",)),
        # ComfyUI reads FLUX's T5 as lora_te2_ (OneTrainer) or lora_te3_
        TextEncoderSlot("text_encoder_2", ("lora_te2", "lora_te3"), ("text_encoder_2.",), ("text_encoders.t5xxl.transformer.",)),
    ),
    original_names=bfl_names,
    diffusers_prefixes=("transformer.", ""),
    flat_prefixes=("lora_transformer_", "lycoris_", "lora_unet_"),
    save_style="lora_transformer_",
    file_words=r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|img_mlp|txt_mlp|guidance_in|guidance_embedder",
    base_model_version="flux1",
)
