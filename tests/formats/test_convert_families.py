"""``lohakit convert`` / ``inspect`` and the kohya writers on the new families and text encoders.

* Text-encoder names are the ones ComfyUI/A1111 map (``lora_te_text_model_encoder_layers_…``)
  with and without a model given, whatever the installed transformers' CLIP tree.
* ``--base`` may be a diffusers pipeline directory: a kohya FLUX file (BFL names, fused q/k/v)
  converts to a PEFT directory on diffusers' modules with the same ΔW as the live load.
* The CLI's reports say what happened (``--rank`` above every exact rank is "exact"), and a
  language-model adapter is not silently written under ``lora_unet``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lohakit import LoHaConfig, LoHaLayer, LoHaModel
from lohakit.app.convert import convert
from lohakit.app.inspection import format_table, inspect_adapter
from lohakit.formats.kohya import load_kohya, peft_to_kohya
from lohakit.lora import save_lora_kohya, to_lora

from helpers.dit import NAMINGS, clip_encoder, expected_deltas, flux_key_map, flux_model, loha_file, module_shapes, original_state_dict, t5_encoder

CLIP_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture()
def clip_adapter(tmp_path):
    te = clip_encoder()
    lm = LoHaModel(te, LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "fc1"], init_weights=False))
    lm.save_pretrained(str(tmp_path / "te_peft"))
    return lm, tmp_path / "te_peft"


def test_text_encoder_names_without_a_model(tmp_path, clip_adapter):
    lm, peft_dir = clip_adapter
    save_lora_kohya(str(tmp_path / "lora.safetensors"), {"lora_te": to_lora(lm)})  # no models=
    assert f"{CLIP_Q}.lora_down.weight" in load_file(str(tmp_path / "lora.safetensors"))
    peft_to_kohya(peft_dir, tmp_path / "k.safetensors", prefix="lora_te")  # no model=
    names = {k.rpartition(".")[0] for k in load_file(str(tmp_path / "k.safetensors"))}
    assert CLIP_Q in names and all(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    # the CLI without --base, with and without --prefix (a CLIP adapter is recognised as lora_te)
    for i, extra in enumerate((["lora_te"], [None])):
        out = tmp_path / f"cli{i}.safetensors"
        convert(peft_dir, out, to="kohya", prefix=extra[0])
        assert {k.rpartition(".")[0] for k in load_file(str(out))} == names
    # and the file loads back onto the model (transformers 4 or 5 tree alike)
    fresh = clip_encoder()
    rep = load_kohya(str(tmp_path / "k.safetensors"), {"lora_te": fresh})
    assert len(rep.matched) == len(names)


def test_language_model_adapter_needs_a_prefix(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    LoHaModel(llama, LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False)).save_pretrained(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*Pass --prefix"):
        convert(tmp_path / "lm", tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()
    convert(tmp_path / "lm", tmp_path / "k.safetensors", to="kohya", prefix="lora_te")  # asked for explicitly
    assert (tmp_path / "k.safetensors").is_file()


def test_rank_report_says_what_was_compressed(tmp_path, clip_adapter):
    _, peft_dir = clip_adapter
    msg = convert(peft_dir, tmp_path / "l1", to="lora", rank=1000)
    assert "exact: --rank 1000 is at or above every module's exact rank [4], nothing was compressed" in msg
    msg = convert(peft_dir, tmp_path / "l2", to="lora", rank=2)
    assert "2 of 2 modules compressed from exact rank [4] to rank 2" in msg


def _flux_pipeline_dir(tmp_path):
    """A diffusers pipeline directory with the components LoHa files touch."""
    transformer, te, te2 = flux_model(), clip_encoder(), t5_encoder()
    d = tmp_path / "flux_pipe"
    for name, m in (("transformer", transformer), ("text_encoder", te), ("text_encoder_2", te2)):
        m.save_pretrained(str(d / name))
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return d, transformer


def test_flux_kohya_file_to_peft_and_lora_with_a_pipeline_base(tmp_path):
    d, transformer = _flux_pipeline_dir(tmp_path)
    key_map = flux_key_map(transformer)
    sd = transformer.state_dict()
    shapes = module_shapes(original_state_dict(sd, key_map))
    file_sd, per = loha_file(shapes, NAMINGS["kohya_original"][1])
    want = expected_deltas(per, shapes, "original", key_map, {k: v.shape[0] for k, v in sd.items()})
    src = tmp_path / "flux_bfl.safetensors"
    save_file(file_sd, str(src))

    report = inspect_adapter(src)
    assert report["family"] == "FLUX.1" and "module names of FLUX.1" in format_table(report)

    msg = convert(src, tmp_path / "peft", to="peft", base=d)
    assert f"23 file modules on {len(want)} model modules (fused blocks split)" in msg
    lm = LoHaModel.from_pretrained(copy.deepcopy(transformer), str(tmp_path / "peft"))
    layers = {p: m for p, m in lm.model.named_modules() if isinstance(m, LoHaLayer)}
    assert set(layers) == set(want)
    for p, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default"), want[p].float(), atol=1e-5, rtol=0, msg=p)

    # PEFT dir -> kohya without --base: the DiT's paths choose the names FLUX runtimes map
    convert(tmp_path / "peft", tmp_path / "back.safetensors", to="kohya")
    back = {k.rpartition(".")[0] for k in load_file(str(tmp_path / "back.safetensors"))}
    assert "lora_transformer_single_transformer_blocks_0_proj_mlp" in back and all(n.startswith("lora_transformer_") for n in back)

    # kohya -> LoRA keeps the file's names (ComfyUI maps the fused BFL names for LoRA too), exact
    msg = convert(src, tmp_path / "lora.safetensors", to="lora", base=d)
    assert "exact" in msg
    lora = load_file(str(tmp_path / "lora.safetensors"))
    up, down = lora["lora_unet_single_blocks_0_linear1.lora_up.weight"], lora["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert up.shape[0] == 16 * 3 + 64 and down.shape[1] == 16  # q, k, v and the MLP input, stacked as in the file

    # --prefix picks a pipeline component
    te_file = {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in
               loha_file({"q": (16, 16)}, lambda p: p)[1]["q"].items()}
    save_file(te_file, str(tmp_path / "te.safetensors"))
    msg = convert(tmp_path / "te.safetensors", tmp_path / "te_peft", to="peft", base=d, prefix="lora_te1")
    assert "1 modules" in msg


def test_kohya_to_lora_conv_needs_the_kernel(tmp_path):
    """A flat LoHa on a 3x3 conv: without --base the kernel is unknown (refused in one line);
    with it the LoRA factors are conv-shaped."""
    from helpers.models import sd1_unet

    unet = sd1_unet()
    lm = LoHaModel(copy.deepcopy(unet), LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=["conv1", "to_q"]))
    from lohakit.formats.kohya import save_kohya

    src = tmp_path / "conv.safetensors"
    save_kohya(str(src), {"lora_unet": lm}, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora_unet_down_blocks_0_resnets_0_conv1.*kernel shape is not in the file.*--base"):
        convert(src, tmp_path / "lora.safetensors", to="lora")
    assert not (tmp_path / "lora.safetensors").exists()
    base_dir = tmp_path / "unet_base"  # a diffusers model directory as --base
    unet.save_pretrained(str(base_dir))
    convert(src, tmp_path / "lora.safetensors", to="lora", base=base_dir)
    lora = load_file(str(tmp_path / "lora.safetensors"))
    out, cin, kh, kw = unet.down_blocks[0].resnets[0].conv1.weight.shape
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, cin, kh, kw) and kh == 3
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (out, 4, 1, 1)


def test_kohya_to_lora_conv_file_loads_in_diffusers(tmp_path):
    """The conv-shaped LoRA from a kohya LoHa file (with --base) through diffusers' load_lora_weights:
    the UNet's output equals the live LoHa's."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from helpers.models import clip_te, sd1_unet, unet_out
    from lohakit.formats.kohya import save_kohya

    unet = sd1_unet()
    lm = LoHaModel(copy.deepcopy(unet), LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=["conv1", "conv2", "to_q"]))
    src = tmp_path / "conv.safetensors"
    save_kohya(str(src), {"lora_unet": lm}, dtype=torch.float32)
    unet.save_pretrained(str(tmp_path / "base"))
    convert(src, tmp_path / "lora.safetensors", to="lora", base=tmp_path / "base")

    class TinyPipe(StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self, u, te):
            self.unet, self.text_encoder = u, te

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    pipe = TinyPipe(copy.deepcopy(unet), clip_te())
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(lm.model), atol=1e-5, rtol=0)
