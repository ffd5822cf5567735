"""Stable Diffusion 1.x/2.x and SDXL: the original (LDM/SGM) UNet names kohya files use.

SD 1.x/2.x files from kohya's trainers name UNet modules on the diffusers tree
(``lora_unet_down_blocks_0_attentions_0_...``); SDXL files name them on the original SGM tree
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). The SGM table is generated
from the UNet's own block structure, never parsed back from file keys.
"""

from __future__ import annotations

import torch.nn as nn

from . import Family, TextEncoderSlot

__all__ = ["SGM_BLOCK_WORDS", "sgm_unet_names", "original_unet_paths", "SD", "SDXL"]

#: Words that appear only in SGM-tree UNet names (a file using them was written for SDXL's tree).
SGM_BLOCK_WORDS = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "label_emb", "lora_unet_out_")
#: diffusers ResnetBlock2D child -> SGM ResBlock child
_RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _sgm_block_prefixes(unet: nn.Module) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, SGM prefix, is a resnet) for every block of a UNet2DConditionModel."""
    out: list[tuple[str, str, bool]] = [
        ("conv_in", "input_blocks.0.0", False),
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("add_embedding.linear_1", "label_emb.0.0", False),
        ("add_embedding.linear_2", "label_emb.0.2", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
    ]
    c = 1
    for b, blk in enumerate(unet.down_blocks):
        attns = getattr(blk, "attentions", None)
        for j in range(len(blk.resnets)):
            out.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{c}.0", True))
            if attns is not None and j < len(attns):
                out.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{c}.1", False))
            c += 1
        if getattr(blk, "downsamplers", None):
            out.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{c}.0.op", False))
            c += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        attns = getattr(mid, "attentions", None) or []
        i = 0
        for j in range(len(mid.resnets)):
            out.append((f"mid_block.resnets.{j}", f"middle_block.{i}", True))
            i += 1
            if j < len(attns):
                out.append((f"mid_block.attentions.{j}", f"middle_block.{i}", False))
                i += 1
    c = 0
    for b, blk in enumerate(unet.up_blocks):
        attns = getattr(blk, "attentions", None)
        n = len(blk.resnets)
        for j in range(n):
            out.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{c}.0", True))
            if attns is not None and j < len(attns):
                out.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{c}.1", False))
            if j == n - 1 and getattr(blk, "upsamplers", None):
                out.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{c}.{2 if attns is not None else 1}", False))
            c += 1
    return out


def sgm_unet_names(unet: nn.Module, prefix: str = "lora_unet") -> dict[str, str]:
    """kohya names in SGM (original SDXL) naming for every adaptable module of a diffusers UNet.

    Returns:
        kohya name -> diffusers module path (see :func:`original_unet_paths`).
    """
    return {f"{prefix}.{o}".replace(".", "_"): p for o, p in original_unet_paths(unet).items()}


def original_unet_paths(unet: nn.Module) -> dict[str, str]:
    """Original (LDM/SGM) path -> diffusers path for every adaptable module of a diffusers UNet.

    Built from the UNet's block structure: down block ``b`` resnet/attention ``j`` is SGM
    ``input_blocks.{c}.0`` / ``.1`` (``c`` counting from 1, a downsampler takes its own ``c`` as
    ``.0.op``), the mid block is ``middle_block.0/1/2``, up block resnets/attentions are
    ``output_blocks.{c}.0`` / ``.1`` with the upsampler at ``.2`` (``.1`` without attention);
    resnet children map conv1→in_layers.2, conv2→out_layers.3, time_emb_proj→emb_layers.1,
    conv_shortcut→skip_connection.

    Returns:
        original module path -> diffusers module path.
    """
    from ..kohya import _adaptable_modules

    blocks = sorted(_sgm_block_prefixes(unet), key=lambda t: -len(t[0]))
    table: dict[str, str] = {}
    for path, _ in _adaptable_modules(unet):
        for dprefix, sprefix, is_resnet in blocks:
            if path == dprefix or path.startswith(dprefix + "."):
                rest = path[len(dprefix) + 1 :]
                if is_resnet and rest:
                    head, _, tail = rest.partition(".")
                    head = _RESNET_CHILDREN.get(head, head)
                    rest = f"{head}.{tail}" if tail else head
                table[f"{sprefix}.{rest}" if rest else sprefix] = path
                break
    return table


def _is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL's UNet conditions on text and time ids (``addition_embed_type == "text_time"``)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


_UNET_CONV = r"conv|downsamplers|upsamplers|skip_connection|in_layers_2|out_layers_3|_op$|proj_in|proj_out"

SD = Family(
    name="sd",
    label="SD 1.x/2.x",
    model_classes=("UNet2DConditionModel",),
    component="unet",
    text_encoders=(
        TextEncoderSlot("text_encoder", ("lora_te", "lora_te1"), ("text_encoder.",),
                        ("text_encoders.clip_l.transformer.", "text_encoders.clip_h.transformer.")),
    ),
    original_names=original_unet_paths,
    diffusers_prefixes=("unet.", ""),
    flat_prefixes=("lora_unet_", "lycoris_"),
    save_style="kohya",
    file_words=r"(?!x)x",  # nothing only SD1/2 files have: told apart from SDXL by the absence of SDXL's words
    base_model_version="sd_v1",
    matches=lambda m: not _is_sdxl_unet(m),
    processor_aliases=True,
    conv_words=_UNET_CONV,
)

SDXL = Family(
    name="sdxl",
    label="SDXL",
    model_classes=("UNet2DConditionModel",),
    component="unet",
    text_encoders=(
        TextEncoderSlot("text_encoder", ("lora_te1", "lora_te"), ("text_encoder.",), ("text_encoders.clip_l.transformer.",)),
        TextEncoderSlot("text_encoder_2", ("lora_te2",), ("text_encoder_2.",), ("text_encoders.clip_g.transformer.",)),
    ),
    original_names=original_unet_paths,
    diffusers_prefixes=("unet.", ""),
    flat_prefixes=("lora_unet_", "lycoris_"),
    save_style="original",
    file_words=r"^lora_te2_|^text_encoder_2\.|clip_g|label_emb|add_embedding",
    base_model_version="sdxl_base_v1-0",
    matches=_is_sdxl_unet,
    processor_aliases=True,
    conv_words=_UNET_CONV,
)
