"""Worker for test_fsdp.py (run by torchrun): train a tiny Llama's LoHa adapter under FSDP2, save it.

Also importable: ``run(world, rank, out)`` with world == 1 and no process group trains the same
steps unsharded, which is the reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from lohakit import LoHaConfig, get_peft_model

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 8


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    cfg = LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    return get_peft_model(base, cfg)


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (STEPS, GLOBAL_BATCH, SEQ), generator=g)


def run(world: int, rank: int, out: str, shard: bool) -> list[float]:
    from lohakit.integrations.fsdp import save_pretrained_sharded, shard_loha_model

    model = build()
    model.train()
    if shard:
        shard_loha_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    per = GLOBAL_BATCH // world
    losses = []
    for step, batch in enumerate(data()):
        ids = batch[rank * per:(rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    save_pretrained_sharded(model, out)
    return losses


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.set_num_threads(1)
    losses = run(world, rank, sys.argv[1], shard=True)
    if rank == 0:
        with open(os.path.join(sys.argv[1], "losses.json"), "w") as fh:
            json.dump(losses, fh)
    torch.distributed.destroy_process_group()
