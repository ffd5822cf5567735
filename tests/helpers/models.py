"""Tiny models built from configs, shared by every test (one place; nothing downloaded).

* The table of models the core invariants run over (BRIEF §5): each :class:`Case` builds a
  fresh, deterministic tiny model, its inputs, and the LoHa config kwargs that adapt it;
  ``peft`` says whether PEFT's LoHa supports the case (for the oracle comparison).
* Tiny Stable Diffusion models and pipelines (SD1, SDXL shapes), and their outputs and states.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    peft: bool = True

    def __repr__(self) -> str:
        return self.name


def output_of(out: Any) -> torch.Tensor:
    """The main tensor of a model output (tensor, logits, last_hidden_state or sample)."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "last_hidden_state", "sample"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out[0]


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    if "x" in inputs:
        return output_of(model(inputs["x"]))
    return output_of(model(**inputs))


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(1234)
        return fn().eval()

    return build


def _x(*shape: int) -> Callable[[torch.dtype], dict[str, Any]]:
    def make(dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(7)
        return {"x": torch.randn(*shape, generator=g).to(dtype)}

    return make


def _ids(vocab: int, shape=(2, 7), **extra: Any) -> Callable[[torch.dtype], dict[str, Any]]:
    def make(dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(7)
        d = {"input_ids": torch.randint(0, vocab, shape, generator=g)}
        for k, v in extra.items():
            d[k] = v(g)
        return d

    return make


# ------------------------------------------------------------------ plain torch
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 6, 1))


def conv2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))


def conv2d_grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8, dilation=1)
    )


def conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 1))


# ------------------------------------------------------------------ transformers / diffusers
def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    )


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                 decoder_start_token_id=0)
    )


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def clip_text() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32))


def unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )


def _unet_inputs(dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 3, 16, generator=g).to(dtype),
    }


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]

CASES: list[Case] = [
    Case("mlp", _seeded(mlp), _x(4, 16), {"target_modules": ["0", "2"]}),
    Case("conv1d", _seeded(conv1d), _x(2, 4, 10), {"target_modules": ["0", "2"]}),
    Case("conv1d_effective", _seeded(conv1d), _x(2, 4, 10), {"target_modules": ["0", "2"], "use_effective_conv2d": True}),
    Case("conv2d", _seeded(conv2d), _x(2, 3, 8, 8), {"target_modules": ["0", "2"]}),
    Case("conv2d_effective", _seeded(conv2d), _x(2, 3, 8, 8), {"target_modules": ["0", "2"], "use_effective_conv2d": True}),
    Case("conv2d_grouped", _seeded(conv2d_grouped), _x(2, 8, 6, 6), {"target_modules": ["0", "2"]}),
    Case("conv2d_grouped_effective", _seeded(conv2d_grouped), _x(2, 8, 6, 6),
         {"target_modules": ["0", "2"], "use_effective_conv2d": True}),
    Case("conv3d", _seeded(conv3d), _x(1, 2, 4, 5, 5), {"target_modules": ["0", "2"]}, peft=False),
    Case("conv3d_effective", _seeded(conv3d), _x(1, 2, 4, 5, 5), {"target_modules": ["0", "2"], "use_effective_conv2d": True}, peft=False),
    Case("gpt2_conv1d", _seeded(gpt2), _ids(64), {"target_modules": ["c_attn", "c_proj", "c_fc"]}, peft=False),
    Case("llama", _seeded(llama), _ids(64), {"target_modules": LLAMA_TARGETS}),
    Case("bert", _seeded(bert), _ids(64), {"target_modules": ["query", "key", "value", "dense"], "exclude_modules": ["pooler.dense"]}),
    Case("t5", _seeded(t5), _ids(64, decoder_input_ids=lambda g: torch.randint(0, 64, (2, 5), generator=g)),
         {"target_modules": ["q", "k", "v", "o", "wi", "wo"]}),
    Case("clip_text", _seeded(clip_text), _ids(64), {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}),
    Case("unet", _seeded(unet), _unet_inputs, {"target_modules": UNET_TARGETS, "use_effective_conv2d": True}),
]


# ------------------------------------------------------------------ Stable Diffusion
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
