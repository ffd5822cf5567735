"""kohya / LyCORIS LoHa files: files written by lycoris-lora itself, round trips, PEFT conversion, bad files.

Tolerances: float32 model outputs within 1e-5 (absolute, outputs are O(1)); factor round trips
are exact (torch.equal).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lohakit import LoHaConfig, LoHaLayer, LoHaModel
from lohakit.core.io import LoHaFormatError
from lohakit.formats.kohya import (
    kohya_to_peft,
    load_kohya,
    peft_to_kohya,
    remove_kohya_adapter,
    save_kohya,
    set_kohya_multiplier,
)

from helpers.kohya_reference import apply_reference, lycoris_kohya_file
from helpers.models import clip_te, same_state, sd1_unet, state_of, te_out, unet_out

ATOL = 1e-5


@pytest.fixture(scope="module")
def sd1_models():
    return sd1_unet(), clip_te()


def _loha_counts(model: nn.Module) -> dict[str, int]:
    kinds = {"linear": 0, "conv1x1": 0, "conv_flat": 0, "conv_tucker": 0}
    for _, m in model.named_modules():
        if isinstance(m, LoHaLayer):
            g = m.geometry
            if g.ndim == 0:
                kinds["linear"] += 1
            elif g.kernel_numel == 1:
                kinds["conv1x1"] += 1
            else:
                kinds["conv_tucker" if m.is_tucker("default") else "conv_flat"] += 1
    return kinds


# ------------------------------------------------------------------------------------------
# Files written by lycoris-lora
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_lycoris_file_equals_reference(tmp_path, sd1_models, tucker):
    unet0, te0 = sd1_models
    path = str(tmp_path / "lyco.safetensors")
    ly_te, ly_unet = copy.deepcopy(te0), copy.deepcopy(unet0)
    net, where = lycoris_kohya_file(path, ly_te, ly_unet, tucker=tucker)
    sd = load_file(path)
    mult = 0.7

    # independent reference: W += m·(alpha/r)·(w1a@w1b ⊙ w2a@w2b) on copies, located via LyCORIS' own modules
    ref_unet, ref_te = copy.deepcopy(unet0), copy.deepcopy(te0)
    mods = {n: (ref_te if kind == "te" else ref_unet).get_submodule(p) for n, (p, kind) in where.items()}
    assert apply_reference(sd, mods, mult) == len(where)

    unet, te = copy.deepcopy(unet0), copy.deepcopy(te0)
    report = load_kohya(path, {"lora_unet": unet, "lora_te": te}, multiplier=mult)
    assert len(report.matched) == len(where) and not report.unused_keys and not report.unmatched_modules
    assert report.metadata["ss_network_module"] == "lycoris.kohya"
    kinds = _loha_counts(unet)
    assert kinds["linear"] > 0 and kinds["conv1x1"] > 0
    assert kinds["conv_tucker" if tucker else "conv_flat"] > 0 and kinds["conv_flat" if tucker else "conv_tucker"] == 0
    torch.testing.assert_close(unet_out(unet), unet_out(ref_unet), atol=ATOL, rtol=0)
    torch.testing.assert_close(te_out(te), te_out(ref_te), atol=ATOL, rtol=0)
    assert (unet_out(unet) - unet_out(unet0)).abs().max() > 1e-3  # the adapter does something

    # merged weights give the same outputs
    unet_m, te_m = copy.deepcopy(unet0), copy.deepcopy(te0)
    rep_m = load_kohya(path, {"lora_unet": unet_m, "lora_te": te_m}, multiplier=mult, merge=True)
    assert rep_m.merged and not any(isinstance(m, LoHaLayer) for m in unet_m.modules())
    torch.testing.assert_close(unet_out(unet_m), unet_out(ref_unet), atol=ATOL, rtol=0)

    # and LyCORIS' own runtime (hooked into ly_unet / ly_te) agrees
    for lora in net.loras:
        lora.multiplier = mult
    torch.testing.assert_close(unet_out(ly_unet), unet_out(unet), atol=ATOL, rtol=0)
    torch.testing.assert_close(te_out(ly_te), te_out(te), atol=ATOL, rtol=0)


def test_lycoris_conv1d_tucker_3d_core(tmp_path):
    """LyCORIS' generic wrapper: Conv1d Tucker cores are 3-D (r, r, k); Linear, Conv2d 3x3 Tucker, 1x1."""
    from lycoris import create_lycoris

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1d = nn.Conv1d(4, 6, 3, padding=1)
            self.c2d = nn.Conv2d(4, 6, 3, padding=1)
            self.pw = nn.Conv2d(6, 5, 1)
            self.fc = nn.Linear(8, 7)

    base = Net()
    net = create_lycoris(copy.deepcopy(base), 1.0, linear_dim=3, linear_alpha=2.0, algo="loha", use_tucker=True,
                         conv_dim=2, conv_alpha=3.0, warn_on_unmatched=False)
    net.apply_to()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in net.loras:
            for _, p in lora.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = str(tmp_path / "generic.safetensors")
    net.save_weights(path, torch.float32, None)
    sd = load_file(path)
    assert sd["lycoris_c1d.hada_t1"].shape == (2, 2, 3)

    model = copy.deepcopy(base)
    report = load_kohya(path, {"lycoris": model}, multiplier=1.3)
    assert sorted(report.matched) == ["lycoris_c1d", "lycoris_c2d", "lycoris_fc", "lycoris_pw"]
    assert model.c1d.is_tucker("default") and model.c2d.is_tucker("default")
    ref = copy.deepcopy(base)
    apply_reference(sd, {"lycoris_c1d": ref.c1d, "lycoris_c2d": ref.c2d, "lycoris_pw": ref.pw, "lycoris_fc": ref.fc}, 1.3)
    x1, x2, x3, x4 = torch.randn(2, 4, 9), torch.randn(2, 4, 6, 6), torch.randn(2, 6, 5, 5), torch.randn(3, 8)
    with torch.no_grad():
        for name, x in (("c1d", x1), ("c2d", x2), ("pw", x3), ("fc", x4)):
            torch.testing.assert_close(getattr(model, name)(x), getattr(ref, name)(x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# lohakit -> kohya -> lohakit
# ------------------------------------------------------------------------------------------
def _adapted_unet(unet0: nn.Module, tucker: bool = True) -> LoHaModel:
    cfg = LoHaConfig(
        r=3, alpha=5, init_weights=False, use_effective_conv2d=tucker,
        target_modules=r".*(to_q|to_v|proj_in|conv1|conv_shortcut|conv_in)",
        rank_pattern={"conv_in": 2}, alpha_pattern={r"down_blocks\.1\.resnets\.0\.conv1": 1.5},
    )
    return LoHaModel(copy.deepcopy(unet0), cfg)


def test_save_load_roundtrip_exact(tmp_path, sd1_models):
    unet0, te0 = sd1_models
    lm = _adapted_unet(unet0)
    path = str(tmp_path / "rt.safetensors")
    meta = save_kohya(path, {"lora_unet": lm}, dtype=torch.float32, metadata={"ss_base_model_version": "sd_v1"})
    with safe_open(path, "pt") as fh:
        header = fh.metadata()
        keys = list(fh.keys())
    assert header == meta and all(isinstance(v, str) for v in header.values())
    assert header["ss_network_module"] == "lycoris.kohya" and header["ss_network_dim"] == "3"
    args = json.loads(header["ss_network_args"])
    assert args["algo"] == "loha" and args["use_tucker"] == "true" and args["conv_dim"] in ("2", "3")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    sd = load_file(path)
    assert sd["lora_unet_conv_in.alpha"].ndim == 0 and float(sd["lora_unet_conv_in.alpha"]) == 5.0

    unet = copy.deepcopy(unet0)
    load_kohya(path, {"lora_unet": unet})
    for p, layer in lm.loha_layers():
        mine = unet.get_submodule(p)
        for a, b in zip(layer.factors("default"), mine.factors("default")):
            assert (a is None and b is None) or torch.equal(a.detach(), b.detach())
        assert mine.scaling["default"] == layer.scaling["default"]
    torch.testing.assert_close(unet_out(unet), unet_out(lm.model), atol=1e-6, rtol=0)

    # default float16 storage: everything stored in fp16, loads and matches the fp16-rounded adapter
    path16 = str(tmp_path / "rt16.safetensors")
    save_kohya(path16, {"lora_unet": lm})
    assert all(t.dtype == torch.float16 for t in load_file(path16).values())
    # the adapter keeps working after a save (no state changed)
    torch.testing.assert_close(unet_out(lm.model), unet_out(unet), atol=1e-6, rtol=0)


def test_multiplier_stacking_and_removal(tmp_path, sd1_models):
    unet0, _ = sd1_models
    lm = _adapted_unet(unet0, tucker=False)
    path = str(tmp_path / "a.safetensors")
    save_kohya(path, {"lora_unet": lm}, dtype=torch.float32)
    base = unet_out(unet0)
    full = unet_out(lm.model)

    unet = copy.deepcopy(unet0)
    before = state_of(unet)
    load_kohya(path, {"lora_unet": unet}, adapter_name="a")
    load_kohya(path, {"lora_unet": unet}, adapter_name="b", multiplier=-1.0)  # cancels "a"
    torch.testing.assert_close(unet_out(unet), base, atol=ATOL, rtol=0)
    set_kohya_multiplier({"lora_unet": unet}, "b", 0.0)
    torch.testing.assert_close(unet_out(unet), full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        load_kohya(path, {"lora_unet": unet}, adapter_name="a")
    assert remove_kohya_adapter({"lora_unet": unet}, "b") > 0
    torch.testing.assert_close(unet_out(unet), full, atol=ATOL, rtol=0)
    assert remove_kohya_adapter({"lora_unet": unet}) > 0
    assert same_state(state_of(unet), before)  # unmerged adapters: base restored bit for bit
    # a merged adapter is unmerged on removal (W + ΔW - ΔW: float32 rounding only)
    load_kohya(path, {"lora_unet": unet}, adapter_name="c")
    for _, m in unet.named_modules():
        if isinstance(m, LoHaLayer):
            m.merge()
    torch.testing.assert_close(unet_out(unet), full, atol=ATOL, rtol=0)
    remove_kohya_adapter({"lora_unet": unet}, "c")
    after = state_of(unet)
    assert after[0]["__types__"] == before[0]["__types__"]
    for k, v in before[0].items():
        if k != "__types__":
            torch.testing.assert_close(after[0][k], v, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# kohya <-> PEFT directory
# ------------------------------------------------------------------------------------------
def test_lohakit_kohya_peft_lohakit_keeps_outputs(tmp_path, sd1_models):
    unet0, _ = sd1_models
    lm = _adapted_unet(unet0)
    want = unet_out(lm.model)
    kpath = str(tmp_path / "k.safetensors")
    save_kohya(kpath, {"lora_unet": lm}, dtype=torch.float32)

    pdir = tmp_path / "peft"
    config, report = kohya_to_peft(kpath, unet0, pdir)
    assert config.r == 3 and config.alpha == 5 and config.use_effective_conv2d
    assert any("conv_in" in k for k in config.rank_pattern) and len(config.alpha_pattern) == 1
    assert not report.unused_keys
    cfg = json.loads((pdir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and "peft_version" in cfg
    keys = load_file(str(pdir / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)

    # PEFT itself (the oracle) reads the directory and gives the same outputs
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(unet0), str(pdir))
    torch.testing.assert_close(unet_out(pm.base_model.model), want, atol=ATOL, rtol=0)

    # lohakit reads it back (PEFT-format loader when present, else the raw layout through LoHaModel)
    try:
        from lohakit.formats.peft import from_pretrained
    except ImportError:  # pragma: no cover - the PEFT-format module is part of the package
        from_pretrained = None
    if from_pretrained is not None:
        back = from_pretrained(copy.deepcopy(unet0), str(pdir))
        torch.testing.assert_close(unet_out(back.model), want, atol=ATOL, rtol=0)

    # and back to kohya: same file content as the original
    kpath2 = str(tmp_path / "k2.safetensors")
    peft_to_kohya(pdir, kpath2, model=unet0, dtype=torch.float32)
    a, b = load_file(kpath), load_file(kpath2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unet = copy.deepcopy(unet0)
    load_kohya(kpath2, {"lora_unet": unet})
    torch.testing.assert_close(unet_out(unet), want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# Mixed and bad files
# ------------------------------------------------------------------------------------------
def _small_file(tmp_path, unet0) -> tuple[str, dict[str, torch.Tensor]]:
    lm = _adapted_unet(unet0, tucker=False)
    path = str(tmp_path / "small.safetensors")
    save_kohya(path, {"lora_unet": lm}, dtype=torch.float32)
    return path, load_file(path)


def test_plain_lora_keys_are_reported_not_fatal(tmp_path, sd1_models):
    unet0, _ = sd1_models
    _, sd = _small_file(tmp_path, unet0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    sd.update({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4),
               f"{name}.alpha": torch.tensor(4.0), "lora_unet_no_such_module.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_no_such_module.hada_w1_b": torch.zeros(2, 2)})
    unet = copy.deepcopy(unet0)
    with pytest.warns(UserWarning, match=r"1 LoHa module\(s\) of the file match no module.*lora_unet_no_such_module"):
        rep = load_kohya(sd, {"lora_unet": unet}, strict=False)
    assert f"{name}.lora_down.weight" in rep.unused_keys and f"{name}.alpha" in rep.unused_keys
    assert rep.unmatched_modules == ["lora_unet_no_such_module"]
    unet2 = copy.deepcopy(unet0)
    before = state_of(unet2)
    with pytest.raises(LoHaFormatError, match=r"no module of the models.*nearest names.*3 key\(s\) are not LoHa tensors.*strict=False"):
        load_kohya(sd, {"lora_unet": unet2})  # strict by default: no silent partial loads
    assert same_state(state_of(unet2), before)


def _bad(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    if kind == "unknown_layout":
        return {f"base_model.model.{k}": v for k, v in sd.items()}
    if kind == "wrong_shape":
        sd[f"{q}.hada_w1_a"] = torch.zeros(31, 3)
    elif kind == "alpha_shape":
        sd[f"{q}.alpha"] = torch.ones(3)
    elif kind == "missing_key":
        del sd[f"{q}.hada_w2_b"]
    elif kind == "dora":
        sd[f"{q}.dora_scale"] = torch.ones(32, 1)
    elif kind == "dora_shape":
        sd[f"{q}.dora_scale"] = torch.ones(5, 1)
    elif kind == "rank_mismatch":
        sd[f"{q}.hada_w2_a"] = torch.zeros(32, 2)
        sd[f"{q}.hada_w2_b"] = torch.zeros(2, 32)
    elif kind == "tucker_on_linear":
        sd[f"{q}.hada_t1"] = torch.zeros(3, 3, 1, 1)
        sd[f"{q}.hada_t2"] = torch.zeros(3, 3, 1, 1)
    elif kind == "nan":
        sd[f"{q}.hada_w1_a"] = torch.full_like(sd[f"{q}.hada_w1_a"], float("nan"))
    return sd


BAD = {
    "unknown_layout": "none of the file's 34 LoHa modules matches",
    "wrong_shape": r"hada_w1_a: shape \(31, 3\) does not fit module 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'",
    "alpha_shape": r"attn1_to_q.alpha: expected a 0-dim tensor, got shape \(3\)",
    "missing_key": r"missing key\(s\) \['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b'\]",
    "dora": r"supported only when merging.*attn1_to_q.dora_scale",
    "dora_shape": r"attn1_to_q.dora_scale",
    "rank_mismatch": "branch ranks differ",
    "tucker_on_linear": "linear layer",
    "nan": "NaN",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_raise_and_leave_models_untouched(tmp_path, sd1_models, kind):
    unet0, te0 = sd1_models
    _, sd = _small_file(tmp_path, unet0)
    bad = _bad(sd, kind)
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(bad, path)
    unet, te = copy.deepcopy(unet0), copy.deepcopy(te0)
    before = state_of(unet, te)
    for merge in (False,) if kind == "dora" else (False, True):  # DoHa files do merge (tested below)
        with pytest.raises(ValueError, match=BAD[kind]):
            load_kohya(path, {"lora_unet": unet, "lora_te": te}, merge=merge)
        assert same_state(state_of(unet, te), before)


def test_not_safetensors_and_missing_file(tmp_path, sd1_models):
    unet0, _ = sd1_models
    p = tmp_path / "x.ckpt"
    p.write_bytes(b"\x80\x04not a pickle we would ever open")
    with pytest.raises(ValueError, match="never loaded"):
        load_kohya(str(p), {"lora_unet": unet0})
    with pytest.raises(FileNotFoundError):
        load_kohya(str(tmp_path / "nope.safetensors"), {"lora_unet": unet0})
    q = tmp_path / "garbage.safetensors"
    q.write_bytes(b"garbage")
    with pytest.raises(LoHaFormatError, match=r"garbage\.safetensors: .*(too short for a safetensors file|not a valid safetensors)"):
        load_kohya(str(q), {"lora_unet": unet0})


def test_tucker_t1_for_both_and_1x1_core(tmp_path):
    """Old LyCORIS files (t1 only) need the switch; a Tucker core on a 1x1 conv is folded exactly."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    pw = nn.Conv2d(5, 6, 1)
    model = nn.Sequential(conv, pw)
    r = 2
    g = {"hada_w1_a": torch.randn(r, 5), "hada_w1_b": torch.randn(r, 4), "hada_w2_a": torch.randn(r, 5),
         "hada_w2_b": torch.randn(r, 4), "hada_t1": torch.randn(r, r, 3, 3), "alpha": torch.tensor(1.0)}
    h = {"hada_w1_a": torch.randn(r, 6), "hada_w1_b": torch.randn(r, 5), "hada_w2_a": torch.randn(r, 6),
         "hada_w2_b": torch.randn(r, 5), "hada_t1": torch.randn(r, r, 1, 1), "hada_t2": torch.randn(r, r, 1, 1)}
    sd = {f"m_0.{k}": v for k, v in g.items()} | {f"m_1.{k}": v for k, v in h.items()}
    m1 = copy.deepcopy(model)
    with pytest.raises(ValueError, match="tucker_t1_for_both=True"):
        load_kohya(sd, {"m": m1})
    assert not any(isinstance(x, LoHaLayer) for x in m1.modules())
    load_kohya(sd, {"m": m1}, tucker_t1_for_both=True)
    assert not m1[1].is_tucker("default")  # 1x1 core folded into a flat LoHa
    ref = copy.deepcopy(model)
    g2, h2 = dict(g, hada_t2=g["hada_t1"]), dict(h, hada_t2=h["hada_t1"])  # the switch is file-wide
    apply_reference({f"m_0.{k}": v for k, v in g2.items()} | {f"m_1.{k}": v for k, v in h2.items()}, {"m_0": ref[0], "m_1": ref[1]}, 1.0)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m1(x), ref(x), atol=ATOL, rtol=0)


def test_save_errors(tmp_path, sd1_models):
    unet0, _ = sd1_models
    lm = _adapted_unet(unet0, tucker=False)
    with pytest.raises(ValueError, match="must be strings"):
        save_kohya(str(tmp_path / "a.safetensors"), {"lora_unet": lm}, metadata={"ss_network_dim": 4})
    with pytest.raises(ValueError, match="no LoHa layer holds adapter 'nope'"):
        save_kohya(str(tmp_path / "a.safetensors"), {"lora_unet": lm}, adapter_name="nope")
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        save_kohya(str(target), {"lora_unet": lm}, adapter_name="nope")
    assert target.read_bytes() == b"old"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_load_into_loha_model_registers_adapter(tmp_path, sd1_models):
    """A LoHaModel given as target learns the adapter: set_adapter / delete_adapter work on it."""
    unet0, _ = sd1_models
    src = _adapted_unet(unet0, tucker=False)
    path = str(tmp_path / "style.safetensors")
    save_kohya(path, {"lora_unet": src}, dtype=torch.float32)
    style_only = unet_out(src.model)

    lm = LoHaModel(copy.deepcopy(unet0), LoHaConfig(r=2, target_modules=["to_k"], init_weights=False))
    mine_only = unet_out(lm.model)
    load_kohya(path, {"lora_unet": lm}, adapter_name="style")
    assert set(lm.peft_config) == {"default", "style"} and lm.active_adapters == ["default", "style"]
    cfg = lm.peft_config["style"]
    assert cfg.r == 3 and cfg.alpha == 5 and cfg.inference_mode and any("conv_in" in k for k in cfg.rank_pattern)
    lm.set_adapter("style")
    torch.testing.assert_close(unet_out(lm.model), style_only, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        load_kohya(path, {"lora_unet": lm}, adapter_name="style")
    lm.delete_adapter("style")
    torch.testing.assert_close(unet_out(lm.model), mine_only, atol=ATOL, rtol=0)
    # removal through the kohya helpers keeps the LoHaModel's bookkeeping in step
    load_kohya(path, {"lora_unet": lm}, adapter_name="style2")
    assert remove_kohya_adapter({"lora_unet": lm}, "style2") > 0
    assert set(lm.peft_config) == {"default"} and lm.active_adapters == ["default"]
    torch.testing.assert_close(unet_out(lm.model), mine_only, atol=ATOL, rtol=0)


@pytest.mark.parametrize("on_out", [True, False], ids=["wd_on_out", "wd_on_in"])
def test_doha_file_merges_like_lycoris(tmp_path, on_out):
    """Weight-decomposed LoHa (dora_scale) from lycoris-lora: merge=True equals LyCORIS' runtime and the formula."""
    from lycoris import create_lycoris

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 7)
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

    torch.manual_seed(0)
    base = Net()
    hooked = copy.deepcopy(base)
    net = create_lycoris(hooked, 1.0, linear_dim=3, linear_alpha=2.0, algo="loha", conv_dim=2, conv_alpha=3.0,
                         dora_wd=True, wd_on_output=on_out, warn_on_unmatched=False)
    net.apply_to()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            for n, p in lora.named_parameters():
                if n != "dora_scale":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                else:
                    p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
    path = str(tmp_path / "doha.safetensors")
    net.save_weights(path, torch.float32, None)
    sd = load_file(path)
    assert sd["lycoris_fc.dora_scale"].shape == ((7, 1) if on_out else (1, 8))

    mult = 0.6
    live = copy.deepcopy(base)
    before = state_of(live)
    with pytest.raises(ValueError, match="supported only when merging"):
        load_kohya(path, {"lycoris": live}, multiplier=mult)
    assert same_state(state_of(live), before)
    merged = copy.deepcopy(base)
    load_kohya(path, {"lycoris": merged}, multiplier=mult, merge=True)

    for lora in net.loras:
        lora.multiplier = mult
    x_fc, x_conv = torch.randn(2, 8), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(merged.fc(x_fc), hooked.fc(x_fc), atol=ATOL, rtol=0)
        torch.testing.assert_close(merged.conv(x_conv), hooked.conv(x_conv), atol=ATOL, rtol=0)
        # the formula, written out: W' = (W + ΔW)·(m·(s/‖W + ΔW‖ − 1) + 1), norm over the non-magnitude axes
        ref = copy.deepcopy(base)
        for name in ("fc", "conv"):
            g = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"lycoris_{name}.")}
            w = getattr(ref, name).weight
            from helpers.kohya_reference import reference_delta

            v = w.double() + reference_delta(g, w.shape, 1.0)
            dims = [d for d in range(v.ndim) if d != (0 if on_out else 1)]
            norm = v.pow(2).sum(dim=dims, keepdim=True).sqrt()
            v = v * (mult * (g["dora_scale"].double() / norm - 1) + 1)
            w.copy_(v.float())
        torch.testing.assert_close(merged.fc.weight, ref.fc.weight, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged.conv.weight, ref.conv.weight, atol=ATOL, rtol=0)


def test_peft_written_directory_to_kohya(tmp_path, sd1_models):
    """A LoHa directory written by PEFT itself converts to a kohya file that reproduces PEFT's outputs."""
    import peft

    unet0, _ = sd1_models
    cfg = peft.LoHaConfig(r=2, alpha=3, init_weights=False, use_effective_conv2d=True,
                          target_modules=["to_q", "to_v", "conv1", "proj_in"], rank_pattern={"conv1": 3},
                          alpha_pattern={"to_v": 1.0})
    pm = peft.get_peft_model(copy.deepcopy(unet0), cfg)
    want = unet_out(pm.base_model.model)
    pm.save_pretrained(str(tmp_path / "peft"))
    meta = peft_to_kohya(tmp_path / "peft", str(tmp_path / "k.safetensors"), model=unet0, dtype=torch.float32)
    assert json.loads(meta["ss_network_args"])["use_tucker"] == "true"
    sd = load_file(str(tmp_path / "k.safetensors"))
    assert float(sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.alpha"]) == 1.0
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.hada_t1"].shape == (3, 3, 3, 3)
    unet = copy.deepcopy(unet0)
    load_kohya(str(tmp_path / "k.safetensors"), {"lora_unet": unet}, strict=True)
    torch.testing.assert_close(unet_out(unet), want, atol=ATOL, rtol=0)
