"""The performance paths: fused linear autograd, no-grad fast path, eval cache, torch.compile.

Exactness is checked in float64: 1e-10 for the same computation, 1e-7 relative / 1e-8 absolute
when the cached and uncached calls may take different paths (the cost model drops the ΔW build
term when ΔW is cached; factored and materialised sum in different orders). Cache hits must
be bit-identical.
No test here asserts a timing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lohakit import LoHaConfig, LoHaModel
from lohakit.core import functional as Fn

D = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL64_PATHS = dict(rtol=1e-7, atol=1e-8)


class Net(nn.Module):
    """Linear → Conv2d (3x3) → Conv2d (1x1) → Linear: every cached kind (linear, chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 4 * 6 * 6)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 5, 1)
        self.out = nn.Linear(5 * 6 * 6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).view(-1, 4, 6, 6)
        h = self.pw(torch.relu(self.conv(h)))
        return self.out(h.flatten(1))


def _model(effective: bool = False, dtype: torch.dtype = D, adapters: tuple[str, ...] = ("default",)) -> LoHaModel:
    torch.manual_seed(0)
    base = Net().to(dtype)
    cfg = LoHaConfig(r=3, alpha=5, target_modules=["inp", "conv", "pw", "out"], init_weights=False,
                     use_effective_conv2d=effective)
    m = LoHaModel(base, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        m.add_adapter(name, cfg)
    return m


def _reference(m: LoHaModel, x: torch.Tensor) -> torch.Tensor:
    """Same model, no cache: train mode under no_grad (dropouts are 0, so train == eval math)."""
    ref = copy.deepcopy(m).train()
    with torch.no_grad():
        return ref(x)


# ------------------------------------------------------------------------------------------
# FactoredLinear: the fused single-node autograd for linear layers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "row_mask"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no_base"])
def test_factored_linear_gradcheck_float64(vector_scale: bool, with_base: bool) -> None:
    out_f, in_f, r1, r2 = 5, 4, 2, 3
    x = torch.randn(2, 3, in_f, dtype=D, requires_grad=True)
    base = torch.randn(2, 3, out_f, dtype=D, requires_grad=True) if with_base else None
    w1a, w2a = (torch.randn(out_f, r, dtype=D, requires_grad=True) for r in (r1, r2))
    w1b, w2b = (torch.randn(r, in_f, dtype=D, requires_grad=True) for r in (r1, r2))
    scale = torch.rand(out_f, dtype=D) + 0.5 if vector_scale else 0.7

    def f(x, base, w1a, w1b, w2a, w2b):
        return Fn.FactoredLinear.apply(x, base, w1a, w1b, w2a, w2b, scale)

    assert torch.autograd.gradcheck(f, (x, base, w1a, w1b, w2a, w2b))


def test_factored_linear_matches_formula_and_skips_unneeded_grads() -> None:
    out_f, in_f, r = 6, 5, 3
    x = torch.randn(4, in_f, dtype=D)  # frozen input: no dx is computed
    base = torch.randn(4, out_f, dtype=D)
    f = [torch.randn(s, dtype=D, requires_grad=True) for s in ((out_f, r), (r, in_f), (out_f, r), (r, in_f))]
    y = Fn.FactoredLinear.apply(x, base, *f, 0.5)
    dw = ((f[0] @ f[1]) * (f[2] @ f[3])) * 0.5
    torch.testing.assert_close(y, base + x @ dw.T, **TOL64)
    y.sum().backward()
    assert all(p.grad is not None for p in f) and x.grad is None


@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "row_mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_factored_linear_fused_gradcheck_float64(vector_scale: bool, bias: bool) -> None:
    out_f, in_f, r1, r2 = 5, 4, 2, 3
    x = torch.randn(2, 3, in_f, dtype=D, requires_grad=True)
    weight = torch.randn(out_f, in_f, dtype=D)
    b = torch.randn(out_f, dtype=D) if bias else None
    w1a, w2a = (torch.randn(out_f, r, dtype=D, requires_grad=True) for r in (r1, r2))
    w1b, w2b = (torch.randn(r, in_f, dtype=D, requires_grad=True) for r in (r1, r2))
    scale = torch.rand(out_f, dtype=D) + 0.5 if vector_scale else 0.7

    def f(x, w1a, w1b, w2a, w2b):
        return Fn.FactoredLinearFused.apply(x, weight, b, w1a, w1b, w2a, w2b, scale)

    assert torch.autograd.gradcheck(f, (x, w1a, w1b, w2a, w2b))
    dw = (w1a @ w1b) * (w2a @ w2b) * (scale[:, None] if vector_scale else scale)
    expected = torch.nn.functional.linear(x, weight + dw, b)
    torch.testing.assert_close(f(x, w1a, w1b, w2a, w2b), expected, **TOL64)


def test_layer_fused_path_matches_general_path() -> None:
    """A forward hook on the base layer disables the fused path: both must agree, grads too."""
    fused, general = _model(), _model()
    for m in (fused, general):  # at these sizes auto would take the merged-weight node instead
        m.set_compute_path("factored")
    general.model.inp.base_layer.register_forward_hook(lambda *a: None)
    general.model.out.base_layer.register_forward_hook(lambda *a: None)
    x = torch.randn(3, 12, dtype=D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    layer = fused.model.inp
    assert Fn.fused_linear_applicable(layer.base_layer, x, layer.factors("default"))
    assert not Fn.fused_linear_applicable(general.model.inp.base_layer, x, layer.factors("default"))
    assert "FactoredLinearFused" in type(layer(x).grad_fn).__name__
    assert "FactoredLinearFused" not in type(general.model.inp(x).grad_fn).__name__
    _assert_same_outputs_and_grads(fused, general, x, x2)


def _assert_same_outputs_and_grads(m1: nn.Module, m2: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> None:
    y1, y2 = m1(x1), m2(x2)
    torch.testing.assert_close(y1, y2, **TOL64)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL64)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL64, msg=n)


# ------------------------------------------------------------------------------------------
# FactoredConvFused: a frozen ConvNd and one adapter, dL/dx through W + ΔW
# ------------------------------------------------------------------------------------------
CONV_CASES = {  # name: (ndim, kernel, stride, padding, dilation)
    "2d_3x3": (2, 3, 1, 1, 1),
    "2d_strided_dilated": (2, 3, 2, 0, 2),
    "1d_k5": (1, 5, 1, 2, 1),
    "3d_3x3x3": (3, 3, 1, 1, 1),
    "2d_1x1": (2, 1, 1, 0, 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "row_mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_factored_conv_fused_gradcheck_and_formula_float64(case: str, vector_scale: bool, bias: bool) -> None:
    d, k, stride, pad, dil = CONV_CASES[case]
    c_in, c_out, r1, r2 = 3, 4, 2, 3
    x = torch.randn(2, c_in, *(6,) * d, dtype=D, requires_grad=True)
    weight = torch.randn(c_out, c_in, *(k,) * d, dtype=D)
    b = torch.randn(c_out, dtype=D) if bias else None
    flat = c_in * k**d
    w1a, w2a = (torch.randn(c_out, r, dtype=D, requires_grad=True) for r in (r1, r2))
    w1b, w2b = (torch.randn(r, flat, dtype=D, requires_grad=True) for r in (r1, r2))
    scale = torch.rand(c_out, dtype=D) + 0.5 if vector_scale else 0.7
    stage = Fn.Stage(d, (stride,) * d, (pad,) * d, (dil,) * d, 1)

    def f(x, w1a, w1b, w2a, w2b):
        return Fn.FactoredConvFused.apply(x, weight, b, stage, w1a, w1b, w2a, w2b, scale)

    assert torch.autograd.gradcheck(f, (x, w1a, w1b, w2a, w2b))
    dw = ((w1a @ w1b) * (w2a @ w2b) * (scale[:, None] if vector_scale else scale)).view(weight.shape)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[d - 1]
    expected = conv(x, weight + dw, b, stride, pad, dil)
    torch.testing.assert_close(f(x, w1a, w1b, w2a, w2b), expected, **TOL64)


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, padding_mode=padding_mode)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def _conv_model(**kw) -> LoHaModel:
    """4 → 6 channels: small enough that the cost model would materialise ΔW, so the factored
    path (which the fused node belongs to) is forced."""
    torch.manual_seed(0)
    base = ConvNet(**kw).to(D)
    m = LoHaModel(base, LoHaConfig(r=3, alpha=5, target_modules=["conv"], init_weights=False)).to(D)
    m.model.conv.compute_path = "factored"
    return m


def test_layer_fused_conv_path_matches_general_path() -> None:
    """Enough pixels for the merged dL/dx to pay: the layer takes FactoredConvFused; a forward
    hook on the base layer disables it. Both must agree, gradients too."""
    fused, general = _conv_model(), _conv_model()
    general.model.conv.base_layer.register_forward_hook(lambda *a: None)
    x = torch.randn(2, 4, 12, 12, dtype=D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    layer = fused.model.conv
    assert Fn.fused_conv_pays(layer.geometry, 2 * 12 * 12, needs_dx=True)
    assert "FactoredConvFused" in type(layer(x).grad_fn).__name__
    assert "FactoredConvFused" not in type(general.model.conv(x2).grad_fn).__name__
    _assert_same_outputs_and_grads(fused, general, x, x2)


@pytest.mark.parametrize("why", ["frozen_input", "few_pixels", "groups", "reflect", "no_grad"])
def test_fused_conv_path_steps_aside(why: str) -> None:
    m = _conv_model(groups=2) if why == "groups" else _conv_model(padding_mode="reflect") if why == "reflect" else _conv_model()
    x = torch.randn(1, 4, 2 if why == "few_pixels" else 12, 3 if why == "few_pixels" else 12, dtype=D,
                    requires_grad=why != "frozen_input")
    if why == "no_grad":
        with torch.no_grad():
            y = m.model.conv(x)
        assert y.grad_fn is None
        return
    y = m.model.conv(x)
    assert "FactoredConvFused" not in type(y.grad_fn).__name__


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_output_positions(case: str) -> None:
    d, k, stride, pad, dil = CONV_CASES[case]
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](3, 5, k, stride=stride, padding=pad, dilation=dil)
    x = torch.randn(2, 3, *(9,) * d)
    geom = Fn.Geometry(5, 3, (k,) * d, (stride,) * d, (pad,) * d, (dil,) * d)
    assert Fn.conv_output_positions(x, geom) == conv(x).numel() // 5


# ------------------------------------------------------------------------------------------
# No-grad fast path
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["factored", "materialised"])
def test_functional_nograd_does_not_touch_base_unless_inplace(path: str) -> None:
    geom = Fn.Geometry(out_features=6, in_features=5)
    f = Fn.HadaFactors(*(torch.randn(s, dtype=D) for s in ((6, 2), (2, 5), (6, 2), (2, 5))))
    x, base = torch.randn(3, 5, dtype=D), torch.randn(3, 6, dtype=D)
    keep = base.clone()
    with torch.no_grad():
        y = Fn.loha_delta_forward(x, base, f, geom, 0.5, path=path)
        torch.testing.assert_close(base, keep, rtol=0, atol=0)
        y2 = Fn.loha_delta_forward(x, base, f, geom, 0.5, path=path, inplace=True)
    torch.testing.assert_close(y2, y, **TOL64)
    assert y2.data_ptr() == base.data_ptr()


def test_forward_hook_on_base_layer_sees_unmodified_base_output() -> None:
    m = _model().eval()
    seen = {}
    m.model.inp.base_layer.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    x = torch.randn(2, 12, dtype=D)
    with torch.no_grad():
        m(x)
        expected = m.model.inp.base_layer(x)
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Eval cache
# ------------------------------------------------------------------------------------------
CACHE_CASES = [
    ("auto-flat", "auto", False),
    ("factored-flat", "factored", False),
    ("materialised-flat", "materialised", False),
    ("factored-effective", "factored", True),
]


@pytest.mark.parametrize("case,path,effective", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_cache_hit_is_identical_and_matches_uncached(case: str, path: str, effective: bool) -> None:
    m = _model(effective)
    m.set_compute_path(path)
    m.eval()
    x = torch.randn(3, 12, dtype=D)
    with torch.no_grad():
        y1 = m(x)
        assert all(layer._eval_cache for _, layer in m.loha_layers())  # filled on the first call
        y2 = m(x)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(y1, _reference(m, x), **TOL64_PATHS)


def test_cache_not_used_in_training_or_when_factors_need_grad() -> None:
    m = _model()
    x = torch.randn(3, 12, dtype=D)
    m.train()
    with torch.no_grad():
        m(x)
    assert not any(layer._eval_cache for _, layer in m.loha_layers())
    m.eval()  # eval mode but grad enabled and factors trainable: gradients must still flow
    m(x).sum().backward()
    layer = m.model.conv
    assert layer.hada_w1_a["default"].grad is not None
    assert not any(entry[1] for entry in layer._eval_cache.values())


def _bump_inplace(m: LoHaModel) -> None:
    with torch.no_grad():
        for _, layer in m.loha_layers():
            layer.hada_w2_b["default"].mul_(1.5)


def _optimizer_step(m: LoHaModel) -> None:
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    m.train()
    m(torch.randn(3, 12, dtype=D)).pow(2).sum().backward()
    opt.step()
    m.eval()


def _scaling_change(m: LoHaModel) -> None:
    for _, layer in m.loha_layers():
        layer.scaling["default"] *= 2


def _replace_parameter(m: LoHaModel) -> None:
    for _, layer in m.loha_layers():
        old = layer.hada_w1_a["default"]
        layer.hada_w1_a["default"] = nn.Parameter(old.detach() * 0.5)


def _load_state_dict(m: LoHaModel) -> None:
    sd = {k: v * 0.75 if "hada_" in k else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


INVALIDATIONS = {
    "inplace_factor_update": _bump_inplace,
    "optimizer_step": _optimizer_step,
    "scaling_change": _scaling_change,
    "parameter_replaced": _replace_parameter,
    "load_state_dict": _load_state_dict,
}


@pytest.mark.parametrize("change", list(INVALIDATIONS), ids=list(INVALIDATIONS))
def test_cache_invalidated_by_parameter_changes(change: str) -> None:
    m = _model().eval()
    x = torch.randn(3, 12, dtype=D)
    with torch.no_grad():
        before = m(x)
    INVALIDATIONS[change](m)
    with torch.no_grad():
        after = m(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _reference(m, x), **TOL64_PATHS)


def test_cache_follows_set_adapter_and_merge() -> None:
    m = _model(adapters=("a", "b")).eval()
    x = torch.randn(3, 12, dtype=D)
    with torch.no_grad():
        ya = m(x)
        m.set_adapter("b")
        yb = m(x)
        assert not torch.allclose(ya, yb)
        torch.testing.assert_close(yb, _reference(m, x), **TOL64_PATHS)
        m.set_adapter("a")
        torch.testing.assert_close(m(x), ya, **TOL64)
        m.merge_adapter()
        assert not any(layer._eval_cache for _, layer in m.loha_layers())
        torch.testing.assert_close(m(x), ya, rtol=1e-9, atol=1e-9)
        m.unmerge_adapter()
        torch.testing.assert_close(m(x), ya, rtol=1e-9, atol=1e-9)


def test_cache_follows_dtype_change() -> None:
    m = _model().eval()
    x = torch.randn(3, 12, dtype=D)
    with torch.no_grad():
        m(x)
        m.to(torch.float32)  # factors and base change dtype (new storage)
        y32 = m(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, _reference(m, x.float()), rtol=1e-5, atol=1e-5)


def test_clear_eval_cache() -> None:
    m = _model().eval()
    with torch.no_grad():
        m(torch.randn(2, 12, dtype=D))
    layer = m.model.inp
    assert layer._eval_cache
    layer.clear_eval_cache()
    assert not layer._eval_cache


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dynamo_traces_layer_forward_without_graph_breaks(train: bool, effective: bool) -> None:
    torch._dynamo.reset()
    m = _model(effective, dtype=torch.float32).train(train)
    x = torch.randn(2, 12)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
def test_compiled_model_matches_eager_forward_and_backward(effective: bool) -> None:
    torch._dynamo.reset()
    m = _model(effective, dtype=torch.float32).train()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 12)
    y_c, y_e = compiled(x), eager(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    y_c.pow(2).sum().backward()
    y_e.pow(2).sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager.eval()(x), rtol=1e-5, atol=1e-5)


def test_large_delta_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """ΔW costs as much memory as the base weight: above the limit it is rebuilt per call."""
    monkeypatch.setattr(Fn.dispatch, "EVAL_CACHE_MAX_DELTA_NUMEL", 100)  # inp (144x12) and out (7x180) exceed it
    m = _model()
    m.set_compute_path("materialised")
    m.eval()
    x = torch.randn(3, 12, dtype=D)
    with torch.no_grad():
        y = m(x)
    assert "delta" not in m.model.inp._eval_cache["default"][1]
    assert "delta" in m.model.pw._eval_cache["default"][1]  # 5x6 ΔW: small enough to keep
    torch.testing.assert_close(y, _reference(m, x), **TOL64_PATHS)


def test_fused_path_steps_aside_under_autocast() -> None:
    m = _model(dtype=torch.float32).train()
    x = torch.randn(3, 12, requires_grad=True)
    layer = m.model.inp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not Fn.fused_linear_applicable(layer.base_layer, x, layer.factors("default"))
        y = m(x)
    y.float().pow(2).sum().backward()
    assert layer.hada_w1_a["default"].grad is not None


# ------------------------------------------------------------------------------------------
# Second order (create_graph=True): gradient penalties, meta-learning
# ------------------------------------------------------------------------------------------
def _second_order_cases() -> dict:
    g = torch.Generator().manual_seed(11)
    o, i, r1, r2 = 4, 3, 2, 3

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=D).requires_grad_(True)

    lin = [t(o, r1), t(r1, i), t(o, r2), t(r2, i)]
    conv = [t(o, r1), t(r1, i * 9), t(o, r2), t(r2, i * 9)]
    weight, weight_k = torch.randn(o, i, generator=g, dtype=D), torch.randn(o, i, 3, 3, generator=g, dtype=D)
    row = torch.rand(o, generator=g, dtype=D) + 0.5
    stage = Fn.Stage(2, (1, 1), (1, 1), (1, 1), 1)
    chain = (Fn.Stage(2, (1, 1), (1, 1), (1, 1), 1), Fn.Stage(2, (1, 1), (0, 0), (1, 1), 1))
    return {
        "FactoredLinear": (lambda x, *f: Fn.FactoredLinear.apply(x, None, *f, 0.5), [t(2, i), *lin]),
        "FactoredLinearFused": (lambda x, *f: Fn.FactoredLinearFused.apply(x, weight, None, *f, row), [t(2, i), *lin]),
        "FactoredConvFused": (lambda x, *f: Fn.FactoredConvFused.apply(x, weight_k, None, stage, *f, 0.5),
                              [t(1, i, 4, 4), *conv]),
        "StageChain": (lambda x, a, b: Fn.StageChain.apply(x, None, chain, a, b), [t(1, i, 4, 4), t(5, i, 3, 3), t(o, 5, 1, 1)]),
    }


@pytest.mark.parametrize("name", list(_second_order_cases()))
def test_custom_autograd_second_order_gradgradcheck(name: str) -> None:
    """The backward recomputes its saved intermediates when it is itself recorded, so Hessian-vector
    products through it are exact (not only penalties on dL/dx)."""
    fn, args = _second_order_cases()[name]
    assert torch.autograd.gradgradcheck(fn, args)


def test_tucker_delta_weight_refuses_second_order_instead_of_a_wrong_answer() -> None:
    g = torch.Generator().manual_seed(2)
    t1, t2 = (torch.randn(2, 2, 3, 3, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    wa, wb = (torch.randn(2, n, generator=g, dtype=D, requires_grad=True) for n in (4, 3))
    dw = Fn.HadaWeightTucker.apply(t1, wa, wb, t2, wa, wb, 0.5)
    (gw,) = torch.autograd.grad(dw.square().sum(), wa, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gw.sum().backward()


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_output_positions_string_padding(padding: str) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=padding)
    x = torch.randn(2, 3, 9, 8)
    geom = Fn.Geometry(5, 3, (3, 3), (1, 1), padding, (1, 1))
    assert Fn.conv_output_positions(x, geom) == conv(x).numel() // 5
    assert Fn.positions(x, None, geom) == Fn.positions(x, conv(x), geom)
