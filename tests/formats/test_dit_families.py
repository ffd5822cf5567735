"""FLUX.1 and SD3.5 LoHa files in every naming ComfyUI maps, onto tiny diffusers transformers.

Files are built from each family's ORIGINAL tree (BFL / SAI keys, ``helpers.dit``'s own tables,
checked here against diffusers' single-file converters) or from diffusers' tree, never from
lohakit's tables. Every module's ΔW is compared with the plain formula
``(alpha/r)·(w1a@w1b) ⊙ (w2a@w2b)`` (float64), fused original modules converted to diffusers'
modules through the key map. Tolerances: float32 1e-5 absolute per ΔW entry; bfloat16 merged
weights within one bfloat16 rounding of the float32 result (rtol 2⁻⁷), live bfloat16 ΔW within
2⁻⁷ of the largest entry.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lohakit import LoHaLayer
from lohakit.core.io import LoHaFormatError
from lohakit.formats.kohya import load_kohya, save_kohya

from helpers.dit import (
    NAMINGS,
    expected_deltas,
    flux_inputs,
    flux_key_map,
    flux_model,
    loha_file,
    module_shapes,
    original_state_dict,
    run_dit,
    sd3_inputs,
    sd3_key_map,
    sd3_model,
    to_diffusers,
)
from helpers.models import same_state, state_of

ATOL32 = 1e-5
FAMILIES = {
    "flux": (flux_model, flux_key_map, flux_inputs),
    "sd3": (sd3_model, sd3_key_map, sd3_inputs),
}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, (build, _, _) in FAMILIES.items()}


def _trees(model):
    """(key map, {tree: module shapes}, diffusers row sizes) for a model."""
    fam = "flux" if type(model).__name__.startswith("Flux") else "sd3"
    key_map = FAMILIES[fam][1](model)
    sd = model.state_dict()
    orig = original_state_dict(sd, key_map)
    sizes = {k: v.shape[0] for k, v in sd.items()}
    return key_map, {"original": module_shapes(orig), "diffusers": module_shapes(sd)}, sizes


def _layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, LoHaLayer)}


# ------------------------------------------------------------------ the test-side tables vs diffusers
def test_sd3_key_map_agrees_with_diffusers_converter(bases):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = bases["sd3"]
    sd = model.state_dict()
    key_map = sd3_key_map(model)
    orig = original_state_dict(sd, key_map)
    orig["pos_embed"] = sd["pos_embed.pos_embed"]
    conv = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert set(conv) == set(sd)
    for k in sd:
        torch.testing.assert_close(conv[k], sd[k], atol=0, rtol=0, msg=k)
    back = to_diffusers(orig, key_map, {k: v.shape[0] for k, v in sd.items()})
    assert all(torch.equal(back[k], sd[k]) for k in back) and len(back) == len(sd) - 1


def test_flux_key_map_agrees_with_diffusers_converter(bases):
    """diffusers' FLUX converter hard-codes FLUX.1's width (3072) for single_blocks.N.linear1: that
    key is fed with row-labelled 21504-row tensors to check the row order q, k, v, MLP; every other
    key must come back exactly."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = bases["flux"]
    sd = model.state_dict()
    key_map = flux_key_map(model)
    orig = original_state_dict(sd, key_map)
    labelled = {}
    for o, ds, _ in key_map:
        if ".linear1." in o:
            rows = torch.arange(21504, dtype=torch.float32)
            orig[o] = rows[:, None].expand(21504, sd[ds[0]].shape[1]).clone() if o.endswith("weight") else rows.clone()
            labelled[o] = ds
    conv = convert_flux_transformer_checkpoint_to_diffusers(dict(orig))
    assert set(conv) == set(sd)
    from_linear1 = {d for ds in labelled.values() for d in ds}
    for k in sd:
        if k not in from_linear1:
            torch.testing.assert_close(conv[k], sd[k], atol=0, rtol=0, msg=k)
    for o, ds in labelled.items():
        starts = [int(conv[d].reshape(conv[d].shape[0], -1)[0, 0]) for d in ds]
        assert starts == [0, 3072, 6144, 9216], (o, ds, starts)  # q, k, v, then the MLP input
    back = to_diffusers(original_state_dict(sd, key_map), key_map, {k: v.shape[0] for k, v in sd.items()})
    assert len(back) == len(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------ every naming, live and merged
def _file(model, naming: str, seed: int = 0):
    tree, rename = NAMINGS[naming]
    key_map, shapes, sizes = _trees(model)
    sd, per = loha_file(shapes[tree], rename, seed=seed)
    return sd, expected_deltas(per, shapes[tree], tree, key_map, sizes)


@pytest.mark.parametrize("naming", sorted(NAMINGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_naming_live_merged_roundtrip(tmp_path, bases, family, naming):
    base = bases[family]
    sd, want = _file(base, naming)
    # live
    live = copy.deepcopy(base)
    rep = load_kohya(sd, {"lora_unet": live}, multiplier=0.7)
    layers = _layers(live)
    assert set(layers) == set(want), sorted(set(layers) ^ set(want))[:5]
    for p, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default"), (0.7 * want[p]).float(), atol=ATOL32, rtol=0, msg=p)
    assert not rep.unused_keys and not rep.unmatched_modules
    # merged
    merged = copy.deepcopy(base)
    load_kohya(sd, {"lora_unet": merged}, multiplier=0.7, merge=True)
    w0, w1 = dict(base.named_parameters()), dict(merged.named_parameters())
    for p, d in want.items():
        torch.testing.assert_close(w1[f"{p}.weight"] - w0[f"{p}.weight"], (0.7 * d).float(), atol=ATOL32, rtol=0, msg=p)
    # round trip: what lohakit writes (one entry per module, never fused) loads back to the same ΔW
    out = str(tmp_path / "rt.safetensors")
    save_kohya(out, {"lora_unet": live}, dtype=None)
    written = load_file(out)
    assert all(k.startswith("lora_transformer_") for k in written)
    again = copy.deepcopy(base)
    load_kohya(out, {"lora_unet": again}, multiplier=0.7)  # the strength is a runtime setting, not saved
    for p, layer in _layers(again).items():
        torch.testing.assert_close(layer.get_delta_weight("default"), layers[p].get_delta_weight("default"), atol=1e-6, rtol=0)
    assert set(_layers(again)) == set(layers)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_live_forward_equals_reference_weights(bases, family):
    """Whole-model output with the live adapter == the base with W + ΔW (plain formula) written in."""
    base = bases[family]
    sd, want = _file(base, "kohya_original", seed=3)
    live = copy.deepcopy(base)
    load_kohya(sd, {"lora_unet": live})
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for p, d in want.items():
            ref.get_submodule(p).weight += d.float()
    inputs = FAMILIES[family][2](torch.float32)
    torch.testing.assert_close(run_dit(live, inputs), run_dit(ref, inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_live_and_merged(bases, family):
    base = copy.deepcopy(bases[family]).to(torch.bfloat16)
    sd, want = _file(bases[family], "kohya_original", seed=4)
    merged = copy.deepcopy(base)
    load_kohya(sd, {"lora_unet": merged}, merge=True)
    w0, w1 = dict(base.named_parameters()), dict(merged.named_parameters())
    for p, d in want.items():
        ref = (w0[f"{p}.weight"].float() + d.float()).to(torch.bfloat16)
        assert w1[f"{p}.weight"].dtype == torch.bfloat16
        torch.testing.assert_close(w1[f"{p}.weight"].float(), ref.float(), rtol=2**-7, atol=2**-7 * float(d.abs().max()), msg=p)
    live = copy.deepcopy(base)
    load_kohya(sd, {"lora_unet": live})
    for p, layer in _layers(live).items():
        got = layer.get_delta_weight("default").float()
        torch.testing.assert_close(got, want[p].float(), rtol=0, atol=2**-7 * float(want[p].abs().max()), msg=p)
    out = run_dit(live, FAMILIES[family][2](torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_sd3_patch_embedding_tucker(bases):
    """SD3's patch embedding (a 2x2 Conv2d) as a Tucker LoHa in SAI naming."""
    base = bases["sd3"]
    key_map, shapes, sizes = _trees(base)
    conv = {"x_embedder.proj": shapes["original"]["x_embedder.proj"]}
    sd, per = loha_file(conv, NAMINGS["kohya_original"][1], tucker_convs=True)
    assert "lora_unet_x_embedder_proj.hada_t1" in sd
    want = expected_deltas(per, conv, "original", key_map, sizes)
    live = copy.deepcopy(base)
    load_kohya(sd, {"lora_unet": live})
    torch.testing.assert_close(live.pos_embed.proj.get_delta_weight("default"), want["pos_embed.proj"].float(), atol=ATOL32, rtol=0)


def test_mixed_namings_in_one_file(bases):
    """A file naming some modules kohya/BFL-style and others diffusers-style loads as a whole."""
    base = bases["flux"]
    sd_a, want_a = _file(base, "kohya_original", seed=5)
    sd_b, want_b = _file(base, "transformer_dot", seed=6)
    keep_a = {k: v for k, v in sd_a.items() if "double_blocks" in k}
    keep_b = {k: v for k, v in sd_b.items() if "single_transformer_blocks" in k}
    live = copy.deepcopy(base)
    load_kohya({**keep_a, **keep_b}, {"lora_unet": live})
    want = {p: d for p, d in want_a.items() if p.startswith("transformer_blocks.")}
    want |= {p: d for p, d in want_b.items() if p.startswith("single_transformer_blocks.")}
    assert set(_layers(live)) == set(want)


# ------------------------------------------------------------------ bad input
def test_sd3_file_on_flux_names_both_families(bases):
    sd, _ = _file(bases["sd3"], "kohya_original")
    model = copy.deepcopy(bases["flux"])
    before = state_of(model)
    with pytest.raises(LoHaFormatError, match=r"this is a SD3/3.5 file .*joint_blocks.*but the model is FLUX.1 \(FluxTransformer2DModel\)"):
        load_kohya(sd, {"lora_unet": model})
    with pytest.raises(LoHaFormatError, match="SD3/3.5 file"):
        load_kohya(sd, {"lora_unet": model}, strict=False)  # the wrong family is never partly loaded
    assert same_state(state_of(model), before)


def test_mixed_families_in_one_file(bases):
    a, _ = _file(bases["flux"], "kohya_original")
    b, _ = _file(bases["sd3"], "kohya_original")
    mix = {**{k: v for k, v in a.items() if "double_blocks_0_img_attn_qkv" in k}, **{k: v for k, v in b.items() if "joint_blocks_0_x_block_attn_qkv" in k}}
    model = copy.deepcopy(bases["flux"])
    before = state_of(model)
    with pytest.raises(LoHaFormatError, match=r"<state dict>: the file mixes module names of 2 model families \(FLUX.1: .*SD3/3.5: "):
        load_kohya(mix, {"lora_unet": model})
    assert same_state(state_of(model), before)


def _bad(base, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    sd, _ = _file(base, "kohya_original")
    q = "lora_unet_double_blocks_0_img_attn_qkv"
    if kind == "fused_rows":
        sd[f"{q}.hada_w1_a"] = sd[f"{q}.hada_w1_a"][:-1]
        return sd, r"kohya key lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a: shape \(47, 3\) has 47 output rows, but the module fuses transformer_blocks.0.attn.to_q \(16\) \+ transformer_blocks.0.attn.to_k \(16\) \+ transformer_blocks.0.attn.to_v \(16\) = 48 rows"
    if kind == "alpha_shape":
        sd[f"{q}.alpha"] = torch.ones(2)
        return sd, r"img_attn_qkv.alpha: expected a 0-dim tensor, got shape \(2\)"
    if kind == "unknown_family":
        w = {k.replace("lora_unet_double_blocks", "lora_unet_blocks").replace("img_attn_qkv", "self_attn_q"): v for k, v in sd.items()}
        return w, r"LoHa module\(s\) of the file match no module of the models .*lora_unet_blocks_0_self_attn_q.*nearest names"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fused_rows", "alpha_shape", "unknown_family"])
@pytest.mark.parametrize("merge", [False, True])
def test_bad_files_raise_and_leave_model_untouched(bases, kind, merge):
    model = copy.deepcopy(bases["flux"])
    before = state_of(model)
    sd, msg = _bad(model, kind)
    with pytest.raises(LoHaFormatError, match=msg):
        load_kohya(sd, {"lora_unet": model}, merge=merge)
    assert same_state(state_of(model), before)


def test_strict_false_loads_the_rest_warns_and_reports(bases):
    base = bases["flux"]
    sd, want = _file(base, "kohya_original")
    extra = {"lora_unet_no_such_block.hada_w1_a": torch.zeros(2, 2), "lora_unet_no_such_block.hada_w1_b": torch.zeros(2, 2),
             "lora_unet_no_such_block.hada_w2_a": torch.zeros(2, 2), "lora_unet_no_such_block.hada_w2_b": torch.zeros(2, 2)}
    model = copy.deepcopy(base)
    before = state_of(model)
    with pytest.raises(LoHaFormatError, match=r"1 LoHa module\(s\) .*lora_unet_no_such_block.*strict=False"):
        load_kohya({**sd, **extra}, {"lora_unet": model})
    assert same_state(state_of(model), before)
    with pytest.warns(UserWarning, match="lora_unet_no_such_block"):
        rep = load_kohya({**sd, **extra}, {"lora_unet": model}, strict=False)
    assert rep.unmatched_modules == ["lora_unet_no_such_block"] and len(rep.unused_keys) == 4
    assert set(_layers(model)) == set(want)
    assert rep.matched["lora_unet_single_blocks_0_linear1"] == (
        "lora_unet:single_transformer_blocks.0.attn.to_q + single_transformer_blocks.0.attn.to_k + "
        "single_transformer_blocks.0.attn.to_v + single_transformer_blocks.0.proj_mlp"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_kohya(sd, {"lora_unet": copy.deepcopy(base)})  # a complete file: no warning


@pytest.mark.parametrize("names,family", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"], "sd"),
    (["lora_unet_input_blocks_1_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"], "sd"),
    (["lora_unet_input_blocks_4_1_proj_in", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "sdxl"),
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_te2_encoder_block_0_layer_0_SelfAttention_q"], "flux"),
    (["transformer.single_transformer_blocks.0.proj_mlp"], "flux"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "sd3"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1"], None),  # a text encoder alone does not tell
    (["transformer.transformer_blocks.0.attn.to_q"], None),  # FLUX and SD3 share these diffusers names
])
def test_file_family_from_names(names, family):
    from lohakit.formats.families import guess_file_family

    fam, _ = guess_file_family(names)
    assert (fam.name if fam else None) == family


def test_family_of_model(bases):
    from helpers.models import sd1_unet, sdxl_unet
    from lohakit.formats.families import family_of_model, family_of_pipeline

    assert family_of_model(bases["flux"]).label == "FLUX.1" and family_of_model(bases["sd3"]).label == "SD3/3.5"
    assert family_of_model(sd1_unet()).name == "sd" and family_of_model(sdxl_unet()).name == "sdxl"
    assert family_of_model(torch.nn.Linear(2, 2)) is None and family_of_pipeline(object()) is None
