"""(d) inference: unmerged generation-style calls (1 token, 512 tokens) and merged, eval + no_grad."""

from __future__ import annotations

import torch
import torch.nn as nn

from .llama import CPU_SHAPE, GPU_SHAPE, TARGETS, make_llama
from .timing import interleaved_medians
from .variants import build_variant

#: Inference variants: the plain base model is the floor here (no trainable scalar needed).
INFER_VARIANTS = (
    "floor",
    "peft_lora",
    "peft_loha",
    "lycoris_bypass",
    "lohakit",
    "lohakit_nocache",
    "lohakit_merged",
)


def _build(variant: str, base: nn.Module, r: int) -> nn.Module:
    if variant == "lohakit_nocache":
        m = build_variant("lohakit", base, TARGETS, r)
        for _, layer in m.loha_layers():  # a cache that never hits: the per-call cost of P and Q
            layer._eval_cache_for = lambda *a, **k: None
        return m.eval()
    if variant == "lohakit_merged":
        m = build_variant("lohakit", base, TARGETS, r)
        m.merge_adapter()
        return m.eval()
    return build_variant(variant, base, TARGETS, r).eval()


def run(quick: bool, device: str, reps: int | None = None, r: int = 8,
        variants: tuple[str, ...] = INFER_VARIANTS) -> list[dict]:
    """Forward of the Llama-shaped model on ``(1, T)`` token ids, T ∈ {1, 512}."""
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    base = make_llama(shape, device).eval()
    models = {v: _build(v, base, r) for v in variants}
    rows = []
    for t, n_reps in ((1, 60 if quick else 200), (512, 5 if quick else 15)):
        ids = torch.randint(0, shape.vocab, (1, t), generator=torch.Generator().manual_seed(2)).to(device)

        def call(m: nn.Module) -> None:
            with torch.no_grad():
                m(input_ids=ids, use_cache=False)

        fns = {v: (lambda m=m: call(m)) for v, m in models.items()}
        med = interleaved_medians(fns, reps=reps or n_reps, warmup=3, device=device)
        ref = med["lohakit_merged"] if "lohakit_merged" in med else med["floor"]
        for v in variants:
            rows.append({"suite": "infer", "case": f"{t} token{'s' if t > 1 else ''}", "variant": v,
                         "ms": med[v], "ratio": med[v] / med["floor"], "vs_merged": med[v] / ref})
    return rows
