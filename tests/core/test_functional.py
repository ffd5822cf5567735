"""The functional core against the plain formula, in float64, and float64 gradchecks.

Tolerances: float64 identities 1e-12 absolute on unit-scale values; gradcheck defaults
(eps 1e-6, atol 1e-5, rtol 1e-3) in float64.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from lohakit.core import functional as Fn
from lohakit.core.functional import Geometry, HadaFactors
from lohakit.core.layers import geometry_of

D = torch.float64


def _rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=D).requires_grad_(requires_grad)


def reference_delta(f: HadaFactors, geom: Geometry, scale: float) -> torch.Tensor:
    """ΔW by the plain formula (einsum for Tucker), shape (out, in/g, *k)."""
    if f.tucker:
        k = geom.kernel_size
        t1 = f.t1.reshape(*f.t1.shape[:2], *k)
        t2 = f.t2.reshape(*f.t2.shape[:2], *k)
        w1 = torch.einsum("pq...,po,qc->oc...", t1, f.w1a, f.w1b)
        w2 = torch.einsum("pq...,po,qc->oc...", t2, f.w2a, f.w2b)
        return scale * w1 * w2
    return (scale * (f.w1a @ f.w1b) * (f.w2a @ f.w2b)).reshape(geom.weight_shape)


def make_factors(geom: Geometry, r1: int, r2: int, tucker: bool, requires_grad=False) -> HadaFactors:
    if tucker:
        k = geom.kernel_size
        return HadaFactors(
            _rand(r1, geom.out_features, requires_grad=requires_grad), _rand(r1, geom.in_features, requires_grad=requires_grad),
            _rand(r2, geom.out_features, requires_grad=requires_grad), _rand(r2, geom.in_features, requires_grad=requires_grad),
            _rand(r1, r1, *k, requires_grad=requires_grad), _rand(r2, r2, *k, requires_grad=requires_grad),
        )
    return HadaFactors(
        _rand(geom.out_features, r1, requires_grad=requires_grad), _rand(r1, geom.flat_in, requires_grad=requires_grad),
        _rand(geom.out_features, r2, requires_grad=requires_grad), _rand(r2, geom.flat_in, requires_grad=requires_grad),
    )


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (5, 12)),
    "linear_3d_input": (lambda: nn.Linear(12, 10), (2, 3, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, stride=2), (2, 4, 9)),
    "conv1d_1x1": (lambda: nn.Conv1d(4, 6, 1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1, stride=2, dilation=1), (2, 3, 7, 7)),
    "conv2d_dilated": (lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2), (2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 4, 1), (2, 6, 5, 5)),
    "conv2d_grouped": (lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2), (2, 6, 5, 5)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), (2, 4, 5, 5)),
    "conv2d_same": (lambda: nn.Conv2d(3, 5, 3, padding="same"), (2, 3, 6, 6)),
    "conv2d_same_even": (lambda: nn.Conv2d(3, 5, 4, padding="same"), (2, 3, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv2d_circular": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), (2, 3, 6, 6)),
    "conv2d_unbatched": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 4, 4)),
    "conv3d_grouped": (lambda: nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), groups=2), (1, 4, 3, 4, 4)),
}


def _cases():
    for name, (build, shape) in LAYERS.items():
        for tucker in (False, True):
            if tucker and "linear" in name:
                continue
            yield pytest.param(name, build, shape, tucker, id=f"{name}-{'tucker' if tucker else 'flat'}")


@pytest.mark.parametrize("name,build,shape,tucker", list(_cases()))
@pytest.mark.parametrize("path", ["factored", "materialised"])
def test_forward_matches_plain_formula_float64(name, build, shape, tucker, path):
    torch.manual_seed(0)
    layer = build().double()
    geom = geometry_of(layer)
    f = make_factors(geom, 3, 2, tucker)
    scale = 0.7
    x = _rand(*shape)
    base = layer(x)
    y = Fn.loha_delta_forward(x, base, f, geom, scale, path=path)
    dw = reference_delta(f, geom, scale)
    ref_layer = build().double()
    with torch.no_grad():
        ref_layer.weight.copy_(layer.weight + dw)
        ref_layer.bias.copy_(layer.bias)
    torch.testing.assert_close(y, ref_layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,build,shape,tucker", list(_cases()))
def test_factored_and_materialised_gradients_agree_float64(name, build, shape, tucker):
    layer = build().double()
    geom = geometry_of(layer)
    f = make_factors(geom, 2, 3, tucker, requires_grad=True)
    x = _rand(*shape, requires_grad=True)
    grads = {}
    for path in ("factored", "materialised"):
        base = layer(x)
        mask = torch.tensor([1.0, 0.0] * geom.out_features, dtype=D)[: geom.out_features] * 2
        y = Fn.loha_delta_forward(x, base, f, geom, 0.5, row_mask=mask, path=path)
        r = torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        grads[path] = torch.autograd.grad((y * r).sum(), [x, *[t for t in f if t is not None]])
    for a, b in zip(grads["factored"], grads["materialised"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_delta_weight_matches_formula_and_peft_conv1d_core_layout():
    conv = nn.Conv1d(4, 6, 3)
    geom = geometry_of(conv)
    f = make_factors(geom, 2, 2, True)
    f4 = f._replace(t1=f.t1[..., None], t2=f.t2[..., None])  # PEFT's (r, r, k, 1)
    torch.testing.assert_close(Fn.delta_weight(f4, geom, 1.5), reference_delta(f, geom, 1.5), rtol=1e-12, atol=1e-12)
    assert Fn.factor_shapes(geom, 2, True)["hada_t1"] == (2, 2, 3, 1)


def test_transposed_geometry_for_conv1d_weight_layout():
    geom = Geometry(out_features=5, in_features=3, transposed=True)
    f = make_factors(Geometry(5, 3), 2, 2, False)
    dw = Fn.delta_weight(f, geom, 1.0)
    assert dw.shape == (3, 5)
    torch.testing.assert_close(dw.T, reference_delta(f, Geometry(5, 3), 1.0))


def test_khatri_rao_identity_float64():
    a1, b1, a2, b2 = _rand(7, 3), _rand(3, 11), _rand(7, 2), _rand(2, 11)
    p = Fn.khatri_rao_rows(a1, a2)
    q = Fn.khatri_rao_cols(b1, b2)
    assert p.shape == (7, 6) and q.shape == (6, 11)
    torch.testing.assert_close(p @ q, (a1 @ b1) * (a2 @ b2), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gradchecks
def test_gradcheck_hada_weight():
    args = (_rand(5, 2, requires_grad=True), _rand(2, 4, requires_grad=True), _rand(5, 3, requires_grad=True), _rand(3, 4, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: Fn.HadaWeight.apply(*a, 0.7), args)


def test_gradcheck_hada_weight_tucker():
    args = (
        _rand(2, 2, 3, 3, requires_grad=True), _rand(2, 4, requires_grad=True), _rand(2, 3, requires_grad=True),
        _rand(3, 3, 3, 3, requires_grad=True), _rand(3, 4, requires_grad=True), _rand(3, 3, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda *a: Fn.HadaWeightTucker.apply(*a, 1.3), args)


@pytest.mark.parametrize(
    "name,build,shape,tucker",
    [
        pytest.param("linear", lambda: nn.Linear(6, 5), (2, 3, 6), False, id="linear"),
        pytest.param("conv2d", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (1, 3, 5, 5), False, id="conv-flat"),
        pytest.param("grouped", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (1, 4, 4, 4), False, id="conv-grouped"),
        pytest.param("tucker", lambda: nn.Conv2d(3, 4, 3, padding=1), (1, 3, 4, 4), True, id="conv-tucker"),
        pytest.param("tucker_grouped", lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), (2, 4, 5), True, id="conv1d-tucker-grouped"),
    ],
)
def test_gradcheck_stage_chain(name, build, shape, tucker):
    layer = build().double()
    geom = geometry_of(layer)
    f = make_factors(geom, 2, 2, tucker, requires_grad=True)
    x = _rand(*shape, requires_grad=True)
    base = layer(x).detach().requires_grad_(True)
    mask = torch.rand(geom.out_features, dtype=D) + 0.5

    def fn(x, base, *factors):
        return Fn.loha_delta_forward(x, base, HadaFactors(*factors), geom, 0.9, row_mask=mask, path="factored")

    tensors = [t for t in f if t is not None]
    assert torch.autograd.gradcheck(fn, (x, base, *tensors))


def test_stage_chain_saves_only_inputs_and_rank_sized_intermediates():
    """The chain's saved tensors: x, h (N × r²) and the small stage weights — never N × out."""
    n, d_in, d_out, r = 64, 48, 40, 2
    geom = Geometry(d_out, d_in)
    f = make_factors(geom, r, r, False, requires_grad=True)
    x = _rand(n, d_in, requires_grad=True)
    base = _rand(n, d_out, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stages, weights = Fn.factored_stages(f, geom, 1.0, D)
        sizes.clear()
        Fn.apply_stages(x, stages, weights, base)
    assert (n, d_out) not in sizes
    assert sorted(sizes) == sorted([(n, d_in), (n, r * r), (r * r, d_in), (d_out, r * r)])


# ------------------------------------------------------------------ dropout and cost model
def test_rank_dropout_mask_all_dropped_is_finite():
    m = Fn.rank_dropout_mask(8, 0.999999, True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, torch.zeros(8))
    m = Fn.rank_dropout_mask(1000, 0.5, True, generator=torch.Generator().manual_seed(0))
    assert abs(m.mean().item() - 1.0) < 1e-6
    kept = m[m > 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1000 / kept.numel()))
    m = Fn.rank_dropout_mask(1000, 0.5, False, generator=torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_cost_model_crossover():
    big = Geometry(4096, 4096)
    assert Fn.prefer_factored(big, (8, 8), False, 8192, 8192)
    assert not Fn.prefer_factored(big, (128, 128), False, 8192, 8192)
    tiny = Geometry(8, 8)
    assert not Fn.prefer_factored(tiny, (8, 8), False, 1024, 1024)
    depthwise = Geometry(64, 1, (3, 3), (1, 1), (1, 1), (1, 1), groups=64)
    assert not Fn.prefer_factored(depthwise, (4, 4), False, 4096, 4096)
    unet_conv = Geometry(320, 320, (3, 3), (1, 1), (1, 1), (1, 1))
    assert Fn.prefer_factored(unet_conv, (4, 4), False, 2 * 32 * 32, 2 * 32 * 32)


def test_rank_dropout_in_layer_factored_equals_materialised():
    """With the same mask (same RNG state), both paths give the same training output."""
    from lohakit import LoHaConfig, get_peft_model

    outs = []
    for path in ("factored", "materialised"):
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(8, 16)), LoHaConfig(target_modules=["0"], init_weights=False, rank_dropout=0.5))
        model.set_compute_path(path)
        model.train()
        x = torch.randn(3, 8)
        torch.manual_seed(5)
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_module_dropout_skips_adapter_in_training_only():
    from lohakit import LoHaConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 16)), LoHaConfig(target_modules=["0"], init_weights=False, module_dropout=0.5))
    x = torch.randn(3, 8)
    base = model.model[0].base_layer(x)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    model.train()
    seen = {bool(torch.equal(model(x), base)) for _ in range(40)}
    assert seen == {True, False}
    model.eval()
    assert all(not torch.equal(model(x), base) for _ in range(5))


@pytest.mark.parametrize("name,build,shape,tucker", list(_cases()))
def test_lora_factors_and_frobenius_norm_are_exact_float64(name, build, shape, tucker):
    geom = geometry_of(build())
    f = make_factors(geom, 3, 2, tucker)
    b, a = Fn.lora_factors(f, 0.8)
    dw = reference_delta(f, geom, 0.8)
    assert b.shape == (geom.out_features, 6) and a.shape == (6, geom.flat_in)
    torch.testing.assert_close((b @ a).reshape(dw.shape), dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Fn.frobenius_norm(f, 0.8), dw.norm(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_frobenius_norm_of_a_huge_rank_on_a_tiny_layer_is_exact_and_small(tucker):
    """r = 300 on a 2x3 layer: the Gram form would need (r²)² = 8.1e9 values; ΔW has 6 (or 6·k)."""
    g = torch.Generator().manual_seed(0)
    r, out, cin = 300, 2, 3
    if tucker:
        f = Fn.HadaFactors(torch.randn(r, out, generator=g, dtype=D), torch.randn(r, cin, generator=g, dtype=D),
                           torch.randn(r, out, generator=g, dtype=D), torch.randn(r, cin, generator=g, dtype=D),
                           torch.randn(r, r, 2, 2, generator=g, dtype=D), torch.randn(r, r, 2, 2, generator=g, dtype=D))
        w1 = torch.einsum("pqhw,po,qc->ochw", f.t1, f.w1a, f.w1b)
        w2 = torch.einsum("pqhw,po,qc->ochw", f.t2, f.w2a, f.w2b)
    else:
        f = Fn.HadaFactors(torch.randn(out, r, generator=g, dtype=D), torch.randn(r, cin, generator=g, dtype=D),
                           torch.randn(out, r, generator=g, dtype=D), torch.randn(r, cin, generator=g, dtype=D))
        w1, w2 = f.w1a @ f.w1b, f.w2a @ f.w2b
    expected = (w1 * w2 * 0.3).norm()
    torch.testing.assert_close(Fn.frobenius_norm(f, -0.3), expected, rtol=1e-12, atol=1e-12)
