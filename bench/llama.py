"""(b) Llama-shaped training step (AdamW) at several ranks, all 7 projections adapted."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .timing import interleaved_medians
from .variants import available_variants, build_variant, trainable, with_kernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype


# CPU: BRIEF §6's CPU setting (hidden 1024, 2 layers, fp32, batch 4x128); intermediate keeps
# Llama-7B's 11008/4096 ratio; a small vocabulary so the LM head does not dominate.
CPU_SHAPE = LlamaShape(1024, 2752, 2, 16, 1024, 4, 128, torch.float32)
# GPU: BRIEF §6 (2-layer Llama-7B shape, bf16, batch 4x1024).
GPU_SHAPE = LlamaShape(4096, 11008, 2, 32, 32000, 4, 1024, torch.bfloat16)


def make_llama(shape: LlamaShape, device: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max(2048, shape.seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=shape.dtype)


class LlamaStep:
    """One AdamW training step of a (possibly adapted) Llama with the shared trainable scalar."""

    def __init__(self, model: nn.Module, shape: LlamaShape, device: str) -> None:
        self.model = model.train()
        self.s = nn.Parameter(torch.ones((), device=device, dtype=shape.dtype))
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
        self.embed = self._find_embed(model)
        self.opt = torch.optim.AdamW([self.s, *trainable(model)], lr=1e-4)

    @staticmethod
    def _find_embed(model: nn.Module) -> nn.Module:
        return next(m for m in model.modules() if isinstance(m, nn.Embedding))

    def __call__(self) -> None:
        emb = self.embed(self.ids) * self.s  # (B, T, H)
        out = self.model(inputs_embeds=emb, labels=self.ids)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run(quick: bool, device: str, ranks: tuple[int, ...] | None = None, variants: tuple[str, ...] | None = None,
        reps: int | None = None) -> list[dict]:
    """Median step time per (rank, variant); returns table rows."""
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    ranks = ranks or ((8,) if quick else (4, 8, 16, 32, 64))
    reps = reps or (5 if quick else 10)
    variants = variants or available_variants(device)
    base = make_llama(shape, device)
    rows = []
    for r in ranks:
        steps = {v: with_kernels(v, LlamaStep(build_variant(v, base, TARGETS, r), shape, device)) for v in variants}
        med = interleaved_medians(steps, reps=reps, warmup=2, device=device)
        for v in variants:
            rows.append({"suite": "llama", "case": f"r={r}", "variant": v, "ms": med[v], "ratio": med[v] / med["floor"]})
        del steps
    return rows
