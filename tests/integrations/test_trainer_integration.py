"""lohakit adapters inside transformers' Trainer and accelerate's save_state/load_state.

A tiny Llama built from a config (no download) is trained for a few steps; the adapter saved in
PEFT's format must reload onto a fresh base model (lohakit and PEFT) with identical outputs, and an
accelerate checkpoint must restore the adapter bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn

import peft
from lohakit import LoHaConfig, LoHaModel, get_peft_model
from lohakit.formats import peft as pf

VOCAB = 48


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
    ).eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=g)}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


CONFIG = dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3}, task_type="CAUSAL_LM")


def _adapter_callback():
    """A TrainerCallback writing the adapter in PEFT's format into every checkpoint folder."""
    from transformers import TrainerCallback

    class SaveLoHaAdapter(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            model.save_pretrained(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "adapter"))

    return SaveLoHaAdapter()


def test_trainer_steps_then_reload(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoHaConfig(**CONFIG))
    before = {k: v.clone() for k, v in pf.peft_state_dict(model, "default").items()}
    kwargs = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=5e-2, report_to=[],
        save_strategy="steps", save_steps=3, logging_strategy="no", use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    Trainer(model=model, args=TrainingArguments(max_steps=3, **kwargs), train_dataset=_Data(), callbacks=[_adapter_callback()]).train()
    after = pf.peft_state_dict(model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the adapter"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".hada_" not in n)

    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    with torch.no_grad():
        expected = model(**batch()).logits
        for directory in (tmp_path / "adapter", checkpoint / "adapter"):
            reloaded = LoHaModel.from_pretrained(tiny_llama(), str(directory))
            assert torch.equal(reloaded(**batch()).logits, expected)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
        torch.testing.assert_close(theirs(**batch()).logits, expected, atol=1e-6, rtol=0)

    # resume: a trainable reload continues from Trainer's own checkpoint (model, optimizer, scheduler)
    resumed = LoHaModel.from_pretrained(tiny_llama(), str(checkpoint / "adapter"), is_trainable=True)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if ".hada_" in n)
    trainer = Trainer(model=resumed, args=TrainingArguments(max_steps=4, **kwargs), train_dataset=_Data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4


def test_accelerate_save_state_load_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_llama(), LoHaConfig(**CONFIG))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step() -> None:
        loss = model(**batch(), labels=batch()["input_ids"]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    # also write the adapter in PEFT's format with every checkpoint
    def save_adapter(models, weights, output_dir):
        accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(output_dir, "adapter"))

    accelerator.register_save_state_pre_hook(save_adapter)
    step()
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = {k: v.clone() for k, v in pf.peft_state_dict(accelerator.unwrap_model(model), "default").items()}
    saved_opt = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    step()
    step()
    assert any(not torch.equal(saved[k], v) for k, v in pf.peft_state_dict(accelerator.unwrap_model(model), "default").items())

    accelerator.load_state(str(tmp_path / "ckpt"))
    restored = pf.peft_state_dict(accelerator.unwrap_model(model), "default")
    assert restored.keys() == saved.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    for k, v in optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, saved_opt[k]), k

    adapter_dir = tmp_path / "ckpt" / "adapter"
    from_hook = LoHaModel.from_pretrained(tiny_llama(), str(adapter_dir))
    loaded = pf.peft_state_dict(from_hook, "default")
    assert loaded.keys() == saved.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
