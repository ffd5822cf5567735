"""Review findings on configs and target matching, each a case that used to slip through.

* alpha (and alpha_pattern values) must give a scale float32 can hold: inf and 1e300 are refused
  when the config is built (a 1e300 alpha loaded and produced inf/NaN outputs).
* modules_to_save follows PEFT's rule, each entry a regex inside ``(^|.*\\.)<m>($|\\..*)``.
* A field edited in place after a config was used is seen by the next injection.
* A pattern that is fast on probe strings but slow on the model's own names is refused at injection.
* ``lohakit inspect`` of a file with a huge finite alpha reports its norm, not an internal error.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from lohakit import LoHaConfig, LoHaModel
from lohakit.core.targets import is_under_modules_to_save


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e300, 3.5e38, 0, -1, True])
def test_alpha_outside_float32_scale_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LoHaConfig(alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['x'\]"):
        LoHaConfig(alpha_pattern={"x": alpha})


@pytest.mark.parametrize("entry,key", [
    ("lm_head", "lm_head"), ("lm_head", "model.lm_head.q_proj"), ("lm_.*", "lm_head.q_proj"), ("score", "scores"),
    ("head", "lm_head"), ("classifier.dense", "roberta.classifier.dense.out"), ("a|b", "x.b.y"), ("(", "x.(.y"),
])
def test_modules_to_save_rule_is_peft_s(entry, key):
    cfg = LoHaConfig(modules_to_save=[entry])
    try:
        want = re.match(rf"(^|.*\.){entry}($|\..*)", key) is not None  # PEFT (tuners_utils), the entry as a regex
    except re.error:
        want = re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", key) is not None
    assert is_under_modules_to_save(cfg, key) is want


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def test_in_place_edit_after_use_is_seen():
    cfg = LoHaConfig(r=2, target_modules=["q_proj"])
    first = LoHaModel(Two(), cfg)
    assert [n for n, _ in first.loha_layers()] == ["q_proj"]
    cfg.target_modules[0] = "v_proj"  # same length, edited in place
    second = LoHaModel(Two(), cfg)
    assert [n for n, _ in second.loha_layers()] == ["v_proj"]


def test_slow_pattern_on_the_model_names_refused_at_injection():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({"ab" * 28: nn.Linear(2, 2)})

    with pytest.raises(ValueError, match="takes more than"):
        LoHaModel(Named(), LoHaConfig(r=1, target_modules=r"layers\.((ab)*|a)*c"))


def test_inspect_huge_finite_alpha_reports_its_norm(tmp_path, capsys):
    from safetensors.torch import save_file

    from lohakit.app.cli import main

    g = torch.Generator().manual_seed(0)
    sd = {f"lora_unet_x.hada_{k}": torch.randn(*s, generator=g) for k, s in
          {"w1_a": (4, 2), "w1_b": (2, 4), "w2_a": (4, 2), "w2_b": (2, 4)}.items()}
    sd["lora_unet_x.alpha"] = torch.tensor(1e300, dtype=torch.float64)
    save_file(sd, str(tmp_path / "big.safetensors"))
    code = main(["inspect", str(tmp_path / "big.safetensors")])
    captured = capsys.readouterr()
    assert code == 0 and "internal error" not in captured.err, captured.err  # used to exit 1 (OverflowError)
    total = captured.out.strip().splitlines()[-1]
    assert "e+300" in total  # the norms of 1e300-scaled factors, summed without overflowing
