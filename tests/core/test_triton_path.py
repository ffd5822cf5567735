"""The training path with the Triton kernels switched on (``LOHAKIT_TRITON=1``).

On a CPU machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here
before anything imports triton); on a CUDA machine the same tests run the compiled kernels on
the GPU. The kernel path must give what the torch path gives:

| dtype   | compared with             | tolerance                     |
|---------|---------------------------|-------------------------------|
| float64 | the torch path, gradcheck | 1e-10 (same sums, other order) |
| float32 | the torch path            | rtol 1e-5, atol 1e-5           |

The kernels themselves (shapes, strides, tails, bf16) are tested in ``test_kernels.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from lohakit import LoHaConfig, LoHaModel  # noqa: E402
from lohakit.core import kernels  # noqa: E402
from lohakit.core import functional as Fn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = torch.float64
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture
def triton_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOHAKIT_TRITON", "1")


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls into the kernels, so no test here can pass on the torch path alone."""
    calls = [0]
    for name in ("kr_project", "kr_expand", "kr_project_grad"):
        real = getattr(kernels, name)

        def counted(*a, _real=real, **k):
            calls[0] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def _factors(out_f: int, in_f: int, r1: int, r2: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = ((out_f, r1), (r1, in_f), (out_f, r2), (r2, in_f))
    return [torch.randn(s, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True) for s in shapes]


def _run(fused: bool, x, factors, scale, base_or_weight, bias=None):
    if fused:
        y = Fn.FactoredLinearFused.apply(x, base_or_weight, bias, *factors, scale)
    else:
        y = Fn.FactoredLinear.apply(x, base_or_weight, *factors, scale)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype).to(DEVICE)
    grads = torch.autograd.grad(y, [x, *factors], g)
    return y, grads


def test_switch_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 2, device=DEVICE)
    monkeypatch.delenv("LOHAKIT_TRITON", raising=False)
    assert not kernels.triton_enabled(x)
    monkeypatch.setenv("LOHAKIT_TRITON", "1")
    assert kernels.triton_enabled(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("fused", [False, True], ids=["FactoredLinear", "FactoredLinearFused"])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["scalar", "row_mask"])
def test_kernel_path_matches_torch_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, fused: bool, vector_scale: bool
) -> None:
    out_f, in_f, r1, r2 = 37, 29, 3, 5
    factors = _factors(out_f, in_f, r1, r2, dtype)
    x = torch.randn(2, 9, in_f, dtype=dtype, device=DEVICE, requires_grad=True)
    base = torch.randn(out_f, in_f, dtype=dtype, device=DEVICE) if fused else torch.randn(2, 9, out_f, dtype=dtype, device=DEVICE)
    bias = torch.randn(out_f, dtype=dtype, device=DEVICE) if fused else None
    scale = (torch.rand(out_f, dtype=dtype) + 0.5).to(DEVICE) if vector_scale else 0.7
    monkeypatch.delenv("LOHAKIT_TRITON", raising=False)
    y_ref, g_ref = _run(fused, x, factors, scale, base, bias)
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.setenv("LOHAKIT_TRITON", "1")
    y, grads = _run(fused, x, factors, scale, base, bias)
    assert calls[0] == 6  # forward: project + expand; backward: 2 grads, project, expand
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for name, a, b in zip(("x", "w1a", "w1b", "w2a", "w2b"), grads, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)


def test_kernel_path_gradcheck_float64(triton_on: None) -> None:
    factors = _factors(6, 5, 2, 3, D)
    x = torch.randn(4, 5, dtype=D, device=DEVICE, requires_grad=True)
    base = torch.randn(4, 6, dtype=D, device=DEVICE, requires_grad=True)

    def f(x, base, w1a, w1b, w2a, w2b):
        return Fn.FactoredLinear.apply(x, base, w1a, w1b, w2a, w2b, 0.7)

    assert torch.autograd.gradcheck(f, (x, base, *factors))


def test_training_step_with_kernels_equals_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoHaModel step (fused nn.Linear path, frozen factors skipped) is the same with the kernels."""

    def step(use: bool) -> list[torch.Tensor]:
        if use:
            monkeypatch.setenv("LOHAKIT_TRITON", "1")
        else:
            monkeypatch.delenv("LOHAKIT_TRITON", raising=False)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16))
        m = LoHaModel(base, LoHaConfig(r=4, alpha=8, target_modules=["0", "2"], init_weights=False)).to(D).to(DEVICE)
        for _, layer in m.loha_layers():
            layer.compute_path = "factored"
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        x = torch.randn(3, 7, 24, dtype=D, device=DEVICE)
        m(x).square().mean().backward()
        opt.step()
        return [p.detach().clone() for p in m.parameters() if p.requires_grad]

    calls = _count_kernel_calls(monkeypatch)
    with_kernels = step(True)
    assert calls[0] > 0
    for a, b in zip(with_kernels, step(False)):
        torch.testing.assert_close(a, b, **TOL[D])
