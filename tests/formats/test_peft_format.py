"""PEFT's adapter directory format: interop with PEFT both ways, round trips, atomic writes, and
every documented load error leaving the model exactly as it was.

Tolerances: PEFT <-> lohakit outputs in float32 within 1e-6 absolute (the factors are identical,
only the order of float32 operations differs); lohakit -> disk -> lohakit bit-exact.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch
import torch.nn as nn

import peft
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lohakit
from lohakit import LoHaConfig, LoHaModel, get_peft_model
from lohakit.core import io as lio
from lohakit.formats import peft as pf

from helpers.models import CASES, run
from helpers.snapshots import assert_unchanged, snapshot

ATOL_F32 = 1e-6
PEFT_CASES = [c for c in CASES if c.peft and c.name in {
    "mlp", "conv1d", "conv1d_effective", "conv2d", "conv2d_effective", "conv2d_grouped", "conv2d_grouped_effective", "llama",
}]


# ------------------------------------------------------------------ helpers
class Net(nn.Module):
    """Linear, Conv1d and Conv2d layers plus a head for modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.lin2 = nn.Linear(8, 5)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(5, 3)
        self.norm = nn.BatchNorm1d(3)  # has an int64 buffer: modules_to_save must carry it

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = self.norm(self.head(torch.relu(self.lin2(torch.relu(self.lin(x))))))
        return torch.cat([a.flatten(), self.c1(y).flatten(), self.c2(z).flatten()])


def net() -> Net:
    torch.manual_seed(1234)
    return Net().eval()


def net_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 6, generator=g), torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 6, 6, generator=g)


NET_CONFIGS: dict[str, dict[str, Any]] = {
    "flat": dict(r=2, alpha=3, target_modules=["lin", "lin2", "c1", "c2"]),
    "effective": dict(r=2, alpha=5, target_modules=["lin", "c1", "c2"], use_effective_conv2d=True),
    "patterns": dict(
        r=2, alpha=4, target_modules=["lin", "lin2", "c1", "c2"], use_effective_conv2d=True,
        rank_pattern={"lin2": 3, "c1": 1}, alpha_pattern={"lin": 7.5, "c2": 1.25},
    ),
    "modules_to_save": dict(r=3, alpha=2, target_modules=["lin", "c2"], modules_to_save=["head", "norm"]),
    "regex_target": dict(r=2, alpha=2, target_modules=r"(lin|c\d)"),
}


def peft_save(base: nn.Module, cfg: dict[str, Any], path: Path, extra: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    torch.manual_seed(99)
    pm = peft.get_peft_model(base, peft.LoHaConfig(init_weights=False, **cfg))
    for name, c in (extra or {}).items():
        pm.add_adapter(name, peft.LoHaConfig(init_weights=False, **c))
    if "norm" in (cfg.get("modules_to_save") or []):
        with torch.no_grad():  # make the saved copy differ from the base
            wrapper = pm.base_model.model.norm
            wrapper.modules_to_save["default"].running_mean.add_(0.5)
            wrapper.modules_to_save["default"].num_batches_tracked.add_(7)
            pm.base_model.model.head.modules_to_save["default"].weight.mul_(-2)
    pm.save_pretrained(str(path))
    return pm.eval()


def loha_save(base: nn.Module, cfg: dict[str, Any], path: Path, extra: dict[str, dict[str, Any]] | None = None) -> LoHaModel:
    torch.manual_seed(99)
    lm = get_peft_model(base, LoHaConfig(init_weights=False, **cfg))
    for name, c in (extra or {}).items():
        lm.add_adapter(name, LoHaConfig(init_weights=False, **c))
    if "head" in (cfg.get("modules_to_save") or []):
        with torch.no_grad():
            lm.model.head.modules_to_save["default"].weight.mul_(-2)
            lm.model.norm.modules_to_save["default"].running_var.add_(0.25)
    lm.save_pretrained(str(path))
    return lm.eval()


def adapter_tensors(model: LoHaModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pf.peft_state_dict(model, name).items()}


# ------------------------------------------------------------------ interop with PEFT
@pytest.mark.parametrize("case", PEFT_CASES, ids=repr)
def test_peft_to_lohakit_core_cases(case, tmp_path):
    x = case.inputs(torch.float32)
    pm = peft_save(case.build(), dict(r=3, alpha=5, **case.config), tmp_path)
    with torch.no_grad():
        expected = run(pm, x)
        got = run(LoHaModel.from_pretrained(case.build(), str(tmp_path)), x)
    torch.testing.assert_close(got, expected, atol=ATOL_F32, rtol=0)


@pytest.mark.parametrize("case", PEFT_CASES, ids=repr)
def test_lohakit_to_peft_core_cases(case, tmp_path):
    x = case.inputs(torch.float32)
    lm = loha_save(case.build(), dict(r=3, alpha=5, **case.config), tmp_path)
    with torch.no_grad():
        expected = run(lm, x)
        got = run(peft.PeftModel.from_pretrained(case.build(), str(tmp_path)), x)
    torch.testing.assert_close(got, expected, atol=ATOL_F32, rtol=0)


@pytest.mark.parametrize("cfg_name", list(NET_CONFIGS))
def test_peft_to_lohakit_net(cfg_name, tmp_path):
    pm = peft_save(net(), NET_CONFIGS[cfg_name], tmp_path)
    lm = LoHaModel.from_pretrained(net(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(lm(*net_inputs()), pm(*net_inputs()), atol=ATOL_F32, rtol=0)
    # the factors are PEFT's, bit for bit
    theirs = peft.get_peft_model_state_dict(pm)
    ours = pf.peft_state_dict(lm, "default")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("cfg_name", list(NET_CONFIGS))
def test_lohakit_to_peft_net(cfg_name, tmp_path):
    lm = loha_save(net(), NET_CONFIGS[cfg_name], tmp_path)
    pm = peft.PeftModel.from_pretrained(net(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(pm(*net_inputs()), lm(*net_inputs()), atol=ATOL_F32, rtol=0)


def test_layout_identical_to_peft(tmp_path):
    """PEFT re-saving our adapter gives the same safetensors bytes and the same config JSON."""
    cfg = NET_CONFIGS["modules_to_save"] | {"use_effective_conv2d": True}
    loha_save(net(), cfg, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(net(), str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert (ours / pf.SAFETENSORS_WEIGHTS_NAME).read_bytes() == (theirs / pf.SAFETENSORS_WEIGHTS_NAME).read_bytes()
    with safe_open(str(ours / pf.SAFETENSORS_WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(k.startswith("base_model.model.") for k in f.keys())
        assert "base_model.model.head.weight" in f.keys() and "base_model.model.norm.num_batches_tracked" in f.keys()
    a = json.loads((ours / pf.ADAPTER_CONFIG_NAME).read_text())
    b = json.loads((theirs / pf.ADAPTER_CONFIG_NAME).read_text())
    a["target_modules"], b["target_modules"] = sorted(a["target_modules"]), sorted(b["target_modules"])
    assert a == b
    assert a["peft_type"] == "LOHA" and a["inference_mode"] is True and a["peft_version"] == pf.PEFT_FORMAT_VERSION


OTHER = dict(r=1, alpha=2, target_modules=["lin", "c2"], use_effective_conv2d=True)


def assert_each_adapter_agrees(lm: LoHaModel, pm: nn.Module, names: Iterable[str]) -> None:
    """With each adapter active in both models, the outputs agree to float32 tolerance."""
    for name in names:
        pm.set_adapter(name)
        lm.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(lm(*net_inputs()), pm(*net_inputs()), atol=ATOL_F32, rtol=0)


def test_multi_adapter_peft_to_lohakit(tmp_path):
    pm = peft_save(net(), NET_CONFIGS["flat"], tmp_path, extra={"other": OTHER})
    assert (tmp_path / "other" / pf.ADAPTER_CONFIG_NAME).is_file()
    lm = LoHaModel.from_pretrained(net(), str(tmp_path))
    lm.load_adapter(str(tmp_path), "other", subfolder="other")
    assert_each_adapter_agrees(lm, pm, ("default", "other"))


def test_multi_adapter_lohakit_to_peft(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["patterns"], tmp_path, extra={"other": OTHER})
    assert sorted(p.name for p in tmp_path.iterdir()) == [pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME, "other"]
    with safe_open(str(tmp_path / "other" / pf.SAFETENSORS_WEIGHTS_NAME), "pt") as f:
        assert not any("other" in k or "default" in k for k in f.keys())
    pm = peft.PeftModel.from_pretrained(net(), str(tmp_path))
    pm.load_adapter(str(tmp_path / "other"), "other")
    assert_each_adapter_agrees(lm, pm, ("default", "other"))


def test_selected_adapters_and_rename(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path / "all", extra={"other": OTHER})
    lm.save_pretrained(str(tmp_path / "sel"), selected_adapters=["other"])
    assert [p.name for p in (tmp_path / "sel").iterdir()] == ["other"]
    with pytest.raises(lio.AdapterNotFoundError, match=r"subfolders \['other'\]"):
        LoHaModel.from_pretrained(net(), str(tmp_path / "sel"))
    # loaded under another name, the adapter is the same
    fresh = LoHaModel.from_pretrained(net(), str(tmp_path / "sel" / "other"), adapter_name="style")
    theirs = adapter_tensors(lm, "other")
    ours = adapter_tensors(fresh, "style")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ValueError, match="do not exist"):
        lm.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])


# ------------------------------------------------------------------ lohakit round trip
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("cfg_name", ["patterns", "modules_to_save"])
def test_round_trip_bit_exact(cfg_name, low_cpu_mem_usage, tmp_path):
    lm = loha_save(net(), NET_CONFIGS[cfg_name], tmp_path / "a")
    back = LoHaModel.from_pretrained(net(), str(tmp_path / "a"), low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.is_meta for p in back.parameters())
    before, after = adapter_tensors(lm), adapter_tensors(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(back(*net_inputs()), lm(*net_inputs()))
    back.save_pretrained(str(tmp_path / "b"))
    for name in (pf.SAFETENSORS_WEIGHTS_NAME, pf.ADAPTER_CONFIG_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_conv1d_effective_core_layouts(tmp_path):
    """PEFT's (r, r, k, 1) Conv1d core is written as is; LyCORIS' (r, r, k) is accepted on load."""
    lm = loha_save(net(), NET_CONFIGS["effective"], tmp_path)
    sd = load_file(str(tmp_path / pf.SAFETENSORS_WEIGHTS_NAME))
    assert sd["base_model.model.c1.hada_t1"].shape == (2, 2, 3, 1)
    sd = {k: (v.squeeze(-1) if k.startswith("base_model.model.c1.hada_t") else v) for k, v in sd.items()}
    save_file(sd, str(tmp_path / pf.SAFETENSORS_WEIGHTS_NAME))
    back = LoHaModel.from_pretrained(net(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(back(*net_inputs()), lm(*net_inputs()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bf16", "float32"])
def test_save_dtype(dtype, tmp_path):
    lm = loha_save(net(), NET_CONFIGS["modules_to_save"], tmp_path / "f32")
    lm.save_pretrained(str(tmp_path / "x"), save_dtype=dtype)
    want = pf._save_dtype(dtype)
    sd = load_file(str(tmp_path / "x" / pf.SAFETENSORS_WEIGHTS_NAME))
    for k, v in sd.items():
        assert v.dtype == (want if ".hada_" in k else lm.model.get_submodule(k[17:].rsplit(".", 1)[0]).modules_to_save["default"].state_dict()[k.rsplit(".", 1)[1]].dtype), k
    back = LoHaModel.from_pretrained(net(), str(tmp_path / "x"))
    for k, v in adapter_tensors(back).items():
        if ".hada_" in k:
            assert v.dtype == torch.float32
            assert torch.equal(v, adapter_tensors(lm)[k].to(want).float()), k


def test_save_dtype_rejects_other_types(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path)
    for bad in (torch.int8, "float64", 3):
        with pytest.raises(ValueError, match="save_dtype"):
            lm.save_pretrained(str(tmp_path / "x"), save_dtype=bad)
    with pytest.raises(ValueError, match="safetensors only"):
        lm.save_pretrained(str(tmp_path / "x"), safe_serialization=False)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainable_and_mode(is_trainable, tmp_path):
    loha_save(net(), NET_CONFIGS["modules_to_save"], tmp_path)
    base = net().train()
    lm = LoHaModel.from_pretrained(base, str(tmp_path), is_trainable=is_trainable)
    factors = [p for n, p in lm.named_parameters() if ".hada_" in n]
    copies = [p for n, p in lm.named_parameters() if ".modules_to_save." in n]
    assert factors and copies
    assert all(p.requires_grad == is_trainable for p in factors + copies)
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".hada_" not in n and ".modules_to_save." not in n)
    assert lm.training == is_trainable and all(m.training == is_trainable for m in lm.modules())
    assert lm.peft_config["default"].inference_mode == (not is_trainable)


def test_rank_dropout_scale_written_only_when_not_default(tmp_path):
    loha_save(net(), NET_CONFIGS["flat"], tmp_path / "a")
    assert "rank_dropout_scale" not in json.loads((tmp_path / "a" / pf.ADAPTER_CONFIG_NAME).read_text())
    loha_save(net(), NET_CONFIGS["flat"] | {"rank_dropout_scale": False}, tmp_path / "b")
    back = LoHaModel.from_pretrained(net(), str(tmp_path / "b"))
    assert back.peft_config["default"].rank_dropout_scale is False


def test_legacy_bin_loads_through_weights_only(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path)
    sd = load_file(str(tmp_path / pf.SAFETENSORS_WEIGHTS_NAME))
    (tmp_path / pf.SAFETENSORS_WEIGHTS_NAME).unlink()
    torch.save(sd, str(tmp_path / pf.LEGACY_WEIGHTS_NAME))
    back = LoHaModel.from_pretrained(net(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(back(*net_inputs()), lm(*net_inputs()))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("LOHAKIT_EVIL_MARKER", "/nonexistent/marker"),))


# ------------------------------------------------------------------ load errors: nothing applied
def _mutate_weights(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        sd = load_file(str(d / pf.SAFETENSORS_WEIGHTS_NAME))
        fn(sd)
        save_file(sd, str(d / pf.SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})

    return apply


def _mutate_config(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / pf.ADAPTER_CONFIG_NAME).read_text())
        fn(cfg)
        (d / pf.ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))

    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _truncate(n: int) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        p = d / pf.SAFETENSORS_WEIGHTS_NAME
        p.write_bytes(p.read_bytes()[:n])

    return apply


def _flip_header(d: Path) -> None:
    p = d / pf.SAFETENSORS_WEIGHTS_NAME
    b = bytearray(p.read_bytes())
    b[10] ^= 0xFF  # inside the JSON header
    p.write_bytes(bytes(b))


def _evil_bin(d: Path) -> None:
    (d / pf.SAFETENSORS_WEIGHTS_NAME).unlink()
    torch.save({"base_model.model.lin.hada_w1_a": _Evil()}, str(d / pf.LEGACY_WEIGHTS_NAME))


K = "base_model.model.lin.hada_w1_a"
ERROR_CASES: list[tuple[str, Callable[[Path], None], dict[str, Any], type, str]] = [
    # (id, corrupt the saved directory, load kwargs, error type, text the message must contain)
    ("missing_key", _mutate_weights(lambda sd: sd.pop(K)), {}, lio.StateDictMismatchError, K),
    ("unexpected_key", _mutate_weights(lambda sd: sd.__setitem__("base_model.model.lin.hada_w9", torch.ones(1))), {},
     lio.StateDictMismatchError, "hada_w9"),
    ("adapter_name_in_keys", _mutate_weights(lambda sd: sd.__setitem__(K + ".default", sd.pop(K))), {},
     lio.StateDictMismatchError, "adapter name"),
    ("mixed_prefix", _mutate_weights(lambda sd: sd.__setitem__("lin.hada_w1_a", sd.pop(K))), {},
     lio.StateDictMismatchError, "lin.hada_w1_a"),
    ("shape_vs_r", _mutate_config(lambda c: c.__setitem__("r", 4)), {}, lio.StateDictMismatchError, "expected (8, 4)"),
    ("shape_vs_rank_pattern", _mutate_config(lambda c: c.__setitem__("rank_pattern", {"lin": 5})), {},
     lio.StateDictMismatchError, "rank_pattern 'lin'"),
    ("tucker_vs_flat", _mutate_config(lambda c: c.__setitem__("use_effective_conv2d", True)), {},
     lio.StateDictMismatchError, "c1.hada_t1"),
    ("int_factor", _mutate_weights(lambda sd: sd.__setitem__(K, sd[K].to(torch.int32))), {},
     lio.StateDictMismatchError, "dtype torch.int32"),
    ("nan_strict", _mutate_weights(lambda sd: sd[K].__setitem__((0, 0), float("nan"))), {"strict": True},
     lio.NonFiniteTensorError, K),
    ("truncated", _truncate(200), {}, lio.CorruptFileError, pf.SAFETENSORS_WEIGHTS_NAME),
    ("truncated_header", _truncate(5), {}, lio.CorruptFileError, "too short"),
    ("corrupt_header", _flip_header, {}, lio.CorruptFileError, pf.SAFETENSORS_WEIGHTS_NAME),
    ("empty_weights", _write(pf.SAFETENSORS_WEIGHTS_NAME, b""), {}, lio.CorruptFileError, pf.SAFETENSORS_WEIGHTS_NAME),
    ("peft_type_lora", _mutate_config(lambda c: c.__setitem__("peft_type", "LORA")), {}, lio.AdapterConfigError, "LORA"),
    ("config_not_json", _write(pf.ADAPTER_CONFIG_NAME, b"{r: 2"), {}, lio.AdapterConfigError, "not valid JSON"),
    ("config_not_utf8", _write(pf.ADAPTER_CONFIG_NAME, b"\xff\xfe{}"), {}, lio.AdapterConfigError, "UTF-8"),
    ("config_list", _write(pf.ADAPTER_CONFIG_NAME, b"[1, 2]"), {}, lio.AdapterConfigError, "JSON object"),
    ("config_unknown_key", _mutate_config(lambda c: c.__setitem__("lora_dropout_x", 1)), {}, lio.AdapterConfigError,
     "lora_dropout_x"),
    ("config_bad_r", _mutate_config(lambda c: c.__setitem__("r", -1)), {}, lio.AdapterConfigError, "r must be"),
    ("config_inf_alpha", _write(pf.ADAPTER_CONFIG_NAME, b'{"r": 2, "alpha": Infinity, "target_modules": ["lin"]}'), {},
     lio.AdapterConfigError, "finite"),
    ("config_bad_regex", _mutate_config(lambda c: c.__setitem__("target_modules", "lin(")), {}, lio.AdapterConfigError,
     "regular expression"),
    ("no_target_matches", _mutate_config(lambda c: c.__setitem__("target_modules", ["nothing_here"])), {},
     lio.AdapterConfigError, "nothing_here"),
    ("modules_to_save_no_match", _mutate_config(lambda c: c.__setitem__("modules_to_save", ["ghost"])), {},
     lio.AdapterConfigError, "ghost"),
    ("config_missing", lambda d: (d / pf.ADAPTER_CONFIG_NAME).unlink(), {}, lio.AdapterNotFoundError, pf.ADAPTER_CONFIG_NAME),
    ("weights_missing", lambda d: (d / pf.SAFETENSORS_WEIGHTS_NAME).unlink(), {}, lio.AdapterNotFoundError,
     pf.SAFETENSORS_WEIGHTS_NAME),
    ("pickle_with_code", _evil_bin, {}, lio.UnsafeFileError, pf.LEGACY_WEIGHTS_NAME),
    ("adapter_name_dotdot", lambda d: None, {"adapter_name": "../x"}, lio.AdapterNameError, "'../x'"),
    ("adapter_name_sep", lambda d: None, {"adapter_name": "a/b"}, lio.AdapterNameError, "'a/b'"),
    ("subfolder_dotdot", lambda d: None, {"subfolder": "../x"}, lio.AdapterNameError, "'../x'"),
]


@pytest.mark.parametrize("corrupt,kwargs,error,text", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
def test_load_errors_leave_model_untouched(entry, corrupt, kwargs, error, text, tmp_path, monkeypatch):
    monkeypatch.setenv("LOHAKIT_EVIL_MARKER", str(tmp_path / "pwned"))
    loha_save(net(), NET_CONFIGS["flat"], tmp_path / "ad")
    corrupt(tmp_path / "ad")
    kwargs = dict(kwargs)
    if entry == "from_pretrained":
        model = net()
        before = snapshot(model)
        with pytest.raises(error) as info:
            LoHaModel.from_pretrained(model, str(tmp_path / "ad"), **kwargs)
    else:
        model = get_peft_model(net(), LoHaConfig(r=2, target_modules=["lin", "c2"], modules_to_save=["head"]))
        model.train()
        before = snapshot(model)
        with pytest.raises(error) as info:
            model.load_adapter(str(tmp_path / "ad"), kwargs.pop("adapter_name", "second"), **kwargs)
    assert isinstance(info.value, lohakit.LoHaFormatError) and isinstance(info.value, ValueError)
    assert text in str(info.value)
    assert_unchanged(model, before)
    assert not (tmp_path / "pwned").exists()


def test_non_finite_warns_and_loads(tmp_path):
    loha_save(net(), NET_CONFIGS["flat"], tmp_path)
    _mutate_weights(lambda sd: sd[K].__setitem__((1, 1), float("inf")))(tmp_path)
    with pytest.warns(lio.NonFiniteTensorWarning, match="hada_w1_a"):
        lm = LoHaModel.from_pretrained(net(), str(tmp_path))
    assert torch.isinf(lm.model.lin.hada_w1_a["default"][1, 1])


def test_load_adapter_existing_name_refused(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path)
    before = snapshot(lm)
    with pytest.raises(ValueError, match="already exists"):
        lm.load_adapter(str(tmp_path), "default")
    assert_unchanged(lm, before)


def test_from_pretrained_refuses_wrapped_model(tmp_path):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path)
    with pytest.raises(TypeError, match="load_adapter"):
        pf.from_pretrained(lm, str(tmp_path))


@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("stage", ["update_layer", "fill"])
def test_failure_while_applying_rolls_back(entry, stage, tmp_path, monkeypatch):
    """Even a failure after validation (here: injected) leaves the model as it was."""
    loha_save(net(), NET_CONFIGS["modules_to_save"], tmp_path)
    if entry == "from_pretrained":
        model = net()
    else:
        model = get_peft_model(net(), LoHaConfig(r=2, target_modules=["lin2", "c2"], modules_to_save=["head"]))
    if stage == "update_layer":
        calls = {"n": 0}
        original = lohakit.LoHaLayer.update_layer

        def flaky(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected")
            return original(self, *a, **kw)

        monkeypatch.setattr(lohakit.LoHaLayer, "update_layer", flaky)
    else:
        original_fill = pf._fill

        def fill_then_fail(*a, **kw):
            original_fill(*a, **kw)
            raise RuntimeError("injected")

        monkeypatch.setattr(pf, "_fill", fill_then_fail)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        if entry == "from_pretrained":
            LoHaModel.from_pretrained(model, str(tmp_path))
        else:
            model.load_adapter(str(tmp_path), "second")
    assert_unchanged(model, before)


# ------------------------------------------------------------------ Hub resolution (no network)
def test_hub_repo_id_resolution(tmp_path, monkeypatch):
    import huggingface_hub  # a dependency of peft/transformers (test extra): never skipped
    from huggingface_hub.errors import EntryNotFoundError

    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path / "repo", extra={"other": OTHER})
    calls: list[dict[str, Any]] = []

    def fake_download(repo_id, filename, *, subfolder=None, revision=None, **kw):
        calls.append(dict(repo_id=repo_id, filename=filename, subfolder=subfolder, revision=revision, **kw))
        assert repo_id == "someone/loha-adapter"
        p = tmp_path / "repo" / (subfolder or "") / filename
        if not p.is_file():
            raise EntryNotFoundError(f"{filename} not in repo")
        return str(p)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    back = LoHaModel.from_pretrained(net(), "someone/loha-adapter", revision="v1", token="t")
    back.load_adapter("someone/loha-adapter", "other", subfolder="other")
    assert [c["filename"] for c in calls] == [pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME] * 2
    assert calls[0]["revision"] == "v1" and calls[0]["token"] == "t" and calls[2]["subfolder"] == "other"
    for name in ("default", "other"):
        a, b = adapter_tensors(lm, name), adapter_tensors(back, name)
        assert a and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # legacy .bin fallback when the repo has no safetensors file
    sd = load_file(str(tmp_path / "repo" / pf.SAFETENSORS_WEIGHTS_NAME))
    (tmp_path / "repo" / pf.SAFETENSORS_WEIGHTS_NAME).unlink()
    torch.save(sd, str(tmp_path / "repo" / pf.LEGACY_WEIGHTS_NAME))
    calls.clear()
    LoHaModel.from_pretrained(net(), "someone/loha-adapter")
    assert [c["filename"] for c in calls] == [pf.ADAPTER_CONFIG_NAME, pf.SAFETENSORS_WEIGHTS_NAME, pf.LEGACY_WEIGHTS_NAME]
    # an unknown repo: a clean error
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    model = net()
    before = snapshot(model)
    with pytest.raises(lio.AdapterNotFoundError, match="someone/missing.*offline"):
        LoHaModel.from_pretrained(model, "someone/missing")
    assert_unchanged(model, before)


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(lio.AdapterNotFoundError, match="install huggingface_hub"):
        LoHaModel.from_pretrained(net(), "someone/adapter")
    with pytest.raises(lio.AdapterNotFoundError, match="no such directory"):
        LoHaModel.from_pretrained(net(), "/definitely/not/here")


# ------------------------------------------------------------------ raw io: atomic writes, safe reads
def _temps(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_state_dict_round_trip_and_metadata(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).t(), "h": torch.randn(3).half()}
    sd["alias"] = sd["a"]  # shared storage is cloned, not refused
    lohakit.save_state_dict(sd, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    back = lohakit.load_state_dict(tmp_path / "x.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    assert lio.read_safetensors_metadata(tmp_path / "x.safetensors") == {"format": "pt", "k": "v"}
    assert _temps(tmp_path) == []
    mode = (tmp_path / "x.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~lio._UMASK


@pytest.mark.parametrize("failure", ["disk_full", "interrupt", "fsync"])
def test_save_state_dict_failure_keeps_old_file(failure, tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    lohakit.save_state_dict({"w": torch.ones(4)}, path)
    os.chmod(path, 0o640)
    old = path.read_bytes()
    import safetensors.torch as st

    real_save = st.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(10)
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    if failure == "fsync":
        monkeypatch.setattr(lio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    else:
        monkeypatch.setattr(st, "save_file", half_then_fail)
    with pytest.raises((OSError, KeyboardInterrupt)):
        lohakit.save_state_dict({"w": torch.zeros(100)}, path)
    assert path.read_bytes() == old
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    lohakit.save_state_dict({"w": torch.zeros(2)}, path)
    assert (path.stat().st_mode & 0o777) == 0o640  # an existing file keeps its permissions


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"w": torch.empty(3, device="meta")}, ValueError),
        ({"w": [1.0, 2.0]}, TypeError),
        ({3: torch.ones(1)}, TypeError),
    ],
    ids=["meta", "not_tensor", "int_key"],
)
def test_save_state_dict_bad_tensor_keeps_old_file(bad, error, tmp_path):
    path = tmp_path / "a.safetensors"
    lohakit.save_state_dict({"w": torch.ones(4)}, path)
    old = path.read_bytes()
    with pytest.raises(error):
        lohakit.save_state_dict(bad, path)
    assert path.read_bytes() == old and _temps(tmp_path) == []
    with pytest.raises(TypeError, match="metadata"):
        lohakit.save_state_dict({"w": torch.ones(1)}, path, metadata={"n": 1})
    with pytest.raises(ValueError, match="safetensors only"):
        lohakit.save_state_dict({"w": torch.ones(1)}, tmp_path / "a.bin")


def test_save_pretrained_failure_keeps_every_old_file(tmp_path, monkeypatch):
    lm = loha_save(net(), NET_CONFIGS["flat"], tmp_path, extra={"other": OTHER})
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    old = {p: p.read_bytes() for p in files}
    with torch.no_grad():
        for _, layer in lm.loha_layers():
            for name in ("default", "other"):
                if name in layer.hada_w1_a:
                    layer.hada_w1_a[name].add_(1)
    calls = {"n": 0}
    real = lio.StagedWrites.stage_bytes

    def fail_on_second_config(self, data, dest):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, dest)

    monkeypatch.setattr(lio.StagedWrites, "stage_bytes", fail_on_second_config)
    with pytest.raises(OSError):
        lm.save_pretrained(str(tmp_path))
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == b for p, b in old.items())


def test_save_pretrained_refuses_unloaded_meta_adapter(tmp_path):
    lm = get_peft_model(net(), LoHaConfig(r=2, target_modules=["lin"]), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="meta"):
        lm.save_pretrained(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_load_state_dict_refuses_pickled_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LOHAKIT_EVIL_MARKER", str(marker))
    torch.save({"w": _Evil()}, str(tmp_path / "evil.bin"))
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    for name in ("evil.bin", "evil.pt"):
        with pytest.raises(lio.UnsafeFileError, match=name):
            lohakit.load_state_dict(tmp_path / name)
    assert not marker.exists()
    torch.save([torch.ones(1)], str(tmp_path / "list.bin"))
    with pytest.raises(lio.CorruptFileError, match="dict of tensors"):
        lohakit.load_state_dict(tmp_path / "list.bin")
    with pytest.raises(lio.AdapterNotFoundError):
        lohakit.load_state_dict(tmp_path / "missing.safetensors")
