"""Which modules a config adapts: pure functions on module names (PEFT's matching rules)."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

from .config import LoHaConfig

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "matches_target",
    "is_excluded",
    "layer_index",
    "pattern_key",
    "rank_and_alpha",
    "is_under_modules_to_save",
]

#: Default target_modules per transformers ``model_type`` (attention query/value projections).
#: gpt2-style models name their fused projection ``c_attn`` (a transformers Conv1D), which
#: lohakit wraps, so they work out of the box.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
    "stablelm": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "clip": ["q_proj", "v_proj"],
    "clip_text_model": ["q_proj", "v_proj"],
    "vit": ["query", "value"],
    "whisper": ["q_proj", "v_proj"],
    # further model types PEFT's LoHa mapping knows
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "btlm": ["c_proj", "c_attn"],
    "chatglm": ["query_key_value"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "layoutlm": ["query", "value"],
    "llama4": ["q_proj", "v_proj"],
    "mpt": ["Wqkv"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


#: Where a config keeps what the rules below derive from it (name sets, compiled regexes).
_CACHE_ATTR = "_lohakit_match_cache"


def _derived(config: LoHaConfig, slot: str, value: Any, build: Callable[[Any], Any]) -> Any:
    """``build(value)``, computed once per config and field value (PEFT's rules, precompiled).

    Kept on the config (not a dataclass field: never saved, compared or copied into files)
    and rebuilt when the field is reassigned or a list/dict changes length or keys.
    """
    cache = config.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = config.__dict__[_CACHE_ATTR] = {}
    if isinstance(value, dict):
        signature: Any = tuple(value)
    elif isinstance(value, (list, set, tuple)):
        signature = len(value)
    else:
        signature = value
    hit = cache.get(slot)
    if hit is not None and hit[0] is value and hit[1] == signature:
        return hit[2]
    made = build(value)
    cache[slot] = (value, signature, made)
    return made


def forget_compiled(config: LoHaConfig) -> None:
    """Drop the compiled forms of ``config``'s fields (a pass over a model starts from the values as they are now)."""
    config.__dict__.pop(_CACHE_ATTR, None)


def _dotted_suffixes(key: str) -> Iterator[str]:
    """``key`` and every part of it after a dot: ``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    yield key
    i = key.find(".")
    while i != -1:
        yield key[i + 1:]
        i = key.find(".", i + 1)


def _name_in(key: str, names: Iterable[str] | frozenset[str]) -> bool:
    """``key`` is one of ``names`` or ends with ``"." + name``: a set lookup per dotted suffix of
    ``key`` (O(depth of key), whatever the number of names)."""
    name_set = names if isinstance(names, (set, frozenset)) else frozenset(names)
    return any(s in name_set for s in _dotted_suffixes(key))


def _names(config: LoHaConfig, field_name: str) -> frozenset[str]:
    return _derived(config, field_name, getattr(config, field_name), frozenset)


def _regex(config: LoHaConfig, field_name: str) -> "re.Pattern[str]":
    return _derived(config, field_name + ":re", getattr(config, field_name), re.compile)


def is_excluded(config: LoHaConfig, key: str) -> bool:
    """exclude_modules: regex full match (str) or exact / dotted-suffix match (list)."""
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return _regex(config, "exclude_modules").fullmatch(key) is not None
    return _name_in(key, _names(config, "exclude_modules"))


def is_under_modules_to_save(config: LoHaConfig, key: str) -> bool:
    """Adapters never go inside a module that is trained as a full copy."""
    mts = config.modules_to_save
    if not mts:
        return False
    # PEFT's rule: re.match((^|.*\.)<m>($|\..*)) for each entry m, the entry read as a regex
    return any(rx.match(key) is not None for rx in _derived(config, "modules_to_save:re", mts, _modules_to_save_rules))


def _modules_to_save_rules(entries: Iterable[str]) -> list["re.Pattern[str]"]:
    rules = []
    for m in entries:
        try:
            rules.append(re.compile(rf"(^|.*\.){m}($|\..*)"))
        except re.error:  # not a regex: PEFT would fail; read it literally
            rules.append(re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)"))
    return rules


_DEFAULT_LAYER_RX = re.compile(r".*?\.[^.]*\.(\d+)\.")


@functools.lru_cache(maxsize=256)
def _layer_regex(pattern: str) -> "re.Pattern[str]":
    return re.compile(rf"(?:^|.*?\.){pattern}\.(\d+)\.")


def layer_index(key: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The first layer index in a module path (``model.layers.3.mlp`` -> 3), as PEFT finds it."""
    if not layers_pattern:
        m = _DEFAULT_LAYER_RX.match(key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = _layer_regex(p).match(key)
            if m:
                break
    return int(m.group(1)) if m else None


def matches_target(config: LoHaConfig, key: str, linear_candidate: bool = False) -> bool:
    """Whether module path ``key`` is a target of ``config`` (before type checks).

    ``target_modules`` as a list: exact name or dotted-suffix match; as a string: regex full
    match; ``"all-linear"``: every linear layer but the output head, which depends on module
    types, so the caller says whether ``key`` is one (``linear_candidate``).
    """
    if is_excluded(config, key) or is_under_modules_to_save(config, key):
        return False
    tm = config.target_modules
    if tm is None:
        return False
    if tm == "all-linear":
        return linear_candidate
    if isinstance(tm, str):
        return _regex(config, "target_modules").fullmatch(key) is not None
    names = _names(config, "target_modules")
    if key in names:
        # A full path named directly is adapted whatever layers_to_transform says (PEFT's rule;
        # PEFT saves "all-linear" expanded to full paths, so its files rely on it).
        return True
    if not _name_in(key, names):
        return False
    lt = config.layers_to_transform
    if lt is None or lt == []:
        return True
    idx = layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


@functools.lru_cache(maxsize=4096)
def _suffix_regex(pattern: str) -> "re.Pattern[str]":
    return re.compile(rf"(.*\.)?({pattern})$")


def pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """The first pattern that matches the end of ``key`` at a dot boundary (PEFT's rule)."""
    for p in patterns:
        if _suffix_regex(p).match(key):
            return p
    return None


def _first_key(compiled: Sequence[tuple[str, "re.Pattern[str]"]], key: str) -> str | None:
    for p, rx in compiled:
        if rx.match(key):
            return p
    return None


def _compiled_keys(patterns: dict[str, Any]) -> list[tuple[str, "re.Pattern[str]"]]:
    return [(p, _suffix_regex(p)) for p in patterns]


def rank_and_alpha(config: LoHaConfig, key: str) -> tuple[int, float]:
    """Rank and alpha for module ``key``: rank_pattern / alpha_pattern overrides, else the defaults."""
    rk = _first_key(_derived(config, "rank_pattern", config.rank_pattern, _compiled_keys), key)
    ak = _first_key(_derived(config, "alpha_pattern", config.alpha_pattern, _compiled_keys), key)
    r = config.rank_pattern[rk] if rk is not None else config.r
    alpha = config.alpha_pattern[ak] if ak is not None else config.alpha
    return r, alpha
