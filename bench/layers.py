"""(a) one Linear and (c) SD-UNet-shaped 3x3 convs: forward + backward of a single layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from .timing import interleaved_medians
from .variants import WithScalar, available_variants, build_variant, with_kernels


class FwdBwd:
    """``y = layer(x · s)``; ``y.backward(G)`` with a fixed random G; grads dropped after."""

    def __init__(self, model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        self.model = WithScalar(model).train()
        self.x, self.grad = x, grad
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def __call__(self) -> None:
        self.model(self.x).backward(self.grad)
        for p in self.params:
            p.grad = None


def _bench(base: nn.Module, x: torch.Tensor, case: str, suite: str, r: int, effective: bool,
           variants: tuple[str, ...], reps: int, device: str) -> list[dict]:
    with torch.no_grad():
        y = base(x)
    grad = torch.randn_like(y)
    fns = {v: with_kernels(v, FwdBwd(build_variant(v, base, ["0"], r, effective=effective), x, grad)) for v in variants}
    med = interleaved_medians(fns, reps=reps, warmup=2, device=device)
    return [{"suite": suite, "case": case, "variant": v, "ms": med[v], "ratio": med[v] / med["floor"]} for v in variants]


def run_linear(quick: bool, device: str, variants: tuple[str, ...] | None = None, reps: int | None = None,
               r: int = 8) -> list[dict]:
    """One ``d × d`` Linear, N tokens, fwd+bwd. GPU: d ∈ {1024, 4096}, N ∈ {1k, 8k}, bf16; CPU smaller, fp32."""
    if device == "cuda":
        sizes, dtype = [(d, n) for d in (1024, 4096) for n in (1024, 8192)], torch.bfloat16
    else:
        sizes, dtype = ([(1024, 512)] if quick else [(1024, 512), (1024, 2048), (2048, 1024)]), torch.float32
    reps = reps or (10 if quick else 20)
    variants = variants or available_variants(device)
    rows = []
    for d, n in sizes:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(d, d, bias=False)).to(device=device, dtype=dtype)
        x = torch.randn(n, d, device=device, dtype=dtype)
        rows += _bench(base, x, f"d={d} N={n}", "linear", r, False, variants, reps, device)
    return rows


def run_conv(quick: bool, device: str, variants: tuple[str, ...] | None = None, reps: int | None = None,
             ranks: tuple[int, ...] | None = None) -> list[dict]:
    """SD-UNet 3x3 conv (C → C), batch 2, flat and effective (Tucker) forms, fwd+bwd, at each rank."""
    if device == "cuda":
        sizes, dtype = [(c, hw) for c in (320, 640, 1280) for hw in (64, 32)], torch.bfloat16
    else:
        sizes, dtype = ([(320, 32)] if quick else [(320, 32), (640, 16)]), torch.float32
    ranks = ranks or ((8,) if quick else (4, 8, 16, 32, 64))
    reps = reps or (6 if quick else 12)
    variants = variants or available_variants(device)
    rows = []
    for c, hw in sizes:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(c, c, 3, padding=1)).to(device=device, dtype=dtype)
        x = torch.randn(2, c, hw, hw, device=device, dtype=dtype)
        for r in ranks:
            for effective in (False, True):
                form = "effective" if effective else "flat"
                rows += _bench(base, x, f"{c}ch {hw}² {form} r={r}", "conv", r, effective, variants, reps, device)
    return rows
