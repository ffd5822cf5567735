"""Exact (and compressed) LoRA export of LoHa adapters.

The factored identity ``(A1 B1) ⊙ (A2 B2) = P Q`` with ``P = A1 ⊙_row A2`` (out × r1·r2) and
``Q = B1 ⊙_col B2`` (r1·r2 × n) makes every LoHa adapter a LoRA of rank ``R = r1·r2``::

    ΔW = s · P Q     →     lora_B = s · P  (out × R),   lora_A = Q  (R × n),   LoRA scale 1

with zero error, so LoRA-only runtimes (diffusers, ComfyUI, A1111, vLLM, PEFT) can serve a LoHa
adapter. Convolutions: ``lora_A`` is a convolution with the base layer's kernel
(``(R, in, *k)``, Q reshaped) and ``lora_B`` a 1x1 convolution ``(out, R, 1…)``. Tucker convs are
exact too: ``lora_B[o, (p,p')] = s·w1a[p,o]·w2a[p',o]`` and
``lora_A[(p,p'), c, *k] = Σ_{q,q'} t1[p,q,*k]·t2[p',q',*k]·w1b[q,c]·w2b[q',c]``.
Restriction: grouped convolutions (groups > 1) have no LoRA form and are refused.

``rank=k`` compresses without ever forming the out × n matrix: QR of ``lora_B`` and
``lora_Aᵀ``, an SVD of the small (≤ R × R) core ``R_B R_Aᵀ``, and truncation to the ``k``
largest singular values. The relative Frobenius error ``‖ΔW − ΔW_k‖ / ‖ΔW‖ =
sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²)`` is exact (the Q factors are orthonormal) and is reported
per module.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from ..core.functional import Geometry, HadaFactors, lora_factors
from ..core.layers import LoHaLayer

__all__ = [
    "LoraExport",
    "loha_to_lora_factors",
    "compress_lora",
    "to_lora",
    "lora_peft_state_dict",
    "save_lora_peft",
    "lora_kohya_state_dict",
    "save_lora_kohya",
]


@dataclass
class LoraExport:
    """One module's LoRA factors, scale folded in (apply with LoRA scale 1: ``ΔW = B A``).

    Attributes:
        lora_A: ``(R, in)`` for linear layers, ``(R, in, *k)`` for convs (2-D ``(R, in·prod(k))``
            when the geometry is unknown, i.e. exported from a state dict).
        lora_B: ``(out, R)``, or ``(out, R, 1, …)`` for convs.
        rank: R.
        rel_error: Relative Frobenius error of ``B A`` against the LoHa ΔW (0 for exact export).
        transposed: The base layer stores its weight ``(in, out)`` (transformers' Conv1D).
        is_conv: The base layer is a convolution.
        full_rank: The exact export's rank r1·r2 (``rank`` is lower when compressed).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    rel_error: float
    transposed: bool = False
    is_conv: bool = False
    full_rank: int = 0

    def delta_weight(self) -> torch.Tensor:
        """``B A`` in the (out, in, *k) orientation (for checks; forms the full matrix)."""
        a = self.lora_A.reshape(self.rank, -1)
        b = self.lora_B.reshape(self.lora_B.shape[0], self.rank)
        return (b @ a).reshape(self.lora_B.shape[0], *self.lora_A.shape[1:])  # (out, in, *k)


def loha_to_lora_factors(
    factors: HadaFactors, scale: float, kernel_size: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors of one LoHa adapter: ``(B, A_flat)`` with ``s·(w1a@w1b)⊙(w2a@w2b) = B @ A_flat``.

    Args:
        factors: The LoHa factors (lohakit layout; Tucker cores ``(r, r, *k)`` or PEFT's Conv1d ``(r, r, k, 1)``).
        scale: ``alpha / r`` (times any multiplier); folded into B.
        kernel_size: The conv kernel (needed for Tucker factors).

    Returns:
        ``B`` (out × r1·r2) and ``A_flat`` (r1·r2 × in·prod(k)), float64.
    """
    f = HadaFactors(*(t.detach().to(torch.float64) if t is not None else None for t in factors))
    if f.tucker and kernel_size:
        f = f._replace(t1=f.t1.reshape(*f.t1.shape[:2], *kernel_size), t2=f.t2.reshape(*f.t2.shape[:2], *kernel_size))
    return lora_factors(f, scale)


def compress_lora(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``B @ A`` through QR of the factors and an SVD of the small core.

    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, ``R_B R_Aᵀ = U Σ Vᵀ``; then
    ``B_k = Q_B U_k Σ_k^½`` (out × k) and ``A_k = Σ_k^½ V_kᵀ Q_Aᵀ`` (k × n).

    Args:
        b: ``(out, R)``.
        a: ``(R, n)``.
        rank: Target rank k ≥ 1 (capped at the core's size).

    Returns:
        ``(B_k, A_k, relative Frobenius error)``, in ``b``'s dtype.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)  # (out, m1), (m1, R)
    qa, ra = torch.linalg.qr(a64.T)  # (n, m2), (m2, R)
    core = rb @ ra.T  # (m1, m2), at most R x R
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, s.numel())
    total = float(s.pow(2).sum())
    err = math.sqrt(max(float(s[k:].pow(2).sum()), 0.0) / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    bk = qb @ (u[:, :k] * root)  # (out, k)
    ak = (root[:, None] * vh[:k]) @ qa.T  # (k, n)
    return bk.to(b.dtype), ak.to(a.dtype), err


def _shape(b: torch.Tensor, a: torch.Tensor, geom: Geometry | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Reshape flat factors for the layer: conv A gets the kernel, conv B becomes 1x1."""
    if geom is None or geom.ndim == 0:
        return b, a, False
    rank = a.shape[0]
    return b.reshape(b.shape[0], rank, *([1] * geom.ndim)), a.reshape(rank, geom.in_features, *geom.kernel_size), True


def _export_one(
    factors: HadaFactors, scale: float, geom: Geometry | None, rank: int | None, where: str
) -> LoraExport:
    if geom is not None and geom.groups != 1:
        raise ValueError(f"{where}: grouped convolution (groups={geom.groups}) has no LoRA form; not exported")
    dtype = torch.float32
    b, a = loha_to_lora_factors(factors, scale, geom.kernel_size if geom is not None else ())
    full = int(b.shape[1])
    err = 0.0
    if rank is not None:
        b, a, err = compress_lora(b, a, rank)
    b, a, is_conv = _shape(b.to(dtype), a.to(dtype), geom)
    return LoraExport(a.contiguous(), b.contiguous(), int(a.shape[0]), err,
                      transposed=bool(geom.transposed) if geom is not None else False, is_conv=is_conv, full_rank=full)


def _from_module(model: nn.Module, adapter_name: str | None, rank: int | None) -> dict[str, LoraExport]:
    from ..core.model import LoHaModel

    root = model.model if isinstance(model, LoHaModel) else model
    if adapter_name is None and isinstance(model, LoHaModel):
        adapter_name = model.active_adapters[0]
    out: dict[str, LoraExport] = {}
    for path, layer in root.named_modules():
        if not isinstance(layer, LoHaLayer):
            continue
        names = layer.adapter_names
        name = adapter_name if adapter_name is not None else ("default" if "default" in names else (names[0] if len(names) == 1 else None))
        if name is None:
            raise ValueError(f"{path}: several adapters {names}; pass adapter_name")
        if name not in names:
            continue
        out[path] = _export_one(layer.factors(name), layer.scaling[name], layer.geometry, rank, path)
    if not out:
        raise ValueError(f"no LoHa layer holds adapter {adapter_name!r}")
    return out


def _kohya_geometries(
    names: list[str], models: Mapping[str, nn.Module] | None
) -> dict[str, Geometry]:
    """Geometry of the module each file module name maps to in ``models`` (fused names: none)."""
    if not models:
        return {}
    from ..core.layers import geometry_of
    from ..formats.kohya import _unwrap, kohya_name_table

    table = kohya_name_table(models)
    out: dict[str, Geometry] = {}
    for name in names:
        hits = table.get(name, [])
        if len(hits) == 1 and isinstance(hits[0][1], str):
            prefix, path = hits[0]
            m = _unwrap(models[prefix]).get_submodule(path)
            geom = geometry_of(getattr(m, "base_layer", m))
            if geom is not None:
                out[name] = geom
    return out


def _conv_test(names: list[str]) -> Any:
    """``name -> bool``: whether a file module may be a convolution (its kernel is not in a flat
    LoHa), by the conv names of the file's family (of every family when the file does not tell)."""
    import re

    from ..formats.families import _families, guess_file_family

    fam, _ = guess_file_family(names)
    words = [fam.conv_words] if fam is not None else [f.conv_words for f in _families()]
    return lambda name: bool(re.search(r"conv", name)) or any(re.search(w, name) for w in words)


def _from_kohya_state_dict(
    sd: Mapping[str, torch.Tensor], rank: int | None, models: Mapping[str, nn.Module] | None = None
) -> dict[str, LoraExport]:
    from ..core.io import LoHaFormatError
    from ..formats.kohya import _group_keys

    groups, _ = _group_keys(sd)
    if not groups:
        raise LoHaFormatError(f"state dict has no LoHa module (keys '<name>.hada_w1_a' …); first keys: {sorted(sd)[:5]}")
    geoms = _kohya_geometries(sorted(groups), models)
    may_be_conv = _conv_test(sorted(groups))
    out: dict[str, LoraExport] = {}
    for name, g in sorted(groups.items()):
        missing = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in g]
        if missing:
            raise LoHaFormatError(f"kohya module {name!r}: missing key(s) {missing}")
        r = int(g["hada_w1_b"].shape[0])
        alpha = float(g["alpha"].float().reshape(())) if "alpha" in g else float(r)
        f = HadaFactors(g["hada_w1_a"], g["hada_w1_b"], g["hada_w2_a"], g["hada_w2_b"], g.get("hada_t1"), g.get("hada_t2"))
        if f.t1 is not None and f.t2 is None:
            raise LoHaFormatError(f"kohya module {name!r}: hada_t1 without hada_t2")
        geom = geoms.get(name)
        if geom is None and f.t1 is not None:  # Tucker factors carry the kernel: shape the conv export
            k = tuple(f.t1.shape[2:])
            geom = Geometry(out_features=f.w1a.shape[1], in_features=f.w1b.shape[1], kernel_size=k,
                            stride=(1,) * len(k), padding=(0,) * len(k), dilation=(1,) * len(k))
        elif geom is None and may_be_conv(name):
            raise LoHaFormatError(
                f"kohya module {name!r}: a flat LoHa on what may be a convolution; its kernel shape is not in the "
                "file, so its LoRA factors cannot be shaped: pass the base model (convert --base MODEL_DIR)"
            )
        elif geom is not None and int(f.w1b.shape[-1]) != geom.in_features * geom.kernel_numel and f.t1 is None:
            raise LoHaFormatError(
                f"kohya key {name}.hada_w1_b: shape {tuple(f.w1b.shape)} does not fit the model's module "
                f"(in {geom.in_features} × kernel {geom.kernel_size})"
            )
        out[name] = _export_one(f, alpha / r, geom, rank, name)
    return out


def to_lora(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    rank: int | None = None,
    adapter_name: str | None = None,
    models: Mapping[str, nn.Module] | None = None,
) -> dict[str, LoraExport]:
    """Export LoHa adapters as LoRA factors: exact (rank r1·r2) or compressed to ``rank``.

    Args:
        model_or_state_dict: A LoHaModel / any module holding LoHa layers (keys: module paths),
            or a kohya LoHa state dict (keys: file module names). From a state dict, Tucker convs
            carry their kernel; a flat LoHa on a module that may be a convolution needs
            ``models`` (else :class:`~lohakit.core.io.LoHaFormatError`: the kernel is unknown).
        rank: None for the exact export, else the target rank (QR + small SVD, never an SVD
            of the full ΔW).
        adapter_name: Which adapter (default: the active one of a LoHaModel, else "default"
            or the only one).
        models: For a state dict: prefix -> model (e.g. ``pipeline_models(pipe)[0]``); file names
            are matched as :func:`~lohakit.formats.kohya.load_kohya` does and conv factors get the
            module's kernel.

    Returns:
        module key -> :class:`LoraExport` (``rel_error`` per module; 0.0 when exact).
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _from_module(model_or_state_dict, adapter_name, rank)
    if isinstance(model_or_state_dict, Mapping):
        return _from_kohya_state_dict(model_or_state_dict, rank, models)
    raise TypeError(f"to_lora needs an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------
def lora_peft_state_dict(exports: Mapping[str, LoraExport], prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """PEFT LoRA keys ``<prefix><path>.lora_A.weight`` / ``.lora_B.weight`` (diffusers: prefix ``"unet."``)."""
    sd: dict[str, torch.Tensor] = {}
    for path, e in exports.items():
        sd[f"{prefix}{path}.lora_A.weight"] = e.lora_A.detach().cpu().contiguous()
        sd[f"{prefix}{path}.lora_B.weight"] = e.lora_B.detach().cpu().contiguous()
    return sd


def lora_peft_config(exports: Mapping[str, LoraExport], base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict: r/alpha defaults from the most common rank, per-module patterns."""
    from ..formats.kohya import _patterns_from

    ranks = {p: e.rank for p, e in exports.items()}
    r, rank_pattern = _patterns_from(ranks)
    alpha, alpha_pattern = _patterns_from({p: float(e.rank) for p, e in exports.items()})  # LoRA scale 1
    transposed = [e.transposed for e in exports.values()]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(exports),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(transposed) and all(transposed),
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "revision": None,
    }


def save_lora_peft(
    exports: Mapping[str, LoraExport],
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Loads with ``peft.PeftModel.from_pretrained(base_model, save_directory)``.
    """
    from ..formats.peft import PEFT_FORMAT_VERSION, write_adapter_dirs

    if not exports:
        raise ValueError("save_lora_peft: nothing to write (empty export)")
    sd = {k: v.to(dtype) for k, v in lora_peft_state_dict(exports).items()}
    config = lora_peft_config(exports, base_model_name_or_path)
    config["peft_version"] = PEFT_FORMAT_VERSION
    write_adapter_dirs([(save_directory, config, sd)])


def lora_kohya_name(
    prefix: str,
    path: str,
    names: Mapping[str, Mapping[str, str]] | None = None,
    models: Mapping[str, nn.Module] | None = None,
) -> str:
    """The kohya module name :func:`lora_kohya_state_dict` writes ``path`` under ``prefix`` as.

    A prefix of ``""`` means ``path`` already is a kohya module name (unless overridden in ``names``).
    """
    from ..formats.kohya import export_name

    table = (names or {}).get(prefix)
    if not prefix:
        return (table or {}).get(path) or path
    return export_name(prefix, path, (models or {}).get(prefix), table)


def lora_kohya_state_dict(
    exports_by_prefix: Mapping[str, Mapping[str, LoraExport]],
    dtype: torch.dtype | None = torch.float16,
    names: Mapping[str, Mapping[str, str]] | None = None,
    models: Mapping[str, nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya LoRA tensors (``lora_down.weight`` = A, ``lora_up.weight`` = B, ``alpha`` = rank) and metadata.

    Args:
        exports_by_prefix: prefix -> {module path: export}; a prefix of ``""`` means the keys
            already are kohya module names (exports from a kohya state dict).
        dtype: Storage dtype.
        names: Per prefix ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names).
        models: Optional prefix -> model, for legacy name prefixes (CLIPTextModel's
            ``text_model`` under transformers 5).
    """
    sd: dict[str, torch.Tensor] = {}
    ranks: list[int] = []
    from ..formats.kohya import export_names

    for prefix, exports in exports_by_prefix.items():
        model = (models or {}).get(prefix)
        known = export_names(prefix, model, (names or {}).get(prefix)) if prefix and model is not None else {}
        for path, e in exports.items():
            name = known.get(path) or lora_kohya_name(prefix, path, names, models)
            if f"{name}.alpha" in sd:
                raise ValueError(f"two modules get the kohya name {name!r}")
            cast = (lambda t: t.detach().cpu().to(dtype).contiguous()) if dtype is not None else (lambda t: t.detach().cpu().contiguous())
            sd[f"{name}.lora_down.weight"] = cast(e.lora_A)
            sd[f"{name}.lora_up.weight"] = cast(e.lora_B)
            sd[f"{name}.alpha"] = torch.tensor(float(e.rank), dtype=dtype or torch.float32)
            ranks.append(e.rank)
    if not sd:
        raise ValueError("lora_kohya_state_dict: nothing to write (empty export)")
    dim = Counter(ranks).most_common(1)[0][0]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(dim)}
    return sd, meta


def save_lora_kohya(
    path: str | os.PathLike,
    exports_by_prefix: Mapping[str, Mapping[str, LoraExport]],
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    names: Mapping[str, Mapping[str, str]] | None = None,
    models: Mapping[str, nn.Module] | None = None,
) -> dict[str, str]:
    """Write a kohya LoRA ``.safetensors`` (ComfyUI, A1111 and diffusers' ``load_lora_weights`` read it).

    Args:
        path: Output file.
        exports_by_prefix: prefix -> {module path: export} (from :func:`to_lora`).
        dtype: Storage dtype (default float16).
        metadata: Extra header entries (strings).
        names: Per prefix ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names).
        models: Optional prefix -> model (legacy name prefixes, see :func:`lora_kohya_state_dict`).
    """
    from ..formats.kohya import _check_output, _write_kohya_file

    path, extra = _check_output("save_lora_kohya", path, metadata)
    sd, meta = lora_kohya_state_dict(exports_by_prefix, dtype, names, models)
    return _write_kohya_file(sd, path, meta, extra)
