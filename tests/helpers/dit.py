"""Tiny DiT models (FLUX.1, SD3.5) and their ORIGINAL module trees, written out independently of
lohakit's family tables.

* :func:`flux_model` / :func:`sd3_model`: diffusers transformers from small configs (SD3 with two
  blocks: the last one is ``context_pre_only``; block 0 has SD3.5's second attention).
* :func:`flux_key_map` / :func:`sd3_key_map`: every parameter of the original BFL / SAI tree as
  ``(original key, diffusers keys stacked by rows, halves swapped)``, from the BFL/SAI naming
  (this file's own knowledge). :func:`original_state_dict` / :func:`to_diffusers` apply it both
  ways. ``tests/formats/test_dit_families.py`` checks the maps against diffusers' single-file
  converters, so the files built here are named as the original trees name them.
* :func:`loha_file`: a kohya LoHa state dict in any naming, random factors on every Linear/Conv of
  the chosen tree; :func:`expected_deltas`: the plain ComfyUI formula per module of the diffusers
  tree (fused modules converted through the key map).
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn

from helpers.kohya_reference import reference_delta

KeyMap = list[tuple[str, tuple[str, ...], bool]]


# ------------------------------------------------------------------ models
def flux_model(seed: int = 11) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()


def sd3_model(seed: int = 12) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def t5_encoder(seed: int = 13) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2)).eval()


def clip_encoder(projection: bool = False, seed: int = 14) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def flux_pipe() -> types.SimpleNamespace:
    return types.SimpleNamespace(transformer=flux_model(), text_encoder=clip_encoder(), text_encoder_2=t5_encoder())


def sd3_pipe() -> types.SimpleNamespace:
    return types.SimpleNamespace(transformer=sd3_model(), text_encoder=clip_encoder(seed=15),
                                 text_encoder_2=clip_encoder(True, seed=16), text_encoder_3=t5_encoder(17))


def flux_inputs(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(hidden_states=r(1, 4, 4), encoder_hidden_states=r(1, 3, 16), pooled_projections=r(1, 8),
                timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                guidance=torch.tensor([3.5], dtype=dtype))


def sd3_inputs(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 16), pooled_projections=r(1, 8),
                timestep=torch.tensor([500.0], dtype=dtype))


def run_dit(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------ original trees (this file's own tables)
def _param_map(pairs: dict[str, str | tuple[str, ...]], o: str, d: str, swap: set[str] = frozenset()) -> KeyMap:
    out: KeyMap = []
    for oc, dc in pairs.items():
        ds = dc if isinstance(dc, tuple) else (dc,)
        out.append((f"{o}{oc}", tuple(f"{d}{x}" for x in ds), oc in swap))
    return out


def flux_key_map(model: nn.Module) -> KeyMap:
    """BFL parameter key -> diffusers keys (q, k, v stacked; linear1 = q, k, v, MLP in)."""
    m: KeyMap = []
    wb = lambda oc, dc: {f"{oc}.{e}": (tuple(f"{x}.{e}" for x in dc) if isinstance(dc, tuple) else f"{dc}.{e}") for e in ("weight", "bias")}  # noqa: E731
    for i in range(len(model.transformer_blocks)):
        pairs = {}
        pairs |= wb("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
        pairs |= wb("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
        for oc, dc in {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
                       "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                       "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}.items():
            pairs |= wb(oc, dc)
        pairs |= {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                  "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                  "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
        m += _param_map(pairs, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
    for i in range(len(model.single_transformer_blocks)):
        pairs = wb("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")) | wb("linear2", "proj_out") | wb("modulation.lin", "norm.linear")
        pairs |= {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
        m += _param_map(pairs, f"single_blocks.{i}.", f"single_transformer_blocks.{i}.")
    pairs = {}
    for oc, dc in {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                   "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2", "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                   "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                   "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                   "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2", "final_layer.linear": "proj_out",
                   "final_layer.adaLN_modulation.1": "norm_out.linear"}.items():
        pairs |= wb(oc, dc)
    m += _param_map(pairs, "", "", swap={"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"})
    return m


def sd3_key_map(model: nn.Module) -> KeyMap:
    """SAI parameter key -> diffusers keys (the last block's context modulation and the final norm swapped)."""
    m: KeyMap = []
    wb = lambda oc, dc: {f"{oc}.{e}": (tuple(f"{x}.{e}" for x in dc) if isinstance(dc, tuple) else f"{dc}.{e}") for e in ("weight", "bias")}  # noqa: E731
    n = len(model.transformer_blocks)
    for i, blk in enumerate(model.transformer_blocks):
        last = i == n - 1
        pairs = wb("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
        pairs |= wb("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
        one = {"x_block.attn.proj": "attn.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
               "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear"}
        if not last:
            one |= {"context_block.attn.proj": "attn.to_add_out", "context_block.mlp.fc1": "ff_context.net.0.proj",
                    "context_block.mlp.fc2": "ff_context.net.2"}
        for oc, dc in one.items():
            pairs |= wb(oc, dc)
        pairs |= {"x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
                  "context_block.attn.ln_q.weight": "attn.norm_added_q.weight", "context_block.attn.ln_k.weight": "attn.norm_added_k.weight"}
        if getattr(blk, "attn2", None) is not None:
            pairs |= wb("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")) | wb("x_block.attn2.proj", "attn2.to_out.0")
            pairs |= {"x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight"}
        swap = {f"context_block.adaLN_modulation.1.{e}" for e in ("weight", "bias")} if last else set()
        m += _param_map(pairs, f"joint_blocks.{i}.", f"transformer_blocks.{i}.", swap)
    pairs = {}
    for oc, dc in {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
                   "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                   "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
                   "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}.items():
        pairs |= wb(oc, dc)
    m += _param_map(pairs, "", "", swap={"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"})
    return m


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]], 0)


def original_state_dict(sd: dict[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the original tree's keys."""
    out = {}
    for o, ds, swap in key_map:
        t = torch.cat([sd[d] for d in ds], 0)
        out[o] = _swap(t) if swap else t
    return out


def to_diffusers(orig: dict[str, torch.Tensor], key_map: KeyMap, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Original-tree tensors (any subset) in diffusers keys: halves swapped back, rows split by ``sizes``."""
    out = {}
    for o, ds, swap in key_map:
        if o not in orig:
            continue
        t = _swap(orig[o]) if swap else orig[o]
        start = 0
        for d in ds:
            out[d] = t[start:start + sizes[d]]
            start += sizes[d]
        assert start == t.shape[0], (o, start, t.shape)
    return out


# ------------------------------------------------------------------ LoHa files
NAMINGS: dict[str, tuple[str, Callable[[str], str]]] = {
    # name -> (tree, module path -> file module name)
    "kohya_original": ("original", lambda p: "lora_unet_" + p.replace(".", "_")),
    "diffusion_model": ("original", lambda p: "diffusion_model." + p),
    "bare_original": ("original", lambda p: p),
    "transformer_dot": ("diffusers", lambda p: "transformer." + p),
    "onetrainer": ("diffusers", lambda p: "lora_transformer_" + p.replace(".", "_")),
    "lycoris": ("diffusers", lambda p: "lycoris_" + p.replace(".", "_")),
    "bare_diffusers": ("diffusers", lambda p: p),
}


def module_shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """module path -> weight shape for every 2-D (Linear) or 4-D (Conv2d) ``.weight`` of a state dict."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)}


def loha_file(shapes: dict[str, tuple[int, ...]], rename: Callable[[str], str], r: int = 2, alpha: float = 3.0,
              seed: int = 0, tucker_convs: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Random LoHa factors on every module of ``shapes``: (file state dict, module path -> its tensors)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    per: dict[str, dict[str, torch.Tensor]] = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        out, n_in = shape[0], int(torch.tensor(shape[1:]).prod())
        rr = r + (i % 2)  # ranks differ between modules
        t = {}
        if tucker_convs and len(shape) == 4:
            t = {"hada_w1_a": torch.randn(rr, out, generator=g), "hada_w1_b": torch.randn(rr, shape[1], generator=g),
                 "hada_w2_a": torch.randn(rr, out, generator=g), "hada_w2_b": torch.randn(rr, shape[1], generator=g),
                 "hada_t1": torch.randn(rr, rr, *shape[2:], generator=g), "hada_t2": torch.randn(rr, rr, *shape[2:], generator=g)}
        else:
            t = {"hada_w1_a": torch.randn(out, rr, generator=g), "hada_w1_b": torch.randn(rr, n_in, generator=g),
                 "hada_w2_a": torch.randn(out, rr, generator=g), "hada_w2_b": torch.randn(rr, n_in, generator=g)}
        t = {k: v * 0.3 for k, v in t.items()}
        t["alpha"] = torch.tensor(alpha + i % 3)
        per[path] = t
        for k, v in t.items():
            sd[f"{rename(path)}.{k}"] = v
    return sd, per


def expected_deltas(per: dict[str, dict[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]], tree: str,
                    key_map: KeyMap, sizes: dict[str, int], multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers module path -> ΔW by the plain formula (float64), original-tree ΔW converted by the key map."""
    deltas = {p: reference_delta(t, torch.Size(shapes[p]), multiplier) for p, t in per.items()}
    if tree == "diffusers":
        return deltas
    conv = to_diffusers({f"{p}.weight": d for p, d in deltas.items()}, key_map, sizes)
    return {k[: -len(".weight")]: v for k, v in conv.items()}
