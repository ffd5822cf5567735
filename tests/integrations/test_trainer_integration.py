"""lohakit adapters inside transformers' Trainer and accelerate's save_state/load_state.

A tiny Llama built from a config (no download) is trained for a few steps; the adapter saved in
PEFT's format must reload onto a fresh base model (lohakit and PEFT) with identical outputs, and an
accelerate checkpoint must restore the adapter bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

import peft
from lohakit import LoHaConfig, LoHaModel, get_peft_model, load_state_dict
from lohakit.formats import peft as pf

VOCAB = 48


def tiny_llama(tie_word_embeddings: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tie_word_embeddings)
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


def tied_llama() -> nn.Module:
    return tiny_llama(tie_word_embeddings=True)


def hf_dataset(n: int = 16):
    """A datasets.Dataset with an extra text column, which the default remove_unused_columns drops."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, 8), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "text": [f"sample {i}" for i in range(n)]})


def training_args(out, **overrides):
    """TrainingArguments at their defaults except what a CPU test needs (no reporting, few steps)."""
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, report_to=[], use_cpu=True,
                  disable_tqdm=True, seed=0, logging_steps=1, save_steps=2, max_steps=4)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_default_trainer_args_tied_embeddings_checkpoints_hold_the_adapter(tmp_path):
    from lohakit.integrations.transformers import LoHaTrainer

    model = get_peft_model(tied_llama(), LoHaConfig(**CONFIG))
    before = {k: v.clone() for k, v in pf.peft_state_dict(model, "default").items()}
    trainer = LoHaTrainer(model=model, args=training_args(tmp_path / "run"), train_dataset=hf_dataset())
    trainer.train()
    after = pf.peft_state_dict(model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the adapter"
    checkpoint = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files, files

    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
        for directory in (tmp_path / "final", checkpoint):
            assert torch.equal(LoHaModel.from_pretrained(tied_llama(), str(directory))(**batch()).logits, expected)
        theirs = peft.PeftModel.from_pretrained(tied_llama(), str(tmp_path / "final"))
        torch.testing.assert_close(theirs(**batch()).logits, expected, atol=1e-6, rtol=0)


def test_resume_continues_the_same_losses_with_accumulation_and_eval(tmp_path):
    from lohakit.integrations.transformers import LoHaTrainer

    args = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=2,
                save_steps=2, max_steps=4)
    full = LoHaTrainer(model=get_peft_model(tiny_llama(), LoHaConfig(**CONFIG)), args=training_args(tmp_path / "a", **args),
                       train_dataset=hf_dataset(), eval_dataset=hf_dataset(6))
    full.train()
    evals = [h for h in full.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4] and all(h["eval_loss"] > 0 for h in evals)

    resumed = LoHaTrainer(model=get_peft_model(tiny_llama(), LoHaConfig(**CONFIG)),
                          args=training_args(tmp_path / "a", **args), train_dataset=hf_dataset(), eval_dataset=hf_dataset(6))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    want, got = losses(full), losses(resumed)  # steps 1-2 come back from the checkpoint's trainer_state.json
    assert set(got) == {1, 2, 3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    a = pf.peft_state_dict(full.model, "default")
    b = pf.peft_state_dict(resumed.model, "default")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_checkpoint_without_adapter(tmp_path):
    from lohakit.integrations.transformers import LoHaTrainer, load_adapter_weights

    (tmp_path / "ck").mkdir()
    trainer = LoHaTrainer(model=get_peft_model(tiny_llama(), LoHaConfig(**CONFIG)), args=training_args(tmp_path / "o"),
                          train_dataset=hf_dataset())
    with pytest.raises(ValueError, match="adapter_config.json"):
        trainer._load_from_checkpoint(str(tmp_path / "ck"))
    other = get_peft_model(tiny_llama(), LoHaConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_weights(trainer.model, str(tmp_path / "other"))


def test_plain_trainer_gets_the_wrapped_forward_signature():
    model = get_peft_model(tiny_llama(), LoHaConfig(**CONFIG))
    assert "input_ids" in model.forward_signature.parameters and "labels" in model.forward_signature.parameters


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_trl_sft_trainer_with_tied_embeddings(tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from lohakit.integrations.transformers import LoHaSFTTrainer

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (7,), generator=g)) for _ in range(12)]
    data = datasets.Dataset.from_dict({"text": texts})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     disable_tqdm=True, save_steps=2, logging_steps=1, max_length=8, learning_rate=5e-2)
    trainer = LoHaSFTTrainer(model=tied_llama(), args=args, train_dataset=data, processing_class=_word_tokenizer(),
                             peft_config=LoHaConfig(**CONFIG))
    assert isinstance(trainer.model, LoHaModel)
    trainer.train()
    checkpoint = tmp_path / "sft" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)
    # the checkpoint holds exactly the trained adapter, and PEFT reads it
    saved = load_state_dict(str(checkpoint / "adapter_model.safetensors"))
    live = pf.peft_state_dict(trainer.model, "default")
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    with torch.no_grad():
        ours = LoHaModel.from_pretrained(tied_llama(), str(checkpoint))(**batch()).logits
        theirs = peft.PeftModel.from_pretrained(tied_llama(), str(checkpoint))(**batch()).logits
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
