"""``lohakit inspect``: what is inside a LoHa adapter, module by module, without building ΔW.

The report names the model family the file's module names give away (SD 1.x/2.x, SDXL, FLUX.1,
SD3/3.5; see :mod:`lohakit.formats.families`), e.g. a kohya FLUX file's fused
``lora_unet_double_blocks_0_img_attn_qkv`` rows are listed as stored (q, k, v stacked).

Reads a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) through
the loaders' own reader (:func:`lohakit.formats.peft.read_adapter`: both files read consistently,
config and patterns checked) or a kohya/LyCORIS ``.safetensors`` file through
:func:`lohakit.core.io.load_state_dict` (never unpickled). Every module's factors are then checked
as the loaders check them without a model (:func:`check_module_factors`: dimensions, matching
ranks and sizes, no empty dimension, finite values, a finite alpha; for a PEFT directory the
rank the config gives), so a malformed file is a :class:`~lohakit.core.io.LoHaFormatError`
naming the file and the key, never an arithmetic error.

The Frobenius norm of ΔW = s · (A1 B1) ⊙ (A2 B2) is computed through the factored form
(BRIEF §2): ΔW = s · P Q with P = A1 ⊙_row A2 (out × r1·r2) and Q = B1 ⊙_col B2 (r1·r2 × in), so

    ‖ΔW‖_F² = s² · trace((PᵀP)(QQᵀ)) = s² · Σ_ij (PᵀP)_ij (QQᵀ)_ij

with two r²×r² Gram matrices: O((out + in)·r⁴) work, never the out×in matrix. For the Tucker
form, branch i is W_i = a_iᵀ M_i with M_i[p, (c, k)] = Σ_q t_i[p, q, k] b_i[q, c] (r × in·k),
which is the same structure with A_i = a_iᵀ and B_i = M_i.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.functional import HadaFactors, frobenius_norm
from ..core.io import NonFiniteTensorError, StateDictMismatchError, load_state_dict, tensor_is_finite

__all__ = ["inspect_adapter", "format_table", "factored_frobenius", "read_loha_modules", "check_module_factors"]

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_PEFT_PREFIX = "base_model.model."


def factored_frobenius(f: dict[str, torch.Tensor], scale: float) -> float:
    """‖ΔW‖_F from the factors (keys ``hada_w1_a`` …, optional ``hada_t1``/``hada_t2``), in float64.

    Shapes: plain w1_a, w2_a (out, r), w1_b, w2_b (r, in·k); Tucker w1_a, w2_a (r, out),
    w1_b, w2_b (r, in), t1, t2 (r, r, *k).
    """
    def get(k: str) -> torch.Tensor | None:
        return f[k].detach().to(torch.float64) if k in f else None

    tucker = "hada_t1" in f and "hada_t2" in f
    factors = HadaFactors(
        get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"),
        get("hada_t1") if tucker else None, get("hada_t2") if tucker else None,
    )
    if not tucker:  # a kohya conv file may store w1_b as (r, in, *k): flatten
        factors = factors._replace(w1b=factors.w1b.reshape(factors.w1b.shape[0], -1), w2b=factors.w2b.reshape(factors.w2b.shape[0], -1))
    return abs(scale) * float(frobenius_norm(factors, 1.0))


def _group(sd: dict[str, torch.Tensor], strip: str = "") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """(module -> {factor: tensor}, module -> alpha tensor, other keys)."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for key, t in sd.items():
        k = key[len(strip):] if strip and key.startswith(strip) else key
        mod, _, leaf = k.rpartition(".")
        if leaf in _FACTORS:
            mods.setdefault(mod, {})[leaf] = t
        elif leaf == "alpha" and t.numel() == 1:
            alphas[mod] = t
        else:
            other.append(key)
    return mods, alphas, other


def _shape(t: torch.Tensor) -> str:
    return "×".join(str(d) for d in t.shape) or "scalar"


def check_module_factors(
    where: str, name: str, f: Mapping[str, Any], alpha: float | None = None, *, equal_ranks: bool = False,
    rank: int | None = None,
) -> None:
    """Check one module's LoHa factors as the loaders do without a model; raise naming file and key.

    Flat: ``w1_a, w2_a`` (out, r1/r2), ``w1_b, w2_b`` (r1/r2, in[, *k]) with the same out and in.
    Tucker (``t1`` and ``t2``): ``w1_a, w2_a`` (r, out), ``w1_b, w2_b`` (r, in),
    ``t1, t2`` (r, r, *k) with the same kernel. Every dimension non-zero, every tensor a real
    floating tensor of finite values, ``alpha`` finite. ``equal_ranks``: r1 == r2 (both loaders
    need it); ``rank``: the rank the config gives the module.

    Raises:
        StateDictMismatchError / NonFiniteTensorError (:class:`LoHaFormatError` subclasses).
    """
    def bad(key: str, what: str) -> StateDictMismatchError:
        return StateDictMismatchError(f"{where}: {name}.{key}: {what}")

    missing = [k for k in _FACTORS[:4] if k not in f]
    if missing:
        raise StateDictMismatchError(f"{where}: module {name!r}: factor(s) {missing} missing")
    if ("hada_t1" in f) != ("hada_t2" in f):
        have = "hada_t1" if "hada_t1" in f else "hada_t2"
        raise StateDictMismatchError(f"{where}: module {name!r} has {have} but not its pair (Tucker needs hada_t1 and hada_t2)")
    for key, t in f.items():
        if not isinstance(t, torch.Tensor):
            raise bad(key, f"is {type(t).__name__}, expected a tensor")
        if not t.is_floating_point():
            raise bad(key, f"has dtype {t.dtype}, expected a real floating-point tensor")
        if t.ndim < 2:
            raise bad(key, f"has shape {_shape(t)}, expected at least 2 dimensions")
        if 0 in t.shape:
            raise bad(key, f"has an empty dimension (shape {_shape(t)})")
    tucker = "hada_t1" in f
    w1a, w1b, w2a, w2b = (f[k] for k in _FACTORS[:4])
    if tucker:
        for key in _FACTORS[:4]:
            if f[key].ndim != 2:
                raise bad(key, f"has shape {_shape(f[key])}, expected 2 dimensions (Tucker layout)")
        r1, r2 = w1a.shape[0], w2a.shape[0]
        t1, t2 = f["hada_t1"], f["hada_t2"]
        checks = [
            ("hada_w2_a", w2a.shape[1] == w1a.shape[1], f"{w2a.shape[1]} output channels, hada_w1_a has {w1a.shape[1]}"),
            ("hada_w1_b", w1b.shape[0] == r1, f"rank {w1b.shape[0]}, hada_w1_a has rank {r1}"),
            ("hada_w2_b", w2b.shape[0] == r2, f"rank {w2b.shape[0]}, hada_w2_a has rank {r2}"),
            ("hada_w2_b", w2b.shape[1] == w1b.shape[1], f"{w2b.shape[1]} input channels, hada_w1_b has {w1b.shape[1]}"),
            ("hada_t1", t1.ndim >= 3 and tuple(t1.shape[:2]) == (r1, r1), f"shape {_shape(t1)}, expected ({r1}, {r1}, *kernel)"),
            ("hada_t2", t2.ndim >= 3 and tuple(t2.shape[:2]) == (r2, r2), f"shape {_shape(t2)}, expected ({r2}, {r2}, *kernel)"),
            ("hada_t2", t2.shape[2:] == t1.shape[2:], f"kernel {tuple(t2.shape[2:])}, hada_t1 has {tuple(t1.shape[2:])}"),
        ]
    else:
        if w1a.ndim != 2 or w2a.ndim != 2:
            k = "hada_w1_a" if w1a.ndim != 2 else "hada_w2_a"
            raise bad(k, f"has shape {_shape(f[k])}, expected (out, rank)")
        r1, r2 = w1a.shape[1], w2a.shape[1]
        checks = [
            ("hada_w2_a", w2a.shape[0] == w1a.shape[0], f"{w2a.shape[0]} output rows, hada_w1_a has {w1a.shape[0]}"),
            ("hada_w1_b", w1b.shape[0] == r1, f"rank {w1b.shape[0]}, hada_w1_a has rank {r1}"),
            ("hada_w2_b", w2b.shape[0] == r2, f"rank {w2b.shape[0]}, hada_w2_a has rank {r2}"),
            ("hada_w2_b", w2b.shape[1:] == w1b.shape[1:], f"input shape {tuple(w2b.shape[1:])}, hada_w1_b has {tuple(w1b.shape[1:])}"),
        ]
    for key, ok, what in checks:
        if not ok:
            raise bad(key, f"does not match the other factors: {what}")
    if equal_ranks and r1 != r2:
        raise bad("hada_w2_b", f"rank {r2} differs from hada_w1's rank {r1}; LoHa files need equal branch ranks")
    if rank is not None and (r1 != rank or r2 != rank):
        raise bad("hada_w1_b", f"rank {r1}/{r2} in the tensors, but the config gives this module rank {rank}")
    for key, t in f.items():
        try:
            finite = tensor_is_finite(t)
        except TypeError as e:
            raise bad(key, str(e)) from None
        if not finite:
            raise NonFiniteTensorError(f"{where}: {name}.{key}: holds NaN or inf")
    if alpha is not None and not math.isfinite(alpha):
        raise NonFiniteTensorError(f"{where}: {name}.alpha: not finite ({alpha})")


def read_loha_modules(path: str | os.PathLike, *, equal_ranks: bool = False) -> dict[str, Any]:
    """Read and check an adapter: ``{"format", "path", "modules": {name: factors}, "alpha": {name: float|None},
    "other_keys", "config"}`` (every module passed :func:`check_module_factors`).

    Raises:
        LoHaFormatError: (a subclass) an unreadable or malformed file, naming it and the key.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"adapter {str(p)!r} does not exist")
    if p.is_dir():
        cfg_file, st = p / "adapter_config.json", p / "adapter_model.safetensors"
        if not cfg_file.is_file():
            raise ValueError(f"{str(p)!r} is not a PEFT adapter directory (no adapter_config.json)")
        if not st.is_file():
            raise ValueError(f"PEFT adapter directory {str(p)!r} has no adapter_model.safetensors")
        from ..core.targets import rank_and_alpha
        from ..formats.peft import read_adapter

        _, config, sd = read_adapter(p)
        mods, _, other = _group(sd, strip=_PEFT_PREFIX)
        alpha: dict[str, float | None] = {}
        for m, f in mods.items():
            r, a = rank_and_alpha(config, m)
            check_module_factors(str(st), _PEFT_PREFIX + m, f, float(a), equal_ranks=True, rank=r)
            alpha[m] = float(a)
        return {"format": "peft", "path": str(p), "modules": mods, "alpha": alpha, "other_keys": other, "config": config.to_dict()}
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter {str(p)!r}: expected a PEFT directory or a .safetensors file")
    sd = load_state_dict(p)
    mods, alphas, other = _group(sd)
    for key in other:
        if key.endswith(".alpha") and key[: -len(".alpha")] in mods:
            raise StateDictMismatchError(f"{p}: {key}: has shape {_shape(sd[key])}, expected a single number (the module's alpha)")
    alpha_of: dict[str, float | None] = {}
    for m, f in mods.items():
        a = alphas.get(m)
        if a is not None and not a.is_floating_point() and a.dtype == torch.bool:
            raise StateDictMismatchError(f"{p}: {m}.alpha: has dtype {a.dtype}, expected a number")
        alpha_of[m] = float(a.reshape(()).to(torch.float64)) if a is not None else None
        check_module_factors(str(p), m, f, alpha_of[m], equal_ranks=equal_ranks)
    return {
        "format": "kohya",
        "path": str(p),
        "modules": mods,
        "alpha": alpha_of,
        "other_keys": other,
        "config": None,
    }


def _module_row(name: str, f: dict[str, torch.Tensor], alpha: float | None) -> dict[str, Any]:
    missing = [k for k in _FACTORS[:4] if k not in f]
    if missing:
        raise ValueError(f"module {name!r}: factor(s) {missing} missing")
    tucker = "hada_t1" in f and "hada_t2" in f
    w1a, w1b, w2a = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"]
    if tucker:
        r1, r2 = w1a.shape[0], w2a.shape[0]
        shape = [w1a.shape[1], w1b.shape[1], *f["hada_t1"].shape[2:]]
    else:
        r1, r2 = w1b.shape[0], f["hada_w2_b"].shape[0]
        shape = [w1a.shape[0], *w1b.shape[1:]]
    rank = r1
    scale = alpha / rank if alpha is not None else 1.0
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in f.values()})
    return {
        "module": name,
        "type": "conv-tucker" if tucker else "linear/flat",
        "shape": shape,
        "rank": rank if r1 == r2 else [r1, r2],
        "alpha": alpha,
        "scale": scale,
        "params": sum(t.numel() for t in f.values()),
        "delta_norm": factored_frobenius(f, scale),
        "tucker": tucker,
        "dtype": "/".join(dtypes),
    }


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Per-module facts and totals of a LoHa adapter (see module docstring)."""
    data = read_loha_modules(path)
    if not data["modules"]:
        raise ValueError(f"adapter {str(path)!r} holds no LoHa (hada_*) tensors")
    rows = [_module_row(m, f, data["alpha"].get(m)) for m, f in sorted(data["modules"].items())]
    from ..formats.families import guess_file_family

    fam, evidence = guess_file_family(list(data["modules"]))
    family = fam.label if fam is not None else (" + ".join(sorted(evidence)) + " (mixed)" if len(evidence) > 1 else None)
    totals = {
        "modules": len(rows),
        "params": sum(r["params"] for r in rows),
        "tucker_modules": sum(r["tucker"] for r in rows),
        # the norm of the per-module norms, in float64 tensors: inf (never OverflowError) for a huge alpha
        "delta_norm": float(torch.tensor([r["delta_norm"] for r in rows] or [0.0], dtype=torch.float64).norm()),
        "other_keys": len(data["other_keys"]),
    }
    return {"format": data["format"], "path": data["path"], "family": family, "modules": rows, "totals": totals}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`inspect_adapter`'s report."""
    head = ["module", "type", "shape", "rank", "alpha", "scale", "params", "‖ΔW‖_F", "tucker", "dtype"]
    body = [
        [
            r["module"],
            r["type"],
            "×".join(str(d) for d in r["shape"]),
            str(r["rank"]),
            "-" if r["alpha"] is None else f"{r['alpha']:g}",
            f"{r['scale']:.4g}",
            f"{r['params']:,}",
            f"{r['delta_norm']:.4g}",
            "yes" if r["tucker"] else "no",
            r["dtype"],
        ]
        for r in report["modules"]
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    right = {3, 4, 5, 6, 7}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    t = report["totals"]
    fam = report.get("family")
    title = f"{report['format']} adapter: {report['path']}" + (f" (module names of {fam})" if fam else "")
    out = [title, line(head), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    out.append(
        f"total: {t['modules']} modules, {t['params']:,} parameters, {t['tucker_modules']} Tucker, "
        f"‖ΔW‖_F over all modules {t['delta_norm']:.4g}" + (f", {t['other_keys']} other tensors" if t["other_keys"] else "")
    )
    return "\n".join(out)
