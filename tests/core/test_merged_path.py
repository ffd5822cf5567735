"""The merged-weight training path (MergedWeightFused): the base layer run once on W + ΣΔW.

Checked in float64 against the plain formula ``y = layer(x, W + Σ s·(A1 B1)⊙(A2 B2))`` built from
autograd ops (1e-10), against the other compute paths of the same layer (1e-8: the paths sum
in different orders), with gradcheck / gradgradcheck on the node, and in 16-bit against the
float64 result (tolerance below). No test here asserts a timing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

from lohakit import LoHaConfig, LoHaModel
from lohakit.core import functional as Fn

D = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL64_PATHS = dict(rtol=1e-8, atol=1e-8)
#: bf16 / fp16 inputs (float32 factors): one rounding of W + ΔW and of the GEMM, relative to the output scale
TOL16 = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}

# (name, base layer factory, input shape): every layer kind the node serves
LAYERS = [
    ("linear", lambda: nn.Linear(6, 5), (2, 3, 6)),
    ("linear_nobias", lambda: nn.Linear(6, 5, bias=False), (4, 6)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    ("conv2d_stride_dilation", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 9, 9)),
    ("conv2d_1x1", lambda: nn.Conv2d(4, 5, 1), (2, 4, 5, 5)),
    ("conv2d_grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 4, 4)),
]


def _wrap(base: nn.Module, r: int = 3, alpha: float = 5.0, dtype: torch.dtype = D, **cfg) -> LoHaModel:
    torch.manual_seed(0)
    model = nn.Sequential(base).to(dtype)
    m = LoHaModel(model, LoHaConfig(r=r, alpha=alpha, target_modules=["0"], init_weights=False, **cfg))
    return m.to(dtype).train()  # factors in the same dtype (float64: every path exact to rounding)


def _formula(layer, x: torch.Tensor, masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """layer(x, W + Σ ΔW) from autograd ops on the same parameters (the plain formula)."""
    base = layer.base_layer
    w = base.weight
    for name in layer.active_adapters:
        f = layer.factors(name)
        dw = (f.w1a @ f.w1b) * (f.w2a @ f.w2b) * layer.scaling[name]  # (out, in/g·K)
        if masks and name in masks:
            dw = dw * masks[name].to(dw.dtype)[:, None]
        w = w + dw.reshape(w.shape).to(w.dtype)
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


def _grads(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    params = [p for p in m.parameters() if p.requires_grad]
    return list(torch.autograd.grad(y, [x, *params], g))


def _node(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_merged_path_equals_formula_float64(name, make, shape) -> None:
    m = _wrap(make())
    m.set_compute_path("merged")
    layer = m.model[0]
    x = torch.randn(shape, dtype=D, requires_grad=True)
    y = m(x)
    assert _node(y) == "MergedWeightFusedBackward"
    ref = _formula(layer, x)
    torch.testing.assert_close(y, ref, **TOL64)
    for a, b in zip(_grads(m, x, y), _grads(m, x, ref)):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_merged_equals_factored_and_materialised(name, make, shape) -> None:
    m = _wrap(make())
    x = torch.randn(shape, dtype=D)
    results = {}
    for path in ("merged", "factored", "materialised"):
        m.set_compute_path(path)
        xi = x.clone().requires_grad_()
        y = m(xi)
        results[path] = (y, _grads(m, xi, y))
    for path in ("factored", "materialised"):
        torch.testing.assert_close(results["merged"][0], results[path][0], **TOL64_PATHS)
        for a, b in zip(results["merged"][1], results[path][1]):
            torch.testing.assert_close(a, b, **TOL64_PATHS)


@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "row_mask"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
def test_merged_node_gradcheck_and_gradgradcheck(vector_scale: bool, conv: bool) -> None:
    """Two adapters of different ranks on one layer; second order through the rebuilt W + ΣΔW."""
    out_f, c_in = 4, 3
    k = (2, 2) if conv else ()
    in_flat = c_in * 4 if conv else c_in
    stage = Fn.Stage(2, (1, 1), (1, 1), (1, 1), 1) if conv else Fn.Stage()
    x = torch.randn((2, c_in, 3, 3) if conv else (2, 3, c_in), dtype=D, requires_grad=True)
    weight = torch.randn(out_f, c_in, *k, dtype=D)
    bias = torch.randn(out_f, dtype=D)
    factors = []
    for r1, r2 in ((2, 3), (1, 2)):
        factors += [torch.randn(out_f, r1, dtype=D), torch.randn(r1, in_flat, dtype=D),
                    torch.randn(out_f, r2, dtype=D), torch.randn(r2, in_flat, dtype=D)]
    factors = [f.requires_grad_() for f in factors]
    scales = [torch.rand(out_f, dtype=D) + 0.5, 0.3] if vector_scale else [0.7, 0.3]

    def f(x, *fs):
        adapters = [(*fs[0:4], scales[0]), (*fs[4:8], scales[1])]
        return Fn.MergedWeightFused.apply(x, weight, bias, stage, 2, *(t for a in adapters for t in a))

    assert torch.autograd.gradcheck(f, (x, *factors))
    assert torch.autograd.gradgradcheck(f, (x, *factors))


def test_multiple_adapters_sum_their_delta_in_one_node() -> None:
    m = _wrap(nn.Linear(6, 5))
    m.add_adapter("other", LoHaConfig(r=2, alpha=3, target_modules=["0"], init_weights=False))
    m.to(D)
    m.set_adapter(["default", "other"])
    m.set_compute_path("merged")
    x = torch.randn(4, 6, dtype=D, requires_grad=True)
    y = m(x)
    assert _node(y) == "MergedWeightFusedBackward"
    ref = _formula(m.model[0], x)
    torch.testing.assert_close(y, ref, **TOL64)
    grads, ref_grads = _grads(m, x, y), _grads(m, x, ref)
    assert len(grads) == 9  # x and both adapters' four factors
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL64)


def test_rank_dropout_mask_is_the_same_as_on_the_other_paths() -> None:
    """Same seed, same Bernoulli mask: merged == materialised, and both equal the formula with it."""
    m = _wrap(nn.Conv2d(3, 8, 3, padding=1), rank_dropout=0.5)
    x = torch.randn(2, 3, 5, 5, dtype=D)
    outs = {}
    for path in ("merged", "materialised"):
        m.set_compute_path(path)
        torch.manual_seed(11)
        xi = x.clone().requires_grad_()
        y = m(xi)
        outs[path] = (y, _grads(m, xi, y))
    torch.manual_seed(11)
    mask = Fn.rank_dropout_mask(8, 0.5, True)
    torch.testing.assert_close(outs["merged"][0], _formula(m.model[0], x, {"default": mask}), **TOL64)
    torch.testing.assert_close(outs["merged"][0], outs["materialised"][0], **TOL64_PATHS)
    for a, b in zip(outs["merged"][1], outs["materialised"][1]):
        torch.testing.assert_close(a, b, **TOL64_PATHS)


def test_module_dropout_skips_the_adapter() -> None:
    m = _wrap(nn.Linear(6, 5), module_dropout=0.5)
    m.model[0].module_dropout["default"] = 1.0  # always dropped in training (the config allows < 1)
    m.set_compute_path("merged")
    x = torch.randn(3, 6, dtype=D)
    torch.testing.assert_close(m(x), m.model[0].base_layer(x), **TOL64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs_with_float32_factors(dtype: torch.dtype) -> None:
    m = _wrap(nn.Linear(16, 12), dtype=torch.float32)
    m.model[0].base_layer.to(dtype)  # the frozen base in 16 bit, factors stay float32
    m.set_compute_path("merged")
    x = torch.randn(5, 16).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and _node(y) == "MergedWeightFusedBackward"
    y.float().pow(2).sum().backward()
    layer = m.model[0]
    assert all(layer.hada_w1_a[n].dtype == torch.float32 for n in layer.hada_w1_a)
    g16 = [layer.hada_w1_a["default"].grad.clone(), x.grad.float().clone()]
    # reference: everything in float64 on the same (rounded) values
    m64 = copy.deepcopy(m).to(D)
    x64 = x.detach().to(D).requires_grad_()
    y64 = _formula(m64.model[0], x64)
    y64.pow(2).sum().backward()
    scale = y64.abs().max()
    torch.testing.assert_close(y.to(D) / scale, y64.detach() / scale, **TOL16[dtype])
    gref = [m64.model[0].hada_w1_a["default"].grad, x64.grad]
    for a, b in zip(g16, gref):
        s = b.abs().max()
        torch.testing.assert_close(a.to(D) / s, b / s, **TOL16[dtype])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    m = _wrap(nn.Conv2d(3, 4, 3, padding=1))
    m.set_compute_path("merged")
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    y = m(x)
    plain = _grads(m, x, y)
    y_ckpt = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
    torch.testing.assert_close(y_ckpt, y, **TOL64)
    for a, b in zip(_grads(m, x, y_ckpt), plain):
        torch.testing.assert_close(a, b, **TOL64)


def test_torch_compile_matches_eager() -> None:
    torch._dynamo.reset()
    m = _wrap(nn.Linear(8, 6), dtype=torch.float32)
    m.set_compute_path("merged")
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8)
    y_c, y_e = compiled(x), eager(x)
    assert _node(y_e) == "MergedWeightFusedBackward"
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    y_c.pow(2).sum().backward()
    y_e.pow(2).sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()


def _tucker_formula(layer, x: torch.Tensor) -> torch.Tensor:
    """conv(x, W + Σ s·W1⊙W2), W_i = einsum(t_i, wa_i, wb_i): the Tucker form from its definition."""
    base = layer.base_layer
    w = base.weight
    for name in layer.active_adapters:
        f = layer.factors(name)
        k = w.shape[2:]
        letters = "hwd"[: len(k)]
        branch = [torch.einsum(f"pq{letters},po,qc->oc{letters}", t.reshape(*t.shape[:2], *k), wa, wb)
                  for t, wa, wb in ((f.t1, f.w1a, f.w1b), (f.t2, f.w2a, f.w2b))]
        w = w + branch[0] * branch[1] * layer.scaling[name]
    return base._conv_forward(x, w, base.bias)


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7)),
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 6)),
    (lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 3, 4, 4)),
], ids=["conv2d", "conv2d_grouped_stride", "conv1d", "conv3d"])
def test_tucker_adapters_take_the_merged_node_too(conv, shape) -> None:
    m = _wrap(conv(), use_effective_conv2d=True)
    m.set_compute_path("merged")
    layer = m.model[0]
    assert layer.factors("default").tucker
    x = torch.randn(shape, dtype=D, requires_grad=True)
    y = m(x)
    assert _node(y) == "MergedWeightBuiltBackward"
    ref = _tucker_formula(layer, x)
    torch.testing.assert_close(y, ref, **TOL64)
    grads = _grads(m, x, y)
    for a, b in zip(grads, _grads(m, x, ref)):
        torch.testing.assert_close(a, b, **TOL64)
    m.set_compute_path("factored")
    xf = x.detach().clone().requires_grad_()
    yf = m(xf)
    torch.testing.assert_close(y, yf, **TOL64_PATHS)
    for a, b in zip(grads, _grads(m, xf, yf)):
        torch.testing.assert_close(a, b, **TOL64_PATHS)


def test_merged_built_node_gradcheck_with_a_flat_and_a_tucker_adapter() -> None:
    m = _wrap(nn.Conv2d(2, 3, 3, padding=1), r=2, use_effective_conv2d=True, rank_dropout=0.5)
    m.add_adapter("flat", LoHaConfig(r=2, alpha=3, target_modules=["0"], init_weights=False))
    m.to(D)
    layer = m.model[0]
    geom, stage = layer.geometry, Fn.Stage(2, (1, 1), (1, 1), (1, 1), 1)
    ft, ff = layer.factors("default"), layer.factors("flat")
    rows = torch.rand(3, dtype=D) + 0.5
    x = torch.randn(1, 2, 4, 4, dtype=D, requires_grad=True)
    leaves = [t for t in (*ft, *ff) if t is not None]

    def f(x, *ts):
        it = iter(ts)
        a = Fn.HadaFactors(*(next(it) if t is not None else None for t in ft))
        b = Fn.HadaFactors(*(next(it) if t is not None else None for t in ff))
        return Fn.merged_weight_forward(x, layer.base_layer.weight, layer.base_layer.bias, stage,
                                            [(a, rows), (b, 0.7)], geom.kernel_size)

    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_merged_steps_aside_where_it_cannot_be_exact() -> None:
    """A trainable base weight, hooks: the general path runs instead."""
    m = _wrap(nn.Linear(6, 5))
    m.set_compute_path("merged")
    layer = m.model[0]
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    y = m(x)
    assert _node(y) != "MergedWeightFusedBackward"
    torch.testing.assert_close(y, _formula(layer, x), **TOL64)
    layer.base_layer.weight.requires_grad_(False)
    handle = layer.base_layer.register_forward_hook(lambda mod, i, o: None)
    assert _node(m(x)) != "MergedWeightFusedBackward"
    handle.remove()
    assert _node(m(x)) == "MergedWeightFusedBackward"


def test_auto_takes_the_merged_path_only_where_the_cost_model_says_so() -> None:
    wide = Fn.Geometry(1024, 1024)
    narrow = Fn.Geometry(64, 64)
    f = lambda r: Fn.HadaFactors(*(torch.empty(0),) * 4)._replace(  # noqa: E731
        w1a=torch.empty(1, r), w1b=torch.empty(r, 1), w2a=torch.empty(1, r), w2b=torch.empty(r, 1))
    assert Fn.choose_training_path(wide, [f(4)], 512, 512, merged_ok=True) == "factored"
    assert Fn.choose_training_path(wide, [f(64)], 512, 512, merged_ok=True) == "merged"
    assert Fn.choose_training_path(narrow, [f(8)], 512, 512, merged_ok=True) == "merged"
    assert Fn.choose_training_path(narrow, [f(8)], 512, 512, merged_ok=False) == "materialised"
    # and the layer follows it
    m = _wrap(nn.Linear(16, 16), r=8)
    x = torch.randn(64, 16, dtype=D, requires_grad=True)
    assert _node(m(x)) == "MergedWeightFusedBackward"


def test_peft_loha_gives_the_same_outputs_and_gradients() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)).to(D)
    cfg = dict(r=4, alpha=6, target_modules=["0"], init_weights=False)
    ours = LoHaModel(copy.deepcopy(base), LoHaConfig(**cfg)).to(D).train()
    ours.set_compute_path("merged")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**cfg)).train()
    theirs_params = {n.replace("base_model.model.", "model.", 1): p for n, p in theirs.named_parameters()}
    for n, p in ours.named_parameters():
        if "hada_" in n:
            with torch.no_grad():
                p.copy_(theirs_params[n])
    x = torch.randn(2, 3, 6, 6, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **TOL64)
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL64_PATHS)
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_params[n].grad, **TOL64_PATHS, msg=n)
