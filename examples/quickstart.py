"""Quickstart: adapt a tiny Llama with LoHa, train a few steps, merge, and check merged == unmerged.

Runs offline on a CPU in seconds: the model is built from a config (no download) and the
"tokenizer" is plain UTF-8 bytes.
"""

from __future__ import annotations

import pydoc_data.topics as topics
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lohakit import LoHaConfig, get_peft_model


def batches(text: str, seq: int, batch: int, steps: int, gen: torch.Generator):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def main() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    )
    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    text = "".join(topics.topics.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step, ids in enumerate(batches(text, 64, 8, 30, gen)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    ids = next(batches(text, 64, 4, 1, gen))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    err = (merged - unmerged).abs().max().item()
    print(f"max |merged - unmerged| = {err:.3e}")
    if not err < 1e-4:
        raise SystemExit(f"merged and unmerged outputs differ by {err}")
    print("OK: merged == unmerged")


if __name__ == "__main__":
    main()
