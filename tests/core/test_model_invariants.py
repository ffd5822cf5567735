"""Core invariants (BRIEF §5), run over every case of ``cases.CASES``.

Tolerances: float64 1e-10 (paths must agree to rounding), float32 1e-5 relative to the output
scale, bfloat16 3e-2 relative (8 mantissa bits, errors accumulate over a few layers).
"""

from __future__ import annotations


import pytest
import torch

from helpers.models import CASES, Case, run
from lohakit import LoHaConfig, LoHaLayer, get_peft_model

TOL32 = 1e-5
TOL64 = 1e-10


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A loss with a non-trivial gradient (a squared norm after LayerNorm is constant)."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (out.double() * r).sum() + (out.double() ** 2).mean()


def _adapt(case: Case, dtype=torch.float32, **overrides):
    base = case.build().to(dtype)
    kwargs = {**case.config, **overrides}
    model = get_peft_model(base, LoHaConfig(**kwargs))
    return model


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def test_identity_at_init(case: Case):
    base = case.build()
    inputs = case.inputs(torch.float32)
    with torch.no_grad():
        expected = run(base, inputs)
        model = get_peft_model(base, LoHaConfig(**case.config))
        for path in ("factored", "materialised", "auto"):
            model.set_compute_path(path)
            torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)


def test_merged_equals_unmerged_equals_merge_and_unload(case: Case):
    model = _adapt(case, init_weights=False, r=4, alpha=3.0)
    inputs = case.inputs(torch.float32)
    with torch.no_grad():
        unmerged = run(model, inputs)
        model.merge_adapter()
        merged = run(model, inputs)
        model.merge_adapter()  # merging twice changes nothing
        merged_twice = run(model, inputs)
        model.unmerge_adapter()
        again = run(model, inputs)
        plain = model.merge_and_unload()
        unloaded = run(plain, inputs)
    assert _rel_err(merged, unmerged) < TOL32
    assert torch.equal(merged_twice, merged)
    assert _rel_err(again, unmerged) < TOL32
    assert _rel_err(unloaded, unmerged) < TOL32
    assert not any(isinstance(m, LoHaLayer) for m in plain.modules())


def test_unload_restores_base_bit_exactly(case: Case):
    base = case.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = case.inputs(torch.float32)
    with torch.no_grad():
        expected = run(base, inputs)
        model = get_peft_model(base, LoHaConfig(**case.config, init_weights=False))
        model.merge_adapter()
        model.unmerge_adapter()
        model.merge_adapter()
        restored = model.unload()
        after = restored.state_dict()
        assert set(after) == set(before)
    # merge/unmerge round trips in float32 may differ in the last bit (checked to 1e-5 below);
    # a model that was never merged must be restored bit-exactly
    base2 = case.build()
    model2 = get_peft_model(base2, LoHaConfig(**case.config, init_weights=False))
    restored2 = model2.unload()
    for k, v in restored2.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(run(restored2, inputs), expected)
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)


def test_only_adapter_parameters_train(case: Case):
    model = _adapt(case)  # PEFT init: w2_b = 0, so w1_* only get gradients after the first step
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hada_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = case.inputs(torch.float32)
    for _ in range(3):
        out = run(model, inputs)
        _loss(out).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (".hada_" in n), n


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_factored_equals_materialised(case: Case, dtype, tol):
    model = _adapt(case, dtype=dtype, init_weights=False, r=3, alpha=5.0)
    if dtype == torch.float64:
        model.double()
    inputs = case.inputs(dtype)
    outs = {}
    grads = {}
    for path in ("factored", "materialised"):
        model.set_compute_path(path)
        model.zero_grad()
        out = run(model, inputs)
        _loss(out).backward()
        outs[path] = out.detach()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert _rel_err(outs["factored"], outs["materialised"]) < tol
    assert grads["factored"].keys() == grads["materialised"].keys() and grads["factored"]
    for n, g in grads["factored"].items():
        ref = grads["materialised"][n]
        assert ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() < tol * 10, n


def test_two_adapters_active_is_sum(case: Case):
    """Per layer, with two adapters active the output is base + ΔW_a·x + ΔW_b·x (float64)."""
    model = _adapt(case, init_weights=False, r=2, alpha=2.0)
    model.add_adapter("other", LoHaConfig(**case.config, init_weights=False, r=3, alpha=1.0))
    model.double()
    model.set_adapter(["default", "other"])
    captured: dict[str, torch.Tensor] = {}

    def capture(key: str):
        def hook(module, args, output) -> None:
            captured.setdefault(key, args[0].detach())

        return hook

    hooks = [layer.register_forward_hook(capture(key)) for key, layer in model.loha_layers()]
    with torch.no_grad():
        both = run(model, case.inputs(torch.float64))
    for h in hooks:
        h.remove()
    assert captured.keys() == dict(model.loha_layers()).keys()
    with torch.no_grad():
        for key, layer in model.loha_layers():
            assert layer.active_adapters == ["default", "other"]
            x = captured[key]
            base = layer.base_layer(x)
            layer.set_adapter("default")
            da = layer(x) - base
            layer.set_adapter("other")
            db = layer(x) - base
            layer.set_adapter(["default", "other"])
            dab = layer(x) - base
            torch.testing.assert_close(dab, da + db, rtol=1e-9, atol=1e-12)
            assert da.abs().max() > 0 and db.abs().max() > 0
        model.set_adapter("default")
        only_a = run(model, case.inputs(torch.float64))
    assert not torch.equal(both, only_a)


def test_merging_two_adapters_adds_both_deltas(case: Case):
    """Per layer, merging two adapters leaves W + ΔW_a + ΔW_b (float64)."""
    model = _adapt(case, init_weights=False, r=2, alpha=2.0)
    model.add_adapter("other", LoHaConfig(**case.config, init_weights=False, r=3, alpha=1.0))
    model.set_adapter(["default", "other"])
    model.double()
    for _, layer in model.loha_layers():
        w = layer.base_layer.weight
        with torch.no_grad():
            layer.merge(adapter_names=["default", "other"])
            merged = w.detach().clone()
            layer.unmerge()
            expected = w + layer.get_delta_weight("default") + layer.get_delta_weight("other")
        torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-12)


def test_disable_adapter_is_base(case: Case):
    base = case.build()
    inputs = case.inputs(torch.float32)
    with torch.no_grad():
        expected = run(base, inputs)
    model = get_peft_model(base, LoHaConfig(**case.config, init_weights=False))
    with torch.no_grad():
        adapted = run(model, inputs)
        with model.disable_adapter():
            disabled = run(model, inputs)
        after = run(model, inputs)
    assert torch.equal(disabled, expected)
    assert torch.equal(after, adapted)
    assert not torch.equal(adapted, expected)


def test_bf16_base_with_fp32_factors(case: Case):
    base = case.build().to(torch.bfloat16)
    model = get_peft_model(base, LoHaConfig(**case.config, init_weights=False, r=2, alpha=1.0))
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".hada_" in n else torch.bfloat16), n
    inputs = case.inputs(torch.bfloat16)
    with torch.no_grad():
        unmerged = run(model, inputs)
        assert unmerged.dtype == torch.bfloat16
        model.merge_adapter()
        merged = run(model, inputs)
    assert torch.isfinite(unmerged.float()).all()
    assert _rel_err(merged.float(), unmerged.float()) < 3e-2
    # training step in bf16 gives finite float32 gradients on the factors
    model.unmerge_adapter()
    model.train()
    out = run(model, inputs)
    (out.float() ** 2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".hada_" in n and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
