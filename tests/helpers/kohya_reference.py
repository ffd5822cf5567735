"""An independent reference for kohya LoHa files: the formula ComfyUI/A1111 apply, and a
LyCORIS-written file (test helpers; nothing here uses lohakit's own name tables)."""

from __future__ import annotations

import torch
import torch.nn as nn


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
