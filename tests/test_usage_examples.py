"""The five usage examples of the seed documentation, on tiny configs of the same architectures."""

from __future__ import annotations

import torch

from helpers.models import bert, clip_text, llama, t5, unet
from lohakit import LoHaConfig, LoHaModel, get_peft_model


def _train_step(model, **inputs):
    model.train()
    out = model(**inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().pow(2).mean()
    loss.backward()
    return loss


def test_llm_targets():
    config = LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(llama(), config)
    ids = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(_train_step(model, input_ids=ids, labels=ids))
    assert len(list(model.loha_layers())) == 8


def test_stable_diffusion_text_encoder_and_unet_effective_conv():
    config_te = LoHaConfig(r=8, alpha=32, target_modules=["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"],
                           rank_dropout=0.0, module_dropout=0.0, init_weights=True)
    config_unet = LoHaConfig(r=8, alpha=32, target_modules=["proj_in", "proj_out", "to_k", "to_q", "to_v", "to_out.0",
                                                            "ff.net.0.proj", "ff.net.2"],
                             rank_dropout=0.0, module_dropout=0.0, init_weights=True, use_effective_conv2d=True)
    text_encoder = LoHaModel(clip_text(), config_te, "default")
    u = LoHaModel(unet(), config_unet, "default")
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids).last_hidden_state  # (1, 5, 32)
        sample = u(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 5, 16)).sample
    assert hidden.shape == (1, 5, 32) and sample.shape == (1, 4, 8, 8)
    # proj_in/proj_out of the tiny UNet are Linear (use_linear_projection) or 1x1 conv: never Tucker
    assert not any(layer.is_tucker("default") for _, layer in u.loha_layers())


def test_bert_rank_and_alpha_patterns():
    config = LoHaConfig(r=8, alpha=8, target_modules=["query", "value"],
                        rank_pattern={r"^encoder\.layer\.0\.attention\.self\.query": 4}, alpha_pattern={"value": 16})
    model = get_peft_model(bert(), config)
    q0 = model.model.encoder.layer[0].attention.self.query
    q1 = model.model.encoder.layer[1].attention.self.query
    v1 = model.model.encoder.layer[1].attention.self.value
    assert q0.r["default"] == 4 and q1.r["default"] == 8 and v1.scaling["default"] == 2.0
    ids = torch.randint(0, 64, (2, 6))
    _train_step(model, input_ids=ids)


def test_multi_adapter_with_set_adapter():
    torch.manual_seed(0)
    model = get_peft_model(llama(), LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.add_adapter("code", LoHaConfig(r=2, alpha=4, target_modules=["q_proj"], init_weights=False))
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        model.set_adapter("code")
        b = model(input_ids=ids).logits
        model.set_adapter(["default", "code"])
        ab = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    outs = [a, b, ab, base]
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(4) for j in range(i + 1, 4))


def test_t5_with_rank_and_module_dropout():
    torch.manual_seed(0)
    config = LoHaConfig(r=4, alpha=8, target_modules=["q", "v"], rank_dropout=0.2, module_dropout=0.1)
    model = get_peft_model(t5(), config)
    ids = torch.randint(0, 64, (2, 6))
    loss = _train_step(model, input_ids=ids, labels=ids)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        x = model(input_ids=ids, labels=ids).loss
        y = model(input_ids=ids, labels=ids).loss
    assert torch.equal(x, y)  # dropouts are training-only
