"""Patterns checked when a LoHaConfig is built (not only when a file is read), and target
matching that does not scan the whole ``target_modules`` list for every module."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch.nn as nn

from lohakit import LoHaConfig, LoHaModel
from lohakit.core import patterns, targets
from lohakit.formats import peft as peft_format


# ------------------------------------------------------------------ patterns at construction
@pytest.mark.parametrize(
    "kwargs,field,key",
    [
        ({"target_modules": "(q_proj"}, "target_modules", None),
        ({"exclude_modules": "[a-"}, "exclude_modules", None),
        ({"rank_pattern": {"(?i)lin1": 3}}, "rank_pattern", "(?i)lin1"),  # compiles alone, not in the rule's form
        ({"alpha_pattern": {"lin(1": 3.0}}, "alpha_pattern", "lin(1"),
        ({"rank_pattern": {"ok": 2, "bad)": 3}}, "rank_pattern", "bad)"),
    ],
)
def test_bad_regex_refused_at_construction_naming_field_and_key(kwargs, field, key):
    with pytest.raises(ValueError) as info:
        LoHaConfig(r=2, **kwargs)
    msg = str(info.value)
    assert field in msg and "regular expression" in msg
    if key is not None:
        assert repr(key) in msg


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target_modules": "(.|.)*Z"}, "target_modules"),
        ({"exclude_modules": "(a+)+$"}, "exclude_modules"),
        ({"rank_pattern": {"(.|.)*Z": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"(x+x+)+y": 2}}, "alpha_pattern"),
    ],
)
def test_pathological_pattern_refused_at_construction_in_bounded_time(kwargs, field):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=field):
        LoHaConfig(r=2, **kwargs)
    assert time.monotonic() - t0 < 10  # the limit is about a second per pattern; never a hang


def test_pathological_pattern_refused_at_construction_outside_the_main_thread():
    out: list[BaseException] = []

    def run() -> None:
        try:
            LoHaConfig(r=2, target_modules="(.|.)*Z")
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            out.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert not th.is_alive() and len(out) == 1 and isinstance(out[0], ValueError) and "target_modules" in str(out[0])


def test_the_reader_and_the_config_share_one_check():
    """The file reader's check is the core one (raising the file error type), not a copy."""
    assert peft_format._pattern_forms is patterns.pattern_forms
    cfg = LoHaConfig(r=2, target_modules=["x"])
    cfg.rank_pattern = {"(?i)x": 2}  # set after construction: the reader's check still sees it
    with pytest.raises(peft_format.AdapterConfigError, match="rank_pattern"):
        peft_format.check_patterns(cfg, "some/adapter_config.json")


def test_ordinary_patterns_still_construct():
    cfg = LoHaConfig(r=2, target_modules=r"(\w+\.)*lin[12]", exclude_modules=r"^(?!head).*skip$",
                     rank_pattern={"lin.": 3, r"layers\.3\.lin2": 4}, alpha_pattern={r"lin\d": 4})
    assert cfg.rank_pattern["lin."] == 3


# ------------------------------------------------------------------ matching
def _old_name_in(key: str, names) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _old_under_modules_to_save(mts, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in mts or [])


KEYS = ["q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj", "a.b.c", "b.c", "c",
        "ab.c", "a.bc", "", "a.", "a..b", ".a", "layers.1", "model.layers.10.mlp", "head"]
NAMES = [["q_proj"], ["self_attn.q_proj"], ["b.c"], ["c"], ["a.b.c"], [""], ["a"], ["b"], ["layers.1"],
         ["model.layers"], ["mlp", "head", "q"], ["x.q_proj", "ab"], ["layers.1", "layers.10.mlp"]]


@pytest.mark.parametrize("names", NAMES, ids=lambda n: ",".join(n) or "empty")
def test_name_matching_equals_the_old_semantics(names):
    for key in KEYS:
        assert targets._name_in(key, names) == _old_name_in(key, names), (key, names)
        cfg = LoHaConfig(r=2, target_modules=list(names), exclude_modules=None)
        assert targets.matches_target(cfg, key) == (key in names or _old_name_in(key, names)), (key, names)
        ex = LoHaConfig(r=2, target_modules=["zz"], exclude_modules=list(names))
        assert targets.is_excluded(ex, key) == _old_name_in(key, names), (key, names)
        mts = LoHaConfig(r=2, target_modules=["zz"], modules_to_save=list(names))
        assert targets.is_under_modules_to_save(mts, key) == _old_under_modules_to_save(names, key), (key, names)


def test_regex_and_pattern_matching_equals_the_old_semantics():
    cfg = LoHaConfig(r=2, target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.1\..*",
                     rank_pattern={"q_proj": 3, r"layers\.0\..*": 5}, alpha_pattern={r"v_\w+": 7})
    for key in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.v_proj",
                "q_proj", "x.k_proj", "model.layers.0.up"]:
        old_hit = re.fullmatch(cfg.target_modules, key) is not None and re.fullmatch(cfg.exclude_modules, key) is None
        assert targets.matches_target(cfg, key) == old_hit, key
        old_r = next((v for p, v in cfg.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), cfg.r)
        old_a = next((v for p, v in cfg.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), cfg.alpha)
        assert targets.rank_and_alpha(cfg, key) == (old_r, old_a), key


def test_changing_a_field_after_use_is_seen():
    cfg = LoHaConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 3})
    assert targets.matches_target(cfg, "a.q_proj") and not targets.matches_target(cfg, "a.v_proj")
    cfg.target_modules.append("v_proj")  # in place, longer
    assert targets.matches_target(cfg, "a.v_proj")
    cfg.target_modules = ["k_proj"]  # reassigned
    assert not targets.matches_target(cfg, "a.q_proj") and targets.matches_target(cfg, "a.k_proj")
    assert targets.rank_and_alpha(cfg, "a.q_proj")[0] == 3
    cfg.rank_pattern = {"q_proj": 4}
    assert targets.rank_and_alpha(cfg, "a.q_proj")[0] == 4
    assert "_lohakit_match_cache" not in cfg.to_dict() and LoHaConfig.from_dict(cfg.to_dict()) == cfg


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4), "up": nn.Linear(4, 4)}) for _ in range(3)
        )


def test_200k_target_modules_match_by_name_sets():
    many = [f"unused_{i}" for i in range(200_000)] + ["q_proj", "blocks.2.up"]
    cfg = LoHaConfig(r=2, target_modules=many)
    model = LoHaModel(_Tiny(), cfg)
    adapted = sorted(n for n, _ in model.loha_layers())
    assert adapted == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.2.q_proj", "blocks.2.up"]
    assert targets.matches_target(cfg, "x.blocks.2.up") and not targets.matches_target(cfg, "blocks.1.up")
    # the names are looked up, not scanned: one set built per config and reused for every module
    cache = cfg.__dict__["_lohakit_match_cache"]["target_modules"]
    assert isinstance(cache[2], frozenset) and len(cache[2]) == len(many)
