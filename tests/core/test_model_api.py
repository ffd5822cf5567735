"""LoHaModel's API: target resolution, adapter lifecycle, errors that leave the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from helpers.models import LLAMA_TARGETS, bert, gpt2, llama, t5
from lohakit import LoHaConfig, LoHaLayer, LoHaModel, ModulesToSaveWrapper, get_peft_model
from helpers.snapshots import assert_unchanged, snapshot


def adapted_names(model: LoHaModel) -> list[str]:
    return sorted(n for n, _ in model.loha_layers())


# ------------------------------------------------------------------ target resolution
def test_list_targets_match_exact_or_dotted_suffix():
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert adapted_names(m) == [f"model.layers.{i}.{s}" for i in (0, 1) for s in ("mlp.down_proj", "self_attn.q_proj")]


def test_regex_target_is_full_match():
    m = get_peft_model(llama(), LoHaConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert adapted_names(m) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(llama(), LoHaConfig(target_modules=r"q_proj"))  # full match, not search


def test_all_linear_excludes_output_head():
    m = get_peft_model(llama(), LoHaConfig(target_modules="all-linear"))
    names = adapted_names(m)
    assert "lm_head" not in names and len(names) == 14
    g = get_peft_model(gpt2(), LoHaConfig(target_modules="all-linear"))
    assert "lm_head" not in adapted_names(g) and any(n.endswith("c_attn") for n in adapted_names(g))


def test_exclude_modules_list_and_regex():
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert "model.layers.0.self_attn.q_proj" not in adapted_names(m) and len(adapted_names(m)) == 3
    m = get_peft_model(llama(), LoHaConfig(target_modules="all-linear", exclude_modules=r".*mlp.*"))
    assert all("mlp" not in n for n in adapted_names(m)) and len(adapted_names(m)) == 8


def test_layers_to_transform_and_pattern():
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert adapted_names(m) == ["model.layers.1.self_attn.q_proj"]
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"))
    assert adapted_names(m) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"))


def test_rank_and_alpha_patterns():
    cfg = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    m = get_peft_model(llama(), cfg)
    q0 = m.model.model.layers[0].self_attn.q_proj
    q1 = m.model.model.layers[1].self_attn.q_proj
    v0 = m.model.model.layers[0].self_attn.v_proj
    assert q0.r["default"] == 2 and q0.hada_w1_b["default"].shape[0] == 2 and q0.scaling["default"] == 4.0
    assert q1.r["default"] == 4 and q1.scaling["default"] == 2.0
    assert v0.alpha["default"] == 3.0 and v0.scaling["default"] == 0.75


@pytest.mark.parametrize("build,expected", [(llama, "q_proj"), (bert, "query"), (t5, "q"), (gpt2, "c_attn")])
def test_default_targets_per_model_type(build, expected):
    m = get_peft_model(build(), LoHaConfig())
    names = adapted_names(m)
    assert names and any(n.endswith("." + expected) for n in names)
    if build is gpt2:
        assert type(m.model.transformer.h[0].attn.c_attn).__name__ == "HFConv1D"


def test_no_default_targets_for_unknown_model_type():
    with pytest.raises(ValueError, match="target_modules is None"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoHaConfig())


def test_no_match_lists_module_names_and_leaves_model_unchanged():
    base = llama()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"matched no module.*model\.embed_tokens"):
        LoHaModel(base, LoHaConfig(target_modules=["nonexistent"]))
    assert_unchanged(base, snap)


def test_unsupported_type_names_module_type_and_supported_types():
    base = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    snap = snapshot(base)
    with pytest.raises(TypeError, match=r"'1'.*LayerNorm.*Linear"):
        LoHaModel(base, LoHaConfig(target_modules=["0", "1"]))
    assert_unchanged(base, snap)
    with pytest.raises(TypeError, match="Embedding"):
        LoHaLayer(nn.Embedding(4, 4), "emb")


# ------------------------------------------------------------------ adapter lifecycle
def test_add_set_delete_adapters():
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"]))
    m.add_adapter("b", LoHaConfig(target_modules=["q_proj", "v_proj"], r=2))
    assert m.active_adapters == ["default"]
    grads = {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(n.endswith(".default") for n in grads)
    m.set_adapter("b")
    grads = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.endswith(".b") for n in grads) and len(grads) == 16
    m.set_adapter(["default", "b"])
    assert m.active_adapters == ["default", "b"]
    m.delete_adapter("b")
    assert m.active_adapters == ["default"] and list(m.peft_config) == ["default"]
    assert not any(n.endswith(".b") for n, _ in m.named_parameters())


def test_adapter_errors_leave_model_unchanged():
    m = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"], init_weights=False))
    snap = snapshot(m)
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("default", LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="does not exist"):
        m.delete_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        m.set_adapter("nope")
    with pytest.raises(ValueError, match="matched no module"):
        m.add_adapter("x", LoHaConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="invalid adapter name"):
        m.add_adapter("../evil", LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        m.add_adapter("y", LoHaConfig(target_modules=["q_proj"], modules_to_save=["missing_head"]))
    assert_unchanged(m, snap)
    assert list(m.peft_config) == ["default"]
    m.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        m.delete_adapter("default")


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    m = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), LoHaConfig(target_modules=["0", "1"], init_weights=False))
    with torch.no_grad():
        m.model[1].hada_w1_a["default"][0, 0] = float("inf")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="non-finite"):
        m.merge_and_unload(safe_merge=True)
    assert_unchanged(m, snap)
    assert not any(layer.merged for _, layer in m.loha_layers())


def test_merge_selected_adapters():
    torch.manual_seed(0)
    m = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoHaConfig(target_modules=["0"], init_weights=False))
    m.add_adapter("b", LoHaConfig(target_modules=["0"], init_weights=False))
    w = m.model[0].base_layer.weight.detach().clone()
    expected = w + m.get_delta_weight("0", "b")
    out = m.merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(out[0].weight, expected)


def test_modules_to_save_trains_a_copy_per_adapter():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=3))
    original = base.classifier.weight.detach().clone()
    m = get_peft_model(base, LoHaConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(m.model.classifier, ModulesToSaveWrapper)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.classifier.modules_to_save.default.weight" in trainable
    assert "model.classifier.original_module.weight" not in trainable
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (2, 5))
    loss = m(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    opt.step()
    assert torch.equal(m.model.classifier.original_module.weight, original)
    assert not torch.equal(m.model.classifier.modules_to_save["default"].weight, original)
    with torch.no_grad(), m.disable_adapter():
        assert m.model.classifier.active_module() is m.model.classifier.original_module
    assert "classifier.weight" in m.adapter_state_dict()
    merged = m.merge_and_unload()
    assert isinstance(merged.classifier, nn.Linear) and not torch.equal(merged.classifier.weight, original)


def test_low_cpu_mem_usage_creates_meta_factors_then_loads():
    torch.manual_seed(0)
    ref = get_peft_model(llama(), LoHaConfig(target_modules=["q_proj"], init_weights=False))
    sd = {k: v for k, v in ref.state_dict().items() if ".hada_" in k}
    m = get_peft_model(copy.deepcopy(ref).unload(), LoHaConfig(target_modules=["q_proj"]), low_cpu_mem_usage=True)
    metas = [p for n, p in m.named_parameters() if ".hada_" in n]
    assert metas and all(p.is_meta for p in metas)
    m.load_state_dict(sd, strict=False, assign=True)
    assert not any(p.is_meta for p in m.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if ".hada_" in n)
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_init_weights_lycoris_and_random():
    m = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoHaConfig(target_modules=["0"], init_weights="lycoris"))
    layer = m.model[0]
    assert torch.count_nonzero(layer.hada_w2_a["default"]) == 0 and torch.count_nonzero(layer.hada_w2_b["default"]) > 0
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    m = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoHaConfig(target_modules=["0"], init_weights=False))
    assert torch.count_nonzero(m.model[0].get_delta_weight("default")) == 64


def test_trainable_parameter_count():
    m = get_peft_model(nn.Sequential(nn.Linear(10, 20)), LoHaConfig(target_modules=["0"], r=2))
    trainable, total = m.get_nb_trainable_parameters()
    assert trainable == 2 * (20 * 2 + 2 * 10) and total == trainable + 10 * 20 + 20


# ------------------------------------------------------------------ transformers integration
def test_forward_kwargs_generate_and_gradient_checkpointing():
    torch.manual_seed(0)
    m = get_peft_model(llama(), LoHaConfig(target_modules=LLAMA_TARGETS, init_weights=False))
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    out = m(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    assert out.loss is not None and len(out.hidden_states) == 3
    gen = m.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 7)
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert m.model.is_gradient_checkpointing
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if ".hada_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ PEFT habits (issue 13)
def test_get_peft_model_accepts_peft_loha_config_and_warns_only_for_unknown_fields():
    import warnings

    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary PEFT config converts without a warning
        m = get_peft_model(llama(), peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}))
    cfg = m.peft_config["default"]
    assert isinstance(cfg, LoHaConfig) and (cfg.r, cfg.alpha, cfg.rank_pattern) == (4, 8, {r"layers\.0\.self_attn\.q_proj": 2})
    with pytest.warns(UserWarning, match="no lohakit counterpart"):
        LoHaConfig.from_peft({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj"], "some_new_field": 3})
    with pytest.raises(ValueError, match="LORA"):
        get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="lohakit.LoHaConfig or a peft.LoHaConfig"):
        get_peft_model(llama(), {"r": 2})


def test_get_base_model_base_model_and_attribute_errors():
    base = llama()
    m = get_peft_model(base, LoHaConfig(target_modules=["q_proj"]))
    assert m.get_base_model() is base and m.base_model.model is base
    assert m.base_model.model.model.layers[0].self_attn.q_proj is base.model.layers[0].self_attn.q_proj
    with pytest.raises(AttributeError, match=r"'LoHaModel' object \(wrapping LlamaForCausalLM\) has no attribute 'set_adaptr'"):
        m.set_adaptr("x")
    assert "input_ids" in m.forward_signature.parameters


def test_config_from_pretrained_directory_file_and_errors(tmp_path):
    m = get_peft_model(llama(), LoHaConfig(r=3, alpha=6, target_modules=["q_proj"]))
    m.save_pretrained(str(tmp_path / "a"))
    for where in (tmp_path / "a", tmp_path / "a" / "adapter_config.json"):
        cfg = LoHaConfig.from_pretrained(str(where))
        assert (cfg.r, cfg.alpha, cfg.target_modules) == (3, 6, ["q_proj"])
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        LoHaConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        LoHaConfig.from_pretrained(str(tmp_path / "missing"))


def test_inject_adapter_in_model_keeps_class_and_base_state_dict(tmp_path):
    from transformers import LlamaForCausalLM

    from lohakit import inject_adapter_in_model

    base = llama()
    ref = copy.deepcopy(base)
    model = inject_adapter_in_model(LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False), base)
    assert model is base and type(model) is LlamaForCausalLM
    assert any(isinstance(mod, LoHaLayer) for mod in model.modules())
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict()) and all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    # save_pretrained of the model class writes a loadable base model
    model.save_pretrained(str(tmp_path / "base"))
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.state_dict().items())
    # the base's keys load back into the injected model (strict), adapters untouched
    wrapper = LoHaModel.attach(model)
    factors = {k: v.clone() for k, v in wrapper.adapter_state_dict().items()}
    model.load_state_dict(ref.state_dict())
    assert all(torch.equal(factors[k], v) for k, v in wrapper.adapter_state_dict().items())
    # the adapter saves in PEFT's format through attach()
    wrapper.save_pretrained(str(tmp_path / "adapter"))
    reloaded = LoHaModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "adapter"))
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        inject_adapter_in_model(LoHaConfig(target_modules=["q_proj"]), model)
    inject_adapter_in_model(LoHaConfig(target_modules=["q_proj"]), model, adapter_name="second")
    assert set(LoHaModel.attach(model).peft_config) == {"default", "second"}
    with pytest.raises(ValueError, match="inject_adapter_in_model"):
        LoHaModel.attach(llama())
