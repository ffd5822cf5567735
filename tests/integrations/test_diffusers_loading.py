"""LoHa files into diffusers pipelines: SD1 (diffusers names) and SDXL (SGM names, te1/te2).

Pipelines are tiny objects with real diffusers UNet2DConditionModel and transformers CLIP text
encoders (tiny configs). Tolerance: float32 outputs within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lohakit import LoHaConfig, LoHaLayer, LoHaModel
from lohakit.diffusers import (
    load_loha_weights,
    save_loha_weights,
    set_loha_scale,
    sgm_unet_names,
    unload_loha_weights,
)

from helpers.kohya_reference import apply_reference
from helpers.models import pipe_outputs, same_state, sd1_pipe, sd1_unet, sdxl_pipe, sdxl_unet, state_of

ATOL = 1e-5


def _assert_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def _adapt(pipe, tucker: bool = False) -> None:
    """Random LoHa adapters on every model of the pipeline (in place, through LoHaModel)."""
    LoHaModel(pipe.unet, LoHaConfig(
        r=2, alpha=3, init_weights=False, use_effective_conv2d=tucker,
        target_modules=r".*(to_q|to_k|to_out\.0|proj_in|ff\.net\.2|conv1|conv2|conv_shortcut|time_emb_proj|downsamplers\.0\.conv|upsamplers\.0\.conv|conv_in|conv_out|linear_1|linear_2)",
    ))
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is not None:
            LoHaModel(te, LoHaConfig(r=3, alpha=1.5, init_weights=False, target_modules=["q_proj", "v_proj", "fc1"]))


@pytest.fixture(scope="module")
def sd1():
    return sd1_pipe()


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_pipe()


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, sd1):
    adapted = copy.deepcopy(sd1)
    _adapt(adapted, tucker=True)
    path = str(tmp_path_factory.mktemp("sd1") / "sd1.safetensors")
    save_loha_weights(adapted, path, dtype=torch.float32)
    return path, pipe_outputs(adapted)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory, sdxl):
    adapted = copy.deepcopy(sdxl)
    _adapt(adapted)
    path = str(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")
    save_loha_weights(adapted, path, dtype=torch.float32)
    return path, pipe_outputs(adapted), adapted


def test_sd1_load_scale_fuse_unload(sd1, sd1_file):
    path, want = sd1_file
    sd = load_file(path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.hada_t1") for k in sd)

    pipe = copy.deepcopy(sd1)
    base = pipe_outputs(pipe)
    before = state_of(pipe.unet, pipe.text_encoder)
    report = load_loha_weights(pipe, path)
    assert not report.unused_keys and report.metadata["ss_base_model_version"] == "sd_v1"
    _assert_outputs(pipe_outputs(pipe), want)

    # independent reference at scale 0.5: W += 0.5·(alpha/r)·(w1a@w1b ⊙ w2a@w2b)
    ref = copy.deepcopy(sd1)
    mods = {n: (ref.unet if t.startswith("lora_unet:") else ref.text_encoder).get_submodule(t.split(":", 1)[1])
            for n, t in report.matched.items()}
    apply_reference(sd, mods, 0.5)
    set_loha_scale(pipe, 0.5)
    _assert_outputs(pipe_outputs(pipe), pipe_outputs(ref))

    # fuse at load time: same outputs, and unload brings the weights back
    unload_loha_weights(pipe)
    assert same_state(state_of(pipe.unet, pipe.text_encoder), before)
    _assert_outputs(pipe_outputs(pipe), base)
    load_loha_weights(pipe, path, adapter_name="fused", scale=0.5, fuse=True)
    assert any(isinstance(m, LoHaLayer) and m.merged for m in pipe.unet.modules())
    _assert_outputs(pipe_outputs(pipe), pipe_outputs(ref))
    set_loha_scale(pipe, 1.0, adapter_name="fused")
    _assert_outputs(pipe_outputs(pipe), want)
    unload_loha_weights(pipe, "fused")
    assert not any(isinstance(m, LoHaLayer) for m in pipe.unet.modules())
    _assert_outputs(pipe_outputs(pipe), base)
    with pytest.raises(ValueError, match="no LoHa adapter 'fused'"):
        unload_loha_weights(pipe, "fused")


def test_sdxl_sgm_names_te1_te2(sdxl, sdxl_file):
    path, want, _ = sdxl_file
    keys = {k.partition(".")[0] for k in load_file(path)}
    for expected in (
        "lora_unet_input_blocks_0_0",  # conv_in
        "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
        "lora_unet_input_blocks_2_0_op",  # down_blocks.0.downsamplers.0.conv
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_1_2_conv",  # up_blocks.0.upsamplers.0.conv
        "lora_unet_time_embed_0",
        "lora_unet_label_emb_0_0",
        "lora_unet_out_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # transformers 5 dropped text_model: legacy name kept
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    ):
        assert expected in keys, expected
    assert not any("down_blocks" in k or k.startswith("lora_te_") for k in keys)

    pipe = copy.deepcopy(sdxl)
    report = load_loha_weights(pipe, path)
    assert not report.unused_keys and report.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert report.matched["lora_unet_input_blocks_2_0_op"] == "lora_unet:down_blocks.0.downsamplers.0.conv"
    _assert_outputs(pipe_outputs(pipe), want)
    unload_loha_weights(pipe)
    _assert_outputs(pipe_outputs(pipe), pipe_outputs(sdxl))


def test_sgm_table_agrees_with_diffusers_converter():
    """Our SGM names, fed to diffusers' own SGM→diffusers LoRA key conversion, give back our module paths."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    unet = sdxl_unet()
    table = sgm_unet_names(unet)
    assert len(table) == len(set(table.values())) > 50
    for name, path in table.items():
        key = f"{name}.lora_down.weight"
        mapped = next(iter(_maybe_map_sgm_blocks_to_diffusers({key: torch.zeros(1)}, unet.config)))
        d = _convert_unet_lora_key(mapped).replace(".processor", "")
        for a in "qkv":
            d = d.replace(f"to_{a}_lora", f"to_{a}.lora")
        d = d.replace("to_out_lora", "to_out.0.lora")
        assert d == f"{path}.lora.down.weight", (name, d, path)


def test_wrong_family_files_are_refused(sd1, sdxl, sd1_file, sdxl_file):
    pipe = copy.deepcopy(sd1)
    before = state_of(pipe.unet, pipe.text_encoder)
    with pytest.raises(ValueError, match=r"this is a SDXL file .*but the model is SD 1.x/2.x \(UNet2DConditionModel\)"):
        load_loha_weights(pipe, sdxl_file[0])
    assert same_state(state_of(pipe.unet, pipe.text_encoder), before)

    xl = copy.deepcopy(sdxl)
    before = state_of(xl.unet, xl.text_encoder, xl.text_encoder_2)
    with pytest.raises(ValueError, match=r"this is a SD 1.x/2.x file .*but the model is SDXL"):
        load_loha_weights(xl, sd1_file[0])
    assert same_state(state_of(xl.unet, xl.text_encoder, xl.text_encoder_2), before)


def test_shape_mismatch_names_key_and_module(sd1, sd1_file, tmp_path):
    """An SD1-named file whose shapes do not fit (e.g. an SD2 file into SD1): error, pipeline untouched."""
    from safetensors.torch import save_file

    sd = load_file(sd1_file[0])
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b"
    sd[k] = torch.zeros(2, 48)  # cross_attention_dim 48 instead of 32
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    pipe = copy.deepcopy(sd1)
    before = state_of(pipe.unet, pipe.text_encoder)
    with pytest.raises(ValueError, match=r"bad\.safetensors: kohya key .*attn2_to_k.hada_w1_b: shape \(2, 48\) does not fit module 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'"):
        load_loha_weights(pipe, bad)
    assert same_state(state_of(pipe.unet, pipe.text_encoder), before)
    with pytest.raises(TypeError, match="no `unet` / `transformer`"):
        load_loha_weights(object(), sd1_file[0])


def test_sdxl_exact_lora_export_loads_in_diffusers(tmp_path, sdxl, sdxl_file):
    """The exact LoRA export with SGM names, through diffusers' SDXL load_lora_weights: same UNet output.

    This also checks our SGM names end to end against diffusers' own SDXL key conversion.
    """
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    from lohakit.diffusers import save_loha_as_lora

    _, want, adapted = sdxl_file
    path = str(tmp_path / "xl_lora.safetensors")
    errors = save_loha_as_lora(adapted, path, dtype=torch.float32)
    assert "lora_unet_input_blocks_2_0_op" in errors and max(errors.values()) == 0.0
    assert any(k.startswith("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_down") for k in load_file(path))

    class TinyXL(StableDiffusionXLLoraLoaderMixin):
        hf_device_map = None

        def __init__(self, p):
            self.unet, self.text_encoder, self.text_encoder_2 = p.unet, p.text_encoder, p.text_encoder_2

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    pipe = copy.deepcopy(sdxl)
    TinyXL(pipe).load_lora_weights(path)
    torch.testing.assert_close(pipe_outputs(pipe)[0], want[0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ SD1 files in LDM names / lora_te1
@pytest.mark.parametrize("build", [sd1_unet, sdxl_unet], ids=["sd1_ldm", "sdxl_sgm"])
def test_original_unet_table_agrees_with_diffusers_converter(build):
    """The LDM (SD1) and SGM (SDXL) names, fed to diffusers' own original→diffusers LoRA key conversion."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    unet = build()
    table = sgm_unet_names(unet)
    assert len(table) == len(set(table.values())) > 30
    for name, path in table.items():
        blk = path.split(".")[:2]
        if "upsamplers" in path and not hasattr(unet.get_submodule(".".join(blk)), "attentions"):
            # an up block without attention: LDM/SGM put the upsampler at output_blocks.N.1 (ComfyUI's
            # unet_to_diffusers); diffusers' converter guesses ".1" is always an attention
            assert name.endswith("_1_conv"), (name, path)
            continue
        mapped = next(iter(_maybe_map_sgm_blocks_to_diffusers({f"{name}.lora_down.weight": torch.zeros(1)}, unet.config)))
        d = _convert_unet_lora_key(mapped).replace(".processor", "")
        for a in "qkv":
            d = d.replace(f"to_{a}_lora", f"to_{a}.lora")
        d = d.replace("to_out_lora", "to_out.0.lora")
        assert d == f"{path}.lora.down.weight", (name, d, path)


def test_sd1_file_with_ldm_names_and_te1_loads(sd1, sd1_file, tmp_path):
    """ComfyUI and A1111 apply an SD1 file whose UNet keys use the LDM names and whose text encoder is lora_te1_."""
    from safetensors.torch import save_file

    path, want = sd1_file
    to_ldm = {p: n for n, p in sgm_unet_names(sd1.unet).items()}
    diffusers_name = {f"lora_unet_{p.replace('.', '_')}": p for p in to_ldm}
    renamed = {}
    for k, v in load_file(path).items():
        name, _, param = k.rpartition(".")
        if name in diffusers_name:
            name = to_ldm[diffusers_name[name]]
        elif name.startswith("lora_te_"):
            name = "lora_te1_" + name[len("lora_te_"):]
        renamed[f"{name}.{param}"] = v
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in renamed)
    ldm = str(tmp_path / "ldm.safetensors")
    save_file(renamed, ldm)
    pipe = copy.deepcopy(sd1)
    report = load_loha_weights(pipe, ldm)
    assert not report.unused_keys and len(report.matched) == len({k.rpartition(".")[0] for k in renamed})
    _assert_outputs(pipe_outputs(pipe), want)


# ------------------------------------------------------------------ FLUX.1 / SD3 pipelines
from helpers.dit import clip_encoder, flux_inputs, flux_model, flux_pipe, run_dit, sd3_inputs, sd3_pipe, t5_encoder  # noqa: E402
from helpers.kohya_reference import reference_delta  # noqa: E402

_DIT = {"flux": (flux_pipe, flux_inputs), "sd3": (sd3_pipe, sd3_inputs)}
_IDS = torch.tensor([[0, 5, 9, 7, 1]])


def _dit_outputs(pipe, inputs) -> list[torch.Tensor]:
    outs = [run_dit(pipe.transformer, inputs)]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        te = getattr(pipe, name, None)
        if te is not None:
            with torch.no_grad():
                outs.append(te(_IDS).last_hidden_state)
    return outs


def _adapt_dit(pipe) -> None:
    LoHaModel(pipe.transformer, LoHaConfig(
        r=2, alpha=3, init_weights=False,
        target_modules=r".*(attn\.to_q|attn\.to_k|add_v_proj|proj_mlp|norm_out\.linear|norm1_context\.linear|ff\.net\.2|x_embedder|pos_embed\.proj)",
    ))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        te = getattr(pipe, name, None)
        if te is not None:
            targets = ["q_proj", "fc1"] if "CLIP" in type(te).__name__ else ["q", "wi"]
            LoHaModel(te, LoHaConfig(r=3, alpha=1.5, init_weights=False, target_modules=targets))


@pytest.fixture(scope="module", params=sorted(_DIT))
def dit(request, tmp_path_factory):
    build, inputs = _DIT[request.param]
    base = build()
    adapted = copy.deepcopy(base)
    _adapt_dit(adapted)
    path = str(tmp_path_factory.mktemp(request.param) / "dit.safetensors")
    save_loha_weights(adapted, path, dtype=torch.float32)
    return request.param, base, adapted, path, inputs(torch.float32)


def test_dit_pipeline_save_load_scale_fuse_unload(dit):
    family, base, adapted, path, inputs = dit
    keys = {k.rpartition(".")[0] for k in load_file(path)}
    t5 = "lora_te2" if family == "flux" else "lora_te3"
    for expected in ("lora_transformer_transformer_blocks_0_attn_to_q",
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # text_model kept under transformers 5
                     f"{t5}_encoder_block_0_layer_0_SelfAttention_q", f"{t5}_encoder_block_0_layer_1_DenseReluDense_wi"):
        assert expected in keys, (expected, sorted(keys)[:8])
    assert all(k.startswith(("lora_transformer_", "lora_te")) for k in keys)
    if family == "sd3":
        assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in keys and "lora_transformer_pos_embed_proj" in keys
    else:
        assert "lora_transformer_single_transformer_blocks_0_proj_mlp" in keys  # per module, never fused into linear1
    want = _dit_outputs(adapted, inputs)
    pipe = copy.deepcopy(base)
    before = state_of(*[m for m in vars(pipe).values()])
    report = load_loha_weights(pipe, path)
    assert report.metadata["ss_base_model_version"] == ("flux1" if family == "flux" else "sd3")
    assert not report.unused_keys and len(report.matched) == len(keys)
    _assert_outputs(_dit_outputs(pipe, inputs), want)
    set_loha_scale(pipe, 0.0)
    _assert_outputs(_dit_outputs(pipe, inputs), _dit_outputs(base, inputs))
    unload_loha_weights(pipe)
    assert same_state(state_of(*[m for m in vars(pipe).values()]), before)
    load_loha_weights(pipe, path, fuse=True)
    assert any(isinstance(m, LoHaLayer) and m.merged for m in pipe.transformer.modules())
    _assert_outputs(_dit_outputs(pipe, inputs), want)
    unload_loha_weights(pipe)  # unfused: W + ΔW − ΔW, equal to W up to float32 rounding
    assert not any(isinstance(m, LoHaLayer) for m in pipe.transformer.modules())
    _assert_outputs(_dit_outputs(pipe, inputs), _dit_outputs(base, inputs))


def test_dit_bare_model_and_partial_file(dit, tmp_path):
    """A bare transformer takes a transformer-only file; the whole pipeline file on it raises
    (its text-encoder modules match nothing) unless strict=False."""
    from safetensors.torch import save_file

    family, base, adapted, path, inputs = dit
    sd = load_file(path)
    only = {k: v for k, v in sd.items() if k.startswith("lora_transformer_")}
    tpath = str(tmp_path / "t.safetensors")
    save_file(only, tpath)
    model = copy.deepcopy(base.transformer)
    load_loha_weights(model, tpath)
    torch.testing.assert_close(run_dit(model, inputs), run_dit(adapted.transformer, inputs), atol=ATOL, rtol=0)
    fresh = copy.deepcopy(base.transformer)
    before = state_of(fresh)
    with pytest.raises(ValueError, match=r"LoHa module\(s\) of the file match no module .*lora_te1_text_model_encoder_layers_0"):
        load_loha_weights(fresh, path)
    assert same_state(state_of(fresh), before)
    with pytest.warns(UserWarning, match="lora_te1_text_model"):
        rep = load_loha_weights(fresh, path, strict=False)
    assert rep.unmatched_modules and all(n.startswith("lora_te") for n in rep.unmatched_modules)
    with pytest.raises(TypeError, match="not a denoiser of a known family"):
        load_loha_weights(clip_encoder(), path)


def test_dit_exact_lora_export_loads_in_diffusers(dit, tmp_path):
    """save_loha_as_lora: the transformer part in diffusers' PEFT keys through the transformer's
    load_lora_adapter gives the live LoHa's output."""
    from lohakit.diffusers import save_loha_as_lora

    family, base, adapted, _, inputs = dit
    path = str(tmp_path / "lora.safetensors")
    errors = save_loha_as_lora(adapted, path, dtype=torch.float32)
    assert max(errors.values()) == 0.0
    sd = load_file(path)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    t5 = "lora_te2" if family == "flux" else "lora_te3"
    assert f"{t5}_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in sd
    model = copy.deepcopy(base.transformer)
    model.load_lora_adapter({k: v for k, v in sd.items() if k.startswith("transformer.")}, prefix="transformer")
    torch.testing.assert_close(run_dit(model, inputs), run_dit(adapted.transformer, inputs), atol=ATOL, rtol=0)


def _te_names(te, style: str) -> dict[str, str]:
    """module path -> file module name, written from CLIP's/T5's naming (not lohakit's tables)."""
    out = {}
    for p, m in te.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if "CLIP" in type(te).__name__:
            full = p if p.startswith("text_model.") else "text_model." + p
            short = full[len("text_model."):]
            if "projection" in p:
                continue
            out[p] = {"kohya_te1": "lora_te1_" + full.replace(".", "_"), "kohya_te": "lora_te_" + full.replace(".", "_"),
                      "kohya_no_text_model": "lora_te1_" + short.replace(".", "_"), "diffusers": "text_encoder." + full,
                      "diffusers_no_text_model": "text_encoder." + short,
                      "comfy": "text_encoders.clip_l.transformer." + full}[style]
        else:
            out[p] = {"kohya_te1": "lora_te2_" + p.replace(".", "_"), "kohya_te": "lora_te3_" + p.replace(".", "_"),
                      "kohya_no_text_model": "lora_te2_" + p.replace(".", "_"), "diffusers": "text_encoder_2." + p,
                      "diffusers_no_text_model": "text_encoder_2." + p,
                      "comfy": "text_encoders.t5xxl.transformer." + p}[style]
    return out


@pytest.mark.parametrize("style", ["kohya_te1", "kohya_te", "kohya_no_text_model", "diffusers", "diffusers_no_text_model", "comfy"])
def test_flux_text_encoder_namings(style):
    """Every text-encoder naming ComfyUI maps for FLUX (CLIP-L: lora_te1_/lora_te_/text_encoder./
    text_encoders.clip_l; T5: lora_te2_/lora_te3_/text_encoder_2./text_encoders.t5xxl), with and
    without CLIP's text_model level: every module's ΔW is the plain formula."""
    import types

    pipe = types.SimpleNamespace(transformer=flux_model(), text_encoder=clip_encoder(), text_encoder_2=t5_encoder())
    g = torch.Generator().manual_seed(1)
    sd, want = {}, {}
    for attr in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, attr)
        for path, name in _te_names(te, style).items():
            w = te.get_submodule(path).weight
            t = {"hada_w1_a": torch.randn(w.shape[0], 2, generator=g), "hada_w1_b": torch.randn(2, w.shape[1], generator=g),
                 "hada_w2_a": torch.randn(w.shape[0], 2, generator=g), "hada_w2_b": torch.randn(2, w.shape[1], generator=g),
                 "alpha": torch.tensor(1.5)}
            sd.update({f"{name}.{k}": v for k, v in t.items()})
            want[(attr, path)] = reference_delta(t, w.shape, 1.0)
    load_loha_weights(pipe, sd)
    for (attr, path), d in want.items():
        layer = getattr(pipe, attr).get_submodule(path)
        assert isinstance(layer, LoHaLayer), (attr, path)
        torch.testing.assert_close(layer.get_delta_weight("default"), d.float(), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ fuse at load: all or nothing
def _scaled_file(tmp_path, sd1_file, factor: float) -> str:
    from safetensors.torch import save_file

    sd = load_file(sd1_file[0])
    key = sorted(k for k in sd if k.endswith("hada_w1_a"))[-1]  # one module, late in the order
    for k in (key, key.replace("hada_w1_a", "hada_w2_a")):  # finite factors, ΔW past float32's range
        sd[k] = sd[k] * factor
    path = str(tmp_path / "scaled.safetensors")
    save_file(sd, path)
    return path


def test_fuse_refuses_non_finite_and_leaves_the_pipeline_as_it_was(sd1, sd1_file, tmp_path):
    from lohakit.core.io import NonFiniteTensorError

    pipe = copy.deepcopy(sd1)
    before = state_of(pipe.unet, pipe.text_encoder)
    hooks = (dict(pipe.unet._state_dict_hooks), dict(pipe.unet._load_state_dict_pre_hooks))
    with pytest.raises(NonFiniteTensorError, match="nothing was loaded or fused"):
        load_loha_weights(pipe, _scaled_file(tmp_path, sd1_file, 1e25), fuse=True)
    assert same_state(state_of(pipe.unet, pipe.text_encoder), before)
    assert (dict(pipe.unet._state_dict_hooks), dict(pipe.unet._load_state_dict_pre_hooks)) == hooks
    assert not any(isinstance(m, LoHaLayer) for m in pipe.unet.modules())


def test_fuse_interrupted_while_checking_rolls_back(sd1, sd1_file, monkeypatch):
    pipe = copy.deepcopy(sd1)
    before = state_of(pipe.unet, pipe.text_encoder)
    calls = {"n": 0}
    real = LoHaLayer.merged_weight

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(LoHaLayer, "merged_weight", interrupting)
    with pytest.raises(KeyboardInterrupt):
        load_loha_weights(pipe, sd1_file[0], fuse=True)
    assert same_state(state_of(pipe.unet, pipe.text_encoder), before)
    assert not any(isinstance(m, LoHaLayer) for m in pipe.unet.modules())


def test_ctrl_c_while_writing_the_fused_weights_finishes_them_first(sd1, sd1_file, monkeypatch):
    import os
    import signal

    ref = copy.deepcopy(sd1)
    load_loha_weights(ref, sd1_file[0], fuse=True)
    pipe = copy.deepcopy(sd1)
    real = LoHaLayer.merge
    sent = {"done": False}

    def signalling(self, *a, **k):
        if not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the writes
        return real(self, *a, **k)

    monkeypatch.setattr(LoHaLayer, "merge", signalling)
    with pytest.raises(KeyboardInterrupt):
        load_loha_weights(pipe, sd1_file[0], fuse=True)
    _assert_outputs(pipe_outputs(pipe), pipe_outputs(ref))  # every layer fused, none twice
    assert all(layer.merged_adapters == ["default"] for layer in pipe.unet.modules() if isinstance(layer, LoHaLayer))
