"""Independent review of the 2026-11-30 performance paths (P built transposed with the scale
folded into w1a, FactoredConvFused, the trimmed LoHaLayer.forward / factors()).

Every check compares against the plain formula ΔW = S·(w1a@w1b)⊙(w2a@w2b), reshaped to the
base weight and applied with F.linear / F.convNd on independent leaf copies of the factors.
float64 where the math is the same (1e-10); 16-bit inputs against the float64 formula with a
relative-norm bound. Each test that targets a fused node first asserts the node was taken,
so a silent fallback to the general path cannot make it pass. No timing is asserted.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lohakit import LoHaConfig, LoHaModel
from lohakit.core import functional as Fn

D = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-10)
FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _wrap(base: nn.Module, dtype: torch.dtype = D, adapters: tuple[str, ...] = ("default",), **cfg) -> LoHaModel:
    """LoHa on module "0" of a one-layer Sequential, random factors, factored path forced."""
    torch.manual_seed(0)
    kw = dict(r=3, alpha=5, target_modules=["0"], init_weights=False)
    kw.update(cfg)
    m = LoHaModel(nn.Sequential(base).to(dtype), LoHaConfig(**kw), adapter_name=adapters[0])
    for name in adapters[1:]:
        m.add_adapter(name, LoHaConfig(**kw))
    if dtype == D:
        m.to(D)  # factors float64 too, so the formula is exact; 16-bit bases keep float32 factors
    m.set_compute_path("factored")
    return m


def _leaf_factors(layer: nn.Module, name: str) -> list[torch.Tensor]:
    """Independent leaf copies of the adapter's factors (same requires_grad)."""
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in layer.factors(name)[:4]]


def _formula_delta(layer: nn.Module, f: list[torch.Tensor], name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """S·(w1a@w1b)⊙(w2a@w2b) in the base weight's shape (factor dtype)."""
    w1a, w1b, w2a, w2b = f
    dw = (w1a @ w1b) * (w2a @ w2b) * layer.scaling[name]  # (out, in·K)
    if rows is not None:
        dw = dw * rows.to(dw)[:, None]
    return dw.reshape(layer.geometry.weight_shape)  # (out, in/g, *k)


def _formula_apply(layer: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """x through W + ΔW with the base layer's own parameters (F.linear / F.convNd)."""
    base = layer.base_layer
    if layer.geometry.transposed:  # transformers' Conv1D: y = x W + b, W stored (in, out)
        return x @ (base.weight + dw.T.to(base.weight.dtype)) + base.bias
    w = base.weight + dw.to(base.weight.dtype)
    if isinstance(base, nn.Linear):
        return F.linear(x, w, base.bias)
    d = w.dim() - 2
    return CONV_F[d](x, w, base.bias, base.stride, base.padding, base.dilation, base.groups)


def _node(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__ if y.grad_fn is not None else "None"


def _check_against_formula(layer, x, name="default", rows=None, tol=TOL64, node="FactoredConvFused"):
    """Forward + backward of ``layer`` (one adapter) vs the formula on leaf copies."""
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    f_ref = _leaf_factors(layer, name)
    y = layer(x)
    if node is not None:
        assert node in _node(y), f"expected {node}, got {_node(y)}"
    y_ref = _formula_apply(layer, x_ref, _formula_delta(layer, f_ref, name, rows))
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for p, q in zip(layer.factors(name)[:4], f_ref):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **tol)
        else:
            assert p.grad is None
    return y


# ------------------------------------------------------------------------------------------
# FactoredConvFused through the LAYER path: every ConvNd, stride/dilation, no bias, 1x1
# ------------------------------------------------------------------------------------------
LAYER_CONV_CASES = {  # name: (ndim, conv kwargs, spatial size); out = 5 channels, in = 3
    "conv1d_k5_pad2": (1, dict(kernel_size=5, padding=2), 20),
    "conv1d_strided_nobias": (1, dict(kernel_size=3, stride=2, dilation=2, bias=False), 23),
    "conv2d_strided_dilated_nobias": (2, dict(kernel_size=3, stride=2, padding=1, dilation=2, bias=False), 13),
    "conv2d_rect_kernel": (2, dict(kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)), 9),
    "conv2d_1x1_pointwise_nobias": (2, dict(kernel_size=1, bias=False), 7),
    "conv2d_1x1_stride2": (2, dict(kernel_size=1, stride=2), 9),
    "conv3d_k3": (3, dict(kernel_size=3, padding=1), 5),
    "conv3d_strided_nobias": (3, dict(kernel_size=2, stride=2, bias=False), 6),
}


@pytest.mark.parametrize("case", list(LAYER_CONV_CASES))
def test_layer_conv_fused_matches_formula(case: str) -> None:
    d, kw, size = LAYER_CONV_CASES[case]
    m = _wrap(CONV[d](3, 5, **kw))
    layer = m.model[0]
    x = torch.randn(2, 3, *(size,) * d, dtype=D, requires_grad=True)
    y = _check_against_formula(layer, x)
    assert y.shape == layer.base_layer(x).shape  # output size differs from the input's where strided


def test_layer_conv_fused_channels_last_matches_formula() -> None:
    """channels_last input and weights (model.to(memory_format=...)): views in the fused node
    must not assume contiguity."""
    m = _wrap(nn.Conv2d(4, 5, 3, padding=1, stride=2))
    m.to(memory_format=torch.channels_last)
    layer = m.model[0]
    x = torch.randn(2, 4, 11, 11, dtype=D).to(memory_format=torch.channels_last).requires_grad_()
    _check_against_formula(layer, x)


def test_layer_conv_fused_rank_dropout_train_mode() -> None:
    """Rank dropout (a per-row scale vector) through FactoredConvFused in a LoHaLayer in train
    mode: the same mask (same RNG draw) through the formula; dropped rows get zero w1a/w2a grads."""
    m = _wrap(nn.Conv2d(3, 6, 3, padding=1), rank_dropout=0.5)
    layer = m.model[0].train()
    seed = 11
    torch.manual_seed(seed)
    mask = Fn.rank_dropout_mask(6, 0.5, True)
    assert (mask == 0).any() and (mask > 0).any(), "pick a seed that drops some rows and keeps others"
    x = torch.randn(2, 3, 9, 9, dtype=D, requires_grad=True)
    torch.manual_seed(seed)  # the layer draws the same mask
    _check_against_formula(layer, x, rows=mask)
    dropped = mask == 0
    assert torch.all(layer.hada_w1_a["default"].grad[dropped] == 0)
    assert torch.all(layer.hada_w2_a["default"].grad[dropped] == 0)


def test_layer_linear_fused_rank_dropout_train_mode() -> None:
    m = _wrap(nn.Linear(7, 6), rank_dropout=0.5)
    layer = m.model[0].train()
    torch.manual_seed(11)
    mask = Fn.rank_dropout_mask(6, 0.5, True)
    assert (mask == 0).any() and (mask > 0).any()
    x = torch.randn(4, 3, 7, dtype=D, requires_grad=True)
    torch.manual_seed(11)
    _check_against_formula(layer, x, rows=mask, node="FactoredLinearFused")


@pytest.mark.parametrize(
    "trainable",
    [(), ("hada_w1_a",), ("hada_w1_b", "hada_w2_b"), ("hada_w2_a", "hada_w1_b")],
    ids=["all_frozen", "w1a_only", "b_side_only", "mixed"],
)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_nodes_with_partly_frozen_factors(trainable: tuple[str, ...], kind: str) -> None:
    """x requires grad, only some factors do: the need flags pick exactly the gradients asked for,
    and those match the formula (dL/dx too)."""
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    layer = _wrap(base).model[0]
    for n in FACTOR_NAMES:
        getattr(layer, n)["default"].requires_grad_(n in trainable)
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    _check_against_formula(layer, x, node="FactoredConvFused" if kind == "conv" else "FactoredLinearFused")


@pytest.mark.parametrize("need", [(True, False, False, True), (False, True, True, False), (False, False, False, False)])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "rows"])
def test_factored_conv_fused_function_partial_needs_gradcheck(need: tuple[bool, ...], vector_scale: bool) -> None:
    """The Function alone with x frozen (no dL/dx: the rebuild of W + ΔW is skipped) and any
    subset of factors requiring grad."""
    c_in, c_out, r1, r2, k = 2, 3, 2, 2, 3
    x = torch.randn(2, c_in, 5, 5, dtype=D, requires_grad=not any(need))
    weight = torch.randn(c_out, c_in, k, k, dtype=D)
    shapes = ((c_out, r1), (r1, c_in * k * k), (c_out, r2), (r2, c_in * k * k))
    fs = [torch.randn(s, dtype=D, requires_grad=n) for s, n in zip(shapes, need)]
    scale = torch.rand(c_out, dtype=D) + 0.5 if vector_scale else 0.6
    stage = Fn.Stage(2, (2, 2), (1, 1), (1, 1), 1)

    def f(x, *factors):
        return Fn.FactoredConvFused.apply(x, weight, None, stage, *factors, scale)

    assert torch.autograd.gradcheck(f, (x, *fs))


# ------------------------------------------------------------------------------------------
# 16-bit inputs with float32 factors
# ------------------------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_nodes_16bit_inputs_float32_factors(dtype: torch.dtype, kind: str) -> None:
    """A 16-bit base with float32 factors (LoHaModel keeps factors float32): the fused node runs,
    returns the input dtype, gives float32 contiguous factor grads, and matches the float64
    formula to 16-bit precision."""
    base = nn.Conv2d(8, 6, 3, padding=1) if kind == "conv" else nn.Linear(16, 6)
    layer = _wrap(base, dtype=dtype, rank_dropout=0.0).model[0]
    assert all(p.dtype == torch.float32 for p in layer.factors("default")[:4])
    shape = (2, 8, 10, 10) if kind == "conv" else (5, 16)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert ("FactoredConvFused" if kind == "conv" else "FactoredLinearFused") in _node(y)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    # float64 reference
    x64 = x.detach().double().requires_grad_()
    f64 = [p.detach().double().requires_grad_() for p in layer.factors("default")[:4]]
    base64 = copy.deepcopy(layer).double()
    y64 = _formula_apply(base64, x64, _formula_delta(base64, f64, "default"))
    y64.backward(g.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert _rel_err(y, y64) < tol
    assert _rel_err(x.grad, x64.grad) < tol
    for p, q in zip(layer.factors("default")[:4], f64):
        assert p.grad.dtype == torch.float32 and p.grad.is_contiguous()
        assert _rel_err(p.grad, q.grad) < 4 * tol


# ------------------------------------------------------------------------------------------
# When the fused nodes must NOT be used, and what the layer computes then
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_two_active_adapters_sum_both_deltas_without_fused_node(kind: str) -> None:
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base, adapters=("a", "b"))
    m.set_adapter(["a", "b"])
    layer = m.model[0]
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    fa, fb = _leaf_factors(layer, "a"), _leaf_factors(layer, "b")
    y = layer(x)
    assert "Fused" not in _node(y)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _formula_apply(layer, x_ref, _formula_delta(layer, fa, "a") + _formula_delta(layer, fb, "b"))
    torch.testing.assert_close(y, y_ref, **TOL64)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL64)
    for name, ref in (("a", fa), ("b", fb)):
        for p, q in zip(layer.factors(name)[:4], ref):
            torch.testing.assert_close(p.grad, q.grad, **TOL64)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_disabled_and_merged_layers_skip_fused_node(kind: str) -> None:
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base)
    layer = m.model[0]
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    with m.disable_adapter():
        y = layer(x)
        assert "Fused" not in _node(y)
        torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=0)
    f = _leaf_factors(layer, "default")
    m.merge_adapter()
    y = layer(x)
    assert "Fused" not in _node(y)
    torch.testing.assert_close(y, _formula_apply(layer, x, torch.zeros_like(layer.base_layer.weight)), **TOL64)
    m.unmerge_adapter()
    torch.testing.assert_close(
        y, _formula_apply(layer, x, _formula_delta(layer, f, "default")), rtol=1e-9, atol=1e-9
    )
    # back to the fused node once unmerged
    assert "Fused" in _node(layer(x))


def test_modules_to_save_next_to_fused_conv() -> None:
    """A trainable full copy (modules_to_save) after a LoHa conv: the conv takes the fused node,
    both the factors and the copy get the formula's gradients."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1)).to(D)
    m = LoHaModel(base, LoHaConfig(r=3, alpha=5, target_modules=["0"], modules_to_save=["2"], init_weights=False)).to(D)
    m.set_compute_path("factored")
    layer = m.model[0]
    head = m.model[2].modules_to_save["default"]
    with torch.no_grad():
        head.weight.mul_(-2.0)  # the trained copy differs from the frozen original
    x = torch.randn(2, 3, 8, 8, dtype=D, requires_grad=True)
    h = layer(x)
    assert "FactoredConvFused" in _node(h)
    y = m.model[2](torch.relu(h))
    f = _leaf_factors(layer, "default")
    head_ref = copy.deepcopy(head)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = head_ref(torch.relu(_formula_apply(layer, x_ref, _formula_delta(layer, f, "default"))))
    torch.testing.assert_close(y, y_ref, **TOL64)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(head.weight.grad, head_ref.weight.grad, **TOL64)
    for p, q in zip(layer.factors("default")[:4], f):
        torch.testing.assert_close(p.grad, q.grad, **TOL64)
    assert m.model[2].original_module.weight.grad is None


# ------------------------------------------------------------------------------------------
# factors() reading the ParameterDicts' tables: deletes and replaced Parameters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_factors_after_delete_adapter(kind: str) -> None:
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base, adapters=("a", "b"))
    m.set_adapter("a")
    layer = m.model[0]
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D)
    m.eval()
    with torch.no_grad():
        layer(x)  # fills the eval cache for "a"
    m.delete_adapter("a")
    with pytest.raises(KeyError):
        layer.factors("a")
    assert layer.active_adapters == ["b"]
    assert all(t is getattr(layer, n)["b"] for t, n in zip(layer.factors("b")[:4], FACTOR_NAMES))
    with torch.no_grad():
        y = layer(x)
    fb = _leaf_factors(layer, "b")
    torch.testing.assert_close(y, _formula_apply(layer, x, _formula_delta(layer, fb, "b")), **TOL64)
    m.train()
    layer.hada_w1_a["b"].requires_grad_(True)
    xg = x.clone().requires_grad_()
    _check_against_formula(layer, xg, name="b", node="Fused")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_load_state_dict_assign_replaces_parameters_cache_and_fused_grads(kind: str) -> None:
    """load_state_dict(assign=True) swaps the Parameter objects: factors() must return the new
    ones, the eval cache (keyed on parameter identity) must not serve the old values, and a
    training step's gradients must land on the new Parameters."""
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base)
    layer = m.model[0]
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D)
    m.eval()
    with torch.no_grad():
        before = layer(x)
    assert layer._eval_cache
    old = list(layer.factors("default")[:4])
    sd = {k: (v * -0.5 + 0.1) if "hada_" in k else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    new = list(layer.factors("default")[:4])
    assert all(a is not b for a, b in zip(old, new))
    assert all(t is getattr(layer, n)["default"] for t, n in zip(new, FACTOR_NAMES))
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    f = _leaf_factors(layer, "default")
    torch.testing.assert_close(after, _formula_apply(layer, x, _formula_delta(layer, f, "default")), **TOL64)
    m.train()
    _check_against_formula(layer, x.clone().requires_grad_(), node="Fused")
    assert all(p.grad is None for p in old)


# ------------------------------------------------------------------------------------------
# Eval cache contents after the P layout change: Qᵀ (in, R) and Pᵀ (R, out), both contiguous
# ------------------------------------------------------------------------------------------
def _kr_reference(f: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Q[(i,j),c] = w1b[i,c]·w2b[j,c] (R, n) and P[o,(i,j)] = s·w1a[o,i]·w2a[o,j] (out, R), by loops' formula."""
    w1a, w1b, w2a, w2b = f
    q = torch.einsum("ic,jc->ijc", w1b, w2b).reshape(-1, w1b.shape[1])
    p = torch.einsum("oi,oj->oij", w1a, w2a).reshape(w1a.shape[0], -1) * scale
    return q, p


def test_eval_cache_linear_holds_contiguous_qt_and_pt() -> None:
    m = _wrap(nn.Linear(7, 6))
    layer = m.model[0].eval()
    x = torch.randn(4, 7, dtype=D)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)  # cache hit
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    q_t, p_t = layer._eval_cache["default"][1]["linear"]
    q, p = _kr_reference(_leaf_factors(layer, "default"), layer.scaling["default"])
    assert q_t.shape == (7, 9) and p_t.shape == (9, 6)
    assert q_t.is_contiguous() and p_t.is_contiguous()
    torch.testing.assert_close(q_t, q.T, **TOL64)
    torch.testing.assert_close(p_t, p.T, **TOL64)
    f = _leaf_factors(layer, "default")
    torch.testing.assert_close(y1, _formula_apply(layer, x, _formula_delta(layer, f, "default")), **TOL64)


def test_eval_cache_conv_chain_weights_match_formula() -> None:
    m = _wrap(nn.Conv2d(3, 5, 3, padding=1))
    layer = m.model[0].eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    stages, weights = layer._eval_cache["default"][1]["chain"]
    q, p = _kr_reference(_leaf_factors(layer, "default"), layer.scaling["default"])
    torch.testing.assert_close(weights[0], q.view(9, 3, 3, 3), **TOL64)
    torch.testing.assert_close(weights[1], p.view(5, 9, 1, 1), **TOL64)
    f = _leaf_factors(layer, "default")
    torch.testing.assert_close(y1, _formula_apply(layer, x, _formula_delta(layer, f, "default")), **TOL64)


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_grad_enabled_forward_drops_eval_cache_on_every_path(kind: str, path: str) -> None:
    """The general path drops the eval cache on any grad-enabled call with trainable factors
    (an optimizer that writes without bumping version counters may follow). A call that takes
    a fused node must honour the same contract: after it, a parameter write that bypasses the
    version counter is seen by the next no-grad call. ("general": a forward hook on the base
    layer keeps the fused node out, the control case.)"""
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base)
    layer = m.model[0].eval()
    if path == "general":
        layer.base_layer.register_forward_hook(lambda *a: None)
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D)
    with torch.no_grad():
        layer(x)
    assert layer._eval_cache["default"][1]
    y = layer(x.clone().requires_grad_())  # eval mode, grad enabled (input saliency, eval-mode training)
    assert ("Fused" in _node(y)) == (path == "fused")
    assert not any(entry[1] for entry in layer._eval_cache.values())
    layer.hada_w2_a["default"].data.mul_(3.0)  # no version bump (as a fused optimizer kernel may do)
    with torch.no_grad():
        after = layer(x)
    f = _leaf_factors(layer, "default")
    torch.testing.assert_close(after, _formula_apply(layer, x, _formula_delta(layer, f, "default")), **TOL64)


# ------------------------------------------------------------------------------------------
# Gradient layout
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["FactoredLinear", "FactoredLinearFused", "FactoredConvFused"])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "rows"])
def test_factor_grads_are_contiguous_in_parameter_layout(node: str, vector_scale: bool) -> None:
    """The nodes return factor grads contiguous, in the parameters' strides and dtype, also for
    a non-contiguous upstream grad. Read with torch.autograd.grad: ``.grad`` would hide a bad
    layout (AccumulateGrad copies a grad whose strides differ from the parameter's, one extra
    copy per factor per step)."""
    torch.manual_seed(0)
    out_f, r1, r2 = 6, 2, 3
    conv = node == "FactoredConvFused"
    n = 3 * 9 if conv else 5
    w1a, w2a = (torch.randn(out_f, r, requires_grad=True) for r in (r1, r2))
    w1b, w2b = (torch.randn(r, n, requires_grad=True) for r in (r1, r2))
    scale = torch.rand(out_f) + 0.5 if vector_scale else 0.7
    if conv:
        x = torch.randn(2, 3, 7, 7, requires_grad=True)
        y = Fn.FactoredConvFused.apply(x, torch.randn(out_f, 3, 3, 3), None, Fn.Stage(2, (1, 1), (1, 1), (1, 1), 1),
                                       w1a, w1b, w2a, w2b, scale)
        y = y.permute(0, 2, 3, 1)  # upstream grad arrives non-contiguous
    else:
        x = torch.randn(4, 2, 5, requires_grad=True)
        if node == "FactoredLinear":
            y = Fn.FactoredLinear.apply(x, torch.randn(4, 2, out_f), w1a, w1b, w2a, w2b, scale)
        else:
            y = Fn.FactoredLinearFused.apply(x, torch.randn(out_f, 5), None, w1a, w1b, w2a, w2b, scale)
        y = y.transpose(0, 1)
    params = (w1a, w1b, w2a, w2b)
    grads = torch.autograd.grad(y.pow(2).sum(), (x, *params))
    assert grads[0].shape == x.shape and grads[0].dtype == x.dtype
    for p, g in zip(params, grads[1:]):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert g.is_contiguous() and g.stride() == p.stride(), (tuple(p.shape), g.stride())


# ------------------------------------------------------------------------------------------
# torch.compile on a conv model in training mode
# ------------------------------------------------------------------------------------------
class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv1d(5, 4, 3, stride=2)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).flatten(2)  # (B, 5, H·W)
        h = torch.relu(self.b(h))  # (B, 4, L)
        return self.c(h.transpose(1, 2))  # (B, L, 3)


def test_dynamo_conv_model_training_no_graph_breaks_and_matches_eager_fused() -> None:
    """Training mode with x requiring grad (eager takes FactoredConvFused on both convs): under
    dynamo the fused nodes step aside, the trace has no graph break, and the compiled model's
    output and gradients match eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = LoHaModel(_ConvNet(), LoHaConfig(r=2, alpha=3, target_modules=["a", "b", "c"], init_weights=False))
    m.set_compute_path("factored")
    m.train()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    assert "FactoredConvFused" in _node(m.model.a(x))
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x2 = x.detach().clone().requires_grad_()
    y_c, y_e = compiled(x), eager(x2)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    y_c.pow(2).sum().backward()
    y_e.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(m.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# Layer-path inputs the fused conv node must leave to the general path, or handle as is
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2], ids=["conv1d", "conv2d"])
def test_unbatched_conv_input_in_training_uses_general_path(d: int) -> None:
    layer = _wrap(CONV[d](3, 5, 3, padding=1, stride=2)).model[0].train()
    x = torch.randn(3, *(9,) * d, dtype=D, requires_grad=True)  # (C, *spatial): no batch axis
    assert not Fn.fused_conv_applicable(layer.base_layer, x, layer.factors("default"))
    _check_against_formula(layer, x, node=None)


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_same_string_padding_conv_in_training_uses_general_path() -> None:
    layer = _wrap(nn.Conv1d(3, 5, 4, padding="same")).model[0].train()  # asymmetric 'same'
    x = torch.randn(2, 3, 12, dtype=D, requires_grad=True)
    assert not Fn.fused_conv_applicable(layer.base_layer, x, layer.factors("default"))
    _check_against_formula(layer, x, node=None)


def test_expanded_batch_input_through_fused_conv() -> None:
    """A stride-0 (expanded) batch axis: the fused node's views and dL/dx must cope."""
    layer = _wrap(nn.Conv2d(3, 5, 3, padding=1)).model[0]
    leaf = torch.randn(1, 3, 8, 8, dtype=D, requires_grad=True)
    x = leaf.expand(3, -1, -1, -1)
    leaf_ref = leaf.detach().clone().requires_grad_()
    f = _leaf_factors(layer, "default")
    y = layer(x)
    assert "FactoredConvFused" in _node(y)
    y_ref = _formula_apply(layer, leaf_ref.expand(3, -1, -1, -1), _formula_delta(layer, f, "default"))
    torch.testing.assert_close(y, y_ref, **TOL64)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad, **TOL64)
    for p, q in zip(layer.factors("default")[:4], f):
        torch.testing.assert_close(p.grad, q.grad, **TOL64)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_module_dropout_leaving_one_of_two_adapters_takes_fused_node(kind: str) -> None:
    """Two active adapters, module dropout drops exactly one this call: the survivor alone goes
    through the fused node and matches its formula; the dropped adapter gets no gradient."""
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base, adapters=("a", "b"), module_dropout=0.5)
    m.set_adapter(["a", "b"])
    layer = m.model[0].train()
    seed = next(s for s in range(100) if (lambda g: (g[0] <= 0.5) != (g[1] <= 0.5))(
        torch.rand(2, generator=torch.Generator().manual_seed(s)).tolist()))
    torch.manual_seed(seed)
    draws = torch.rand(2).tolist()  # the layer draws one number per adapter, in order
    kept = "b" if draws[0] <= 0.5 else "a"
    dropped = "a" if kept == "b" else "b"
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    torch.manual_seed(seed)
    _check_against_formula(layer, x, name=kept, node="Fused")
    assert all(p.grad is None for p in layer.factors(dropped)[:4])


# ------------------------------------------------------------------------------------------
# Rank dropout on the general paths (P's rows scaled through linear_qp / factored_stages)
# ------------------------------------------------------------------------------------------
def _mixed_mask_seed(n: int, p: float) -> int:
    """A seed whose rank-dropout draw drops some rows and keeps others."""
    for seed in range(1000):
        torch.manual_seed(seed)
        mask = Fn.rank_dropout_mask(n, p, True)
        if (mask == 0).any() and (mask > 0).any():
            return seed
    raise AssertionError("no seed with a mixed mask")


def _hf_conv1d() -> nn.Module:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    return conv1d(5, 7)  # nf=5 outputs, nx=7 inputs


GENERAL_CASES = {  # name: (base factory, input shape, grad)
    "hf_conv1d_grad": (_hf_conv1d, (4, 7), True),
    "grouped_conv_grad": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6), True),
    "linear_nograd": (lambda: nn.Linear(7, 5), (3, 7), False),
    "conv_nograd": (lambda: nn.Conv2d(3, 5, 3, stride=2), (2, 3, 9, 9), False),
}


@pytest.mark.parametrize("case", list(GENERAL_CASES))
def test_rank_dropout_on_general_paths_matches_formula(case: str) -> None:
    """Training mode, one adapter, factored path, where no fused node applies (transposed
    Conv1D, grouped conv, or no gradient recorded): the mask scales ΔW's output rows."""
    make, shape, grad = GENERAL_CASES[case]
    layer = _wrap(make(), rank_dropout=0.5).model[0].train()
    out = layer.geometry.out_features
    seed = _mixed_mask_seed(out, 0.5)
    torch.manual_seed(seed)
    mask = Fn.rank_dropout_mask(out, 0.5, True)
    x = torch.randn(*shape, dtype=D, requires_grad=grad)
    torch.manual_seed(seed)
    if grad:
        y = _check_against_formula(layer, x, rows=mask, node=None)
        assert "Fused" not in _node(y)
        return
    f = _leaf_factors(layer, "default")
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, _formula_apply(layer, x, _formula_delta(layer, f, "default", mask)), **TOL64)


# ------------------------------------------------------------------------------------------
# Empty batches (nn.ConvNd accepts them: uneven last batches, detection heads with no boxes)
# ------------------------------------------------------------------------------------------
EMPTY_CASES = {  # name: (base factory, LoHaConfig extras)
    "conv3x3": (lambda: nn.Conv2d(3, 5, 3), {}),
    "conv1x1": (lambda: nn.Conv2d(3, 5, 1), {}),
    "conv3x3_tucker": (lambda: nn.Conv2d(3, 5, 3), {"use_effective_conv2d": True}),
    "linear": (lambda: nn.Linear(6, 5), {}),
}


@pytest.mark.parametrize("path", ["factored", "materialised"])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_batch_like_the_base_layer(case: str, path: str) -> None:
    """A batch of zero: the output is the base layer's (empty) output, training gives zero
    factor grads like the plain formula, inference (cached or not) works too."""
    make, extra = EMPTY_CASES[case]
    m = _wrap(make(), **extra)
    m.set_compute_path(path)
    layer = m.model[0]
    shape = (0, 6) if case == "linear" else (0, 3, 8, 8)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    y = layer(x)
    assert y.shape == layer.base_layer(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.factors("default"):
        if p is not None:
            assert p.grad is not None and torch.all(p.grad == 0)
    m.eval()
    with torch.no_grad():
        for _ in range(2):  # fills, then hits the eval cache
            assert layer(x.detach()).shape == y.shape


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_non_contiguous_factors_from_assign_load(kind: str) -> None:
    """load_state_dict(assign=True) with transposed-layout tensors makes the factors themselves
    non-contiguous: the fused nodes and the eval cache must not assume a layout."""
    base = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    m = _wrap(base)
    layer = m.model[0]
    sd = {k: v.T.contiguous().T if "hada_" in k else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    assert not any(p.is_contiguous() for p in layer.factors("default")[:4])
    shape = (2, 3, 8, 8) if kind == "conv" else (3, 6)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    _check_against_formula(layer, x, node="Fused")
    m.eval()
    f = _leaf_factors(layer, "default")
    expected = _formula_apply(layer, x.detach(), _formula_delta(layer, f, "default"))
    with torch.no_grad():
        for _ in range(2):  # fills, then hits the eval cache
            torch.testing.assert_close(layer(x.detach()), expected, **TOL64)
