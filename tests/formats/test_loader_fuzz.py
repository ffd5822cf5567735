"""Fuzzing the PEFT-format loader with hypothesis.

Every case must end in one of two ways: a clean :class:`lohakit.LoHaFormatError` with the model
exactly as before (module tree, every tensor, requires_grad flags, train/eval modes, adapters), or a
correct load (every adapter tensor equal to what the file holds, every scale equal to alpha/r of the
config). Anything else (another exception type, a half-applied model) fails the test.

Inputs: byte flips and truncations of a valid ``adapter_model.safetensors`` (flips biased towards the
JSON header), random JSON configs (valid config with random fields replaced by random JSON values,
and arbitrary JSON documents), and byte flips of the config file. Cases run with a fixed seed
(``derandomize``) so CI is reproducible; the counts are printed at the end of the module (``-s``).
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lohakit
from lohakit import LoHaConfig, LoHaModel, get_peft_model
from lohakit.formats import peft as pf
from lohakit.core.io import NonFiniteTensorWarning
from lohakit.core.targets import rank_and_alpha

COUNTS: Counter[str] = Counter()
FUZZ = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(4, 2)


def tiny() -> Tiny:
    torch.manual_seed(5)
    return Tiny().eval()


VALID_CONFIG = dict(
    r=2, alpha=3, target_modules=["lin", "c1", "c2"], use_effective_conv2d=True,
    rank_pattern={"c2": 1}, alpha_pattern={"lin": 5}, modules_to_save=["head"], init_weights=False,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(11)
    get_peft_model(tiny(), LoHaConfig(**VALID_CONFIG)).save_pretrained(str(d))
    weights = (d / pf.SAFETENSORS_WEIGHTS_NAME).read_bytes()
    yield {
        "dir": d,
        "weights": weights,
        "header_end": 8 + int.from_bytes(weights[:8], "little"),
        "config": json.loads((d / pf.ADAPTER_CONFIG_NAME).read_text()),
        "config_bytes": (d / pf.ADAPTER_CONFIG_NAME).read_bytes(),
    }
    print(f"\n[loader fuzz] cases tried: {sum(v for k, v in COUNTS.items() if '/' in k)}; outcomes: {dict(sorted(COUNTS.items()))}")


def _state(model: nn.Module) -> tuple:
    return (
        [(n, type(m), id(m)) for n, m in model.named_modules()],
        {n: (t.detach().clone(), id(t)) for n, t in model.state_dict(keep_vars=True).items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        copy.deepcopy(getattr(model, "peft_config", None)),
    )


def _assert_same(model: nn.Module, before: tuple) -> None:
    tree, tensors, grads, modes, cfg = _state(model)
    assert tree == before[0]
    assert tensors.keys() == before[1].keys()
    for k, (t, ident) in before[1].items():
        assert tensors[k][1] == ident and tensors[k][0].dtype == t.dtype and torch.equal(tensors[k][0], t), k
    assert grads == before[2] and modes == before[3] and cfg == before[4]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), so flipped bytes that decode to NaN compare exactly."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def _check_loaded(lm: LoHaModel, name: str, d: Path) -> None:
    """The loaded adapter holds exactly the file's tensors and the config's scales."""
    sd = {k[len(pf.KEY_PREFIX):]: v for k, v in load_file(str(d / pf.SAFETENSORS_WEIGHTS_NAME)).items()}
    config = lm.peft_config[name]
    seen = 0
    for path, layer in lm.loha_layers():
        if name not in layer.hada_w1_a:
            continue
        r, alpha = rank_and_alpha(config, path)
        assert layer.r[name] == r and layer.scaling[name] == alpha / r
        for pname in lohakit.LoHaLayer.adapter_layer_names:
            if name in getattr(layer, pname):
                p = getattr(layer, pname)[name]
                assert not p.is_meta
                assert _same_bits(p.detach(), sd[f"{path}.{pname}"].float().reshape(p.shape)), f"{path}.{pname}"
                seen += 1
    for path, wrapper in lm._wrappers():
        if name in wrapper.modules_to_save:
            for k, t in wrapper.modules_to_save[name].state_dict().items():
                assert _same_bits(t, sd[f"{path}.{k}"].to(t.dtype)), f"{path}.{k}"
                seen += 1
    assert seen == len(sd)


def _attempt(d: Path, kind: str, via_load_adapter: bool) -> None:
    """Load ``d``; assert a clean error with nothing changed, or a correct load."""
    if via_load_adapter:
        model = get_peft_model(tiny(), LoHaConfig(r=1, target_modules=["lin", "c2"], modules_to_save=["head"]))
        model.train()
    else:
        model = tiny()
    before = _state(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteTensorWarning)
            warnings.simplefilter("ignore", UserWarning)
            if via_load_adapter:
                model.load_adapter(str(d), "fuzzed")
                loaded, name = model, "fuzzed"
            else:
                loaded, name = LoHaModel.from_pretrained(model, str(d)), "default"
    except lohakit.LoHaFormatError as e:
        assert str(e)
        _assert_same(model, before)
        COUNTS[f"{kind}/error:{type(e).__name__}"] += 1
        return
    _check_loaded(loaded, name, d)
    COUNTS[f"{kind}/loaded"] += 1


def _fresh_dir(valid: dict[str, Any], tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("case", numbered=True)
    shutil.copy(valid["dir"] / pf.ADAPTER_CONFIG_NAME, d / pf.ADAPTER_CONFIG_NAME)
    shutil.copy(valid["dir"] / pf.SAFETENSORS_WEIGHTS_NAME, d / pf.SAFETENSORS_WEIGHTS_NAME)
    return d


def _assert_outcomes(kind: str, loads: bool) -> None:
    """The fuzzing reached clean errors (and, where possible, correct loads)."""
    outcomes = {k: v for k, v in COUNTS.items() if k.startswith(kind + "/")}
    assert any("/error:" in k for k in outcomes), outcomes
    if loads:
        assert outcomes.get(f"{kind}/loaded", 0) > 0, outcomes


# ------------------------------------------------------------------ the weights file
def test_fuzz_weight_byte_flips(valid, tmp_path_factory):
    blob0 = valid["weights"]
    anywhere = st.integers(0, len(blob0) - 1)
    in_header = st.integers(0, valid["header_end"] - 1)

    @settings(FUZZ, max_examples=1000)
    @given(flips=st.lists(st.tuples(st.one_of(in_header, anywhere), st.integers(1, 255)), min_size=1, max_size=4),
           via_load_adapter=st.booleans())
    def case(flips, via_load_adapter):
        blob = bytearray(blob0)
        for pos, xor in flips:
            blob[pos] ^= xor
        d = _fresh_dir(valid, tmp_path_factory)
        (d / pf.SAFETENSORS_WEIGHTS_NAME).write_bytes(bytes(blob))
        _attempt(d, "weights-flip", via_load_adapter)

    case()
    _assert_outcomes("weights-flip", loads=True)


def test_fuzz_weight_truncation(valid, tmp_path_factory):
    @settings(FUZZ, max_examples=200)
    @given(n=st.integers(0, len(valid["weights"]) - 1), via_load_adapter=st.booleans())
    def case(n, via_load_adapter):
        d = _fresh_dir(valid, tmp_path_factory)
        (d / pf.SAFETENSORS_WEIGHTS_NAME).write_bytes(valid["weights"][:n])
        _attempt(d, "weights-truncate", via_load_adapter)

    case()
    _assert_outcomes("weights-truncate", loads=False)


# ------------------------------------------------------------------ the config
FIELDS = LoHaConfig.field_names() + ["peft_version", "auto_mapping", "lora_alpha", "bogus_key"]
PLAUSIBLE = st.sampled_from(
    ["lin", "c1", "c2", "head", "all-linear", ".*", "c.", "(", "LOHA", "LORA", "layers", 0, 1, 2, 3, -1, 0.5, 1e308,
     float("nan"), float("inf"), True, False, None, [], {}, ["lin"], ["c1", "c2"], {"lin": 2}, {"c2": 1}, {"c.": 0.5}, [0, 1]]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6) | PLAUSIBLE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.sampled_from(["lin", "c2"]), inner, max_size=3),
    max_leaves=6,
)


def test_fuzz_random_config_fields(valid, tmp_path_factory):
    @settings(FUZZ, max_examples=1000)
    @given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=4),
           drop=st.lists(st.sampled_from(FIELDS), max_size=2), via_load_adapter=st.booleans())
    def case(changes, drop, via_load_adapter):
        config = dict(valid["config"])
        for k in drop:
            config.pop(k, None)
        config.update(changes)
        d = _fresh_dir(valid, tmp_path_factory)
        (d / pf.ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
        _attempt(d, "config-fields", via_load_adapter)

    case()
    _assert_outcomes("config-fields", loads=True)


def test_fuzz_random_config_documents(valid, tmp_path_factory):
    @settings(FUZZ, max_examples=150)
    @given(doc=JSON, via_load_adapter=st.booleans())
    def case(doc, via_load_adapter):
        d = _fresh_dir(valid, tmp_path_factory)
        (d / pf.ADAPTER_CONFIG_NAME).write_text(json.dumps(doc))
        _attempt(d, "config-document", via_load_adapter)

    case()
    _assert_outcomes("config-document", loads=False)


def test_fuzz_config_byte_flips(valid, tmp_path_factory):
    size = len(valid["config_bytes"])

    @settings(FUZZ, max_examples=300)
    @given(cut=st.integers(1, size), flips=st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), max_size=3),
           via_load_adapter=st.booleans())
    def case(cut, flips, via_load_adapter):
        blob = bytearray(valid["config_bytes"])
        for pos, xor in flips:
            blob[pos] ^= xor
        d = _fresh_dir(valid, tmp_path_factory)
        (d / pf.ADAPTER_CONFIG_NAME).write_bytes(bytes(blob[:cut]))
        _attempt(d, "config-bytes", via_load_adapter)

    case()
    _assert_outcomes("config-bytes", loads=False)
