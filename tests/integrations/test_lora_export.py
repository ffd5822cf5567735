"""Exact and compressed LoRA export of LoHa adapters, and the LoRA writers.

Exactness is checked in float64 (the export math runs in float64; factors are stored float32):
relative max error 1e-6 against the layer's ΔW. Loaded LoRA adapters (PEFT, diffusers) match
the live LoHa adapter in float32 within 1e-5.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lohakit import LoHaConfig, LoHaModel
from lohakit.formats.kohya import kohya_state_dict
from lohakit.lora import compress_lora, lora_peft_state_dict, save_lora_kohya, save_lora_peft, to_lora

from helpers.models import sd1_unet, unet_out, clip_te

ATOL = 1e-5


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.c3 = nn.Conv2d(4, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 5, 1)
        self.c1d = nn.Conv1d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        return {"fc": torch.randn(2, 12, generator=g), "c3": torch.randn(2, 4, 7, 7, generator=g),
                "pw": torch.randn(2, 6, 5, 5, generator=g), "c1d": torch.randn(2, 3, 9, generator=g)}


def _zoo(tucker: bool, targets=("fc", "c3", "pw", "c1d")) -> tuple[nn.Module, LoHaModel]:
    torch.manual_seed(0)
    base = Zoo()
    lm = LoHaModel(copy.deepcopy(base), LoHaConfig(r=3, alpha=5, target_modules=list(targets), init_weights=False,
                                                   use_effective_conv2d=tucker, rank_pattern={"pw": 2}))
    return base, lm


def _delta64(layer) -> torch.Tensor:
    """The layer's ΔW from float64 copies of its factors."""
    from lohakit.core.functional import HadaFactors, delta_weight

    f = HadaFactors(*[t.detach().double() if t is not None else None for t in layer.factors("default")])
    return delta_weight(f, layer.geometry, layer.scaling["default"])


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_exact_export_every_layer_type(tucker):
    _, lm = _zoo(tucker)
    ex = to_lora(lm)
    assert sorted(ex) == ["c1d", "c3", "fc", "pw"]
    for path, e in ex.items():
        layer = lm.model.get_submodule(path)
        r = layer.r["default"]
        assert e.rank == r * r and e.rel_error == 0.0
        want = _delta64(layer)
        got = (e.lora_B.double().reshape(e.lora_B.shape[0], -1) @ e.lora_A.double().reshape(e.rank, -1)).reshape(want.shape)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6, path
    assert ex["fc"].lora_A.shape == (9, 12) and ex["fc"].lora_B.shape == (10, 9)
    assert ex["c3"].lora_A.shape == (9, 4, 3, 3) and ex["c3"].lora_B.shape == (6, 9, 1, 1)
    assert ex["c1d"].lora_A.shape == (9, 3, 3) and ex["c1d"].lora_B.shape == (4, 9, 1)


def test_compression_error_is_exact_and_optimal():
    _, lm = _zoo(False)
    for k in (1, 3, 5):
        ex = to_lora(lm, rank=k)
        for path, e in ex.items():
            want = _delta64(lm.model.get_submodule(path)).reshape(e.lora_B.shape[0], -1)
            assert e.rank == min(k, 9 if path != "pw" else 4, *want.shape)
            got = e.lora_B.double().reshape(e.lora_B.shape[0], -1) @ e.lora_A.double().reshape(e.rank, -1)
            true_err = float((got - want).norm() / want.norm())
            assert abs(e.rel_error - true_err) < 1e-5, (path, k)
            # Eckart–Young: the SVD of the full ΔW (done here only as the oracle) gives the same error
            s = torch.linalg.svdvals(want)
            best = float(s[e.rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
            assert abs(e.rel_error - best) < 1e-5, (path, k)
    b, a, err = compress_lora(torch.randn(7, 4, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64), 4)
    assert err < 1e-12 and b.shape == (7, 4) and a.shape == (4, 9)
    with pytest.raises(ValueError, match="positive int"):
        compress_lora(b, a, 0)


def test_grouped_conv_is_refused():
    _, lm = _zoo(False, targets=("grouped",))
    with pytest.raises(ValueError, match="grouped convolution .*groups=2"):
        to_lora(lm)


def test_from_kohya_state_dict():
    _, lm = _zoo(True)
    sd, _ = kohya_state_dict({"lora": lm}, dtype=torch.float32)
    ex = to_lora(sd)
    assert sorted(ex) == ["lora_c1d", "lora_c3", "lora_fc", "lora_pw"]
    for path in ("fc", "c3", "pw", "c1d"):
        e = ex[f"lora_{path}"]
        want = _delta64(lm.model.get_submodule(path))
        got = e.lora_B.double().reshape(e.lora_B.shape[0], -1) @ e.lora_A.double().reshape(e.rank, -1)
        assert float((got.reshape(want.shape) - want).abs().max() / want.abs().max()) < 1e-6
    assert ex["lora_c3"].lora_A.shape == (9, 4, 3, 3)  # Tucker factors carry the kernel


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_peft_lora_directory_loads_in_peft(tmp_path, tucker):
    from peft import PeftModel

    base, lm = _zoo(tucker)
    save_lora_peft(to_lora(lm), tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 9 and cfg["lora_alpha"] == 9.0
    assert cfg["rank_pattern"] == {"^pw": 4} and cfg["alpha_pattern"] == {"^pw": 4.0}
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    with torch.no_grad():
        for name, x in base.inputs().items():
            torch.testing.assert_close(pm.base_model.model.get_submodule(name)(x), lm.model.get_submodule(name)(x),
                                       atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def adapted_sd1():
    unet0 = sd1_unet()
    lm = LoHaModel(copy.deepcopy(unet0), LoHaConfig(
        r=2, alpha=3, init_weights=False, use_effective_conv2d=True,
        target_modules=r".*(to_q|to_k|to_v|to_out\.0|proj_in|ff\.net\.2|conv1|conv2|conv_shortcut)",
    ))
    return unet0, lm


def _mixin_pipe(unet, te):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class TinyPipe(StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder = unet, te

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    return TinyPipe()


def test_diffusers_load_lora_weights_matches_live_loha(tmp_path, adapted_sd1):
    """The exact export as a kohya LoRA file, through diffusers' own load_lora_weights."""
    unet0, lm = adapted_sd1
    want = unet_out(lm.model)
    path = str(tmp_path / "lora.safetensors")
    meta = save_lora_kohya(path, {"lora_unet": to_lora(lm)}, dtype=torch.float32)
    assert meta["ss_network_module"] == "networks.lora"
    sd = load_file(path)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 4.0

    pipe = _mixin_pipe(copy.deepcopy(unet0), clip_te())
    pipe.load_lora_weights(path, adapter_name="loha_as_lora")
    got = unet_out(pipe.unet)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want - unet_out(unet0)).abs().max() > 1e-3

    # PEFT-style keys through the UNet's load_lora_adapter
    unet = copy.deepcopy(unet0)
    unet.load_lora_adapter(lora_peft_state_dict(to_lora(lm), prefix="unet."), prefix="unet", adapter_name="x")
    torch.testing.assert_close(unet_out(unet), want, atol=ATOL, rtol=0)


def test_compressed_export_error_reported(adapted_sd1):
    _, lm = adapted_sd1
    ex = to_lora(lm, rank=2)
    assert all(e.rank <= 2 for e in ex.values())
    assert all(0.0 <= e.rel_error <= 1.0 for e in ex.values()) and max(e.rel_error for e in ex.values()) > 0
    exact = to_lora(lm, rank=4)
    assert max(e.rel_error for e in exact.values()) < 1e-6


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "loha_model"])
def test_lora_file_names_match_loha_file_names(wrapped, tmp_path):
    """A CLIPTextModel (no ``text_model`` level under transformers 5) gets the same legacy
    kohya names in the LoRA file as in the LoHa file, whether given plain or as a LoHaModel."""
    te = clip_te()
    lm = LoHaModel(te, LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "fc1"], init_weights=False))
    model = lm if wrapped else lm.model
    loha_sd, _ = kohya_state_dict({"lora_te": model}, "default")
    path = str(tmp_path / "lora.safetensors")
    save_lora_kohya(path, {"lora_te": to_lora(lm)}, models={"lora_te": model})
    lora_names = {k.split(".")[0] for k in load_file(path)}
    assert lora_names == {k.split(".")[0] for k in loha_sd}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora_names


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "out_proj"]], ids=["q_v", "with_out_proj"])
def test_diffusers_reads_text_encoder_lora_only_with_out_proj(tmp_path, targets):
    """diffusers' kohya LoRA reader infers the text-encoder format from ``out_proj`` keys: with
    out_proj among the targets it loads UNet and text encoder exactly; with q/v only it raises and
    loads nothing (save_loha_as_lora warns about that)."""
    from helpers.models import pipe_outputs, sd1_pipe
    from lohakit.diffusers import save_loha_as_lora

    base = sd1_pipe()
    adapted = copy.deepcopy(base)
    LoHaModel(adapted.unet, LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=["to_q"]))
    LoHaModel(adapted.text_encoder, LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=targets))
    path = str(tmp_path / "l.safetensors")
    if "out_proj" in targets:
        save_loha_as_lora(adapted, path, dtype=torch.float32)
    else:
        with pytest.warns(UserWarning, match="no out_proj module"):
            save_loha_as_lora(adapted, path, dtype=torch.float32)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in load_file(path))
    pipe = _mixin_pipe(copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder))
    if "out_proj" in targets:
        pipe.load_lora_weights(path)
        for got, want in zip(pipe_outputs(pipe), pipe_outputs(adapted)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    else:
        with pytest.raises(ValueError, match="infer"):
            pipe.load_lora_weights(path)
