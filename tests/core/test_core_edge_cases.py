"""Edge cases of the core engine (issue 2), checked against PEFT's LoHa where PEFT has the feature.

Each test pins one behaviour found in an independent review: where lohakit agrees with PEFT, where
it deliberately differs (and why), and inputs that used to break. Tolerances: float32 outputs 1e-5
absolute on O(1) values (the paths differ only in operation order), bfloat16 3e-2 relative.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import warnings

import peft
import pytest
import torch
import torch.nn as nn

from helpers.models import llama
from lohakit import LoHaConfig, LoHaLayer, LoHaModel, ModulesToSaveWrapper, get_peft_model
from lohakit.core.targets import layer_index, matches_target
from helpers.snapshots import assert_unchanged, snapshot

TOL32 = 1e-5


# ------------------------------------------------------------------ helpers
def twins(base: nn.Module, **kwargs):
    """``base`` adapted by lohakit and by PEFT with the same config; lohakit's factors copied into PEFT."""
    ours = get_peft_model(copy.deepcopy(base), LoHaConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kwargs))
    our_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".hada_" in name:
                q = our_params["model." + name.removeprefix("base_model.model.")]
                assert q.shape == p.shape, (name, q.shape, p.shape)
                p.copy_(q)
    return ours, theirs


def our_targets(m: LoHaModel) -> list[str]:
    return sorted(n for n, _ in m.loha_layers())


def peft_targets(m) -> list[str]:
    return sorted(
        n.removeprefix("base_model.model.")
        for n, mod in m.named_modules()
        if type(mod).__module__.startswith("peft.tuners.loha.layer")
    )


def seeded(fn):
    torch.manual_seed(0)
    return fn()


class Net(nn.Module):
    """A plain (non-transformers) model with a body and a two-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def net() -> Net:
    return seeded(Net)


def mlp() -> nn.Module:
    return seeded(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


X8 = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ layer geometries vs PEFT
GEOMETRIES = {
    "conv2d_no_bias": (lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False), (2, 3, 5, 5)),
    "conv2d_1x3": (lambda: nn.Conv2d(3, 6, (1, 3), padding=(0, 1)), (2, 3, 5, 5)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 6, 1), (2, 3, 5, 5)),
    "conv1d_k1": (lambda: nn.Conv1d(3, 6, 1), (2, 3, 7)),
    "conv2d_stride2_dil2_no_bias": (lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False), (2, 4, 9, 9)),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 7, 7)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7)),
    "conv1d_same_dilated": (lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=3), (2, 4, 11)),
    "linear_out1_no_bias": (lambda: nn.Linear(5, 1, bias=False), (3, 5)),
}


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_layer_geometries_equal_peft(name: str, effective: bool):
    make, shape = GEOMETRIES[name]
    base = nn.Sequential(seeded(make))
    ours, theirs = twins(base, target_modules=["0"], init_weights=False, r=2, alpha=3.0, use_effective_conv2d=effective)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(x)
        for path in ("factored", "materialised"):
            ours.set_compute_path(path)
            torch.testing.assert_close(ours(x), ref, rtol=0, atol=TOL32)


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_modes_merged_equals_unmerged_and_peft_merged(mode: str, effective: bool):
    """Non-zero padding modes: ΔW sees the same padded input as W, so merged == unmerged.

    PEFT 0.21's unmerged LoHa conv applies ΔW with zero padding (its merged model differs from its
    unmerged one); lohakit follows the merged semantics, so we compare against PEFT's merged model.
    """
    base = seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode),
        nn.Conv2d(8, 4, 3, padding=2, dilation=2, padding_mode=mode),
    ))
    ours, theirs = twins(base, target_modules=["0", "1"], init_weights=False, r=2, use_effective_conv2d=effective)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = {}
        for path in ("factored", "materialised"):
            ours.set_compute_path(path)
            unmerged[path] = ours(x)
        ours.merge_adapter()
        theirs.merge_adapter()
        merged, peft_merged = ours(x), theirs(x)
    for path, y in unmerged.items():
        torch.testing.assert_close(y, merged, rtol=0, atol=TOL32, msg=path)
    torch.testing.assert_close(merged, peft_merged, rtol=0, atol=TOL32)


def test_gpt2_conv1d_bf16_runs_trains_and_merges():
    from transformers.pytorch_utils import Conv1D

    base = seeded(lambda: nn.Sequential(Conv1D(24, 16), nn.GELU(), Conv1D(16, 24))).to(torch.bfloat16)
    m = get_peft_model(base, LoHaConfig(target_modules=["0", "2"], init_weights=False, r=2))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    outs = {}
    for path in ("factored", "materialised"):
        m.set_compute_path(path)
        y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        outs[path] = y.detach().float()
    grads = [p.grad for n, p in m.named_parameters() if ".hada_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    scale = outs["materialised"].abs().max()
    assert (outs["factored"] - outs["materialised"]).abs().max() / scale < 3e-2
    with torch.no_grad():
        m.merge_adapter()
        merged = m(x).float()
    assert (merged - outs["materialised"]).abs().max() / scale < 3e-2


def test_model_cast_to_bf16_after_wrapping():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0", "2"], init_weights=False))
    with torch.no_grad():
        ref = m(X8)
    m.to(torch.bfloat16)  # casts the factors too: they then compute in bf16
    y = m(X8.bfloat16())
    y.float().sum().backward()
    assert ((y.detach().float() - ref).abs().max() / ref.abs().max()) < 3e-2


# ------------------------------------------------------------------ adapter lifecycle
def test_overlapping_target_sets_add_up():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    m.add_adapter("b", LoHaConfig(target_modules=["0", "2"], init_weights=False))
    m.set_adapter(["default", "b"])
    ref = mlp()
    with torch.no_grad():
        ref[0].weight += m.get_delta_weight("0", "default") + m.get_delta_weight("0", "b")
        ref[2].weight += m.get_delta_weight("2", "b")
        torch.testing.assert_close(m(X8), ref(X8), rtol=0, atol=TOL32)
    assert m.targeted_module_names == ["0", "2"]


def test_delete_one_of_two_active_adapters():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    m.add_adapter("b", LoHaConfig(target_modules=["0", "2"], init_weights=False))
    m.set_adapter(["default", "b"])
    m.delete_adapter("default")
    assert m.active_adapters == ["b"] and list(m.peft_config) == ["b"]
    assert all(layer.active_adapters == ["b"] for _, layer in m.loha_layers())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(n.endswith(".b") for n in trainable)


def test_delete_last_adapter_leaves_base_behaviour():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    m.delete_adapter("default")
    assert m.active_adapters == [] and m.peft_config == {}
    with torch.no_grad():
        torch.testing.assert_close(m(X8), mlp()(X8), rtol=0, atol=0)


def test_set_adapter_while_merged_unmerges_first_like_peft(caplog):
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    m.add_adapter("b", LoHaConfig(target_modules=["0"], init_weights=False))
    m.merge_adapter()
    with caplog.at_level("WARNING"):
        m.set_adapter("b")
    assert "unmerging" in caplog.text
    assert not m.model[0].merged
    ref = mlp()
    with torch.no_grad():
        ref[0].weight += m.get_delta_weight("0", "b")
        torch.testing.assert_close(m(X8), ref(X8), rtol=0, atol=TOL32)


def test_merge_and_unload_an_inactive_adapter_merges_only_it():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    m.add_adapter("b", LoHaConfig(target_modules=["2"], init_weights=False))
    delta = m.get_delta_weight("2", "b").detach()
    out = m.merge_and_unload(adapter_names=["b"])
    ref = mlp()
    assert isinstance(out[0], nn.Linear) and isinstance(out[2], nn.Linear)
    assert torch.equal(out[0].weight, ref[0].weight)
    torch.testing.assert_close(out[2].weight, ref[2].weight + delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["lohakit", "peft"])
def test_disable_adapter_while_merged_unmerges(impl: str):
    """PEFT unmerges for a disabled forward and does not re-merge afterwards: lohakit does the same."""
    if impl == "lohakit":
        m = get_peft_model(mlp(), LoHaConfig(target_modules=["0", "2"], init_weights=False))
    else:
        m = peft.get_peft_model(mlp(), peft.LoHaConfig(target_modules=["0", "2"], init_weights=False))
    with torch.no_grad():
        unmerged = m(X8)
        m.merge_adapter()
        with m.disable_adapter():
            disabled = m(X8)
        after = m(X8)
    torch.testing.assert_close(disabled, mlp()(X8), rtol=0, atol=TOL32)
    torch.testing.assert_close(after, unmerged, rtol=0, atol=TOL32)


def test_disable_adapter_restores_on_exception():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    with pytest.raises(RuntimeError, match="boom"), m.disable_adapter():
        raise RuntimeError("boom")
    assert not m.model[0].disable_adapters


# ------------------------------------------------------------------ modules_to_save
def test_modules_to_save_per_adapter_copies_switch_with_set_adapter():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    m.add_adapter("b", LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        m.model.head.modules_to_save["b"][0].weight.add_(1.0)
        ya = m(X8)
        m.set_adapter("b")
        yb = m(X8)
        trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad and ".head." in n)
        m.set_adapter("default")
        torch.testing.assert_close(m(X8), ya, rtol=0, atol=0)
    assert not torch.allclose(ya, yb)
    assert trainable and all(".modules_to_save.b." in n for n in trainable)


def test_modules_to_save_on_second_adapter_only():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"]))
    m.add_adapter("b", LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        m.model.head.modules_to_save["b"][0].weight.add_(1.0)
        torch.testing.assert_close(m(X8), net()(X8), rtol=0, atol=0)  # default: original head, ΔW = 0
        m.set_adapter("b")
        assert not torch.allclose(m(X8), net()(X8))


@pytest.mark.parametrize("impl", ["lohakit", "peft"])
def test_two_active_adapters_with_their_own_modules_to_save_copy_refused(impl: str):
    """Only one copy of a module can run: PEFT raises, lohakit too (and leaves the model as it was)."""
    lib = {"lohakit": (get_peft_model, LoHaConfig), "peft": (peft.get_peft_model, peft.LoHaConfig)}[impl]
    m = lib[0](net(), lib[1](target_modules=["body"], modules_to_save=["head"]))
    m.add_adapter("b", lib[1](target_modules=["body"], modules_to_save=["head"]))
    snap = snapshot(m)
    target = m if impl == "lohakit" else m.base_model
    with pytest.raises(ValueError):
        target.set_adapter(["default", "b"])
    if impl == "lohakit":
        assert_unchanged(m, snap)
        assert m.active_adapters == ["default"]


def test_delete_adapter_removes_its_modules_to_save_copy():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    m.add_adapter("b", LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    m.set_adapter("b")
    m.delete_adapter("b")
    assert m.active_adapters == ["default"] and list(m.model.head.modules_to_save) == ["default"]
    assert m.model.head.active_module() is m.model.head.modules_to_save["default"]


@pytest.mark.parametrize("targets", [["body", "0"], r"body|head\.0"], ids=["list", "regex"])
def test_targets_inside_modules_to_save_are_skipped_like_peft(targets):
    ours = get_peft_model(net(), LoHaConfig(target_modules=targets, modules_to_save=["head"]))
    theirs = peft.get_peft_model(net(), peft.LoHaConfig(target_modules=targets, modules_to_save=["head"]))
    assert our_targets(ours) == ["body"] == [t for t in peft_targets(theirs) if t]
    assert isinstance(ours.model.head, ModulesToSaveWrapper)


def test_modules_to_save_over_an_adapted_module_is_refused():
    """A LoHa layer of adapter A cannot become adapter B's full copy (PEFT raises a TypeError)."""
    m = get_peft_model(net(), LoHaConfig(target_modules=["body", "head.0"], init_weights=False))
    snap = snapshot(m)
    for mts in (["head"], ["head.0"]):  # containing a LoHa layer, or being one
        with pytest.raises(ValueError, match=r"modules_to_save entry .*LoHa layer \('head\.0'\)"):
            m.add_adapter("b", LoHaConfig(target_modules=["body"], modules_to_save=mts))
        assert_unchanged(m, snap)
        assert list(m.peft_config) == ["default"]


# ------------------------------------------------------------------ introspection, names
def test_print_trainable_parameters_matches_peft(capsys):
    get_peft_model(mlp(), LoHaConfig(target_modules=["0"], r=2)).print_trainable_parameters()
    ours = capsys.readouterr().out
    theirs_model = peft.get_peft_model(mlp(), peft.LoHaConfig(target_modules=["0"], r=2))
    theirs_model.print_trainable_parameters()
    assert ours == capsys.readouterr().out == "trainable params: 96 || all params: 308 || trainable%: 31.1688\n"


@pytest.mark.parametrize(
    "name,ok",
    [("default", True), ("ok-1_x", True), ("A", True), ("", False), ("a.b", False), ("a/b", False),
     ("..", False), ("a b", False), ("a\n", False), ("ü", False), (3, False), (None, False)],
)
def test_adapter_name_validation(name, ok: bool):
    base = mlp()
    snap = snapshot(base)
    if ok:
        assert get_peft_model(base, LoHaConfig(target_modules=["0"]), adapter_name=name).active_adapters == [name]
        return
    with pytest.raises(ValueError, match="invalid adapter name"):
        get_peft_model(base, LoHaConfig(target_modules=["0"]), adapter_name=name)
    assert_unchanged(base, snap)


# ------------------------------------------------------------------ target resolution vs PEFT
def test_all_linear_on_a_plain_model_adapts_every_linear_like_peft():
    ours = get_peft_model(net(), LoHaConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(net(), peft.LoHaConfig(target_modules="all-linear"))
    assert our_targets(ours) == ["body", "head.0", "head.2"] == [t for t in peft_targets(theirs) if t]


class MoE(nn.Module):
    """``model.layers.<i>.experts.<j>.w1``: a layer index and a nested expert index."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"layers": nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(4, 4)}) for _ in range(3))})
            for _ in range(3)
        )})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model["layers"]:
            for e in layer["experts"]:
                x = e["w1"](x)
        return x


@pytest.mark.parametrize("pattern", [None, "layers", ["blocks", "layers"]])
def test_layers_to_transform_takes_the_first_index_like_peft(pattern):
    kw = dict(target_modules=["w1"], layers_to_transform=[1], layers_pattern=pattern)
    ours = get_peft_model(seeded(MoE), LoHaConfig(**kw))
    theirs = peft.get_peft_model(seeded(MoE), peft.LoHaConfig(**kw))
    assert our_targets(ours) == [t for t in peft_targets(theirs) if t]
    assert our_targets(ours) == [f"model.layers.1.experts.{j}.w1" for j in range(3)]


@pytest.mark.parametrize(
    "key,pattern,expected",
    [("model.layers.1.experts.0.w1", None, 1), ("model.layers.1.experts.0.w1", "experts", 0),
     ("layers.2.mlp", None, None), ("layers.2.mlp", "layers", 2), ("h.3.attn.c_attn", "h", 3),
     ("encoder.block.0.layer.1.DenseReluDense.wi", None, 0)],
)
def test_layer_index_table(key, pattern, expected):
    assert layer_index(key, pattern) == expected


def test_exact_paths_ignore_layers_to_transform_like_peft():
    """PEFT adapts a module named by its full path whatever layers_to_transform says."""
    cfg = LoHaConfig(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    assert matches_target(cfg, "model.layers.0.self_attn.q_proj")
    assert not matches_target(cfg, "model.layers.0.self_attn.v_proj")
    assert matches_target(cfg, "model.layers.1.self_attn.v_proj")


def test_peft_all_linear_with_layers_to_transform_file_loads(tmp_path):
    """PEFT saves "all-linear" expanded to full paths (and ignores layers_to_transform for them)."""
    theirs = peft.get_peft_model(seeded(llama), peft.LoHaConfig(target_modules="all-linear", layers_to_transform=[1],
                                                                init_weights=False))
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"][0].startswith("model.layers.")
    ours = LoHaModel.from_pretrained(seeded(llama), str(tmp_path))
    assert len(our_targets(ours)) == 14
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=TOL32)


def test_rank_pattern_with_regex_anchors_like_peft():
    from transformers import BartConfig, BartModel

    base = seeded(lambda: BartModel(BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
    )))
    pats = {r"^decoder.layers.0.encoder_attn.k_proj": 2, r"decoder\.layers\.\d\.self_attn\.k_proj": 3}
    kw = dict(target_modules=["k_proj"], r=4, rank_pattern=pats, alpha_pattern={r"^encoder\..*": 2.0})
    ours = get_peft_model(copy.deepcopy(base), LoHaConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kw))
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in theirs.named_modules()
                   if type(mod).__module__.startswith("peft.tuners.loha.layer") and hasattr(mod, "r")}
    ours_rs = {n: (layer.r["default"], layer.scaling["default"]) for n, layer in ours.loha_layers()}
    theirs_rs = {n: (mod.r["default"], mod.scaling["default"]) for n, mod in peft_layers.items()}
    assert ours_rs == theirs_rs
    assert ours_rs["decoder.layers.0.encoder_attn.k_proj"][0] == 2
    assert ours_rs["decoder.layers.1.self_attn.k_proj"][0] == 3
    assert ours_rs["encoder.layers.0.self_attn.k_proj"] == (4, 0.5)


# ------------------------------------------------------------------ config
def test_config_from_peft_dicts_with_enums():
    for data in (peft.LoHaConfig(r=4, target_modules=["q"], task_type="CAUSAL_LM").to_dict(),
                 dataclasses.asdict(peft.LoHaConfig(r=4, target_modules=["q"]))):
        cfg = LoHaConfig.from_dict(data)
        assert cfg.peft_type == "LOHA" and cfg.r == 4 and cfg.target_modules == ["q"]
        assert cfg.task_type in (None, "CAUSAL_LM") and type(cfg.task_type) in (type(None), str)
        json.dumps(cfg.to_dict())


def test_config_accepts_sets_and_tuples():
    cfg = LoHaConfig.from_dict({"target_modules": {"v", "q"}, "exclude_modules": {"x"}, "modules_to_save": ("h",),
                                "layers_to_transform": (0, 1), "layers_pattern": ("layers", "h")})
    assert cfg.target_modules == ["q", "v"] and cfg.exclude_modules == ["x"] and cfg.modules_to_save == ["h"]
    assert cfg.layers_to_transform == [0, 1] and cfg.layers_pattern == ["layers", "h"]
    again = LoHaConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg


# ------------------------------------------------------------------ init and dropout
def test_lycoris_init_for_tucker_conv():
    m = get_peft_model(nn.Sequential(seeded(lambda: nn.Conv2d(3, 8, 3, padding=1))),
                       LoHaConfig(target_modules=["0"], init_weights="lycoris", use_effective_conv2d=True))
    layer = m.model[0]
    f = {k: getattr(layer, k)["default"].detach() for k in LoHaLayer.adapter_layer_names}
    assert f["hada_t1"].shape == f["hada_t2"].shape == (8, 8, 3, 3)
    assert torch.count_nonzero(f["hada_w2_a"]) == 0
    for k in ("hada_w1_a", "hada_w1_b", "hada_w2_b", "hada_t1", "hada_t2"):
        assert torch.count_nonzero(f[k]) == f[k].numel(), k
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    for k in ("hada_t1", "hada_t2"):  # LyCORIS: cores ~ N(0, 0.1) (576 samples each)
        assert 0.07 < f[k].std().item() < 0.13, k
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), layer.base_layer(x), rtol=0, atol=0)


def test_rank_dropout_without_rescale_is_the_raw_mask():
    m = get_peft_model(nn.Sequential(seeded(lambda: nn.Linear(8, 12))),
                       LoHaConfig(target_modules=["0"], init_weights=False, rank_dropout=0.5, rank_dropout_scale=False))
    m.train()
    layer = m.model[0]
    for path in ("factored", "materialised"):
        m.set_compute_path(path)
        torch.manual_seed(3)
        y = layer(X8)
        torch.manual_seed(3)
        keep = (torch.rand(12) > 0.5).float()
        assert 0 < keep.mean() < 1
        with torch.no_grad():
            ref = layer.base_layer(X8) + X8 @ (layer.get_delta_weight("default") * keep[:, None]).T
        torch.testing.assert_close(y, ref, rtol=0, atol=TOL32)


RANK_DROPOUT_BASES = {
    "linear": (lambda: nn.Linear(8, 12), (2, 3, 8)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), (2, 3, 7)),
}


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("kind", list(RANK_DROPOUT_BASES))
def test_rank_dropout_equals_peft_with_the_same_rng(kind: str, effective: bool):
    """Same RNG stream: PEFT draws torch.rand(1) for module dropout on every training call, so a
    tiny module_dropout makes lohakit draw it too; then both draw the (out,) rank mask."""
    make, shape = RANK_DROPOUT_BASES[kind]
    ours, theirs = twins(nn.Sequential(seeded(make)), target_modules=["0"], init_weights=False, r=3, alpha=5.0,
                         rank_dropout=0.5, module_dropout=1e-9, use_effective_conv2d=effective)
    ours.train()
    theirs.train()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for path in ("factored", "materialised"):
        ours.set_compute_path(path)
        for seed in range(3):
            torch.manual_seed(seed)
            a = ours(x)
            torch.manual_seed(seed)
            b = theirs(x)
            torch.testing.assert_close(a, b, rtol=0, atol=TOL32)


def test_rank_dropout_on_hf_conv1d_paths_agree():
    from transformers.pytorch_utils import Conv1D

    m = get_peft_model(nn.Sequential(seeded(lambda: Conv1D(12, 8))),
                       LoHaConfig(target_modules=["0"], init_weights=False, rank_dropout=0.5))
    m.train()
    x = torch.randn(2, 3, 8)
    outs = []
    for path in ("factored", "materialised"):
        m.set_compute_path(path)
        torch.manual_seed(5)
        outs.append(m(x))
    layer = m.model[0]
    torch.manual_seed(5)
    keep = (torch.rand(12) > 0.5).float()
    keep = keep / keep.mean()
    with torch.no_grad():
        ref = layer.base_layer(x) + x @ (layer.get_delta_weight("default") * keep[None, :])  # (in, out) weight
    for y in outs:
        torch.testing.assert_close(y, ref, rtol=0, atol=TOL32)


def test_every_row_dropped_gives_base_output_and_finite_grads():
    m = get_peft_model(nn.Sequential(seeded(lambda: nn.Linear(8, 12))),
                       LoHaConfig(target_modules=["0"], init_weights=False, rank_dropout=0.999999))
    m.train()
    for path in ("factored", "materialised"):
        m.set_compute_path(path)
        y = m(X8)
        y.sum().backward()
        torch.testing.assert_close(y, m.model[0].base_layer(X8), rtol=0, atol=0)
        assert all(torch.isfinite(p.grad).all() for n, p in m.named_parameters() if ".hada_" in n)


def test_module_dropout_near_one_skips_in_training_only():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False, module_dropout=0.999))
    base = mlp()
    m.train()
    with torch.no_grad():
        skipped = sum(torch.equal(m(X8), base(X8)) for _ in range(20))
        m.eval()
        applied = not torch.allclose(m(X8), base(X8))
    assert skipped >= 19 and applied


# ------------------------------------------------------------------ meta device (low_cpu_mem_usage)
def test_forward_or_merge_with_meta_factors_is_a_clear_error():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0", "2"]), low_cpu_mem_usage=True)
    snap_w = m.model[0].base_layer.weight.detach().clone()
    for ctx in (contextlib.nullcontext, torch.no_grad):
        with ctx(), pytest.raises(RuntimeError, match=r"^0: adapter 'default' has no values yet.*meta device.*load"):
            m(X8)
    with pytest.raises(RuntimeError, match="meta device"):
        m.merge_adapter()
    assert not any(layer.merged for _, layer in m.loha_layers())
    assert torch.equal(m.model[0].base_layer.weight, snap_w)


def test_all_meta_model_still_traces_shapes():
    with torch.device("meta"):
        base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    m = get_peft_model(base, LoHaConfig(target_modules=["0", "2"]), low_cpu_mem_usage=True)
    y = m(torch.empty(2, 8, device="meta"))
    assert y.is_meta and y.shape == (2, 4)


# ------------------------------------------------------------------ copies, state, modes
def test_state_dict_round_trip():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0", "2"], init_weights=False))
    m2 = get_peft_model(mlp(), LoHaConfig(target_modules=["0", "2"]))
    res = m2.load_state_dict(m.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(m2(X8), m(X8), rtol=0, atol=0)


def test_deepcopy_is_independent():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"], init_weights=False)).eval()
    with torch.no_grad():
        y = m(X8)  # fills the inference cache, which the copy must not share
        m2 = copy.deepcopy(m)
        torch.testing.assert_close(m2(X8), y, rtol=0, atol=0)
        m2.model.body.hada_w1_a["default"].add_(1.0)
        m2.merge_adapter()
        torch.testing.assert_close(m(X8), y, rtol=0, atol=0)
        assert not torch.allclose(m2(X8), y)
    assert not m.model.body.merged and m2.model.body.merged


def test_torch_save_load_of_the_whole_model_in_memory():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"], init_weights=False))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)  # our own in-memory object, not an untrusted file
    with torch.no_grad():
        torch.testing.assert_close(m2(X8), m(X8), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("path", ["auto", "factored", "materialised"])
def test_no_grad_and_inference_mode_equal_grad_mode(path: str, mode: str):
    base = seeded(lambda: nn.Sequential(nn.Linear(8, 16), nn.Conv1d(3, 3, 3, padding=1)))
    m = get_peft_model(base, LoHaConfig(target_modules=["0", "1"], init_weights=False, use_effective_conv2d=True))
    m.set_compute_path(path)
    getattr(m, mode)()
    x = torch.randn(2, 3, 8)
    a = m(x)
    with torch.no_grad():
        b = m(x)
        b2 = m(x)  # second call: from the inference cache in eval mode
    with torch.inference_mode():
        c = m(x)
    for y in (b, b2, c):
        torch.testing.assert_close(y, a.detach(), rtol=0, atol=TOL32)


def test_double_wrap_is_refused():
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    with pytest.raises(TypeError, match="already a LoHaModel.*add_adapter"):
        get_peft_model(m, LoHaConfig(target_modules=["2"]))


def test_adapter_name_already_on_layers_of_another_loha_model():
    """Wrapping the raw model again must not overwrite the first LoHaModel's trained factors."""
    base = mlp()
    first = get_peft_model(base, LoHaConfig(target_modules=["0"], init_weights=False))
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"module '0' already holds an adapter named 'default'"):
        get_peft_model(base, LoHaConfig(target_modules=["0", "2"]))
    assert_unchanged(base, snap)
    second = get_peft_model(base, LoHaConfig(target_modules=["2"]), adapter_name="other")
    assert first.model[0].adapter_names == ["default"] and second.model[2].adapter_names == ["other"]


# ------------------------------------------------------------------ inference cache and hooks
@pytest.mark.parametrize("style", ["mode_switch", "eval_mode", "between_backward_and_step"])
def test_inference_cache_follows_fused_optimizer_steps(style: str):
    """Fused AdamW (the HF Trainer default with recent torch) does not bump version counters."""
    m = get_peft_model(nn.Sequential(seeded(lambda: nn.Linear(32, 32))),
                       LoHaConfig(target_modules=["0"], init_weights=False, r=2))
    layer = m.model[0]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(4, 32)

    def check() -> None:
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
            torch.testing.assert_close(m(x), expected, rtol=0, atol=TOL32)

    m.eval()
    check()  # fills the cache
    for _ in range(2):
        if style == "mode_switch":
            m.train()
        m(x).pow(2).sum().backward()
        if style == "between_backward_and_step":
            with torch.no_grad():
                m(x)
        opt.step()
        opt.zero_grad()
        m.eval()
        check()


def test_global_forward_hook_sees_the_unmodified_base_output():
    m = get_peft_model(nn.Sequential(seeded(lambda: nn.Linear(8, 8))),
                       LoHaConfig(target_modules=["0"], init_weights=False)).eval()
    seen = {}

    def hook(module, args, out):
        if type(module) is nn.Linear:
            seen["base"] = out

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            m(X8)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen["base"], m.model[0].base_layer(X8), rtol=0, atol=0)


# ------------------------------------------------------------------ unusual inputs
@pytest.mark.parametrize("path", ["factored", "materialised"])
def test_unusual_input_layouts(path: str):
    base = seeded(lambda: nn.ModuleDict({"lin": nn.Linear(8, 16), "conv": nn.Conv2d(4, 6, 3, padding=1),
                                         "c1": nn.Conv1d(16, 16, 3, padding=1)}))
    m = get_peft_model(base, LoHaConfig(target_modules=["lin", "conv", "c1"], init_weights=False,
                                        use_effective_conv2d=True))
    m.set_compute_path(path)
    lin, conv, c1 = m.model["lin"], m.model["conv"], m.model["c1"]
    cases = [
        (lin, torch.randn(8, requires_grad=True), lambda t: t @ lin.get_delta_weight("default").T),  # 1-D
        (lin, torch.randn(8, 5, 2).permute(2, 1, 0), lambda t: t @ lin.get_delta_weight("default").T),  # strided
        (conv, torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last),
         lambda t: nn.functional.conv2d(t, conv.get_delta_weight("default"), padding=1)),
        (c1, torch.randn(16, 7, requires_grad=True),  # unbatched conv
         lambda t: nn.functional.conv1d(t, c1.get_delta_weight("default"), padding=1)),
    ]
    for layer, x, delta in cases:
        y = layer(x)
        y.sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(y, layer.base_layer(x) + delta(x), rtol=0, atol=TOL32)


# ------------------------------------------------------------------ merging several adapters
def test_safe_merge_checks_the_sum_of_adapters():
    """Each adapter alone stays finite in fp16, their sum overflows: nothing may be merged.

    (PEFT 0.21 raises too, but leaves the first adapter merged.)
    """
    base = nn.Sequential(nn.Linear(2, 2)).half()
    with torch.no_grad():
        base[0].weight.fill_(60000.0)
    m = get_peft_model(base, LoHaConfig(target_modules=["0"], init_weights=False, r=1))
    m.add_adapter("b", LoHaConfig(target_modules=["0"], init_weights=False, r=1))
    layer = m.model[0]
    with torch.no_grad():
        for n in ("default", "b"):  # ΔW = 8 · 1 · 500 = 4000 per adapter
            for f, v in (("hada_w1_a", 1.0), ("hada_w1_b", 1.0), ("hada_w2_a", 1.0), ("hada_w2_b", 500.0)):
                getattr(layer, f)[n].fill_(v)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="adapter 'b' gives non-finite weights; nothing merged"):
        m.merge_adapter(adapter_names=["default", "b"], safe_merge=True)
    assert_unchanged(m, snap)
    assert layer.merged_adapters == []
    m.merge_adapter(adapter_names=["default"], safe_merge=True)
    assert layer.merged_adapters == ["default"] and torch.isfinite(layer.base_layer.weight).all()


def test_repeated_adapter_names_apply_once():
    """PEFT applies a repeated active adapter twice; lohakit de-duplicates the names."""
    m = get_peft_model(mlp(), LoHaConfig(target_modules=["0"], init_weights=False))
    with torch.no_grad():
        once = m(X8)
        m.set_adapter(["default", "default"])
        assert m.active_adapters == ["default"]
        torch.testing.assert_close(m(X8), once, rtol=0, atol=0)
        w = m.model[0].base_layer.weight.clone()
        m.merge_adapter(["default", "default"])
        assert m.model[0].merged_adapters == ["default"]
        torch.testing.assert_close(m.model[0].base_layer.weight, w + m.get_delta_weight("0"), rtol=0, atol=1e-6)


def test_unused_rank_or_alpha_pattern_keys_warn_like_peft():
    with pytest.warns(RuntimeWarning, match=r"rank_pattern key\(s\) \['q_proj'\] matched no adapted module"):
        get_peft_model(mlp(), LoHaConfig(target_modules=["0"], rank_pattern={"q_proj": 2, "0": 3}))
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern key\(s\) \['\^2'\]"):
        get_peft_model(mlp(), LoHaConfig(target_modules=["0"], alpha_pattern={"^2": 2.0}))


# ------------------------------------------------------------------ defaults and all-linear on transformers models
def test_default_targets_cover_peft_loha_mapping():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from lohakit.core.targets import DEFAULT_TARGET_MODULES

    def norm(v):
        return v if isinstance(v, str) else sorted(v)

    for model_type, targets in PEFT_DEFAULTS.items():
        assert model_type in DEFAULT_TARGET_MODULES, model_type
        assert norm(DEFAULT_TARGET_MODULES[model_type]) == norm(targets), model_type


def test_regex_default_targets_stay_a_regex():
    class Cfg:
        model_type = "gemma4"

    base = nn.ModuleDict({"language_model": nn.ModuleDict({"layers": nn.ModuleList(
        [nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4)})])})})
    base.config = Cfg()
    m = get_peft_model(base, LoHaConfig())
    assert our_targets(m) == ["language_model.layers.0.q_proj"]
    assert m.peft_config["default"].target_modules == r".*language_model\..*\.(q_proj|v_proj)"


def _bert_mlm() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32))


def _t5_small() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, decoder_start_token_id=0))


@pytest.mark.parametrize("build", [llama, _bert_mlm, _t5_small], ids=["llama", "bert_mlm", "t5"])
def test_all_linear_on_transformers_models_equals_peft(build):
    ours = get_peft_model(seeded(build), LoHaConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(seeded(build), peft.LoHaConfig(target_modules="all-linear"))
    assert our_targets(ours) == [t for t in peft_targets(theirs) if t]
    assert not any(t.endswith(("lm_head", "predictions.decoder")) for t in our_targets(ours))


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("kernel,dilation", [(4, 1), (3, 2), (2, 3)])
def test_same_padding_with_reflect_mode_merged_equals_unmerged(kernel: int, dilation: int, effective: bool):
    """'same' with an asymmetric total pad and a non-zero padding mode: every path matches the merge."""
    base = seeded(lambda: nn.Sequential(nn.Conv2d(3, 5, kernel, padding="same", dilation=dilation, padding_mode="reflect")))
    m = get_peft_model(base, LoHaConfig(target_modules=["0"], init_weights=False, r=2, use_effective_conv2d=effective))
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    outs = []
    for path in ("factored", "materialised"):
        m.set_compute_path(path)
        outs.append(m(x).detach())
        with torch.no_grad():
            outs.append(m(x))
    with torch.no_grad():
        m.merge_adapter()
        merged = m(x)
    for y in outs:
        torch.testing.assert_close(y, merged, rtol=0, atol=TOL32)


def test_unload_restores_the_original_modules_to_save_merge_and_unload_keeps_the_copy():
    """Deliberate difference: PEFT 0.21's unload() keeps the trained copy of a modules_to_save module;
    lohakit's unload() gives back the base model exactly as it was (merge_and_unload keeps the copy)."""
    def adapted():
        m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
        with torch.no_grad():
            m.model.head.modules_to_save["default"][0].weight.add_(1.0)
        return m

    original = net().head[0].weight
    assert torch.equal(adapted().unload().head[0].weight, original)
    assert torch.equal(adapted().merge_and_unload().head[0].weight, original + 1.0)


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("targets", ["all-linear", ["out_proj", "fc"], r".*(out_proj|fc)"], ids=["all", "list", "regex"])
def test_multihead_attention_out_proj_is_skipped_with_a_warning(targets):
    """nn.MultiheadAttention never calls out_proj: PEFT's LoHa wraps it anyway, and then its
    adapter is ignored in training but applied when merged (merged != unmerged)."""
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match=r"not adapting \['attn.out_proj'\]: nn.MultiheadAttention"):
        m = get_peft_model(seeded(WithMHA), LoHaConfig(target_modules=targets, init_weights=False))
    assert our_targets(m) == ["fc"]
    with torch.no_grad():
        unmerged = m(x)
        m.merge_adapter()
        torch.testing.assert_close(m(x), unmerged, rtol=0, atol=TOL32)
    with pytest.warns(UserWarning, match="MultiheadAttention"), pytest.raises(ValueError, match="matched no module"):
        get_peft_model(seeded(WithMHA), LoHaConfig(target_modules=["out_proj"]))


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_double_backward_gradient_penalty_equals_plain_formula(kind: str, effective: bool):
    """d/dθ ‖∂L/∂x‖² (a gradient penalty) through the custom autograd paths, float64 to 1e-12."""
    base = seeded(lambda: nn.Sequential(nn.Linear(4, 3) if kind == "linear" else nn.Conv2d(2, 3, 3, padding=1)))
    m = get_peft_model(base, LoHaConfig(target_modules=["0"], init_weights=False, r=2, use_effective_conv2d=effective))
    m.double()
    layer = m.model[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*((2, 4) if kind == "linear" else (1, 2, 4, 4)), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(layer.base_layer(x).shape, generator=g, dtype=torch.float64)
    grads = {}
    for path in ("factored", "materialised", "reference"):
        for p in m.parameters():
            p.grad = None
        if path == "reference":
            dw = layer.get_delta_weight("default")
            delta = x @ dw.T if kind == "linear" else nn.functional.conv2d(x, dw, padding=1)
            out = layer.base_layer(x) + delta
        else:
            m.set_compute_path(path)
            out = layer(x)
        (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        (gx ** 2).sum().backward()
        grads[path] = [layer.factors("default")[i].grad.clone() for i in range(4)]
    for path in ("factored", "materialised"):
        for a, b in zip(grads[path], grads["reference"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_modules_to_save_wrapper_attributes_follow_the_running_module_like_peft():
    m = get_peft_model(net(), LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    m.add_adapter("b", LoHaConfig(target_modules=["body"], modules_to_save=["head"]))
    w = m.model.head
    assert getattr(w, "0") is w.modules_to_save["default"][0]
    m.set_adapter("b")
    assert getattr(w, "0") is w.modules_to_save["b"][0]
    with m.disable_adapter():
        assert getattr(w, "0") is w.original_module[0]


@pytest.mark.parametrize("path", ["factored", "materialised"])
def test_flat_and_tucker_adapters_of_different_rank_on_one_conv_equal_peft(path: str):
    base = nn.Sequential(seeded(lambda: nn.Conv2d(3, 6, 3, padding=1)))
    ours, theirs = twins(base, target_modules=["0"], init_weights=False, r=2)
    ours.add_adapter("t", LoHaConfig(target_modules=["0"], init_weights=False, r=3, alpha=5, use_effective_conv2d=True))
    theirs.add_adapter("t", peft.LoHaConfig(target_modules=["0"], init_weights=False, r=3, alpha=5, use_effective_conv2d=True))
    with torch.no_grad():
        for f in LoHaLayer.adapter_layer_names:
            getattr(theirs.base_model.model[0], f)["t"].copy_(getattr(ours.model[0], f)["t"])
    ours.set_adapter(["default", "t"])
    theirs.base_model.set_adapter(["default", "t"])
    ours.set_compute_path(path)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), rtol=0, atol=TOL32)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), y, rtol=0, atol=TOL32)


def test_all_linear_ignores_layers_to_transform_like_peft_with_a_warning():
    with pytest.warns(UserWarning, match="layers_to_transform is ignored with target_modules='all-linear'"):
        ours = get_peft_model(seeded(llama), LoHaConfig(target_modules="all-linear", layers_to_transform=[1]))
    theirs = peft.get_peft_model(seeded(llama), peft.LoHaConfig(target_modules="all-linear", layers_to_transform=[1]))
    assert our_targets(ours) == [t for t in peft_targets(theirs) if t] and len(our_targets(ours)) == 14


class Aliased(nn.Module):
    """One Linear registered under two names (PEFT, like lohakit, adapts only the first name)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_module_registered_under_two_names_warns():
    with pytest.warns(UserWarning, match=r"modules \['a'\] are registered under more than one name"):
        m = get_peft_model(seeded(Aliased), LoHaConfig(target_modules=["a", "b", "c"]))
    assert our_targets(m) == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(seeded(Aliased), LoHaConfig(target_modules=["c"]))


def test_trainable_counts_with_modules_to_save_equal_peft():
    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    ours = get_peft_model(Small(), LoHaConfig(target_modules=["body"], modules_to_save=["head"], r=2))
    theirs = peft.get_peft_model(Small(), peft.LoHaConfig(target_modules=["body"], modules_to_save=["head"], r=2))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (42, 72)
    ours.add_adapter("b", LoHaConfig(target_modules=["body"], r=2))
    theirs.add_adapter("b", peft.LoHaConfig(target_modules=["body"], r=2))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (42, 104)
