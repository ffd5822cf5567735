"""The benchmark harness still runs (tiny shapes, one repetition; no timing is asserted).

A GPU session has minutes of device time: a bench that crashes there on a Python error wastes
them, so the code paths `scripts/gpu_check.sh` relies on are exercised here on CPU, the
``lohakit_triton`` variant included (under Triton's interpreter).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import variants as V  # noqa: E402
from bench.layers import _bench  # noqa: E402


def test_available_variants_skips_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lycoris" else real(name, *a))
    got = V.available_variants("cpu", ("floor", "lycoris_loha", "lycoris_bypass", "lohakit"))
    assert got == ("floor", "lohakit")


def test_triton_variant_only_where_kernels_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "lohakit_triton" not in V.available_variants("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = importlib.util.find_spec("triton") is not None
    assert ("lohakit_triton" in V.available_variants("cpu")) == want


def test_with_kernels_switches_only_the_triton_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOHAKIT_TRITON", raising=False)
    seen = []
    probe = lambda: seen.append(os.environ.get("LOHAKIT_TRITON"))  # noqa: E731
    V.with_kernels("lohakit", probe)()
    V.with_kernels("lohakit_triton", probe)()
    assert seen == [None, "1"] and "LOHAKIT_TRITON" not in os.environ


def test_layer_bench_rows_for_every_variant() -> None:
    pytest.importorskip("peft")
    variants = ("floor", "peft_lora", "peft_loha", "lohakit", "lohakit_factored", "lohakit_mat")
    if importlib.util.find_spec("triton") is not None:
        variants += ("lohakit_triton",)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24, bias=False))
    rows = _bench(base, torch.randn(16, 32), "tiny", "linear", 4, False, variants, 1, "cpu")
    assert [r["variant"] for r in rows] == list(variants)
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)


def test_diffusion_suite_rows_and_report() -> None:
    """``python -m bench diffusion`` at tiny shapes: SD1 (convs included) and FLUX stacks, every variant."""
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from bench.diffusion import DIFFUSION_VARIANTS, run
    from bench.report import table, targets

    rows = run(True, "cpu", ranks=(4,), reps=1, size="tiny", memory=False)
    want = V.available_variants("cpu", DIFFUSION_VARIANTS)
    assert [r["variant"] for r in rows] == list(want) * 2
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert "### diffusion" in table(rows)
    rows8 = [dict(r, case=r["case"].replace("r=4", "r=8")) for r in rows]
    assert "diffusion SD1 r=8 step: lohakit / peft_loha" in targets(rows8)


def test_diffusion_memory_worker() -> None:
    """The peak-memory worker (run in-process here; the suite runs it in a fresh process per variant)."""
    pytest.importorskip("diffusers")
    from bench.diffusion import worker

    got = worker("flux", "tiny", "lohakit", 4, "cpu", 1)
    assert got["peak_mb"] > 0 and got["before_mb"] >= 0
