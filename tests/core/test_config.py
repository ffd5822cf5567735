"""LoHaConfig: PEFT's fields and defaults, validation naming the field, JSON round trip."""

from __future__ import annotations

import json
import logging

import peft
import pytest

from lohakit import LoHaConfig


def test_defaults_match_peft():
    ours = LoHaConfig().to_dict()
    theirs = peft.LoHaConfig().to_dict()
    for key in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "target_modules",
                "exclude_modules", "init_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "modules_to_save", "inference_mode", "revision", "task_type",
                "base_model_name_or_path"):
        assert ours[key] == theirs[key], key
    assert ours["peft_type"] == "LOHA" and ours["rank_dropout_scale"] is True


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"rank_dropout": -0.1}, "rank_dropout"),
        ({"module_dropout": 1.5}, "module_dropout"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoHaConfig(**kwargs)


def test_unknown_key_from_dict_raises_listing_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rnak'\].*valid keys"):
        LoHaConfig.from_dict({"r": 4, "rnak": 3})


def test_wrong_peft_type_raises():
    with pytest.raises(ValueError, match="peft_type"):
        LoHaConfig.from_dict({"peft_type": "LORA", "r": 4})


def test_json_round_trip(tmp_path):
    cfg = LoHaConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                     alpha_pattern={"v_proj": 3.0}, init_weights="lycoris", rank_dropout_scale=False)
    path = tmp_path / "adapter_config.json"
    cfg.save_json(path)
    assert LoHaConfig.from_json_file(path) == cfg


def test_reads_peft_adapter_config_unchanged(tmp_path, caplog):
    theirs = peft.LoHaConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"], use_effective_conv2d=True,
                             rank_pattern={"q_proj": 2}, module_dropout=0.1)
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["trainable_token_indices"] = [1, 2]  # a PEFT-only key with a value: warned about, ignored
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        ours = LoHaConfig.from_json_file(tmp_path / "adapter_config.json")
    assert "trainable_token_indices" in caplog.text
    assert ours.r == 4 and ours.alpha == 16 and sorted(ours.target_modules) == ["q_proj", "v_proj"]
    assert ours.use_effective_conv2d and ours.rank_pattern == {"q_proj": 2} and ours.module_dropout == 0.1
    with pytest.raises(ValueError, match="trainable_token_indices"):
        LoHaConfig.from_json_file(tmp_path / "adapter_config.json", strict=True)


def test_bad_json_file(tmp_path):
    p = tmp_path / "adapter_config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        LoHaConfig.from_json_file(p)
