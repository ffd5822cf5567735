"""Cost-model calibration: the three training paths, fwd+bwd, for single layers.

For each (layer, N, r) the forced paths (factored chain, merged-weight node, materialised ΔW)
run interleaved; the table gives their times, the fastest, and what
:func:`lohakit.core.functional.choose_training_path` picks, with the picked path's time over
the fastest's (the cost of a wrong pick). FACTORED_COST_BIAS and ELEMENTWISE_COST are
checked against this machine with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lohakit.core import functional as Fn

from .layers import FwdBwd
from .timing import interleaved_medians
from .variants import build_variant

#: path name -> bench variant forcing it
PATHS = {"factored": "lohakit_factored", "merged": "lohakit_mweight", "materialised": "lohakit_mat"}


def cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    dims = (64, 1024) if quick else (64, 256, 1024)
    tokens = (16, 512) if quick else (1, 16, 512)
    out = [(f"linear {d}x{d} N={n}", nn.Sequential(nn.Linear(d, d, bias=False)), (n, d)) for d in dims for n in tokens]
    convs = [(c, hw) for c in ((32, 320) if quick else (32, 128, 320)) for hw in ((32,) if quick else (8, 32))]
    out += [(f"conv3x3 {c}ch {hw}²", nn.Sequential(nn.Conv2d(c, c, 3, padding=1)), (2, c, hw, hw)) for c, hw in convs]
    return out


def run(quick: bool, device: str, reps: int | None = None, ranks: tuple[int, ...] | None = None) -> list[dict]:
    rows = []
    ranks = ranks or ((4, 16) if quick else (4, 8, 16, 32))
    for name, base, xshape in cases(quick):
        torch.manual_seed(0)
        x = torch.randn(*xshape)
        with torch.no_grad():
            g = torch.randn_like(base(x))
        for r in ranks:
            fns = {p: FwdBwd(build_variant(v, base, ["0"], r), x, g) for p, v in PATHS.items()}
            med = interleaved_medians(fns, reps=reps or (5 if quick else 9), warmup=1, device=device)
            layer = next(l for _, l in fns["factored"].model.model.loha_layers())
            n_out, n_in = Fn.positions(x, None, layer.geometry)
            pick = Fn.choose_training_path(layer.geometry, [layer.factors("default")], n_out, n_in, merged_ok=True)
            best = min(med, key=med.__getitem__)
            rows.append({"suite": "calibrate", "case": f"{name} r={r}", "variant": "paths",
                         **{f"ms_{p}": med[p] for p in PATHS}, "best": best, "pick": pick,
                         "ratio": med[pick] / med[best]})
    return rows
