"""Cost-model calibration: factored vs materialised fwd+bwd for single layers.

For each (layer, N, r) the two forced paths run interleaved; the table gives
t_factored / t_materialised and what :func:`lohakit.core.functional.prefer_factored` predicts,
so FACTORED_COST_BIAS can be checked against this machine.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lohakit.core import functional as Fn

from .layers import FwdBwd
from .timing import interleaved_medians
from .variants import build_variant


def cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    lin = [(d, n) for d in ((64, 256, 1024) if not quick else (64, 1024)) for n in ((16, 512) if quick else (1, 16, 512))]
    out = [(f"linear {d}x{d} N={n}", nn.Sequential(nn.Linear(d, d, bias=False)), (n, d)) for d, n in lin]
    convs = [(c, hw) for c in ((32, 320) if quick else (32, 128, 320)) for hw in ((8, 32) if not quick else (32,))]
    out += [(f"conv3x3 {c}ch {hw}²", nn.Sequential(nn.Conv2d(c, c, 3, padding=1)), (2, c, hw, hw)) for c, hw in convs]
    return out


def run(quick: bool, device: str, reps: int | None = None) -> list[dict]:
    rows = []
    ranks = (4, 16) if quick else (4, 8, 16, 32)
    for name, base, xshape in cases(quick):
        torch.manual_seed(0)
        x = torch.randn(*xshape)
        with torch.no_grad():
            g = torch.randn_like(base(x))
        for r in ranks:
            fns = {v: FwdBwd(build_variant(v, base, ["0"], r), x, g) for v in ("lohakit_factored", "lohakit_mat")}
            med = interleaved_medians(fns, reps=reps or (5 if quick else 9), warmup=1, device=device)
            layer = next(l for _, l in fns["lohakit_factored"].model.model.loha_layers())
            geom = layer.geometry
            n_out = base(x).numel() // geom.out_features
            pred = Fn.prefer_factored(geom, (r, r), False, n_out, n_out, training=True)  # fwd+bwd timed
            rows.append({"suite": "calibrate", "case": f"{name} r={r}", "variant": "factored/materialised",
                         "ratio": med["lohakit_factored"] / med["lohakit_mat"], "predicted_factored": pred,
                         "ms_factored": med["lohakit_factored"], "ms_materialised": med["lohakit_mat"]})
    return rows
