"""Tiny Stable Diffusion models and an independent reference for kohya LoHa files (test helpers)."""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.nn as nn


def sd1_unet() -> nn.Module:
    """SD1-shaped UNet: cross-attention down/up blocks, 1x1 conv shortcuts, 3x3 convs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def sdxl_unet() -> nn.Module:
    """SDXL-shaped UNet: first block without attention, 2 transformer layers, text_time embedding, linear proj."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()


def clip_te(hidden: int = 32, projection: bool = False, seed: int = 3) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=100, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def sd1_pipe() -> Any:
    return types.SimpleNamespace(unet=sd1_unet(), text_encoder=clip_te())


def sdxl_pipe() -> Any:
    return types.SimpleNamespace(unet=sdxl_unet(), text_encoder=clip_te(16, seed=4), text_encoder_2=clip_te(16, True, seed=5))


def clone(pipe: Any) -> Any:
    return copy.deepcopy(pipe)


# -------------------------------------------------------------------------------- inputs / outputs
def unet_out(unet: nn.Module, sdxl: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 5, 32, generator=g)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([3, 11]), h, **kw).sample


def te_out(te: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        return te(ids).last_hidden_state


def pipe_outputs(pipe: Any) -> list[torch.Tensor]:
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    outs = [unet_out(pipe.unet, sdxl), te_out(pipe.text_encoder)]
    if sdxl:
        outs.append(te_out(pipe.text_encoder_2))
    return outs


def state_of(*models: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Full state dicts (cloned) plus module types, to prove a failed load touched nothing."""
    return [
        {**{k: v.detach().clone() for k, v in m.state_dict().items()}, "__types__": [type(x).__name__ for x in m.modules()]}
        for m in models
    ]


def same_state(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    for x, y in zip(a, b):
        if x.keys() != y.keys() or x["__types__"] != y["__types__"]:
            return False
        if any(not torch.equal(x[k], y[k]) for k in x if k != "__types__"):
            return False
    return True


# -------------------------------------------------------------------------------- the reference
def reference_delta(g: dict[str, torch.Tensor], weight_shape: torch.Size, multiplier: float) -> torch.Tensor:
    """ΔW = multiplier · (alpha/r) · (w1a@w1b) ⊙ (w2a@w2b) in float64, written out independently."""
    w1a, w1b, w2a, w2b = (g[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    r = w1b.shape[0]
    scale = float(g["alpha"]) / r if "alpha" in g else 1.0
    if "hada_t1" in g:
        t1, t2 = g["hada_t1"].double(), g["hada_t2"].double()
        b1 = torch.einsum("ij...,io,jc->oc...", t1, w1a, w1b)
        b2 = torch.einsum("ij...,io,jc->oc...", t2, w2a, w2b)
        d = b1 * b2
    else:
        d = (w1a @ w1b) * (w2a @ w2b)
    return (multiplier * scale * d).reshape(weight_shape)


def apply_reference(sd: dict[str, torch.Tensor], modules: dict[str, nn.Module], multiplier: float) -> int:
    """W += reference ΔW for every kohya module name in ``modules`` (name -> module). Returns count."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, p = k.partition(".")
        groups.setdefault(name, {})[p] = v
    n = 0
    with torch.no_grad():
        for name, g in groups.items():
            if "hada_w1_a" not in g:
                continue
            w = modules[name].weight
            w += reference_delta(g, w.shape, multiplier).to(w.dtype)
            n += 1
    return n


def lycoris_kohya_file(path: str, te: nn.Module, unet: nn.Module, *, tucker: bool, dtype=torch.float32, seed: int = 0):
    """Write a LoHa file with lycoris-lora's kohya network on (te, unet); returns {lora_name: path}.

    The network's modules are randomised (LyCORIS zero-inits one factor). The models are
    hooked by LyCORIS afterwards: pass copies.
    """
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya

    cls = LycorisNetworkKohya
    saved = {a: getattr(cls, a) for a in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE")}
    try:
        cls.apply_preset(PRESET["full"])
        cls.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
        cls.UNET_TARGET_REPLACE_NAME = ["conv_in", "conv_out", "time_embedding.linear_1"]
        cls.TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"]
        net = cls(te, unet, multiplier=1.0, lora_dim=4, conv_lora_dim=3, alpha=2.0, conv_alpha=1.5,
                  use_tucker=tucker, network_module="loha", warn_on_unmatched=False)
    finally:
        for a, v in saved.items():
            setattr(cls, a, v)
    names = {id(m): (p, "te") for p, m in te.named_modules()}
    names.update({id(m): (p, "unet") for p, m in unet.named_modules()})
    where = {lora.lora_name: names[id(lora.org_module[0])] for lora in net.loras}
    net.apply_to(te, unet, True, True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            for _, p in lora.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    net.save_weights(path, dtype, {"ss_network_module": "lycoris.kohya"})
    return net, where
