"""Outputs equal PEFT's LoHa given the same factor values (PEFT is a test dependency, an oracle).

float32 tolerance: 1e-5 relative to the output's max magnitude (the two differ only in the order
of floating-point operations: PEFT materialises ΔW, lohakit may use the factored chain).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from helpers.models import CASES, Case, run
from lohakit import LoHaConfig, get_peft_model

PEFT_CASES = [c for c in CASES if c.peft]


def peft_and_lohakit(case: Case, **overrides):
    """The same base model adapted by PEFT and by lohakit, with lohakit's factors copied into PEFT."""
    kwargs = {**case.config, "init_weights": False, **overrides}
    base = case.build()
    ours = get_peft_model(copy.deepcopy(base), LoHaConfig(**kwargs))
    peft_kwargs = {k: v for k, v in kwargs.items() if k != "rank_dropout_scale"}
    theirs = peft.get_peft_model(base, peft.LoHaConfig(**peft_kwargs))
    our_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".hada_" not in name:
                continue
            key = "model." + name.removeprefix("base_model.model.")
            assert key in our_params, f"PEFT parameter {name} has no lohakit counterpart {key}"
            assert our_params[key].shape == p.shape, (name, our_params[key].shape, p.shape)
            p.copy_(our_params[key])
            copied += 1
    assert copied == sum(1 for n in our_params if ".hada_" in n)
    return ours, theirs


def parity(case: Case, path: str = "auto", **overrides) -> tuple[float, float]:
    ours, theirs = peft_and_lohakit(case, **overrides)
    ours.set_compute_path(path)
    inputs = case.inputs(torch.float32)
    with torch.no_grad():
        a = run(ours, inputs)
        b = run(theirs, inputs)
        with theirs.disable_adapter():
            base = run(theirs, inputs)
    assert not torch.allclose(b, base), "the adapter must change the output for the comparison to mean anything"
    abs_err = (a - b).abs().max().item()
    return abs_err, abs_err / b.abs().max().item()


@pytest.mark.parametrize("path", ["factored", "materialised"])
@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: c.name)
def test_outputs_equal_peft(case: Case, path: str):
    _, rel = parity(case, path, r=4, alpha=6.0)
    assert rel < 1e-5


@pytest.mark.parametrize("case", [c for c in PEFT_CASES if c.name in ("llama", "bert", "conv2d_effective")], ids=lambda c: c.name)
def test_rank_and_alpha_patterns_equal_peft(case: Case):
    first = case.config["target_modules"][0]
    _, rel = parity(case, rank_pattern={first: 2}, alpha_pattern={first: 11.0}, r=3, alpha=2.0)
    assert rel < 1e-5


@pytest.mark.parametrize("case", [c for c in PEFT_CASES if c.name in ("llama", "conv2d")], ids=lambda c: c.name)
def test_merged_weights_equal_peft(case: Case):
    ours, theirs = peft_and_lohakit(case, r=4, alpha=3.0)
    a = ours.merge_and_unload()
    b = theirs.merge_and_unload()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradients_equal_peft():
    case = next(c for c in PEFT_CASES if c.name == "llama")
    ours, theirs = peft_and_lohakit(case, r=4, alpha=3.0)
    inputs = case.inputs(torch.float32)
    for m in (ours, theirs):
        out = run(m, inputs)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for n, p in ours.named_parameters():
        if p.grad is None:
            continue
        ref = theirs_grads[n.removeprefix("model.")]
        assert ((p.grad - ref).abs().max() / ref.abs().max()).item() < 1e-4, n
