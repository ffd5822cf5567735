"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``) and SAI's original MMDiT tree.

SAI's tree (``joint_blocks.N.x_block.attn.qkv``, what kohya sd-scripts trains on) fuses the
attention projections: ``x_block.attn.qkv`` = ``attn.to_q`` / ``to_k`` / ``to_v`` by rows,
``context_block.attn.qkv`` = ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, SD3.5's
``x_block.attn2.qkv`` = ``attn2.to_q`` / ``to_k`` / ``to_v``. The final norm
(``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear``) and the last block's context
modulation (``context_block.adaLN_modulation.1`` ↔ ``norm1_context.linear``, an
``AdaLayerNormContinuous`` there) order their halves (shift, scale) where diffusers has
(scale, shift).
"""

from __future__ import annotations

import torch.nn as nn

from . import Family, Target, TextEncoderSlot, block_names

__all__ = ["SD3", "sai_names"]

BLOCKS = {
    ("transformer_blocks", "joint_blocks"): {
        "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "x_block.attn.proj": "attn.to_out.0",
        "x_block.attn2.proj": "attn2.to_out.0",
        "context_block.attn.proj": "attn.to_add_out",
        "x_block.mlp.fc1": "ff.net.0.proj",
        "x_block.mlp.fc2": "ff.net.2",
        "context_block.mlp.fc1": "ff_context.net.0.proj",
        "context_block.mlp.fc2": "ff_context.net.2",
        "x_block.adaLN_modulation.1": "norm1.linear",
        "context_block.adaLN_modulation.1": "norm1_context.linear",
    },
}
SINGLES = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def sai_names(model: nn.Module) -> dict[str, Target]:
    """SAI path -> diffusers Target for every module of an ``SD3Transformer2DModel``."""
    return block_names(model, BLOCKS, SINGLES)


SD3 = Family(
    name="sd3",
    label="SD3/3.5",
    model_classes=("SD3Transformer2DModel",),
    component="transformer",
    text_encoders=(
        TextEncoderSlot("text_encoder", ("lora_te1", "lora_te"), ("text_encoder.",), ("text_encoders.clip_l.transformer.",)),
        TextEncoderSlot("text_encoder_2", ("lora_te2",), ("text_encoder_2.",), ("text_encoders.clip_g.transformer.",)),
        TextEncoderSlot("text_encoder_3", ("lora_te3",), ("text_encoder_3.",), ("text_encoders.t5xxl.transformer.",)),
    ),
    original_names=sai_names,
    diffusers_prefixes=("transformer.", "base_model.model.", ""),
    flat_prefixes=("lora_transformer_", "lycoris_", "lora_unet_"),
    save_style="lora_transformer_",
    file_words=r"joint_blocks|x_block|context_block|pos_embed",
    base_model_version="sd3",
    conv_words=r"x_embedder_proj|pos_embed_proj|x_embedder\.proj|pos_embed\.proj",
)
