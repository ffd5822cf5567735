"""Which modules a config adapts: pure functions on module names (PEFT's matching rules)."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

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


def _name_in(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def is_excluded(config: LoHaConfig, key: str) -> bool:
    """exclude_modules: regex full match (str) or exact / dotted-suffix match (list)."""
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return _name_in(key, ex)


def is_under_modules_to_save(config: LoHaConfig, key: str) -> bool:
    """Adapters never go inside a module that is trained as a full copy."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save or [])


def layer_index(key: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The first layer index in a module path (``model.layers.3.mlp`` -> 3), as PEFT finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key)
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
        return re.fullmatch(tm, key) is not None
    if key in tm:
        # A full path named directly is adapted whatever layers_to_transform says (PEFT's rule;
        # PEFT saves "all-linear" expanded to full paths, so its files rely on it).
        return True
    if not _name_in(key, tm):
        return False
    lt = config.layers_to_transform
    if lt is None or lt == []:
        return True
    idx = layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


def pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """The first pattern that matches the end of ``key`` at a dot boundary (PEFT's rule)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def rank_and_alpha(config: LoHaConfig, key: str) -> tuple[int, float]:
    """Rank and alpha for module ``key``: rank_pattern / alpha_pattern overrides, else the defaults."""
    rk = pattern_key(config.rank_pattern, key)
    ak = pattern_key(config.alpha_pattern, key)
    r = config.rank_pattern[rk] if rk is not None else config.r
    alpha = config.alpha_pattern[ak] if ak is not None else config.alpha
    return r, alpha
