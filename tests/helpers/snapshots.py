"""One strict "nothing changed" check shared by every test of a failed operation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from lohakit import LoHaModel


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call could change: module tree (by identity), tensors, flags, modes."""
    return {
        "tree": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "tensors": {n: (t.detach().clone(), id(t)) for n, t in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "peft_config": copy.deepcopy(getattr(model, "peft_config", None)),
        "active": getattr(model, "active_adapter", None) if isinstance(model, LoHaModel) else None,
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["tree"] == before["tree"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (t, ident) in before["tensors"].items():
        t2, ident2 = after["tensors"][k]
        assert ident2 == ident, k
        assert t2.dtype == t.dtype and torch.equal(t2, t), k
    assert after["grad"] == before["grad"]
    assert after["modes"] == before["modes"]
    assert after["peft_config"] == before["peft_config"]
    assert after["active"] == before["active"]
